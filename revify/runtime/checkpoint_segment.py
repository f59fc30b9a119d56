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

import functools
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from .argument_check import runtime_refusal, warn_plain
from .buffers import snapshot, swapped
from .call_arguments import fed_tensor, get_slot, set_slot, side_signature
from .checkpoint_call import _checkpoint
from .checkpoint_policy import OpLists, SaveListedOps, _context_fn
from .fsdp import is_fed, unshard_fsdp
from .hooks import has_hooks
from .installed_forward import install_forwards, original_forward, uninstall_forwards
from .rng import RngState

if TYPE_CHECKING:
    from .checkpoint_stem import CheckpointStem, StemInput


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



class CheckpointSegment:
    """Blocks [b_0 … b_m] of a chain, recomputed together in backward."""

    def __init__(self, blocks: list[nn.Module], hidden_slot: tuple[str, Any],
                 mutated_buffers: list[tuple[nn.Module, str]], policy: str = "recompute",
                 saved_ops: OpLists | None = None, elided_ops: OpLists | None = None,
                 op_digests: tuple[int, ...] | None = None, stem: CheckpointStem | None = None):
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
        install_forwards(self, self.blocks)

    def uninstall(self) -> None:
        uninstall_forwards(self.blocks)

    def _policy(self, first_block: int = 0) -> str | SaveListedOps:
        """The checkpoint policy for one call; ``save_ops`` needs a fresh counter per call."""
        if self.policy != "save_ops":
            return self.policy
        digests = self.op_digests
        if digests is not None:  # checked per call: hooks can be added after conversion
            digests = tuple(None if has_hooks(b, backward=False) else d for b, d in zip(self.blocks, digests))
        policy = SaveListedOps(self.saved_ops, self.elided_ops, digests)
        policy.enter(first_block)
        return policy

    def _run_all(self, state: _RunState, policy: str | SaveListedOps, *args: Any, **kwargs: Any) -> list[Any]:
        if isinstance(policy, SaveListedOps):
            policy.pause()
        return self._run_blocks(state, policy, *args, **kwargs)

    def _run_from_stem(self, source: StemInput, state: _RunState, policy: str | SaveListedOps,
                       *args: Any, **kwargs: Any) -> list[Any]:
        if isinstance(policy, SaveListedOps):
            policy.pause()  # the stem's recompute is no block's: its ops are not counted
        args, kwargs = set_slot(args, kwargs, self.hidden_slot, source.get())
        return self._run_blocks(state, policy, *args, **kwargs)

    def _run_blocks(self, state: _RunState, policy: str | SaveListedOps, *args: Any, **kwargs: Any) -> list[Any]:
        state.calls += 1
        if state.calls == 1:
            state.buffers_before = snapshot(self.mutated_buffers)
        first_run = state.calls == 1
        unshard_fsdp(self.blocks)  # blocks after the first (and all of them in recompute) run without hooks
        # recompute on the buffers as they were before the forward (``buffers``)
        with swapped(self.mutated_buffers, state.buffers_before) if not first_run else _nothing():
            if isinstance(policy, SaveListedOps):
                policy.enter(0)
            outputs = [self.forwards[0](*args, **kwargs)]
            for k, fwd in enumerate(self.forwards[1:], start=1):
                hidden, _ = fed_tensor(outputs[-1])
                if first_run:
                    state.rng_before.append(RngState.capture([hidden.device]))
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
