"""Pass 9: choose, per chain and per block, how to fit a memory budget with the least recompute.

Pipeline of the planner (each step its own file):

1. ``profile_blocks``: each distinct block measured standalone (bytes kept,
   transients, gradients, forward time, what selective checkpointing keeps),
   and each chain's stem (``profile_stem``: what recomputing it frees);
2. ``profile_step``: one step of a reference conversion (every block
   checkpointed alone) measured phase by phase around the chains;
3. ``chain_costs``: options per stretch of blocks (keep, recompute,
   save_matmuls, save_ops, reversible; a segment at block 0 also with the
   stem recomputed), with the memory each adds and needs;
4. ``solve_schedule``: the exact DP for the least recompute under the budget.

Recompute is measured seconds by default (``recompute_cost="time"``), or
FLOPs (``"flops"``: deterministic plans, what ``torch.compile``'s knapsack
weighs); the plan predicts both.

The budget is the predicted peak of one training step's tensors above what
lives before it (parameters, buffers, inputs, optimizer state): activations,
gradients and temporaries — what ``revify.measure`` measures as peak.

Before::

    chains=[Chain(bert.encoder, 12 blocks)], memory_budget=300 MiB

After::

    BudgetPlan(chains=[ChainPlan(segments=(Segment(0, 5), Segment(5, 11, "save_matmuls")),
                                 schedule="budget", …)],          # block 11 keeps its activations
               predicted_peak=297 MiB, predicted_recompute_s=0.41, smallest_budget=212 MiB, pareto=[…])

An infeasible budget raises ``BudgetError`` naming the smallest feasible one.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from revify.units import format_bytes

from revify.passes.planning.chain_costs import (POLICY_OPTIONS, ChainBases, Pricing, ReversibleCost, SaveOpsMenus, chain_options,
                          save_ops_plan)
from revify.passes.analysis.chain_types import Chain
from revify.passes.planning.plan_checkpoint import ChainPlan, Segment, plan_checkpoint
from revify.passes.planning.plan_reversible import ReversibleOptions, ReversiblePlan, plan_reversible
from revify.passes.planning.profile_blocks import ChainProfile, profile_chains
from revify.passes.planning.profile_step import StepProfile, profile_step
from revify.passes.planning.recompute_share import ModelForward, chain_paths, measure_model_forward, recompute_share, segment_overhead_s
from revify.passes.planning.solve_schedule import Option, Problem, Solution, min_budget, pareto, solve_within


log = logging.getLogger("revify.planner")  # progress of the slow steps; the CLI's demo shows it


class BudgetError(ValueError):
    """The memory budget cannot be met; the message names the smallest one that can."""


@dataclass
class BudgetPlan:
    chains: list[ChainPlan]
    reversible: list[ReversiblePlan]
    budget: int
    predicted_peak: int
    predicted_recompute_s: float
    smallest_budget: int
    forward_s: float  # measured forward of the whole model (training mode, grad on): the unit of recompute
    # (budget, predicted peak, recompute) of the plans least in ``recompute_cost``, recompute in that
    # unit: seconds for "time", FLOPs for "flops"
    pareto: list[tuple[int, int, float]] = field(default_factory=list)
    budget_for: str = "peak"  # what the budget and the predicted "peak" bound: "peak" or "activations"
    recompute_cost: str = "time"  # what the plan minimises: "time" (measured seconds) or "flops"
    predicted_recompute_flops: float = 0.0  # as torch.utils.flop_counter counts them


def _stream_ratio(dtype: torch.dtype, options: ReversibleOptions) -> float:
    from revify.runtime.couplings import stream_dtype_for

    from revify.passes.planning.plan_reversible import COUPLINGS

    base = COUPLINGS[options.coupling]
    coupling = replace(base, lam=base.lam if options.lam is None else options.lam,
                       beta=base.beta if options.beta is None else options.beta)
    stream = options.stream_dtype
    sdt = getattr(torch, stream) if stream else stream_dtype_for(dtype, coupling)
    return torch.empty((), dtype=sdt).element_size() / torch.empty((), dtype=dtype).element_size()


def _reversible_cost(model: nn.Module, prof: ChainProfile, options: ReversibleOptions) -> ReversibleCost:
    call = prof.chain.blocks[0].call
    dim = (call.hidden_in_shape or (0,))[-1]
    dtype = getattr(torch, (call.hidden_in_dtype or "torch.float32").removeprefix("torch."))
    itemsize = torch.empty((), dtype=dtype).element_size()
    adapters = 0 if options.coupling == "revnet" else 2 * (2 * dim * options.adapter_rank + options.adapter_rank + dim)
    frozen = options.freeze_backbone and options.coupling != "revnet"
    grads = tuple(adapters * itemsize + (0 if frozen else b.grad_bytes) for b in prof.blocks)
    # an adapter is two matmuls (dim -> rank -> dim) over every token; MEFT puts one beside F and
    # one beside G of every step, except meft1's last G (rewrite_reversible)
    tokens = math.prod((call.hidden_in_shape or (0,))[:-1])
    count = 0 if options.coupling == "revnet" else 2 * len(prof.blocks) - (options.coupling == "meft1")
    flops = count * 2 * (2 * tokens * dim * options.adapter_rank)
    return ReversibleCost(_stream_ratio(dtype, options), grads, adapter_flops=flops)


def _chain_kept(options: tuple[Option, ...] | list[Option], chain_index: int) -> int:
    return sum(o.keep for o in options if o.label[1] == chain_index)


def _bases(step: StepProfile, ref_kept: list[int]) -> tuple[list[ChainBases], int]:
    """Per-chain bases and the final need, from the reference step and what its chains keep."""
    n = len(ref_kept)

    def kept_through(c: int) -> int:  # bytes the reference schedule keeps in chains 0..c
        return sum(ref_kept[:c + 1])

    def live(kind: str, c: int | None) -> int | None:
        e = step.find(kind, c)
        return None if e is None else e.live

    bases = []
    for c in range(n):
        base_f = (live("fwd_start", c) or 0) - kept_through(c - 1)
        bwd_start = live("bwd_start", c)
        base_b = (bwd_start - kept_through(c)) if bwd_start is not None else base_f
        # phases that end where chain c starts and must fit with the state there
        needs = []
        if c == 0:
            needs.append(step.phase_peak("fwd_start", 0) or 0)
            tail = step.phase_peak("end") if step.find("bwd_end", 0) is not None else live("end", None)
            needs.append(tail or 0)
        else:
            needs.append((step.phase_peak("fwd_start", c) or 0) - kept_through(c - 1))
            gap = step.phase_peak("bwd_start", c - 1)
            if gap is not None:
                needs.append(gap - kept_through(c - 1))
        bases.append(ChainBases(base_f, base_b, max(needs)))
    head = [p for p in (step.phase_peak("loss"), step.phase_peak("bwd_start", n - 1)) if p is not None]
    final_need = max(head, default=0) - kept_through(n - 1)
    return bases, max(0, final_need)


BUDGET_FOR = ("peak", "activations")


def build_problem(profiles: list[ChainProfile], step: StepProfile, *, policies: tuple[str, ...] = POLICY_OPTIONS,
                  reversible: list[ReversibleCost | None] | None = None, budget_for: str = "peak",
                  recompute_cost: str = "time") -> Problem:
    """The solver's problem for all chains, laid end to end in execution order.

    ``budget_for="peak"``: the budget bounds the step's predicted peak.
    ``"activations"``: it bounds the bytes kept for backward when the forward
    ends (chains' kept bytes plus everything else alive then, measured), the
    quantity ``torch.compile``'s activation_memory_budget trades against.
    ``recompute_cost``: what an option's ``cost`` is (``chain_costs.Pricing``).
    """
    pricing = Pricing(recompute_cost)
    if budget_for not in BUDGET_FOR:
        raise ValueError(f"unknown budget_for {budget_for!r}; choose one of {', '.join(BUDGET_FOR)}")
    # every block its own segment, and the stem as written
    ref_kept = [sum(b.input_bytes for b in p.blocks) + (p.stem.saved_bytes if p.stem else 0) for p in profiles]
    bases, final_need = _bases(step, ref_kept)
    options: list[Option] = []
    offset = 0
    for c, (prof, base) in enumerate(zip(profiles, bases)):
        rev = reversible[c] if reversible else None
        options += chain_options(prof.blocks, base, offset, c, policies, reversible=rev, pricing=pricing,
                                 stem=prof.stem, side_groups=prof.chain.side_groups, shared=prof.chain.shared)
        offset += len(prof.blocks)
    if budget_for == "activations":
        loss = step.find("loss")
        outside = (loss.live if loss is not None else 0) - sum(ref_kept)
        options = [replace(o, need=0) for o in options]
        final_need = max(0, outside)
    return Problem(offset, tuple(options), final_need)


def schedule_path(problem: Problem, chains: list[ChainPlan]) -> list[Option]:
    """The solver's options that stand for given checkpoint plans (one per chain, in order).

    Blocks outside segments form maximal kept runs. Used to predict the peak of
    fixed schedules (sqrt(n), per-block) with the same model the planner uses.
    """
    by_label = {o.label: o for o in problem.options}
    path = []
    for c, cp in enumerate(chains):
        n = len(cp.chain.blocks)
        starts = {s.start: s for s in cp.segments}
        i = 0
        while i < n:
            if i in starts:
                seg = starts[i]
                path.append(by_label[(seg.policy, c, seg.start, seg.end)])
                i = seg.end
            else:
                j = i
                while j < n and j not in starts:
                    j += 1
                path.append(by_label[("keep", c, i, j)])
                i = j
    return path


def recompute_of(options: tuple[Option, ...] | list[Option]) -> tuple[float, float]:
    """Predicted (seconds, FLOPs) recomputed by a path of options, whichever the solver minimised."""
    return sum(o.parts[0] for o in options if o.parts), sum(o.parts[1] for o in options if o.parts)


def segments_of(options: tuple[Option, ...] | list[Option], prof: ChainProfile, chain_index: int) -> tuple[Segment, ...]:
    """The checkpoint segments a solution's options stand for on one chain (kept runs are not segments)."""
    segments = []
    menus: dict[str, SaveOpsMenus] = {}  # per pricing unit: built once for the chain, not per segment
    for o in options:
        if o.label[1] != chain_index:
            continue
        label = o.label[4] if o.label[0] == "stem" else o.label  # the segment the stem is recomputed with
        policy = label[0]
        if policy in ("keep", "reversible"):
            continue
        start, end = label[2], label[3]
        lists: tuple = ()
        if policy == "save_ops":
            # label: ("save_ops", chain, start, end, menu level, unit the menus were ranked in)
            unit = label[5]
            if unit not in menus:
                menus[unit] = SaveOpsMenus(prof.blocks, Pricing(unit))
            lists = save_ops_plan(prof.blocks, start, end, label[4], Pricing(unit), menus[unit])
        segments.append(Segment(start, end, policy, *lists))
    return tuple(segments)


def stem_of(options: tuple[Option, ...] | list[Option], prof: ChainProfile, chain_index: int) -> str | None:
    """``ChainPlan.stem``: the stem's path if the solution recomputes it with the chain's first segment."""
    chosen = any(o.label[0] == "stem" and o.label[1] == chain_index for o in options)
    return prof.stem.path if chosen and prof.stem is not None else None


def checkpoint_plans(solution: Solution, profiles: list[ChainProfile]) -> list[ChainPlan]:
    """One ``ChainPlan`` per chain for a solution without reversible chains (benchmarks, tests)."""
    return [ChainPlan(p.chain, segments_of(solution.options, p, c), "budget", stem=stem_of(solution.options, p, c))
            for c, p in enumerate(profiles)]


def _plans_from(solution: Solution, profiles: list[ChainProfile], reversible_plans: list[ReversiblePlan | None],
                forward: ModelForward) -> tuple[list[ChainPlan], list[ReversiblePlan]]:
    chains, revs = [], []
    for c, prof in enumerate(profiles):
        mine = [o for o in solution.options if o.label[1] == c]
        recompute = recompute_of(mine)[0]
        reversible = bool(mine) and mine[0].label[0] == "reversible"
        segments = () if reversible else segments_of(mine, prof, c)
        overhead = segment_overhead_s(prof, segments)
        predicted = dict(predicted_saved_bytes=_chain_kept(mine, c),
                         predicted_peak_bytes=solution.peak,
                         predicted_recompute_s=recompute,
                         recompute_fraction=recompute_share(prof, recompute, overhead, forward).share)
        if reversible:
            rp = reversible_plans[c]
            for k, v in predicted.items():
                setattr(rp, k, v)
            revs.append(rp)
            continue
        chains.append(ChainPlan(prof.chain, segments, "budget", **predicted, predicted_overhead_s=overhead,
                                stem=stem_of(mine, prof, c)))
    return chains, revs


def plan_budget(model: nn.Module, chains: list[Chain], example_inputs: Any, budget: int | None, *,
                per_block_reference: Callable[[list[ChainPlan]], nn.Module],
                allow_reversible: bool = False, reversible_options: ReversibleOptions | None = None,
                loss_fn: Callable[[Any], torch.Tensor] | None = None,
                policies: tuple[str, ...] = POLICY_OPTIONS, budget_for: str = "peak",
                recompute_cost: str = "time") -> BudgetPlan:
    """Plan every chain for ``budget`` bytes (None: the least memory, then the least recompute).

    ``per_block_reference(plans)`` returns the model converted with ``plans`` (every block its own
    checkpoint segment), the reference step ``profile_step`` measures; the caller passes the rewrite
    stage's ``rewrite_checkpoint``, which planning, an earlier stage, does not import.
    """
    Pricing(recompute_cost)  # an unknown unit fails before minutes of profiling
    log.info("planner: measuring each distinct block of %d chain(s) (%d blocks)", len(chains),
             sum(len(c.blocks) for c in chains))
    profiles = profile_chains(model, chains)
    log.info("planner: measuring one training step around the chains")
    reference = per_block_reference([plan_checkpoint(c, "per-block") for c in chains])
    step = profile_step(reference, chains, example_inputs, loss_fn)
    reversible_plans: list[ReversiblePlan | None] = [None] * len(chains)
    costs: list[ReversibleCost | None] = [None] * len(chains)
    if allow_reversible:
        options = reversible_options or ReversibleOptions()
        for c, prof in enumerate(profiles):
            decided = plan_reversible(prof.chain, options, model)
            if isinstance(decided, ReversiblePlan):
                reversible_plans[c] = decided
                costs[c] = _reversible_cost(model, prof, options)
    log.info("planner: choosing segments (exact DP over the options of each stretch of blocks)")
    problem = build_problem(profiles, step, policies=policies, reversible=costs, budget_for=budget_for,
                            recompute_cost=recompute_cost)
    least = min_budget(problem)
    if least is None:
        raise BudgetError("no schedule covers the chains (no options were generated)")
    smallest = least[0]
    target = smallest if budget is None else budget
    # below the smallest budget the rounded solver accepts, fail even where solve_within might find a
    # path lost to rounding: the error names one boundary, and every budget above it is accepted
    solution = solve_within(problem, target) if target >= smallest else None
    if solution is None:
        hint = "" if allow_reversible else "; strategy='auto' may go lower with reversible chains"
        what = "peak" if budget_for == "peak" else "activation memory"
        raise BudgetError(f"memory_budget {format_bytes(target)} cannot be met: the smallest {what} budget revify "
                          f"accepts on these inputs is {format_bytes(smallest)} ({smallest} bytes; its plan's "
                          f"predicted {what} is {format_bytes(least[1].peak)}){hint}")
    log.info("planner: timing the model forward (the unit recompute is reported in)")
    forward = measure_model_forward(model, example_inputs, chain_paths(profiles))
    chain_plans, rev_plans = _plans_from(solution, profiles, reversible_plans, forward)
    unit = 0 if recompute_cost == "time" else 1
    front = [(b, s.peak, recompute_of(s.options)[unit]) for b, s in pareto(problem)]
    seconds, flops = recompute_of(solution.options)
    return BudgetPlan(chain_plans, rev_plans, target, solution.peak, seconds, smallest, forward.total_s, front,
                      budget_for, recompute_cost, flops)

