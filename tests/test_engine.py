"""Tracing and the reverse engine: routing, reversibility, determinism, errors, results."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_conserved
from safetensors import safe_open
from torch import nn

import dlbhooks as dlb

torch.manual_seed(0)


def mlp(inplace=False):
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


X = torch.randn(4, 6, dtype=torch.float64)


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_and_outputs_bit_identical():
    model = mlp()
    before = model(X)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with dlb.trace(model) as tape:
        assert hook_count(model) > 0
        assert not torch.is_grad_enabled()
        traced = model(X)
    assert hook_count(model) == 0
    assert torch.is_grad_enabled()
    assert torch.equal(before, traced) and torch.equal(before, model(X))
    tape.explain()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(before, model(X))


def test_exception_inside_block_restores_everything():
    model = mlp()
    with pytest.raises(RuntimeError):
        with dlb.trace(model):
            model(torch.randn(2, 5, dtype=torch.float64))  # wrong width
    assert hook_count(model) == 0 and torch.is_grad_enabled()


def test_nested_and_repeated_tracing():
    model = mlp()
    with dlb.trace(model) as outer:
        with dlb.trace(model) as inner:
            model(X)
        assert hook_count(model) > 0
    assert hook_count(model) == 0
    a, b = outer.explain(), inner.explain()
    assert torch.equal(a.inputs["input"], b.inputs["input"])
    with dlb.trace(model) as again:
        model(X)
    assert torch.equal(again.explain().inputs["input"], a.inputs["input"])


def test_deterministic():
    model = mlp()
    a = dlb.explain(model, X, mode="contrastive")
    b = dlb.explain(model, X, mode="contrastive")
    assert torch.equal(a.inputs["input"], b.inputs["input"])
    assert torch.equal(a.positive["input"], b.positive["input"])


def test_inplace_relu_same_as_out_of_place():
    m1, m2 = mlp(False), mlp(True)
    m2.load_state_dict(m1.state_dict())
    for mode in ("default", "contrastive"):
        a, b = dlb.explain(m1, X, mode=mode), dlb.explain(m2, X, mode=mode)
        assert torch.allclose(a.inputs["input"], b.inputs["input"], rtol=0, atol=1e-12)
        assert_conserved(b)


def test_batch_rows_are_independent_and_each_gets_multiplier():
    model = mlp()
    full = dlb.explain(model, X, saturation=False)
    for i in range(X.shape[0]):
        row = dlb.explain(model, X[i:i + 1], saturation=False)
        assert torch.allclose(full.inputs["input"][i], row.inputs["input"][0], rtol=0,
                              atol=1e-12)  # (measured 3.6e-15 of entries up to 23)
    seeded = full.ledger[0].relevance_out
    assert seeded == pytest.approx(100.0 * X.shape[0], rel=1e-12)


class Branchy(nn.Module):
    """A tensor consumed by two modules, a reused module, views and a Bilinear join."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.left = nn.Linear(8, 4)
        self.right = nn.Linear(8, 4)
        self.shared = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.join = nn.Bilinear(4, 4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = self.act(self.stem(x))
        a = self.shared(self.act(self.left(h)))
        b = self.shared(self.right(h))  # second call of `shared`
        j = self.join(a, b).view(-1, 5, 1).transpose(1, 2)  # views of the join's output
        return self.head(j[:, 0])


def test_dag_reuse_and_views_conserve():
    model = Branchy().double()
    for mode in ("default", "contrastive"):
        exp = dlb.explain(model, X, mode=mode)
        assert_conserved(exp)
        assert "shared" in exp.layers and "shared#1" in exp.layers
    assert exp.at("stem").shape == (4, 6)


def test_view_of_recorded_tensor_is_routed_exactly():
    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 3, 3)
            self.fc = nn.Linear(12, 2)
            self.fc2 = nn.Linear(3, 2)

        def forward(self, x):
            h = self.conv(x)  # [B, 3, 4]
            return self.fc(torch.flatten(h, 1)) + 0 * self.fc2(h.transpose(1, 2))[:, -1]

    class Flat(nn.Module):
        def __init__(self, src):
            super().__init__()
            self.conv, self.flat, self.fc = src.conv, nn.Flatten(), src.fc

        def forward(self, x):
            return self.fc(self.flat(self.conv(x)))

    model = Views().double()
    x = torch.randn(2, 2, 6, dtype=torch.float64)
    with dlb.trace(model) as tape:
        model(x)
    # explain the recorded `fc` call through the view only
    exp = dlb.explain(Flat(model), x)
    assert_conserved(exp)
    # the final `+` and `0 * ...` are recorded functions (METHOD §7): the zero term gets no
    # share of the add rule, so the whole model's explanation is the view-only one
    whole = tape.explain()
    assert_conserved(whole)
    assert torch.allclose(whole.inputs["x"], exp.inputs["x"], rtol=0, atol=1e-12)
    assert [r.key for r in tape.last_root().children if r.path.startswith("mul")] == ["mul"]

    class Transposed(nn.Module):
        def __init__(self, src):
            super().__init__()
            self.conv, self.fc2 = src.conv, src.fc2

        def forward(self, x):
            return self.fc2(self.conv(x).transpose(1, 2))[:, -1]

    exp = dlb.explain(Transposed(model), x)
    assert_conserved(exp)
    # only the last position's features carry relevance back through the transpose
    r = exp.tensors["fc2"][0]
    assert r.shape == (2, 4, 3) and float(r[:, :-1].abs().sum()) == 0.0


