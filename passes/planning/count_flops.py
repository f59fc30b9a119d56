"""FLOPs of op calls as ``torch.utils.flop_counter`` counts them, grouped-query attention included.

The profilers (``profile_blocks``, ``profile_stem``) price recompute in FLOPs with
torch's own formulas. torch 2.11's attention formulas assert that key and value
have as many heads as the query, while the CUDA attention kernels take fewer and
broadcast them (grouped-query attention, Llama's default config): profiling a
Llama-shaped model on a GPU raised ``sdpa_flop_count: query/key/value shapes are
incompatible`` there. Newer torch counts such calls itself. Where torch's formula
refuses, the call is counted as the kernel computes it, with key and value heads
broadcast to the query's::

    before: q (B, 32, S, D), k (B, 8, S, D), v (B, 8, S, D)  -> AssertionError
    after:  counted as q (B, 32, S, D), k (B, 32, S, D), v (B, 32, S, D)

The broadcast arguments are meta tensors: a formula reads only shapes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry


def _heads_broadcast(args: tuple) -> tuple:
    """4-D tensor arguments with fewer heads (dim 1) than the most, as meta tensors with the most heads."""
    heads = max((a.shape[1] for a in args if isinstance(a, torch.Tensor) and a.dim() == 4), default=0)

    def widened(a: Any) -> Any:
        if isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[1] < heads and heads % a.shape[1] == 0:
            return torch.empty((a.shape[0], heads, *a.shape[2:]), dtype=a.dtype, device="meta")
        return a
    return tuple(widened(a) for a in args)


def _count(formula, args: tuple, kwargs: dict, out: Any) -> int:
    try:
        return int(formula(*args, **kwargs, out_val=out))
    except AssertionError:  # torch's attention formula refusing grouped-query heads (see module docstring)
        return int(formula(*_heads_broadcast(args), **kwargs, out_val=out))


def op_flops(func, args: tuple, kwargs: dict, out: Any) -> int:
    """FLOPs of one call of ``func`` (zero for ops torch has no formula for, such as pointwise ones)."""
    formula = flop_registry.get(func._overloadpacket)
    return _count(formula, args, kwargs, out) if formula is not None else 0


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no display) whose formulas also count grouped-query attention."""
    def tolerant(formula):
        def count(*args, out_val=None, **kwargs):
            return _count(formula, args, kwargs, out_val)
        count._get_raw = True  # receives tensors as the registry's own (shape-wrapped) formula expects
        return count
    mapping = {op: tolerant(f) for op, f in flop_registry.items() if "attention" in str(op)}
    return FlopCounterMode(display=False, custom_mapping=mapping)
