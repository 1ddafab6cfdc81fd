"""The helpers composite rules share (dlbhooks/rules/composite.py), the child lookups of
Record and the two ways Engine.seed_outputs seeds a bag."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dlbhooks as dlb
from dlbhooks.engine import Engine
from dlbhooks.rules.composite import (
    LINEAR,
    MATMUL,
    add_split,
    first_stream,
    per_stream,
    require_child,
    stack,
    streams_of,
)
from dlbhooks.rules.elementwise import add_rule, product_rule

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_streams_of_and_stack_are_inverse():
    r = torch.randn(3, dtype=D, generator=_gen(0))
    one = r.unsqueeze(0)  # default mode: [1, 3]
    two = torch.stack((r.abs(), r.abs() * 2))  # contrastive: [2, 3]
    assert [t.shape for t in streams_of(one)] == [(3,)] and torch.equal(streams_of(one)[0], r)
    assert torch.equal(stack(streams_of(two)), two) and torch.equal(stack(streams_of(one)), one)
    assert stack([r]).data_ptr() == r.data_ptr()  # one stream: a view, no copy
    assert torch.equal(first_stream(two), r.abs())


def test_per_stream_stacks_nested_results_and_none():
    g = _gen(1)
    a, b = torch.randn(2, 3, dtype=D, generator=g), torch.randn(3, dtype=D, generator=g)
    R = torch.rand(2, 2, 3, dtype=D, generator=g)  # two streams of [2, 3]
    parts, lost = per_stream(lambda r: add_rule(r, [a, b]), R)
    for k in range(2):
        want, want_lost = add_rule(R[k], [a, b])
        assert all(torch.equal(p[k], w) for p, w in zip(parts, want))
        assert torch.equal(lost[k], want_lost)
    assert isinstance(parts, list) and lost.shape == (2,)
    halves = per_stream(lambda r: product_rule(r, [a, a]), R)
    assert [torch.equal(h[0], R[0] / 2) for h in halves] == [True, True]
    assert per_stream(lambda r: (None, r), R)[0] is None
    one = torch.rand(1, 2, 3, dtype=D, generator=g)  # default mode: one stream
    assert torch.equal(per_stream(lambda r: r * 3, one), one * 3)


def test_add_split_is_the_add_rule_per_stream():
    g = _gen(2)
    terms = [torch.randn(4, dtype=D, generator=g), torch.zeros(4, dtype=D)]
    terms[0][1] = 0.0  # a position where every term is 0: lost
    R = torch.rand(4, dtype=D, generator=g)
    (r0, r1), lost = add_split(R.unsqueeze(0), terms)
    assert torch.equal(lost, R[1:2])
    assert torch.allclose(r0[0] + r1[0], torch.where(torch.arange(4) == 1, 0.0, R))
    (s0, _), lost_s = add_split(torch.stack((R, 2 * R)), terms)
    assert torch.equal(s0[0], r0[0]) and torch.equal(lost_s[1], 2 * R[1])


@pytest.mark.parametrize("maps, stored", [(LINEAR, "out_in"), (MATMUL, "in_out")])
def test_linear_maps_and_their_adjoints(maps, stored):
    g = _gen(3)
    fwd, adj = maps
    W = torch.randn(5, 4, dtype=D, generator=g)
    W = W if stored == "out_in" else W.T.contiguous()
    x, s = torch.randn(2, 4, dtype=D, generator=g), torch.randn(2, 5, dtype=D, generator=g)
    assert fwd(x, W).shape == (2, 5)
    # <fwd(x), s> = <x, adj(s)>
    assert torch.allclose((fwd(x, W) * s).sum(), (x * adj(s, W)).sum())


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.inner = nn.Sequential(nn.ReLU(), nn.Linear(3, 3))

    def forward(self, x):
        return self.inner(self.a(self.a(x)))


def _root():
    model = nn.Sequential(Block()).to(D)
    with dlb.trace(model) as tape:
        model(torch.randn(2, 3, dtype=D, generator=_gen(4)))
    return tape.last_root()


def test_record_child_lookups():
    root = _root()
    blk = root.child("0")
    assert blk.path_of("inner.1") == "0.inner.1" and root.path_of("0") == "0"
    assert blk.child("a").call == 0 and blk.child("a", 1).call == 1
    assert blk.child("a", 2) is None
    nested = blk.child("inner.1")
    assert nested.path == "0.inner.1"
    assert blk.child("inner.1", lift=True) is blk.child("inner")  # the direct child holding it
    assert blk.child("a", 1, lift=True) is blk.child("a", 1)
    assert blk.child("inner.1", direct=True) is None  # not among the block's own children
    assert blk.child("a", 1, direct=True) is blk.children[1]
    assert root.child("0.inner.1") is nested


def test_require_child_raises_with_what_the_rule_expects():
    blk = _root().child("0")
    assert require_child(blk, "inner.1", lift=True) is blk.child("inner")
    with pytest.raises(dlb.UnsupportedModuleError, match="no recorded call of its child 'b'.*"
                                                        "torchvision's"):
        require_child(blk, "b", expected="torchvision's")


def test_record_values_raise_once_modified_in_place():
    model = nn.Sequential(nn.Linear(3, 3), nn.Identity()).to(D)
    with dlb.trace(model) as tape:
        y = model(torch.randn(2, 3, dtype=D, generator=_gen(5)))
    lin = tape.last_root().child("0")
    assert lin.output_value(0) is y and lin.output_intact(0)
    y.add_(1.0)
    assert not lin.output_intact(0)
    with pytest.raises(dlb.RecordModifiedError, match="output 0 of '0'.*no snapshot"):
        lin.output_value(0)
    with pytest.raises(dlb.RecordModifiedError, match="input 0 of '1'.*snapshots it"):
        tape.last_root().child("1").input_value(0)


def test_seed_outputs_owner_keeps_input_views_unmoved():
    """``keep_inputs=True`` (the bag is the record's own): relevance on an input that is a
    view of an outer tensor stays on the view; ``False``: it moves onto the outer tensor."""

    class Inner(nn.Module):
        def forward(self, x):
            return x * 1.0

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.inner = nn.Identity(), Inner()

        def forward(self, x):
            return self.inner(self.pre(x)[:, :2])

    model = Outer()
    with dlb.trace(model) as tape:
        model(torch.randn(2, 3, dtype=D, generator=_gen(6)))
    inner = tape.last_root().child("inner")
    view, base = inner.inputs[0], inner.input_views[0]
    R = torch.ones(1, 2, 2, dtype=D)  # one stream
    for keep, held in ((True, view), (False, base)):
        bag = Engine(tape).seed_outputs(inner, [None], keep_inputs=keep)
        bag.add(view, R, None, base=base)
        assert bag.peek(held) is not None
        assert bag.peek(base if keep else view) is None
