"""dlb.explain_generation: one traced forward, one reverse pass per generated token."""

import pytest
import torch
import transformers
from helpers import assert_conserved

import dlbhooks as dlb

V = 64
ROW_ATOL = 1e-12  # a row against a fresh explanation (measured 1.8e-15, entries up to 13)


def build(name: str):
    torch.manual_seed(0)
    t = transformers
    if name == "llama":
        cfg = t.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, pad_token_id=0, eos_token_id=None,
                            attention_bias=True)
        model = t.LlamaForCausalLM(cfg)
    else:
        cfg = t.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                           pad_token_id=0, eos_token_id=None)
        model = t.GPT2LMHeadModel(cfg)
    model = model.double().eval()
    with torch.no_grad():  # non-trivial biases and norm weights: something to absorb
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n.lower() or ".ln_" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def case(request):
    model = build(request.param)
    prompt = torch.randint(3, V, (1, 5), generator=torch.Generator().manual_seed(1))
    gen = dlb.explain_generation(model, prompt, max_new_tokens=4, keep=True)
    return request.param, model, prompt, gen


def test_generated_ids_are_generate_s(case):
    _, model, prompt, gen = case
    ref = model.generate(prompt, do_sample=False, max_new_tokens=4)
    assert torch.equal(gen.ids, ref[0])
    assert torch.equal(gen.generated, ref[0, 5:])
    assert gen.n == 4 and gen.prompt_length == 5


def test_matrix_shape_causality_and_conservation(case):
    _, _, _, gen = case
    T, n = gen.prompt_length, gen.n
    assert gen.matrix.shape == (n, T + n - 1)
    assert gen.matrix.dtype == torch.float64
    for k in range(n):
        assert torch.count_nonzero(gen.matrix[k, T + k:]) == 0, "causality: exact zeros"
        assert torch.count_nonzero(gen.row(k)) == T + k  # every earlier token matters
        total = float(gen.matrix[k].sum()) + float(gen.absorbed[k])
        assert total == pytest.approx(100.0, rel=1e-12)
    assert gen.absorbed.abs().max() > 1e-6, "biases absorb something (test is not vacuous)"
    assert len(gen.explanations) == n
    for exp in gen.explanations:
        assert_conserved(exp)


def test_rows_equal_independent_explanations(case):
    """Row k = a fresh explanation of the prefix that produced token k; row 0 = the prompt."""
    _, model, prompt, gen = case
    T = gen.prompt_length
    for k in range(gen.n):
        prefix = gen.ids[: T + k].unsqueeze(0)
        exp = dlb.explain(model, {"input_ids": prefix}, target=int(gen.generated[k]))
        assert exp.target == int(gen.generated[k])
        torch.testing.assert_close(gen.row(k), exp.inputs["input_ids"][0], rtol=0,
                                   atol=ROW_ATOL)
        assert float(gen.absorbed[k]) == pytest.approx(exp.total_absorbed, rel=1e-12, abs=1e-12)
    first = dlb.explain(model, {"input_ids": prompt}, target=int(gen.generated[0]), position=-1)
    torch.testing.assert_close(gen.matrix[0, :T], first.inputs["input_ids"][0], rtol=0,
                               atol=ROW_ATOL)


def test_one_forward_shared_by_all_targets():
    model = build("llama")
    calls = []
    handle = model.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        given = torch.tensor([7, 8, 9])
        gen = dlb.explain_generation(model, torch.tensor([3, 4, 5, 6]), generated_ids=given)
    finally:
        handle.remove()
    assert len(calls) == 1, "one traced forward, no generation"
    assert torch.equal(gen.generated, given) and gen.matrix.shape == (3, 6)
    assert gen.explanations is None


def test_contrastive(case):
    _, model, prompt, _ = case
    gen = dlb.explain_generation(model, prompt, max_new_tokens=3, mode="contrastive", keep=True)
    T = gen.prompt_length
    assert gen.positive is not None and gen.negative is not None
    torch.testing.assert_close(gen.matrix, gen.positive - gen.negative, rtol=0, atol=1e-12)
    for k, exp in enumerate(gen.explanations):
        assert_conserved(exp)
        assert torch.count_nonzero(gen.positive[k, T + k:]) == 0
        assert torch.count_nonzero(gen.negative[k, T + k:]) == 0
        assert float(gen.negative[k].sum()) > 0
        pos_ab, neg_ab = exp.ledger[0].absorbed_inside
        assert float(gen.positive[k].sum()) + pos_ab == pytest.approx(100.0, rel=1e-12)
        assert float(gen.negative[k].sum()) + neg_ab == pytest.approx(100.0, rel=1e-12)
    assert torch.equal(gen.generated, dlb.explain_generation(model, prompt,
                                                             max_new_tokens=3).generated)


