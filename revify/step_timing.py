"""Paired step timing: is the converted model's training step slower or faster than the original's?

Timing two models one after the other misleads: the first runs cold (lazy
initialisation, allocator growth, caches), and a busy machine drifts between
the two runs. ``paired_step_times`` warms both models up, then times them in
alternating pairs (A B, B A, A B, …, so that a drift hits both alike) and
reports the median of the per-pair ratios with their spread: the sign test's
interval of the median ratio (at least 95% sure to hold it; with the default 7
pairs the smallest to the largest ratio, 98.4%). The spread of two identical
models misses 1.00 only if all their pairs' ratios land on one side of it
(probability 2^(1-n), 1.6% for 7 pairs), unless the machine is lopsided.

Before::

    model, rmodel, example_inputs, loss_fn

After::

    PairedTiming(before_s=0.214, after_s=0.262, ratio=1.22, low=1.17, high=1.31, pairs=7, warmup=2,
                 confidence=0.984)
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch

from revify.training_step import ExampleInputs, timed_step, zero_grads

PAIRS = 7  # default number of timed pairs: P(identical models' spread misses 1.00) = 2^(1-7)


@dataclass(frozen=True)
class PairedTiming:
    before_s: float  # median step time of the original
    after_s: float  # median step time of the converted model
    ratio: float  # median over pairs of after / before
    low: float  # the spread: an interval of the median ratio (sign test), ``confidence`` sure to hold it
    high: float
    pairs: int
    warmup: int
    confidence: float = 0.0

    def describe(self) -> str:
        return (f"step time: median of {self.pairs} alternating paired steps after {self.warmup} warm-up "
                f"step(s) each; ratio {self.ratio:.2f}x, spread {self.low:.2f}x-{self.high:.2f}x "
                f"({self.confidence:.0%} interval of the median ratio)")


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The narrowest order-statistic interval [v_(k), v_(n+1-k)] that holds the median with at least
    ``level`` probability (sign test; no assumption on the distribution), and its confidence.
    With 8 values or fewer no narrower interval reaches 95%: the smallest and largest value."""
    v, n = sorted(values), len(values)
    def confidence(k: int) -> float:  # P(v_(k) <= median <= v_(n+1-k)) = 1 - 2 P(Binomial(n, 1/2) < k)
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0 ** n
    k = 1
    while k + 1 <= (n + 1) // 2 and confidence(k + 1) >= level:
        k += 1
    return v[k - 1], v[n - k], confidence(k)


def alternating_pairs(time_a: Callable[[], float], time_b: Callable[[], float],
                      pairs: int) -> tuple[list[float], list[float]]:
    """Seconds of ``pairs`` steps of each: ``a`` first in even pairs, ``b`` first in odd ones, so neither
    always follows the other (a step after a slower one can find caches cold or the clock lower)."""
    times_a: list[float] = []
    times_b: list[float] = []
    for k in range(max(1, pairs)):
        if k % 2 == 0:
            times_a.append(time_a())
            times_b.append(time_b())
        else:
            times_b.append(time_b())
            times_a.append(time_a())
    return times_a, times_b


def paired_step_times(before: Callable[..., Any], after: Callable[..., Any], example_inputs: ExampleInputs,
                      loss_fn: Callable[[Any], torch.Tensor], *, pairs: int = PAIRS,
                      warmup: int = 2) -> PairedTiming:
    """Warm both models up, then time ``pairs`` alternating pairs of training steps (gradients reset)."""
    pairs = max(1, int(pairs))
    for _ in range(max(0, warmup)):
        timed_step(before, example_inputs, loss_fn)
        timed_step(after, example_inputs, loss_fn)
    times_b, times_a = alternating_pairs(lambda: timed_step(before, example_inputs, loss_fn),
                                         lambda: timed_step(after, example_inputs, loss_fn), pairs)
    ratios = [ta / tb if tb > 0 else 1.0 for ta, tb in zip(times_a, times_b)]
    zero_grads(before)
    zero_grads(after)
    low, high, confidence = median_interval(ratios)
    return PairedTiming(statistics.median(times_b), statistics.median(times_a), statistics.median(ratios),
                        low, high, pairs, max(0, warmup), confidence)
