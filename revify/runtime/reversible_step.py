"""Runtime: one reversible coupling step as an autograd node that saves no activation of its own.

Each step of a ``ReversibleChain`` runs when its block is called, as
``_StepFunction``: forward takes the two streams the previous step left in
the run (``_Run``) and saves only RNG states, buffer snapshots, side inputs,
the exact streams if the step is an anchor, and the final streams if it is
the last. Backward reconstructs the step's inputs from the streams the next
step's backward handed over (``_Backward``), backpropagates through F and G
(``ReversibleChain.backward_step``), and hands the reconstructed streams and
their gradients on to the previous step's node.

Before (plain autograd)::

    block k's node saves its LayerNorm input, attention probabilities, dropout masks, ...

After::

    _StepFunction node k saves: RNG states (+ streams if anchor, + final streams if last)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .autocast_state import AutocastState
from .couplings import BlockCall, Coupling, CouplingStep, FixedExtras
from .reconstruction import Probe
from .rng import RngState


@dataclass
class _Side:
    """One block call's side inputs (mask, position embeddings), flattened, and which of them require grad."""

    leaves: list  # tensors included
    spec: Any
    # positions in ``leaves`` of side inputs that require grad (cross-attention states): inputs of the
    # step's node, which returns its share of their gradient
    grad: tuple[int, ...] = ()

    @classmethod
    def of(cls, args: tuple, kwargs: dict, grad_enabled: bool) -> "_Side":
        leaves, spec = tree_flatten((args, kwargs))
        grad = tuple(j for j, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad) \
            if grad_enabled else ()
        return cls(leaves, spec, grad)

    def unflatten(self, leaves: list | None = None) -> tuple[tuple, dict]:
        return tree_unflatten(self.leaves if leaves is None else leaves, self.spec)


@dataclass
class _Run:
    """One forward of the chain, shared by its per-step autograd nodes.

    In forward it carries the two streams from one block's call to the next
    (``streams``); in backward it carries the reconstructed streams and their
    gradients from step i+1's node to step i's (``backward``). Both are
    dropped as soon as the last user is done, so nothing outlives a step.
    """

    # per step, the side inputs of the call of its block: each step runs with its own (Gemma 2 and 3
    # alternate sliding-window and full attention masks between layers)
    sides: dict[int, _Side]
    compute_dtype: torch.dtype
    stream_dtype: torch.dtype
    device: torch.device
    autocast: AutocastState  # what the user's forward ran under; backward recomputes under it again
    anchors: tuple[int, ...]
    random: bool
    probe: Probe | None = None
    reversible: bool = True  # False: plain autograd (inference, or the stored-activation reference)
    streams: tuple[torch.Tensor, torch.Tensor] | None = None  # after the last step run so far
    first_in_graph: int | None = None  # the lowest step whose node autograd will call
    backward: _Backward | None = None
    extras: dict[int, tuple] = field(default_factory=dict)  # block → extras for its call to return

    def side(self, i: int) -> tuple[tuple, dict]:
        return self.sides[i].unflatten()


@dataclass
class _Backward:
    """Handed from step i+1's backward to step i's: the streams at step i+1's input, reconstructed."""

    step: int  # the step these are the inputs of
    streams: tuple[torch.Tensor, torch.Tensor]
    grads: tuple[torch.Tensor | None, torch.Tensor | None]


def _step_extras(step: CouplingStep, run: _Run, i: int) -> list[tuple | None]:
    """The extras each block of step ``i`` returned in the step just run (None: it returns a plain tensor)."""
    if not step.extras_from:
        return [None] * len(step.blocks)
    leaves = run.sides[i].leaves
    return [src.resolve(leaves) if isinstance(src, FixedExtras) else src.extras for src in step.extras_from]


def _is_new(t: torch.Tensor, run: _Run, i: int) -> bool:
    """An extra step ``i`` computed, as opposed to a side input handed back (T5 passes its position bias on)."""
    return not any(t is leaf for leaf in run.sides[i].leaves)


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


