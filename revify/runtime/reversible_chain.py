"""Runtime: a chain of blocks run as two-stream reversible couplings.

Coupling step i (MEFT, Liao et al. 2023; RevNet, Gomez et al. 2017)::

    y1 = λ·x1 + F_i(x2)          x2 = (y2 − G_i(y1)) / β
    y2 = β·x2 + G_i(y1)          x1 = (y1 − F_i(x2)) / λ      (inverse)

then, for MEFT1/MEFT2, the streams are switched. The chain input is copied
into both streams; the chain output is the stream that carries the
pretrained function (``Coupling.output``).

``_ReversibleFunction`` runs every step in forward without storing any
activation, and saves only the final two streams, the exact streams at a few
*anchor* steps (chosen at conversion by measured reconstruction error), the
side inputs, RNG states and buffer snapshots. Backward walks the steps in
reverse: ``G`` is recomputed under autograd on the known ``y1`` (which also
reconstructs ``x2``), then ``F`` on the reconstructed ``x2`` (which also
reconstructs ``x1``), so reconstruction and recomputation share one forward
per function. Parameters are inputs of the Function, so their gradients are
returned to autograd and accumulate through the normal ``AccumulateGrad``
path (optimizers, grad hooks and DDP see them once).

Numerics: dividing by λ or β amplifies rounding error at every step. The
streams are kept in a wider dtype than the blocks compute in (fp64 for an fp32
model, fp32 for bf16/fp16), so the coupling arithmetic itself loses almost
nothing and a reconstructed ``x2`` usually casts back to the same compute-
dtype bits; what remains is amplified recompute noise, bounded by anchors.

Like ``CheckpointSegment``, the chain is installed as the blocks' ``forward``:
the first block (head) runs the whole chain, later blocks (relays) return the
head's per-block outputs. A relay called with anything else raises: the
coupled architecture has no meaning for a block run on its own.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from revify.passes.record_calls import get_slot, set_slot, side_signature
from revify.runtime.checkpoint_segment import is_fed, opaque_to_dynamo, reshard_fsdp, unshard_fsdp


class ReconstructionError(RuntimeError):
    """A reconstructed activation differs from the stored one by more than the tolerance."""


@dataclass(frozen=True)
class Coupling:
    name: str
    lam: float
    beta: float
    switch: bool  # swap the streams after each step
    output: str  # the stream that carries the function after a step: "s1", "s2" or "mean"


# --- the functions F and G a step calls ------------------------------------------------
# Small picklable callables ``(x, args, kwargs) -> tensor``; ``args``/``kwargs`` are the
# side inputs of the head's call, with the hidden slot to be filled with ``x``.

class BlockCall:
    """A pretrained block's original forward, fed ``x`` in its hidden slot."""

    def __init__(self, forward: Callable, slot: tuple[str, Any], path: str):
        self.forward, self.slot, self.path = forward, slot, path

    def __call__(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        a, k = set_slot(args, kwargs, self.slot, x)
        out = self.forward(*a, **k)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{self.path} returned {type(out).__name__}; a reversible block must return "
                            "its hidden state as a single tensor")
        return out


