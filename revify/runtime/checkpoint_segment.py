"""Runtime: run a segment of a chain as one non-reentrant checkpoint.

The blocks of a chain are called one by one by their parent, whose code may
be opaque (an eager transformers loop). To checkpoint several blocks as one
region without touching the parent, the segment's first block (the *head*)
runs the whole segment inside ``torch.utils.checkpoint.checkpoint`` and keeps
the intermediate outputs; each later block (a *relay*) returns its output
when the parent calls it with exactly the tensor the head produced for it.
If the parent passes anything else (it changed the hidden state between
blocks, or called blocks out of order) the relay computes the block itself,
checkpointed on its own: slower, never wrong.

Why not wrap the blocks in a new module? That renames every parameter
(``layer.0.x`` → ``layer.0.wrapped.x``) and breaks ``state_dict`` and
optimizer code. The head and relay are installed as the blocks' ``forward``
instead, so module names, hooks and parameters are unchanged.

If the parent stops before calling every relay (an early exit), the head's
extra outputs are held until the next forward; ``copy.deepcopy`` and pickling
drop them.

Buffers that blocks update in forward (BatchNorm running stats) are swapped
for copies during recomputation, so the recompute does not update them a
second time and the saved originals are never modified in place.
"""
from __future__ import annotations

import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import (SAC_IGNORED_OPS, CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

import functools

from revify.passes.capture.record_calls import fed_tensor, get_slot, set_slot, side_signature

from .argument_check import runtime_refusal, warn_plain

if TYPE_CHECKING:
    from .checkpoint_stem import CheckpointStem, StemInput


def opaque_to_dynamo(fn: Callable) -> Callable:
    """Run ``fn`` eagerly under ``torch.compile``: dynamo breaks the graph around it.

    Blocks are recomputed in backward, outside any compiled region, so in eager
    mode. If dynamo compiled their forward, forward and recompute would run
    different kernels: inductor draws dropout masks from its own generator
    (recomputed masks would differ: wrong gradients) and fuses arithmetic
    (recomputed values would differ in the last bits: checkpoint gradients no
    longer bit-identical, reversible reconstructions off). Eager on both sides
    keeps them identical; the rest of the model still compiles.
    """
    return torch.compiler.disable(fn, recursive=True)


def _fsdp_module_class() -> type | None:
    # no module can be FSDP2-sharded before torch.distributed.fsdp is imported: skip the import
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return getattr(fsdp, "FSDPModule", None)


def unshard_fsdp(modules: Iterable[nn.Module]) -> None:
    """All-gather the parameters of FSDP2-sharded blocks that revify runs without their ``__call__``.

    A head runs the later blocks of its segment or chain (and backward
    recomputes them) through their original ``forward``, so FSDP2's
    pre-forward hook, which unshards parameters, does not fire for them.
    ``FSDPModule.unshard`` is a no-op for unsharded blocks; FSDP2 reshards them
    itself (after the relay's forward, and in its post-backward callback,
    which also reduce-scatters their gradients).
    """
    cls = _fsdp_module_class()
    if cls is not None:
        for m in modules:
            if isinstance(m, cls):
                m.unshard()


def reshard_fsdp(modules: Iterable[nn.Module]) -> None:
    cls = _fsdp_module_class()
    if cls is not None:
        for m in modules:
            if isinstance(m, cls):
                m.reshard()


def is_fed(value: Any, expected: torch.Tensor) -> bool:
    """``value`` is ``expected``, or FSDP2's pass-through alias of it.

    FSDP2 routes every grad-requiring input of a sharded module through an
    identity autograd Function (``RegisterPostBackwardFunction``) whose
    backward only triggers its gradient reduction: same storage and values,
    gradient passed unchanged. Any other alias (a view, a custom Function that
    could change the gradient) does not count.
    """
    if value is expected:
        return True
    fn = getattr(value, "grad_fn", None)
    cls = getattr(fn, "_forward_cls", None)
    return (cls is not None and cls.__name__ == "RegisterPostBackwardFunction"
            and cls.__module__.startswith("torch.distributed.fsdp")
            and any(f is expected.grad_fn for f, _ in fn.next_functions)
            and value.data_ptr() == expected.data_ptr() and value.shape == expected.shape
            and value.stride() == expected.stride() and value.dtype == expected.dtype)


def original_forward(module: nn.Module) -> Callable:
    """The forward a module had before revify installed anything."""
    fwd = module.__dict__.get("forward")
    if getattr(fwd, "revify_installed", False):
        raise ValueError("module is already converted")
    if fwd is not None:
        return fwd
    # a partial of the class function, not a bound method: pickling a bound
    # method re-reads module.forward, which would then be the installed relay
    return functools.partial(type(module).forward, module)


class _Pending:
    """Outputs the head computed ahead of the parent's calls, for one forward.

    ``versions`` and ``side`` let a relay check that the parent passes exactly
    what the head assumed: the same tensor, not modified in place since, with
    the same other arguments.
    """

    def __init__(self, outputs: list[Any], side: tuple, rng_before: list):
        self.outputs = outputs
        self.rng_before = rng_before  # RNG state before each block, for a relay that computes itself
        self.versions = [fed._version if fed is not None else None
                         for fed in (fed_tensor(o)[0] for o in outputs)]
        self.side = side


class _RunState:
    """Per-forward state of one head call: run count and buffers before the forward."""

    def __init__(self) -> None:
        self.calls = 0
        self.buffers_before: list[torch.Tensor] = []
        self.rng_before: list = []


class RngStates:
    """The CPU generator's state and that of every CUDA device in ``devices``, to replay random ops."""

    def __init__(self, devices: Iterable[torch.device]):
        self.cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
        self.cpu = torch.get_rng_state()
        self.states = [torch.cuda.get_rng_state(d) for d in self.cuda]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in zip(self.cuda, self.states):
            torch.cuda.set_rng_state(state, d)


# ops whose outputs the ``save_matmuls`` policy keeps: the compute-bound ones, so
# that backward recomputes only the memory-bound ops between them
_SAVED_BY_SAVE_MATMULS = frozenset(
    op for name in ("mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention",
                    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
                    "_scaled_dot_product_cudnn_attention")
    if (op := getattr(torch.ops.aten, name, None)) is not None)


def draws_random(func, args: tuple, kwargs: dict) -> bool:
    """Whether this call of ``func`` draws from the RNG: a seeded op, unless its ``dropout_p`` is zero.

    A fused attention kernel with dropout (CUDA's flash, memory-efficient and cuDNN
    kernels) advances the device's RNG inside the op. Kept instead of recomputed, it
    would not advance it in the recompute, and every later dropout of the segment
    would draw another mask than the forward did (seen on an H200: BERT and GPT-2
    gradients differed). The same kernel with ``dropout_p=0`` draws nothing.
    """
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == "dropout_p":
            p = kwargs["dropout_p"] if "dropout_p" in kwargs else args[i] if i < len(args) else arg.default_value
            return bool(p)
    return True


def saves_under_save_matmuls(func, args: tuple, kwargs: dict) -> bool:
    """The ``save_matmuls`` policy's choice for one op call: keep compute-bound ops that draw no random numbers."""
    return func.overloadpacket in _SAVED_BY_SAVE_MATMULS and not draws_random(func, args, kwargs)


def _save_matmuls(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if saves_under_save_matmuls(func, args, kwargs):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


@functools.lru_cache(maxsize=None)
def _op_name(func) -> str:
    return str(func)  # formatting an OpOverload costs microseconds; the policy asks on every op


OpLists = tuple[tuple[tuple[int, str], ...], ...]


@dataclass(frozen=True)
class _Blank:
    """Shape of an elided op's output tensor, recorded in forward."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def op_digest(names: Iterable[str]) -> int:
    """A checksum of a block's op sequence: elision applies only to the sequence it was planned on."""
    return zlib.crc32("\n".join(names).encode())


def _blank_of(t: torch.Tensor) -> _Blank | None:
    """The shape to hand back for ``t`` in recompute; None when a fresh blank could not stand in for it
    (a subclass, or a view into a larger or offset storage)."""
    if type(t) is not torch.Tensor or t.storage_offset() != 0:
        return None
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else 0
    if t.untyped_storage().nbytes() != span * t.element_size():
        return None
    return _Blank(tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def _has_forward_hooks(module: nn.Module) -> bool:
    """Hooks on a block's modules run again in recompute and could read an elided op's blank."""
    from torch.nn.modules import module as module_mod

    if module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


class SaveListedOps:
    """Selective checkpointing policy: keep the outputs of the ops the planner listed.

    ``saved_ops[k]`` lists ``(index, op name)`` pairs for the k-th block of a
    segment; ``index`` counts the ops selective checkpointing sees in that
    block's forward (``profile_blocks`` counts the same ones). The op name is
    checked too, so a forward that runs different ops than when profiled
    (another input shape taking another path) saves less, never a wrong
    tensor. Any consistent choice is correct: what is not saved is
    recomputed. One instance serves one checkpoint call; the segment tells it
    which block runs (``enter``).

    ``elided_ops`` (same form) are ops the recompute skips
    (``passes/planning/save_ops_menu``): the forward records the shapes of their
    outputs, and ``_ElideDeadOps`` hands back uninitialised tensors of those
    shapes in recompute. Which ops are dead depends on the whole block's
    dataflow, so a block elides only when its forward ran exactly the op
    sequence it was planned on (``digests``, one ``op_digest`` per block,
    None: do not elide there); otherwise its recompute runs every op. The
    plan assumed every parameter may require grad (``profile_blocks``), so
    unfreezing layers later does not make an elided op needed.
    """

    def __init__(self, saved_ops: OpLists, elided_ops: OpLists | None = None,
                 digests: tuple[int | None, ...] | None = None):
        self.saved = [dict(ops) for ops in saved_ops]
        self.elided = [dict(ops) for ops in elided_ops] if elided_ops else [{} for _ in saved_ops]
        self.digests = digests
        self.block: int | None = 0  # None between blocks: ops there belong to no block
        self.index = 0
        # per block, filled in forward: every op's name, the ops not saved in order (what the
        # recompute runs), and the output shapes of those to elide
        self.names: list[list[str]] = [[] for _ in saved_ops]
        self.recomputed: list[list[tuple[int, str]]] = [[] for _ in saved_ops]
        self.blanks: list[dict[int, tuple[Any, list]]] = [{} for _ in saved_ops]
        self.replayed = 0  # ops the recompute of the current block has run so far
        self.checked: dict[int, bool] = {}  # per block, in recompute: its forward ran the planned ops

    def elides_in(self, block: int) -> bool:
        """Whether the recompute of ``block`` may elide: its forward ran the op sequence of the plan."""
        if block not in self.checked:
            expected = self.digests[block] if self.digests is not None else None
            self.checked[block] = (expected is not None and bool(self.blanks[block])
                                   and op_digest(self.names[block]) == expected)
        return self.checked[block]

    def pause(self) -> None:
        """Ops until the next ``enter`` (the segment's own buffer copies) belong to no block."""
        self.block = None

    @property
    def elides(self) -> bool:
        return any(self.elided)

    def enter(self, block: int) -> None:
        self.block, self.index, self.replayed = block, 0, 0

    def __call__(self, ctx, func, *args, **kwargs) -> CheckpointPolicy:
        # torch 2.13 calls the policy in the forward only; the recompute replays its decisions
        block = self.block
        if block is None:
            return CheckpointPolicy.PREFER_RECOMPUTE
        index = self.index
        self.index += 1
        name = _op_name(func)
        if getattr(ctx, "is_recompute", False):
            # torch <= 2.12 asks again in recompute and takes a kept output (first in, first out per op)
            # only where the answer is "save": the forward's answer, or every kept op is run again
            return CheckpointPolicy.MUST_SAVE if self.saved[block].get(index) == name else \
                CheckpointPolicy.PREFER_RECOMPUTE
        elides = bool(self.elided[block])
        if elides:
            self.names[block].append(name)
        if self.saved[block].get(index) == name:
            return CheckpointPolicy.MUST_SAVE
        self.recomputed[block].append((index, name))
        if elides and self.elided[block].get(index) == name and hasattr(ctx, "op_output"):
            leaves, spec = tree_flatten(ctx.op_output)
            blanks = [_blank_of(t) if isinstance(t, torch.Tensor) else t for t in leaves]
            if not any(b is None for b, t in zip(blanks, leaves) if isinstance(t, torch.Tensor)):
                self.blanks[block][index] = (spec, blanks)
        return CheckpointPolicy.PREFER_RECOMPUTE


class _ElideDeadOps(TorchDispatchMode):
    """In recompute, below selective checkpointing's mode: blank outputs for the elided ops.

    Selective checkpointing hands back the saved ops from its cache and calls
    down for the others, in forward order, so the n-th op reaching this mode
    in a block is the n-th op the forward did not save.
    """

    def __init__(self, policy: SaveListedOps):
        super().__init__()
        self.policy = policy

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        p = self.policy
        if func in SAC_IGNORED_OPS or p.block is None:  # ops the policy did not count
            return func(*args, **kwargs)
        n, p.replayed = p.replayed, p.replayed + 1
        order = p.recomputed[p.block]
        if n < len(order) and order[n][1] == _op_name(func) and p.elides_in(p.block):
            blank = p.blanks[p.block].get(order[n][0])
            if blank is not None:
                spec, leaves = blank
                return tree_unflatten([torch.empty_strided(m.shape, m.stride, dtype=m.dtype, device=m.device)
                                       if isinstance(m, _Blank) else m for m in leaves], spec)
        return func(*args, **kwargs)


def _selective_contexts(policy: SaveListedOps) -> tuple[Any, Any]:
    forward, recompute = create_selective_checkpoint_contexts(policy)
    # the last block's elisions assume early stopping: ops past it would read blanks
    early_stop = torch.utils.checkpoint._enable_checkpoint_early_stop is not False
    if not policy.elides or not early_stop:
        return forward, recompute
    return forward, _stacked(_ElideDeadOps(policy), recompute)


@contextmanager
def _stacked(lower: Any, upper: Any) -> Iterator[None]:
    # entered first, ``lower`` sits below ``upper`` on the dispatch-mode stack
    with lower, upper:
        yield


def _context_fn(policy: str | SaveListedOps) -> Callable | None:
    """``context_fn`` for ``torch.utils.checkpoint``: None recomputes everything."""
    if isinstance(policy, SaveListedOps):
        return functools.partial(_selective_contexts, policy)
    if policy == "recompute":
        return None
    if policy == "save_matmuls":
        return functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
    raise ValueError(f"unknown checkpoint policy {policy!r}")


class _PreparedFirst:
    """A recompute context that calls ``prepare`` before entering ``inner`` (a stem's rebuild, outside SAC)."""

    def __init__(self, inner: Any, prepare: Callable[[], None]):
        self.inner, self.prepare = inner, prepare

    def __enter__(self) -> None:
        self.prepare()
        self.inner.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self.inner.__exit__(*exc)


def _preparing(context_fn: Callable, prepare: Callable[[], None]) -> Callable:
    """``context_fn`` whose recompute context first runs ``prepare``.

    Selective checkpointing's recompute mode replays only the ops its forward
    ran; a stem rebuilt inside it (``checkpoint_stem``) ran no op there, so it
    is rebuilt before that mode is entered.
    """
    def contexts() -> tuple[Any, Any]:
        forward, recompute = context_fn()
        return forward, _PreparedFirst(recompute, prepare)
    return contexts


def _after_anchors(fn: Callable, count: int, *args: Any, **kwargs: Any) -> Any:
    return fn(*args[count:], **kwargs)


def _checkpoint(fn: Callable, policy: str | SaveListedOps, *args: Any, _prepare: Callable[[], None] | None = None,
                _devices: Iterable[torch.device] = (), **kwargs: Any) -> Any:
    """``fn`` under a non-reentrant checkpoint with ``policy``.

    ``_prepare`` runs before the recompute enters selective checkpointing's
    modes; ``_devices``: devices whose RNG the recompute must replay besides
    those of the tensor arguments (a module's parameters).
    """
    context_fn = _context_fn(policy)
    if _prepare is not None and context_fn is not None:  # without modes, fn itself can prepare
        context_fn = _preparing(context_fn, _prepare)
    extra = {} if context_fn is None else {"context_fn": context_fn}
    # torch.utils.checkpoint finds the devices whose RNG it restores among the positional
    # tensors only: a keyword-only call, or a module whose parameters sit on another device
    # than its inputs, would redraw its dropout masks on a GPU
    positional = {a.device for a in args if isinstance(a, torch.Tensor)}
    wanted = {t.device for t in tree_flatten(kwargs)[0] if isinstance(t, torch.Tensor)} | set(_devices)
    missing = sorted((d for d in wanted - positional if d.type != "cpu"), key=str)
    if missing:
        anchors = tuple(torch.empty(0, device=d) for d in missing)
        fn, args = functools.partial(_after_anchors, fn, len(anchors)), (*anchors, *args)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs)


class CheckpointSegment:
    """Blocks [b_0 … b_m] of a chain, recomputed together in backward."""

    def __init__(self, blocks: list[nn.Module], hidden_slot: tuple[str, Any],
                 mutated_buffers: list[tuple[nn.Module, str]], policy: str = "recompute",
                 saved_ops: OpLists | None = None, elided_ops: OpLists | None = None,
                 op_digests: tuple[int, ...] | None = None, stem: "CheckpointStem | None" = None):
        if policy == "save_ops":
            if saved_ops is None or len(saved_ops) != len(blocks):
                raise ValueError("policy 'save_ops' needs one list of saved ops per block")
            if elided_ops is not None and (len(elided_ops) != len(blocks) or op_digests is None
                                           or len(op_digests) != len(blocks)):
                raise ValueError("elided_ops needs one list per block, and one op digest per block")
        else:
            _context_fn(policy)  # unknown policies fail at conversion
        self.policy = policy
        self.saved_ops = saved_ops
        self.elided_ops = elided_ops
        self.op_digests = op_digests
        self.blocks = blocks
        self.forwards = [original_forward(b) for b in blocks]
        self.hidden_slot = hidden_slot
        self.mutated_buffers = mutated_buffers
        self.pending: _Pending | None = None
        self.fallback_calls = 0  # relays that had to compute on their own
        self.plain_calls = 0  # calls whose arguments forbid recomputation (``argument_check``): run plainly
        self.stem = stem  # recomputed to rebuild the head's input in backward, instead of keeping it

    def __getstate__(self) -> dict:
        # outputs held between a head and its relays belong to one forward pass
        return {**self.__dict__, "pending": None}

    def install(self) -> None:
        self.blocks[0].forward = SegmentHead(self)
        for k in range(1, len(self.blocks)):
            self.blocks[k].forward = SegmentRelay(self, k)

    def uninstall(self) -> None:
        for b in self.blocks:
            b.__dict__.pop("forward", None)

    @contextmanager
    def _buffers_swapped(self, before: list[torch.Tensor]) -> Iterator[None]:
        """Recompute on copies of the buffers as they were before the forward.

        Copies, so the live buffers are not updated a second time; values from
        before the forward, so blocks that read what they update
        (spectral norm's power iteration) recompute exactly what they computed.
        """
        originals = []
        for (module, name), value in zip(self.mutated_buffers, before):
            originals.append((module, name, module._buffers[name]))
            module._buffers[name] = value.clone()
        try:
            yield
        finally:
            for module, name, buf in originals:
                module._buffers[name] = buf

    def _policy(self, first_block: int = 0) -> str | SaveListedOps:
        """The checkpoint policy for one call; ``save_ops`` needs a fresh counter per call."""
        if self.policy != "save_ops":
            return self.policy
        digests = self.op_digests
        if digests is not None:  # checked per call: hooks can be added after conversion
            digests = tuple(None if _has_forward_hooks(b) else d for b, d in zip(self.blocks, digests))
        policy = SaveListedOps(self.saved_ops, self.elided_ops, digests)
        policy.enter(first_block)
        return policy

    def _run_all(self, state: _RunState, policy: str | SaveListedOps, *args: Any, **kwargs: Any) -> list[Any]:
        if isinstance(policy, SaveListedOps):
            policy.pause()
        return self._run_blocks(state, policy, *args, **kwargs)

    def _run_from_stem(self, source: "StemInput", state: _RunState, policy: str | SaveListedOps,
                       *args: Any, **kwargs: Any) -> list[Any]:
        if isinstance(policy, SaveListedOps):
            policy.pause()  # the stem's recompute is no block's: its ops are not counted
        args, kwargs = set_slot(args, kwargs, self.hidden_slot, source.get())
        return self._run_blocks(state, policy, *args, **kwargs)

    def _run_blocks(self, state: _RunState, policy: str | SaveListedOps, *args: Any, **kwargs: Any) -> list[Any]:
        state.calls += 1
        if state.calls == 1:
            state.buffers_before = [m._buffers[n].detach().clone() for m, n in self.mutated_buffers]
        first_run = state.calls == 1
        unshard_fsdp(self.blocks)  # blocks after the first (and all of them in recompute) run without hooks
        with self._buffers_swapped(state.buffers_before) if not first_run else _nothing():
            if isinstance(policy, SaveListedOps):
                policy.enter(0)
            outputs = [self.forwards[0](*args, **kwargs)]
            for k, fwd in enumerate(self.forwards[1:], start=1):
                hidden, _ = fed_tensor(outputs[-1])
                if first_run:
                    state.rng_before.append(RngStates([hidden.device]))
                args, kwargs = set_slot(args, kwargs, self.hidden_slot, hidden)
                if isinstance(policy, SaveListedOps):
                    policy.enter(k)
                outputs.append(fwd(*args, **kwargs))
        return outputs

    def run_head(self, *args: Any, **kwargs: Any) -> Any:
        self.pending = None
        if not torch.is_grad_enabled():  # inference: nothing to save, nothing to recompute
            return self.forwards[0](*args, **kwargs)
        refusal = runtime_refusal(args, kwargs, self.hidden_slot)
        if refusal is not None:  # e.g. a KV cache: a recompute would update it twice
            if self.stem is not None:
                self.stem.take(None)
            self.plain_calls += 1
            warn_plain(type(self.blocks[0]).__name__, refusal)
            return self.forwards[0](*args, **kwargs)
        if not isinstance(get_slot(args, kwargs, self.hidden_slot), torch.Tensor):
            # called differently from the recorded call: this block alone, checkpointed
            if self.stem is not None:
                self.stem.take(None)  # releases the stem's arguments
            self.fallback_calls += 1
            return _checkpoint(functools.partial(self._run_one, 0), self._policy(0), *args, **kwargs)
        state = _RunState()
        policy = self._policy()
        source = self.stem.take(get_slot(args, kwargs, self.hidden_slot)) if self.stem is not None else None
        if source is None:
            outputs = _checkpoint(functools.partial(self._run_all, state, policy), policy, *args, **kwargs)
        else:
            # the checkpoint holds the source, not the tensor: the stem's output is freed after forward
            args_, kwargs_ = set_slot(args, kwargs, self.hidden_slot, None)
            outputs = _checkpoint(functools.partial(self._run_from_stem, source, state, policy), policy, *args_,
                                  _prepare=source.prepare, _devices=(source.call.device,), **kwargs_)
            source.release()
        if len(outputs) > 1:
            self.pending = _Pending(outputs, side_signature(args, kwargs, self.hidden_slot),
                                    [None] + state.rng_before)
        return outputs[0]

    def run_relay(self, k: int, *args: Any, **kwargs: Any) -> Any:
        pending = self.pending
        if pending is not None and pending.outputs[k] is not None:
            expected, _ = fed_tensor(pending.outputs[k - 1])
            if (is_fed(get_slot(args, kwargs, self.hidden_slot), expected)
                    and expected._version == pending.versions[k - 1]
                    and side_signature(args, kwargs, self.hidden_slot) == pending.side):
                out = pending.outputs[k]
                pending.outputs[k - 1] = None  # release what the parent no longer needs from us
                if k == len(self.blocks) - 1:
                    self.pending = None
                return out
        self.pending = None
        if pending is not None:
            # the head ran ahead and drew this block's random numbers: rewind, so
            # dropout masks are the ones the original model would draw here
            hidden = get_slot(args, kwargs, self.hidden_slot)
            if isinstance(hidden, torch.Tensor):
                pending.rng_before[k].restore()
        if not torch.is_grad_enabled():
            return self.forwards[k](*args, **kwargs)
        refusal = runtime_refusal(args, kwargs, self.hidden_slot)
        if refusal is not None:
            self.plain_calls += 1
            warn_plain(type(self.blocks[k]).__name__, refusal)
            return self._run_one(k, *args, **kwargs)
        self.fallback_calls += 1
        return _checkpoint(functools.partial(self._run_one, k), self._policy(k), *args, **kwargs)

    def _run_one(self, k: int, *args: Any, **kwargs: Any) -> Any:
        unshard_fsdp((self.blocks[k],))  # recompute in backward runs without the block's hooks
        return self.forwards[k](*args, **kwargs)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


class SegmentHead:
    """Installed as the first block's ``forward``."""

    revify_installed = True

    def __init__(self, segment: CheckpointSegment):
        self.segment = segment

    @opaque_to_dynamo
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.segment.run_head(*args, **kwargs)


class SegmentRelay:
    """Installed as the ``forward`` of every later block of a segment."""

    revify_installed = True

    def __init__(self, segment: CheckpointSegment, index: int):
        self.segment = segment
        self.index = index

    @opaque_to_dynamo
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.segment.run_relay(self.index, *args, **kwargs)
