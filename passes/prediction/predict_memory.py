"""Pass: formulas in B and S for the memory of one training step, from the model's real graph.

The model's own code (the converted module's runtime included) runs on fake
tensors (``fake_copy``: shapes, dtypes and aliasing as on the device, no
allocation) at several batch sizes and sequence lengths (or image sides);
each run is observed like a real one (``revify.measure``: saved-tensor
hooks and a live-storage tracker); ``fit_polynomial`` then identifies the
exact polynomials behind the byte counts:

* **saved for backward**, in total and per block (so a chain of L identical
  blocks reads ``L·(…)``);
* **retained** after forward;
* **peak**: the live bytes after each allocation of the step form a
  sequence that is the same for every size, and each entry is a polynomial
  (activations, temporaries, gradients). The peak is the maximum of these
  polynomials; which allocation is the highest changes with the sizes (the
  logits at short sequences, attention at long ones), so the formula is a
  ``Max`` of the few entries that are highest somewhere. If the sequence of
  allocations itself changes with the sizes, the peak is fitted as one
  polynomial and checked like the others.

A size the model refuses (a vision model built for one image size) is held
at its example value, with the reason. Batch size 1 is not sampled: a
size-1 dimension makes some copies no-ops, so B = 1 may need slightly less
than the formula says.

Before::

    PreLNTransformer (4 × PreLNBlock), example_inputs=(int64[2, 16],)

After::

    MemoryFormula(saved = L·(16·B·S·(3·S + 145) + S²) + 472·B·S + 8·S   where L = 4 × PreLNBlock,
                  peak = max(8·B·S·(26·S + 983) + S·(5·S + 8), …), params = 218568,
                  fit_points=[{"B": 2, "S": 16}, {"B": 2, "S": 17}, …])
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import sympy
import torch
from torch.utils._pytree import tree_leaves

from revify.messages import one_line
from revify.measure import CATEGORIES, MemoryProfile, measure_training_memory
from revify.units import format_bytes, parse_bytes

from revify.passes.prediction.fake_copy import fake_copy, new_fake_mode
from revify.passes.prediction.fake_transformers import real_mask_path
from revify.passes.prediction.fit_polynomial import Misaligned, NotPolynomial, Polynomials, fit_polynomials
from revify.passes.prediction.symbolic_inputs import InputSymbols, find_input_symbols

SCALARS = ("saved", "retained", "params")  # then saved bytes per block; the peak comes from the allocation series
_SYMBOLS = {name: sympy.Symbol(name, positive=True, integer=True) for name in ("B", "S", "L")}


def _symbol(name: str) -> sympy.Symbol:
    return _SYMBOLS.get(name) or sympy.Symbol(name, positive=True, integer=True)


@dataclass(frozen=True)
class ChainLabel:
    """How a chain is named in formulas: its blocks' paths and a short description."""

    name: str  # "chain 0"
    paths: tuple[str, ...]
    block_type: str


