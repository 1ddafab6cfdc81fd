"""``dlbhooks experts`` and ``dlbhooks prune``: expert analysis and pruning of any MoE
checkpoint directory on disk, on your own text.

    dlbhooks experts CHECKPOINT --data code.jsonl --domain code --out code.safetensors
    dlbhooks prune CHECKPOINT --stats code.safetensors --fraction 0.25 --out pruned/ \\
        --eval code=heldout_code.jsonl prose=heldout_prose.txt

``CHECKPOINT`` is a directory written by ``save_pretrained`` (its tokenizer too), or
``tiny-moe``: the byte-level MoE that ships with dlbhooks. ``experts`` runs on one process
or several (``accelerate launch -m dlbhooks.cli experts ...``) with the same result, and
continues a partial statistics file where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, cast

import torch

from . import corpus
from .analysis.checkpoint import moe_layout, prune_checkpoint
from .analysis.experts import ExpertStats
from .analysis.prune_eval import evaluate_pruning, experts_to_drop, heldout_loss, pruning_plan
from .analysis.pruning import moe_blocks
from .analysis.texts import (
    DataError,
    Tokenize,
    byte_tokenizer,
    consecutive_windows,
    fingerprint,
    hf_tokenizer,
    parse_positions,
    read_documents,
    spread_windows,
    token_stream,
)
from .explain_cli import CommandError, add_loading_arguments, load_model, load_tokenizer
from .tiny_moe import asset_path

#: the CHECKPOINT name of the model that ships with dlbhooks
SHIPPED = "tiny-moe"
COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")


def _checkpoint(name: str) -> Path:
    if name == SHIPPED:
        return asset_path()
    return Path(name)


def _tokenize(args: argparse.Namespace, path: Path) -> Tokenize:
    if args.tokenizer == "bytes" or (args.tokenizer is None and args.checkpoint == SHIPPED):
        return byte_tokenizer()
    source = args.tokenizer or path
    return hf_tokenizer(load_tokenizer(source, "give one with --tokenizer DIR (or "
                                               "--tokenizer bytes for the tiny MoE's bytes)"))


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, Path]:
    path = _checkpoint(args.checkpoint)
    if args.quiet:
        from transformers.utils import logging

        logging.disable_progress_bar()
    model, auto = load_model(path, dtype=args.dtype, device_map=args.device_map,
                             offload_folder=args.offload_folder,
                             trust_remote_code=args.trust_remote_code)
    if auto != "AutoModelForCausalLM":
        raise CommandError(f"{path}: expert statistics need a causal language model "
                           f"(next-token targets); this checkpoint loads as {auto}")
    return model, path


def _moe_counts(model: torch.nn.Module, path: Path) -> dict[str, int]:
    """MoE blocks the pruning code knows (block path -> experts); a CommandError for a
    model without experts."""
    blocks = {p: int(cast(Any, router).num_experts) for p, (router, _) in
              moe_blocks(model).items()}
    if not blocks and not any(_config_count(model.config, a) for a in COUNT_ATTRS):
        raise CommandError(f"{path} is not a mixture-of-experts checkpoint "
                           f"({type(model).__name__}: no MoE block, no expert count in its "
                           "config)")
    return blocks


def _config_count(cfg: Any, attr: str) -> int | None:
    for c in (cfg, getattr(cfg, "text_config", None)):
        v = getattr(c, attr, None) if c is not None else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


# -- dlbhooks experts ------------------------------------------------------------------------


def experts_command(args: argparse.Namespace) -> int:
    try:
        return _experts(args)
    except (CommandError, DataError) as err:
        print(f"dlbhooks experts: {err}")
        return 2
    finally:
        _shut_down(barrier=False)  # (after a success: already done; after an error: no
        # collective call, another process may be inside one)


def _shut_down(barrier: bool) -> None:
    """Leave a process group cleanly: wait for every process, then destroy the group (a
    process leaving gloo while another still tears it down can abort with "terminate
    called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def _windows(args: argparse.Namespace, model: torch.nn.Module, path: Path
             ) -> tuple[torch.Tensor, list[int], dict]:
    """The windows [n, length (+ 1 for next-token targets)], the target positions, and
    the run's description (what a partial statistics file must match to be continued)."""
    docs = read_documents(args.data)
    tokenize = _tokenize(args, path)
    stream = token_stream(docs, tokenize)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and stream.numel() and int(stream.max()) >= vocab:
        raise CommandError(f"token id {int(stream.max())} is outside the model's vocabulary "
                           f"of {vocab}: is {tokenize.name} the model's tokenizer?")
    rows = spread_windows(stream, args.windows, args.length + int(args.target == "next"))
    positions = parse_positions(args.positions, args.length)
    run = {"checkpoint": str(path), "data": [str(Path(f).name) for f in args.data],
           "tokens": int(stream.numel()), "windows": args.windows, "length": args.length,
           "positions": positions, "target": args.target, "mode": args.mode,
           "batch_size": args.batch_size, "dtype": args.dtype, "storage": args.storage,
           "rows": fingerprint(rows)}
    return rows, positions, run


def _experts(args: argparse.Namespace) -> int:
    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name, v in (("--length", args.length), ("--windows", args.windows),
                    ("--batch-size", args.batch_size), ("--save-every", args.save_every)):
        if v < 1:
            raise CommandError(f"{name} must be at least 1, got {v}")
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise CommandError(f"--out {out} is a directory; give a file name")
    read_documents(args.data)  # (before loading the model: a bad file costs nothing)
    state = corpus.default_state(cpu=True if args.cpu else None)
    model, path = _load(args)
    if not args.device_map:
        model.to(state.device)
    counts = _moe_counts(model, path)
    rows, positions, run = _windows(args, model, path)
    batches = corpus.chunk(rows, args.batch_size)
    domain = args.domain or _domain_name(args.data[0])
    stats, start = _resume(out, run, len(batches), args.force)
    if start == len(batches):
        if state.is_main_process:
            print(f"{out} is complete ({len(batches)} batches); nothing to do (--force "
                  "starts over)")
        return 0
    stats.info.update(domain=domain, run=run, batches=len(batches),
                      model={"checkpoint": str(path),
                             "model_type": cast(Any, model).config.model_type,
                             "experts": counts})

    def per_batch(batch: torch.Tensor) -> ExpertStats:
        exps, mask = corpus.explain_batch(model, batch,
                                   target="next" if args.target == "next" else None,
                                   positions=positions, mode=args.mode,
                                   storage=args.storage)
        return corpus.batch_expert_stats(exps, mask)

    if start and state.is_main_process:
        print(f"continuing {out}: {start} of {len(batches)} batches done")
    done = start
    for part in corpus.corpus_map(per_batch, batches[start:], state=state,
                           progress=not args.quiet, sync_every=args.sync_every,
                           desc=f"experts {domain}"):
        stats.merge(part)
        done += 1
        if state.is_main_process and (done % args.save_every == 0 or done == len(batches)):
            stats.info["batches_done"] = done
            _save_atomic(stats, out)
    if state.is_main_process:
        print(f"{domain}: {rows.shape[0]} windows of {args.length} tokens "
              f"({run['tokens']:,} tokens of data), positions {positions}, target "
              f"{args.target}, {args.mode} mode; {state.num_processes} process(es), "
              f"{time.time() - t0:.1f} s")
        print(stats)
        print(f"saved {out}")
    _shut_down(barrier=True)
    return 0


def _domain_name(spec: str) -> str:
    """A data file's domain name: its stem (``tiny-moe:code`` -> ``code``)."""
    if spec.startswith("tiny-moe:"):
        return spec.split(":")[1]
    return Path(spec).stem


def _resume(out: Path, run: dict, n_batches: int, force: bool) -> tuple[ExpertStats, int]:
    """The statistics to continue (and batches already in them), or new ones."""
    if force or not out.exists():
        return ExpertStats(), 0
    try:
        stats = ExpertStats.load(out)
    except Exception as err:  # noqa: BLE001 - any unreadable file: say which and why
        raise CommandError(f"--out {out} exists and is not an expert statistics file "
                           f"({type(err).__name__}: {err}); remove it or pass --force") from None
    before = stats.info.get("run")
    if before != run:
        diff = sorted(k for k in set(run) | set(before or {})
                      if (before or {}).get(k) != run.get(k))
        raise CommandError(f"--out {out} holds statistics of another run (differs in: "
                           f"{', '.join(diff)}); pass --force to start over, or another --out")
    done = int(stats.info.get("batches_done", 0))
    if not 0 <= done <= n_batches:
        raise CommandError(f"--out {out}: {done} batches done of {n_batches}?")
    return stats, done


def _save_atomic(stats: ExpertStats, out: Path) -> None:
    tmp = out.with_name(out.name + ".partial")
    stats.save(tmp)
    os.replace(tmp, out)


# -- dlbhooks prune --------------------------------------------------------------------------


def prune_command(args: argparse.Namespace) -> int:
    try:
        return _prune(args)
    except (CommandError, DataError, ValueError, FileExistsError) as err:
        print(f"dlbhooks prune: {err}")
        return 2


def _load_stats(files: list[str]) -> ExpertStats:
    total = ExpertStats()
    domains = []
    for f in files:
        try:
            part = ExpertStats.load(f)
        except Exception as err:  # noqa: BLE001
            raise CommandError(f"--stats {f}: not an expert statistics file "
                               f"({type(err).__name__}: {err})") from None
        if part.layers and total.layers:
            part.check_layout(total.experts_per_layer(), f"--stats {files[0]}")
        if part.info.get("batches_done", 0) < part.info.get("batches", 0):
            print(f"note: {f} is partial ({part.info['batches_done']} of "
                  f"{part.info['batches']} batches)")
        total.merge(part)
        domains.append(part.info.get("domain", Path(f).stem))
    total.info = {"domain": "+".join(domains), "files": [str(f) for f in files]}
    return total


def _eval_sets(specs: list[str], tokenize: Tokenize, length: int, limit: int
               ) -> dict[str, torch.Tensor]:
    """``[NAME=]FILE`` -> held-out windows per domain (files of one NAME joined)."""
    files: dict[str, list[str]] = {}
    for spec in specs:
        name, _, f = spec.partition("=") if "=" in spec else ("", "", spec)
        files.setdefault(name or _domain_name(f), []).append(f)
    return {name: consecutive_windows(token_stream(read_documents(fs), tokenize), length + 1,
                                      limit) for name, fs in files.items()}


def _prune(args: argparse.Namespace) -> int:

    path = _checkpoint(args.checkpoint)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise CommandError(f"--out {out} exists and is not empty; pass --force to replace it")
    if not (path / "config.json").is_file():
        raise CommandError(f"{path} is not a checkpoint directory: it has no config.json")
    stats = _load_stats(args.stats)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, local_files_only=True,
                                     trust_remote_code=args.trust_remote_code)
    layout = moe_layout(cfg, trust_remote_code=args.trust_remote_code)
    if not layout:
        raise CommandError(f"{path} has no MoE block dlbhooks can prune "
                           f"({cfg.model_type}); see README, 'Experts'")
    stats.check_layout({p: b.num_experts for p, b in layout.items()}, str(path))
    top_k = max(b.top_k for b in layout.values())
    n_drop = experts_to_drop(min(b.num_experts for b in layout.values()), args.fraction, top_k)
    heldout = None
    tokenize = None
    if args.eval:  # read (and check) the held-out data before writing anything
        tokenize = _tokenize(args, path)
        heldout = _eval_sets(args.eval, tokenize, args.length, args.eval_windows)
    plan = pruning_plan(stats, n_drop, args.by, seed=args.seed)
    summary = prune_checkpoint(path, plan, out, force=args.force,
                               trust_remote_code=args.trust_remote_code)
    info = json.loads((out / "pruned_experts.json").read_text())
    info.update(by=args.by, fraction=args.fraction, seed=args.seed,
                stats=[str(f) for f in args.stats], source=str(path))
    (out / "pruned_experts.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {out}: {n_drop} of {min(b.num_experts for b in layout.values())} experts "
          f"removed from each of {len(layout)} MoE blocks (by {args.by}); parameters "
          f"{summary['parameters_before']:,} -> {summary['parameters_after']:,}")
    if heldout is not None:
        _evaluate(args, path, out, stats, heldout, top_k)
    return 0


