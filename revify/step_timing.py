"""Paired step timing: is the converted model's training step slower or faster than the original's?

Timing two models one after the other misleads: the first runs cold (lazy
initialisation, allocator growth, caches), and a busy machine drifts between
the two runs. ``paired_step_times`` warms both models up, then times them in
alternating pairs (A B, B A, A B, …, so that a drift hits both alike) and
reports the median of the per-pair ratios with their spread (smallest and
largest). Of ``n`` pairs of identical models, all ratios land on one side of
1.00 with probability 2^(1-n) (1.6% for the default 7): so the printed spread
of two identical models contains 1.00 unless the machine is truly lopsided.

Before::

    model, rmodel, example_inputs, loss_fn

After::

    PairedTiming(before_s=0.214, after_s=0.262, ratio=1.22, low=1.17, high=1.31, pairs=7, warmup=2)
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch

from revify.measure import ExampleInputs, _timed_step, _zero_grads

PAIRS = 7  # default number of timed pairs: P(identical models' spread misses 1.00) = 2^(1-7)


@dataclass(frozen=True)
class PairedTiming:
    before_s: float  # median step time of the original
    after_s: float  # median step time of the converted model
    ratio: float  # median over pairs of after / before
    low: float  # smallest ratio of a pair
    high: float  # largest ratio of a pair
    pairs: int
    warmup: int

    def describe(self) -> str:
        return (f"step time: median of {self.pairs} alternating paired steps after {self.warmup} warm-up "
                f"step(s) each; ratio {self.ratio:.2f}x, spread {self.low:.2f}x-{self.high:.2f}x over the pairs")


def paired_step_times(before: Callable[..., Any], after: Callable[..., Any], example_inputs: ExampleInputs,
                      loss_fn: Callable[[Any], torch.Tensor], *, pairs: int = PAIRS,
                      warmup: int = 2) -> PairedTiming:
    """Warm both models up, then time ``pairs`` alternating pairs of training steps (gradients reset)."""
    pairs = max(1, int(pairs))
    for _ in range(max(0, warmup)):
        _timed_step(before, example_inputs, loss_fn)
        _timed_step(after, example_inputs, loss_fn)
    times_b, times_a, ratios = [], [], []
    for k in range(pairs):
        if k % 2 == 0:
            tb = _timed_step(before, example_inputs, loss_fn)
            ta = _timed_step(after, example_inputs, loss_fn)
        else:
            ta = _timed_step(after, example_inputs, loss_fn)
            tb = _timed_step(before, example_inputs, loss_fn)
        times_b.append(tb)
        times_a.append(ta)
        ratios.append(ta / tb if tb > 0 else 1.0)
    _zero_grads(before)
    _zero_grads(after)
    return PairedTiming(statistics.median(times_b), statistics.median(times_a), statistics.median(ratios),
                        min(ratios), max(ratios), pairs, max(0, warmup))
