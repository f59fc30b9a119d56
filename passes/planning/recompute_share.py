"""Pass 9f: predicted recompute as a share of one forward of the whole model.

The solver prices a checkpoint segment in seconds measured on each block
alone (``profile_blocks``): the forward ops backward replays, plus the eager
overhead of running them under a checkpoint. A user asks a different
question: how much of a model forward does training run again? This pass
answers it in one unit that the plan, the report and the command line share:
milliseconds and percent of one forward of the whole model, measured in
training mode with gradients on, as the sum of the fastest times of its
parts (``measure_model_forward``).

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

from revify.forward_timing import timed_forward, timed_forwards

from revify.passes.planning.plan_checkpoint import Segment
from revify.passes.planning.profile_blocks import ChainProfile


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


def measure_model_forward(model: nn.Module, example_inputs: Any, paths: Sequence[str], seconds: float = 0.5,
                          most: int = 20) -> ModelForward:
    """The model forward as the sum of its parts' fastest times: each module in ``paths``, and the rest.

    One warm-up forward (the first runs cold), then as many as fit in about
    ``seconds`` (at least 3, at most ``most``), in the model's own mode with
    gradients on; RNG and buffers are left as they were. On a busy machine
    another process preempts a forward for milliseconds, and a long interval
    is preempted more often than a short one: the fastest whole forward of a
    few would still carry it while the fastest run of each block would not,
    and the blocks' share would swing with the machine's load. Taking the
    fastest time of each part, the rest of the forward included (the total
    less the modules, per run), compares like with like, and the modules'
    share of the total stays within 1.
    """
    paths = list(dict.fromkeys(paths))
    runs: list[dict[str, float]] = []
    with timed_forwards(model, paths) as durations:
        warm_s = timed_forward(model, example_inputs)  # warm-up: the first forward runs cold
        repeats = max(3, min(most, int(seconds / max(warm_s, 1e-6))))
        for _ in range(repeats):
            for calls in durations.values():
                calls.clear()
            total = timed_forward(model, example_inputs)
            current = {p: sum(calls) for p, calls in durations.items() if calls}
            runs.append({**current, "": max(0.0, total - sum(current.values()))})
    per_module = {p: min(r.get(p, 0.0) for r in runs) for p in paths}
    rest = min(r[""] for r in runs)
    return ModelForward(sum(per_module.values()) + rest, per_module)


def chain_paths(profiles: Sequence[ChainProfile]) -> list[str]:
    """The modules whose forward the recompute share is made of: every chain block, and each stem."""
    return [b.path for p in profiles for b in p.chain.blocks] + [p.stem.path for p in profiles if p.stem]


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
