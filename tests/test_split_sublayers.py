"""split_sublayers: a block's two residual sub-layers as separate calls (MEFT3)."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from revify.passes.analysis.find_chains import find_chains
from revify.passes.capture.record_calls import record_calls
from revify.runtime.call_arguments import fed_tensor, get_slot, set_slot
from revify.passes.rewrite.split_sublayers import SplitError, split_block
from zoo import ALL_CASES

TWO_SUBLAYER_MODELS = ["pre_ln_transformer", "bert", "roberta", "gpt2", "opt", "llama", "vit"]


def _other_inputs(name: str):
    """Inputs with a different batch size and sequence length than the zoo's."""
    torch.manual_seed(7)
    if name == "pre_ln_transformer":
        return (torch.randint(0, 50, (3, 9)),)
    if name == "vit":  # the sequence length follows the image size, which the config fixes
        return {"pixel_values": torch.randn(3, 3, 32, 32)}
    ids = torch.randint(2, 100, (3, 7))
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@functools.lru_cache(maxsize=None)
def _zoo_block(name: str):
    """The first chain block of a zoo model, its recorded call, and a call with other shapes."""
    case = ALL_CASES[name]()
    trace = record_calls(case.model, case.example_inputs)
    chain = find_chains(case.model, trace).chains[0]
    call = chain.blocks[0].call
    block = case.model.get_submodule(call.path)
    other = next(c for c in record_calls(case.model, _other_inputs(name)).calls
                 if c.path == call.path and c.example_args is not None)
    calls = [(tuple(c.example_args), dict(c.example_kwargs or {})) for c in (call, other)]
    return block, call.hidden_slot, calls


def _eager(block, slot, args, kwargs, x):
    a, k = set_slot(args, kwargs, slot, x)
    return fed_tensor(block(*a, **k))[0]


def _grads(block):
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    block.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("name", TWO_SUBLAYER_MODELS)
def test_halves_compose_to_block_in_eval(name):
    block, slot, calls = _zoo_block(name)
    block.eval()
    halves = split_block(block, *calls[0], slot)
    with torch.no_grad():
        for args, kwargs in calls:  # the recorded shapes, then another batch size and length
            x = get_slot(args, kwargs, slot)
            side_args, side_kwargs = set_slot(args, kwargs, slot, None)  # as the reversible runtime passes them
            mid = halves.first(x, side_args, side_kwargs)
            assert mid.shape == x.shape
            out = halves.second(mid, side_args, side_kwargs)
            torch.testing.assert_close(out, _eager(block, slot, args, kwargs, x), atol=1e-5, rtol=1e-5)
    assert len(halves._cache) == 2  # export specialises on shapes: one capture per signature


@pytest.mark.parametrize("name", TWO_SUBLAYER_MODELS)
def test_train_mode_dropout_and_gradients_match_eager(name):
    block, slot, calls = _zoo_block(name)
    block.train()
    args, kwargs = calls[0]
    rng = torch.get_rng_state()
    halves = split_block(block, args, kwargs, slot)
    assert torch.equal(torch.get_rng_state(), rng)  # capturing draws no random numbers
    x = get_slot(args, kwargs, slot)

    x_ref = x.detach().clone().requires_grad_()
    torch.manual_seed(11)
    ref = _eager(block, slot, args, kwargs, x_ref)
    (ref * torch.linspace(-1, 1, ref.shape[-1])).sum().backward()
    grads_ref = _grads(block)

    x_split = x.detach().clone().requires_grad_()
    torch.manual_seed(11)
    out = halves.second(halves.first(x_split, args, kwargs), args, kwargs)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = _grads(block)

    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_split.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys() and grads  # the block's own parameters get the gradients
    for k in grads:
        torch.testing.assert_close(grads[k], grads_ref[k], atol=1e-5, rtol=1e-5, msg=k)


def test_bert_dropout_is_really_on_in_train_mode():
    block, slot, calls = _zoo_block("bert")
    args, kwargs = calls[0]
    x = get_slot(args, kwargs, slot)
    halves = split_block(block.train(), args, kwargs, slot)
    with torch.no_grad():
        torch.manual_seed(3)
        train = halves.second(halves.first(x, args, kwargs), args, kwargs)
        block.eval()
        evaluated = halves.second(halves.first(x, args, kwargs), args, kwargs)
        assert not torch.allclose(train, evaluated)
        torch.testing.assert_close(evaluated, _eager(block, slot, args, kwargs, x), atol=1e-5, rtol=1e-5)


def test_mlp_resnet_block_has_one_sublayer():
    case = ALL_CASES["mlp_resnet"]()
    block = case.model.blocks[0]
    with pytest.raises(SplitError, match=r"block has 1 residual sub-layer\(s\), MEFT3 needs 2"):
        split_block(block, (torch.randn(4, 32),), {}, ("arg", 0))


def test_non_residual_block_is_refused():
    block = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
    with pytest.raises(SplitError, match=r"block has 0 residual sub-layer\(s\).*no residual connection"):
        split_block(block, (torch.randn(2, 5, 16),), {}, ("arg", 0))


# --- fx engine and the cleanliness checks, on small hand-written blocks ---------------

