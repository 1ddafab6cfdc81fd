"""Golden results: every case of scripts/write_golden.py, explained again from its stored
weights and inputs, must give the stored results — bitwise when the file's fingerprint
matches this machine (torch / transformers / torchvision versions, thread count, CPU model),
else to 1e-13 relative to the seeded relevance. Regenerate (after a deliberate change of
results) with ``python scripts/write_golden.py [--only CASE]``."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
RTOL = 1e-13


def _script():
    name = "write_golden"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "write_golden.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


W = _script()


def load(name: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(metadata, tensors) of a golden file."""
    from safetensors import safe_open

    path = GOLDEN / f"{name}.safetensors"
    if not path.exists():
        pytest.fail(f"{name}: no golden file {path}; run scripts/write_golden.py --only {name}")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["golden"])
        return meta, {k: f.get_tensor(k) for k in f.keys()}


def bitwise_expected(meta: dict[str, Any]) -> bool:
    """True when the file was written on a machine like this one (same fingerprint)."""
    here, there = W.fingerprint(), meta["fingerprint"]
    return all(here[k] == there.get(k) for k in W.BITWISE_KEYS)


def _seed(meta: dict[str, Any], stored: dict[str, Tensor], mode: str) -> float:
    """The total seeded relevance of one mode: the scale of the relative tolerance."""
    if meta["kind"] == "generation":
        return float(meta["explain"].get("multiplier", 100.0))
    keys = meta["info"][f"{mode}/ledger"]
    out = stored[f"results/{mode}/ledger"][keys.index("<root>"), 0]
    return float(out.nan_to_num(0).abs().max())