def test_left_padding_mask():
    model = build("gpt2")
    prompt = torch.tensor([[0, 0, 11, 12, 13]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    ref = model.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=3)
    for mode in ("default", "contrastive"):
        gen = dlb.explain_generation(model, prompt, attention_mask=mask, max_new_tokens=3,
                                     mode=mode)
        assert torch.equal(gen.ids, ref[0])
        streams = [gen.matrix] + ([gen.positive, gen.negative] if mode == "contrastive" else [])
        for m in streams:
            assert torch.count_nonzero(m[:, :2]) == 0, "padding gets exactly 0"
        assert bool((gen.matrix[:, 2:5] != 0).all())


class CharTokenizer:
    """A tiny stand-in tokenizer: one token per lowercase letter."""

    pad_token_id = 0
    eos_token_id = None

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([[3 + (ord(c) - 97) % (V - 3) for c in text]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def decode(self, ids):
        return "".join(chr(97 + (i - 3) % 26) if i >= 3 else "<pad>" for i in ids)


def test_tokenizer_text_and_save(tmp_path):
    model = build("llama")
    tok = CharTokenizer()
    gen = dlb.explain_generation(model, tok, "hello", max_new_tokens=3)
    assert gen.tokens[:5] == list("hello") and len(gen.tokens) == 8
    text = str(gen)
    assert "mode=default" in text and text.count("\n") == 1 + gen.n
    assert "@" in gen.to_text(top=2, full=False)
    d = gen.to_dict()
    assert d["tokens"] == gen.tokens and len(d["matrix"]) == 3
    gen.save(tmp_path / "g.safetensors")
    back = dlb.GenerationExplanation.load(tmp_path / "g.safetensors")
    assert torch.equal(back.matrix, gen.matrix) and back.tokens == gen.tokens
    assert torch.equal(back.ids, gen.ids) and back.prompt_length == 5
    # the other loader names the right one
    with pytest.raises(dlb.SavedFileError, match="GenerationExplanation.load"):
        dlb.Explanation.load(tmp_path / "g.safetensors")
    exp = dlb.explain(model, gen.ids[:5].unsqueeze(0))
    exp.save(tmp_path / "e.safetensors")  # (modules share input tensors: written once)
    loaded = dlb.Explanation.load(tmp_path / "e.safetensors")
    for path in exp.layers:
        assert torch.equal(loaded.at(path), exp.at(path)), path
    with pytest.raises(dlb.SavedFileError, match=r"dlb\.Explanation\.load"):
        dlb.GenerationExplanation.load(tmp_path / "e.safetensors")


def test_clear_errors():
    model = build("llama")
    with pytest.raises(ValueError, match="batch 1"):
        dlb.explain_generation(model, torch.randint(3, V, (2, 4)))
    with pytest.raises(TypeError, match="prompt="):
        dlb.explain_generation(model, CharTokenizer())
    with pytest.raises(TypeError, match="generated_ids"):
        dlb.explain_generation(model, torch.tensor([[3, 4]]), generated_ids=torch.tensor([5]),
                               eos_token_id=2)
    with pytest.raises(dlb.TargetError):
        dlb.explain_generation(model, torch.tensor([[3, 4]]), generated_ids=torch.tensor([V]))


@pytest.mark.parametrize("options", [
    {"do_sample": True, "top_k": 8, "top_p": 0.9, "temperature": 0.8},
    {"num_beams": 3},
])
def test_sampling_and_beam_search_options_reach_generate(options):
    model = build("llama")
    # (prompts for which sampling, and beam search, choose other tokens than greedy)
    seed = 5 if "num_beams" in options else 2
    prompt = torch.randint(3, V, (1, 4), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(7)
    gen = dlb.explain_generation(model, prompt, max_new_tokens=5, keep=True, **options)
    torch.manual_seed(7)
    ref = model.generate(prompt, max_new_tokens=5, **{"do_sample": False, **options})
    greedy = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(gen.ids, ref[0])  # the explained tokens are the ones generate chose
    assert not torch.equal(gen.ids, greedy[0])
    T = gen.prompt_length
    # the first step where generate did not take the most likely token: its prefix is
    # greedy's, so the token differs from the argmax of the logits there
    first = next(k for k in range(gen.n) if gen.ids[T + k] != greedy[0, T + k])
    for k in range(gen.n):  # each row explains the logit of the token that was chosen
        token = int(gen.generated[k])
        exp = gen.explanations[k]
        assert exp.target == token
        prefix = gen.ids[: T + k].unsqueeze(0)
        alone = dlb.explain(model, {"input_ids": prefix}, target=token)
        torch.testing.assert_close(gen.row(k), alone.inputs["input_ids"][0], rtol=0,
                                   atol=ROW_ATOL)
        total = float(gen.matrix[k].sum()) + float(gen.absorbed[k])
        assert total == pytest.approx(100.0, rel=1e-12)
        if k == first:
            with torch.no_grad():
                argmax = int(model(prefix).logits[0, -1].argmax())
            assert argmax != token
            other = dlb.explain(model, {"input_ids": prefix}, target=argmax)
            assert (gen.row(k) - other.inputs["input_ids"][0]).abs().max() > 1.0
