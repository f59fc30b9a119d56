"""Pass 3b: count the residual sub-layers ``x + f(x)`` in each region capture traced with fx.

Capture keeps the graph of every fx region and decides nothing about it; the count is an
analysis (``find_residual_sublayers``, by dominators), so it is made here. ``inspect``'s verbose
summary prints it per region, and the plan keeps the count, not the graph.

Before::

    Region("", "Stack", "fx", residual_adds=0, graph=<fx.Graph of 9 blocks>)

After::

    Region("", "Stack", "fx", residual_adds=9, graph=None)
"""
from __future__ import annotations

from dataclasses import replace

import torch.fx as fx

from revify.passes.analysis.find_residual_blocks import find_residual_sublayers
from revify.passes.capture.capture import Region


def _count(graph: fx.Graph) -> int:
    entry = next((n for n in graph.nodes if n.op == "placeholder"), None)
    return len(find_residual_sublayers(graph, entry)) if entry is not None else 0


def count_residual_adds(regions: list[Region]) -> list[Region]:
    """``regions`` with ``residual_adds`` counted from each fx region's graph, and the graph let go."""
    return [replace(r, residual_adds=_count(r.graph), graph=None) if r.graph is not None else r for r in regions]
