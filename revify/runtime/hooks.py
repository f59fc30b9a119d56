"""Runtime core: whether hooks would see a block's call, which recomputation must not hide or repeat.

A hook on a module of a block runs again when the block is recomputed, and
reads whatever the recompute computes: an elided op's blank (checkpoint
``save_ops``), or a stem's rebuild that the hook never saw in forward. A full
backward hook wraps the block's output in a Function, so a segment would never
be fed the stem's output by identity. Callers ask per call (hooks can be
added after conversion); analysis (``passes/analysis/find_stem``) asks once,
on the modules only, since hooks registered globally while revify analyses
(a profiler's) say nothing about the training step.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules import module as module_mod


def has_hooks(module: nn.Module, *, backward: bool = True, global_hooks: bool = True) -> bool:
    """Forward (and, with ``backward``, backward) hooks on ``module`` or its submodules.

    ``global_hooks``: also count the global forward hooks
    (``register_module_forward_hook``), which run on every module.
    """
    if global_hooks and (module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks
               or (backward and (m._backward_hooks or m._backward_pre_hooks)) for m in module.modules())
