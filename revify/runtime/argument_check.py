"""Runtime legality: arguments a block may not be recomputed with, checked on every call.

``check_legality`` judges a block on the example call. A converted model is
then called in other ways: with a KV cache (``past_key_values`` a
``DynamicCache``, updated in forward, so a recompute would update it a
second time), with a list it appends to, with side tensors that require
grad where a reversible step assumed none. Before a head, relay, stem or
reversible step recomputes anything, it asks ``runtime_refusal`` about the
arguments of this call; on a reason it runs the block plainly (exactly the
original computation, nothing recomputed) and warns once.

Before::

    layer.0(h, attention_mask=m, past_key_values=DynamicCache(...))   # head: would checkpoint

After::

    runtime_refusal(args, kwargs, slot) -> "receives a mutable object (DynamicCache) as past_key_values"
    layer.0 runs its original forward; a one-time warning names the reason

Other differences from the example call (a mask where there was none, other
constants, another batch shape) are legal: a checkpoint recomputes with the
very arguments of the call it recomputes.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch

from .call_arguments import describe_argument


def _where(key: tuple[str, Any]) -> str:
    kind, name = key
    return f"argument {name}" if kind == "arg" else str(name)


def _mutable(value: Any) -> Any:
    """The first mutable object inside ``value`` (as ``check_legality`` counts them), or None."""
    if isinstance(value, (tuple, list)):
        for v in value:
            found = _mutable(v)
            if found is not None:
                return found
        return None
    return value if describe_argument(value)[0] == "object" else None


def runtime_refusal(args: tuple, kwargs: dict, slot: tuple[str, Any] | None,
                    grad_free: Iterable[tuple[str, Any]] = ()) -> str | None:
    """Why this call's arguments must not be recomputed with; None when they may.

    ``slot``: the hidden input's place (exempt from ``grad_free``).
    ``grad_free``: places whose tensors the plan assumed need no gradient
    (a reversible step's side inputs); a tensor there that requires grad is
    refused.
    """
    items = [(("arg", i), a) for i, a in enumerate(args)] + [(("kw", k), v) for k, v in kwargs.items()]
    grad_free = set(grad_free)
    for key, value in items:
        if key == slot:
            continue
        found = _mutable(value)
        if found is not None:
            return f"receives a mutable object ({type(found).__name__}) as {_where(key)}"
        if key in grad_free and any(isinstance(t, torch.Tensor) and t.requires_grad
                                    for t in (value if isinstance(value, (tuple, list)) else (value,))):
            return f"receives {_where(key)} requiring grad, which the plan assumed needs none"
    return None


def warn_plain(what: str, reason: str) -> None:
    """One warning per distinct message (Python's warning registry keeps the count)."""
    warnings.warn(f"revify: a {what} {reason}; it runs without recomputation (exact, no memory saved) "
                  "for such calls", stacklevel=4)
