"""Corpus runs (dlbhooks.corpus, dlbhooks experts): sharding over processes and
gathering give the same ExpertStats and token relevance as one process.

Tolerance: the per-batch results are merged in batch order whatever the number of
processes, so the float64 sums are formed in the same order and the outputs are expected
to be bit-identical when each batch's explanation is reproducible (same machine, dtype and
one torch thread per process; measured: max abs difference 0.0). Counts (tokens, routed,
explanations) must match exactly; float sums are compared at rtol 1e-12 — far below the
float32 model's own resolution (~1e-7), so a lost, duplicated or misplaced batch fails,
while leaving room for float64 re-association should merging ever group partial sums."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

import dlbhooks as dlb
from dlbhooks import corpus
from dlbhooks.explaining import explain_targets
from dlbhooks.tiny_moe import corpus_ids, load_tiny_moe

RTOL = 1e-12


def assert_same_stats(a: dlb.ExpertStats, b: dlb.ExpertStats, rtol: float = RTOL) -> None:
    assert a.explanations == b.explanations
    assert list(a.layers) == list(b.layers) and a.layers
    for layer in a.layers:
        x, y = a.layers[layer], b.layers[layer]
        assert x.tokens == y.tokens
        assert torch.equal(x.routed, y.routed), layer
        for name in ("relevance", "abs_relevance", "weight"):
            u, v = getattr(x, name), getattr(y, name)
            assert u.dtype == v.dtype == torch.float64
            scale = float(v.abs().max())
            assert float((u - v).abs().max()) <= rtol * scale, (layer, name)


# -- sharding and gathering, simulated with threads (no model) ------------------------------
class FakeState:
    """Rank ``rank`` of ``world``: accelerate's own split_between_processes on fake ranks."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world
        self.is_main_process = rank == 0

    def split_between_processes(self, items):
        from accelerate import PartialState

        return PartialState.split_between_processes(self, items)


@pytest.mark.parametrize("world,sync_every,n", [(3, 2, 7), (2, 1, 3), (4, 1, 2), (2, 5, 0)])
def test_corpus_map_shards_and_gathers_in_order(monkeypatch, world, sync_every, n):
    slots: list = [None] * world
    barrier = threading.Barrier(world, timeout=60)
    rank = threading.local()
    seen: dict[int, list[int]] = {r: [] for r in range(world)}

    def fake_gather(obj):  # all_gather_object, then flattened in rank order like accelerate
        slots[rank.r] = list(obj)
        barrier.wait()
        out = [x for s in slots for x in s]
        barrier.wait()
        return out

    monkeypatch.setattr("accelerate.utils.gather_object", fake_gather)
    results: dict[int, list] = {}

    def worker(r: int) -> None:
        rank.r = r

        def fn(i):
            seen[r].append(i)
            return ("item", i * i)

        results[r] = list(corpus.corpus_map(fn, list(range(n)), state=FakeState(r, world),
                                            progress=False, sync_every=sync_every))

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    expected = [("item", i * i) for i in range(n)]
    assert all(results[r] == expected for r in range(world)), results
    # every item ran exactly once, on one process
    ran = sorted(i for r in range(world) for i in seen[r])
    assert ran == list(range(n))
    if n >= world:
        assert all(seen[r] for r in range(world))  # the work was really shared


def test_default_state_refuses_a_silent_single_process(monkeypatch):
    corpus.default_state()  # initialise the (single-process) state first
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="whole corpus"):
        corpus.default_state()


# -- the in-process API on the shipped tiny MoE ---------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    model, _ = load_tiny_moe()
    rows = corpus.windows(corpus_ids("prose", "train"), 5, 17, seed=1)
    return model, corpus.chunk(rows, 2)  # batches of 2, 2, 1 rows; 16 tokens read each


