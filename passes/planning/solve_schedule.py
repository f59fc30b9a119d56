"""Pass 9e: the exact dynamic program behind the budget planner.

Knows nothing about torch or modules: it sees a path of positions
``0 … length`` and *options*, each covering ``[start, end)``. Choosing an
option adds ``keep`` bytes to the *state* (bytes kept for backward by
everything chosen so far) and needs ``state + need ≤ budget`` at its start
(``need`` folds in its forward and backward peaks, which ``plan_budget``
works out). A path must end with ``state + final_need ≤ budget``. Among the
paths that fit, the solver returns one of least total ``cost`` (recompute
seconds or FLOPs); among those, one of least predicted peak.

This is the chain form of optimal checkpointing (Rotor, Beaumont et al.;
Revolve for uniform chains) restricted to one level of recomputation, which
is what the runtime executes: every block is kept, in a recomputed segment,
or in a selectively recomputed segment. States are bytes rounded up to a unit
of the problem's largest possible peak / ``resolution`` (pseudo-polynomial,
as Rotor's slots), so a schedule the solver accepts always fits the
unrounded budget; with ``resolution`` at least that peak in bytes it is
exact.

Before::

    Problem(length=3, options=(Option(0, 1, keep=10, need=40, cost=0), Option(0, 2, keep=2, need=70, cost=2), …))

After::

    Solution(options=(Option(0, 2, …), Option(2, 3, …)), cost=2.0, peak=74)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Option:
    start: int
    end: int
    keep: int  # bytes added to the state from the start of this option until backward passes it
    need: int  # peak bytes above the state at its start, in forward or backward
    cost: float  # what the solver minimises: recompute seconds, or FLOPs (``chain_costs.Pricing``)
    label: Any = None
    parts: tuple[float, ...] = ()  # what ``cost`` is made of, for reports; the solver ignores it


@dataclass(frozen=True)
class Problem:
    length: int
    options: tuple[Option, ...]
    final_need: int = 0

    def __post_init__(self) -> None:
        for o in self.options:
            if not 0 <= o.start < o.end <= self.length or o.keep < 0 or o.need < 0 or o.cost < 0:
                raise ValueError(f"bad option {o} for a path of length {self.length}")


@dataclass(frozen=True)
class Solution:
    options: tuple[Option, ...]
    cost: float
    peak: int  # predicted peak of the chosen path (unrounded bytes)
    kept: int  # state at the end: bytes kept for backward when forward ends


def path_peak(problem: Problem, options: tuple[Option, ...] | list[Option]) -> tuple[int, int]:
    """(peak, final state) of a path, in exact bytes."""
    state, peak = 0, 0
    for o in options:
        peak = max(peak, state + o.need)
        state += o.keep
    return max(peak, state + problem.final_need), state


def _scale(problem: Problem) -> int:
    """An upper bound of any path's peak: the most any path keeps, plus the largest need.

    Tight (the most kept along one path, not the sum over all options), because
    the rounding unit is a fraction of it.
    """
    most = [0] + [-1] * problem.length  # most bytes kept on a path from 0 to each position
    for o in sorted(problem.options, key=lambda o: o.start):
        if most[o.start] >= 0:
            most[o.end] = max(most[o.end], most[o.start] + o.keep)
    return max(most) + max((o.need for o in problem.options), default=0) + problem.final_need


def _unit(problem: Problem, resolution: int) -> int:
    return max(1, math.ceil(_scale(problem) / resolution))


def rounding_slack(problem: Problem, path: tuple[Option, ...] | list[Option], resolution: int = 4000) -> int:
    """Bytes above a path's exact peak at which ``solve`` surely accepts it (rounding up to units)."""
    return _unit(problem, resolution) * (len(path) + 1)


def _roomy(problem: Problem, resolution: int) -> int:
    """A budget every path fits, even with every byte count rounded up to the unit."""
    return _scale(problem) + _unit(problem, resolution) * (len(problem.options) + 2)


