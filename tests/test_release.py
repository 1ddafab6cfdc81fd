"""Memory of the records: a dropped tape frees them at once; ``release=True`` (what
``dlb.explain`` does) frees them behind the reverse walk, with the same results."""

import gc
import weakref

import pytest
import torch
import transformers
from test_golden import W, bitwise_expected, compare, load, rerun
from torch import nn

import dlbhooks as dlb
from dlbhooks.corpus import POSITIONS_PER_PASS, explain_batch


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=24, intermediate_size=40,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).double().eval()


IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


def watch_outputs(model: nn.Module) -> tuple[list, list]:
    """Weak references to every module output of the next forward, and the hook handles."""
    refs: list = []

    def hook(module, args, out):
        for t in (out,) if isinstance(out, torch.Tensor) else getattr(out, "values", lambda: ())():
            if isinstance(t, torch.Tensor):
                refs.append(weakref.ref(t))

    return refs, [m.register_forward_hook(hook) for m in model.modules()]


@pytest.fixture
def no_cycle_collector():
    """Python's cycle collector off: what is freed, is freed by reference counting."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_dropped_tape_frees_its_records_without_the_cycle_collector(no_cycle_collector):
    """Records point at their parents and children; a tape dropped in a loop of
    explanations used to keep every recorded tensor until the cycle collector ran
    (gigabytes per tape at 2,048 tokens)."""
    model = tiny_llama()
    refs, handles = watch_outputs(model)
    with dlb.trace(model) as tape:
        model(input_ids=IDS)
    for h in handles:
        h.remove()
    assert len(refs) > 20 and all(r() is not None for r in refs)
    tape.explain(target=3, keep=False)
    del tape
    assert [r for r in refs if r() is not None] == []


def test_dlb_explain_keeps_no_recorded_tensor_alive(no_cycle_collector):
    """The one-call API's tape goes when it returns: the explanation holds relevance only."""
    model = tiny_llama()
    refs, handles = watch_outputs(model)
    exp = dlb.explain(model, {"input_ids": IDS}, target=3)
    for h in handles:
        h.remove()
    assert len(refs) > 20
    assert [r for r in refs if r() is not None] == []
    assert exp.inputs["input_ids"].shape == (2, 9)


# -- release=True: the records freed behind the walk -------------------------------------------

EXPLAIN_CASES = [n for n in W.CASES if not n.startswith("generation_")]


@pytest.mark.parametrize("name", EXPLAIN_CASES)
def test_a_released_walk_gives_the_golden_results(name):
    """Every golden case, both modes, each on its own traced forward explained with
    release=True: the stored results (bitwise on the machine that wrote them). A rule that
    read a record the walk had released would raise RecordReleasedError here."""
    meta, stored = load(name)
    got, info = rerun(name, meta, stored, release=True)
    errors = compare(meta, stored, got, info, bitwise_expected(meta))
    assert not errors, "\n".join(errors[:12])


def _outputs_of(tape, where=lambda rec: True) -> list:
    return [weakref.ref(t) for rec in tape.records if where(rec) for t in rec.outputs]


@pytest.mark.parametrize("storage", [None, "cpu", "fp32"])
def test_after_a_released_walk_no_recorded_tensor_is_alive(storage, no_cycle_collector):
    """With the tape still held, every tensor its records kept (copies too, under a
    storage policy) is freed by the end; the same forward explained without release
    gives the same results, bitwise, and keeps them."""
    model = tiny_llama()
    tapes = []
    for _ in range(2):
        with dlb.trace(model, storage=storage) as tape:
            model(input_ids=IDS)
        tapes.append(tape)
    kept, released = tapes
    refs = _outputs_of(released)
    records = [weakref.ref(rec) for rec in released.records]
    assert len(refs) > 20
    want = kept.explain(targets=[3, 5], mode="contrastive")
    got = released.explain(targets=[3, 5], mode="contrastive", release=True)
    assert [r for r in refs if r() is not None] == []
    assert all(r() is not None for r in _outputs_of(kept))
    assert all(rec.released for rec in released.records)
    assert dlb.record_bytes(released) == 0 < dlb.record_bytes(kept)
    del released, tapes, tape  # released records are in no reference cycle either
    assert [r for r in records if r() is not None] == []
    for g, w in zip(got, want):
        assert torch.equal(g.inputs["input_ids"], w.inputs["input_ids"])
        assert torch.equal(g.positive["input_ids"], w.positive["input_ids"])
        assert g.ledger == w.ledger and g.layers == w.layers


