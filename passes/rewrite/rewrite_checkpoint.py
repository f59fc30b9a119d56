"""Pass 7: emit the converted module for a checkpoint plan.

The rewrite never edits the user's module. It builds a *structural copy*
that shares every parameter and buffer object with the original (so
``rmodel.parameters()`` are the original tensors and ``state_dict()`` keys
are unchanged), then installs a ``CheckpointSegment`` on each segment's
blocks in the copy.

Before::

    model.encoder.layer[0..11]       plain blocks

After::

    rmodel.encoder.layer[0].forward  = InstalledHead(segment 0)      (runs layers 0-3 under checkpoint)
    rmodel.encoder.layer[1..3].forward = InstalledRelay(segment 0, k)
    rmodel.encoder.layer[4].forward  = InstalledHead(segment 1)      ...
    rmodel.embeddings.forward        = InstalledHead(CheckpointStem)  (ChainPlan.stem: recomputed by layer 0)
"""
from __future__ import annotations

import copy

from torch import nn

from revify.runtime.checkpoint_segment import CheckpointSegment
from revify.runtime.checkpoint_stem import CheckpointStem

from revify.passes.planning.plan_checkpoint import ChainPlan


def share_structure(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A new module tree whose parameters and buffers are the original objects.

    Each module object is shallow-copied with its own parameter, child and
    hook dictionaries, so installing a forward or a hook on the copy leaves
    the original untouched. The buffer dictionary itself is shared, so a
    dtype or device move of either module moves the other's buffers too
    (BatchNorm statistics stay one set). Shared submodules stay shared.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    # not copy.copy: parametrized modules forbid it (their __getstate__ raises)
    new = type(module).__new__(type(module))
    memo[id(module)] = new
    for key, value in vars(module).items():
        # _buffers stays the same dict: Module._apply (.to, .half, .cuda) replaces buffers by assigning
        # into it, which must reach both modules (parameters are converted in place and stay shared)
        new.__dict__[key] = copy.copy(value) if isinstance(value, dict) and key != "_buffers" else value
    new._modules = {name: (share_structure(child, memo) if child is not None else None)
                    for name, child in module._modules.items()}
    return new


def rewrite_checkpoint(model: nn.Module, plans: list[ChainPlan],
                       rmodel: nn.Module | None = None) -> tuple[nn.Module, list[CheckpointSegment]]:
    """Install the segments of ``plans``; on ``rmodel`` if given (a copy already made), else on a new copy."""
    rmodel = share_structure(model) if rmodel is None else rmodel
    segments = []
    for plan in plans:
        installed: set[str] = set()  # a shared module is several blocks: its first segment serves every call
        blocks = plan.chain.blocks
        stem = CheckpointStem(rmodel.get_submodule(plan.stem)) if plan.stem is not None else None
        if stem is not None:
            stem.install()
        for segment in plan.segments:
            start, end = segment.start, segment.end
            if plan.chain.shared:
                if blocks[start].path in installed:
                    continue
                installed.add(blocks[start].path)
            modules = [rmodel.get_submodule(b.path) for b in blocks[start:end]]
            buffers = []
            for name in (n for b in blocks[start:end] for n in b.mutated_buffers):
                owner_path, _, buf_name = name.rpartition(".")
                buffers.append((rmodel.get_submodule(owner_path), buf_name))
            seg = CheckpointSegment(modules, blocks[start].call.hidden_slot, buffers, segment.policy,
                                    segment.saved_ops, segment.elided_ops, segment.op_digests,
                                    stem if start == 0 and not plan.chain.shared else None)
            seg.install()
            segments.append(seg)
    return rmodel, segments

