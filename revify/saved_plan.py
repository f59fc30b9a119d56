"""A plan as JSON, and a recorded plan applied again to a freshly analysed model.

``revify.json`` records the decisions of a conversion (the chains by block
path, their checkpoint segments, their reversible couplings with the anchors
and errors measured at conversion), never Python objects. ``revify.load``
re-captures the architecture, analyses it on the recorded inputs, and matches
each recorded chain to a chain found now by its block paths; the decisions are
then applied without planning or calibrating again, so the loaded module is
the saved one. A recorded chain the analysis no longer finds (another
transformers version, another config) is an error naming it.

Before::

    {"strategy": "reversible", "reversible": [{"blocks": ["bert.encoder.layer.0", ...],
      "coupling": {"name": "meft1", "lam": 0.1, "beta": 1.0}, "steps": [[0], [1], [2]],
      "anchors": [2], "step_errors": [0.0, 3e-7, 0.0], ...}]}

After (``apply_recorded_plan``)::

    Plan(strategy="reversible", reversible=[ReversiblePlan(chain=Chain(blocks=(BlockInfo(...), ...)),
         coupling=Coupling("meft1", 0.1, 1.0, ...), steps=((0,), (1,), (2,)), anchors=(2,), ...)])
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from revify.passes.analysis.chain_types import Chain, ChainAnalysis
from revify.passes.planning.plan_checkpoint import ChainPlan, Segment
from revify.passes.planning.plan_reversible import COUPLINGS, ReversibleOptions, ReversiblePlan
from revify.passes.capture.record_calls import CallTrace
from revify.plan import STRATEGIES, Plan
from revify.runtime.couplings import Coupling

_OPTION_FIELDS = {f.name for f in dataclasses.fields(ReversibleOptions)}


class PlanMismatchError(ValueError):
    """A recorded plan does not fit the model analysed now; the message names the first mismatch."""


def _span(paths: tuple[str, ...] | list[str]) -> str:
    return f"{paths[0]} … {paths[-1]} ({len(paths)} blocks)" if paths else "(no blocks)"


# fields written and read explicitly; any other field of ChainPlan / ReversiblePlan that holds a
# number or a string (the budget planner's predictions) is carried over as is
_CHAIN_FIELDS = {"chain", "segments", "schedule"}
_REVERSIBLE_FIELDS = {"chain", "coupling", "steps", "options", "anchors", "step_errors", "start_error",
                      "start_bound", "output_error"}


def _extras(obj: Any, explicit: set[str]) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name not in explicit
            and isinstance(getattr(obj, f.name), (int, float, str, type(None)))}


def _known_extras(cls: type, d: dict, explicit: set[str]) -> dict:
    known = {f.name for f in dataclasses.fields(cls)} - explicit
    return {k: v for k, v in d.get("extra", {}).items() if k in known}


@dataclass(frozen=True)
class RecordedCheckpointChain:
    blocks: tuple[str, ...]
    segments: tuple[Segment, ...]
    schedule: str
    extra: tuple[tuple[str, Any], ...] = ()  # informational fields (predictions), by name


@dataclass(frozen=True)
class RecordedReversibleChain:
    blocks: tuple[str, ...]
    coupling: Coupling
    steps: tuple[tuple[int, ...], ...]
    options: ReversibleOptions
    anchors: tuple[int, ...]
    step_errors: tuple[float, ...]
    start_error: float | None
    start_bound: float | None
    output_error: float | None
    extra: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class RecordedPlan:
    strategy: str
    chains: tuple[RecordedCheckpointChain, ...]
    reversible: tuple[RecordedReversibleChain, ...]

    @classmethod
    def from_json(cls, d: dict) -> "RecordedPlan":
        """Parse and validate; malformed entries raise ``ValueError`` with the reason."""
        try:
            chains = tuple(RecordedCheckpointChain(tuple(c["blocks"]),
                                                   tuple(_segment_from_json(seg) for seg in c["segments"]),
                                                   str(c.get("schedule", "recorded")),
                                                   tuple(_known_extras(ChainPlan, c, _CHAIN_FIELDS).items()))
                           for c in d.get("chains", []))
            reversible = tuple(_reversible_from_json(r) for r in d.get("reversible", []))
            return cls(str(d["strategy"]), chains, reversible)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed plan entry ({type(exc).__name__}: {exc})") from None


def _op_lists(blocks: list) -> tuple[tuple[tuple[int, str], ...], ...]:
    return tuple(tuple((int(i), str(op)) for i, op in block) for block in blocks)


def _segment_from_json(seg: list) -> Segment:
    """``[start, end, policy]``; for ``save_ops`` per block ``[[index, op], …]`` kept, then (optional)
    per block those elided in recompute and the checksums of the op sequences they were planned on."""
    start, end, policy, *rest = seg
    saved = _op_lists(rest[0]) if rest else None
    elided = _op_lists(rest[1]) if len(rest) > 1 else None
    digests = tuple(int(d) for d in rest[2]) if len(rest) > 2 else None
    return Segment(int(start), int(end), str(policy), saved, elided, digests)


def _segment_to_json(s: Segment) -> list:
    entry: list = [s.start, s.end, s.policy]
    for lists in (s.saved_ops, s.elided_ops):
        if lists is not None:
            entry.append([[list(pair) for pair in block] for block in lists])
    if s.op_digests is not None:
        entry.append(list(s.op_digests))
    return entry


def _reversible_from_json(r: dict) -> RecordedReversibleChain:
    c = r["coupling"]
    base = COUPLINGS.get(c["name"])
    if base is None:
        raise ValueError(f"unknown coupling {c['name']!r}")
    unknown = set(r["options"]) - _OPTION_FIELDS
    if unknown:
        raise ValueError(f"unknown reversible option(s) {sorted(unknown)} (written by a newer revify?)")
    options = ReversibleOptions(**r["options"])
    options.validate()
    coupling = Coupling(base.name, float(c["lam"]), float(c["beta"]), base.switch, base.output)
    if not (0 < coupling.lam < math.inf and 0 < coupling.beta < math.inf):
        raise ValueError(f"coupling scalings must be positive and finite, got λ={coupling.lam}, β={coupling.beta}")
    steps = tuple(tuple(int(i) for i in s) for s in r["steps"])
    anchors = tuple(int(a) for a in r.get("anchors", ()))
    if any(not 0 <= a < len(steps) for a in anchors):
        raise ValueError(f"anchor outside the chain's {len(steps)} steps: {list(anchors)}")

    def opt(name: str) -> float | None:
        return None if r.get(name) is None else float(r[name])

    return RecordedReversibleChain(tuple(r["blocks"]), coupling, steps, options, anchors,
                                   tuple(float(e) for e in r.get("step_errors", ())),
                                   opt("start_error"), opt("start_bound"), opt("output_error"),
                                   tuple(_known_extras(ReversiblePlan, r, _REVERSIBLE_FIELDS).items()))


def _block_details(chain: Chain) -> list[dict]:
    return [{"path": b.path, "type": b.module_type, "engine": b.engine, "residual": b.residual,
             "sublayers": b.sublayers, "notes": list(b.legality.notes)} for b in chain.blocks]


def plan_to_json(plan: Plan, *, detail: bool = False) -> dict:
    """The decisions of ``plan`` as plain JSON data; ``detail`` adds what the analysis saw (for inspect)."""
    chains = []
    for cp in plan.chains:
        entry = {"parent": cp.chain.parent, "blocks": [b.path for b in cp.chain.blocks],
                 "module_type": cp.chain.blocks[0].module_type,
                 "segments": [_segment_to_json(s) for s in cp.segments], "schedule": cp.schedule,
                 "extra": _extras(cp, _CHAIN_FIELDS)}
        if detail:
            entry["block_info"] = _block_details(cp.chain)
        chains.append(entry)
    reversible = []
    for rp in plan.reversible:
        entry = {"parent": rp.chain.parent, "blocks": [b.path for b in rp.chain.blocks],
                 "module_type": rp.chain.blocks[0].module_type,
                 "coupling": {"name": rp.coupling.name, "lam": rp.coupling.lam, "beta": rp.coupling.beta},
                 "steps": [list(s) for s in rp.steps], "options": dataclasses.asdict(rp.options),
                 "anchors": list(rp.anchors), "step_errors": list(rp.step_errors),
                 "start_error": rp.start_error, "start_bound": rp.start_bound, "output_error": rp.output_error,
                 "extra": _extras(rp, _REVERSIBLE_FIELDS)}
        if detail:
            entry["block_info"] = _block_details(rp.chain)
        reversible.append(entry)
    out: dict[str, Any] = {"strategy": plan.strategy, "converted": plan.converted, "chains": chains,
                           "reversible": reversible,
                           "rejections": [{"where": r.where, "reason": r.reason} for r in plan.rejections],
                           "errors": list(plan.errors)}
    budget = getattr(plan, "budget", None)
    if budget is not None:  # the planner's summary, for the reader (not needed to load)
        out["budget"] = _extras(budget, set()) if dataclasses.is_dataclass(budget) else str(budget)
    if detail:
        out["regions"] = [{"path": r.path, "module_type": r.module_type, "engine": r.engine, "reason": r.reason,
                           "residual_adds": r.residual_adds} for r in plan.regions]
    return out


def _match(paths: tuple[str, ...], analysis: ChainAnalysis) -> Chain:
    """The chain found now with exactly these blocks (or a contiguous part of a longer one)."""
    for chain in analysis.chains:
        found = [b.path for b in chain.blocks]
        for i in range(len(found) - len(paths) + 1):
            if tuple(found[i:i + len(paths)]) == paths:
                if len(found) == len(paths):
                    return chain
                return Chain(chain.parent, chain.blocks[i:i + len(paths)])
    now = "; ".join(_span([b.path for b in c.blocks]) for c in analysis.chains) or "no chain"
    raise PlanMismatchError(f"recorded chain {_span(paths)} is not a chain of this model (analysis now finds: "
                            f"{now}); was it saved with another config or transformers version?")


def _check_indices(what: str, paths: tuple[str, ...], n: int, used: list[int]) -> None:
    if any(not 0 <= i < n for i in used):
        raise PlanMismatchError(f"recorded {what} of chain {_span(paths)} points outside its {n} blocks")


def apply_recorded_plan(recorded: RecordedPlan, model: nn.Module, example_inputs: Any,
                        analyse_model: Callable[[nn.Module, Any, str], tuple[Plan, CallTrace | None, Any]],
                        ) -> tuple[Plan, CallTrace]:
    """Analyse ``model`` on ``example_inputs`` and attach the recorded decisions to the chains found.

    ``analyse_model`` is ``revify.api.analyse_model``, passed by the loader: the plan format sits below
    the API (``save_pretrained``, installed at conversion, writes it). The result goes to
    ``revify.api.convert(..., calibrate=False)``.
    """
    # the analysis does not depend on the strategy; a plan may mix checkpoint and reversible chains
    plan, trace, analysis = analyse_model(model, example_inputs,
                                          recorded.strategy if recorded.strategy in STRATEGIES else "checkpoint")
    plan.strategy = recorded.strategy
    if analysis is None or trace is None:
        raise PlanMismatchError(plan.errors[0] if plan.errors else "the model could not be analysed")
    plan.found = analysis.found
    for rc in recorded.chains:
        chain = _match(rc.blocks, analysis)
        _check_indices("segment", rc.blocks, len(rc.blocks), [i for s in rc.segments for i in (s.start, s.end - 1)])
        extra = dict(rc.extra)
        stem = extra.get("stem")
        if stem is not None and (chain.stem is None or chain.stem.path != stem):
            found = f"finds {chain.stem.path!r}" if chain.stem is not None else "finds none"
            raise PlanMismatchError(f"recorded stem {stem!r} of chain {_span(rc.blocks)} does not feed it in this "
                                    f"model (analysis now {found})")
        try:
            plan.chains.append(ChainPlan(chain, rc.segments, rc.schedule, **extra))
        except ValueError as exc:
            raise PlanMismatchError(f"recorded chain {_span(rc.blocks)}: {exc}") from None
    for rr in recorded.reversible:
        chain = _match(rr.blocks, analysis)
        _check_indices("coupling step", rr.blocks, len(rr.blocks), [i for s in rr.steps for i in s])
        plan.reversible.append(ReversiblePlan(chain, rr.coupling, rr.steps, rr.options, anchors=rr.anchors,
                                              step_errors=list(rr.step_errors), start_error=rr.start_error,
                                              start_bound=rr.start_bound, output_error=rr.output_error,
                                              **dict(rr.extra)))
    return plan, trace