class HalfCall:
    """One residual sub-layer of a block (MEFT3), from ``split_sublayers``."""

    def __init__(self, halves: Any, which: str):
        self.halves, self.which = halves, which

    def __call__(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        half = self.halves.first if self.which == "first" else self.halves.second
        return half(x, args, kwargs)


class WithAdapter:
    """``inner(x) + adapter(x)``: a parallel adapter, zero at initialisation."""

    def __init__(self, inner: Callable, adapter: nn.Module):
        self.inner, self.adapter = inner, adapter

    def __call__(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.inner(x, args, kwargs) + self.adapter(x)


class AdapterCall:
    def __init__(self, adapter: nn.Module):
        self.adapter = adapter

    def __call__(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.adapter(x)


class ResidualBranch:
    """``block(x) − x``: the residual function of a block, for RevNet couplings."""

    def __init__(self, inner: Callable):
        self.inner = inner

    def __call__(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.inner(x, args, kwargs) - x


@dataclass
class CouplingStep:
    f: Callable
    g: Callable | None  # None: y2 = β·x2 (the odd last step of a RevNet chain)
    # whose parameters F and G use; looked up at every call, so parameters replaced
    # after conversion (``to_empty``, FSDP2 sharding) are the ones differentiated
    f_modules: tuple[nn.Module, ...]
    g_modules: tuple[nn.Module, ...]
    blocks: tuple[int, ...]  # chain positions this step stands for
    buffers: tuple[tuple[nn.Module, str], ...] = ()  # updated in forward (BatchNorm statistics)
    # the pretrained block(s) of this step, for the starting-point error
    reference: Callable | None = None


ADAPTER_PREFIX = "revify_adapter"


def _params(modules: tuple[nn.Module, ...]) -> list[nn.Parameter]:
    """Parameters of ``modules``, without the adapters revify registered inside blocks."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        is_adapter = getattr(m, "revify_adapter", False)
        for name, p in m.named_parameters():
            if is_adapter or not name.startswith(ADAPTER_PREFIX):
                seen.setdefault(id(p), p)
    return list(seen.values())


def stream_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Streams one step wider than the compute dtype, where that is cheap."""
    if dtype == torch.float32:
        return torch.float64
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact64 = exact.detach().double()
    denom = exact64.norm().item()
    return (approx.detach().double() - exact64).norm().item() / max(denom, 1e-30)


def precision_state(x: torch.Tensor) -> str:
    """The precision the blocks compute in, as a label: ``"float32"``, ``"float32, autocast cpu bfloat16"``.

    Reconstruction error depends on it (bf16 recompute noise is ~1000× fp32's), so anchors are
    kept per precision state.
    """
    device = x.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return f"{str(x.dtype).removeprefix('torch.')}, autocast {device} " \
               f"{str(torch.get_autocast_dtype(device)).removeprefix('torch.')}"
    return str(x.dtype).removeprefix("torch.")


@dataclass
class AnchorSet:
    """Anchors calibrated for one precision state, and the reconstruction error they achieved."""

    precision: str
    anchors: tuple[int, ...]
    step_errors: list[float]  # per step: relative error of its reconstructed input (0 at anchors)
    calibrated_on: str  # "example inputs" (conversion) or "first training step"

    @property
    def max_error(self) -> float:
        return max(self.step_errors, default=0.0)


@dataclass
class Probe:
    """Compares reconstructed streams with exact ones, for checking or calibration.

    ``mode="check"`` raises ``ReconstructionError`` when the error exceeds
    ``tolerance``. ``mode="calibrate"`` places an anchor where it would, and
    goes on from the exact value: one backward pass finds the greedy anchors.
    """

    mode: str
    tolerance: float
    errors: dict[int, float] = field(default_factory=dict)  # step → error of its reconstructed input
    new_anchors: set[int] = field(default_factory=set)
    exact: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    precision: str | None = None  # the precision state the probed run ran in (``precision_state``)
    auto: bool = False  # started by the chain itself: its backward records the anchors it finds

    def visit(self, step: int, which: int, approx: torch.Tensor, where: str) -> torch.Tensor:
        exact = self.exact[step][which]
        err = relative_error(approx, exact)
        self.errors[step] = max(self.errors.get(step, 0.0), err)
        if err <= self.tolerance:  # NaN compares False: flagged
            return approx
        if self.mode == "check":
            raise ReconstructionError(
                f"{where}: reconstructed input of block {step} differs from the stored one by "
                f"{err:.3g} relative (tolerance {self.tolerance:g}); convert with a smaller tolerance "
                "or more anchors")
        self.new_anchors.add(step)
        return exact


@dataclass
class _Run:
    """What one forward of the chain leaves for its backward, besides saved tensors."""

    side_spec: Any
    compute_dtype: torch.dtype
    stream_dtype: torch.dtype
    device: torch.device
    autocast: list[tuple[str, bool, torch.dtype]]
    anchors: tuple[int, ...]
    random: bool
    n_rng: int = 0
    n_buf: int = 0
    probe: Probe | None = None


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    state = [("cpu", torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))]
    if torch.cuda.is_available():
        state.append(("cuda", torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
    return state


@contextlib.contextmanager
def _autocast(state: list[tuple[str, bool, torch.dtype]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device, enabled, dtype in state:
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


def _rng_get(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _rng_set(states: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


@contextlib.contextmanager
def _swapped(buffers: tuple[tuple[nn.Module, str], ...], values: list[torch.Tensor]) -> Iterator[None]:
    """Run on copies of the buffers' pre-forward values, so they are not updated twice."""
    originals = [(m, n, m._buffers[n]) for m, n in buffers]
    for (m, n), v in zip(buffers, values):
        m._buffers[n] = v.clone()
    try:
        yield
    finally:
        for m, n, b in originals:
            m._buffers[n] = b


class ReversibleChain:
    """The steps of one chain plus the state that links its head and relays."""

    def __init__(self, blocks: list[nn.Module], steps: list[CouplingStep],
                 coupling: Coupling, hidden_slot: tuple[str, Any], *, random: bool,
                 random_if_training: bool = False,
                 anchors: tuple[int, ...] = (), stream_dtype: torch.dtype | None = None,
                 check_tolerance: float | None = None, name: str = "",
                 tolerance: float | None = None, precision: str | None = None,
                 anchor_sets: dict[str, AnchorSet] | None = None):
        self.blocks = blocks
        self.steps = steps
        self.coupling = coupling
        self.hidden_slot = hidden_slot
        self.random = random
        self.random_if_training = random_if_training  # not seen random at conversion, but it was in eval
        self.anchors = tuple(sorted(anchors))
        self.precision = precision  # the precision state ``anchors`` were calibrated in (None: unknown)
        # anchors for other precision states, found on the first training step in each (shared
        # with the plan, which reports them); None tolerance: no automatic calibration
        self.anchor_sets: dict[str, AnchorSet] = {} if anchor_sets is None else anchor_sets
        self.tolerance = tolerance
        self.stream_dtype = stream_dtype
        self.check_tolerance = check_tolerance  # debug mode: compare every reconstruction
        self.name = name
        self.stored = False  # reference mode: ordinary autograd, every activation stored
        self.probe: Probe | None = None  # set by calibration for one step
        self.pending: list[Any] | None = None
        self.pending_check: tuple | None = None
        self.step_of_block = [0] * len(blocks)
        for i, s in enumerate(steps):
            for b in s.blocks:
                self.step_of_block[b] = i

    def __getstate__(self) -> dict:
        return {**self.__dict__, "pending": None, "pending_check": None, "probe": None}

    def install(self) -> None:
        self.blocks[0].forward = ReversibleHead(self)
        for k in range(1, len(self.blocks)):
            self.blocks[k].forward = ReversibleRelay(self, k)

    def uninstall(self) -> None:
        for b in self.blocks:
            b.__dict__.pop("forward", None)

    def parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for s in self.steps:
            for p in _params(s.f_modules) + _params(s.g_modules):
                seen.setdefault(id(p), p)
        return list(seen.values())

    def anchors_for(self, precision: str) -> tuple[int, ...] | None:
        """Anchors calibrated for ``precision``; None if that state was never calibrated."""
        if precision == self.precision:
            return self.anchors
        found = self.anchor_sets.get(precision)
        return None if found is None else found.anchors

    def record_anchors(self, probe: Probe, calibrated_on: str) -> AnchorSet:
        """Keep the anchors a calibrating probe found, for the precision state it ran in."""
        anchors = tuple(sorted(probe.new_anchors))
        errors = [0.0 if i in anchors else probe.errors.get(i, 0.0) for i in range(len(self.steps))]
        found = AnchorSet(probe.precision or "unknown", anchors, errors, calibrated_on)
        if calibrated_on == "example inputs":  # at conversion: the chain's own anchors
            self.anchors, self.precision = anchors, found.precision
        else:
            self.anchor_sets[found.precision] = found
        return found

    def start_point(self, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[float, float, list[float]]:
        """Chain output against the pretrained blocks, and the bound the scaling implies.

        Step i's function stream differs from the pretrained block applied to
        the previous function stream by the scaled other stream (and the
        adapters' output): ``ρ_i`` is that deviation relative to the block's
        output. If the pretrained blocks do not amplify perturbations, the
        chain output is within ``Π(1 + ρ_i) − 1`` of the original. Both are
        measured on ``x``; returns (error, bound, ρ per step).
        """
        cdt = x.dtype
        run = _Run(None, cdt, self.stream_dtype or stream_dtype_for(cdt), x.device, [], (), False)
        record: list = []
        with torch.no_grad():
            s1, s2, _ = self.forward_streams(x, args, kwargs, run, record=record)
            h, rhos = x, []
            for i, step in enumerate(self.steps):
                fin = self._select(*record[i]).to(cdt)
                ref = step.reference(fin, args, kwargs)
                rhos.append(relative_error(self._select(*record[i + 1]), ref))
                h = step.reference(h, args, kwargs)
            err = relative_error(self._select(s1, s2), h)
        return err, math.prod(1 + r for r in rhos) - 1, rhos

    # --- the coupled forward ---------------------------------------------------------
    def _select(self, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        if self.coupling.output == "s1":
            return s1
        if self.coupling.output == "s2":
            return s2
        return (s1 + s2) / 2

    def forward_streams(self, x: torch.Tensor, args: tuple, kwargs: dict, run: _Run,
                        rng: list | None = None, buffers: list | None = None,
                        anchors: dict | None = None, record: list | None = None) -> tuple:
        """All steps in order; returns the final streams and the function stream after each step."""
        c, cdt, sdt = self.coupling, run.compute_dtype, run.stream_dtype
        s1 = s2 = x.to(sdt)
        mids = []
        for i, step in enumerate(self.steps):
            if anchors is not None and i in run.anchors:
                anchors[i] = (s1, s2)
            if record is not None:
                record.append((s1, s2))
            if buffers is not None:
                buffers.extend(m._buffers[n].detach().clone() for m, n in step.buffers)
            x1, x2 = s1, s2
            if rng is not None:
                rng.append(_rng_get(x.device))
            f = step.f(x2.to(cdt), args, kwargs).to(sdt)
            y1 = f + x1 if c.lam == 1 else f + c.lam * x1
            if step.g is not None:
                if rng is not None:
                    rng.append(_rng_get(x.device))
                g = step.g(y1.to(cdt), args, kwargs).to(sdt)
                y2 = g + x2 if c.beta == 1 else g + c.beta * x2
            else:
                y2 = x2 if c.beta == 1 else c.beta * x2
            s1, s2 = (y2, y1) if c.switch else (y1, y2)
            mids.append(self._select(s1, s2))
        if record is not None:
            record.append((s1, s2))
        return s1, s2, mids

    def backward_step(self, i: int, s1: torch.Tensor, s2: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor,
                      args: tuple, kwargs: dict, run: _Run, rng: list, buffers: list,
                      anchors: dict, grads: dict[int, torch.Tensor], index: dict[int, int]) -> tuple:
        """Reconstruct step i's inputs from its outputs and backpropagate through it."""
        c, cdt, sdt, step = self.coupling, run.compute_dtype, run.stream_dtype, self.steps[i]
        y1, y2 = (s2, s1) if c.switch else (s1, s2)
        dy1, dy2 = (d2, d1) if c.switch else (d1, d2)
        probe = run.probe
        where = self.name or "reversible chain"
        unshard_fsdp(self.blocks[b] for b in step.blocks)  # FSDP2: gathered again for the recompute
        with _swapped(step.buffers, buffers):
            # a None gradient means none flows (an unused output): skip that
            # backward, so unused parameters get None as under plain autograd
            if step.g is not None:
                if rng:
                    _rng_set(rng[1], run.device)
                if dy2 is None:
                    with torch.no_grad():
                        g = step.g(y1.to(cdt), args, kwargs).to(sdt)
                    a = dy1
                else:
                    y1d = y1.detach().requires_grad_()
                    g = step.g(y1d.to(cdt), args, kwargs).to(sdt)
                    params = [p for p in _params(step.g_modules) if p.requires_grad]
                    out = torch.autograd.grad(g, [y1d] + params, dy2, allow_unused=True)
                    a = _add(dy1, out[0])
                    _accumulate(grads, index, params, out[1:])
                x2 = (y2 - g.detach()) if c.beta == 1 else (y2 - g.detach()) / c.beta
                del g
            else:
                a = dy1
                x2 = y2 if c.beta == 1 else y2 / c.beta
            if i in anchors:
                x2 = anchors[i][1]
            elif probe is not None:
                x2 = probe.visit(i, 1, x2, where)
            if rng:
                _rng_set(rng[0], run.device)
            dx2_f = None
            if a is None:
                with torch.no_grad():
                    f = step.f(x2.to(cdt), args, kwargs).to(sdt)
            else:
                x2d = x2.detach().requires_grad_()
                f = step.f(x2d.to(cdt), args, kwargs).to(sdt)
                params = [p for p in _params(step.f_modules) if p.requires_grad]
                out = torch.autograd.grad(f, [x2d] + params, a, allow_unused=True)
                dx2_f = out[0]
                _accumulate(grads, index, params, out[1:])
            if i in anchors:
                x1 = anchors[i][0]
            else:
                x1 = (y1 - f.detach()) if c.lam == 1 else (y1 - f.detach()) / c.lam
                if probe is not None:
                    x1 = probe.visit(i, 0, x1, where)
        # FSDP2: free the gathered parameters now; their gradients (returned by the Function)
        # still reach the unsharded parameters, which FSDP2's post-backward callback reduces
        reshard_fsdp(self.blocks[b] for b in step.blocks)
        dx1 = a if a is None or c.lam == 1 else c.lam * a
        dx2 = dy2 if dy2 is None or c.beta == 1 else c.beta * dy2
        dx2 = _add(dx2, dx2_f)
        return x1.detach(), x2.detach(), dx1, dx2

    # --- head and relays -------------------------------------------------------------
    def run_head(self, *args: Any, **kwargs: Any) -> Any:
        self.pending = None
        x = get_slot(args, kwargs, self.hidden_slot)
        if not isinstance(x, torch.Tensor):
            raise RuntimeError(f"{self.name}: the first block was called without its hidden-state tensor; "
                               "a reversible chain must be called as it was at conversion")
        side_args, side_kwargs = set_slot(args, kwargs, self.hidden_slot, None)
        leaves, spec = tree_flatten((side_args, side_kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            raise RuntimeError(f"{self.name}: a side input of the chain requires grad (e.g. cross-attention "
                               "states); reversible chains pass gradients only to the hidden state. "
                               "Convert with strategy='checkpoint' instead")
        cdt = x.dtype
        unshard_fsdp(self.blocks)  # FSDP2: the later blocks run here, not through their hooks
        params = [p for p in self.parameters() if p.requires_grad]
        reversible = torch.is_grad_enabled() and not self.stored and (x.requires_grad or params)
        precision = precision_state(x)
        probe, anchors = self.probe, self.anchors_for(precision)
        if probe is not None:  # calibration at conversion: find every anchor afresh
            probe.precision, anchors = precision, ()
        elif anchors is None and reversible and self.tolerance is not None:
            # a precision state not calibrated yet: this step stores the streams and places anchors
            probe, anchors = Probe("calibrate", self.tolerance, precision=precision, auto=True), ()
        elif self.check_tolerance is not None:
            probe = Probe("check", self.check_tolerance)
        run = _Run(spec, cdt, self.stream_dtype or stream_dtype_for(cdt), x.device,
                   _autocast_state(), self.anchors if anchors is None else anchors,
                   self.random or (self.random_if_training and self.blocks[0].training), probe=probe)
        if reversible:
            outs = _ReversibleFunction.apply(self, run, x, leaves, *params)
            out, mids = outs[0], list(outs[1:])
        else:
            # inference, or the reference mode: the same coupled function under plain autograd
            s1, s2, mids = self.forward_streams(x, side_args, side_kwargs, run)
            out = self._select(s1, s2).to(cdt)
            mids = [m.to(cdt) for m in mids[:-1]]
        per_block = [out if self.step_of_block[b] == len(self.steps) - 1 else mids[self.step_of_block[b]]
                     for b in range(len(self.blocks))]
        if len(per_block) > 1:
            self.pending = per_block
            self.pending_check = (side_signature(args, kwargs, self.hidden_slot),
                                  [t._version for t in per_block])
        return per_block[0]

    def run_relay(self, k: int, *args: Any, **kwargs: Any) -> Any:
        pending = self.pending
        if pending is not None and pending[k] is not None:
            side, versions = self.pending_check
            expected = pending[k - 1]
            if (is_fed(get_slot(args, kwargs, self.hidden_slot), expected) and expected._version == versions[k - 1]
                    and side_signature(args, kwargs, self.hidden_slot) == side):
                out = pending[k]
                if k == len(self.blocks) - 1:
                    self.pending = None
                else:
                    pending[k - 1] = None
                return out
        self.pending = None
        raise RuntimeError(
            f"{self.name}: block {k} of a reversible chain was called with something other than the "
            "previous block's output (the parent changed the hidden state between blocks, or called "
            "blocks out of order); reversible conversion needs blocks fed one into the next. "
            "Use strategy='checkpoint' for this model")


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _accumulate(grads: dict[int, torch.Tensor], index: dict[int, int], params: list, values: tuple) -> None:
    for p, g in zip(params, values):
        if g is None:
            continue
        k = index[id(p)]
        grads[k] = g if k not in grads else grads[k] + g


class _ReversibleFunction(torch.autograd.Function):
    """The whole chain as one autograd node; saves streams only at the end and at anchors."""

    @staticmethod
    def forward(ctx, chain: ReversibleChain, run: _Run, x: torch.Tensor, leaves: list, *params):
        args, kwargs = tree_unflatten(leaves, run.side_spec)
        rng: list | None = [] if run.random else None
        buffers: list = []
        anchors: dict = {}
        record = [] if run.probe is not None else None
        s1, s2, mids = chain.forward_streams(x, args, kwargs, run, rng=rng, buffers=buffers,
                                             anchors=anchors, record=record)
        if record is not None:
            run.probe.exact = {i: st for i, st in enumerate(record)}
        rng_flat = [t for states in (rng or []) for t in states]
        run.n_rng, run.n_buf = len(rng_flat), len(buffers)
        anchor_flat = [t for i in sorted(anchors) for t in anchors[i]]
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        ctx.save_for_backward(s1, s2, *anchor_flat, *tensors, *rng_flat, *buffers)
        ctx.chain, ctx.run = chain, run
        ctx.tensor_positions = [j for j, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        ctx.leaves = [None if isinstance(t, torch.Tensor) else t for t in leaves]
        ctx.params = params
        ctx.input_dtype = x.dtype
        ctx.set_materialize_grads(False)  # unused outputs arrive as None: no work for them
        ctx.rng_per_step = [] if rng is None else [1 if s.g is None else 2 for s in chain.steps]
        out = chain._select(s1, s2).to(x.dtype, copy=True)
        return (out, *[m.to(x.dtype, copy=True) for m in mids[:-1]])

    @staticmethod
    def backward(ctx, grad_out, *grad_mids):
        chain, run = ctx.chain, ctx.run
        saved = list(ctx.saved_tensors)
        s1, s2 = saved[0], saved[1]
        pos = 2
        anchors = {}
        for i in sorted(run.anchors):
            anchors[i] = (saved[pos], saved[pos + 1])
            pos += 2
        leaves = list(ctx.leaves)
        for j in ctx.tensor_positions:
            leaves[j] = saved[pos]
            pos += 1
        args, kwargs = tree_unflatten(leaves, run.side_spec)
        rng_flat = saved[pos:pos + run.n_rng]
        pos += run.n_rng
        buffers_flat = saved[pos:pos + run.n_buf]
        per_state = 2 if run.device.type == "cuda" else 1
        rng_steps, k = [], 0
        for n_calls in ctx.rng_per_step:
            rng_steps.append([rng_flat[k + c * per_state:k + (c + 1) * per_state] for c in range(n_calls)])
            k += n_calls * per_state
        buf_steps, k = [], 0
        for step in chain.steps:
            buf_steps.append(list(buffers_flat[k:k + len(step.buffers)]))
            k += len(step.buffers)

        sdt = run.stream_dtype
        index = {id(p): j for j, p in enumerate(ctx.params)}
        grads: dict[int, torch.Tensor] = {}
        last = len(chain.steps) - 1

        def add_output_grad(d1, d2, g):
            if g is None:
                return d1, d2
            g = g.to(sdt)
            if chain.coupling.output == "s1":
                return _add(d1, g), d2
            if chain.coupling.output == "s2":
                return d1, _add(d2, g)
            return _add(d1, g / 2), _add(d2, g / 2)

        d1, d2 = add_output_grad(None, None, grad_out)
        devices = [run.device] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=run.random), _autocast(run.autocast), \
                torch.enable_grad():
            for i in range(last, -1, -1):
                if i < last:
                    d1, d2 = add_output_grad(d1, d2, grad_mids[i])
                s1, s2, d1, d2 = chain.backward_step(i, s1, s2, d1, d2, args, kwargs, run,
                                                     rng_steps[i] if rng_steps else [], buf_steps[i],
                                                     anchors, grads, index)
        dx = _add(d1, d2)
        if dx is not None and ctx.needs_input_grad[2]:
            dx = dx.to(ctx.input_dtype)
        else:
            dx = None
        if run.probe is not None and run.probe.auto:
            chain.record_anchors(run.probe, "first training step")
            run.probe.exact = {}  # the streams stored for this one step
        param_grads = [grads.get(j) for j in range(len(ctx.params))]
        return (None, None, dx, None, *param_grads)


class ReversibleHead:
    """Installed as the first block's ``forward``."""

    revify_installed = True

    def __init__(self, chain: ReversibleChain):
        self.chain = chain

    @opaque_to_dynamo
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.chain.run_head(*args, **kwargs)


class ReversibleRelay:
    """Installed as the ``forward`` of every later block of the chain."""

    revify_installed = True

    def __init__(self, chain: ReversibleChain, index: int):
        self.chain = chain
        self.index = index

    @opaque_to_dynamo
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.chain.run_relay(self.index, *args, **kwargs)


@contextlib.contextmanager
def stored_activations(model: nn.Module) -> Iterator[nn.Module]:
    """Run the converted model's reversible chains with ordinary autograd.

    The architecture is the same (same couplings, adapters, RNG use); only
    the memory saving is off. Gradients of the reversible runtime are tested
    against this reference.
    """
    chains = reversible_chains(model)
    before = [c.stored for c in chains]
    for c in chains:
        c.stored = True
    try:
        yield model
    finally:
        for c, b in zip(chains, before):
            c.stored = b


def reversible_chains(model: nn.Module) -> list[ReversibleChain]:
    found: dict[int, ReversibleChain] = {}
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        if isinstance(fwd, ReversibleHead):
            found.setdefault(id(fwd.chain), fwd.chain)
    return list(found.values())
