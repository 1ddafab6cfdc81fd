"""Several targets in one reverse pass (``tape.explain(targets=[...])``): each target's
explanation equals the golden file (its first target) or explaining that target alone (the
others), in both modes, on every golden case; and the errors of the API."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from test_golden import W, compare, load
from torch import Tensor, nn

import dlbhooks as dlb
from dlbhooks.errors import TargetError, UnsupportedModuleError
from dlbhooks.explaining import select_output

RTOL = 1e-12  # a batched product may sum in another order
EXPLAIN_CASES = [n for n in W.CASES if not n.startswith("generation_")]


def _other_targets(tape: dlb.Tape, c: W.Case, exp: dlb.Explanation) -> list[Any]:
    """Two targets other than the golden one: the next and the second-next class of every
    row (multiclass outputs); the golden target again where the task has no classes."""
    root = tape.last_root()
    out = root.outputs[select_output(root, c.explain.get("output"))]
    t = exp.target
    if isinstance(t, list) and t and all(isinstance(x, int) for x in t) \
            and c.explain.get("task", "multiclass") == "multiclass":
        C = out.shape[-1]
        return [[(x + 1) % C for x in t], [(x + 2) % C for x in t]]
    return [c.explain.get("target"), c.explain.get("target")]


def _close(got: dict[str, Tensor], want: dict[str, Tensor], scale: float) -> list[str]:
    errors = [f"{k}: missing" for k in sorted(set(want) ^ set(got))]
    for k in sorted(set(want) & set(got)):
        g, w = got[k], want[k]
        if not w.is_floating_point():
            if not torch.equal(g, w):
                errors.append(f"{k}: differs")
            continue
        err = float((g.nan_to_num(0).double() - w.nan_to_num(0).double()).abs().max()) \
            if w.numel() else 0.0
        if err > RTOL * scale:
            errors.append(f"{k}: max error {err:.3e} > {RTOL:g} × {scale:g}")
    return errors


@pytest.mark.parametrize("name", EXPLAIN_CASES)
def test_targets_in_one_pass_equal_golden_and_single(name):
    meta, stored = load(name)
    c = W.build(name)  # with the stored weights and inputs, as test_golden reruns it
    if c.asset is None:
        W.load_weights(c.model, {k[len("weights/"):]: v for k, v in stored.items()
                                 if k.startswith("weights/")})
    for k in list(c.inputs):
        c.inputs[k] = stored[f"inputs/{k}"]
    with dlb.trace(c.model) as tape:
        c.model(**c.inputs)
    opts = {k: v for k, v in c.explain.items() if k != "target"}
    got: dict[str, Tensor] = {}
    info: dict[str, Any] = {}
    for mode in meta["modes"]:
        first = tape.explain(mode=mode, **c.explain)
        targets = [c.explain.get("target"), *_other_targets(tape, c, first)]
        many = tape.explain(mode=mode, targets=targets, **opts)
        assert len(many) == 3 and [e.target for e in many][0] == first.target
        W.add_results(got, info, mode, many[0])
        for t, exp in zip(targets[1:], many[1:]):
            alone = tape.explain(mode=mode, target=t, **opts)
            a: dict[str, Tensor] = {}
            b: dict[str, Tensor] = {}
            W.add_results(a, {}, mode, exp)
            W.add_results(b, {}, mode, alone)
            errors = _close(a, b, float(opts.get("multiplier", 100.0)))
            assert not errors, f"{name} {mode} target {t}: " + "; ".join(errors[:6])
    errors = compare(meta, stored, got, info, bitwise=False)
    assert not errors, (f"{name}: the first of 3 targets differs from tests/golden/{name}"
                        ".safetensors:\n  " + "\n  ".join(errors[:12]))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4)).double().eval()


def test_targets_differ_and_conserve_per_target():
    model = _mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    with dlb.trace(model) as tape:
        model(x)
    exps = tape.explain(targets=[0, 1, 2, 3], multiplier=1.0)
    for k, e in enumerate(exps):
        assert e.target == k
        total = float(e.inputs["input"].sum()) + sum(e.absorbed.values())
        assert abs(total - 3.0) < 1e-12  # 1.0 seeded per row
    assert not torch.equal(exps[0].inputs["input"], exps[1].inputs["input"])


def test_target_and_targets_together_is_an_error():
    model = _mlp()
    with dlb.trace(model) as tape:
        model(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(TargetError, match="not both"):
        tape.explain(target=1, targets=[0, 1])
    for bad in ([], 3, "ab"):
        with pytest.raises(TargetError, match="non-empty list"):
            tape.explain(targets=bad)


def test_a_rule_of_the_first_form_refuses_several_targets():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    def old_rule(rec, R_out, ctx):  # the first rule form: a list, no RuleResult
        return [R_out[0]]

    model = nn.Sequential(nn.Linear(4, 4), Double()).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with dlb.trace(model, rules={Double: old_rule}) as tape:
            model(torch.randn(2, 4, dtype=torch.float64))
        tape.explain(target=0)  # one target: the adapter runs it
        with pytest.raises(UnsupportedModuleError, match="one at a time"):
            tape.explain(targets=[0, 1])


def test_generation_passes_of_several_tokens_equal_one_token_passes():
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).double().eval()
    ids = torch.randint(0, 37, (1, 6))
    for mode in ("default", "contrastive"):
        one = dlb.explain_generation(model, ids, max_new_tokens=5, mode=mode,
                                     targets_per_pass=1)
        for per_pass in (2, 5):
            many = dlb.explain_generation(model, ids, max_new_tokens=5, mode=mode,
                                          targets_per_pass=per_pass)
            assert torch.equal(many.generated, one.generated)
            torch.testing.assert_close(many.matrix, one.matrix, rtol=0, atol=1e-12)
            torch.testing.assert_close(many.absorbed, one.absorbed, rtol=0, atol=1e-12)
    one = dlb.explain_generation(model, ids, max_new_tokens=5, targets_per_pass=1)
    part = dlb.explain_generation(model, ids, max_new_tokens=5, only=[1, 3],
                                  targets_per_pass=2)
    torch.testing.assert_close(part.matrix[[1, 3]], one.matrix[[1, 3]], rtol=0, atol=1e-12)
    assert part.matrix[[0, 2, 4]].isnan().all()
    with pytest.raises(ValueError, match="targets_per_pass"):
        dlb.explain_generation(model, ids, max_new_tokens=2, targets_per_pass=0)


@pytest.mark.parametrize("storage", ["cpu", "cpu+bf16"])
@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_targets_with_a_storage_policy_equal_single_explanations(storage, mode):
    """Stored records are loaded back per rule once for all targets."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).double().eval()
    ids = torch.randint(0, 64, (2, 7))
    with dlb.trace(model, storage=storage) as tape:
        model(input_ids=ids)
    many = tape.explain(targets=[3, 5, 7], mode=mode)
    for t, exp in zip((3, 5, 7), many):
        alone = tape.explain(target=t, mode=mode)
        torch.testing.assert_close(exp.inputs["input_ids"], alone.inputs["input_ids"],
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                   torch.bfloat16])
def test_lazy_zeros_are_zeros_of_the_dtype_and_writable(dtype):
    from dlbhooks.seeds import lazy_zeros

    z = lazy_zeros((2, 3, 5), dtype, torch.device("cpu"))
    assert (z.dtype, tuple(z.shape), z.is_contiguous()) == (dtype, (2, 3, 5), True)
    assert torch.equal(z, torch.zeros(2, 3, 5, dtype=dtype))
    z[1, 2, 4] = 3.0
    assert float(z.sum()) == 3.0 and float(z[1, 2, 4]) == 3.0


