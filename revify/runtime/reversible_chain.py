"""Runtime: a chain of blocks run as two-stream reversible couplings.

Coupling step i (MEFT, Liao et al. 2023; RevNet, Gomez et al. 2017)::

    y1 = λ·x1 + F_i(x2)          x2 = (y2 − G_i(y1)) / β
    y2 = β·x2 + G_i(y1)          x1 = (y1 − F_i(x2)) / λ      (inverse)

then, for MEFT1/MEFT2, the streams are switched. The chain input is copied
into both streams; the chain output is the stream that carries the
pretrained function (``Coupling.output``).

Each step is its own autograd node (``_StepFunction``), run when its block is
called, as in the original model: block k's call computes step k from the
streams step k−1 left behind and frees them, so forward holds two streams at a
time whatever the depth. No node saves an activation of its own: the last
step saves the final two streams, anchor steps (chosen at conversion by
measured reconstruction error) the exact streams at their input, and every
step its side inputs, RNG states and buffer snapshots. Backward visits the
steps in reverse: ``G`` is recomputed under autograd on the known ``y1``
(which also reconstructs ``x2``), then ``F`` on the reconstructed ``x2``
(which also reconstructs ``x1``), so reconstruction and recomputation share
one forward per function; the reconstructed streams and their gradients are
handed to the previous step's node. Parameters are inputs of their step's
node, so their gradients are returned to autograd step by step and
accumulate through the normal ``AccumulateGrad`` path (optimizers, grad hooks
and DDP see them once, as soon as they are ready). Side inputs that require
grad (a decoder's cross-attention encoder states) are inputs of every step's
node in the same way: each step returns its share of their gradient and
autograd sums the shares.

A block may return ``(hidden, *extras)``: the chain hands the extras back to
the parent in their places. A side input handed back (T5's position bias) is
returned as itself; a tensor the step computed (attention weights) is an
output of the step's node, whose backward raises if the loss depends on it.

Numerics: dividing by λ or β amplifies rounding error at every step. The
streams are kept in a wider dtype than the blocks compute in (fp64 for an fp32
model, fp32 for bf16/fp16), so the coupling arithmetic itself loses almost
nothing and a reconstructed ``x2`` usually casts back to the same compute-
dtype bits; what remains is amplified recompute noise, bounded by anchors.

Like ``CheckpointSegment``, the chain is installed as the blocks' ``forward``:
the first block (head) starts a run, later blocks (relays) continue it. A
relay called with anything but the previous block's output raises: the
coupled architecture has no meaning for a block run on its own.

This module holds the chain (the coupled forward, the backward of one step,
head and relays); the couplings and the F/G callables are in ``couplings``,
the per-step autograd node in ``reversible_step``, anchors and the
reconstruction check in ``reconstruction``.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .autocast_state import AutocastState
from .buffers import snapshot, swapped
from .call_arguments import get_slot, set_slot, side_signature
from .couplings import BlockCall, Coupling, CouplingStep, _params, stream_dtype_for
from .fsdp import is_fed, reshard_fsdp, unshard_fsdp
from .installed_forward import InstalledHead, install_forwards, uninstall_forwards
from .reconstruction import AnchorSet, Probe, precision_state, relative_error
from .reversible_step import _Run, _Side, _StepFunction, _accumulate, _add, _is_new, _step_extras
from .rng import RngState


@dataclass
class _Pending:
    """Between a chain's block calls in forward: what the next block must be fed."""

    run: _Run
    next_block: int
    output: torch.Tensor  # the previous block's output
    version: int
    side: Any  # side_signature of the previous block's call