@dataclass(frozen=True, eq=False)  # numpy arrays inside: compare fields explicitly
class MemoryFormula:
    """Predicted bytes of one training step as exact polynomials in B and S (see module docstring)."""

    symbols: tuple[str, ...]
    meanings: dict[str, str]
    example: dict[str, int]
    block_paths: tuple[str, ...]
    fit_points: list[dict[str, int]]
    scalars: Polynomials  # SCALARS, then saved bytes per block path, then outside every block
    events: Polynomials | None  # live (activations, temporaries, gradients) after each allocation
    peak_events: tuple[int, ...] = ()  # events that are the peak somewhere: the terms of the Max
    peak_fallback: Polynomials | None = None  # (peak, activations, temporaries, gradients) when events is None
    held: dict[str, str] = field(default_factory=dict)  # sizes held at their example value, and why
    notes: tuple[str, ...] = ()

    # --- expressions ---------------------------------------------------------------------------
    def _expr(self, polys: Polynomials, i: int) -> sympy.Expr:
        return polys.expr(i, {v: _symbol(v) for v in polys.variables})

    @property
    def saved(self) -> sympy.Expr:
        return self._expr(self.scalars, SCALARS.index("saved"))

    @property
    def retained(self) -> sympy.Expr:
        return self._expr(self.scalars, SCALARS.index("retained"))

    @property
    def has_peak(self) -> bool:
        return self.events is not None or self.peak_fallback is not None

    @property
    def peak(self) -> sympy.Expr:
        """Peak live bytes above parameters and inputs (what ``StepMeasurement.peak_bytes`` measures)."""
        if not self.has_peak:
            raise ValueError("this formula was fitted without the peak (peak=False)")
        if self.events is None:
            return self._expr(self.peak_fallback, 0)
        terms = [sum(self._expr(self.events, 3 * e + c) for c in range(3)) for e in self.peak_events]
        return terms[0] if len(terms) == 1 else sympy.Max(*terms, evaluate=False)

    @property
    def params(self) -> sympy.Expr:
        """Bytes of parameters and buffers (a constant unless the formula's sizes change the model)."""
        return self._expr(self.scalars, SCALARS.index("params"))

    @property
    def param_bytes(self) -> int:
        """Parameters and buffers at the example sizes."""
        return int(self.scalars.evaluate(self._point({}))[SCALARS.index("params")])

    @property
    def total(self) -> sympy.Expr:
        """Parameters and buffers plus the peak: the memory the step needs (optimizer state not included)."""
        return self.params + self.peak

    def saved_by_block(self) -> dict[str, sympy.Expr]:
        base = len(SCALARS)
        out = {p: self._expr(self.scalars, base + i) for i, p in enumerate(self.block_paths)}
        out[""] = self._expr(self.scalars, base + len(self.block_paths))
        return out

    # --- numbers ---------------------------------------------------------------------------------
    def _point(self, values: Mapping[str, int | None]) -> dict[str, int]:
        point = {k: self.example[k] for k in self.symbols}
        for k, v in values.items():
            if v is None:
                continue
            if k in self.symbols:
                point[k] = int(v)
            elif self.example.get(k) != int(v):
                reason = self.held.get(k, "the inputs have no such size")
                raise ValueError(f"{k}={v}: {k} is not a variable of this formula ({reason})")
        return point

    def evaluate(self, **values: int | None) -> dict[str, Any]:
        """Exact predicted bytes at the given sizes (the example's for sizes not given)."""
        point = self._point(values)
        s = self.scalars.evaluate(point)
        out: dict[str, Any] = {name: int(s[i]) for i, name in enumerate(SCALARS)}
        base = len(SCALARS)
        out["saved_by_block"] = {p: int(s[base + i]) for i, p in enumerate(self.block_paths + ("",))}
        if self.events is not None:
            e = self._peak_event(point)
            cats = self.events.select([3 * e + c for c in range(3)]).evaluate(point)
            out["peak_by_category"] = {c: int(v) for c, v in zip(CATEGORIES, cats)}
            out["peak"] = sum(out["peak_by_category"].values())
        elif self.peak_fallback is not None:
            values = [int(v) for v in self.peak_fallback.evaluate(point)]
            out["peak"], out["peak_by_category"] = values[0], dict(zip(CATEGORIES, values[1:]))
        if "peak" in out:
            out["total"] = out["params"] + out["peak"]
        return out

    def _peak_event(self, point: Mapping[str, int]) -> int:
        """The first allocation after which live bytes are highest at ``point`` (as the tracker's peak)."""
        totals = self._totals()
        approx = totals.evaluate_float([point])[:, 0]
        leaders = sorted(int(i) for i in np.argsort(-approx)[:16])
        exact = [Fraction(v) for v in totals.select(leaders).evaluate(point)]
        top = max(exact)
        return next(e for e, v in zip(leaders, exact) if v == top)

    def _totals(self) -> Polynomials:
        return _totals(self.events)

    def max_batch(self, memory: int | float | str, seq_len: int | None = None) -> int:
        """Largest batch size whose predicted step (parameters + peak) fits in ``memory``; 0 if none."""
        if "B" not in self.symbols:
            raise ValueError("the batch size is not a variable of this formula "
                             f"({self.held.get('B', 'the inputs have no batch dimension')})")
        if not self.has_peak:
            raise ValueError("max_batch needs the peak formula (fitted with peak=True)")
        limit = parse_bytes(memory)
        extra = {} if seq_len is None else {"S": seq_len}

        def fits(b: int) -> bool:
            return self.evaluate(B=b, **extra)["total"] <= limit

        if not fits(1):
            return 0
        lo, hi = 1, 2
        while fits(hi):
            lo, hi = hi, hi * 2
            if hi > 2 ** 40:
                return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    # --- printing ----------------------------------------------------------------------------------
    def describe(self, chains: Sequence[ChainLabel] = ()) -> list[str]:
        """Readable lines: saved bytes with each chain's common per-block term pulled out (``L·(…)``)."""
        by_block = {p: sympy.expand(e) for p, e in self.saved_by_block().items()}
        parts, legend = [], []
        rest = sympy.expand(self.saved)
        chains = [c for c in chains if all(p in by_block for p in c.paths)]
        for k, chain in enumerate(chains):
            polys = [by_block[p] for p in chain.paths]
            counts: dict[sympy.Expr, int] = {}
            for e in polys:
                counts[e] = counts.get(e, 0) + 1
            if all(e != 0 for e in polys) and len(polys) >= 2:
                # every block keeps something: the most common term (ties: the last block's, as the
                # first often also keeps inputs shared by all) times L; the differences go below
                common = max(reversed(polys), key=counts.get)
                name = "L" if len(chains) == 1 else f"L{k}"
                parts.append(f"{name}·({pretty(common)})")
                legend.append(f"{name} = {len(polys)} × {chain.block_type} ({chain.name})")
                rest -= len(polys) * common
            else:
                for e, count in counts.items():
                    if e != 0:
                        parts.append(f"{count}·({pretty(e)})" if count > 1 else f"({pretty(e)})")
                        rest -= count * e
        rest = sympy.expand(rest)
        if rest != 0 or not parts:
            parts.append(pretty(rest))
        lines = [f"saved for backward = {' + '.join(parts)}"]
        lines += [f"  where {item}" for item in legend]
        if self.has_peak:
            lines.append(f"peak above parameters = {pretty(self.peak)}")
        params = sympy.expand(self.params)
        lines.append(f"parameters and buffers = {pretty(params)}"
                     + (f" ({format_bytes(int(params))})" if params.is_number else ""))
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "symbols": {s: self.meanings.get(s, s) for s in self.symbols},
            "example": dict(self.example),
            "saved_bytes": str(self.saved),
            "retained_bytes": str(self.retained),
            "peak_bytes": str(self.peak) if self.has_peak else None,
            "param_bytes": str(self.params),
            "saved_by_block": {p or "<outside blocks>": str(e) for p, e in self.saved_by_block().items()},
            "fit_points": list(self.fit_points),
            "held": dict(self.held),
            "notes": list(self.notes),
        }


