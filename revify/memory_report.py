"""The report's figures and how they print: ``MemoryReport``, one ``ChainReport`` per chain.

A plain record of two measured (or fake-tensor) steps and what the plan predicted, with its
text (``str``), JSON (``to_json``) and figure (``plot``). Nothing here measures or converts;
``build_report`` fills it from the measurements and ``revify.report`` runs them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from revify.measure import StepMeasurement
from revify.step_timing import PairedTiming
from revify.storage_tracking import CATEGORIES
from revify.units import format_bytes, format_flops


def _format_time(s: float | None) -> str:
    if s is None:
        return "not timed"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def _ratio(after: float | None, before: float | None) -> float | None:
    if after is None or before is None:
        return None
    if before == 0:
        return None if after != 0 else 1.0
    return after / before


def _format_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}x"


@dataclass(frozen=True)
class ChainReport:
    """One converted chain: what was done, and what it keeps and costs."""

    index: int
    strategy: str  # "checkpoint" or "reversible (meft1)" ...
    blocks: int
    block_type: str
    first: str
    last: str
    layout: str  # segments (checkpoint) or coupling steps and anchors (reversible)
    saved_before: int  # measured: bytes first saved by the chain's blocks in the original
    saved_after: int  # measured, in the converted model
    predicted_saved_after: int | None = None  # fitted formula at the example sizes (fake tensors)
    planned_saved_bytes: int | None = None  # the budget planner's prediction
    planned_peak_bytes: int | None = None
    planned_recompute_fraction: float | None = None
    forward_s: float | None = None  # measured forward time of the chain's blocks in the original
    recompute_s: float | None = None  # measured forward time of the blocks backward recomputes
    recompute_fraction: float | None = None  # recompute_s / measured forward time of the whole model
    recompute_partial: bool = False  # save_matmuls segments recompute less than their blocks' forward
    recompute_stem: bool = False  # recompute_s includes the chain's stem, rebuilt with the first segment
    reconstruction_error: float | None = None  # reversible: largest measured error of a reconstructed input
    start_error: float | None = None  # reversible: chain output vs the original blocks (eval mode)

    @property
    def paths(self) -> str:
        return f"{self.first} … {self.last}"


@dataclass(frozen=True)
class BlockMemory:
    """Saved bytes of one block, measured before and after (a segment's head holds its segment's)."""

    path: str
    chain: int
    saved_before: int
    saved_after: int


@dataclass
class MemoryReport:
    """Before/after figures of one training step; measured unless ``estimated`` (fake tensors)."""

    before: StepMeasurement
    after: StepMeasurement
    plan_summary: str = ""
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    chains: list[ChainReport] = field(default_factory=list)
    blocks: list[BlockMemory] = field(default_factory=list)
    estimated: bool = False  # figures from fake tensors (nothing allocated), not measured
    forward_s: float | None = None  # measured forward time of the original model
    pareto: list[tuple[int, int, float]] = field(default_factory=list)  # planner: (budget, peak, recompute)
    chosen: tuple[int, float] | None = None  # planner: (predicted peak, recompute) of the plan applied
    pareto_unit: str = "time"  # the recompute of ``pareto`` and ``chosen``: "time" (seconds) or "flops"
    timing: PairedTiming | None = None  # the paired step timing behind step_time_s and the time ratio
    _formulas: dict[str, Any] | None = field(default=None, repr=False)
    _predict: Callable[[], dict[str, Any]] | None = field(default=None, repr=False)
    _labels: list[Any] = field(default_factory=list, repr=False)

    # --- figures -----------------------------------------------------------------------------------
    def ratios(self) -> dict[str, float | None]:
        """after/before ratios (None where before is 0 and after is not, or a figure is missing)."""
        return {
            "saved": _ratio(self.after.saved_bytes, self.before.saved_bytes),
            "peak": _ratio(self.after.peak_bytes, self.before.peak_bytes),
            "time": self.timing.ratio if self.timing is not None
            else _ratio(self.after.step_time_s, self.before.step_time_s),
        }

    @property
    def formulas(self) -> dict[str, Any]:
        """``{"before": MemoryFormula, "after": MemoryFormula}``, fitted on first use (predictions)."""
        if self._formulas is None:
            if self._predict is None:
                raise RuntimeError("this report was made with formulas=False; call revify.report(..., formulas=True)")
            self._formulas = self._predict()
            after = self._formulas.get("after")
            if after is not None:  # each chain's share of the formula at the example sizes
                by_block = after.evaluate()["saved_by_block"]
                self.chains = [replace(c, predicted_saved_after=sum(
                    by_block.get(b.path, 0) for b in self.blocks if b.chain == c.index)) for c in self.chains]
        return self._formulas

    def formula(self, file: Any = None) -> None:
        """Print the predicted memory formulas (sympy expressions in B and S), before and after."""
        print("\n".join(self._formula_lines()), file=file)

    def _recompute(self, cost: float) -> str:
        return f"{cost * 1e3:.1f} ms" if self.pareto_unit == "time" else format_flops(cost)

    def _formula_lines(self) -> list[str]:
        formulas = self.formulas
        lines = []
        for which in ("before", "after"):
            f = formulas.get(which)
            if f is None:
                lines.append(f"{which}: no formula ({formulas.get(which + '_error', 'not computed')})")
                continue
            sizes = ", ".join(f"{s} = {f.meanings.get(s, s)}" for s in f.symbols) or "no size varies"
            lines.append(f"{which} (bytes; {sizes}; PREDICTED: fitted exactly on {len(f.fit_points)} fake-tensor "
                         "steps of this code):")
            lines += ["  " + ln for ln in f.describe(self._labels)]
            lines += [f"  {k} {v}" for k, v in f.held.items()]
            lines += [f"  note: {n}" for n in f.notes]
        return lines

    def max_batch(self, memory: int | float | str, seq_len: int | None = None, which: str = "after") -> int:
        """Largest batch whose predicted step (parameters + gradients + peak activations and temporaries;
        no optimizer state) fits in ``memory`` (bytes or e.g. ``"24GiB"``), at ``seq_len`` (or image side)."""
        if which not in ("before", "after"):
            raise ValueError(f"which must be 'before' or 'after', got {which!r}")
        f = self.formulas.get(which)
        if f is None:
            raise RuntimeError(f"no {which} formula: {self.formulas.get(which + '_error')}")
        return f.max_batch(memory, seq_len)

    # --- output --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every figure of the report (formulas fitted now if they were not yet)."""
        out: dict[str, Any] = {
            "before": asdict(self.before),
            "after": asdict(self.after),
            "ratios": self.ratios(),
            "plan_summary": self.plan_summary,
            "notes": list(self.notes),
            "device": self.device,
            "estimated": self.estimated,
            "forward_s": self.forward_s,
            "chains": [asdict(c) for c in self.chains],
            "blocks": [asdict(b) for b in self.blocks],
            "pareto": [list(p) for p in self.pareto], "pareto_unit": self.pareto_unit,
            "chosen": list(self.chosen) if self.chosen else None,
            "timing": asdict(self.timing) if self.timing is not None else None,
        }
        if self._formulas is not None or self._predict is not None:
            out["formulas"] = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in self.formulas.items()}
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        r = self.ratios()
        b, a = self.before, self.after
        rows = [
            ("", "before", "after", "ratio"),
            ("saved for backward", format_bytes(b.saved_bytes), format_bytes(a.saved_bytes), _format_ratio(r["saved"])),
            ("peak live tensors", format_bytes(b.peak_bytes), format_bytes(a.peak_bytes), _format_ratio(r["peak"])),
        ]
        if b.peak_by_category and a.peak_by_category:
            for c in CATEGORIES:
                rows.append((f"  {c} at peak", format_bytes(b.peak_by_category.get(c, 0)),
                             format_bytes(a.peak_by_category.get(c, 0)), ""))
        if b.param_bytes or a.param_bytes:
            rows.append(("parameters + buffers", format_bytes(b.param_bytes), format_bytes(a.param_bytes), ""))
        rows.append(("step time", _format_time(b.step_time_s), _format_time(a.step_time_s), _format_ratio(r["time"])))
        w0 = max(len(row[0]) for row in rows)
        wc = [max(len(row[i]) for row in rows) for i in (1, 2, 3)]
        where = self.device.upper() if self.device == "cpu" else self.device
        if self.estimated:
            header = (f"revify report -- figures ESTIMATED on fake tensors with the {where} kernels (nothing "
                      "allocated; exact bytes of the tensors this code creates; not timed)")
        else:
            header = (f"revify report -- figures MEASURED on the example inputs on {where} "
                      "(one forward+backward step; not estimates)")
        lines = [header]
        for row in rows:
            lines.append(f"  {row[0]:<{w0}}  {row[1]:>{wc[0]}}  {row[2]:>{wc[1]}}  {row[3]:>{wc[2]}}")
        lines.append(f"  (saved tensors: {b.saved_tensors} -> {a.saved_tensors})")
        if self.timing is not None:
            lines.append(f"  ({self.timing.describe()})")
        lines += self._chain_lines()
        if self._formulas is not None:
            lines.append("memory formulas:")
            lines += ["  " + ln for ln in self._formula_lines()]
        elif self._predict is not None:
            lines.append("memory formulas: report.formula() prints them (fitted on demand from fake-tensor steps)")
        if self.pareto:
            what = "recompute ms, checkpoint overhead included" if self.pareto_unit == "time" else "recompute FLOPs"
            lines.append(f"planner Pareto front (PREDICTED): budget -> peak, {what}")
            for budget, peak, cost in self.pareto:
                lines.append(f"  {format_bytes(budget):>10} -> {format_bytes(peak):>10}, {self._recompute(cost)}")
        if self.plan_summary:
            lines.append("plan:")
            lines.extend("  " + ln for ln in self.plan_summary.splitlines())
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def _chain_lines(self) -> list[str]:
        lines = []
        for c in self.chains:
            lines.append(f"chain {c.index}: {c.blocks} × {c.block_type} ({c.paths}) -- {c.strategy}: {c.layout}")
            saved = (f"  saved for backward {format_bytes(c.saved_before)} -> {format_bytes(c.saved_after)} "
                     f"{'estimated' if self.estimated else 'measured'}")
            predicted = []
            if c.predicted_saved_after is not None:
                predicted.append(f"formula {format_bytes(c.predicted_saved_after)}")
            if c.planned_saved_bytes is not None:
                predicted.append(f"planner {format_bytes(c.planned_saved_bytes)}")
            lines.append(saved + (f" (predicted: {', '.join(predicted)})" if predicted else ""))
            if c.recompute_s is not None and c.recompute_fraction is not None:
                planned = (f"; planner predicted {c.planned_recompute_fraction:.0%}"
                           if c.planned_recompute_fraction is not None else "")
                bound = "at most " if c.recompute_partial else ""
                total = f" of {self.forward_s * 1e3:.1f} ms" if self.forward_s else ""
                lines.append(f"  recompute: {bound}{c.recompute_fraction:.0%} of one model forward "
                             f"({bound}{c.recompute_s * 1e3:.1f} ms{total}, measured forward of the recomputed "
                             f"blocks{' and stem' if c.recompute_stem else ''}){planned}")
            if c.reconstruction_error is not None or c.start_error is not None:
                parts = []
                if c.reconstruction_error is not None:
                    parts.append(f"largest reconstruction error {c.reconstruction_error:.2e}")
                if c.start_error is not None:
                    parts.append(f"starting point off by {c.start_error:.3g}")
                lines.append(f"  reversible: {', '.join(parts)} (relative, measured at conversion)")
        outside_b = self.before.saved_by_block.get("")
        outside_a = self.after.saved_by_block.get("")
        if self.chains and outside_b is not None and outside_a is not None:
            lines.append(f"outside the chains: saved {format_bytes(outside_b)} -> {format_bytes(outside_a)}")
        return lines

    def plot(self, path: str) -> str:
        """Write a figure: saved bytes per block before/after, peak by category, and the planner's
        predicted Pareto curve when the plan has one. Needs matplotlib (``pip install 'revify[plot]'``)."""
        try:
            import matplotlib
        except ImportError:
            raise ImportError("report.plot needs matplotlib: pip install 'revify[plot]'") from None
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        panels = 3 if self.pareto else 2
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
        largest = max(self.before.param_bytes + self.before.peak_bytes, self.after.param_bytes + self.after.peak_bytes)
        unit, scale = next((u, 2 ** e) for u, e in (("GiB", 30), ("MiB", 20), ("KiB", 10), ("B", 0))
                         if largest >= 2 ** e or e == 0)
        ax = axes[0]
        labels = [b.path.split(".")[-1] if b.path.split(".")[-1].isdigit() else b.path for b in self.blocks]
        x = range(len(self.blocks))
        ax.bar([i - 0.2 for i in x], [b.saved_before / scale for b in self.blocks], 0.4, label="before")
        ax.bar([i + 0.2 for i in x], [b.saved_after / scale for b in self.blocks], 0.4, label="after")
        ax.set_xticks(list(x), labels, rotation=90 if len(labels) > 16 else 0, fontsize=7)
        ax.set_xlabel("block (by chain)")
        ax.set_ylabel(unit)
        ax.set_title("saved for backward, per block" + (" (estimated)" if self.estimated else " (measured)"))
        ax.legend()
        ax = axes[1]
        names = ["parameters"] + list(CATEGORIES)  # parameters include buffers
        bottom = [0.0, 0.0]
        for name in names:
            vals = [m.param_bytes / scale if name == "parameters" else m.peak_by_category.get(name, 0) / scale
                    for m in (self.before, self.after)]
            ax.bar(["before", "after"], vals, bottom=bottom, label=name)
            bottom = [s + v for s, v in zip(bottom, vals)]
        ax.set_ylabel(unit)
        ax.set_title("memory at the step's peak, by category")
        ax.legend(fontsize=8)
        if self.pareto:
            ax = axes[2]
            # milliseconds, or GFLOP when the planner minimised FLOPs (its front is FLOP-optimal)
            per, axis = (1e3, "time (ms)") if self.pareto_unit == "time" else (1e-9, "GFLOP")
            pts = sorted((cost, peak / scale) for _, peak, cost in self.pareto)
            ax.plot([p[0] * per for p in pts], [p[1] for p in pts], "o-", label="planner front (predicted)")
            if self.chosen is not None:
                ax.plot([self.chosen[1] * per], [self.chosen[0] / scale], "r*", markersize=12, label="this plan")
            ax.set_xlabel(f"predicted recompute {axis}")
            ax.set_ylabel(f"predicted peak ({unit})")
            ax.set_title("memory / recompute trade-off")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
