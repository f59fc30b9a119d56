"""Memory of models too big to run here: revify's pipeline and its measurements on fake tensors.

``estimate(build, example_inputs)`` builds the model under
``torch._subclasses.FakeTensorMode`` (or takes one built on the meta device,
or a real one), runs revify's own pipeline on it -- record the calls,
capture, find chains, plan, rewrite -- and observes one training step of
the original and of the converted model exactly as ``revify.report`` does
(saved-tensor hooks, the live-storage tracker, per-block attribution),
with fake tensors: every aten op computes the shapes, dtypes and aliasing it
would on the device and nothing is allocated. A Llama-2-7B-shaped model at
sequence length 4096 takes seconds and a few hundred MiB of RSS.

The figures are exact byte counts of the tensors this code creates with
the CPU kernels (fake CPU tensors decide, e.g., what scaled dot product
attention saves), not allocator figures: no fragmentation, no caching
allocator rounding, no CUDA workspace. What fake tensors cannot do:

* time anything (the report has no step times);
* calibrate reversible anchors (they need values): a reversible chain is
  estimated without anchors, each anchor would add one stored hidden state;
* follow data-dependent branches: transformers treats fake tensors as
  tracing and keeps attention masks it would skip for an all-ones mask.

Before::

    estimate(lambda: LlamaForCausalLM(config), {"input_ids": torch.empty(1, 4096, dtype=torch.long, device="meta")})

After::

    MemoryReport(estimated=True, before=StepMeasurement(saved_bytes=…, peak_by_category=…), after=…, chains=[…])
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from revify.measure import MemoryProfile, measure_training_memory
from revify.passes.prediction.fake_copy import fake_copy, fake_inputs, new_fake_mode
from revify.passes.prediction.fake_step import measure_fake_step
from revify.passes.prediction.fake_transformers import real_mask_path
from revify.passes.prediction.predict_memory import MemoryFormula, fit_memory
from revify.build_report import build_report, converted_chains, formula_predictor
from revify.memory_report import MemoryReport
from revify.training_step import default_loss_fn

__all__ = ["estimate", "estimate_report", "fit_scaled"]


def estimate(model: nn.Module | Callable[[], nn.Module], example_inputs: Any, strategy: str = "checkpoint",
             loss_fn: Callable[[Any], torch.Tensor] | None = None, *, schedule: str = "per-block",
             formulas: bool | None = None, device: str | torch.device | None = None,
             **reversible_options: Any) -> MemoryReport:
    """Convert and report on fake tensors: nothing is allocated, nothing is timed.

    ``model`` is a module (on the meta device, fake, or real: a fake copy is
    used) or a function that builds one (called under the fake mode, so a
    7B model costs no memory). ``example_inputs`` may be meta tensors.
    ``strategy`` is "checkpoint" (with a fixed ``schedule``: "per-block" or
    "sqrt(n)"; the budget planner needs measured times) or "reversible"
    (``reversible_options`` as for ``revify.revify``; anchors are not
    calibrated). ``device`` is the device whose kernels are faked (default:
    the model's, CPU for meta).
    """
    from revify import api

    if strategy == "checkpoint" and schedule not in ("per-block", "sqrt(n)"):
        raise ValueError(f"estimate: schedule must be 'per-block' or 'sqrt(n)' (the budget planner needs measured "
                         f"times), got {schedule!r}")
    if strategy not in ("checkpoint", "reversible"):
        raise ValueError(f"estimate: strategy must be 'checkpoint' or 'reversible', got {strategy!r}")
    mode = new_fake_mode()
    if isinstance(model, nn.Module):
        fmodel = fake_copy(model, mode, device)
    else:
        with mode:
            fmodel = model()
        if not isinstance(fmodel, nn.Module):
            raise TypeError(f"estimate: the builder returned {type(fmodel).__name__}, not an nn.Module")
    inputs = fake_inputs(example_inputs, mode, device)
    fn = loss_fn or default_loss_fn
    with torch.random.fork_rng(devices=[]), mode, real_mask_path(inputs):
        options = api._options(strategy, **reversible_options)
        resolved = api._resolve_schedule(strategy, schedule if strategy == "checkpoint" else None, None)
        plan, trace = api._analyse(fmodel, inputs, strategy, options, resolved)
    paths = [p for c in _chains_of_plan(plan) for p in c]
    # measured (and kept for the formulas) before converting: freeze_backbone changes what trains
    before = measure_fake_step(fmodel, inputs, fn, paths, mode)
    original = fake_copy(fmodel, mode) if plan.reversible and formulas is not False else fmodel
    _anchors_as_calibrated(plan)
    with torch.random.fork_rng(devices=[]), mode, real_mask_path(inputs):
        rmodel = api.convert(fmodel, plan, trace, inputs, calibrate=False)
    after = measure_fake_step(rmodel, inputs, fn, paths, mode)
    predict = None if formulas is False else formula_predictor(original, rmodel, inputs, fn, paths)
    return build_report(before, after, rmodel, device=str(_fake_device(fmodel)), estimated=True,
                        notes=_notes(plan), predict=predict, eager_formulas=bool(formulas))


def _anchors_as_calibrated(plan: Any) -> None:
    """Mark each reversible chain's anchors (none) as calibrated for the precision the blocks compute in.

    Otherwise the runtime would calibrate on the first step, which reads values (and stores every
    stream for that step): fake tensors have none, and the estimate is of the steps after it.
    """
    for rp in plan.reversible:
        if getattr(rp, "precision", "") is None:
            dtype = rp.chain.blocks[0].call.hidden_in_dtype or "torch.float32"
            rp.precision = dtype.removeprefix("torch.")


def _chains_of_plan(plan: Any) -> list[list[str]]:
    return ([[b.path for b in cp.chain.blocks] for cp in plan.chains]
            + [[b.path for b in rp.chain.blocks] for rp in plan.reversible])


def _fake_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _notes(plan: Any) -> list[str]:
    notes = []
    if plan.reversible:
        notes.append("reversible anchors are not calibrated on fake tensors: estimated without anchors "
                     "(each anchor stores one more hidden state)")
    if not plan.converted:
        notes.append("nothing was converted: " + (plan.errors[0] if plan.errors else "see the plan"))
    return notes


def estimate_report(model: nn.Module, rmodel: nn.Module, example_inputs: Any,
                    loss_fn: Callable[[Any], torch.Tensor], *, formulas: bool | None = None) -> MemoryReport:
    """``revify.report(..., device="meta")``: both models measured on fake copies (meta tensors become CPU)."""
    mode = new_fake_mode()
    fmodel, frmodel = fake_copy(model, mode), fake_copy(rmodel, mode)
    inputs = fake_inputs(example_inputs, mode)
    paths = [p for c in converted_chains(rmodel) for p in c.paths]
    before = measure_fake_step(fmodel, inputs, loss_fn, paths, mode)
    after = measure_fake_step(frmodel, inputs, loss_fn, paths, mode)
    predict = None if formulas is False else formula_predictor(fmodel, frmodel, inputs, loss_fn, paths)
    return build_report(before, after, rmodel, device=str(_fake_device(fmodel)), estimated=True, notes=[],
                        predict=predict, eager_formulas=bool(formulas))


def fit_scaled(build: Callable[[Mapping[str, int]], tuple[nn.Module, Any]], axes: Mapping[str, Sequence[int]], *,
               strategy: str = "checkpoint", schedule: str = "per-block",
               loss_fn: Callable[[Any], torch.Tensor] | None = None, guess: Mapping[str, int] | None = None,
               **revify_options: Any) -> dict[str, MemoryFormula]:
    """Formulas in configuration sizes, fitted on MEASURED steps (real tensors) of small configurations.

    ``build(sizes)`` returns ``(model, example_inputs)`` for one point of
    ``axes`` (e.g. a width multiplier and the sequence length of a family
    of configs whose largest member is too big to run). At each point the
    model is converted by ``revify.revify`` and one training step of the
    original and of the converted model is measured; the exact polynomials
    are fitted as ``predict_memory`` fits B and S. Evaluating them at the
    large configuration checks, or replaces, what ``estimate`` reports.
    Returns ``{"before": MemoryFormula, "after": MemoryFormula}``.
    """
    from revify.api import revify

    fn = loss_fn or default_loss_fn
    profiles: dict[tuple, tuple[MemoryProfile, MemoryProfile]] = {}

    def measured(values: Mapping[str, int]) -> tuple[MemoryProfile, MemoryProfile]:
        key = tuple(sorted(values.items()))
        if key not in profiles:
            model, inputs = build(dict(values))
            options = dict(revify_options, schedule=schedule) if strategy == "checkpoint" else revify_options
            rmodel = revify(model, inputs, strategy, **options)
            with torch.random.fork_rng(devices=[]):
                before = measure_training_memory(model, inputs, fn, record_series=True)
                after = measure_training_memory(rmodel, inputs, fn, record_series=True)
            profiles[key] = (before, after)
            del model, rmodel
        return profiles[key]

    return {which: fit_memory(lambda v, i=i: measured(v)[i], axes, guess=guess)
            for i, which in enumerate(("before", "after"))}
