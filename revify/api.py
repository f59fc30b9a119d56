"""Public entry points: ``revify`` and ``inspect``.

The pipeline, in order: record_calls → capture → find_chains (residual
analysis and legality inside) → plan_checkpoint → rewrite_checkpoint.
"""
from __future__ import annotations

import math
from typing import Any

from torch import nn

from revify.passes.capture import capture_regions
from revify.passes.find_chains import find_chains
from revify.passes.plan_checkpoint import plan_checkpoint
from revify.passes.record_calls import call_model, record_calls
from revify.passes.rewrite_checkpoint import rewrite_checkpoint, share_structure
from revify.plan import Plan

STRATEGIES = ("checkpoint",)


class RevifyError(RuntimeError):
    """Conversion failed and ``strict=True`` was asked for."""


def analyse(model: nn.Module, example_inputs: Any, strategy: str = "checkpoint") -> Plan:
    """Run capture and the analyses; return the plan without converting."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    plan = Plan(strategy=strategy)
    trace = record_calls(model, example_inputs)
    if trace.error is not None:
        plan.errors.append(f"the model's forward raised on the example inputs: {trace.error}")
        return plan
    plan.regions = capture_regions(model, trace)
    analysis = find_chains(model, trace)
    plan.rejections = list(analysis.rejections)
    plan.chains = [plan_checkpoint(c) for c in analysis.chains]
    return plan


def inspect(model: nn.Module, example_inputs: Any, strategy: str = "checkpoint", *, file=None) -> Plan:
    """Print the blocks and chains revify finds, and what it would do with each."""
    plan = analyse(model, example_inputs, strategy)
    print(plan.summary(), file=file)
    return plan


def revify(model: nn.Module, example_inputs: Any, strategy: str = "checkpoint", *,
           strict: bool = False) -> nn.Module:
    """Return a module that trains with less activation memory.

    The result shares parameters and buffers with ``model`` and has the same
    call signature and outputs. ``model`` itself is not modified. If nothing
    can be converted, the result behaves exactly like ``model`` and
    ``result.revify_plan`` says why; with ``strict=True`` that raises instead.
    """
    plan = analyse(model, example_inputs, strategy)
    if strict and not plan.converted:
        raise RevifyError(plan.summary())
    try:
        rmodel, _ = rewrite_checkpoint(model, plan.chains)
    except Exception as exc:  # a module revify cannot rewrite must not stop the user's training
        plan.errors.append(f"rewrite failed: {type(exc).__name__}: {exc}")
        plan.chains = []
        if strict:
            raise RevifyError(plan.summary()) from exc
        rmodel = share_structure(model)
    rmodel.revify_plan = plan
    return rmodel
