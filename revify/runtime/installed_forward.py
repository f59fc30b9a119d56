"""Runtime core: what revify installs as a block's ``forward``, and the forward it replaces.

Checkpoint segments, stems and reversible chains do not wrap blocks in new
modules: that would rename every parameter (``layer.0.x`` →
``layer.0.wrapped.x``) and break ``state_dict`` and optimizer code. They set
an instance attribute ``forward`` on the block instead, so module names, hooks
and parameters are unchanged and ``module.__call__`` still runs the hooks.

Before::

    layer.0.forward   → BertLayer.forward (the class's)

After (``install_forwards(segment, [layer.0, layer.1])``)::

    layer.0.forward   → InstalledHead(segment)        calls segment.run_head(*args, **kwargs)
    layer.1.forward   → InstalledRelay(segment, 1)    calls segment.run_relay(1, *args, **kwargs)

The owner (a ``CheckpointSegment``, ``CheckpointStem`` or ``ReversibleChain``)
keeps the original forwards (``original_forward``) and decides what a call
does. Both installed classes carry ``revify_installed``, which analysis
checks to refuse converting a block twice.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn


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


class RunsHead(Protocol):
    def run_head(self, *args: Any, **kwargs: Any) -> Any: ...


class RunsRelay(Protocol):
    def run_relay(self, index: int, *args: Any, **kwargs: Any) -> Any: ...


class InstalledHead:
    """Installed as the ``forward`` of an owner's first (or only) block: starts the owner's run."""

    revify_installed = True

    def __init__(self, owner: RunsHead):
        self.owner = owner

    @opaque_to_dynamo
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.owner.run_head(*args, **kwargs)


class InstalledRelay:
    """Installed as the ``forward`` of every later block: continues the run the head started."""

    revify_installed = True

    def __init__(self, owner: RunsRelay, index: int):
        self.owner = owner
        self.index = index

    @opaque_to_dynamo
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.owner.run_relay(self.index, *args, **kwargs)


def install_forwards(owner: Any, blocks: list[nn.Module]) -> None:
    """``blocks[0]`` calls ``owner.run_head``, every later block ``owner.run_relay(k, …)``."""
    blocks[0].forward = InstalledHead(owner)
    for k in range(1, len(blocks)):
        blocks[k].forward = InstalledRelay(owner, k)


def uninstall_forwards(blocks: Iterable[nn.Module]) -> None:
    """Back to the class's forward (or the instance forward the block had before revify)."""
    for b in blocks:
        b.__dict__.pop("forward", None)
