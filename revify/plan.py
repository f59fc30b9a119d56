"""The plan: what revify found and decided, attached to every converted module.

``rmodel.revify_plan`` is a ``Plan``. It is the single place a user looks
to learn which regions were captured, which chains were converted and how,
and why everything else was left alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from revify.passes.capture import Region
from revify.passes.find_chains import Rejection
from revify.passes.plan_checkpoint import ChainPlan
from revify.passes.plan_reversible import ReversiblePlan
from revify.units import format_bytes, format_flops


@dataclass
class Plan:
    strategy: str
    chains: list[ChainPlan] = field(default_factory=list)
    reversible: list[ReversiblePlan] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # why nothing was converted, if so
    budget: Any = None  # the budget planner's BudgetPlan: budget, predicted peak, Pareto front
    notes: list[str] = field(default_factory=list)  # how the converted module fits the training stack (PEFT, ...)

    @property
    def converted(self) -> bool:
        """Whether the converted module differs from the original at all."""
        return bool(self.reversible) or any(cp.segments for cp in self.chains)

    @property
    def planned(self) -> bool:
        """Whether some chain was decided on (a budget may keep a chain's activations)."""
        return bool(self.chains or self.reversible)

    def summary(self) -> str:
        lines = [f"revify plan — strategy: {self.strategy}"]
        for e in self.errors:
            lines.append(f"  not converted: {e}")
        captured = [r for r in self.regions if r.engine != "eager"]
        eager = [r for r in self.regions if r.engine == "eager"]
        if self.regions:
            lines.append(f"  capture: {len(captured)} region(s) traced with fx, {len(eager)} left eager")
            for r in eager[:6]:
                lines.append(f"    eager {r.path or '<root>'} ({r.module_type}): {r.reason}")
            if len(eager) > 6:
                lines.append(f"    ... {len(eager) - 6} more eager region(s)")
            for r in captured:
                if r.residual_adds:
                    lines.append(f"    fx {r.path or '<root>'} ({r.module_type}): "
                                 f"{r.residual_adds} residual sub-layer(s) x + f(x) in its graph")
        if self.budget is not None:
            b = self.budget
            extra = f", {b.predicted_recompute_s / b.forward_s:.0%} of a forward" if b.forward_s else ""
            kind = "peak" if b.budget_for == "peak" else "activations kept for backward"
            unit, flops = b.recompute_cost, b.predicted_recompute_flops
            lines.append(f"  budget {format_bytes(b.budget)}: predicted {kind} {format_bytes(b.predicted_peak)}, "
                         f"recompute {b.predicted_recompute_s * 1e3:.1f} ms{extra}, {format_flops(flops)} "
                         f"(least {'time' if unit == 'time' else 'FLOPs'}; "
                         f"smallest feasible {format_bytes(b.smallest_budget)}; predicted from measured block "
                         "costs and one measured step)")
        for i, cp in enumerate(self.chains):
            blocks = cp.chain.blocks
            lines.append(f"  chain {i}: {len(blocks)} × {blocks[0].module_type} in "
                         f"{cp.chain.parent or '<root>'} ({blocks[0].path} … {blocks[-1].path})")
            lines.append(f"    structure: {blocks[0].residual} [graph: {blocks[0].engine}]")
            segs = ", ".join(s.describe() for s in cp.segments)
            kept = f"; blocks {cp.kept_blocks} keep their activations" if cp.kept_blocks else ""
            lines.append(f"    checkpoint: {len(cp.segments)} segment(s) [{segs}] ({cp.schedule} schedule){kept}")
            if cp.stem is not None:
                first = next(s for s in cp.segments if s.start == 0)
                lines.append(f"    stem: {cp.stem} is recomputed with segment {first.describe()} "
                             "instead of that segment keeping its input")
            if cp.predicted_saved_bytes is not None:
                lines.append(f"    predicted: keeps {format_bytes(cp.predicted_saved_bytes)} for backward, "
                             f"recomputes {cp.recompute_fraction:.0%} of its forward")
            for note in dict.fromkeys(n for b in blocks for n in b.legality.notes):
                lines.append(f"    note: {note}")
            groups = cp.chain.side_groups
            if len(set(groups)) > 1:
                lines.append(f"    note: blocks receive {len(set(groups))} different sets of side inputs "
                             f"(pattern {''.join(chr(ord('A') + g) for g in groups)}): each block runs with its "
                             "own; a segment of several blocks stays within one set")
        for rp in self.reversible:
            lines += _reversible_lines(rp, len(self.chains) + self.reversible.index(rp))
        for note in self.notes:
            lines.append(f"  note: {note}")
        for rej in self.rejections:
            lines.append(f"  rejected {rej.where}: {rej.reason}")
        if not self.planned and not self.errors:
            lines.append("  no convertible chain of blocks found; module left unchanged")
        elif not self.converted and not self.errors:
            lines.append("  every chain keeps its activations: the plan already fits; module left unchanged")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _reversible_lines(rp: ReversiblePlan, i: int) -> list[str]:
    blocks, c = rp.chain.blocks, rp.coupling
    lines = [f"  chain {i}: {len(blocks)} × {blocks[0].module_type} in {rp.chain.parent or '<root>'} "
             f"({blocks[0].path} … {blocks[-1].path})",
             f"    structure: {blocks[0].residual} [graph: {blocks[0].engine}]",
             f"    reversible: {c.name} (λ={c.lam:g}, β={c.beta:g}, {len(rp.steps)} coupling step(s)"
             + (f", adapters rank {rp.options.adapter_rank}, init {rp.options.adapter_init}"
                if c.name != "revnet" else ", no adapters") + ")"]
    if rp.step_errors:
        segs = ", ".join(f"{a}-{b - 1} (err {e:.1e})" for a, b, e in rp.segments)
        lines.append(f"    anchors at steps {list(rp.anchors) or 'none'}; reversible segments {segs}; "
                     f"tolerance {rp.options.tolerance:g} (measured on {rp.calibrated_on or 'the example inputs'}"
                     + (f", {rp.precision})" if rp.precision else ")"))
        if rp.gradient_error is not None:
            lines.append(f"    gradient error against stored activations {rp.gradient_error:.1e} with anchors "
                         f"for reconstruction error {rp.reconstruction_tolerance:g}")
    else:
        lines.append("    anchors: not calibrated (no gradient reached the chain on the example inputs)")
    for found in rp.anchor_sets.values():
        lines.append(f"    under {found.precision}: anchors at steps {list(found.anchors) or 'none'}, "
                     f"max reconstruction error {found.max_error:.1e} (calibrated on the {found.calibrated_on})")
    if rp.start_error is not None:
        bound = "function not preserved (trains from scratch)" if rp.start_bound is None \
            else f"bound from the scaling {rp.start_bound:.3g}"
        lines.append(f"    starting point: chain output differs from the original by {rp.start_error:.3g} "
                     f"relative ({bound})" + (f"; model output by {rp.output_error:.3g}"
                                              if rp.output_error is not None else ""))
    return lines