def _autocast_now() -> AutocastState:
    """The autocast state a step's backward recomputes under: the CPU's, and CUDA's where there is one."""
    return AutocastState.capture(("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))


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
        self.pending: _Pending | None = None
        self.step_of_block = [0] * len(blocks)
        for i, s in enumerate(steps):
            for b in s.blocks:
                self.step_of_block[b] = i

    def __getstate__(self) -> dict:
        return {**self.__dict__, "pending": None, "probe": None}

    def install(self) -> None:
        install_forwards(self, self.blocks)

    def uninstall(self) -> None:
        uninstall_forwards(self.blocks)

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

    def start_point(self, x: torch.Tensor, sides: list[tuple[tuple, dict]]) -> tuple[float, float, list[float]]:
        """Chain output against the pretrained blocks, and the bound the scaling implies.

        Step i's function stream differs from the pretrained block applied to
        the previous function stream by the scaled other stream (and the
        adapters' output): ``ρ_i`` is that deviation relative to the block's
        output. If the pretrained blocks do not amplify perturbations, the
        chain output is within ``Π(1 + ρ_i) − 1`` of the original. Both are
        measured on ``x``, each step with ``sides[i]`` (its block's side inputs; one pair: all steps');
        returns (error, bound, ρ per step).
        """
        cdt = x.dtype
        sdt = self.stream_dtype or stream_dtype_for(cdt, self.coupling)
        with torch.no_grad():
            s1 = s2 = x.to(sdt)
            h, rhos = x, []
            for i, step in enumerate(self.steps):
                args, kwargs = sides[i] if len(sides) > 1 else sides[0]
                ref = step.reference(self._select(s1, s2).to(cdt), args, kwargs)
                s1, s2 = self.step_forward(i, s1, s2, args, kwargs, cdt, sdt)
                rhos.append(relative_error(self._select(s1, s2), ref))
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

    def step_forward(self, i: int, s1: torch.Tensor, s2: torch.Tensor, args: tuple, kwargs: dict,
                     cdt: torch.dtype, sdt: torch.dtype, device: torch.device | None = None,
                     rng: list | None = None, buffers: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Coupling step i on the streams; records RNG states and buffer snapshots when asked."""
        c, step = self.coupling, self.steps[i]
        if buffers is not None:
            buffers.extend(snapshot(step.buffers))
        x1, x2 = s1, s2
        if rng is not None:
            rng.append(RngState.capture([device]))
        f = step.f(x2.to(cdt), args, kwargs).to(sdt)
        y1 = f + x1 if c.lam == 1 else f + c.lam * x1
        if step.g is not None:
            if rng is not None:
                rng.append(RngState.capture([device]))
            g = step.g(y1.to(cdt), args, kwargs).to(sdt)
            y2 = g + x2 if c.beta == 1 else g + c.beta * x2
        else:
            y2 = x2 if c.beta == 1 else c.beta * x2
        return (y2, y1) if c.switch else (y1, y2)

    def step_params(self, i: int) -> list[nn.Parameter]:
        """Trainable parameters step i differentiates (looked up per call: freezing may change)."""
        step, seen = self.steps[i], {}
        for p in _params(step.f_modules) + _params(step.g_modules):
            if p.requires_grad:
                seen.setdefault(id(p), p)
        return list(seen.values())

    def backward_step(self, i: int, s1: torch.Tensor, s2: torch.Tensor, d1: torch.Tensor | None,
                      d2: torch.Tensor | None, args: tuple, kwargs: dict, run: _Run, rng: list, buffers: list,
                      anchor: tuple[torch.Tensor, torch.Tensor] | None, grads: dict[int, torch.Tensor],
                      index: dict[int, int], side_inputs: tuple[torch.Tensor, ...] = ()) -> tuple:
        """Reconstruct step i's inputs from its outputs and backpropagate through it.

        ``side_inputs``: the side inputs that require grad, as leaves inside ``args``/``kwargs``;
        their gradients are accumulated in ``grads`` beside the parameters'.
        """
        c, cdt, sdt, step = self.coupling, run.compute_dtype, run.stream_dtype, self.steps[i]
        y1, y2 = (s2, s1) if c.switch else (s1, s2)
        dy1, dy2 = (d2, d1) if c.switch else (d1, d2)
        probe = run.probe
        where = self.name or "reversible chain"
        unshard_fsdp(self.blocks[b] for b in step.blocks)  # FSDP2: gathered again for the recompute
        with swapped(step.buffers, buffers):
            # a None gradient means none flows (an unused output): skip that
            # backward, so unused parameters get None as under plain autograd
            if step.g is not None:
                if rng:
                    rng[1].restore()
                if dy2 is None:
                    with torch.no_grad():
                        g = step.g(y1.to(cdt), args, kwargs).to(sdt)
                    a = dy1
                else:
                    y1d = y1.detach().requires_grad_()
                    g = step.g(y1d.to(cdt), args, kwargs).to(sdt)
                    params = [p for p in _params(step.g_modules) if p.requires_grad] + list(side_inputs)
                    out = torch.autograd.grad(g, [y1d] + params, dy2, allow_unused=True)
                    a = _add(dy1, out[0])
                    _accumulate(grads, index, params, out[1:])
                x2 = (y2 - g.detach()) if c.beta == 1 else (y2 - g.detach()) / c.beta
                del g
            else:
                a = dy1
                x2 = y2 if c.beta == 1 else y2 / c.beta
            if anchor is not None:
                x2 = anchor[1]
            elif probe is not None:
                x2 = probe.visit(i, 1, x2, where)
            if rng:
                rng[0].restore()
            dx2_f = None
            if a is None:
                with torch.no_grad():
                    f = step.f(x2.to(cdt), args, kwargs).to(sdt)
            else:
                x2d = x2.detach().requires_grad_()
                f = step.f(x2d.to(cdt), args, kwargs).to(sdt)
                params = [p for p in _params(step.f_modules) if p.requires_grad] + list(side_inputs)
                out = torch.autograd.grad(f, [x2d] + params, a, allow_unused=True)
                dx2_f = out[0]
                _accumulate(grads, index, params, out[1:])
            if anchor is not None:
                x1 = anchor[0]
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
        """The first block: start a run of the chain and compute its first step."""
        self.pending = None
        x = get_slot(args, kwargs, self.hidden_slot)
        if not isinstance(x, torch.Tensor):
            raise RuntimeError(f"{self.name}: the first block was called without its hidden-state tensor; "
                               "a reversible chain must be called as it was at conversion")
        side = self._side(args, kwargs)
        cdt = x.dtype
        reversible = torch.is_grad_enabled() and not self.stored and (
            x.requires_grad or bool(side.grad) or any(p.requires_grad for p in self.parameters()))
        precision = precision_state(x)
        probe, anchors = self.probe, self.anchors_for(precision)
        if probe is not None:  # calibration at conversion: find every anchor afresh
            probe.precision, anchors = precision, ()
        elif anchors is None and reversible and self.tolerance is not None:
            # a precision state not calibrated yet: this step stores the streams and places anchors
            probe, anchors = Probe("calibrate", self.tolerance, precision=precision, auto=True), ()
        elif self.check_tolerance is not None:
            probe = Probe("check", self.check_tolerance)
        run = _Run({0: side}, cdt, self.stream_dtype or stream_dtype_for(cdt, self.coupling), x.device,
                   _autocast_now(), self.anchors if anchors is None else anchors,
                   self.random or (self.random_if_training and self.blocks[0].training), probe=probe,
                   reversible=reversible)
        return self._run_block(0, run, x, side_signature(args, kwargs, self.hidden_slot))

    def run_relay(self, k: int, *args: Any, **kwargs: Any) -> Any:
        """A later block: check it is fed the previous block's output, then compute its step.

        A block that starts a step brings that step's side inputs (Gemma 2 alternates sliding-window
        and full attention masks); the second block of a RevNet step (G), whose step ran at the first
        block's call, must be called with the first one's."""
        pending, self.pending = self.pending, None
        if pending is not None and pending.next_block == k:
            h = get_slot(args, kwargs, self.hidden_slot)
            signature = side_signature(args, kwargs, self.hidden_slot)
            i = self.step_of_block[k]
            starts_step = self.steps[i].blocks[0] == k
            if is_fed(h, pending.output) and pending.output._version == pending.version:
                if starts_step:
                    pending.run.sides[i] = self._side(args, kwargs)
                    return self._run_block(k, pending.run, h, signature)
                if signature == pending.side:
                    return self._run_block(k, pending.run, h, signature)
                raise RuntimeError(
                    f"{self.name}: block {k} was called with other side inputs (mask, position embeddings) than "
                    f"block {k - 1}, but both run as one coupling step at block {k - 1}'s call, with its side "
                    "inputs (coupling='revnet'); use a MEFT coupling, whose steps are one block each")
        raise RuntimeError(
            f"{self.name}: block {k} of a reversible chain was called with something other than the "
            "previous block's output (the parent changed the hidden state between blocks, or called "
            "blocks out of order); reversible conversion needs blocks fed one into the next. "
            "Use strategy='checkpoint' for this model")

    def _side(self, args: tuple, kwargs: dict) -> _Side:
        """A block call's side inputs: everything but the hidden state, which the step's streams replace."""
        return _Side.of(*set_slot(args, kwargs, self.hidden_slot, None), torch.is_grad_enabled())

    def _run_block(self, k: int, run: _Run, h: torch.Tensor, side: Any) -> torch.Tensor:
        i = self.step_of_block[k]
        # a step that stands for two blocks (RevNet: F and G) runs when its first block is
        # called; the second block passes the step's output on
        out = self._run_step(i, run, h) if self.steps[i].blocks[0] == k else h
        extras = run.extras.pop(k, None)
        if k < len(self.blocks) - 1:
            self.pending = _Pending(run, k + 1, out, out._version, side)
        return out if extras is None else (out, *extras)

    def _place_extras(self, i: int, run: _Run, returned: tuple | None) -> None:
        """File each block's extras for its call to return; ``returned`` replaces the step node's new tensors."""
        it = iter(returned or ())
        for b, ex in zip(self.steps[i].blocks, _step_extras(self.steps[i], run, i)):
            if ex is not None and returned is not None:
                ex = tuple(next(it) if isinstance(e, torch.Tensor) and _is_new(e, run, i) else e for e in ex)
            if ex is not None:
                run.extras[b] = ex
        for src in self.steps[i].extras_from:  # handed on: the block call need not keep them alive
            if isinstance(src, BlockCall):
                src.extras = None

    def _run_step(self, i: int, run: _Run, h: torch.Tensor) -> torch.Tensor:
        step = self.steps[i]
        # FSDP2: the step's other blocks run here, not through their own hooks
        unshard_fsdp(self.blocks[b] for b in step.blocks[1:])
        if run.reversible:
            params = self.step_params(i)
            side = [run.sides[i].leaves[j] for j in run.sides[i].grad]
            out, *extras = _StepFunction.apply(self, run, i, h, len(params), *params, *side)
            self._place_extras(i, run, tuple(extras))
            if run.first_in_graph is None and out.requires_grad:
                run.first_in_graph = i
            return out
        # inference, or the reference mode: the same coupled function under plain autograd
        cdt, sdt = run.compute_dtype, run.stream_dtype
        s1, s2 = (h.to(sdt), h.to(sdt)) if i == 0 else run.streams
        args, kwargs = run.side(i)
        s1, s2 = self.step_forward(i, s1, s2, args, kwargs, cdt, sdt)
        run.streams = None if i == len(self.steps) - 1 else (s1, s2)
        self._place_extras(i, run, None)
        return self._select(s1, s2).to(cdt)


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
        if isinstance(fwd, InstalledHead) and isinstance(fwd.owner, ReversibleChain):
            found.setdefault(id(fwd.owner), fwd.owner)
    return list(found.values())
