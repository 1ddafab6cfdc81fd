"""Shared test helpers: conservation checks and small utilities."""

from __future__ import annotations

import torch

import dlbhooks as dlb


def _pair(v):
    return v if isinstance(v, tuple) else (v,)


def assert_conserved(exp: dlb.Explanation, rtol: float = 1e-12, scale: float | None = None):
    """Every processed call: relevance out = relevance in + absorbed (own + inside).

    Checked per stream in contrastive mode, relative to ``scale`` (default: the
    explanation's total seeded relevance). The default ``rtol`` is for float64, where the
    ledger closes to ~1e-16; float32 and low-precision records pass their measured bound.
    """
    assert exp.ledger, "empty ledger"
    root = exp.ledger[0]
    ref = scale if scale is not None else max(abs(x) for x in _pair(root.relevance_out))
    for e in exp.ledger:
        for out, inn, ab in zip(_pair(e.relevance_out), _pair(e.relevance_in),
                                _pair(e.absorbed_inside)):
            err = abs(out - (inn + ab))
            assert err <= rtol * ref, (
                f"{e.key} ({e.type}): out={out} in={inn} absorbed={ab} err={err}"
            )
    # the whole explanation: seeded = inputs + everything absorbed
    for out, inn, ab in zip(_pair(root.relevance_out), _pair(root.relevance_in),
                            _pair(root.absorbed_inside)):
        assert abs(out - inn - ab) <= rtol * ref


def explain_both(model, inputs, **kw):
    """Default and contrastive explanations of the same inputs."""
    return [dlb.explain(model, inputs, mode=m, **kw) for m in ("default", "contrastive")]


def double(model):
    return model.double().eval()


def seeded(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def tiny_llama():
    """A 2-layer random Llama (vocabulary 40, hidden 16, GQA 4/2) in float64, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).double().eval()
