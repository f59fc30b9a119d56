"""Queries on the call tree ``record_calls`` recorded: a call's subtree, its ancestors, what it mutates.

``CallTrace.calls`` lists calls in the order they started, each naming its parent's index, so a
parent always comes before its children. ``find_chains`` and ``find_stem`` both ask these
questions; they live here so that neither pass imports the other.
"""
from __future__ import annotations

from revify.passes.capture.record_calls import CallRecord, CallTrace


def subtree(trace: CallTrace, root: CallRecord) -> set[int]:
    """Indices of ``root`` and every call made inside it."""
    inside = {root.index}
    for c in trace.calls[root.index + 1:]:
        if c.parent in inside:
            inside.add(c.index)
    return inside


def ancestors(trace: CallTrace, rec: CallRecord) -> set[int]:
    """Indices of the calls ``rec`` ran inside."""
    out, parent = set(), rec.parent
    while parent is not None:
        out.add(parent)
        parent = trace.calls[parent].parent
    return out


def descendant_buffers(trace: CallTrace, rec: CallRecord) -> list[str]:
    """Qualified names of the buffers ``rec`` or any call inside it updated in forward."""
    inside = subtree(trace, rec)
    return [f"{c.path}.{b}" if c.path else b for c in trace.calls[rec.index:] if c.index in inside
            for b in c.mutated_buffers]
