"""Public entry points: ``revify``, ``inspect`` and ``stored_activations``.

The pipeline, in order: record_calls → capture → find_chains (residual
analysis and legality inside) → plan (plan_checkpoint / plan_reversible) →
convert (rewrite_reversible, rewrite_checkpoint, calibrate_reversible).
``analyse`` and ``convert`` are separate so that a plan recorded earlier
(``revify.load``) can be applied to a freshly analysed model without
planning or calibrating again.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn

from revify.passes.rewrite.calibrate_reversible import calibrate_reversible
from revify.passes.capture.capture import capture_regions
from revify.passes.analysis.count_residual_adds import count_residual_adds
from revify.passes.planning.chain_costs import Pricing
from revify.passes.analysis.find_chains import find_chains
from revify.passes.analysis.find_list_inputs import find_list_inputs
from revify.passes.analysis.find_stem import find_stems
from revify.passes.planning.plan_budget import BudgetError, plan_budget
from revify.passes.planning.plan_checkpoint import SCHEDULES, plan_checkpoint
from revify.passes.planning.plan_reversible import ReversibleOptions, ReversiblePlan, plan_reversible_runs
from revify.passes.capture.record_calls import CallTrace, call_model, record_calls  # noqa: F401  (call_model: tests)
from revify.passes.rewrite.rewrite_checkpoint import rewrite_checkpoint, share_structure
from revify.passes.rewrite.rewrite_reversible import rewrite_reversible
from revify.plan import STRATEGIES, Plan
from revify.runtime.reversible_chain import stored_activations  # noqa: F401  (public)
from revify.runtime.training_cache import analysing_without_cache, install_no_cache
from revify.training_stack import already_converted, hf_checkpointing_off, install as install_training_stack
from revify.units import parse_bytes



class RevifyError(RuntimeError):
    """Conversion failed and ``strict=True`` was asked for."""


__all__ = ["revify", "inspect", "analyse", "analyse_model", "convert", "RevifyError", "BudgetError",
           "stored_activations"]


def analyse_model(model: nn.Module, example_inputs: Any, strategy: str) -> tuple[Plan, CallTrace | None, Any]:
    """Record, capture and find chains; the plan has no decisions yet (``plan.chains`` empty).

    Returns the plan, the call trace (None if the forward raised) and the chain analysis.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    plan = Plan(strategy=strategy)
    converted = already_converted(model)
    if converted is not None:  # its blocks run revify's forwards: analysing them again measures revify
        plan.errors.append(f"already converted by revify ({converted}); convert the original model instead")
        return plan, None, None
    with analysing_without_cache(model):  # the example call is a training call: no KV cache
        trace = record_calls(model, example_inputs)
    if trace.error is not None:
        plan.errors.append(f"the model's forward raised on the example inputs: {trace.error}")
        return plan, None, None
    plan.regions = count_residual_adds(capture_regions(model, trace))
    analysis = find_stems(model, trace, find_chains(model, trace))
    plan.rejections = list(analysis.rejections) + find_list_inputs(trace)
    return plan, trace, analysis


def _resolve_schedule(strategy: str, schedule: str | None, memory_budget: Any) -> str:
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if strategy == "reversible":
        if memory_budget is not None or schedule is not None:
            raise ValueError("strategy='reversible' converts every chain; for a memory budget use "
                             "strategy='auto' (the planner chooses reversible chains where they pay)")
        return "reversible"
    if memory_budget is not None and schedule not in (None, "budget"):
        raise ValueError(f"memory_budget needs the budget planner; schedule={schedule!r} is a fixed schedule")
    if strategy == "auto" and schedule not in (None, "budget"):
        raise ValueError("strategy='auto' is the budget planner; fixed schedules need strategy='checkpoint'")
    return schedule or "budget"


