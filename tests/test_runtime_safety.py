"""The runtime never returns a wrong value: parents that deviate at run time, stateful blocks, pickling."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import revify


class Block(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)

    def forward(self, x, scale=None):
        y = self.drop(self.fc(x))
        return x + (y if scale is None else y * scale)


class Stack(nn.Module):
    mode = "plain"

    def __init__(self, n=4, block=Block):
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(n))

    def forward(self, x, scales=None):
        x = x * 1.0
        for i, b in enumerate(self.blocks):
            x = b(x, None if scales is None else scales[i])
            if self.mode == "inplace":
                x.mul_(0.5)  # same object, new value: the head's output is stale
        return x


def _assert_same(model, rmodel, *args):
    results = []
    for m in (model, rmodel):
        torch.manual_seed(0)
        x = args[0].clone().requires_grad_(True)
        out = m(x, *args[1:])
        out.pow(2).sum().backward()
        grads = [p.grad.clone() for p in m.parameters()]
        for p in m.parameters():
            p.grad = None
        results.append((out.detach(), x.grad, grads))
    (oa, xa, ga), (ob, xb, gb) = results
    assert torch.equal(oa, ob) and torch.equal(xa, xb)
    assert all(torch.equal(a, b) for a, b in zip(ga, gb))


def _converted(model, x):
    # a fixed schedule: these tests are about the checkpoint runtime, which the
    # budget planner may leave out on a model this small
    rmodel = revify.revify(model, (x,), schedule="sqrt(n)")
    assert rmodel.revify_plan.converted, rmodel.revify_plan.summary()
    return rmodel


def test_parent_mutating_hidden_in_place_at_run_time():
    model, x = Stack(), torch.randn(4, 8)
    rmodel = _converted(model, x)
    model.mode = rmodel.mode = "inplace"
    _assert_same(model, rmodel, x)


def test_parent_mutating_hidden_in_place_at_conversion_is_not_chained():
    model, x = Stack(), torch.randn(4, 8)
    model.mode = "inplace"
    assert not revify.revify(model, (x,)).revify_plan.converted


def test_per_layer_side_arguments_at_run_time():
    model, x = Stack(), torch.randn(4, 8)
    rmodel = _converted(model, x)  # recorded with the same (None) side argument everywhere
    _assert_same(model, rmodel, x, torch.tensor([1.0, 0.0, 2.0, 3.0]))


class SpectralBlock(Block):
    def __init__(self, dim=8):
        super().__init__(dim)
        self.fc = torch.nn.utils.spectral_norm(nn.Linear(dim, dim))  # reads the buffers it updates


class ParametrizedBlock(Block):
    def __init__(self, dim=8):
        super().__init__(dim)
        self.fc = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(dim, dim))


@pytest.mark.parametrize("block", [SpectralBlock, ParametrizedBlock])
def test_blocks_that_read_the_buffers_they_update(block):
    torch.manual_seed(0)
    model, x = Stack(block=block), torch.randn(4, 8)
    twin = copy.deepcopy(model)
    rmodel = _converted(twin, x)
    assert any("updates buffers" in n for c in rmodel.revify_plan.chains for b in c.chain.blocks
               for n in b.legality.notes)
    _assert_same(model, rmodel, x)
    for (na, a), (nb, b) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(a, b), na


def test_pickled_module_round_trips():
    model, x = Stack(), torch.randn(4, 8)
    rmodel = _converted(model, x)
    buf = io.BytesIO()
    torch.save(rmodel, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # our own object, in memory
    _assert_same(model, loaded, x)


def test_converting_a_converted_module_reports_instead_of_raising():
    model, x = Stack(), torch.randn(4, 8)
    again = revify.revify(_converted(model, x), (x,), schedule="sqrt(n)")
    assert not again.revify_plan.converted
    assert "already converted" in again.revify_plan.summary()
    with pytest.raises(revify.RevifyError, match="already converted"):
        revify.revify(_converted(model, x), (x,), schedule="sqrt(n)", strict=True)