def test_the_walk_frees_each_layer_once_it_has_passed_it(monkeypatch):
    """When the walk reaches the embedding (the last record), the logits and every tensor
    recorded inside the decoder layers it passed before the first are freed with
    release=True; all are alive without. (The first layer's normed input may still be
    held, with its |a|, by the one-value memo the q/k/v projections share.)"""
    from dlbhooks.engine import Engine

    model = tiny_llama()
    alive = {}
    original = Engine.propagate

    def watched(engine, rec, R_out, **kwargs):
        if rec.type_name == "Embedding":
            alive[engine.release] = (sum(r() is not None for r in inside),
                                     logits() is not None)
        return original(engine, rec, R_out, **kwargs)

    monkeypatch.setattr(Engine, "propagate", watched)
    for release in (False, True):
        with dlb.trace(model) as tape:
            logits = weakref.ref(model(input_ids=IDS).logits)
        inside = _outputs_of(tape, lambda rec: rec.path.startswith(("model.layers.1",
                                                                    "model.layers.2")))
        tape.explain(target=3, keep=False, release=release)
        del tape
    n = len(inside)
    assert n > 25 and alive == {False: (n, True), True: (0, False)}


def test_a_released_tape_says_so_and_what_to_do():
    model = tiny_llama()
    with dlb.trace(model) as tape:
        model(input_ids=IDS)
    with pytest.raises(dlb.TraceError, match="release=True frees the records that share"):
        tape.explain(target=3, release=True, share=True)
    tape.explain(target=3, release=True)
    with pytest.raises(dlb.RecordReleasedError, match="trace the forward again"):
        tape.explain(target=3)
    rec = next(r for r in tape.records if r.path == "model.layers.1.mlp.down_proj")
    with pytest.raises(dlb.RecordReleasedError,
                       match=r"'model.layers.1.mlp.down_proj' \(torch.nn.modules.linear.Linear\)"):
        rec.input_value(0)
    assert rec.released and len(rec.input_ids()) == 1


def test_dlb_explain_and_corpus_batches_release_unless_told_or_sharing(monkeypatch):
    from dlbhooks.engine import Engine

    seen = []
    original = Engine.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.release)

    monkeypatch.setattr(Engine, "__init__", init)
    model = tiny_llama()
    a = dlb.explain(model, {"input_ids": IDS}, target=3)
    b = dlb.explain(model, {"input_ids": IDS}, target=3, release=False)
    dlb.explain(model, {"input_ids": IDS}, target=3, share=True)
    assert seen == [True, False, False]
    assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])
    # a corpus batch explained in one reverse pass frees its records; in two, it shares
    seen.clear()
    explain_batch(model, IDS, target="next", positions=[3, 7])
    long_ids = torch.randint(0, 97, (1, POSITIONS_PER_PASS + 2))
    explain_batch(model, long_ids, target="next",
                  positions=list(range(POSITIONS_PER_PASS + 1)))
    assert seen == [True, False, False]
    # explain_generation: its last reverse pass frees them, unless the passes share
    seen.clear()
    prompt = IDS[:1, :5]
    for share in (False, True):
        dlb.explain_generation(model, prompt, max_new_tokens=3, targets_per_pass=2,
                               share=share)
    dlb.explain_generation(model, prompt, max_new_tokens=3)
    assert seen == [False, True, False, False, True]
