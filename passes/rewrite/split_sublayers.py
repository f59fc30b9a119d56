"""Pass 6c: split a block at its first residual sub-layer, for MEFT3.

MEFT3 couples a block's two residual sub-layers as F and G, so it needs to
call them separately. This pass captures the block (fx, else torch.export),
finds its residual sub-layers with ``residual_spine`` and cuts the graph
after the first one's output (with three or more, as in a decoder block with
cross-attention, before the last one: the first half holds every attention
sub-layer, the second the MLP). Both halves are executable graphs that read
the block's parameters and buffers at call time, so autograd reaches the
block's own parameters and replaced parameters (``to_empty``, sharding) are
the ones used.

Before (a pre-LN block, or post-LN BERT with ``LN`` around each add)::

    x → ln1 → attn → add(x, ·) = h → ln2 → mlp → add(h, ·) = y

After::

    halves = split_block(block, args, kwargs, hidden_slot=("arg", 0))
    halves.first(x, args, kwargs)     # h = x + attn(ln1(x))
    halves.second(h, args, kwargs)    # y = h + mlp(ln2(h)), so second(first(x)) == block(x)

Side-input computations that do not depend on the hidden state (mask
processing) are duplicated into both halves. Everything else must be cut
cleanly: the second half may depend on the hidden input only through the
cut, and random ops (dropout) must run once each, in the block's order, so
that under the same RNG state ``second(first(x))`` draws exactly what
``block(x)`` draws. Otherwise ``split_block`` raises ``SplitError``.

torch.export specialises on shapes, constants and train/eval mode, so the
halves are captured per call signature and cached on the ``BlockHalves``.
Capturing is ``capture_block``, cutting ``cut_block``; this module chooses
the engine, caches the halves and calls them.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from revify.messages import one_line
from revify.runtime.call_arguments import get_slot, set_slot
from revify.passes.rewrite.capture_block import SplitError, _capture_export, _capture_fx
from revify.passes.rewrite.cut_block import _Half, _split


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))  # the cache entry keeps the object alive, so the id stays unique
    return (type(value), value)


@dataclass
class _Entry:
    first: _Half
    second: _Half
    engine: str
    keep_alive: tuple  # non-tensor leaves keyed by id


class BlockHalves:
    """A block's two residual sub-layers as separately callable functions.

    ``second(first(x, args, kwargs), args, kwargs)`` equals the block's hidden
    output. ``args``/``kwargs`` are a call's arguments; whatever is in the
    hidden slot is ignored. Halves are captured per call signature (shapes,
    dtypes, devices, constant arguments, train/eval mode of every submodule)
    and cached here.
    """

    def __init__(self, block: nn.Module, hidden_slot: tuple[str, Any], forward: Callable | None = None):
        self.block = block
        self.hidden_slot = hidden_slot
        installed = block.__dict__.get("forward")
        self._class_forward = installed is None or getattr(installed, "revify_installed", False)
        # a partial of the class function, not block.forward: revify later installs
        # its own forward on the block, and re-capture must see the original
        self._forward = forward or (functools.partial(type(block).forward, block) if self._class_forward
                                    else installed)
        self._cache: dict[Any, _Entry] = {}

    @property
    def engine(self) -> str:
        """How the most recently captured halves were obtained: ``fx`` or ``export``."""
        return next(reversed(self._cache.values())).engine if self._cache else "none"

    def first(self, hidden: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """The block from its hidden input through the first residual sub-layer."""
        args, kwargs = set_slot(tuple(args), dict(kwargs), self.hidden_slot, hidden)
        entry, leaves, bound = self._lookup(args, kwargs)
        return entry.first(self.block, leaves, bound, None)

    def second(self, mid: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """The rest of the block, from the first sub-layer's output to the block's hidden output."""
        # the cut has the hidden input's shape and dtype, so ``mid`` stands in for it
        # in the cache key and, if needed, as the example input to capture from
        args, kwargs = set_slot(tuple(args), dict(kwargs), self.hidden_slot, mid)
        entry, leaves, bound = self._lookup(args, kwargs)
        return entry.second(self.block, leaves, bound, mid)

    def _lookup(self, args: tuple, kwargs: dict) -> tuple[_Entry, list, dict | None]:
        leaves, spec = tree_flatten((args, kwargs))
        key = (spec, tuple(("t", tuple(x.shape), x.dtype, x.device) if isinstance(x, Tensor) else _hashable(x)
                           for x in leaves),
               tuple(m.training for m in self.block.modules()))
        entry = self._cache.get(key)
        if entry is None:
            entry = self._capture(args, kwargs, leaves, spec)
            self._cache[key] = entry
        bound = None
        if entry.engine == "fx":
            b = inspect.signature(self._forward).bind(*args, **kwargs)
            b.apply_defaults()
            bound = b.arguments
        return entry, leaves, bound

    def _capture(self, args: tuple, kwargs: dict, leaves: list, spec: Any) -> _Entry:
        if not isinstance(get_slot(args, kwargs, self.hidden_slot), Tensor):
            raise SplitError(f"no hidden tensor in slot {self.hidden_slot}")
        reasons = []
        keep = tuple(x for x in leaves if not isinstance(x, Tensor))
        # capture runs no real computation, but export may still touch the global
        # generator; enable_grad: one graph serves calls with and without grad
        fx_refusal: SplitError | None = None
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            if self._class_forward:  # fx traces the class's forward, not an instance override
                try:
                    cap = _capture_fx(self.block, inspect.signature(self._forward), args, kwargs, self.hidden_slot)
                    return _Entry(*_split(cap, self.block), "fx", keep)
                except SplitError as exc:
                    # fx records x.shape / x.dtype as values computed from x, which can hide
                    # a clean cut; export bakes them as constants, so it gets the last word
                    fx_refusal = exc
                except Exception as exc:  # fx raises many exception types on untraceable code
                    reasons.append("fx: " + one_line(exc))
            idx_args, idx_kwargs = tree_unflatten(list(range(len(leaves))), spec)
            hidden_leaf = get_slot(idx_args, idx_kwargs, self.hidden_slot)
            try:
                cap = _capture_export(self.block, self._forward, leaves, spec, hidden_leaf)
            except SplitError:
                raise
            except Exception as exc:
                if fx_refusal is not None:
                    raise fx_refusal from exc
                reasons.append("export: " + one_line(exc))
                raise SplitError("cannot capture the block: " + "; ".join(reasons)) from exc
            return _Entry(*_split(cap, self.block), "export", keep)

    def __getstate__(self) -> dict:
        # captured graphs hold fake tensors and references into export's module;
        # a copy re-captures on its first call instead
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state


def split_block(block: nn.Module, args: tuple, kwargs: dict, hidden_slot: tuple[str, Any]) -> BlockHalves:
    """Capture ``block(*args, **kwargs)`` and split it after its first residual sub-layer.

    The hidden state is at ``hidden_slot`` (see ``revify.runtime.call_arguments.get_slot``).
    Raises ``SplitError`` with a one-line reason if the block cannot be split.
    """
    halves = BlockHalves(block, hidden_slot)
    args, kwargs = tuple(args), dict(kwargs or {})
    halves._lookup(args, kwargs)  # capture and split now, so failures surface at conversion time
    return halves