class MaskedBlock(nn.Module):
    """fx-traceable pre-LN block; the mask becomes ``keep`` once and both sub-layers read it."""

    def __init__(self, dim: int = 16, p: float = 0.2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(p)
        self.p = p

    def forward(self, x, mask, scale: float = 1.0):
        keep = mask.unsqueeze(-1)
        h = self.ln1(x)
        att = torch.softmax(h @ h.transpose(-1, -2) * scale + (1.0 - keep.transpose(-1, -2)) * -1e4, -1)
        x = x + self.drop(self.proj(att @ h)) * keep
        return x + F.dropout(self.mlp(self.ln2(x)), self.p, self.training) * keep


def _masked_call(b: int, s: int):
    torch.manual_seed(b * 100 + s)
    mask = torch.ones(b, s)
    mask[0, -1] = 0
    return (torch.randn(b, s, 16), mask), {"scale": 0.5}


def test_fx_engine_halves_match_block():
    torch.manual_seed(0)
    block = MaskedBlock()
    args, kwargs = _masked_call(2, 6)
    halves = split_block(block.train(), args, kwargs, ("arg", 0))
    assert halves.engine == "fx"
    for mode in ("train", "eval"):
        getattr(block, mode)()
        for b, s in ((2, 6), (3, 4)):
            args, kwargs = _masked_call(b, s)
            x = args[0].clone().requires_grad_()
            torch.manual_seed(1)
            ref = _eager(block, ("arg", 0), args, kwargs, x)
            ref.sum().backward()
            grads_ref, gx_ref = _grads(block), x.grad
            x.grad = None
            torch.manual_seed(1)
            out = halves.second(halves.first(x, args, kwargs), args, kwargs)
            out.sum().backward()
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(x.grad, gx_ref)
            grads = _grads(block)
            assert grads.keys() == grads_ref.keys() and grads
            for k in grads:
                torch.testing.assert_close(grads[k], grads_ref[k], msg=k)


def test_parameters_are_read_at_call_time_and_copies_work():
    torch.manual_seed(0)
    block = MaskedBlock().eval()
    args, kwargs = _masked_call(2, 6)
    halves = split_block(block, args, kwargs, ("arg", 0))
    with torch.no_grad():
        block.proj.weight = nn.Parameter(block.proj.weight * 2)  # replaced after splitting
        out = halves.second(halves.first(args[0], args, kwargs), args, kwargs)
        torch.testing.assert_close(out, block(*args, **kwargs))
        block2, halves2 = copy.deepcopy((block, halves))
        assert halves2.block is block2
        block2.ln2.weight.mul_(3)
        out2 = halves2.second(halves2.first(args[0], args, kwargs), args, kwargs)
        torch.testing.assert_close(out2, block2(*args, **kwargs))


class BatchNormBlock(nn.Module):
    """Two residual sub-layers with BatchNorm.

    fx records ``x.shape`` as a value computed from ``x``, so in its graph the
    second sub-layer reads ``x`` and is no residual; export bakes the shape in
    and splits the block.
    """

    def __init__(self, dim: int = 8):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU())
        self.g = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.Tanh())

    def forward(self, x):
        n, d = x.shape
        x = x + self.f(x)
        return x + self.g(x).reshape(n, d)


def test_buffer_updates_run_once_like_the_block():
    torch.manual_seed(0)
    block = BatchNormBlock().train()
    twin = copy.deepcopy(block)
    x = torch.randn(6, 8)
    halves = split_block(twin, (x,), {}, ("arg", 0))
    assert halves.engine == "export"
    assert all(torch.equal(a, b) for a, b in zip(block.buffers(), twin.buffers()))  # capture updates nothing
    ref = block(x)
    out = halves.second(halves.first(x, (x,), {}), (x,), {})
    torch.testing.assert_close(out, ref)
    for (name, a), (_, b) in zip(block.named_buffers(), twin.named_buffers()):
        assert torch.equal(a, b), name


class NoiseBlock(nn.Module):
    """Draws noise before the first sub-layer's dropout but uses it only in the second."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.f, self.g = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        noise = torch.rand(16)
        x = x + self.drop(self.f(self.ln1(x)))
        return x + self.g(self.ln2(x)) * noise


class StatBlock(nn.Module):
    """Records a statistic of a pre-cut value after the first sub-layer: not a clean cut."""

    def __init__(self, of_input: bool, dim: int = 16):
        super().__init__()
        self.of_input = of_input
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.f, self.g = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.register_buffer("last_mean", torch.zeros(()))

    def forward(self, x):
        a = self.ln1(x)
        h = x + self.f(a)
        self.last_mean.copy_((x if self.of_input else a).detach().mean())
        return h + self.g(self.ln2(h))


def test_reordered_random_draws_are_refused():
    torch.manual_seed(0)
    block, x = NoiseBlock(), torch.randn(2, 3, 16)
    # fx would bake torch.rand(16) in as a constant; export keeps it an op
    with pytest.raises(SplitError, match=r"random op rand would run in a different order"):
        split_block(block.train(), (x,), {}, ("arg", 0))
    halves = split_block(block.eval(), (x,), {}, ("arg", 0))  # no dropout: the noise alone is in order
    torch.manual_seed(2)
    ref = block(x)
    torch.manual_seed(2)
    torch.testing.assert_close(halves.second(halves.first(x, (x,), {}), (x,), {}), ref)


@pytest.mark.parametrize("of_input,reason", [
    (True, r"second sub-layer reads the block's hidden input directly \(in detach"),
    (False, r"second sub-layer reads hidden-dependent value layer_norm computed before the cut"),
])
def test_unclean_cut_is_refused(of_input, reason):
    with pytest.raises(SplitError, match=reason):
        split_block(StatBlock(of_input), (torch.randn(2, 3, 16),), {}, ("arg", 0))