def test_functional_gap_names_both_sides():
    class Gappy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):  # through numpy: no torch function records the product
            return self.b(torch.from_numpy(F.relu(self.a(x)).numpy() * 2))

    with pytest.raises(dlb.FunctionalGapError) as err:
        dlb.explain(Gappy().double(), X)
    msg = str(err.value)
    assert "'b'" in msg and "'relu'" in msg and "Gappy" in msg and "register_rule" in msg


def test_a_function_without_a_rule_names_itself_and_its_source_line():
    class Cumulative(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), -1))  # the line the error names

    line = Cumulative.forward.__code__.co_firstlineno + 1
    with pytest.raises(dlb.FunctionalGapError) as err:
        dlb.explain(Cumulative().double(), X)
    msg = str(err.value)
    assert "cumsum" in msg and "Cumulative" in msg and f"test_engine.py:{line}" in msg
    assert "register_function_rule(torch.cumsum)" in msg


def test_unsupported_module_then_register_rule():
    class Twice(nn.Module):
        def forward(self, x):  # through numpy: no torch function is recorded
            return torch.from_numpy(x.numpy() * 2)

    model = nn.Sequential(nn.Linear(6, 4), Twice(), nn.Linear(4, 2)).double()
    assert dlb.coverage(model).missing == ["1"]
    with pytest.raises(dlb.UnsupportedModuleError) as err:
        dlb.explain(model, X)
    assert "'1'" in str(err.value) and "Twice" in str(err.value)

    @dlb.register_rule(Twice)
    def twice_rule(rec, R_out, ctx) -> dlb.RuleResult:
        return dlb.RuleResult([R_out[0]])

    try:
        assert dlb.coverage(model).complete
        for mode in ("default", "contrastive"):
            assert_conserved(dlb.explain(model, X, mode=mode))
    finally:
        dlb.unregister_rule(Twice)


def test_conservation_error_is_rounding_only_and_catches_a_leaking_rule():
    class Twice(nn.Module):
        def forward(self, x):
            return 2 * x

    # no bias after Twice: all the seeded relevance reaches it
    model = nn.Sequential(nn.Linear(6, 4), Twice(), nn.Linear(4, 2, bias=False)).double()

    @dlb.register_rule(Twice)
    def leaking(rec, R_out, ctx) -> dlb.RuleResult:
        # a quarter of the relevance vanishes, unaccounted for
        return dlb.RuleResult([R_out[0] * 0.75])

    try:
        exp = dlb.explain(model, X)
        assert exp.conservation_error() == pytest.approx(0.25, rel=1e-12)
    finally:
        dlb.unregister_rule(Twice)
    for mode in ("default", "contrastive"):
        assert dlb.explain(mlp(), X, mode=mode).conservation_error() < 1e-12


def test_bad_targets_and_inputs():
    model = mlp()
    with pytest.raises(dlb.TargetError):
        dlb.explain(model, X, target=7)
    with pytest.raises(dlb.TargetError):
        dlb.explain(model, X, target=[0, 1])
    with pytest.raises(dlb.TargetError):
        dlb.explain(model, X, mode="sideways")
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(dlb.NonFiniteError):
        dlb.explain(model, bad)
    bad[0, 0] = float("inf")
    with pytest.raises(dlb.NonFiniteError):
        dlb.explain(model, bad)
    with dlb.trace(model) as tape:
        pass
    with pytest.raises(dlb.TraceError):
        tape.explain()


