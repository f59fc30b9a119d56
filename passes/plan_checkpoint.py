"""Pass 6: choose checkpoint segments for each chain (Chen et al. 2016).

A chain of n blocks is cut into round(sqrt(n)) segments of near-equal
length. Only each segment's input is kept for backward; a segment's interior
is recomputed once, when its gradient is needed. Saved activations drop from
n blocks' interiors to about sqrt(n) boundary tensors, for one extra forward.

Before::

    Chain(blocks=[b0 … b11])

After::

    ChainPlan(blocks=[b0 … b11], segments=[(0, 4), (4, 8), (8, 12)])
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .find_chains import Chain


@dataclass(frozen=True)
class ChainPlan:
    chain: Chain
    segments: tuple[tuple[int, int], ...]  # [start, end) block indices

    @property
    def block_paths(self) -> list[str]:
        return [b.path for b in self.chain.blocks]


def sqrt_segments(n: int) -> tuple[tuple[int, int], ...]:
    """Split ``n`` blocks into round(sqrt(n)) contiguous, near-equal segments."""
    if n <= 0:
        return ()
    k = max(1, round(math.sqrt(n)))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return tuple((bounds[i], bounds[i + 1]) for i in range(k) if bounds[i] < bounds[i + 1])


def plan_checkpoint(chain: Chain) -> ChainPlan:
    return ChainPlan(chain, sqrt_segments(len(chain.blocks)))
