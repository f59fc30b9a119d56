"""Models and folders for the hostile-input tests (also an ``--arch`` module for the console script).

``elided_folder`` writes a converted folder whose plan keeps some op outputs
and elides ops in recompute (a ``save_ops`` segment with elided ops), the
kind of plan a tampered ``revify.json`` can make train wrong.
"""
from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import torch
from torch import nn


class TwoBranchBlock(nn.Module):
    """``x + dropout(proj(ln x)) + fc2(gelu(fc1(ln x)))``: the residual sum, once kept, makes both
    projections dead in recompute."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return x + self.drop(self.proj(h)) + self.fc2(nn.functional.gelu(self.fc1(h)))


class TwoBranchNet(nn.Module):
    def __init__(self, dim: int = 16, n_blocks: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(TwoBranchBlock(dim) for _ in range(n_blocks))
        self.head = nn.Linear(dim, 4)
        self._register_state_dict_hook(_pause_while_saving)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _pause_while_saving(module, state_dict, prefix, local_metadata):
    """With REVIFY_TEST_PAUSE_GLOB set: once a temporary folder matching it exists (the atomic writer is
    writing), write REVIFY_TEST_MARK and sleep, so a test can signal the process mid-write."""
    pattern = os.environ.get("REVIFY_TEST_PAUSE_GLOB")
    if pattern and glob.glob(pattern):
        Path(os.environ["REVIFY_TEST_MARK"]).write_text("writing")
        time.sleep(120)
    return state_dict


def net() -> TwoBranchNet:
    torch.manual_seed(0)
    return TwoBranchNet()


def slow_net() -> TwoBranchNet:
    """A factory that blocks (marks first): a test signals the process while it runs."""
    Path(os.environ["REVIFY_TEST_MARK"]).write_text("started")
    time.sleep(120)
    return net()


def example_inputs() -> tuple:
    return (torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(1)),)


def elided_folder(dst: Path) -> None:
    """Convert ``net()`` with one ``save_ops`` segment over all blocks that keeps each block's residual sum
    and elides what that makes dead, and save it to ``dst``."""
    from revify import save
    from revify.api import analyse_model, convert
    from revify.passes.planning.chain_costs import Pricing, save_ops_plan
    from revify.passes.planning.plan_checkpoint import ChainPlan, Segment
    from revify.passes.planning.profile_blocks import profile_chains
    from revify.passes.planning.save_ops_menu import save_ops_menu

    model, inputs = net().train(), example_inputs()
    plan, trace, analysis = analyse_model(model, inputs, "checkpoint")
    (chain,) = analysis.chains
    (prof,) = profile_chains(model, [chain], repeats=1)
    level = save_ops_menu(prof.blocks[0], last=False, unit="flops")[0].level
    n = len(prof.blocks)
    saved, elided, digests = save_ops_plan(prof.blocks, 0, n, level, Pricing("flops"))
    assert elided is not None and any(elided), "the fixture must elide ops"
    plan.chains = [ChainPlan(chain, (Segment(0, n, "save_ops", saved, elided, digests),), "budget")]
    torch.manual_seed(0)
    rmodel = convert(model, plan, trace, inputs, calibrate=False)
    save(rmodel, dst, inputs)


def gradients(model: nn.Module, seed: int = 3) -> dict[str, torch.Tensor]:
    """Every parameter's gradient after one seeded training step (dropout on), all parameters trained."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    torch.manual_seed(seed)
    model(*example_inputs()).float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    return grads
