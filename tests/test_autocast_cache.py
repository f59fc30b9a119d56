"""Autocast's weight-cast cache and selective checkpointing.

``torch.autocast`` keeps each weight's low-precision copy for a whole
autocast region, so a second forward in one region runs fewer cast ops than
the first, and a recompute (in backward, a fresh region) runs them all
again. Selective checkpointing matches kept outputs by their order among
ops, so before checkpointed calls ran with the cache off, both cases below
failed: planning inside an autocast region (``RuntimeError: shape ... is
invalid`` while profiling BERT) and a second forward in one region with
``save_matmuls`` / ``save_ops`` segments (``aten._to_copy.default
invocation index ... not found in storage``). Casting again gives the same
values, so results stay bit-identical to the original's.
"""
from __future__ import annotations

import copy

import pytest
import torch

import revify
from revify.api import analyse_model
from revify.passes.capture.record_calls import call_model
from revify.passes.planning.profile_blocks import profile_chains
from revify.passes.rewrite.rewrite_checkpoint import rewrite_checkpoint
from zoo import ALL_CASES, two_block_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)  # cache_enabled=True, the default


def _padded_batch(rows: int, length: int) -> dict:
    """A batch as training feeds it: another shape than the example inputs, the last row padded."""
    g = torch.Generator().manual_seed(rows * 100 + length)
    ids = torch.randint(0, 100, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


MICRO_BATCHES = (_padded_batch(3, 9), _padded_batch(4, 7))


def _two_forwards_one_region(model, case, seed: int = 1):
    """Two micro-batches in one autocast region (the second finds the cache warm), backward outside."""
    torch.manual_seed(seed)
    with _bf16():
        losses = [case.loss_fn(call_model(model, batch)) for batch in MICRO_BATCHES]
    (losses[0] + losses[1]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return torch.stack([l.detach() for l in losses]), grads


def _selective(model, case, policy: str):
    """Blocks 0-1 in one segment under ``policy``, the rest recomputed in another."""
    _, _, analysis = analyse_model(model, case.example_inputs, "checkpoint")
    chain = analysis.chains[0]
    (prof,) = profile_chains(model, [chain], repeats=1)
    rmodel, _ = rewrite_checkpoint(model, [two_block_plan(chain, prof, policy)])
    return rmodel


def _one_forward_per_region(model, case, seed: int = 1):
    """The usual AMP step: forward and loss under autocast, backward outside."""
    torch.manual_seed(seed)
    with _bf16():
        loss = case.loss_fn(call_model(model, MICRO_BATCHES[0]))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_equal(got, ref):
    assert torch.equal(got[0], ref[0])
    assert got[1].keys() == ref[1].keys()
    assert all(torch.equal(got[1][k], ref[1][k]) for k in ref[1])


def _rel(got: dict, ref: dict) -> float:
    return max(((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)).item() for k in ref)


@pytest.mark.parametrize("policy", ["save_matmuls", "save_ops"])
def test_selective_segments_under_autocast(policy):
    """One forward per autocast region: bit-identical to the original. Two in one region (the second finds
    the original's cache warm): no error, the same losses, and gradients within bf16 rounding. Not equal: the
    original's second forward reuses the first one's cast weights, so their gradients add up in bf16 before
    the cast's backward, while a checkpointed block casts on each call (as any recompute must, HF's too)."""
    case = ALL_CASES["bert"]()  # dropout on
    original = copy.deepcopy(case.model)
    rmodel = _selective(case.model, case, policy)
    _assert_equal(_one_forward_per_region(rmodel, case), _one_forward_per_region(original, case))
    losses_r, grads_r = _two_forwards_one_region(rmodel, case)
    losses_o, grads_o = _two_forwards_one_region(original, case)
    assert torch.equal(losses_r, losses_o)
    assert grads_r.keys() == grads_o.keys()
    assert _rel(grads_r, grads_o) < 2e-2


def test_planning_inside_an_autocast_region_converts_and_is_exact():
    case = ALL_CASES["bert"]()
    original = copy.deepcopy(case.model)
    with _bf16():  # the planner profiles every block several times in this one region
        rmodel = revify.revify(case.model, case.example_inputs, budget_for="activations", memory_budget="10KiB",
                               strict=True)
    assert rmodel.revify_plan.converted, rmodel.revify_plan.summary()
    _assert_equal(_one_forward_per_region(rmodel, case), _one_forward_per_region(original, case))
