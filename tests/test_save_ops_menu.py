"""The save_ops menu and dead-op elision: a recompute skips ops whose outputs nothing needs."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from revify.api import analyse_model
from revify.passes.planning.chain_costs import Pricing, SaveOpsMenus, save_ops_plan
from revify.passes.planning.plan_checkpoint import ChainPlan, Segment
from revify.passes.planning.profile_blocks import profile_chains
from revify.passes.rewrite.rewrite_checkpoint import rewrite_checkpoint
from revify.passes.planning.save_ops_menu import replay, save_ops_menu
from planner_fixtures import backward_flops, planner_profile
from zoo import ALL_CASES, ZooCase, _logits_loss, train_step


class ParallelBlock(nn.Module):
    """GPT-J style: ``x + dropout(attn(ln x)) + mlp(ln x)``, with a linear map standing in for attention."""

    def __init__(self, dim: int, native_dropout: bool = False):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(0.1)
        self.native_dropout = native_dropout  # the fused op CUDA runs (on CPU nn.Dropout decomposes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        a = self.attn(h)
        a = torch.native_dropout(a, 0.1, self.training)[0] if self.native_dropout else self.drop(a)
        return x + a + self.down(torch.relu(self.up(h)))


class ParallelNet(nn.Module):
    def __init__(self, dim: int = 64, n_blocks: int = 4, native_dropout: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(ParallelBlock(dim, native_dropout) for _ in range(n_blocks))
        self.head = nn.Linear(dim, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class _Stack(nn.Module):
    """Three blocks in a row: the chain the analysis finds."""

    def __init__(self, make_block):
        super().__init__()
        self.blocks = nn.ModuleList(make_block() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def _assert_trains_like(reference: tuple, rmodel: nn.Module, case: ZooCase, where: object = None) -> None:
    """``rmodel`` gives the output and gradients of ``reference`` (``train_step`` of the original)."""
    out_a, _, grads_a = reference
    out_b, _, grads_b = train_step(rmodel, replace(case, model=rmodel))
    assert torch.equal(out_a, out_b) and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a), where


@pytest.mark.parametrize("native_dropout", [False, True])
def test_keeping_the_sum_elides_both_branches_exactly(native_dropout):
    """In a parallel block, keeping the residual sum lets the recompute skip both projections that
    feed it (neither output is saved by autograd; dropout still draws its mask, from a blank input
    when it is the fused ``native_dropout``). The menu takes that sum first (two matmuls for one
    tensor); the runtime recomputes exactly the predicted FLOPs, fewer than selective checkpointing
    without elision, with exact gradients."""
    torch.manual_seed(0)
    model = ParallelNet(native_dropout=native_dropout).train()
    inputs = (torch.randn(32, 64),)
    _, _, analysis = analyse_model(model, inputs, "checkpoint")
    (chain,) = analysis.chains
    (prof,) = profile_chains(model, [chain], repeats=1)
    block = prof.blocks[0]
    assert block.dataflow
    menu = save_ops_menu(block, last=False, unit="flops")
    (first,) = menu[0].ops
    assert first.name == "aten.add.Tensor" and first.index == max(o.index for o in block.ops if o.savable)
    elided = replay(block, frozenset({first.index}), last=False).elided
    assert sorted(o.name for o in elided if o.flops) == ["aten.addmm.default", "aten.addmm.default"]

    level = menu[0].level
    saved, elided_ops, digests = save_ops_plan(prof.blocks, 0, len(prof.blocks), level, Pricing("flops"))
    assert elided_ops is not None and all(elided_ops[:-1])
    menus = SaveOpsMenus(prof.blocks, Pricing("flops"))
    predicted = sum(menus.replay(b, level, k == len(prof.blocks) - 1).flops for k, b in enumerate(prof.blocks))
    base = backward_flops(model, inputs)
    case = ZooCase("parallel", model, inputs, _logits_loss, 8)
    reference = train_step(model, case)
    flops = {}
    # a forward whose ops differ from the planned ones (here: a wrong checksum) must not elide
    stale = tuple(d ^ 1 for d in digests)
    for name, elide, digest in (("elided", elided_ops, digests), ("replayed", None, None),
                                ("stale", elided_ops, stale)):
        segment = Segment(0, len(prof.blocks), "save_ops", saved, elide, digest)
        rmodel, _ = rewrite_checkpoint(model, [ChainPlan(chain, (segment,), "budget")])
        flops[name] = backward_flops(rmodel, inputs) - base
        _assert_trains_like(reference, rmodel, case, name)
    assert flops["elided"] == predicted
    assert flops["elided"] < flops["replayed"] == flops["stale"]



def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
                        vocab_size=100, max_position_embeddings=64, use_parallel_residual=True,
                        hidden_dropout=0.1, attention_dropout=0.1, use_cache=False)
    model = GPTNeoXForCausalLM(cfg).train()
    return model, {"input_ids": torch.randint(0, 100, (2, 32))}


def test_elision_lowers_the_least_flops_on_a_parallel_residual_transformer():
    """GPT-NeoX (parallel attention and MLP): at every budget of a sweep the least-FLOPs plan with
    elision recomputes no more than without it, and less at some; the plans recompute exactly the
    FLOPs they predict, with the original gradients (dropout on)."""
    from revify.passes.planning.plan_budget import build_problem, checkpoint_plans, recompute_of
    from revify.passes.planning.solve_schedule import min_budget, solve

    def loss_fn(out):
        return out.logits.float().pow(2).mean()

    model, inputs = _neox()
    chains, profiles, step = planner_profile(model, inputs, loss_fn)
    blind = [replace(p, blocks=tuple(replace(b, dataflow=False) for b in p.blocks)) for p in profiles]
    with_elision = build_problem(profiles, step, budget_for="activations", recompute_cost="flops")
    without = build_problem(blind, step, budget_for="activations", recompute_cost="flops")
    least = min_budget(with_elision)[1].peak
    everything = solve(with_elision, 1 << 40).peak
    case = ZooCase("neox", model, inputs, loss_fn, 8)
    reference = train_step(model, case)
    base = backward_flops(model, inputs, loss_fn)
    gains = []
    for frac in (0.1, 0.3, 0.5, 0.7):
        budget = int(least + frac * (everything - least)) + 4096
        sol, blind_sol = solve(with_elision, budget), solve(without, budget)
        flops = recompute_of(sol.options)[1]
        gains.append(recompute_of(blind_sol.options)[1] - flops)
        rmodel, _ = rewrite_checkpoint(model, checkpoint_plans(sol, profiles))
        assert backward_flops(rmodel, inputs, loss_fn) - base == flops, frac
        _assert_trains_like(reference, rmodel, case, frac)
    assert min(gains) >= 0 and max(gains) > 0, gains



@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_time_priced_menus_elide_exactly_on_transformers(name):
    """Time-priced menus keep residual sums where that also spares the ops under them, so their
    recomputes elide projections. On small BERT, Llama and GPT-2 models, one segment over the chain at
    two levels that elide (the first and the last): the recomputed FLOPs equal the prediction, and
    outputs and gradients equal the original's (dropout on where the config has it)."""
    case = ALL_CASES[name]()
    _, profiles, _ = planner_profile(case.model, case.example_inputs, case.loss_fn)
    prof = profiles[0]
    n = len(prof.blocks)
    menus = SaveOpsMenus(prof.blocks, Pricing("time"))
    plans = [(level, save_ops_plan(prof.blocks, 0, n, level, Pricing("time"))) for level in menus.levels()]
    eliding = [(level, lists) for level, lists in plans if lists[1] is not None]
    assert eliding, "no level elides"
    base = backward_flops(case.model, case.example_inputs, case.loss_fn)
    reference = train_step(case.model, case)
    for level, lists in {id(x): x for x in (eliding[0], eliding[-1])}.values():
        predicted = sum(menus.replay(b, level, k == n - 1).flops for k, b in enumerate(prof.blocks))
        rmodel, _ = rewrite_checkpoint(case.model, [ChainPlan(prof.chain, (Segment(0, n, "save_ops", *lists),),
                                                              "budget")])
        assert backward_flops(rmodel, case.example_inputs, case.loss_fn) - base == predicted, level
        _assert_trains_like(reference, rmodel, case, level)