def test_targets_per_row_and_seed_tensor():
    model = mlp()
    out = model(X)
    exp = dlb.explain(model, X, target=[0, 1, 2, 0])
    assert exp.target == [0, 1, 2, 0]
    seed = torch.zeros_like(out)
    seed[torch.arange(4), torch.tensor([0, 1, 2, 0])] = 100.0
    same = dlb.explain(model, X, target=seed)
    assert torch.allclose(exp.inputs["input"], same.inputs["input"], rtol=0, atol=1e-12)


def test_contrastive_streams_and_keyword_inputs():
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 3)
            self.b = nn.Linear(6, 3)

        def forward(self, x, *, z):
            self.a(x)  # recorded, but its output is not used
            return self.b(z)

    model = Kw().double()
    exp = dlb.explain(model, {"x": X, "z": X * 2}, mode="contrastive")
    assert set(exp.inputs) == {"x", "z"}
    assert torch.equal(exp.inputs["z"], exp.positive["z"] - exp.negative["z"])
    assert float(exp.positive["z"].sum()) == pytest.approx(400.0, rel=1e-12)
    assert float(exp.inputs["x"].abs().sum()) == 0.0


def test_save_load_roundtrip(tmp_path):
    model = mlp()
    exp = dlb.explain(model, X, mode="contrastive")
    path = tmp_path / "e.safetensors"
    exp.save(path)
    back = dlb.Explanation.load(path)
    assert torch.equal(back.inputs["input"], exp.inputs["input"])
    assert torch.equal(back.negative["input"], exp.negative["input"])
    assert back.layers == exp.layers and back.mode == "contrastive"
    assert torch.equal(back.at("2"), exp.at("2"))
    assert [e.key for e in back.ledger] == [e.key for e in exp.ledger]


def test_saved_files_write_shared_memory_once_and_read_it_back(tmp_path):
    from dlbhooks.results import read_saved, write_saved

    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"a": base, "same": base, "tail": base[1:], "t": base.t(), "empty": base[:0],
               "own": torch.ones(2)}
    write_saved(tmp_path / "s.safetensors", "dlbhooks", {"x": 1}, tensors)
    meta, back = read_saved(tmp_path / "s.safetensors", "dlbhooks")
    assert meta == {"x": 1} and set(back) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k
    assert back["same"] is back["a"]  # an alias, not a second copy
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        assert "same" not in f.keys()