def test_corpus_expert_stats_matches_a_plain_loop(tiny):
    model, batches = tiny
    positions = [4, -1]
    stats = corpus.corpus_expert_stats(model, batches, target="next", positions=positions,
                                       progress=False, sync_every=2)
    parts, plain, single = [], dlb.ExpertStats(), dlb.ExpertStats()
    for b in batches:
        with dlb.trace(model) as tape:
            model(input_ids=b[:, :-1])
        part = dlb.ExpertStats()
        specs = [(b[:, p + 1].tolist(), p) for p in (4, 15)]
        for exp in explain_targets(tape, specs, keep=False):  # both positions in one pass
            part.add(exp)
            plain.add(exp)
        for target, p in specs:  # one pass per position
            single.add(tape.explain(target=target, position=p))
        parts.append(part)
    assert_same_stats(stats, corpus.merge_in_order(parts), rtol=0.0)  # same order: identical
    assert_same_stats(stats, plain)  # sequential adds: the same sums, regrouped
    # one pass per position: float32 products summed in another order (measured 5.6e-8)
    assert_same_stats(stats, single, rtol=1e-6)
    assert stats.explanations == 6
    assert stats.layers["model.layers.0.mlp"].tokens == 2 * (2 + 2 + 1) * 16  # positions×rows×len


def test_corpus_stats_with_cpu_record_storage_equal_the_default(tiny):
    model, batches = tiny
    kw = dict(target="next", positions=[4, -1], progress=False, sync_every=2)
    plain = corpus.corpus_expert_stats(model, batches, **kw)
    stored = corpus.corpus_expert_stats(model, batches, storage="cpu", **kw)
    assert_same_stats(stored, plain, rtol=0.0)  # lossless copies: identical (measured 0)


def test_corpus_token_relevance_rows_in_order(tiny):
    model, batches = tiny
    rel = corpus.corpus_token_relevance(model, batches, target="next", progress=False)
    many = corpus.corpus_token_relevance(model, batches, target=None, positions=[3, -1],
                                         progress=False, sync_every=1)
    rows = torch.cat(batches)
    assert len(rel) == len(many) == 5
    for i, r in enumerate(rel):
        x = rows[i:i + 1]
        exp = dlb.explain(model, {"input_ids": x[:, :-1]}, target=[int(x[0, -1])],
                          position=15)
        assert r.shape == (16,)
        # the float32 model batched vs alone: measured 2.6e-7 of the largest entry (about two
        # float32 roundings) and 1.5e-7 of the total
        want = exp.inputs["input_ids"][0]
        torch.testing.assert_close(r, want, rtol=0, atol=1e-6 * float(want.abs().max()))
        assert float(r.sum()) == pytest.approx(100.0 - sum(exp.absorbed.values()), rel=6e-7)
        assert many[i].shape == (2, 17)  # target=None: the model reads all 17 tokens
        assert float(many[i][0, 4:].abs().sum()) == 0.0  # causal: position 3 sees 0..3
        assert float(many[i][1].sum()) > 0.0


def test_bad_targets_raise(tiny):
    model, batches = tiny
    with pytest.raises(ValueError, match="unknown target"):
        corpus.corpus_expert_stats(model, batches, target="last", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        corpus.corpus_expert_stats(model, batches, target="next", positions=16,
                                   progress=False)


# -- the script: one process vs accelerate launch on two ------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ARGS = ["experts", "tiny-moe", "--data", "tiny-moe:code", "--windows", "8", "--length", "32",
        "--batch-size", "3", "--positions", "2", "--threads", "1", "--quiet"]


def test_two_processes_equal_one(tmp_path):
    """``dlbhooks experts`` in one process, and under ``accelerate launch`` in two."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    one = subprocess.run(
        [sys.executable, "-m", "dlbhooks.cli", *ARGS, "--out", str(tmp_path / "one.st")],
        env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "1 process(es)" in one.stdout
    # ``--cpu`` alone would make accelerate start one process (its simple launcher); the
    # multi-GPU launcher (torchrun) starts two, and the command's --cpu joins them over gloo.
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
         "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         "-m", "dlbhooks.cli", *ARGS, "--cpu", "--sync-every", "1",  # rounds [0 | 1], [2 | -]
         "--out", str(tmp_path / "two.st")],
        env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    assert two.stdout.count("ExpertStats over") == 1  # only the main process reports
    a = dlb.ExpertStats.load(tmp_path / "one.st")
    b = dlb.ExpertStats.load(tmp_path / "two.st")
    assert a.explanations == 3 * 2 and len(a.layers) == 4  # 3 batches × 2 positions
    for st in a.layers.values():  # every window counted once: 8 rows × 32 tokens × 2
        assert st.tokens == 512 and float(st.routed.sum()) == 2 * 512  # top-2 routing
    assert_same_stats(b, a)
    assert a.info["batches_done"] == b.info["batches_done"] == 3