def test_a_frozen_layer_planned_then_unfrozen_stays_exact():
    """Blocks ``x + down(gelu(up(x)))`` planned with ``down`` frozen, keeping its output: autograd
    would not save gelu's output for a frozen ``down``, but the dataflow is recorded as if every
    parameter required grad, so gelu is not elided and training after unfreezing stays exact."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(32, 128), nn.Linear(128, 32)

        def forward(self, x):
            return x + self.down(torch.nn.functional.gelu(self.up(x)))

    torch.manual_seed(0)
    model = _Stack(Block).train()
    inputs = (torch.randn(16, 32),)
    for b in model.blocks:
        b.down.requires_grad_(False)
    _, _, analysis = analyse_model(model, inputs, "checkpoint")
    (chain,) = analysis.chains
    (prof,) = profile_chains(model, [chain], repeats=1)
    block = prof.blocks[0]
    assert block.dataflow
    down = max(o.index for o in block.ops if o.name == "aten.addmm.default")
    assert not any(o.name == "aten.gelu.default" for o in replay(block, frozenset({down}), last=False).elided)
    for b in model.blocks:
        b.down.requires_grad_(True)
    saved = tuple(((down, "aten.addmm.default"),) for _ in prof.blocks)
    rmodel, _ = rewrite_checkpoint(model, [ChainPlan(chain, (Segment(0, len(prof.blocks), "save_ops", saved),),
                                                     "budget")])
    case = ZooCase("frozen", model, inputs, _logits_loss, 8)
    _assert_trains_like(train_step(model, case), rmodel, case)


def test_a_python_autograd_function_turns_the_dataflow_off():
    """A Python ``autograd.Function`` may read tensors through a kernel no dispatch mode sees, so a
    block holding one elides nothing."""

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return x + Double.apply(self.fc(x))

    model = _Stack(Block).train()
    inputs = (torch.randn(16, 32),)
    _, _, analysis = analyse_model(model, inputs, "checkpoint")
    (prof,) = profile_chains(model, list(analysis.chains), repeats=1)
    assert prof.blocks[0].ops and not prof.blocks[0].dataflow
