"""Runtime: the policies that choose what a checkpointed segment keeps and what it recomputes.

``torch.utils.checkpoint`` recomputes everything by default. With selective
checkpointing (``context_fn``) a policy is asked, per op in forward, to save
its output or recompute it. revify's policies:

* ``"recompute"``: keep nothing but the segment's input (no ``context_fn``);
* ``"save_matmuls"``: keep the compute-bound ops (matmuls, convolutions,
  fused attention without dropout), recompute the memory-bound ops between;
* ``SaveListedOps``: keep exactly the ops the planner listed per block
  (``passes/planning/save_ops_menu``), and optionally skip, in recompute, ops
  whose outputs nothing needs (``_ElideDeadOps``).

Before::

    checkpoint(segment, h, use_reentrant=False)                    # recompute every op

After::

    checkpoint(segment, h, use_reentrant=False, context_fn=_context_fn(SaveListedOps(saved)))
"""
from __future__ import annotations

import functools
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import SAC_IGNORED_OPS, CheckpointPolicy, create_selective_checkpoint_contexts

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
