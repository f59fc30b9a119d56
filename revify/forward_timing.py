"""Forward times of a model and of its blocks, with RNG and buffers left as they were.

Recomputation repeats forward work: a block recomputed in backward costs about its forward time
again. ``timed_forwards`` hooks the modules asked for and records every forward of each;
``measure_block_times`` (medians) and the planner's ``measure_model_forward`` (fastest parts,
``passes/planning/recompute_share``) are both built on it, so they time a block the same way.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Iterator, Sequence

import torch

from revify.training_step import ExampleInputs, run_model, sync


@contextlib.contextmanager
def timed_forwards(model: torch.nn.Module, paths: Sequence[str]) -> Iterator[dict[str, list[float]]]:
    """Seconds of each forward of each module in ``paths`` while inside, appended per call.

    A CUDA forward is timed once its kernels ran. Inside, the RNG is forked and on exit the
    buffers (BatchNorm statistics) are restored: timing a model must not change what it trains.
    """
    durations: dict[str, list[float]] = {p: [] for p in paths}
    starts: dict[str, float] = {}

    def pre(m, a, p):
        starts[p] = time.perf_counter()

    def post(m, a, o, p):
        sync(model)
        durations[p].append(time.perf_counter() - starts.pop(p, time.perf_counter()))

    handles = []
    for p in dict.fromkeys(paths):
        module = model.get_submodule(p)
        handles.append(module.register_forward_pre_hook(lambda m, a, p=p: pre(m, a, p)))
        handles.append(module.register_forward_hook(lambda m, a, o, p=p: post(m, a, o, p)))
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=[]):
            yield durations
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)


def timed_forward(model: torch.nn.Module, example_inputs: ExampleInputs) -> float:
    """Seconds of one forward of ``model``, CUDA kernels included."""
    sync(model)
    t0 = time.perf_counter()
    out = run_model(model, example_inputs)
    sync(model)
    dt = time.perf_counter() - t0
    del out
    return dt


def measure_block_times(
    model: torch.nn.Module,
    example_inputs: ExampleInputs,
    block_paths: Sequence[str],
    *,
    repeats: int = 3,
) -> tuple[float, dict[str, float]]:
    """Median forward time of the whole model and of each block, in training mode with grad on.

    This is what recomputation repeats: a block recomputed in backward costs
    about its forward time again. The RNG and the buffers (BatchNorm
    statistics) are left as they were.
    """
    with timed_forwards(model, block_paths) as durations:
        totals = [timed_forward(model, example_inputs) for _ in range(max(1, repeats))]
    return statistics.median(totals), {p: statistics.median(v) if v else 0.0 for p, v in durations.items()}
