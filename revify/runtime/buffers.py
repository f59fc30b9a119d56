"""Runtime core: buffers a block updates in forward, snapshotted and swapped in for its recompute.

Blocks that update buffers in forward (BatchNorm running statistics,
spectral norm's power iteration) must not update them a second time when
they are recomputed, and must recompute from the values they read in forward.
Checkpoint segments and reversible steps snapshot those buffers before the
forward and recompute on copies of the snapshot.

Before::

    bn.forward(x)                   # updates bn.running_mean
    recompute: bn.forward(x)        # would update it again, from the new value

After::

    before = snapshot(buffers)      # before the forward
    with swapped(buffers, before):  # recompute on copies of ``before``
        bn.forward(x)
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn


def snapshot(buffers: Iterable[tuple[nn.Module, str]]) -> list[torch.Tensor]:
    """Copies of the buffers' current values."""
    return [m._buffers[n].detach().clone() for m, n in buffers]


@contextlib.contextmanager
def swapped(buffers: Iterable[tuple[nn.Module, str]], values: list[torch.Tensor]) -> Iterator[None]:
    """Run on copies of ``values`` in place of the buffers; the live buffers are put back after.

    Copies, so the recompute's update lands on neither the live buffers nor
    the snapshot.
    """
    originals = []
    for (module, name), value in zip(buffers, values):
        originals.append((module, name, module._buffers[name]))
        module._buffers[name] = value.clone()
    try:
        yield
    finally:
        for module, name, buf in originals:
            module._buffers[name] = buf