def solve(problem: Problem, budget: int, resolution: int = 4000) -> Solution | None:
    """Least-cost path whose predicted peak fits ``budget``; None if none fits.

    Bytes are rounded up to a unit of the problem's scale / ``resolution``
    (the same unit for every budget, so feasibility grows with the budget).
    """
    if budget < 0:
        return None
    unit = _unit(problem, resolution)
    # beyond a roomy budget every path fits: no need for more states
    cap = min(budget, _roomy(problem, resolution)) // unit
    n = problem.length
    inf = math.inf
    best = np.full((n + 1, cap + 1), inf)
    parent = np.full((n + 1, cap + 1), -1, dtype=np.int64)
    best[0, 0] = 0.0
    by_start: dict[int, list[int]] = {}
    for k, o in enumerate(problem.options):
        by_start.setdefault(o.start, []).append(k)
    for i in range(n):
        row = best[i]
        if not np.isfinite(row).any():
            continue
        for k in by_start.get(i, ()):
            o = problem.options[k]
            keep, need = math.ceil(o.keep / unit), math.ceil(o.need / unit)
            top = min(cap - need, cap - keep)  # largest state this option may start from
            if top < 0:
                continue
            src = row[:top + 1] + o.cost
            dst = best[o.end, keep:keep + top + 1]
            better = src < dst
            if better.any():
                dst[better] = src[better]
                parent[o.end, keep:keep + top + 1][better] = k
    final = math.ceil(problem.final_need / unit)
    if final > cap:
        return None
    ends = best[n, :cap - final + 1]
    if not np.isfinite(ends).any():
        return None
    # least cost; among equal costs the smallest state, which tends to the lowest peak
    m = int(np.flatnonzero(ends == ends.min())[0])
    chosen = []
    i = n
    while i > 0:
        k = int(parent[i, m])
        o = problem.options[k]
        chosen.append(o)
        m -= math.ceil(o.keep / unit)
        i = o.start
    chosen.reverse()
    peak, kept = path_peak(problem, chosen)
    return Solution(tuple(chosen), float(sum(o.cost for o in chosen)), peak, kept)


def solve_within(problem: Problem, budget: int, resolution: int = 4000, tries: int = 12) -> Solution | None:
    """Like ``solve``, but also looks for paths that fit ``budget`` only within the rounding.

    ``solve`` rounds every option's bytes up, so a path of m options can be
    refused although its exact peak fits, by up to m + 1 units: a budget set
    to exactly what a schedule keeps (per-block checkpointing over 64 blocks)
    loses that schedule. Here the solver also runs at up to ``tries`` internal
    budgets between one unit and the most rounding any path can add above
    ``budget``, and keeps the cheapest answer whose exact peak fits.

    Best effort: never costlier than ``solve``, never above ``budget``, but a
    path that fits can still lose, at every internal budget tried, to a cheaper
    one that does not. And the cheapest plan is no longer guaranteed to cost
    less as the budget grows, so ``min_budget`` keeps to ``solve``.
    """
    best = solve(problem, budget, resolution)
    unit = _unit(problem, resolution)
    most = problem.length + 1  # units of rounding a path can add: one per option and the final need
    extras = sorted({max(1, round(most * k / tries)) for k in range(1, tries + 1)}, reverse=True)
    for extra in extras:
        got = solve(problem, budget + extra * unit, resolution)
        if got is not None and got.peak <= budget and (best is None or (got.cost, got.peak) < (best.cost, best.peak)):
            best = got
    return best


def min_budget(problem: Problem, resolution: int = 4000) -> tuple[int, Solution] | None:
    """The smallest budget ``solve`` accepts, and its solution (None if no path covers the chain).

    With coarse units the budget can exceed the solution's exact peak by the rounding.
    """
    hi = _roomy(problem, resolution)
    found = solve(problem, hi, resolution)
    if found is None:
        return None
    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        sol = solve(problem, mid, resolution)
        if sol is None:
            lo = mid + 1
        else:
            found, hi = sol, mid
    return hi, found


def pareto(problem: Problem, points: int = 12, resolution: int = 4000) -> list[tuple[int, Solution]]:
    """(budget, least-cost solution) from the smallest feasible budget to one that keeps everything."""
    least = min_budget(problem, resolution)
    if least is None:
        return []
    low = least[0]
    top = _roomy(problem, resolution)
    everything = solve(problem, top, resolution)
    # the least-recompute path's peak, plus what rounding may add to it
    high = max(low, everything.peak + rounding_slack(problem, everything.options, resolution))
    found: dict[tuple, tuple[int, Solution]] = {}
    for k in range(points):
        budget = low + (high - low) * k // max(1, points - 1)
        sol = solve(problem, budget, resolution)
        if sol is not None:
            found.setdefault((sol.cost, sol.peak), (budget, sol))
    return sorted(found.values(), key=lambda bs: (bs[1].peak, bs[1].cost))
