"""From two measured steps and a converted model to a ``MemoryReport``, chain by chain.

The plan says which blocks each converted chain holds (``ConvertedChain``: a checkpoint
``ChainPlan`` or a ``ReversiblePlan``); the two ``StepMeasurement``s say what those blocks
saved before and after. Shared by the measured report (``revify.report``) and the fake-tensor
estimate (``revify.estimate``), which differ only in how they obtain the measurements.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from revify.measure import StepMeasurement
from revify.memory_report import BlockMemory, ChainReport, MemoryReport
from revify.passes.prediction.predict_memory import ChainLabel, predict_memory


def device_name(model: Any) -> str:
    """Where the model's parameters are, as the report prints it (``"cpu"`` for a model without any)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return str(p.device)
    return "cpu"


def _plan_summary(rmodel: Any) -> str:
    plan = getattr(rmodel, "revify_plan", None)
    if plan is None:
        return ""
    summary = getattr(plan, "summary", None)
    if callable(summary):
        return str(summary())
    return str(plan)


@dataclass(frozen=True)
class ConvertedChain:
    """A converted chain as the report sees it, from either kind of plan entry."""

    index: int
    kind: str  # "checkpoint" or "reversible"
    entry: Any  # ChainPlan or ReversiblePlan
    paths: tuple[str, ...]
    block_type: str

    def label(self) -> ChainLabel:
        return ChainLabel(f"chain {self.index}", self.paths, self.block_type)

    def recomputed(self) -> list[str]:
        """Modules whose forward backward runs again: the recomputed blocks, and a stem rebuilt with them."""
        if self.kind == "reversible":
            return list(self.paths)
        inside = {i for s in self.entry.segments for i in range(s.start, s.end)}
        stem = [self.entry.stem] if self.entry.stem else []  # rebuilt with the first segment
        return stem + [p for i, p in enumerate(self.paths) if i in inside]

    def layout(self) -> str:
        e = self.entry
        if self.kind == "checkpoint":
            segs = ", ".join(s.describe() for s in e.segments) or "none"
            kept = f"; blocks {e.kept_blocks} keep their activations" if e.kept_blocks else ""
            stem = f"; stem {e.stem} recomputed with the first segment" if e.stem else ""
            return f"segments [{segs}] ({e.schedule} schedule){kept}{stem}"
        anchors = list(e.anchors) or "none"
        return f"{e.coupling.name}, {len(e.steps)} coupling step(s), anchors at steps {anchors}"

    def strategy(self) -> str:
        return "checkpoint" if self.kind == "checkpoint" else f"reversible ({self.entry.coupling.name})"


def converted_chains(rmodel: Any) -> list[ConvertedChain]:
    plan = getattr(rmodel, "revify_plan", None)
    if plan is None:
        return []
    out = []
    for cp in getattr(plan, "chains", []):
        blocks = cp.chain.blocks
        out.append(ConvertedChain(len(out), "checkpoint", cp, tuple(b.path for b in blocks), blocks[0].module_type))
    for rp in getattr(plan, "reversible", []):
        blocks = rp.chain.blocks
        out.append(ConvertedChain(len(out), "reversible", rp, tuple(b.path for b in blocks), blocks[0].module_type))
    return out


def _pareto(rmodel: Any) -> tuple[list[tuple[int, int, float]], tuple[int, float] | None, str]:
    """The planner's front, its chosen point, and the unit of their recompute ("time" or "flops")."""
    plan = getattr(rmodel, "revify_plan", None)
    budget = getattr(plan, "budget", None)
    front = getattr(plan, "pareto", None) or getattr(budget, "pareto", None) or []
    unit = getattr(budget, "recompute_cost", "time") or "time"
    chosen = None
    if budget is not None and getattr(budget, "predicted_peak", None) is not None:
        field_name = "predicted_recompute_s" if unit == "time" else "predicted_recompute_flops"
        chosen = (int(budget.predicted_peak), float(getattr(budget, field_name, 0.0) or 0.0))
    return [(int(b), int(p), float(c)) for b, p, c in front], chosen, unit


def build_report(before: StepMeasurement, after: StepMeasurement, rmodel: Any, *, device: str,
                 estimated: bool, notes: list[str], predict: Callable[[], dict[str, Any]] | None,
                 eager_formulas: bool, forward: tuple[float, dict[str, float]] | None = None) -> MemoryReport:
    """Assemble a report from two measurements (real or fake) of the original and converted model."""
    chains = converted_chains(rmodel)
    rows, blocks = [], []
    for ch in chains:
        e = ch.entry
        saved_b = sum(before.saved_by_block.get(p, 0) for p in ch.paths)
        saved_a = sum(after.saved_by_block.get(p, 0) for p in ch.paths)
        blocks += [BlockMemory(p, ch.index, before.saved_by_block.get(p, 0), after.saved_by_block.get(p, 0))
                   for p in ch.paths]
        fwd = rec = frac = None
        if forward is not None:
            total, per_block = forward
            fwd = sum(per_block.get(p, 0.0) for p in ch.paths)
            rec = sum(per_block.get(p, 0.0) for p in ch.recomputed())
            frac = rec / total if total > 0 else None
        err = start = None
        if ch.kind == "reversible":
            err = max((s[2] for s in e.segments), default=None) if e.step_errors else None
            start = e.start_error
        rows.append(ChainReport(
            index=ch.index, strategy=ch.strategy(), blocks=len(ch.paths), block_type=ch.block_type,
            first=ch.paths[0], last=ch.paths[-1], layout=ch.layout(), saved_before=saved_b, saved_after=saved_a,
            planned_saved_bytes=getattr(e, "predicted_saved_bytes", None),
            planned_peak_bytes=getattr(e, "predicted_peak_bytes", None),
            planned_recompute_fraction=getattr(e, "recompute_fraction", None),
            forward_s=fwd, recompute_s=rec, recompute_fraction=frac, reconstruction_error=err, start_error=start,
            recompute_partial=ch.kind == "checkpoint" and any(s.policy != "recompute" for s in e.segments),
            recompute_stem=ch.kind == "checkpoint" and e.stem is not None))
    pareto, chosen, pareto_unit = _pareto(rmodel)
    rep = MemoryReport(before=before, after=after, plan_summary=_plan_summary(rmodel), notes=notes,
                       device=device, chains=rows, blocks=blocks, estimated=estimated,
                       forward_s=forward[0] if forward else None, pareto=pareto, chosen=chosen,
                       pareto_unit=pareto_unit, _predict=predict, _labels=[c.label() for c in chains])
    if predict is not None and eager_formulas:
        rep.formulas  # noqa: B018  (fits them now)
    return rep


def formula_predictor(model: Any, rmodel: Any, example_inputs: Any, loss_fn: Callable[[Any], torch.Tensor],
                      paths: list[str]) -> Callable[[], dict[str, Any]]:
    """A function fitting the before/after formulas (a failure is recorded, not raised)."""
    def predict() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for which, m in (("before", model), ("after", rmodel)):
            try:
                out[which] = predict_memory(m, example_inputs, loss_fn, paths)
            except Exception as exc:  # a model fake tensors cannot run still gets its measured report
                out[which] = None
                out[which + "_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return out
    return predict