def _analyse(model: nn.Module, example_inputs: Any, strategy: str, options: ReversibleOptions | None,
             schedule: str = "sqrt(n)", memory_budget: Any = None,
             loss_fn: Callable[[Any], torch.Tensor] | None = None,
             budget_for: str = "peak", recompute_cost: str = "time") -> tuple[Plan, CallTrace | None]:
    plan, trace, analysis = analyse_model(model, example_inputs, strategy)
    if analysis is None:
        return plan, trace
    options = options or ReversibleOptions()
    plan.found = analysis.found
    if strategy == "reversible":
        # each chain whole (each MEFT step runs with its own block's side inputs), else per run of blocks that
        # share them (RevNet pairs, T5's computed position bias): plan_reversible_runs says which and why
        for decided in (d for c in analysis.chains for d in plan_reversible_runs(c, options, model)):
            if isinstance(decided, ReversiblePlan):
                plan.reversible.append(decided)
            else:
                plan.rejections.append(decided)
    elif schedule == "budget":
        if analysis.chains:
            budget = None if memory_budget is None else parse_bytes(memory_budget)
            with analysing_without_cache(model):
                decided = plan_budget(model, list(analysis.chains), example_inputs, budget,
                                      per_block_reference=lambda plans: rewrite_checkpoint(model, plans)[0],
                                      allow_reversible=strategy == "auto", reversible_options=options,
                                      loss_fn=loss_fn, budget_for=budget_for, recompute_cost=recompute_cost)
            plan.chains, plan.reversible, plan.budget = decided.chains, decided.reversible, decided
    else:
        plan.chains = [plan_checkpoint(c, schedule) for c in analysis.chains]
    return plan, trace


def analyse(model: nn.Module, example_inputs: Any, strategy: str = "checkpoint", schedule: str | None = None,
            memory_budget: Any = None, loss_fn: Callable[[Any], torch.Tensor] | None = None,
            **reversible_options: Any) -> Plan:
    """Run capture and the analyses; return the plan without converting."""
    schedule = _resolve_schedule(strategy, schedule, memory_budget)
    options = _options(strategy, **reversible_options)
    with hf_checkpointing_off(model):
        return _analyse(model, example_inputs, strategy, options, schedule, memory_budget, loss_fn)[0]


def inspect(model: nn.Module, example_inputs: Any, strategy: str = "checkpoint", *, file=None,
            schedule: str | None = None, memory_budget: Any = None, verbose: bool = False,
            **reversible_options: Any) -> Plan:
    """Print the blocks and chains revify finds, and what it would do with each.

    ``verbose`` adds the capture details (what torch.fx traced, and why it could not trace the rest)."""
    plan = analyse(model, example_inputs, strategy, schedule, memory_budget, **reversible_options)
    print(plan.summary(verbose=verbose), file=file)
    return plan


def _options(strategy: str, freeze_backbone: bool | None = None, check_reconstruction: bool | None = None,
             **kw: Any) -> ReversibleOptions:
    if freeze_backbone is None:  # the planner must not change what trains; reversible fine-tuning does
        freeze_backbone = strategy == "reversible"
    if check_reconstruction is None:
        check_reconstruction = os.environ.get("REVIFY_CHECK_RECONSTRUCTION", "") not in ("", "0")
    options = ReversibleOptions(freeze_backbone=freeze_backbone, check_reconstruction=check_reconstruction, **kw)
    options.validate()
    return options


def convert(model: nn.Module, plan: Plan, trace: CallTrace | None, example_inputs: Any, *,
            calibrate: bool = True, strict: bool = False) -> nn.Module:
    """Apply a plan: rewrite its reversible chains, then its checkpoint chains, on one copy.

    ``calibrate=False`` keeps the anchors already in the reversible plans (a
    recorded plan) instead of measuring them again. A rewrite failure leaves
    a module that behaves exactly like ``model`` with the reason in the plan
    (or raises ``RevifyError`` with ``strict``).
    """
    if strict and not plan.planned:
        raise RevifyError(plan.summary())
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    try:
        rmodel = share_structure(model)
        if plan.reversible:
            rmodel, chains, dropped = rewrite_reversible(model, plan.reversible, trace, rmodel)
            plan.rejections += dropped
            if calibrate:
                install_no_cache(rmodel)
                with analysing_without_cache(model):
                    plan.rejections += calibrate_reversible(model, rmodel, chains, plan.reversible, example_inputs)
        if plan.chains:
            rewrite_checkpoint(model, plan.chains, rmodel)
        if plan.chains or plan.reversible:
            install_no_cache(rmodel)  # training calls build no KV cache; eval and generate() keep it
    except Exception as exc:  # a module revify cannot rewrite must not stop the user's training
        plan.errors.append(f"rewrite failed: {type(exc).__name__}: {exc}")
        plan.chains, plan.reversible = [], []
        for p, flag in requires_grad:  # undo freeze_backbone on the shared parameters
            p.requires_grad_(flag)
        if strict:
            raise RevifyError(plan.summary()) from exc
        rmodel = share_structure(model)
    if strict and not plan.planned:
        raise RevifyError(plan.summary())
    rmodel.revify_plan = plan
    install_training_stack(rmodel, example_inputs)
    return rmodel