def pretty(expr: sympy.Expr) -> str:
    """``64·B·S·(S + 34) + 8·(2·S + 1)``: terms grouped by the power of B, common factors pulled out."""
    if isinstance(expr, sympy.Max):
        return "max(" + ", ".join(pretty(a) for a in expr.args) + ")"
    expr = sympy.expand(expr)
    if expr == 0:
        return "0"
    b = _SYMBOLS["B"]
    groups = sympy.collect(expr, b, evaluate=False)
    order = sorted(groups, key=lambda k: -sympy.degree(k, b) if k != 1 else 0)
    text = " + ".join(sympy.sstr(sympy.factor_terms(k * groups[k])) for k in order)
    return (text.replace("**2", "²").replace("**3", "³").replace("**4", "⁴").replace("*", "·")
            .replace("+ -", "- "))


def _samples(symbols: InputSymbols, name: str, count: int = 12) -> list[int]:
    start = max(symbols.example[name], 2) if name == "B" else symbols.example[name]
    return [start + i * symbols.step[name] for i in range(count)]


def _constant(values: Sequence[int]) -> Polynomials:
    return Polynomials((), ((),), np.array([[Fraction(int(v))] for v in values], dtype=object).reshape(-1, 1))


def fit_memory(profile: Callable[[Mapping[str, int]], MemoryProfile], axes: Mapping[str, Sequence[int]],
               block_paths: Sequence[str] = (), *, example: Mapping[str, int] | None = None,
               meanings: Mapping[str, str] | None = None, held: Mapping[str, str] | None = None,
               peak: bool = True, guess: Mapping[str, int] | None = None, max_degree: int = 4) -> MemoryFormula:
    """Fit a :class:`MemoryFormula` in the variables of ``axes`` from ``profile(point)`` (any sizes:
    batch, sequence, width, depth of a family of configs; fake or real runs)."""
    paths = tuple(dict.fromkeys(block_paths))

    def scalars(values: Mapping[str, int]) -> list[int]:
        p = profile(values)
        by_block = [p.saved_by_block.get(path, 0) for path in paths] + [p.saved_by_block.get("", 0)]
        return [p.saved_bytes, p.retained_bytes, p.param_bytes] + by_block

    def peaks(values: Mapping[str, int]) -> list[int]:
        p = profile(values)
        return [p.peak_bytes] + [p.peak_by_category[c] for c in CATEGORIES]

    def series(values: Mapping[str, int]) -> list[int]:
        return [v for entry in profile(values).series for v in entry]

    notes: list[str] = []
    fallback = None
    if not axes:  # no size varies: the figures are constants
        scal, ev, points = _constant(scalars({})), (_constant(series({})) if peak else None), [{}]
    else:
        try:
            scal, points = fit_polynomials(scalars, axes, max_degree=max_degree, guess=guess)
        except (Misaligned, NotPolynomial) as exc:
            raise ValueError(f"saved bytes are not polynomial in {', '.join(axes)}: {exc}") from exc
        ev = None
        if peak:
            try:
                ev = fit_polynomials(series, axes, max_degree=max_degree, guess=guess)[0]
            except (Misaligned, NotPolynomial) as exc:
                # the allocations differ between sizes: the peak as one polynomial (one peak location)
                try:
                    fallback, _ = fit_polynomials(peaks, axes, max_degree=max_degree, guess=guess)
                except NotPolynomial as exc2:
                    raise ValueError(f"the step allocates differently at different sizes ({exc}) and its "
                                     f"peak is not one polynomial ({exc2})") from exc2
                notes.append(f"the step allocates differently at different sizes ({exc}); "
                             "the peak is fitted as one polynomial")
    example = dict(example) if example is not None else {k: v[0] for k, v in axes.items()}
    fit_points = [{**example, **p} for p in points]
    return MemoryFormula(
        symbols=tuple(axes), meanings=dict(meanings or {}), example=example, block_paths=paths,
        fit_points=fit_points, scalars=scal, events=ev,
        peak_events=_leading_events(ev, axes, fit_points) if ev is not None else (),
        peak_fallback=fallback, held=dict(held or {}), notes=tuple(notes))


