"""The plan: what revify found and decided, attached to every converted module.

``rmodel.revify_plan`` is a ``Plan``. It is the single place a user looks
to learn which regions were captured, which chains were converted and how,
and why everything else was left alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from revify.passes.capture import Region
from revify.passes.find_chains import Rejection
from revify.passes.plan_checkpoint import ChainPlan
from revify.passes.plan_reversible import ReversiblePlan


@dataclass
class Plan:
    strategy: str
    chains: list[ChainPlan] = field(default_factory=list)
    reversible: list[ReversiblePlan] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # why nothing was converted, if so

    @property
    def converted(self) -> bool:
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
        for i, cp in enumerate(self.chains):
            blocks = cp.chain.blocks
            lines.append(f"  chain {i}: {len(blocks)} × {blocks[0].module_type} in "
                         f"{cp.chain.parent or '<root>'} ({blocks[0].path} … {blocks[-1].path})")
            lines.append(f"    structure: {blocks[0].residual} [graph: {blocks[0].engine}]")
            segs = ", ".join(s.describe() for s in cp.segments)
            kept = f"; blocks {cp.kept_blocks} keep their activations" if cp.kept_blocks else ""
            lines.append(f"    checkpoint: {len(cp.segments)} segment(s) [{segs}] ({cp.schedule} schedule){kept}")
            for note in dict.fromkeys(n for b in blocks for n in b.legality.notes):
                lines.append(f"    note: {note}")
        for rp in self.reversible:
            lines += _reversible_lines(rp, len(self.chains) + self.reversible.index(rp))
        for rej in self.rejections:
            lines.append(f"  rejected {rej.where}: {rej.reason}")
        if not self.converted and not self.errors:
            lines.append("  no convertible chain of blocks found; module left unchanged")
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
                     f"tolerance {rp.options.tolerance:g} (measured on the example inputs)")
    else:
        lines.append("    anchors: not calibrated (no gradient reached the chain on the example inputs)")
    if rp.start_error is not None:
        bound = "function not preserved (trains from scratch)" if rp.start_bound is None \
            else f"bound from the scaling {rp.start_bound:.3g}"
        lines.append(f"    starting point: chain output differs from the original by {rp.start_error:.3g} "
                     f"relative ({bound})" + (f"; model output by {rp.output_error:.3g}"
                                              if rp.output_error is not None else ""))
    return lines
