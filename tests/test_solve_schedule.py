"""The budget DP against brute force on small random chains."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from revify.passes.planning.solve_schedule import Option, Problem, min_budget, path_peak, pareto, solve, solve_within


@st.composite
def problems(draw):
    n = draw(st.integers(1, 6))
    options = []
    for i in range(n):
        # always one way forward from every position, plus random alternatives
        options.append(Option(i, i + 1, draw(st.integers(0, 30)), draw(st.integers(0, 60)),
                              draw(st.integers(0, 9))))
        for j in range(i + 1, min(n, i + 4) + 1):
            for _ in range(draw(st.integers(0, 2))):
                options.append(Option(i, j, draw(st.integers(0, 30)), draw(st.integers(0, 90)),
                                      draw(st.integers(0, 9))))
    return Problem(n, tuple(options), draw(st.integers(0, 20)))


def _all_paths(problem: Problem):
    def walk(i, path):
        if i == problem.length:
            yield tuple(path)
            return
        for o in problem.options:
            if o.start == i:
                yield from walk(o.end, path + [o])
    yield from walk(0, [])


def _brute(problem: Problem, budget: int):
    best = None
    for path in _all_paths(problem):
        peak, _ = path_peak(problem, path)
        cost = sum(o.cost for o in path)
        if peak <= budget and (best is None or cost < best):
            best = cost
    return best


@settings(max_examples=300, deadline=None)
@given(problems(), st.integers(0, 250))
def test_dp_finds_the_least_recompute_that_fits(problem, budget):
    expected = _brute(problem, budget)
    got = solve(problem, budget, resolution=10**6)  # unit of one byte: exact
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.cost == expected and got.peak <= budget
        assert path_peak(problem, got.options)[0] == got.peak


@settings(max_examples=150, deadline=None)
@given(problems())
def test_min_budget_is_the_smallest_peak_of_any_path(problem):
    expected = min(path_peak(problem, p)[0] for p in _all_paths(problem))
    budget, solution = min_budget(problem, resolution=10**6)
    assert budget == solution.peak == expected
    assert solve(problem, expected - 1, resolution=10**6) is None


@settings(max_examples=100, deadline=None)
@given(problems(), st.integers(1, 50))
def test_rounding_never_accepts_what_does_not_fit(problem, resolution):
    # coarse units: the answer may be suboptimal but must fit the real budget,
    # and a budget it accepts stays accepted when it grows
    accepted = False
    for budget in range(0, 400, 7):
        got = solve(problem, budget, resolution=resolution)
        assert not (accepted and got is None)
        if got is not None:
            accepted = True
            assert got.peak <= budget
    smallest, solution = min_budget(problem, resolution=resolution)
    assert solution.peak <= smallest
    assert solve(problem, smallest, resolution=resolution) is not None
    assert smallest == 0 or solve(problem, smallest - 1, resolution=resolution) is None


@settings(max_examples=150, deadline=None)
@given(problems(), st.integers(1, 50), st.integers(0, 250))
def test_solve_within_never_exceeds_the_budget(problem, resolution, budget):
    got = solve_within(problem, budget, resolution)
    assert got is None or path_peak(problem, got.options)[0] <= budget
    assert solve(problem, budget, resolution) is None or got is not None


def test_solve_within_tries_more_than_a_binary_search_would():
    # units of 10 bytes: four 11-byte options (exact peak 44, cost 0) need four extra units to be
    # seen; with one to three, the cheapest rounded answer is the 46-byte option, which does not fit
    options = (Option(0, 1, 11, 0, 0.0), Option(1, 2, 11, 0, 0.0), Option(2, 3, 11, 0, 0.0), Option(3, 4, 11, 0, 0.0),
               Option(0, 4, 46, 0, 5.0), Option(0, 4, 40, 0, 10.0))
    problem = Problem(4, options)
    assert solve(problem, 44, resolution=5).cost == 10.0
    got = solve_within(problem, 44, resolution=5)
    assert got.cost == 0.0 and got.peak == 44


def test_solve_within_takes_a_schedule_at_exactly_its_bytes():
    # 8 blocks: recompute each alone (keeps 10 bytes, costs 1) or two at once (keeps 10, costs 3);
    # the budget is exactly what per-block keeps, and rounding up every option's 10 bytes to
    # units of the scale / 40 refuses per-block
    options = []
    for i in range(8):
        options.append(Option(i, i + 1, 10, 10, 1.0, "one"))
        if i + 2 <= 8:
            options.append(Option(i, i + 2, 10, 20, 3.0, "two"))
    problem = Problem(8, tuple(options))
    per_block, _ = path_peak(problem, [o for o in options if o.label == "one"])
    assert solve(problem, per_block, resolution=40) is None or solve(problem, per_block, resolution=40).cost > 8
    got = solve_within(problem, per_block, resolution=40)
    assert got.cost == 8.0 and got.peak == per_block


def test_pareto_trades_memory_for_recompute():
    # a 4-block chain: keep a block (20 bytes, no recompute) or recompute it alone (2 bytes, 1 s)
    options = []
    for i in range(4):
        options += [Option(i, i + 1, 20, 20, 0.0, "keep"), Option(i, i + 1, 2, 22, 1.0, "recompute")]
    front = [s for _, s in pareto(Problem(4, tuple(options)), points=20, resolution=10**6)]
    assert [s.cost for s in front] == sorted((s.cost for s in front), reverse=True)
    # the least memory keeps the last block: its backward comes first, so keeping it
    # (peak 6 + 20) beats recomputing it (6 + 22) -- the edge over per-block checkpointing
    assert front[0].cost == 3.0 and front[0].options[-1].label == "keep" and front[0].peak == 26
    assert front[-1].cost == 0.0
    assert all(a.peak < b.peak for a, b in zip(front, front[1:]))
