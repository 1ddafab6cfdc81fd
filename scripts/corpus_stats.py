"""ExpertStats over a corpus on one process or several, with a progress bar.

Windows of a domain's text (``dlbhooks.tiny_moe``: ``code`` or ``prose``) are explained with
the shipped tiny MoE (or ``--model DIR``, a local causal LM with the same byte vocabulary);
the statistics are written by the main process to ``--out`` and summarised per layer. The
result is the same for any number of processes (docs/corpus_runs.md):

    python scripts/corpus_stats.py --domain code --sequences 64 --length 64 --out code.safetensors
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no scripts/corpus_stats.py --cpu --domain code --out code.safetensors

(On machines without GPUs ``--multi_gpu`` still starts the processes, through torchrun, and
``--cpu`` makes them a CPU/gloo group; ``accelerate launch --cpu`` alone starts a single
process unless an MPI hostfile is given.) Same as ``dlbhooks corpus-stats``.
"""

from __future__ import annotations

import sys

from dlbhooks.cli import main

if __name__ == "__main__":
    sys.exit(main(["corpus-stats", *sys.argv[1:]]))