def _evaluate(args: argparse.Namespace, path: Path, out: Path, stats: ExpertStats,
              heldout: dict[str, torch.Tensor], top_k: int) -> None:
    """Held-out loss before / after (relevance, frequency, random) and the written
    checkpoint's own loss; report.md and report.html in ``out`` (or ``--report``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = _load(args)
    ev = evaluate_pruning(model, stats, args.fraction, heldout, top_k=top_k, chosen=args.by,
                          random_seeds=args.random_seeds, batch_size=args.batch_size,
                          progress=not args.quiet)
    del model
    small, _ = load_model(out, dtype=args.dtype, device_map=args.device_map,
                          offload_folder=args.offload_folder,
                          trust_remote_code=args.trust_remote_code)
    written = {d: heldout_loss(small, rows, args.batch_size) for d, rows in heldout.items()}
    if args.by != "random":
        masked = ev.loss[args.by]
    elif args.seed < args.random_seeds:
        masked = {d: v[args.seed] for d, v in ev.random.items()}
    else:
        masked = {}
    for d, v in written.items():
        if d in masked and not math.isclose(v, masked[d], rel_tol=1e-4, abs_tol=1e-6):
            raise CommandError(f"the written checkpoint's {d} loss {v:.6f} differs from the "
                               f"masked-routing loss {masked[d]:.6f}")
    windows = {d: rows.shape[0] for d, rows in heldout.items()}
    ev.info.update(title=f"Expert pruning: {Path(args.checkpoint).name}",
                   checkpoint=f"{path} -> {out}",
                   statistics=f"{', '.join(args.stats)} ({stats.explanations} explanations)",
                   evaluation=f"{args.length}-token windows per domain {windows}; the "
                              f"written checkpoint's loss: "
                              + ", ".join(f"{d} {v:.4f}" for d, v in written.items()))
    report = Path(args.report) if args.report else out / "report"
    report.parent.mkdir(parents=True, exist_ok=True)
    md, page = report.with_suffix(".md"), report.with_suffix(".html")
    ev.info["written_loss"] = written
    md.write_text(ev.to_markdown(), encoding="utf-8")
    report.with_suffix(".json").write_text(json.dumps(ev.to_json(), indent=1) + "\n",
                                           encoding="utf-8")
    page.write_text(ev.to_html(), encoding="utf-8")
    print(ev.to_markdown())
    print(f"report: {md}, {page} and {report.with_suffix('.json')}")


# -- arguments -------------------------------------------------------------------------------


def _loading_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=f"a checkpoint directory (config.json + weights + "
                   f"tokenizer), or {SHIPPED!r} for the MoE that ships with dlbhooks")
    add_loading_arguments(p)
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer directory if the checkpoint has none, or 'bytes' (the "
                        "tiny MoE's byte vocabulary)")
    p.add_argument("--length", type=int, default=128, help="tokens the model reads per window")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def add_experts_arguments(p: argparse.ArgumentParser) -> None:
    _loading_arguments(p)
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="text files (one document each) or JSONL files (a 'text' field per "
                        "line)")
    p.add_argument("--domain", default=None,
                   help="a name for this data (default: the first file's name)")
    p.add_argument("--out", required=True, help="the ExpertStats file (safetensors)")
    p.add_argument("--windows", type=int, default=512,
                   help="windows spread evenly over the data (default 512; see "
                        "docs/expert_stability.md)")
    p.add_argument("--positions", default="4",
                   help="target positions per window: a count K (spread over the last three "
                        "quarters, default 4), 'last', or indices separated by commas")
    p.add_argument("--target", choices=["next", "argmax"], default="next",
                   help="the true next token (default) or the model's prediction")
    p.add_argument("--mode", choices=["default", "contrastive"], default="default")
    p.add_argument("--storage", default=None,
                   help="where records keep tensors: cpu, bf16, cpu+bf16 (see README)")
    p.add_argument("--save-every", type=int, default=16,
                   help="batches between two saves of the partial statistics")
    p.add_argument("--sync-every", type=int, default=4,
                   help="batches per process between two gathers")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if GPUs exist")
    p.add_argument("--force", action="store_true",
                   help="start over even if --out holds a partial run")


def add_prune_arguments(p: argparse.ArgumentParser) -> None:
    _loading_arguments(p)
    p.add_argument("--stats", nargs="+", required=True, metavar="FILE",
                   help="ExpertStats files from dlbhooks experts (several are summed)")
    p.add_argument("--fraction", type=float, required=True,
                   help="fraction of the experts of every MoE block to remove")
    p.add_argument("--by", choices=["relevance", "frequency", "random"], default="relevance",
                   help="which experts go: least |relevance| (default), least routed, or at "
                        "random (--seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of --by random")
    p.add_argument("--out", required=True, help="the directory of the smaller checkpoint")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--eval", nargs="+", default=None, metavar="[NAME=]FILE",
                   help="held-out text per domain: loss before and after, against frequency "
                        "and random pruning; writes report.md and report.html")
    p.add_argument("--eval-windows", type=int, default=64,
                   help="consecutive windows per domain (default 64)")
    p.add_argument("--random-seeds", type=int, default=10,
                   help="seeds of the random baseline (default 10)")
    p.add_argument("--report", default=None,
                   help="report path without suffix (default: OUT/report)")


EXPERTS_DESCRIPTION = (
    "Expert statistics (relevance, routing frequency and weight per MoE block and expert) "
    "of a checkpoint over your text: --windows windows of --length tokens spread over the "
    "--data files, the true next token explained at --positions. Saved to --out and resumed "
    "from it; on several processes with: accelerate launch -m dlbhooks.cli experts ...")
PRUNE_DESCRIPTION = (
    "Write a smaller checkpoint without the least important experts of every MoE block "
    "(the same number per block), from dlbhooks experts statistics. With --eval, compare the "
    "held-out loss before and after against frequency- and random-based pruning.")
