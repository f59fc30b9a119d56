"""The budget planner's measuring passes and a backward FLOP counter, shared by the planner's test modules.

``test_plan_budget``, ``test_save_ops_menu`` and ``test_stem`` compare what the
planner predicts (from the profiles ``planner_profile`` returns) with what a
backward really recomputes (``backward_flops``).
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from revify.api import analyse_model
from revify.passes.capture.record_calls import call_model
from revify.passes.planning.plan_checkpoint import plan_checkpoint
from revify.passes.planning.profile_blocks import profile_chains
from revify.passes.planning.profile_step import profile_step
from revify.passes.rewrite.rewrite_checkpoint import rewrite_checkpoint
from zoo import _logits_loss


def planner_profile(model, inputs, loss_fn):
    """The planner's measuring passes: (chains, block profiles, step profile)."""
    _, _, analysis = analyse_model(model, inputs, "checkpoint")
    chains = list(analysis.chains)
    profiles = profile_chains(model, chains, repeats=1)
    reference, _ = rewrite_checkpoint(model, [plan_checkpoint(c, "per-block") for c in chains])
    return chains, profiles, profile_step(reference, chains, inputs, loss_fn)


def backward_flops(model, inputs, loss_fn=_logits_loss) -> int:
    """FLOPs of one backward, recomputation included (the forward runs outside the counter, seeded)."""
    torch.manual_seed(1)
    loss = loss_fn(call_model(model, inputs))
    counter = FlopCounterMode(display=False)
    with counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()
