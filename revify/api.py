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
from typing import Any

from torch import nn

from revify.passes.calibrate_reversible import calibrate_reversible
from revify.passes.capture import capture_regions
from revify.passes.find_chains import find_chains
from revify.passes.plan_checkpoint import SCHEDULES, plan_checkpoint
from revify.passes.plan_reversible import ReversibleOptions, ReversiblePlan, plan_reversible
from revify.passes.record_calls import CallTrace, call_model, record_calls  # noqa: F401  (call_model: tests)
from revify.passes.rewrite_checkpoint import rewrite_checkpoint, share_structure
from revify.passes.rewrite_reversible import rewrite_reversible
from revify.plan import Plan
from revify.runtime.reversible_chain import stored_activations  # noqa: F401  (public)

STRATEGIES = ("checkpoint", "reversible")


class RevifyError(RuntimeError):
    """Conversion failed and ``strict=True`` was asked for."""


def analyse_model(model: nn.Module, example_inputs: Any, strategy: str) -> tuple[Plan, CallTrace | None, Any]:
    """Record, capture and find chains; the plan has no decisions yet (``plan.chains`` empty).

    Returns the plan, the call trace (None if the forward raised) and the chain analysis.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    plan = Plan(strategy=strategy)
    trace = record_calls(model, example_inputs)
    if trace.error is not None:
        plan.errors.append(f"the model's forward raised on the example inputs: {trace.error}")
        return plan, None, None
    plan.regions = capture_regions(model, trace)
    analysis = find_chains(model, trace)
    plan.rejections = list(analysis.rejections)
    return plan, trace, analysis


def _analyse(model: nn.Module, example_inputs: Any, strategy: str, options: ReversibleOptions | None,
             schedule: str = "sqrt(n)") -> tuple[Plan, CallTrace | None]:
    plan, trace, analysis = analyse_model(model, example_inputs, strategy)
    if analysis is None:
        return plan, trace
    if strategy == "checkpoint":
        plan.chains = [plan_checkpoint(c, schedule) for c in analysis.chains]
    else:
        for chain in analysis.chains:
            decided = plan_reversible(chain, options or ReversibleOptions())
            if isinstance(decided, ReversiblePlan):
                plan.reversible.append(decided)
            else:
                plan.rejections.append(decided)
    return plan, trace


def analyse(model: nn.Module, example_inputs: Any, strategy: str = "checkpoint", schedule: str = "sqrt(n)",
            **reversible_options: Any) -> Plan:
    """Run capture and the analyses; return the plan without converting."""
    options = ReversibleOptions(**reversible_options)
    options.validate()
    return _analyse(model, example_inputs, strategy, options, schedule)[0]


def inspect(model: nn.Module, example_inputs: Any, strategy: str = "checkpoint", *, file=None,
            schedule: str = "sqrt(n)", **reversible_options: Any) -> Plan:
    """Print the blocks and chains revify finds, and what it would do with each."""
    plan = analyse(model, example_inputs, strategy, schedule, **reversible_options)
    print(plan.summary(), file=file)
    return plan


def convert(model: nn.Module, plan: Plan, trace: CallTrace | None, example_inputs: Any, *,
            calibrate: bool = True, strict: bool = False) -> nn.Module:
    """Apply a plan: rewrite its reversible chains, then its checkpoint chains, on one copy.

    ``calibrate=False`` keeps the anchors already in the reversible plans (a
    recorded plan) instead of measuring them again. A rewrite failure leaves
    a module that behaves exactly like ``model`` with the reason in the plan
    (or raises ``RevifyError`` with ``strict``).
    """
    if strict and not plan.converted:
        raise RevifyError(plan.summary())
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    try:
        rmodel = share_structure(model)
        if plan.reversible:
            rmodel, chains, dropped = rewrite_reversible(model, plan.reversible, trace, rmodel)
            plan.rejections += dropped
            if calibrate:
                calibrate_reversible(model, rmodel, chains, plan.reversible, example_inputs)
        if plan.chains:
            rewrite_checkpoint(model, plan.chains, rmodel)
    except Exception as exc:  # a module revify cannot rewrite must not stop the user's training
        plan.errors.append(f"rewrite failed: {type(exc).__name__}: {exc}")
        plan.chains, plan.reversible = [], []
        for p, flag in requires_grad:  # undo freeze_backbone on the shared parameters
            p.requires_grad_(flag)
        if strict:
            raise RevifyError(plan.summary()) from exc
        rmodel = share_structure(model)
    if strict and not plan.converted:
        raise RevifyError(plan.summary())
    rmodel.revify_plan = plan
    return rmodel


def revify(model: nn.Module, example_inputs: Any, strategy: str = "checkpoint", *,
           schedule: str = "sqrt(n)", strict: bool = False, coupling: str = "meft1",
           lam: float | None = None, beta: float | None = None,
           adapter_rank: int = 8, adapter_init: str = "zero", freeze_backbone: bool = True,
           tolerance: float = 1e-4, stream_dtype: str | None = None,
           check_reconstruction: bool | None = None) -> nn.Module:
    """Return a module that trains with less activation memory.

    ``strategy="checkpoint"``: the same function, gradients bit-identical,
    blocks recomputed in backward (``schedule`` = ``"sqrt(n)"`` segments or
    ``"per-block"``). The result shares parameters and buffers with
    ``model`` and ``model`` itself is not modified.

    ``strategy="reversible"``: chains of blocks become two-stream reversible
    couplings (``coupling`` = meft1, meft2, meft3 or revnet) whose
    activations are reconstructed from outputs in backward. This changes the
    architecture: adapters are added, the output matches the original only
    approximately (the plan reports the measured error and its bound), and
    with ``freeze_backbone`` every pretrained parameter except the task head
    gets ``requires_grad=False`` — on the parameters shared with ``model``.
    Anchors are placed so the reconstruction error measured on
    ``example_inputs`` stays within ``tolerance`` (relative).
    ``check_reconstruction`` (or ``REVIFY_CHECK_RECONSTRUCTION=1``) compares
    every reconstruction against stored activations while training and raises
    ``ReconstructionError`` naming the block; it stores everything, so use it
    to debug only.

    If nothing can be converted, the result behaves exactly like ``model``
    and ``result.revify_plan`` says why; with ``strict=True`` that raises.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if check_reconstruction is None:
        check_reconstruction = os.environ.get("REVIFY_CHECK_RECONSTRUCTION", "") not in ("", "0")
    options = ReversibleOptions(coupling, lam, beta, adapter_rank, adapter_init, freeze_backbone,
                                tolerance, stream_dtype, check_reconstruction)
    options.validate()
    plan, trace = _analyse(model, example_inputs, strategy, options, schedule)
    return convert(model, plan, trace, example_inputs, strict=strict)
