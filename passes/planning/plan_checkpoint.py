"""Pass 6: choose checkpoint segments for each chain.

A *segment* ``[start, end)`` of a chain is run under one checkpoint: only
its input is kept for backward and its interior is recomputed once, when its
gradient is needed. Blocks outside every segment keep their activations.
This pass gives the two fixed schedules; ``plan_budget`` chooses segments
for a memory budget.

* ``sqrt(n)`` (Chen et al. 2016): round(sqrt(n)) near-equal segments, so
  about sqrt(n) boundary tensors are kept, for one extra forward.
* ``per-block``: every block its own segment. Also one extra forward, and
  for transformers (whose blocks keep 10-20x their input inside) less memory
  than sqrt(n): only each block's input is kept, and the backward peak holds
  one block's interior instead of sqrt(n) of them.

Before::

    Chain(blocks=[b0 … b11])

After (``sqrt(n)``)::

    ChainPlan(segments=(Segment(0, 4), Segment(4, 8), Segment(8, 12)), schedule="sqrt(n)")
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from revify.passes.analysis.chain_types import Chain

POLICIES = ("recompute", "save_matmuls", "save_ops")
SCHEDULES = ("sqrt(n)", "per-block", "budget")  # "budget": plan_budget


@dataclass(frozen=True)
class Segment:
    """Blocks ``[start, end)`` of a chain recomputed together in backward.

    ``policy="recompute"`` keeps only the segment's input; ``"save_matmuls"``
    also keeps the outputs of matrix multiplications inside it (selective
    checkpointing), so backward recomputes only the cheap ops between them;
    ``"save_ops"`` keeps the outputs of the ops the budget planner chose,
    listed per block in ``saved_ops`` as ``(index, op name)`` pairs (index:
    position among the ops of the block's forward). Its recompute skips the
    ops listed in ``elided_ops`` (same form), whose outputs nothing then
    needs (``passes/planning/save_ops_menu``), in each block whose forward runs the
    op sequence with the checksum in ``op_digests``.
    """

    start: int
    end: int
    policy: str = "recompute"
    saved_ops: tuple[tuple[tuple[int, str], ...], ...] | None = None
    elided_ops: tuple[tuple[tuple[int, str], ...], ...] | None = None
    op_digests: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"empty or negative segment [{self.start}, {self.end})")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown segment policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if (self.policy == "save_ops") != (self.saved_ops is not None):
            raise ValueError("saved_ops goes with policy 'save_ops', and only with it")
        if self.saved_ops is not None and len(self.saved_ops) != self.end - self.start:
            raise ValueError(f"segment [{self.start}, {self.end}) needs one list of saved ops per block, "
                             f"got {len(self.saved_ops)}")
        if self.elided_ops is not None and (self.saved_ops is None or len(self.elided_ops) != len(self.saved_ops)
                                            or self.op_digests is None
                                            or len(self.op_digests) != len(self.saved_ops)):
            raise ValueError("elided_ops needs saved_ops, one list per block, and one op digest per block")

    def describe(self) -> str:
        span = f"{self.start}" if self.end - self.start == 1 else f"{self.start}-{self.end - 1}"
        if self.policy == "save_ops":
            kept = sum(len(ops) for ops in self.saved_ops)
            elided = sum(len(ops) for ops in self.elided_ops or ())
            skipped = f", {elided} ops elided in recompute" if elided else ""
            return f"{span} (save_ops: {kept} op outputs kept{skipped})"
        return span if self.policy == "recompute" else f"{span} ({self.policy})"


@dataclass(frozen=True)
class ChainPlan:
    chain: Chain
    segments: tuple[Segment, ...]  # blocks in no segment keep their activations
    schedule: str = "sqrt(n)"  # how the segments were chosen
    # predictions of the budget planner (None for the fixed schedules)
    predicted_saved_bytes: int | None = None  # what the chain keeps for backward
    predicted_peak_bytes: int | None = None  # the step's peak
    predicted_recompute_s: float | None = None  # replayed forward plus checkpoint overhead
    recompute_fraction: float | None = None  # replayed forward / one forward of the whole model (recompute_share)
    predicted_overhead_s: float | None = None  # eager checkpoint overhead in predicted_recompute_s
    # path of the chain's stem (``find_stem``), recomputed with the segment that starts at block 0
    # instead of that segment keeping its input; None: the stem runs as written
    stem: str | None = None

    def __post_init__(self) -> None:
        if self.stem is not None and not any(s.start == 0 for s in self.segments):
            raise ValueError(f"stem {self.stem!r} needs a segment that starts at the chain's first block")

    @property
    def block_paths(self) -> list[str]:
        return [b.path for b in self.chain.blocks]

    @property
    def kept_blocks(self) -> list[int]:
        inside = {i for s in self.segments for i in range(s.start, s.end)}
        return [i for i in range(len(self.chain.blocks)) if i not in inside]


def sqrt_segments(n: int) -> tuple[Segment, ...]:
    """Split ``n`` blocks into round(sqrt(n)) contiguous, near-equal segments."""
    if n <= 0:
        return ()
    k = max(1, round(math.sqrt(n)))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return tuple(Segment(bounds[i], bounds[i + 1]) for i in range(k) if bounds[i] < bounds[i + 1])


def per_block_segments(n: int) -> tuple[Segment, ...]:
    return tuple(Segment(i, i + 1) for i in range(n))


def split_at_side_inputs(chain: Chain, segments: tuple[Segment, ...]) -> tuple[Segment, ...]:
    """Segments cut where the blocks' side inputs change (a head runs its segment with its own)."""
    groups = chain.side_groups
    out = []
    for seg in segments:
        start = seg.start
        for k in range(seg.start + 1, seg.end):
            if groups[k] != groups[k - 1]:
                out.append(Segment(start, k, seg.policy))
                start = k
        out.append(Segment(start, seg.end, seg.policy))
    return tuple(out)


def plan_checkpoint(chain: Chain, schedule: str = "sqrt(n)") -> ChainPlan:
    if chain.shared and schedule != "per-block":
        # one module, several blocks: its one installed forward checkpoints each call on its own
        return ChainPlan(chain, per_block_segments(len(chain.blocks)), "per-block")
    if schedule == "sqrt(n)":
        return ChainPlan(chain, split_at_side_inputs(chain, sqrt_segments(len(chain.blocks))), schedule)
    if schedule == "per-block":
        return ChainPlan(chain, per_block_segments(len(chain.blocks)), schedule)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
