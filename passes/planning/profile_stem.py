"""Pass 9a': measure what recomputing a chain's stem would free and cost.

The planner can recompute a chain's stem (``find_stem``) with the chain's
first segment instead of that segment keeping its input
(``runtime/checkpoint_stem``). That frees the stem's output and what the
stem saves for its own backward, keeps the stem's arguments instead (free
when they are the caller's inputs, as ``input_ids`` are), and runs the stem
twice more in backward. This pass measures the parts, running the stem once
on its recorded arguments.

Before::

    StemInfo("bert.embeddings", "BertEmbeddings", call)

After::

    StemCost(path="bert.embeddings", saved_bytes=3 MiB, held_bytes=0, forward_s=0.0004, forward_flops=0,
             own_recompute_flops=0, forward_transient=3 MiB)

``saved_bytes`` counts storages autograd saves in the stem that are none of
its arguments, parameters, buffers or its output (BERT: the LayerNorm input
and the dropout mask; a ReLU stem's saved output is the chain's input, which
the planner counts as such). A stem that saves one of its own arguments keeps it either
way; that argument is then counted in ``held_bytes`` only, which errs toward
keeping the stem as written. The stem's own checkpoint stops recomputing as
soon as backward has its saved tensors back, so its recompute FLOPs are
measured (a backward under it, less a plain one), not assumed to be a
forward's.
"""
from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from revify.storage_tracking import LiveStorageTracker, storage_key
from revify.runtime.checkpoint_call import _checkpoint

from revify.passes.planning.count_flops import flop_counter
from revify.passes.analysis.find_stem import StemInfo
from revify.runtime.call_arguments import fed_tensor


@dataclass(frozen=True)
class StemCost:
    path: str
    saved_bytes: int  # what the stem saves for its backward that recomputing it frees
    held_bytes: int  # its arguments created by the step: kept alive by its recompute
    forward_s: float
    forward_flops: int  # as torch.utils.flop_counter counts them
    own_recompute_flops: int = 0  # what its own checkpoint recomputes (it stops once backward has its tensors)
    forward_transient: int = 0  # peak bytes of a no-grad forward beyond its output (the rebuild in backward)

    @property
    def recompute_flops(self) -> int:
        """FLOPs the stem adds to backward: a rebuild for the segment, and its own checkpoint's recompute."""
        return self.forward_flops + self.own_recompute_flops

    @property
    def recompute_s(self) -> float:
        """Seconds likewise; the own recompute's share of the forward taken from its FLOPs where it has any."""
        share = self.own_recompute_flops / self.forward_flops if self.forward_flops else 1.0
        return self.forward_s * (1.0 + share)


def profile_stem(model: nn.Module, stem: StemInfo, repeats: int = 3) -> StemCost:
    """Run the stem on its recorded arguments (RNG, buffers and gradients untouched) and measure it."""
    module = model.get_submodule(stem.path)
    # recorded under no_grad; in training a floating input made by the step requires grad, and the
    # stem saves more then (dropout its mask): profile as if every floating input did
    args, kwargs = tree_map(_requiring_grad, (tuple(stem.call.example_args or ()),
                                              dict(stem.call.example_kwargs or {})))
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    skip = {storage_key(t) for t in tensors + list(module.parameters()) + list(module.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key is not None and key not in skip:
            saved[key] = t.untyped_storage().nbytes()
        return t

    grads = {p: p.grad for p in module.parameters()}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out, _ = fed_tensor(module(*args, **kwargs))
            if out is not None:  # the output is the chain's input: the planner counts it there
                saved.pop(storage_key(out), None)
            del out
            tracker = LiveStorageTracker()
            with torch.no_grad(), tracker:
                out, _ = fed_tensor(module(*args, **kwargs))
            transient = tracker.peak_bytes - (out.untyped_storage().nbytes() if out is not None else 0)
            del out
            times = []
            with torch.no_grad():
                for _ in range(repeats + 1):  # the first call warms caches up
                    t0 = time.perf_counter()
                    module(*args, **kwargs)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - t0)
                counter = flop_counter()
                with counter:
                    module(*args, **kwargs)
            own = _backward_flops(module, args, kwargs, True) - _backward_flops(module, args, kwargs, False)
    finally:
        for p, g in grads.items():
            p.grad = g
    return StemCost(stem.path, sum(saved.values()), stem.call.created_input_bytes,
                    statistics.median(times[1:]), counter.get_total_flops(), max(0, own), max(0, transient))


def _requiring_grad(value: object) -> object:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().requires_grad_()
    return value


def _backward_flops(module: nn.Module, args: tuple, kwargs: dict, checkpointed: bool) -> int:
    """FLOPs of the stem's backward, run as written or under its own checkpoint (which recomputes)."""
    with torch.enable_grad():
        forward = functools.partial(_checkpoint, module.forward, "recompute") if checkpointed else module.forward
        out, _ = fed_tensor(forward(*args, **kwargs))
        if out is None or not out.requires_grad:
            return 0
        counter = flop_counter()
        with counter:
            out.backward(torch.ones_like(out))
    return counter.get_total_flops()