def test_load_rejects_other_files_clearly(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(dlb.SavedFileError, match="no dlbhooks metadata"):
        dlb.Explanation.load(tmp_path / "weights.safetensors")
    (tmp_path / "notes.txt").write_text("not a tensor file")
    with pytest.raises(dlb.SavedFileError, match="not a saved dlbhooks explanation"):
        dlb.Explanation.load(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        dlb.Explanation.load(tmp_path / "missing.safetensors")


def test_layers_are_ordered_output_to_input_and_at_has_neuron_shape():
    model = mlp()
    exp = dlb.explain(model, X)
    assert list(exp.layers) == ["4", "3", "2", "1", "0"]
    assert exp.at("2").shape == (4, 8)
    scaled = dlb.explain(model, X, scaler=1.0).at("2")
    assert float(scaled.sum()) == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(KeyError):
        exp.at("nope")


def test_abs_weight_cache_follows_weight_updates_and_budget():
    from dlbhooks.records import ABS_WEIGHTS, fetch_abs_param, set_weight_cache
    from dlbhooks.weights import DEFAULT_WEIGHT_CACHE

    set_weight_cache(0)  # start empty: earlier tests' models may still hold the budget
    set_weight_cache(DEFAULT_WEIGHT_CACHE)
    lin = torch.nn.Linear(3, 2)
    first = fetch_abs_param(lin, "weight")
    assert fetch_abs_param(lin, "weight") is first  # cached
    x = torch.randn(4, 3)
    before = dlb.explain(lin, x, target=0).inputs["input"]
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # in place: the version changes
    again = fetch_abs_param(lin, "weight")
    assert again is not first and torch.equal(again, lin.weight.detach().abs())
    after = dlb.explain(lin, x, target=0).inputs["input"]
    set_weight_cache(0)
    try:
        assert ABS_WEIGHTS.used == 0
        fresh = dlb.explain(lin, x, target=0).inputs["input"]
        assert torch.equal(fresh, after) and not torch.equal(before, after)
        assert fetch_abs_param(lin, "weight") is not fetch_abs_param(lin, "weight")
        big = torch.nn.Linear(64, 64)
        set_weight_cache(DEFAULT_WEIGHT_CACHE)
        fetch_abs_param(lin, "weight")
        fetch_abs_param(big, "weight")
        assert ABS_WEIGHTS.used == (6 + 64 * 64) * 4
        set_weight_cache(100)  # smaller than the cache holds: the last kept goes first
        assert ABS_WEIGHTS.used == 6 * 4
    finally:
        set_weight_cache(DEFAULT_WEIGHT_CACHE)


def test_transient_abs_weights_share_one_scratch_block_and_explain_alike():
    """A |W| the cache does not keep goes, for the rules that ask for a transient one, to
    one scratch block per reverse pass (new memory per layer costs more than the pass):
    every layer reads it, the results equal the cached ones bitwise, and a plain
    (non-transient) |W| stays a tensor of its own."""
    from dlbhooks import scratch
    from dlbhooks.records import fetch_abs_param, set_weight_cache
    from dlbhooks.weights import DEFAULT_WEIGHT_CACHE

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    set_weight_cache(0)
    set_weight_cache(DEFAULT_WEIGHT_CACHE)
    try:
        cached = dlb.explain(model, x, target=1, keep=True)
        set_weight_cache(0)
        with scratch.session():
            a = fetch_abs_param(model[2], "weight", transient=True)  # 8 x 8
            b = fetch_abs_param(model[0], "weight", transient=True)  # 8 x 6: fits the block
            plain = fetch_abs_param(model[0], "weight")
            assert a.data_ptr() == b.data_ptr()  # one block, reused
            assert torch.equal(b, model[0].weight.detach().abs())
            assert plain.data_ptr() != b.data_ptr() and torch.equal(plain, b)
        transient = dlb.explain(model, x, target=1, keep=True)
    finally:
        set_weight_cache(DEFAULT_WEIGHT_CACHE)
    assert torch.equal(transient.inputs["input"], cached.inputs["input"])
    for name in cached.layers:
        assert torch.equal(transient.at(name), cached.at(name))


def test_bias_positivity_is_rechecked_after_an_in_place_change():
    """|b| > 0 everywhere lets the rule skip the T = 0 guard; a bias later set to 0 in
    place must bring the guard back (the relevance of the dead unit is absorbed)."""
    from dlbhooks.records import all_positive

    lin = torch.nn.Linear(3, 2)
    x = torch.zeros(1, 3)  # every unit's contributions vanish: T = |b|
    with torch.no_grad():
        lin.bias.copy_(torch.tensor([0.5, -0.25]))
    exp = dlb.explain(lin, x, target=torch.tensor([[1.0, 1.0]]))
    assert exp.absorbed["<root>"] == pytest.approx(2.0, rel=1e-12)  # both bias shares
    with torch.no_grad():
        lin.bias[1] = 0.0  # in place: unit 1 now has T = 0
    assert not all_positive(lin.bias.abs())
    exp = dlb.explain(lin, x, target=torch.tensor([[1.0, 1.0]]))
    assert exp.absorbed["<root>"] == pytest.approx(2.0, rel=1e-12)  # bias share + guard
    assert torch.equal(exp.inputs["input"], torch.zeros(1, 3))
    t = torch.ones(2)
    assert all_positive(t)
    t[0] = 0.0  # the remembered answer follows in-place changes
    assert not all_positive(t)


def test_finite_checks_do_not_trust_an_overflowing_sum():
    from dlbhooks.relevance import all_finite, has_nan

    big = torch.full((4,), 3e38)  # finite entries whose float32 sum overflows
    assert all_finite(big) and not has_nan(big)
    assert not all_finite(torch.tensor([1.0, float("inf")]))
    assert has_nan(torch.tensor([1.0, float("nan")]))
    assert not has_nan(torch.tensor([float("inf"), -float("inf")]))  # sum is NaN, no NaN


def test_nonnegative_input_only_for_an_unchanged_relu_output():
    """A weighted sum may skip |a| only when ``a`` is exactly what a ReLU (sigmoid, ...)
    returned: not after an in-place change, not for a LeakyReLU."""
    from dlbhooks.engine import Engine

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.relu, self.leaky = torch.nn.ReLU(), torch.nn.LeakyReLU(0.1)
            self.a, self.b, self.c = (torch.nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            h = self.relu(x)
            y = self.a(h)
            h.sub_(1.0)  # changed in place after the ReLU: may be negative now
            return self.b(h) + self.c(self.leaky(x)) + y

    net = Net()
    x = torch.randn(3, 4)
    with dlb.trace(net) as tape:
        net(x)
    engine = Engine(tape)
    recs = {r.path: r for r in tape.records}
    assert engine.nonnegative_input(recs["a"], 0)
    assert not engine.nonnegative_input(recs["b"], 0)
    assert not engine.nonnegative_input(recs["c"], 0)


def test_the_ledger_being_built_and_the_final_ledger_are_two_types():
    """``Engine.ledger`` holds :class:`PendingEntry` lines (tensor totals, log spans) in
    output->input order; ``finish()`` makes the final :class:`LedgerEntry` lines (floats)."""
    from dlbhooks.engine import Engine
    from dlbhooks.ledger import LedgerEntry, PendingEntry

    model = nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), nn.Linear(8, 3)).double()
    with dlb.trace(model) as tape:
        out = model(X)
    for mode in ("default", "contrastive"):
        engine = Engine(tape, mode=mode)
        seed = torch.ones_like(out)
        engine.propagate(tape.last_root(), [torch.stack((seed, seed / 2))
                                            if mode == "contrastive" else seed[None]])
        pending = engine.ledger
        assert all(type(e) is PendingEntry and e.log_end is not None for e in pending)
        assert [e.key for e in pending] == ["<root>", "1", "0", "0.1", "0.0"]
        assert all(e.relevance_out.shape == (1 + pairs_of(mode),) for e in pending)
        final = engine.finish()
        assert [e.key for e in final] == [e.key for e in pending]
        assert all(type(e) is LedgerEntry for e in final)
        pairs = mode == "contrastive"
        for e in final:
            for v in (e.relevance_out, e.relevance_in, e.absorbed, e.absorbed_inside):
                assert isinstance(v, tuple) and all(type(x) is float for x in v) if pairs \
                    else type(v) is float, (mode, e)
        streams = (0, 1) if pairs else (None,)
        at = {e.key: e for e in final}
        for s in streams:
            def get(v, s=s):
                return v if s is None else v[s]
            # what a call absorbed inside it: its own share plus its children's
            assert get(at["<root>"].absorbed_inside) == pytest.approx(
                sum(get(e.absorbed) for e in final), rel=1e-12)
            assert get(at["0"].absorbed_inside) == pytest.approx(
                get(at["0.0"].absorbed) + get(at["0.1"].absorbed), rel=1e-12)
            for e in final:  # each call conserves
                assert get(e.relevance_out) == pytest.approx(
                    get(e.relevance_in) + get(e.absorbed_inside), rel=1e-12, abs=1e-12)


def pairs_of(mode: str) -> int:
    return int(mode == "contrastive")


def test_finish_ledger_spans_pairs_and_unfinished_entries():
    from dlbhooks.ledger import PendingEntry, finish_ledger

    def t(*x):  # per-stream totals, [S]
        return torch.tensor(x, dtype=torch.float64)

    pending = [  # a container (log 0:2) around two calls that absorbed, then an unfinished one
        PendingEntry("c", "c", "C", 0, t(10.0), t(7.0), None, 2, False),
        PendingEntry("a", "c.a", "A", 0, t(10.0), t(8.0), t(2.0), 1, True),
        PendingEntry("b", "c.b", "B", 1, t(8.0), t(7.0), t(1.0), 2, True),
        PendingEntry("x", "c.x", "X", 2),
    ]
    final = finish_ledger(pending, 2, contrastive=False)
    assert [(e.key, e.relevance_out, e.relevance_in, e.absorbed, e.absorbed_inside, e.leaf)
            for e in final] == [("c", 10.0, 7.0, 0.0, 3.0, False),
                                ("a", 10.0, 8.0, 2.0, 2.0, True),
                                ("b", 8.0, 7.0, 1.0, 1.0, True)]
    pair = [PendingEntry("r", "", "R", 0, t(4.0, 1.0), None, t(0.5, 0.25), 1, True)]
    (e,) = finish_ledger(pair, 1, contrastive=True)
    assert (e.relevance_out, e.relevance_in, e.absorbed, e.absorbed_inside) == \
        ((4.0, 1.0), (0.0, 0.0), (0.5, 0.25), (0.5, 0.25))


def _live_shapes() -> list[tuple[int, ...]]:
    import gc

    return [tuple(o.shape) for o in gc.get_objects() if isinstance(o, torch.Tensor)]


@pytest.mark.parametrize("targets", [None, [3, 5, 7]])
def test_the_walk_frees_the_seed_and_combined_relevance_behind_it(monkeypatch, targets):
    """While the walk is at the embedding (the last record it reaches), neither the seed
    (as large as the logits: [k, batch, T, vocab]) nor the relevance of hidden states
    already passed on is alive: the caller's lists do not hold the seed, and the ledger
    remembers totals of tensors without keeping them (a tensor read by several records
    — the residual stream — gets relevance combined in the bag, a new tensor)."""
    import transformers

    from dlbhooks.engine import Engine

    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=24, intermediate_size=40,
                                   num_hidden_layers=6, num_attention_heads=4,
                                   num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 97, (2, 9))
    k = 1 if targets is None else len(targets)
    seen = {}
    original = Engine.propagate

    def watched(engine, rec, R_out, **kwargs):
        if rec.type_name == "Embedding":
            shapes = _live_shapes()
            seen["seed"] = shapes.count((k, 2, 9, 97))
            seen["hidden"] = shapes.count((k, 2, 9, 24))
        return original(engine, rec, R_out, **kwargs)

    with dlb.trace(model) as tape:
        model(input_ids=ids)
    monkeypatch.setattr(Engine, "propagate", watched)
    tape.explain(target=3, keep=False) if targets is None else tape.explain(
        targets=targets, keep=False)
    assert seen["seed"] == 0
    # the embedding's own relevance and the model's output relevance (held by the
    # model's record while its children are walked); before: two more per layer
    assert seen["hidden"] <= 3, seen


@pytest.mark.parametrize("case", ["heads", "slice", "strided", "overlap"])
def test_stacked_to_base_equals_view_to_base_entry_by_entry(case):
    """Several targets' relevance on a view goes to its base in one strided copy: equal,
    entry by entry, to view_to_base (the whole base, a part of it with zeros elsewhere,
    a permuted base); where the fast path does not apply, the slow one per entry."""
    from dlbhooks.views import stacked_to_base, view_to_base

    torch.manual_seed(0)
    base = torch.randn(2, 6, 8)
    view = {"heads": base.view(2, 6, 2, 4).transpose(1, 2),
            "slice": base[:, 1:4, ::2],
            "strided": base.transpose(0, 2)[2:5],
            "overlap": base[0, 0].expand(3, 8)}[case]
    R = torch.randn(3, *view.shape, dtype=torch.float64)
    got = stacked_to_base(R, view, base)
    want = [view_to_base(r, view, base) for r in R.unbind(0)]
    # ("overlap": rows of the view share elements, the fast path does not apply; the slow
    # one sums them)
    assert got is not None and got.shape == (3, *base.shape)
    for g, w in zip(got.unbind(0), want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("case", ["heads", "reshape", "offset"])
def test_relevance_already_laid_out_like_the_base_moves_without_a_copy(case, S):
    """Relevance a rule wrote in the view's own layout (RoPE's result on a head view of a
    projection, an attention output reshaped) is the base's relevance as it lies: the
    same memory, viewed as the base, equal to the copy; other layouts are copied."""
    from dlbhooks.views import stacked_to_base, view_to_base

    torch.manual_seed(0)
    base = torch.randn(2, 6, 8)
    view = {"heads": base.view(2, 6, 2, 4).transpose(1, 2),
            "reshape": base.view(2, 3, 2, 8),
            "offset": base.view(2, 6, 2, 4).transpose(1, 2)}[case]
    # a block shaped like the base per entry, viewed as the view: the layout a rule gets
    # from an element-wise op on the view (torch keeps a dense input's strides)
    block = torch.randn(S + (case == "offset"), *base.shape, dtype=torch.float64)
    R = block[(case == "offset"):].view(S, *base.shape).view(
        S, *view.shape) if case == "reshape" else block[(case == "offset"):].view(
        S, 2, 6, 2, 4).transpose(2, 3)
    assert R.stride()[1:] == view.stride()
    got = stacked_to_base(R, view, base)
    assert got.data_ptr() == R.data_ptr()  # no copy
    for g, r in zip(got.unbind(0), R.unbind(0)):
        assert torch.equal(g, view_to_base(r.contiguous(), view, base))
    other = R.contiguous() if case != "reshape" else R.transpose(1, 2).contiguous().transpose(1, 2)
    moved = stacked_to_base(other, view, base)
    assert moved.data_ptr() != other.data_ptr()
    assert torch.equal(moved, got)