class _StepFunction(torch.autograd.Function):
    """One coupling step as an autograd node that saves no activation of its own.

    Forward takes the streams the previous step left in the run (the tensor
    ``h`` the block was called with only links the nodes, so backward visits
    them in reverse order) and saves only RNG states, buffer snapshots, side
    inputs, the exact streams if this step is an anchor, and the final streams
    if it is the last step. Backward reconstructs the step's inputs from the
    streams the next step's backward handed over, and hands them on; only the
    first step returns a gradient for ``h`` (the chain input), the others pass
    theirs through the run. ``chain`` is the ``ReversibleChain`` the step
    belongs to (typed ``Any``: ``reversible_chain`` imports this module, and
    a cycle would come back through the annotation).
    """

    @staticmethod
    def forward(ctx, chain: Any, run: _Run, i: int, h: torch.Tensor, n_params: int, *inputs):
        cdt, sdt = run.compute_dtype, run.stream_dtype
        s1, s2 = (h.to(sdt), h.to(sdt)) if i == 0 else run.streams
        if run.probe is not None:
            run.probe.exact[i] = (s1, s2)
        args, kwargs = run.side(i)
        rng: list[RngState] | None = [] if run.random else None
        buffers: list = []
        n1, n2 = chain.step_forward(i, s1, s2, args, kwargs, cdt, sdt, run.device, rng, buffers)
        last = i == len(chain.steps) - 1
        run.streams = None if last else (n1, n2)
        if last and run.probe is not None:
            run.probe.exact[i + 1] = (n1, n2)
        anchor = i in run.anchors
        side = [t for t in run.sides[i].leaves if isinstance(t, torch.Tensor)]
        rng_flat = [t for state in (rng or []) for t in state.tensors()]
        ctx.save_for_backward(*((s1, s2) if anchor else ()), *((n1, n2) if last else ()), *side, *rng_flat,
                              *buffers)
        ctx.layout = (anchor, last, len(side), len(rng or ()), len(buffers))
        ctx.chain, ctx.run, ctx.i = chain, run, i
        ctx.params, ctx.n_side = inputs[:n_params], len(inputs) - n_params
        ctx.input_dtype = h.dtype
        ctx.set_materialize_grads(False)  # an unused output arrives as None: no work for it
        # extras the blocks computed (attention weights) are outputs of this node: if the loss
        # depends on them, backward says so instead of dropping their gradient
        new = [e for ex in _step_extras(chain.steps[i], run, i) if ex is not None for e in ex
               if isinstance(e, torch.Tensor) and _is_new(e, run, i)]
        new = [e if e._base is None and not any(e is x for x in inputs) else e.clone() for e in new]
        ctx.mark_non_differentiable(*[e for e in new if not e.is_floating_point()])
        return (chain._select(n1, n2).to(h.dtype, copy=True), *new)

    @staticmethod
    def backward(ctx, grad_out, *extra_grads):
        chain, run, i = ctx.chain, ctx.run, ctx.i
        if any(g is not None for g in extra_grads):
            blocks = ", ".join(str(b) for b in chain.steps[i].blocks)
            raise RuntimeError(
                f"{chain.name}: the loss depends on a tensor block {blocks} returns beside its hidden state "
                "(e.g. attention weights); a reversible chain passes gradients only through the hidden "
                "state. Convert with strategy='checkpoint', or do not use that output in the loss")
        anchor_saved, last, n_side, n_rng_calls, n_buf = ctx.layout
        saved = list(ctx.saved_tensors)
        anchor = (saved.pop(0), saved.pop(0)) if anchor_saved else None
        final = (saved.pop(0), saved.pop(0)) if last else None
        side, saved = saved[:n_side], saved[n_side:]
        it = iter(side)  # the saved side tensors, in their places among the other leaves
        own = run.sides[i]
        leaves = [next(it) if isinstance(t, torch.Tensor) else t for t in own.leaves]
        # side inputs that require grad become leaves of the recompute, differentiated with the parameters
        side_inputs = tuple(leaves[j].detach().requires_grad_() for j in own.grad) if ctx.n_side else ()
        for j, t in zip(own.grad, side_inputs):
            leaves[j] = t
        args, kwargs = own.unflatten(leaves)
        cuda = (run.device,) if run.device.type == "cuda" else ()
        per_state = 1 + len(cuda)
        rng = [RngState.from_tensors(cuda, saved[c * per_state:(c + 1) * per_state]) for c in range(n_rng_calls)]
        buffers = saved[n_rng_calls * per_state:][:n_buf]

        if last:
            (s1, s2), (d1, d2) = final, (None, None)
        elif run.backward is not None and run.backward.step == i + 1:
            (s1, s2), (d1, d2) = run.backward.streams, run.backward.grads
        else:
            raise RuntimeError(
                f"{chain.name}: backward reached step {i} without passing through the chain's later "
                "steps; a reversible chain reconstructs activations from its last output, so the loss "
                "must depend on it")
        run.backward = None
        d1, d2 = _add_output_grad(chain.coupling, d1, d2, grad_out, run.stream_dtype)
        index = {id(p): j for j, p in enumerate(tuple(ctx.params) + side_inputs)}
        grads: dict[int, torch.Tensor] = {}
        with torch.random.fork_rng(devices=cuda, enabled=run.random), run.autocast.entered(), \
                torch.enable_grad():
            s1, s2, d1, d2 = chain.backward_step(i, s1, s2, d1, d2, args, kwargs, run, rng, buffers,
                                                 anchor, grads, index, side_inputs)
        for src in chain.steps[i].extras_from:  # the recompute's extras: nobody reads them
            if isinstance(src, BlockCall):
                src.extras = None
        param_grads = [grads.get(j) for j in range(len(ctx.params) + len(side_inputs))]
        if i > (run.first_in_graph or 0):
            run.backward = _Backward(i, (s1, s2), (d1, d2))
            return (None, None, None, None, None, *param_grads)
        # the first step autograd visits: the end of this backward pass through the chain
        if run.probe is not None and run.probe.auto:
            chain.record_anchors(run.probe, "first training step")
            run.probe.exact = {}  # the streams stored for this one step
        dx = _add(d1, d2)
        dx = dx.to(ctx.input_dtype) if dx is not None and ctx.needs_input_grad[3] else None
        return (None, None, None, dx, None, *param_grads)


def _add_output_grad(coupling: Coupling, d1: torch.Tensor | None, d2: torch.Tensor | None,
                     g: torch.Tensor | None, sdt: torch.dtype) -> tuple:
    """Add the gradient of a step's output (the function stream) to the streams' gradients."""
    if g is None:
        return d1, d2
    g = g.to(sdt)
    if coupling.output == "s1":
        return _add(d1, g), d2
    if coupling.output == "s2":
        return d1, _add(d2, g)
    return _add(d1, g / 2), _add(d2, g / 2)
