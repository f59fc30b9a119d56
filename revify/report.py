"""Before/after report of a revified model: measured figures, per chain, with predicted formulas.

``report(model, rmodel, example_inputs)`` runs the original and the revified
model on the user's example inputs and compares what was *measured* (see
:mod:`revify.measure`): bytes saved for backward (in total and per chain),
peak live tensor bytes by category, and step time. Nothing in those figures
is estimated from shapes, so they are honest for these inputs on this
device -- and only for them; the header says so.

On top of the measurements, the report carries *predictions*, labelled as
such: formulas in the batch size B and the sequence length (or image side)
S for the saved and peak bytes before and after conversion
(``report.formula()``, ``report.max_batch("24GiB", seq_len=...)``), fitted
exactly from runs of the same code on fake tensors
(:mod:`revify.passes.prediction.predict_memory`), and the budget planner's predictions
when the plan has them. ``report(..., device="meta")`` measures both models
on fake tensors only: for models too big to run (see :mod:`revify.estimate`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from revify.build_report import build_report, converted_chains, device_name, formula_predictor
from revify.device_step import autocast_forward
from revify.estimate import estimate_report
from revify.measure import ExampleInputs, measure_step
from revify.memory_report import BlockMemory, ChainReport, MemoryReport
from revify.passes.planning.recompute_share import measure_model_forward
from revify.step_timing import PAIRS, paired_step_times
from revify.training_step import default_loss_fn
from revify.units import format_bytes

__all__ = ["MemoryReport", "ChainReport", "BlockMemory", "report", "format_bytes", "default_loss_fn"]


def report(
    model: Callable[..., Any],
    rmodel: Callable[..., Any],
    example_inputs: ExampleInputs,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    repeats: int = PAIRS,
    device: str | None = None,
    formulas: bool | None = None,
    dtype: str = "fp32",
) -> MemoryReport:
    """Measure ``model`` (before) and ``rmodel`` (after) on ``example_inputs``.

    The step runs on the models' own device (move models and inputs first).
    ``dtype="bf16"`` or ``"fp16"`` runs each forward under ``torch.autocast``
    on that device (weights as they are; loss and backward outside autocast,
    as PyTorch's AMP recipe has it); ``"fp32"`` (default) uses no autocast.
    Step times: both models warmed up, then ``repeats`` alternating pairs of
    steps (``revify.step_timing``); the ratio is the median of the pairs'
    ratios, printed with its spread. ``device="meta"`` estimates instead, on fake tensors (nothing allocated,
    nothing timed): for models built on the meta device or too big to run.
    ``formulas``: None fits the B/S formulas on first use (``formula()``,
    ``max_batch()``, ``to_json()``), True now, False never.
    """
    fn = loss_fn if loss_fn is not None else default_loss_fn
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"dtype must be 'fp32', 'bf16' or 'fp16', got {dtype!r}")
    if device is not None:
        if device != "meta":
            raise ValueError(f"device must be None (measure) or 'meta' (estimate on fake tensors), got {device!r}")
        if dtype != "fp32":
            raise ValueError("dtype applies to measured reports; device='meta' estimates fp32 only")
        return estimate_report(model, rmodel, example_inputs, fn, formulas=formulas)
    if dtype != "fp32":
        on = device_name(model)
        with autocast_forward(model, on, dtype), autocast_forward(rmodel, on, dtype):
            return report(model, rmodel, example_inputs, fn, repeats=repeats, formulas=formulas)
    chains = converted_chains(rmodel)
    paths = [p for c in chains for p in c.paths]
    # memory of each (its step doubles as a first warm-up), then both timed in alternating pairs
    before = measure_step(model, example_inputs, fn, repeats=1, warmup=0, block_paths=paths)
    after = measure_step(rmodel, example_inputs, fn, repeats=1, warmup=0, block_paths=paths)
    timing = paired_step_times(model, rmodel, example_inputs, fn, pairs=repeats)
    before, after = replace(before, step_time_s=timing.before_s), replace(after, step_time_s=timing.after_s)
    forward = None
    if chains:  # the unit of recompute, measured as the planner measures it (passes/planning/recompute_share)
        measured = measure_model_forward(model, example_inputs, [p for c in chains for p in c.recomputed()] + paths)
        forward = (measured.total_s, measured.per_module)
    notes: list[str] = []
    if before.saved_bytes and after.saved_bytes > before.saved_bytes:
        notes.append("revified model saves MORE for backward than the original")
    predict = None if formulas is False else formula_predictor(model, rmodel, example_inputs, fn, paths)
    rep = build_report(before, after, rmodel, device=device_name(model), estimated=False, notes=notes,
                       predict=predict, eager_formulas=bool(formulas), forward=forward)
    rep.timing = timing
    return rep