def test_sequence_seeds_are_placed_lazily_with_their_support_and_totals():
    """An LM's seed is zero but at the chosen (row, position): it comes with that support,
    several targets are stacked without reading the zeros, and the ledger's total of the
    seed (summed over the support only) equals the dense sum."""
    from dlbhooks.explaining import _Seeded, _stacked_seeds
    from dlbhooks.seeds import make_seed

    torch.manual_seed(0)
    out = torch.randn(2, 5, 7, dtype=torch.float64)
    for mode in ("default", "contrastive"):
        seeds = [make_seed(out, t, mode=mode, position=[1, 3], with_support=True)
                 for t in ([0, 6], [2, 2])]
        for seed, support in seeds:
            rows, pos = support
            assert rows.tolist() == [0, 1] and pos.tolist() == [1, 3]
            dense = make_seed(out, [0, 6], mode=mode, position=[1, 3])
            assert dense.shape == seed.shape
            mask = torch.zeros(2, 5, dtype=torch.bool)
            mask[rows, pos] = True
            assert not seed[:, ~mask].any()  # zero outside the support
        seeded = [_Seeded(s, s.dtype, None, {}, sup) for s, sup in seeds]
        stacked, totals = _stacked_seeds(seeded)
        assert torch.equal(stacked, torch.cat([s for s, _ in seeds]))
        want = stacked.reshape(stacked.shape[0], -1).sum(1)
        assert torch.allclose(totals, want, rtol=1e-15, atol=0)
        explicit = make_seed(out, torch.ones_like(out), with_support=True)
        assert explicit[1] is None  # a dense seed given by the caller: no support
