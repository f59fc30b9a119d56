"""The plan: what revify found and decided, attached to every converted module.

``rmodel.revify_plan`` is a ``Plan``. It is the single place a user looks
to learn which regions were captured, which chains were converted and how,
and why everything else was left alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from revify.passes.capture.capture import Region
from revify.passes.analysis.chain_types import Rejection
from revify.passes.planning.plan_checkpoint import ChainPlan, Segment
from revify.passes.planning.plan_reversible import ReversiblePlan
from revify.units import format_bytes, format_flops

STRATEGIES = ("checkpoint", "reversible", "auto")  # what a Plan's ``strategy`` may be


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
    # (blocks, chains) the analyses found; the headline counts against them, since a chain may be converted
    # in part (T5: a reversible run of blocks 1… beside block 0, which runs unchanged). None: count the
    # blocks of the plans' own chains
    found: tuple[int, int] | None = None

    @property
    def converted(self) -> bool:
        """Whether the converted module differs from the original at all."""
        return bool(self.reversible) or any(cp.segments for cp in self.chains)

    @property
    def planned(self) -> bool:
        """Whether some chain was decided on (a budget may keep a chain's activations)."""
        return bool(self.chains or self.reversible)

    def summary(self, verbose: bool = False) -> str:
        """What was converted and what it saves, then each chain's schedule, then what was refused and why.

        ``verbose`` adds the capture details: which modules torch.fx traced,
        which it could not (with the exception it raised) and each block's
        residual structure. Recompute is in one unit throughout revify:
        milliseconds and percent of one forward of the whole model.
        """
        lines = [f"revify plan — strategy: {self.strategy}"]
        for e in self.errors:
            lines.append(f"  not converted: {_first_line(e)}")
        lines += self._result_lines()
        forward_s = getattr(self.budget, "forward_s", None)
        for i, cp in enumerate(self.chains):
            lines += _checkpoint_lines(cp, i, verbose, forward_s)
        for rp in self.reversible:
            lines += _reversible_lines(rp, len(self.chains) + self.reversible.index(rp), verbose, forward_s)
        for note in self.notes:
            lines.append(f"  note: {note}")
        for rej in self.rejections:
            lines.append(f"  refused {rej.where}: {_first_line(rej.reason)}")
        if self.regions:
            lines += self._capture_lines(verbose)
        return "\n".join(lines)

    def _result_lines(self) -> list[str]:
        n_chains = len(self.chains) + len(self.reversible)
        if not self.planned and not self.errors:
            return ["  converted: nothing — no convertible chain of blocks found; module left unchanged"]
        if not self.converted and not self.errors:
            lines = ["  converted: nothing — every chain keeps its activations (the plan already fits); "
                     "the module runs as the original"]
            b = self.budget
            if b is not None:  # say why: the step as it is fits the budget asked for
                kind = _bounded(b)
                lines.append(f"  fits (predicted): {kind} {format_bytes(b.predicted_peak)} without recompute, "
                             f"within the budget {format_bytes(b.budget)}")
            return lines
        if self.errors:
            return []
        kinds = []
        checkpointed = sum(len(cp.chain.blocks) - len(cp.kept_blocks) for cp in self.chains)
        if checkpointed:
            kinds.append(f"{checkpointed} block(s) checkpointed")
        if self.reversible:
            kinds.append(f"{sum(len(rp.chain.blocks) for rp in self.reversible)} block(s) made reversible")
        total = sum(len(e.chain.blocks) for e in [*self.chains, *self.reversible])
        if self.found is not None:
            total, n_chains = max(total, self.found[0]), max(n_chains, self.found[1])
        lines = [f"  converted: {' and '.join(kinds)}, of {total} in {n_chains} chain(s)"]
        b = self.budget
        if b is not None:
            kind = _bounded(b)
            kept = [e.predicted_saved_bytes for e in [*self.chains, *self.reversible]
                    if e.predicted_saved_bytes is not None]
            lines.append(f"  saves (predicted): {kind} {format_bytes(b.predicted_peak)} within the budget "
                         f"{format_bytes(b.budget)} (smallest feasible {format_bytes(b.smallest_budget)})"
                         + (f"; the chains keep {format_bytes(sum(kept))} for backward" if kept else ""))
            share = sum(e.recompute_fraction or 0.0 for e in [*self.chains, *self.reversible])
            overhead = sum(getattr(e, "predicted_overhead_s", None) or 0.0 for e in self.chains)
            unit = "least time" if b.recompute_cost == "time" else "least FLOPs"
            lines.append(f"  costs (predicted): {recompute_words(share, b.forward_s, overhead)}; "
                         f"{format_flops(b.predicted_recompute_flops)} ({unit})")
        else:
            lines.append("  saves: not predicted without the budget planner (revify.report measures it)")
        return lines

    def _capture_lines(self, verbose: bool) -> list[str]:
        captured = [r for r in self.regions if r.engine != "eager"]
        eager = [r for r in self.regions if r.engine == "eager"]
        lines = [f"  capture: {len(captured)} region(s) traced with fx, {len(eager)} run eagerly"
                 + ("" if verbose or not eager else " (verbose=True / --verbose lists why)")]
        if not verbose:
            return lines
        for r in eager:
            lines.append(f"    eager {r.path or '<root>'} ({r.module_type}): {_first_line(r.reason)}")
        for r in captured:
            if r.residual_adds:
                lines.append(f"    fx {r.path or '<root>'} ({r.module_type}): "
                             f"{r.residual_adds} residual sub-layer(s) x + f(x) in its graph")
        return lines

    def __str__(self) -> str:
        return self.summary()


def _bounded(budget: Any) -> str:
    """What a budget plan's figure bounds, in the words the summary uses."""
    return "step peak" if budget.budget_for == "peak" else "activations kept for backward"


def _first_line(text: str) -> str:
    """One line of a reason; exceptions from tracing can run to paragraphs."""
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def recompute_words(share: float, forward_s: float | None, overhead_s: float = 0.0) -> str:
    """Recompute in revify's one unit: percent and milliseconds of one forward of the whole model."""
    text = f"recompute {share:.0%} of one model forward"
    if forward_s:
        text += f" ({share * forward_s * 1e3:.1f} ms of {forward_s * 1e3:.1f} ms)"
    if overhead_s:
        text += f" + {overhead_s * 1e3:.1f} ms checkpoint overhead"
    return text


def _span(a: int, b: int) -> str:
    return f"block {a}" if a == b else f"blocks {a}-{b}"


def _segment_words(s: Segment) -> str:
    span = _span(s.start, s.end - 1)
    if s.policy == "recompute":
        return f"{span} recomputed in backward (only {'its' if s.end - s.start == 1 else 'their'} input kept)"
    if s.policy == "save_matmuls":
        return f"{span} recomputed except {'its' if s.end - s.start == 1 else 'their'} matmul outputs (kept)"
    kept = sum(len(ops) for ops in s.saved_ops or ())
    elided = sum(len(ops) for ops in s.elided_ops or ())
    return (f"{span} recomputed, keeping {kept} chosen op output(s)"
            + (f", {elided} op(s) skipped in the recompute" if elided else ""))


def _schedule_words(segments: tuple[Segment, ...]) -> list[str]:
    """Segments in words; a run of single-block segments of one plain policy is said once."""
    words: list[str] = []
    i = 0
    while i < len(segments):
        s, j = segments[i], i
        while (s.end - s.start == 1 and s.policy in ("recompute", "save_matmuls") and j + 1 < len(segments)
               and segments[j + 1].policy == s.policy and segments[j + 1].start == segments[j].end
               and segments[j + 1].end - segments[j + 1].start == 1):
            j += 1
        if j > i:
            what = "only its input kept" if s.policy == "recompute" else "its matmul outputs kept"
            words.append(f"blocks {s.start}-{segments[j].start} each recomputed alone in backward ({what})")
        else:
            words.append(_segment_words(s))
        i = j + 1
    return words


def _kept_words(kept: list[int]) -> str:
    runs: list[list[int]] = []
    for i in kept:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    verb = "keeps its" if len(kept) == 1 else "keep their"
    return ", ".join(_span(a, b) for a, b in runs) + f" {verb} activations"


def _checkpoint_lines(cp: ChainPlan, i: int, verbose: bool, forward_s: float | None) -> list[str]:
    blocks = cp.chain.blocks
    lines = [f"  chain {i}: {len(blocks)} × {blocks[0].module_type} in "
             f"{cp.chain.parent or '<root>'} ({blocks[0].path} … {blocks[-1].path})"]
    words = _schedule_words(cp.segments)
    if cp.kept_blocks:
        words.append(_kept_words(cp.kept_blocks))
    lines.append(f"    schedule ({cp.schedule}): " + "; ".join(words))
    if cp.stem is not None:
        first = next(s for s in cp.segments if s.start == 0)
        lines.append(f"    stem: {cp.stem} is recomputed with {_span(first.start, first.end - 1)} "
                     "instead of the chain keeping its input")
    if cp.predicted_saved_bytes is not None:
        share = cp.recompute_fraction or 0.0
        lines.append(f"    predicted: keeps {format_bytes(cp.predicted_saved_bytes)} for backward, "
                     f"{recompute_words(share, forward_s, cp.predicted_overhead_s or 0.0)}")
    if verbose:
        lines.append(f"    structure: {blocks[0].residual} [graph: {blocks[0].engine}]")
    for note in dict.fromkeys(n for b in blocks for n in b.legality.notes):
        lines.append(f"    note: {note}")
    groups = cp.chain.side_groups
    if len(set(groups)) > 1:  # alternating sliding/full attention: segments never mix two masks
        lines.append(f"    note: blocks receive {len(set(groups))} different sets of side inputs "
                     f"(pattern {''.join(chr(ord('A') + g) for g in groups)}): each block runs with its "
                     "own; a segment of several blocks stays within one set")
    return lines


def _reversible_lines(rp: ReversiblePlan, i: int, verbose: bool = False, forward_s: float | None = None) -> list[str]:
    blocks, c = rp.chain.blocks, rp.coupling
    lines = [f"  chain {i}: {len(blocks)} × {blocks[0].module_type} in {rp.chain.parent or '<root>'} "
             f"({blocks[0].path} … {blocks[-1].path})",
             f"    reversible: {c.name} (λ={c.lam:g}, β={c.beta:g}, {len(rp.steps)} coupling step(s)"
             + (f", adapters rank {rp.options.adapter_rank}, init {rp.options.adapter_init}"
                if c.name != "revnet" else ", no adapters") + ")"]
    if rp.predicted_saved_bytes is not None:
        lines.append(f"    predicted: keeps {format_bytes(rp.predicted_saved_bytes)} for backward, "
                     f"{recompute_words(rp.recompute_fraction or 0.0, forward_s)}")
    if verbose:
        lines.append(f"    structure: {blocks[0].residual} [graph: {blocks[0].engine}]")
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