def predict_memory(model: torch.nn.Module, example_inputs: Any,
                   loss_fn: Callable[[Any], torch.Tensor], block_paths: Sequence[str] = (), *,
                   symbols: InputSymbols | None = None, device: str | torch.device | None = None,
                   peak: bool = True, max_degree: int = 4) -> MemoryFormula:
    """Fit the memory formulas of ``model`` (original or converted) in B and S from fake-tensor steps.

    ``block_paths`` name the modules whose saved bytes are fitted one by
    one; ``peak=False`` fits saved and retained bytes only (faster). Raises
    ``ValueError`` with the reason if the model cannot run on fake tensors
    or its memory is not polynomial in the sizes.
    """
    symbols = symbols or find_input_symbols(example_inputs)
    example = dict(symbols.example)
    mode = new_fake_mode()
    fmodel = fake_copy(model, mode, device)
    paths = tuple(dict.fromkeys(block_paths))
    profiles: dict[tuple, MemoryProfile] = {}

    def make(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        with mode:
            out = torch.empty(shape, dtype=t.dtype, device="cpu" if t.device.type == "meta" else t.device)
        return out.requires_grad_(True) if t.requires_grad else out

    def profile(values: Mapping[str, int]) -> MemoryProfile:
        inputs = symbols.inputs_at(example_inputs, values, make)
        key = tuple(tuple(t.shape) for t in tree_leaves(inputs) if isinstance(t, torch.Tensor))
        if key not in profiles:
            with torch.random.fork_rng(devices=[]), mode, real_mask_path(example_inputs):
                profiles[key] = measure_training_memory(fmodel, inputs, loss_fn, paths, record_series=peak,
                                                        track_peak=peak)
        return profiles[key]

    try:
        profile(example)
    except Exception as exc:
        raise ValueError(f"the model does not run on fake tensors: {one_line(exc)}") from exc
    held = {}
    for name in symbols.symbols:
        other = _samples(symbols, name)[1]
        try:
            profile({**example, name: other})
        except Exception as exc:
            held[name] = f"held at {example[name]}: the model raised {one_line(exc)} at {name}={other}"
            symbols = symbols.without(name)
    axes = {name: _samples(symbols, name) for name in symbols.symbols}
    # transformers: linear in B, quadratic in S (attention); CNNs: quadratic in the image side
    return fit_memory(profile, axes, paths, example=example, meanings=_meanings(symbols), held=held, peak=peak,
                      guess={"B": 1, "S": 2}, max_degree=max_degree)


def _meanings(symbols: InputSymbols) -> dict[str, str]:
    out = {"B": "batch size"} if "B" in symbols.example else {}
    if symbols.s_meaning:
        out["S"] = symbols.s_meaning
    return out


def _totals(events: Polynomials) -> Polynomials:
    """Live bytes after each allocation: the sum of its three categories."""
    c = events.coefficients
    return Polynomials(events.variables, events.exponents, c[0::3] + c[1::3] + c[2::3])


def _leading_events(events: Polynomials, axes: Mapping[str, Sequence[int]],
                    fit_points: Sequence[Mapping[str, int]]) -> tuple[int, ...]:
    """Events that hold the peak somewhere on a wide grid (B up to 4096×, S up to 65536× the first sample)."""
    totals = _totals(events)
    steps = 17 if len(axes) <= 2 else 8  # keep the grid a few thousand points
    grids = [sorted({values[0] * 2 ** k for k in range(min(13, steps) if name == "B" else steps)})
             for name, values in axes.items()]
    points = [dict(zip(axes, combo)) for combo in itertools.product(*grids)] if grids else [{}]
    points += [{k: p[k] for k in axes} for p in fit_points]
    approx = totals.evaluate_float(points)
    unique: dict[tuple, int] = {}
    for e in sorted({int(i) for i in np.argmax(approx, axis=0)}):
        unique.setdefault(tuple(totals.coefficients[e]), e)
    return tuple(sorted(unique.values()))
