"""Pass 9f: predicted recompute as a share of one forward of the whole model.

The solver prices a checkpoint segment in seconds measured on each block
alone (``profile_blocks``): the forward ops backward replays, plus the eager
overhead of running them under a checkpoint. A user asks a different
question: how much of a model forward does training run again? This pass
answers it in one unit that the plan, the report and the command line share:
milliseconds and percent of one forward of the whole model, measured in
training mode with gradients on (``revify.measure.measure_block_times``,
the fastest of a few forwards).

The share of a chain is the fraction of its blocks' (and stem's) profiled
forward that the plan replays, times the fraction of the model forward those
blocks take, both fractions measured in one run each. So a checkpoint plan,
which replays each block at most once, never reads above 100% of a model
forward, however noisy the timings; the checkpoint overhead is reported
beside it in milliseconds, since it is not forward work.

Before::

    ChainProfile(blocks=(BlockCost(forward_s=0.5 ms, checkpoint_overhead_s=2 ms, …) × 3), stem=…),
    segments (Segment(0, 1),), predicted recompute 2.9 ms

After::

    RecomputeShare(share=0.04, replayed_s=0.4 ms, overhead_s=2.0 ms)  # of a 9.3 ms model forward
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from .plan_checkpoint import Segment
from .profile_blocks import ChainProfile


@dataclass(frozen=True)
class ModelForward:
    """Fastest forward of the whole model, and of each chain block and stem, measured in one run."""

    total_s: float
    per_module: dict[str, float]


@dataclass(frozen=True)
class RecomputeShare:
    share: float  # replayed forward work / one forward of the whole model
    replayed_s: float  # share × the model forward, in seconds
    overhead_s: float  # eager checkpoint overhead beyond the replayed ops (not forward work)


def measure_model_forward(model: nn.Module, example_inputs: Any, profiles: Sequence[ChainProfile],
                          seconds: float = 0.5, most: int = 20) -> ModelForward:
    """One warm-up forward (the first runs cold), then the fastest of as many as fit in about ``seconds``
    (at least 3, at most ``most``): on a busy machine a forward preempted by another process runs
    milliseconds longer, which the fastest of many does not show, and a model of milliseconds needs many."""
    import time

    from revify.measure import measure_block_times

    paths = [b.path for p in profiles for b in p.chain.blocks] + [p.stem.path for p in profiles if p.stem]
    t0 = time.perf_counter()
    measure_block_times(model, example_inputs, paths, repeats=1)  # warm-up
    once = time.perf_counter() - t0
    repeats = max(3, min(most, int(seconds / max(once, 1e-6))))
    total, per_module = measure_block_times(model, example_inputs, paths, repeats=repeats, reduce=min)
    return ModelForward(total, per_module)


def segment_overhead_s(prof: ChainProfile, segments: Sequence[Segment]) -> float:
    """The measured checkpoint overhead the solver priced into these segments (``chain_costs``)."""
    total = 0.0
    for s in segments:
        for b in prof.blocks[s.start:s.end]:
            total += b.checkpoint_overhead_s if s.policy == "recompute" else b.selective_overhead_s
    return total


def recompute_share(prof: ChainProfile, recompute_s: float, overhead_s: float, forward: ModelForward) -> RecomputeShare:
    """The share of one model forward that ``recompute_s`` (predicted, overhead included) replays."""
    profiled = sum(b.forward_s for b in prof.blocks) + (prof.stem.forward_s if prof.stem else 0.0)
    measured = sum(forward.per_module.get(b.path, 0.0) for b in prof.chain.blocks)
    measured += forward.per_module.get(prof.stem.path, 0.0) if prof.stem else 0.0
    replayed = max(0.0, recompute_s - overhead_s)
    if profiled <= 0 or forward.total_s <= 0:
        return RecomputeShare(0.0, 0.0, overhead_s)
    share = replayed / profiled * measured / forward.total_s
    return RecomputeShare(share, share * forward.total_s, overhead_s)
