"""Runtime core: blocks that revify runs without their ``__call__``, under FSDP2.

A head runs the later blocks of its segment or chain (and backward
recomputes them) through their original ``forward``, so FSDP2's hooks, which
unshard parameters before a forward and reduce-scatter gradients after
backward, do not fire for those calls. The runtime gathers the parameters
itself, and recognises the identity Function FSDP2 routes a sharded block's
inputs through, so a relay still sees "the tensor the head produced".

Before: ``layer.1`` called by the head with sharded parameters → shape error.
After: ``unshard_fsdp([layer.1])`` first; FSDP2 reshards it itself.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

import torch
from torch import nn


def _fsdp_module_class() -> type | None:
    # no module can be FSDP2-sharded before torch.distributed.fsdp is imported: skip the import
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return getattr(fsdp, "FSDPModule", None)


def unshard_fsdp(modules: Iterable[nn.Module]) -> None:
    """All-gather the parameters of FSDP2-sharded blocks that revify runs without their ``__call__``.

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
