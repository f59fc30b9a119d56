"""A recorded plan checked against the freshly analysed model before it is applied.

``saved_plan.apply_recorded_plan`` matches each recorded chain to a chain
found now, by block paths. The decisions attached to it come from
``revify.json``, which anyone can edit; some edits would train wrong
silently -- keeping the elided-op lists while emptying the kept ones makes
the recompute hand uninitialised tensors to ops that read them (NaN
gradients). This pass re-derives what may be elided and refuses any plan
that asks for more, naming the first inconsistency:

* segments: inside the chain, in order, not overlapping;
* ``save_ops`` segments that elide ops: where the recorded op-sequence
  checksum equals the one of the block profiled now (``profile_chains``, run
  only when some segment elides) and its dataflow is measured, the kept
  (index, op) pairs name ops the block runs and every elided op is one
  ``save_ops_menu.replay`` elides for the recorded kept set on that
  dataflow; where the checksum differs (loaded on another device, another
  transformers version) or the dataflow is not measurable, the segment
  elides nothing -- the runtime would not elide there either, and running
  every op is always correct;
* reversible chains: coupling scalings finite and non-zero, steps covering
  the blocks once and in order, anchors inside and increasing, recorded
  errors finite, options finite and valid.

Before::

    Plan(chains=[ChainPlan(..., segments=(Segment(0, 2, "save_ops", saved_ops=((), ()),
                                                  elided_ops=(((3, "aten.addmm.default"),), ...)),))])

After::

    PlanMismatchError("chain bert.encoder.layer.0 … (3 blocks), segment [0, 2), block bert.encoder.layer.0:
                       op 3 (aten.addmm.default) is elided but the recompute needs it ...")
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from torch import nn

from revify.passes.planning.plan_checkpoint import ChainPlan
from revify.passes.planning.save_ops_menu import replay
from revify.plan import Plan
from revify.runtime.checkpoint_policy import op_digest
from revify.saved_plan import PlanMismatchError


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _span(cp: Any) -> str:
    paths = [b.path for b in cp.chain.blocks]
    return f"chain {paths[0]} … ({len(paths)} blocks)"


def _check_segments(cp: ChainPlan) -> None:
    n = len(cp.chain.blocks)
    end = 0
    for s in cp.segments:
        if s.start < end or s.end > n:
            raise PlanMismatchError(f"{_span(cp)}: segment [{s.start}, {s.end}) overlaps another or lies outside "
                                    f"its {n} blocks")
        end = s.end


def _profile(model: nn.Module, cp: ChainPlan) -> Any:
    from revify.passes.planning.profile_blocks import profile_chains

    (prof,) = profile_chains(model, [cp.chain], repeats=1)
    return prof.blocks


def _check_save_ops(model: nn.Module, cp: ChainPlan, costs: list) -> ChainPlan:
    """Kept ops name ops the blocks run; elided ops are ones the measured dataflow lets the recompute skip.

    Returns ``cp``, or a copy whose segments elide nothing where a block runs another op sequence now
    (another device, another transformers version: the runtime would not elide there either) or has no
    measurable dataflow; every op then runs in recompute, which is always correct.
    """
    segments = list(cp.segments)
    for n, s in enumerate(cp.segments):
        if s.policy != "save_ops" or s.elided_ops is None:
            continue  # keeping any listed op is safe: an op whose name differs is recomputed, not trusted
        if costs[0] is None:
            costs[0] = _profile(model, cp)
        blocks = costs[0]
        for k in range(s.start, s.end):
            i = k - s.start
            block, path = blocks[k], cp.chain.blocks[k].path
            where = f"{_span(cp)}, segment [{s.start}, {s.end}), block {path}"
            if not s.elided_ops[i]:
                continue
            names = {o.index: o.name for o in block.ops}
            if s.op_digests[i] != op_digest(o.name for o in block.ops) or not block.dataflow:
                segments[n] = dataclasses.replace(s, elided_ops=None, op_digests=None)
                break
            for index, name in s.saved_ops[i]:
                if names.get(index) != name:
                    raise PlanMismatchError(f"{where}: kept op {index} ({name}) is not an op of this block "
                                            f"(it runs {names.get(index, 'no op')} there)")
            kept = frozenset(index for index, _ in s.saved_ops[i])
            allowed = {(o.index, o.name) for o in replay(block, kept, k == s.end - 1).elided}
            for index, name in s.elided_ops[i]:
                if (index, name) not in allowed:
                    raise PlanMismatchError(f"{where}: op {index} ({name}) is elided but the recompute needs it "
                                            "with the recorded kept ops (measured dataflow)")
    return dataclasses.replace(cp, segments=tuple(segments)) if segments != list(cp.segments) else cp


def _check_reversible(rp: Any) -> None:
    n = len(rp.chain.blocks)
    c = rp.coupling
    for name, v in (("λ", c.lam), ("β", c.beta)):
        if not (_finite(v) and v > 0):
            raise PlanMismatchError(f"{_span(rp)}: coupling {name} = {v} must be finite and positive")
    flat = [i for step in rp.steps for i in step]
    if flat != list(range(n)) or any(not step for step in rp.steps):
        raise PlanMismatchError(f"{_span(rp)}: coupling steps {[list(s) for s in rp.steps]} do not cover its "
                                f"{n} blocks once, in order")
    anchors = list(rp.anchors)
    if anchors != sorted(set(anchors)) or any(not 0 <= a < len(rp.steps) for a in anchors):
        raise PlanMismatchError(f"{_span(rp)}: anchors {anchors} must be increasing step indices")
    errors = list(rp.step_errors) + [e for e in (rp.start_error, rp.start_bound, rp.output_error) if e is not None]
    if not all(_finite(e) for e in errors):
        raise PlanMismatchError(f"{_span(rp)}: a recorded reconstruction error is not a finite number")
    o = rp.options
    for name in ("lam", "beta", "tolerance"):
        v = getattr(o, name, None)
        if v is not None and not (_finite(v) and v > 0):
            raise PlanMismatchError(f"{_span(rp)}: option {name} = {v} must be finite and positive")


def validate_plan(plan: Plan, model: nn.Module) -> None:
    """Raise ``PlanMismatchError`` at the first inconsistency of ``plan`` (from ``apply_recorded_plan``)
    with ``model`` as analysed and, for elided ops, profiled now. A chain whose blocks run another op
    sequence than a segment's elision was planned on is replaced in ``plan.chains`` by one eliding nothing."""
    for n, cp in enumerate(plan.chains):
        _check_segments(cp)
        plan.chains[n] = _check_save_ops(model, cp, [None])
    for rp in plan.reversible:
        _check_reversible(rp)


__all__ = ["validate_plan"]
