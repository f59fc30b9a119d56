"""A block call's arguments: where its hidden input sits, and what else it receives.

A chain's head, its relays, a stem and a reversible step all receive the
arguments of a call they did not write (a transformers layer loop), find the
hidden state among them by its *slot* (``("arg", i)`` or ``("kw", name)``,
recorded by ``passes/capture/record_calls``), replace it, and compare the
other arguments between calls by identity. These are the primitives for
that; the runtime owns them because it runs them on every call, and analysis
(``record_calls``) imports them from here.
"""
from __future__ import annotations

from typing import Any

import torch


def get_slot(args: tuple, kwargs: dict, slot: tuple[str, Any]) -> Any:
    """The value in ``slot``, or None when this call does not fill it."""
    kind, key = slot
    if kind == "arg":
        return args[key] if key < len(args) else None
    return kwargs.get(key)


def set_slot(args: tuple, kwargs: dict, slot: tuple[str, Any], value: Any) -> tuple[tuple, dict]:
    kind, key = slot
    if kind == "arg":
        args = args[:key] + (value,) + args[key + 1:]
    else:
        kwargs = {**kwargs, key: value}
    return args, kwargs


def fed_tensor(output: Any) -> tuple[torch.Tensor | None, int | None]:
    """The tensor a block hands to the next one: the output or its first element."""
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0], 0
    return None, None


def side_signature(args: tuple, kwargs: dict, slot) -> tuple:
    """Identity of every input but the hidden one: tensors by object, constants by value."""
    items = [(("arg", i), a) for i, a in enumerate(args)] + [(("kw", k), v) for k, v in kwargs.items()]
    return tuple((key, *describe_argument(value)) for key, value in items if key != slot)


def describe_argument(value: Any) -> tuple[str, Any]:
    """Kind and identity of a side input; tuples (e.g. rotary cos/sin) are plain data."""
    if isinstance(value, torch.Tensor):
        return "tensor", id(value)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return "const", value
    if isinstance(value, (tuple, list)):
        parts = tuple(describe_argument(v) for v in value)
        kind = "object" if any(k == "object" for k, _ in parts) else "tuple"
        return kind, parts
    return "object", id(value)
