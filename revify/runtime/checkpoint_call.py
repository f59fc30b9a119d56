"""Runtime: one call under a non-reentrant ``torch.utils.checkpoint``, as segments and stems make it.

Two things plain ``checkpoint(fn, *args, use_reentrant=False)`` does not do:

* replay the RNG of every device the call draws on. ``torch.utils.checkpoint``
  looks for devices among the positional tensor arguments only, so a
  keyword-only call, or a block whose parameters sit on another device than
  its inputs, would redraw its dropout masks on a GPU. Empty *anchor*
  tensors on the missing devices are passed first, and dropped before ``fn``;
* run a step before selective checkpointing's recompute mode is entered (a
  stem rebuilds the segment's input there: that mode replays only the ops
  its forward ran, and the stem ran none inside it).

Before::

    checkpoint(block_forward, hidden_states=h, use_reentrant=False)    # GPU RNG not replayed

After::

    _checkpoint(block_forward, "recompute", hidden_states=h)           # anchors: cuda:0 replayed
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import torch
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

from .autocast_state import autocast_cache_off
from .checkpoint_policy import SaveListedOps, _context_fn


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


def _without_cast_cache(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    # forward and recompute cast the same weights the same number of times (see autocast_cache_off)
    with autocast_cache_off():
        return fn(*args, **kwargs)


def _checkpoint(fn: Callable, policy: str | SaveListedOps, *args: Any, _prepare: Callable[[], None] | None = None,
                _devices: Iterable[torch.device] = (), **kwargs: Any) -> Any:
    """``fn`` under a non-reentrant checkpoint with ``policy``.

    ``_prepare`` runs before the recompute enters selective checkpointing's
    modes; ``_devices``: devices whose RNG the recompute must replay besides
    those of the tensor arguments (a module's parameters).
    """
    fn = functools.partial(_without_cast_cache, fn)
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
