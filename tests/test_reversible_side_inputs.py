"""Reversible chains whose blocks get different side inputs, on toy models (fast; Gemma 2 and 3, T5 in
test_reversible_reach).

Each MEFT coupling step is one block and runs with the side inputs that block is called with. A RevNet
step runs two blocks at the first one's call, with its side inputs, so a second block called with other
ones raises and says why. meft3 hands back what each kind of block hands back, from its own inputs.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import revify
from reversible_checks import assert_grads_close

pytestmark = pytest.mark.usefixtures("one_thread")


class _Block(nn.Module):
    """Two residual sub-layers; the first scaled by a per-call ``mask``, plus an optional ``extra``. Returns
    ``(h, mask)``: it hands its mask back, as T5 hands back its position bias."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.ln1, self.l1, self.ln2, self.l2 = nn.LayerNorm(d), nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, h, extra=None, mask=None):
        a = self.drop(self.l1(self.ln1(h))) * mask
        if extra is not None:
            a = a + extra
        h = h + a
        return h + self.l2(self.ln2(h)), mask


class _Alternating(nn.Module):
    """Even blocks called ``b(h, e, mask=ma)``, odd ones ``b(h, mask=mb, extra=e)``: other masks, and
    another layout of the same side inputs. ``handed`` records whether each block handed back its own mask."""

    def __init__(self, n: int = 4, d: int = 16):
        super().__init__()
        self.inp, self.out = nn.Linear(d, d), nn.Linear(d, 4)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))
        self.register_buffer("ma", torch.full((d,), 0.5))
        self.register_buffer("mb", torch.full((d,), 2.0))
        self.register_buffer("e", torch.full((d,), 0.1))
        self.handed: list[bool] = []

    def forward(self, x):
        h = self.inp(x)
        self.handed = []
        for k, b in enumerate(self.blocks):
            mask = self.ma if k % 2 == 0 else self.mb
            h, back = b(h, self.e, mask=mask) if k % 2 == 0 else b(h, mask=mask, extra=self.e)
            self.handed.append(back is mask)
        return self.out(h)


def _loss(out):
    return out.float().pow(2).mean()


@pytest.mark.parametrize("coupling", ["meft1", "meft3"])
def test_each_step_gets_its_own_blocks_side_inputs_and_hands_back_its_own(coupling):
    torch.manual_seed(0)
    model = _Alternating().train()
    x = torch.randn(2, 5, 16)
    rmodel = revify.revify(model, (x,), strategy="reversible", coupling=coupling, loss_fn=_loss)
    (rp,) = rmodel.revify_plan.reversible
    assert len(rp.chain.blocks) == 4 and len(set(rp.chain.side_groups)) == 2, rmodel.revify_plan.summary()
    with revify.stored_activations(rmodel):
        torch.manual_seed(3)
        _loss(rmodel(x)).backward()
    ref = {n: p.grad.clone() for n, p in rmodel.named_parameters() if p.grad is not None}
    rmodel.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    _loss(rmodel(x)).backward()
    got = {n: p.grad.clone() for n, p in rmodel.named_parameters() if p.grad is not None}
    assert_grads_close(got, ref)
    # every block's call hands back the mask it was given (meft3: from its own kind's inputs, whose
    # layout differs between even and odd blocks)
    assert rmodel.handed == [True] * 4, rmodel.handed


class _RevnetPairs(nn.Module):
    """Blocks 0-1 get ``ctx`` a, blocks 2-3 ``ctx`` b: RevNet pairs (0, 1), (2, 3) share theirs. With
    ``flip``, block 1 gets another tensor than block 0 at run time."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.inp, self.out = nn.Linear(d, d), nn.Linear(d, 4)
        self.blocks = nn.ModuleList(_CtxBlock(d) for _ in range(4))
        self.ca, self.cb = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))
        self.flip = False

    def forward(self, x):
        h = self.inp(x)
        a, b = self.ca * 1.0, self.cb * 1.0
        for k, block in enumerate(self.blocks):
            h = block(h, (a * 1.0) if (self.flip and k == 1) else (a if k < 2 else b))
        return self.out(h)


class _CtxBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln, self.lin = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, h, ctx):
        return h + self.lin(self.ln(h)) * torch.tanh(ctx)


def test_revnet_second_block_called_with_other_side_inputs_raises_saying_so():
    torch.manual_seed(0)
    model = _RevnetPairs()
    x = torch.randn(2, 5, 16)
    rmodel = revify.revify(model, (x,), strategy="reversible", coupling="revnet", loss_fn=_loss)
    assert rmodel.revify_plan.reversible, rmodel.revify_plan.summary()
    _loss(rmodel(x)).backward()  # pairs share their side inputs: runs
    rmodel.flip = True
    with pytest.raises(RuntimeError, match="block 1 was called with other side inputs .* than block 0"):
        rmodel(x)


def test_a_relay_called_on_its_own_raises():
    torch.manual_seed(0)
    model = _RevnetPairs()
    x = torch.randn(2, 5, 16)
    rmodel = revify.revify(model, (x,), strategy="reversible", coupling="meft1", loss_fn=_loss)
    with pytest.raises(RuntimeError, match="called with something other than the previous block's output"):
        rmodel.blocks[2](torch.randn(2, 5, 16), rmodel.cb)
