"""Hugging Face transformers families: recorded attention equals the model's own, the model is
restored on exit, relevance conserves per block in both modes, padding gets exactly 0."""

import pytest
import torch
import transformers
from helpers import assert_conserved

import dlbhooks as dlb

V = 64
DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
           pad_token_id=0)
ENC = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, max_position_embeddings=64, type_vocab_size=2,
           pad_token_id=0)


def _cfg(name):
    t = transformers
    if name == "llama":
        return t.LlamaConfig(**DEC)
    if name == "mistral":
        return t.MistralConfig(**DEC, sliding_window=4)
    if name == "qwen2":
        return t.Qwen2Config(**DEC)
    if name == "qwen3":
        return t.Qwen3Config(**DEC, head_dim=8)
    if name == "gemma2":
        return t.Gemma2Config(**DEC, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
    if name == "gemma3":
        return t.Gemma3TextConfig(**DEC, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
    if name == "phi3":
        return t.Phi3Config(**DEC, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                    "partial_rotary_factor": 0.5})
    if name == "gpt2":
        return t.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            pad_token_id=0)
    if name == "bert":
        return t.BertConfig(**ENC)
    if name == "roberta":
        return t.RobertaConfig(**{**ENC, "pad_token_id": 1})
    if name == "electra":
        return t.ElectraConfig(**ENC, embedding_size=16)
    if name == "albert":
        return t.AlbertConfig(**ENC, embedding_size=16)
    if name == "distilbert":
        return t.DistilBertConfig(vocab_size=V, dim=32, hidden_dim=48, n_layers=2, n_heads=4,
                                  max_position_embeddings=64, pad_token_id=0)
    raise KeyError(name)


DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2"]
ENCODERS = ["bert", "roberta", "electra", "albert", "distilbert"]
HEADS = {
    "decoder": ["AutoModelForCausalLM", "AutoModelForSequenceClassification"],
    "encoder": ["AutoModelForSequenceClassification", "AutoModelForMaskedLM"],
}


def build(name, head):
    torch.manual_seed(0)
    cfg = _cfg(name)
    cfg.num_labels = 3
    model = getattr(transformers, head).from_config(cfg).double().eval()
    with torch.no_grad():  # non-trivial biases and norm weights
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n.lower():
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(name):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    if name in ENCODERS:  # right padding for encoders
        pad = 1 if name == "roberta" else 0
        ids[1, -2:] = pad
        mask[1, -2:] = 0
    else:  # left padding for decoders
        ids[1, :2] = 0
        mask[1, :2] = 0
    return ids, mask


CASES = [(n, h) for n in DECODERS for h in HEADS["decoder"]] + [
    (n, h) for n in ENCODERS for h in HEADS["encoder"]]


def _explain_kwargs(name, head):
    if "MaskedLM" in head:
        return {"position": 2}
    return {}


@pytest.fixture(scope="module")
def runs():
    return {}


def run(case, runs):
    if case not in runs:
        name, head = case
        model = build(name, head)
        ids, mask = batch(name)
        impl = model.config._attn_implementation
        with torch.no_grad():  # the model's own forward (sdpa for most: transformers' default)
            eager = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with dlb.trace(model) as tape:
            traced = model(input_ids=ids, attention_mask=mask).logits
        assert model.config._attn_implementation == impl
        exps = {m: tape.explain(mode=m, **_explain_kwargs(name, head))
                for m in ("default", "contrastive")}
        runs[case] = (model, ids, mask, eager, traced, exps)
    return runs[case]


