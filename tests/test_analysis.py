"""Residual detection, chain finding and legality reasons on hand-made modules."""
from __future__ import annotations

import io

import pytest
import torch
import torch.fx as fx
from torch import nn

import revify
from revify.passes.analysis.find_residual_blocks import find_residual_sublayers, residual_spine


def _spine(fn_module):
    gm = fx.symbolic_trace(fn_module)
    entry = next(n for n in gm.graph.nodes if n.op == "placeholder")
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return residual_spine(gm.graph, entry, out)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.f(x)


class Scaled(Plain):
    def forward(self, x):
        return x + 0.5 * self.f(x)


class PostNorm(Plain):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        return self.ln(self.f(x) + x)


class InPlace(Plain):
    def forward(self, x):
        y = torch.relu(x)
        return y.add_(self.f(y))  # fx records `y += t` as a plain add; add_ stays in-place


class TwoSublayers(Plain):
    def __init__(self):
        super().__init__()
        self.g = nn.Linear(8, 8)

    def forward(self, x):
        h = x + self.f(x)
        return h + self.g(h)


class Concat(Plain):
    def forward(self, x):
        return torch.cat([x, self.f(x)], dim=-1)


class NotResidual(Plain):
    def forward(self, x):
        return self.f(x) + 1.0


@pytest.mark.parametrize("module,expected", [
    (Plain(), "1 residual sub-layer(s): x + f(x)"),
    (Scaled(), "1 residual sub-layer(s): x + f(x)"),
    (PostNorm(), "1 residual sub-layer(s): ln(x + f(x))"),
    (TwoSublayers(), "2 residual sub-layer(s): x + f(x), x + f(x)"),
    (Concat(), "concatenation shortcut cat(x, f(x))"),
    (NotResidual(), "no residual connection"),
])
def test_residual_patterns(module, expected):
    assert _spine(module).describe() == expected


def test_inplace_residual_found():
    gm = fx.symbolic_trace(InPlace())
    entry = next(n for n in gm.graph.nodes if n.op == "placeholder")
    subs = find_residual_sublayers(gm.graph, entry)
    assert [(s.skip.name, s.inplace) for s in subs] == [("relu", True)]
    # relu comes before the skip, so the block as a whole is not x + f(x)
    assert not _spine(InPlace()).complete


class Stack(nn.Module):
    def __init__(self, block_cls, n=4, share=False):
        super().__init__()
        blocks = [block_cls() for _ in range(n)]
        if share:
            blocks = [blocks[0]] * n
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class MutatesInput(Plain):
    def forward(self, x):
        x.mul_(1.0)
        return x + self.f(x)


class DataDependent(Plain):
    def forward(self, x):
        if x.sum() > 0:
            return x + self.f(x)
        return x - self.f(x)


def _inspect(model, x):
    buf = io.StringIO()
    plan = revify.inspect(model, (x,), file=buf)
    return plan, buf.getvalue()


def test_chain_found_and_segmented():
    buf = io.StringIO()
    plan = revify.inspect(Stack(Plain, n=9), (torch.randn(2, 8),), file=buf, schedule="sqrt(n)", verbose=True)
    text = buf.getvalue()
    assert len(plan.chains) == 1
    assert [(s.start, s.end) for s in plan.chains[0].segments] == [(0, 3), (3, 6), (6, 9)]
    assert "9 × Plain" in text
    # the whole stack traces with fx: its graph shows the nine residual adds at node level
    (root,) = [r for r in plan.regions if r.path == ""]
    assert root.engine == "fx" and root.residual_adds == 9
    assert "9 residual sub-layer(s)" in text


def test_rejections_have_reasons():
    plan, text = _inspect(Stack(Concat, n=3), torch.randn(2, 8))
    assert not plan.chains  # shapes change, so no run of linked calls even forms
    plan, text = _inspect(Stack(MutatesInput), torch.randn(2, 8))
    assert not plan.chains and "mutates an input in place" in text
    # a shared module called 4 times is 4 blocks, each call its own checkpoint (test_zoo_defaults: ALBERT)
    plan, text = _inspect(Stack(Plain, share=True), torch.randn(2, 8))
    assert [s.end - s.start for s in plan.chains[0].segments] == [1, 1, 1, 1]
    assert "shared module called 4 times per forward: each call is a block" in text


def test_data_dependent_control_flow_is_noted_and_still_exact():
    model = Stack(DataDependent)
    x = torch.randn(2, 8)
    plan, text = _inspect(model, x)
    assert plan.chains and "data-dependent control flow" in text
    rmodel = revify.revify(model, (x,))
    torch.testing.assert_close(rmodel(x), model(x), rtol=0, atol=0)


def test_forward_that_raises_returns_model_unchanged():
    model = Stack(Plain)
    bad = torch.randn(2, 5)  # wrong feature size
    rmodel = revify.revify(model, (bad,))
    assert not rmodel.revify_plan.converted
    assert "forward raised" in rmodel.revify_plan.summary()
    x = torch.randn(2, 8)
    assert torch.equal(rmodel(x), model(x))
    with pytest.raises(revify.RevifyError, match="forward raised"):
        revify.revify(model, (bad,), strict=True)


def test_model_without_chains():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    rmodel = revify.revify(model, (torch.randn(2, 8),))
    assert not rmodel.revify_plan.converted
    assert "no convertible chain" in rmodel.revify_plan.summary()


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown strategy"):
        revify.revify(Stack(Plain), (torch.randn(2, 8),), strategy="magic")


def test_relay_falls_back_when_parent_changes_the_hidden_state():
    class Meddling(Stack):
        meddle = False

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
                if self.meddle:  # a new tensor between blocks, unseen at conversion
                    x = x * 1.0
            return x

    model = Meddling(Plain)
    rmodel = revify.revify(model, (torch.randn(2, 8),))
    assert len(rmodel.revify_plan.chains) == 1
    model.meddle = rmodel.meddle = True
    x = torch.randn(2, 8, requires_grad=True)
    out_a = model(x)
    (ga,) = torch.autograd.grad(out_a.sum(), x)
    out_b = rmodel(x)
    (gb,) = torch.autograd.grad(out_b.sum(), x)
    assert torch.equal(out_a, out_b) and torch.equal(ga, gb)


def test_blocks_called_with_a_different_signature_still_compute_exactly():
    class Switching(Stack):
        by_keyword = False

        def forward(self, x):
            for b in self.blocks:
                x = b(x=x) if self.by_keyword else b(x)
            return x

    model = Switching(Plain)
    rmodel = revify.revify(model, (torch.randn(2, 8),))
    assert len(rmodel.revify_plan.chains) == 1
    model.by_keyword = rmodel.by_keyword = True
    x = torch.randn(2, 8, requires_grad=True)
    (ga,) = torch.autograd.grad(model(x).sum(), x)
    (gb,) = torch.autograd.grad(rmodel(x).sum(), x)
    assert torch.equal(model(x), rmodel(x)) and torch.equal(ga, gb)