def _check(label: str, got: Tensor, want: Tensor, bitwise: bool, scale: float) -> str | None:
    """None if ``got`` matches ``want`` (bitwise, or to RTOL × scale), else why not."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{label}: got {got.dtype} {tuple(got.shape)}, stored {want.dtype} " \
               f"{tuple(want.shape)}"
    if not want.is_floating_point():
        n = int((got != want).sum())
        return None if n == 0 else f"{label}: {n} of {want.numel()} entries differ"
    if not torch.equal(got.isnan(), want.isnan()):
        return f"{label}: NaN pattern differs"
    got, want = got.nan_to_num(0), want.nan_to_num(0)
    if torch.equal(got, want):
        return None
    err = float((got.double() - want.double()).abs().max())
    rel = err / scale
    if bitwise:
        return f"{label}: not bitwise equal (same fingerprint): max error {err:.3e} " \
               f"({rel:.2e} of the seed {scale:g})"
    if rel > RTOL:
        return f"{label}: max error {err:.3e} = {rel:.2e} of the seed {scale:g} > {RTOL:g}"
    return None


def compare(meta: dict[str, Any], stored: dict[str, Tensor], got: dict[str, Tensor],
            info: dict[str, Any], bitwise: bool) -> list[str]:
    """Every difference between a fresh run (``got``, ``info``) and the golden file."""
    errors: list[str] = []
    want = {k[len("results/"):]: v for k, v in stored.items() if k.startswith("results/")}
    for k in sorted(set(want) ^ set(got)):
        errors.append(f"{k}: {'missing in this run' if k in want else 'not in the golden file'}")
    for mode in meta["modes"]:
        seed = _seed(meta, stored, mode)
        for k in sorted(set(want) & set(got)):
            if not k.startswith(f"{mode}/"):
                continue
            field = k.split("/")[1]
            if field in ("layers", "absorbed", "blocks", "ledger"):
                continue  # tables: compared by key below
            scale = 1.0 if field == "routing_w" else seed
            errors.append(_check(k, got[k], want[k], bitwise, scale))
        if f"{mode}/target" in meta["info"] and info[f"{mode}/target"] != \
                meta["info"][f"{mode}/target"]:
            errors.append(f"{mode}/target: {info[f'{mode}/target']} != stored "
                          f"{meta['info'][f'{mode}/target']}")
        for table in ("layers", "absorbed", "blocks", "ledger"):
            k = f"{mode}/{table}"
            if k not in meta["info"]:
                continue
            keys_w, keys_g = meta["info"][k], info[k]
            if set(keys_w) != set(keys_g):
                errors.append(f"{k}: keys differ: missing {sorted(set(keys_w) - set(keys_g))[:5]}"
                              f", new {sorted(set(keys_g) - set(keys_w))[:5]}")
                continue
            order = [keys_g.index(key) for key in keys_w]
            g = got[k][order] if keys_w else got[k]
            errors.append(_check(k, g, want[k], bitwise, seed))
            if errors[-1] is not None and g.shape == want[k].shape:
                diff = (g.nan_to_num(0) - want[k].nan_to_num(0)).abs()
                worst = keys_w[int(diff.reshape(len(keys_w), -1).amax(1).argmax())]
                errors[-1] += f" (worst: {worst!r})"
    return [e for e in errors if e is not None]


def rerun(name: str, meta: dict[str, Any], stored: dict[str, Tensor], release: bool = False):
    """Rebuild the case from the stored weights and inputs and explain it again
    (``release``: with the records freed behind the walk, :func:`W.run`)."""
    c = W.build(name)  # a missing torchvision / transformers is an error, not a skip
    if c.asset is not None:
        digest = W.sha256(c.asset)
        assert digest == meta["asset_sha256"], (
            f"{name}: the asset {c.asset.name} changed (sha256 {digest[:12]}, golden "
            f"{meta['asset_sha256'][:12]}): regenerate with scripts/write_golden.py --only {name}")
    else:
        W.load_weights(c.model, {k[len("weights/"):]: v for k, v in stored.items()
                                 if k.startswith("weights/")})
    for k, v in list(c.inputs.items()):
        c.inputs[k] = stored[f"inputs/{k}"]
        assert (v.dtype, v.shape) == (c.inputs[k].dtype, c.inputs[k].shape), (
            f"{name}: input {k} is built as {v.dtype} {tuple(v.shape)}, stored as "
            f"{c.inputs[k].dtype} {tuple(c.inputs[k].shape)}")
    return W.run(c, release)


@pytest.mark.parametrize("name", list(W.CASES))
def test_golden(name):
    meta, stored = load(name)
    got, info = rerun(name, meta, stored)
    bitwise = bitwise_expected(meta)
    errors = compare(meta, stored, got, info, bitwise)
    how = "bitwise (same fingerprint)" if bitwise else f"to {RTOL:g} relative (other machine)"
    assert not errors, (f"{name}: {len(errors)} field(s) differ from tests/golden/{name}"
                        f".safetensors, compared {how}:\n  " + "\n  ".join(errors[:12]))


def test_every_file_has_a_case():
    files = {p.stem for p in GOLDEN.glob("*.safetensors")}
    assert files == set(W.CASES), (
        f"golden files without a case: {sorted(files - set(W.CASES))}; cases without a file: "
        f"{sorted(set(W.CASES) - files)}")


@pytest.mark.parametrize("bitwise", [True, False])
def test_comparison_fails_on_a_1e12_change(bitwise):
    """The comparison can fail: one stored value moved by 1e-12 of the seed is reported."""
    meta, stored = load("mlp")
    got, info = rerun("mlp", meta, stored)
    assert compare(meta, stored, got, info, bitwise) == []
    for key in ("results/default/inputs/input", "results/contrastive/positive/input",
                "results/default/ledger"):
        bad = dict(stored)
        t = stored[key].clone()
        t.view(-1)[1] += 1e-12 * _seed(meta, stored, key.split("/")[1])
        bad[key] = t
        errors = compare(meta, bad, got, info, bitwise)
        assert len(errors) == 1 and key[len("results/"):] in errors[0], errors