@pytest.mark.parametrize("case", CASES, ids=[f"{n}-{h[12:]}" for n, h in CASES])
def test_family(case, runs):
    model, ids, mask, eager, traced, exps = run(case, runs)
    ok = torch.isfinite(eager)  # HF eager gives NaN on fully padded float64 rows; we give 0s
    if eager.dim() == 3:  # padded positions attend to nothing: their outputs differ by kind
        ok &= mask.bool().unsqueeze(-1)
    # the recorded forward reproduces the model's own (eager: bit for bit, test_reference_
    # attention; sdpa: to rounding, the mask being additive)
    assert eager.dtype == torch.float64
    torch.testing.assert_close(traced[ok], eager[ok], rtol=1e-12, atol=1e-12,
                               msg="recorded attention must reproduce the model's own")
    assert torch.isfinite(traced).all()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    pad = ~mask.bool()
    for exp in exps.values():
        assert_conserved(exp)
        r = exp.inputs["input_ids"]
        assert r.shape == ids.shape and torch.isfinite(r).all()
        assert bool((r[~pad] != 0).all())
        streams = [r] + ([exp.positive["input_ids"], exp.negative["input_ids"]]
                         if exp.positive is not None else [])
        for s in streams:
            assert bool((s[pad] == 0).all()), "padded positions get exactly 0"
        assert exp.heads and all(h.shape[0] == 2 for h in exp.heads.values())
    d = exps["default"]
    assert d.total_input + d.total_absorbed == pytest.approx(200.0, rel=1e-12)
    assert d.blocks, "per-layer attention / MLP / residual shares"


def test_attention_implementation_and_cache_restored_on_error():
    model = build("llama", "AutoModelForCausalLM")
    before = (model.config._attn_implementation, model.config.use_cache)
    with pytest.raises(RuntimeError):
        with dlb.trace(model):
            raise RuntimeError("boom")
    assert (model.config._attn_implementation, model.config.use_cache) == before


def test_inputs_embeds_relevance_per_entry():
    model = build("llama", "AutoModelForCausalLM")
    ids, _ = batch("llama")
    emb = model.get_input_embeddings()(ids).detach()
    exp = dlb.explain(model, {"inputs_embeds": emb})
    assert exp.inputs["inputs_embeds"].shape == emb.shape
    assert_conserved(exp)
    by_ids = dlb.explain(model, {"input_ids": ids})
    assert torch.allclose(exp.inputs["inputs_embeds"].sum(-1), by_ids.inputs["input_ids"],
                          rtol=0, atol=1e-12)  # (measured 0, entries up to 86)


def test_target_token_and_position():
    model = build("qwen2", "AutoModelForCausalLM")
    ids, _ = batch("qwen2")
    exp = dlb.explain(model, {"input_ids": ids}, target=5, position=3)
    r = exp.inputs["input_ids"]
    assert float(r[:, 4:].abs().sum()) == 0.0, "causal: later tokens cannot matter"
    assert exp.target == 5
    with pytest.raises(dlb.TargetError):
        dlb.explain(model, {"input_ids": ids}, position=9)


def test_attention_rule_uses_recorded_mask_and_gqa():
    """The recorded attention call holds Q, K (post-RoPE, kv heads) and the causal mask."""
    model = build("llama", "AutoModelForCausalLM")
    ids, mask = batch("llama")
    with dlb.trace(model) as tape:
        model(input_ids=ids, attention_mask=mask)
    calls = [r for r in tape.records if r.path.endswith("attention_fn")]
    assert len(calls) == 2
    q, k, v = calls[0].inputs
    assert q.shape[1] == 4 and k.shape[1] == 2  # grouped-query attention recorded as is
    m = calls[0].arguments["mask"]
    assert m.shape[-2:] == (7, 7) and float(m[0, 0, 0, 1]) < -1e30  # causal


