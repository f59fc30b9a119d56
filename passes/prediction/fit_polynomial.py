"""Pass: identify exact polynomials behind an integer-valued function of a few sizes.

The bytes a training step keeps (and its live bytes after any given
allocation) are sums of tensor sizes, and tensor sizes are products of the
input sizes: polynomials with rational coefficients in the batch size, the
sequence length, the number of layers... This pass finds them exactly from
a black box ``run(point) -> vector of ints``:

1. **Degree per variable**: along each axis (the others at their first
   sample) sample equally spaced values until the highest finite
   difference vanishes for every component (degree ≤ ``max_degree``).
2. **Interpolate** on the tensor grid of the first ``degree + 1`` samples of
   every axis (exact rational arithmetic: tensor-product Vandermonde
   inverses).
3. **Check** at points off the grid and off the axes; on a mismatch raise
   every degree by one and try again, up to ``max_degree``; then give up
   (``NotPolynomial``) rather than return a wrong formula.

Before::

    run({"B": b, "S": s}) -> [saved bytes, peak bytes, ...]    # a black box

After::

    Polynomials(variables=("B", "S"), exponents=((0, 0), (0, 1), (0, 2), (1, 0), ...),
                coefficients=[[0, 0, 0, 0, 2176, 64], ...])    # saved = 2176·B·S + 64·B·S²
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Mapping, Sequence

import numpy as np
import sympy


class NotPolynomial(ValueError):
    """The function is not a polynomial of bounded degree on the sampled sizes."""


class Misaligned(ValueError):
    """Two runs returned vectors of different lengths."""


@dataclass(frozen=True, eq=False)  # numpy arrays inside: compare fields explicitly
class Polynomials:
    """One polynomial per component, on shared monomials."""

    variables: tuple[str, ...]
    exponents: tuple[tuple[int, ...], ...]
    coefficients: np.ndarray  # object array (components, monomials) of Fraction

    def monomials(self, point: Mapping[str, int]) -> np.ndarray:
        x = [int(point[v]) for v in self.variables]
        return np.array([_prod(xi ** e for xi, e in zip(x, exps)) for exps in self.exponents], dtype=object)

    def evaluate(self, point: Mapping[str, int]) -> np.ndarray:
        """Exact values (Fractions) of every component at ``point``."""
        return self.coefficients.dot(self.monomials(point))

    def evaluate_float(self, points: Sequence[Mapping[str, int]]) -> np.ndarray:
        """Approximate values, shape (components, points): for choosing among many components quickly."""
        mono = np.array([[float(m) for m in self.monomials(p)] for p in points]).T
        return np.asarray(self.coefficients, dtype=float) @ mono

    def expr(self, component: int, symbols: Mapping[str, sympy.Symbol]) -> sympy.Expr:
        out = sympy.Integer(0)
        for c, exps in zip(self.coefficients[component], self.exponents):
            if c:
                term = sympy.Rational(c.numerator, c.denominator)
                for v, e in zip(self.variables, exps):
                    term *= symbols[v] ** e
                out += term
        return out

    def select(self, components: Sequence[int]) -> "Polynomials":
        return Polynomials(self.variables, self.exponents, self.coefficients[list(components)])


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _degree(ys: list[np.ndarray]) -> int | None:
    """Smallest degree whose next finite difference vanishes on equally spaced samples, or None."""
    diffs = list(ys)
    for k in range(len(ys)):
        if all(not np.any(d != 0) for d in diffs):
            return max(0, k - 1)
        diffs = [b - a for a, b in zip(diffs, diffs[1:])]
    return None


def _vandermonde_inverse(nodes: Sequence[int]) -> np.ndarray:
    inv = sympy.Matrix([[sympy.Integer(x) ** j for j in range(len(nodes))] for x in nodes]).inv()
    return np.array([[Fraction(int(v.p), int(v.q)) for v in row] for row in inv.tolist()], dtype=object)


def fit_polynomials(run: Callable[[dict[str, int]], Sequence[int]], axes: Mapping[str, Sequence[int]], *,
                    max_degree: int = 4, guess: Mapping[str, int] | None = None,
                    ) -> tuple[Polynomials, list[dict[str, int]]]:
    """Fit ``run`` exactly; return the polynomials and every point it was run at.

    ``axes[v]`` are equally spaced sample values of variable ``v`` (at least
    ``2 * max_degree + 3`` of them for the checks); the first value of each
    axis is the base the other axes are sampled from. ``guess`` gives
    degrees to try first (interpolate and check, skipping the per-axis
    search: fewer runs when the guess is right).
    """
    names = list(axes)
    cache: dict[tuple[int, ...], np.ndarray] = {}
    length: list[int] = []

    def value(pt: tuple[int, ...]) -> np.ndarray:
        if pt not in cache:
            y = np.asarray([int(v) for v in run(dict(zip(names, pt)))], dtype=object)
            if length and len(y) != length[0]:
                raise Misaligned(f"{len(y)} values at {dict(zip(names, pt))}, {length[0]} before")
            length.append(len(y))
            cache[pt] = y
        return cache[pt]

    def points() -> list[dict[str, int]]:
        return [dict(zip(names, p)) for p in cache]

    if guess is not None:
        polys = _interpolate_and_check(value, axes, names, [int(guess.get(n, 1)) for n in names])
        if polys is not None:
            return polys, points()
    degrees = [_axis_degree(value, axes, names, k, max_degree) for k in range(len(names))]
    while True:
        polys = _interpolate_and_check(value, axes, names, degrees)
        if polys is not None:
            return polys, points()
        if max(degrees) >= max_degree:
            raise NotPolynomial(f"no polynomial of degree ≤ {max_degree} matches the checks")
        degrees = [d + 1 for d in degrees]


def _axis_degree(value: Callable, axes: Mapping[str, Sequence[int]], names: list[str], k: int,
                 max_degree: int) -> int:
    """Degree in variable ``k`` along its axis, the other variables at their base."""
    base = [axes[n][0] for n in names]
    n = names[k]
    for npts in range(3, min(max_degree + 2, len(axes[n])) + 1):
        ys = [value(tuple(base[:k] + [axes[n][i]] + base[k + 1:])) for i in range(npts)]
        d = _degree(ys)
        if d is not None:
            return d
    raise NotPolynomial(f"not a polynomial of degree ≤ {max_degree} in {n}")


def _interpolate_and_check(value: Callable, axes: Mapping[str, Sequence[int]], names: list[str],
                           degrees: list[int]) -> Polynomials | None:
    """Interpolate on the grid of the first ``degree + 1`` samples; None if two off-grid checks disagree."""
    nodes = [list(axes[n][:d + 1]) for n, d in zip(names, degrees)]
    grid = np.empty([len(x) for x in nodes], dtype=object)
    for idx in itertools.product(*(range(len(x)) for x in nodes)):
        grid[idx] = value(tuple(x[i] for x, i in zip(nodes, idx)))
    ys = np.array(grid.tolist(), dtype=object)  # shape (*grid, components)
    if ys.ndim == len(nodes):  # zero components: nothing to fit
        ys = ys.reshape(ys.shape + (0,))
    for k, x in enumerate(nodes):
        ys = np.moveaxis(np.tensordot(_vandermonde_inverse(x), ys, axes=([1], [k])), 0, k)
    exponents = tuple(itertools.product(*(range(d + 1) for d in degrees)))
    polys = Polynomials(tuple(names), exponents, ys.reshape(len(exponents), -1).T)
    checks = [tuple(axes[n][min(len(axes[n]) - 1, d + 1 + j)] for n, d in zip(names, degrees)) for j in (0, 1)]
    if all(np.all(polys.evaluate(dict(zip(names, c))) == value(c)) for c in checks):
        return polys
    return None
