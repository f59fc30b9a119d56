"""One block called on its own: a fresh hidden tensor in the recorded call, with the recorded side inputs.

The profilers (``profile_blocks``, ``profile_ops``) measure a block without
the rest of the model, so the profile never needs the whole model's
activations in memory at once. ``BlockRun`` rebuilds the block's recorded
call (``record_calls``) with a new random hidden tensor of the recorded
shape, and knows which storages are not the block's own (side inputs,
parameters, buffers), so that what autograd saves can be classified.

Before::

    CallRecord(example_args=(h,), example_kwargs={"attention_mask": m}, hidden_slot=0)

After::

    BlockRun: run(x) == block.forward(x, attention_mask=m)[0] for any fresh x of h's shape
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from revify.passes.analysis.chain_types import BlockInfo
from revify.runtime.call_arguments import fed_tensor, get_slot, set_slot


def storage_ptr(t: torch.Tensor) -> int:
    """The address of ``t``'s storage: views of one storage share it (0 for no storage)."""
    return t.untyped_storage().data_ptr()


def sync(device: torch.device) -> None:
    """Wait for the device, so that wall time measures its work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BlockRun:
    """One block called standalone with the recorded side inputs and a fresh hidden tensor."""

    def __init__(self, module: nn.Module, info: BlockInfo, call_args: tuple, call_kwargs: dict):
        self.forward = module.forward  # find_chains rejects blocks revify already converted
        self.module = module
        self.slot = info.call.hidden_slot
        self.args, self.kwargs = call_args, call_kwargs
        hidden = get_slot(call_args, call_kwargs, self.slot)
        self.shape, self.dtype, self.device = hidden.shape, hidden.dtype, hidden.device
        self.side_ptrs = {storage_ptr(t) for t in tree_flatten((call_args, call_kwargs))[0]
                          if isinstance(t, torch.Tensor) and t is not hidden}
        self.persistent = {storage_ptr(t) for t in list(module.parameters()) + list(module.buffers())}

    def hidden(self) -> torch.Tensor:
        x = torch.randn(self.shape, dtype=self.dtype, device=self.device)
        return x.requires_grad_(self.dtype.is_floating_point)

    def __call__(self, x: torch.Tensor, forward=None) -> torch.Tensor:
        out, _ = fed_tensor(self.raw(x, forward))
        return out

    def raw(self, x: torch.Tensor, forward=None, args: tuple | None = None, kwargs: dict | None = None) -> Any:
        """The block's whole output (tuples of HF layers included); ``args``/``kwargs`` replace the side inputs."""
        a, k = set_slot(self.args if args is None else args, self.kwargs if kwargs is None else kwargs, self.slot, x)
        return (forward or self.forward)(*a, **k)