@pytest.mark.parametrize("name", ["llama", "qwen3", "bert", "gpt2"])
def test_a_model_set_to_sdpa_records_its_own_sdpa_outputs(name):
    """A model set to "sdpa" (transformers' default) is recorded through the registered
    sdpa function: the traced forward gives the untraced forward's logits bit for bit.
    Asked for attention weights (which sdpa cannot give), eager runs (equal to eager)."""
    from dlbhooks.models import hf_attention

    torch.manual_seed(0)
    head = "AutoModelForCausalLM" if name in DECODERS else "AutoModelForMaskedLM"
    model = getattr(transformers, head).from_config(_cfg(name)).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(1, V, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        model.set_attn_implementation("eager")
        eager = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        model.set_attn_implementation("sdpa")
    with dlb.trace(model) as tape:
        traced = model(input_ids=ids, attention_mask=mask).logits
        assert hf_attention._ORIGINAL  # the model's own implementation, while tracing
    assert not hf_attention._ORIGINAL
    assert model.config._attn_implementation == "sdpa"  # restored
    ok = mask.bool()
    assert torch.equal(traced[ok], plain[ok])
    assert not torch.equal(plain[ok], eager[ok])  # the two paths round differently
    exp = tape.explain()
    assert exp.inputs["input_ids"][1, 6:].abs().sum() == 0  # padding gets exactly 0
    with dlb.trace(model):
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert out.attentions is not None and torch.equal(out.logits[ok], eager[ok])


@pytest.mark.parametrize("name,T,flag", [("llama", 9, True), ("qwen3", 9, True),
                                         ("gpt2", 9, True), ("mistral", 4, True),
                                         ("mistral", 9, False)])
def test_a_purely_causal_mask_goes_to_sdpa_as_its_causal_flag(name, T, flag, monkeypatch):
    """Unpadded, a model set to sdpa gets no mask from its own forward, only sdpa's causal
    flag (the kernel skips the masked blocks: half the work at long contexts). The
    recorded forward does the same, so its logits are the model's own bit for bit; the
    rule still reads the recorded causal mask. A sliding window shorter than the input
    (Mistral's 4 here) is not the causal pattern: that mask goes to sdpa."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_cfg(name)).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(1, V, (2, T))
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with dlb.trace(model) as tape:
        traced = model(input_ids=ids).logits
    assert calls and all(c == ((True, True) if flag else (False, False)) for c in calls)
    if flag:
        assert torch.equal(traced, plain)
    else:
        torch.testing.assert_close(traced, plain, rtol=1e-5, atol=1e-5)
    m = [r for r in tape.records if r.path.endswith("attention_fn")][0].arguments["mask"]
    assert m.shape[-2:] == (T, T) and float(m[0, 0, 0, 1]) < -1e30  # the rule's mask
    exp = tape.explain()
    assert exp.conservation_error() < 1e-5


def test_causal_flag_only_for_exactly_the_causal_pattern():
    """The check behind the causal flag: the pattern exactly (additive or boolean, every
    batch row), a causal call, queries = keys; recomputed when the mask is changed in
    place."""
    from dlbhooks.models.hf_attention import _causal_flag_fits as fits

    T = 6
    q = k = torch.zeros(2, 4, T, 8)
    causal, other = torch.nn.Module(), torch.nn.Module()
    other.is_causal = False
    tri = torch.ones(T, T, dtype=torch.bool).tril()
    add = torch.zeros(2, 1, T, T).masked_fill(~tri, torch.finfo(torch.float32).min)
    assert fits(causal, q, k, add, {}) and fits(causal, q, k, tri.expand(2, 1, T, T), {})
    assert fits(causal, q, k, add.masked_fill(~tri, float("-inf")), {})
    assert not fits(other, q, k, add, {}) and not fits(causal, q, k, add, {"is_causal": False})
    assert fits(other, q, k, add, {"is_causal": True})
    assert not fits(causal, q, k, None, {}) and not fits(causal, q[:, :, :1], k[:, :, :1],
                                                         add[..., :1, :1], {})
    assert not fits(causal, q[:, :, 1:], k, add[..., 1:, :], {})  # queries are not the keys
    padded = add.clone()
    padded[1, :, :, 0] = torch.finfo(torch.float32).min  # batch row 1: a padded key
    assert not fits(causal, q, k, padded, {})
    half = torch.zeros(2, 1, T, T).masked_fill(~tri, torch.finfo(torch.float16).min)
    assert not fits(causal, q, k, half, {})  # -65504: not surely closed, the mask goes
    window = add.masked_fill(torch.ones(T, T, dtype=torch.bool).tril(-3), -1e38)
    assert not fits(causal, q, k, window, {})
    assert not fits(causal, q, k, add, {"position_bias": torch.zeros(1)})
    live = add.clone()
    assert fits(causal, q, k, live, {})
    live[0, 0, 0, 1] = 0.0  # changed in place after the check: checked again
    assert not fits(causal, q, k, live, {})