def revify(model: nn.Module, example_inputs: Any, strategy: str = "checkpoint", *,
           memory_budget: int | str | None = None, budget_for: str = "peak", recompute_cost: str = "time",
           schedule: str | None = None, loss_fn: Callable[[Any], torch.Tensor] | None = None, strict: bool = False,
           coupling: str = "meft1", lam: float | None = None, beta: float | None = None,
           adapter_rank: int = 8, adapter_init: str = "zero", freeze_backbone: bool | None = None,
           tolerance: float = 1e-4, stream_dtype: str | None = None,
           check_reconstruction: bool | None = None) -> nn.Module:
    """Return a module that trains with less activation memory.

    ``strategy="checkpoint"``: the same function, gradients bit-identical,
    blocks recomputed in backward. The budget planner measures every block
    and one step on ``example_inputs`` and chooses, per block, to keep its
    activations, recompute it in a segment, or recompute all but its matmul
    outputs, so that the predicted peak fits ``memory_budget`` (bytes, or a
    string such as ``"6GiB"``) with the least recompute time; without a
    budget it takes the least memory it can reach, then the least recompute.
    The budget bounds the step's peak (activations, gradients, temporaries;
    not parameters or optimizer state), or with ``budget_for="activations"``
    the bytes kept for backward when the forward ends. Recompute is the
    measured time (``recompute_cost="time"``: the plan that should step
    fastest here), or FLOPs as ``torch.utils.flop_counter`` counts them
    (``"flops"``: the same plan on every run, independent of timing noise,
    and the quantity ``torch.compile``'s activation-memory knapsack weighs).
    ``schedule="sqrt(n)"`` or ``"per-block"`` use a fixed schedule instead.
    An infeasible budget raises ``BudgetError`` with the smallest feasible
    one. ``loss_fn(output)`` is the loss of the measured step (default: mean
    square of the logits or first output). The result shares parameters and
    buffers with ``model`` and ``model`` itself is not modified.

    ``strategy="reversible"``: chains of blocks become two-stream reversible
    couplings (``coupling`` = meft1, meft2, meft3 or revnet) whose
    activations are reconstructed from outputs in backward. This changes the
    architecture: adapters are added, the output matches the original only
    approximately (the plan reports the measured error and its bound), and
    with ``freeze_backbone`` (default here) every pretrained parameter except
    the task head gets ``requires_grad=False`` — on the parameters shared
    with ``model``. Anchors are placed so the reconstruction error measured on
    ``example_inputs`` stays within ``tolerance`` (relative).
    ``check_reconstruction`` (or ``REVIFY_CHECK_RECONSTRUCTION=1``) compares
    every reconstruction against stored activations while training and raises
    ``ReconstructionError`` naming the block; it stores everything, so use it
    to debug only.

    ``strategy="auto"``: the budget planner may also make whole chains
    reversible (an architecture change, with the coupling options above)
    where checkpointing alone cannot reach the budget or costs more
    recompute. ``freeze_backbone`` defaults to False here, so the planner
    does not change which parameters train.

    If nothing can be converted, the result behaves exactly like ``model``
    and ``result.revify_plan`` says why; with ``strict=True`` that raises.
    """
    Pricing(recompute_cost)  # an unknown unit fails before any profiling
    schedule = _resolve_schedule(strategy, schedule, memory_budget)
    if recompute_cost != "time" and schedule != "budget":
        raise ValueError(f"recompute_cost={recompute_cost!r} prices the budget planner's choices; "
                         f"schedule={schedule!r} plans without it")
    options = _options(strategy, coupling=coupling, lam=lam, beta=beta, adapter_rank=adapter_rank,
                       adapter_init=adapter_init, freeze_backbone=freeze_backbone, tolerance=tolerance,
                       stream_dtype=stream_dtype, check_reconstruction=check_reconstruction)
    with hf_checkpointing_off(model):  # measure blocks as they run without Hugging Face's recompute
        plan, trace = _analyse(model, example_inputs, strategy, options, schedule, memory_budget, loss_fn,
                               budget_for, recompute_cost)
    return convert(model, plan, trace, example_inputs, strict=strict)
