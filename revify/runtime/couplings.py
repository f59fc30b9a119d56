"""Runtime: the couplings of a reversible chain, and the functions F and G each step calls.

A coupling step (``reversible_chain``) computes ``y1 = λ·x1 + F(x2)``,
``y2 = β·x2 + G(y1)``. What F and G are depends on the MEFT variant
(``passes/planning/plan_reversible``): a whole pretrained block, one of its
residual sub-layers (MEFT3, ``split_sublayers``), a block's residual branch
``block(x) − x`` (RevNet), a bottleneck adapter, or a block with a parallel
adapter. Each is a small picklable callable ``(x, args, kwargs) -> tensor``
built at conversion (``passes/rewrite/rewrite_reversible``); ``args``/``kwargs``
are the side inputs of the call of the step's block (each step its own: Gemma 2
alternates masks), with the hidden slot to be filled with ``x``.

Before::

    layer.3(h, attention_mask=m)                         # a pretrained block

After::

    CouplingStep(f=WithAdapter(BlockCall(layer.3 forward, slot, "layer.3"), adapter), g=AdapterCall(adapter2), ...)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .call_arguments import set_slot


@dataclass(frozen=True)
class Coupling:
    name: str
    lam: float
    beta: float
    switch: bool  # swap the streams after each step
    output: str  # the stream that carries the function after a step: "s1", "s2" or "mean"


class BlockCall:
    """A pretrained block's original forward, fed ``x`` in its hidden slot."""

    def __init__(self, forward: Callable, slot: tuple[str, Any], path: str):
        self.forward, self.slot, self.path = forward, slot, path
        # what the last call returned beside the hidden state: None for a plain tensor, else the
        # rest of its tuple ``(hidden, *extras)`` (attention weights, None placeholders, T5's
        # position bias); the head or relay hands it back to the parent in the same places
        self.extras: tuple | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "extras": None}

    def __call__(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        a, k = set_slot(args, kwargs, self.slot, x)
        out = self.forward(*a, **k)
        if isinstance(out, torch.Tensor):
            self.extras = None
            return out
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) \
                and all(e is None or isinstance(e, torch.Tensor) for e in out[1:]):
            self.extras = tuple(out[1:])
            return out[0]
        raise TypeError(f"{self.path} returned {type(out).__name__}; a reversible block must return its hidden "
                        "state, or a tuple (hidden, *extras) of tensors and None")


class FixedExtras:
    """The extras of a block that F and G do not run whole (MEFT3 halves), fixed at conversion.

    Each entry of ``template`` is None, or the position among the step's side-input leaves of
    a side input the block hands back (T5 returns the position bias it was given).
    """

    def __init__(self, template: tuple | None):
        self.template = template

    def resolve(self, side_leaves: list) -> tuple | None:
        if self.template is None:
            return None
        return tuple(None if j is None else side_leaves[j] for j in self.template)


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
    # per block of ``blocks``: where its extra outputs are after the step ran (``BlockCall.extras``)
    extras_from: tuple[Any, ...] = ()


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


def stream_dtype_for(dtype: torch.dtype, coupling: Coupling | None = None) -> torch.dtype:
    """Streams one step wider than the compute dtype, where that is cheap and needed.

    Dividing by λ or β < 1 amplifies the streams' rounding error at every step;
    with λ = β = 1 (RevNet) nothing is divided, so compute-dtype streams lose
    only the recompute noise the anchors bound anyway, at half the memory of
    the chain's largest saved tensors (measured on a 48-block MLP: peak
    3.13 → 2.01 MiB).
    """
    if coupling is not None and coupling.lam == 1 and coupling.beta == 1:
        return dtype
    if dtype == torch.float32:
        return torch.float64
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype
