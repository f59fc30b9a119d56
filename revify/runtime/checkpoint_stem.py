"""Runtime: recompute a chain's stem with its first segment instead of keeping the stem's output.

A checkpoint segment keeps its input until backward. For a chain's first
segment that input is the stem's output (``passes/analysis/find_stem``: BERT's
embeddings), and the stem keeps its own saved tensors besides (LayerNorm
input, dropout mask). Installed as the stem module's ``forward``, a
``CheckpointStem``:

1. runs the stem under a non-reentrant checkpoint, so the stem keeps only
   its inputs (``input_ids``: the caller's anyway), and remembers how to run
   it again: its arguments, the RNG state before it, the autocast state,
   and its output, weakly;
2. the chain's first segment (``CheckpointSegment`` with ``stem=``) sees its
   hidden input is exactly that output and does not hand the tensor to
   ``torch.utils.checkpoint`` but a ``StemInput``, which drops it after
   forward and, when backward recomputes the segment, runs the stem again
   (no grad, same RNG and arguments) to rebuild it, before the segment's
   selective-checkpoint modes are entered (they replay only the ops their
   forward ran).

So the stem runs up to three times per step: forward, in the segment's
recompute, and in its own checkpoint's recompute (which stops as soon as
backward has the stem's saved tensors back). Anything unexpected makes the
segment keep its input as usual, slower but exact: the parent changed the
tensor in place or passed another one, autocast changed in between, the stem
changed its own inputs. A stem with hooks, or with tensors on a device other
than the CPU or a CUDA GPU (whose RNG this does not replay), runs as written.
If an argument, parameter or buffer of the stem is modified in place between
forward and backward, the rebuild would differ, so backward raises.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .argument_check import runtime_refusal
from .autocast_state import AutocastState
from .call_arguments import fed_tensor
from .checkpoint_call import _checkpoint
from .fsdp import is_fed, unshard_fsdp
from .hooks import has_hooks
from .installed_forward import install_forwards, original_forward, uninstall_forwards
from .rng import RngState


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]


def _autocast_state(device: torch.device) -> AutocastState:
    return AutocastState.capture(("cpu", device.type))


def _versions(tensors: list[torch.Tensor]) -> list[int]:
    return [t._version for t in tensors]


class StemCall:
    """One forward's stem call, enough to run it again; holds its output only weakly.

    ``_read`` lists every tensor the rebuild reads: the arguments and the
    stem's parameters and buffers. If any of them is modified in place
    before backward, the rebuild would differ: it raises.
    """

    def __init__(self, stem: "CheckpointStem", args: tuple, kwargs: dict, rng: RngState, output: torch.Tensor):
        self.stem = stem
        self.args, self.kwargs = args, kwargs
        self.rng = rng
        self.device = output.device
        self.autocast = _autocast_state(output.device)
        self.output = weakref.ref(output)
        self.version = output._version
        self.requires_grad = output.requires_grad
        self.versions = _versions(self._read())

    def _read(self) -> list[torch.Tensor]:
        module = self.stem.module
        return _tensors(self.args, self.kwargs) + list(module.parameters()) + list(module.buffers())

    def matches(self, hidden: Any) -> bool:
        out = self.output()
        return (out is not None and isinstance(hidden, torch.Tensor) and is_fed(hidden, out)
                and out._version == self.version and _autocast_state(self.device) == self.autocast)

    def recompute(self) -> torch.Tensor:
        """The stem's output again, cut from the stem's graph (the segment's recompute needs its values only).

        Not a leaf, as the forward's was not: code that looks up a leaf's
        gradient accumulator (``register_multi_grad_hook``, which
        ``FlopCounterMode``'s module hooks call) runs an op for a leaf, and
        selective checkpointing's recompute refuses ops its forward did not run.
        """
        if _versions(self._read()) != self.versions:
            raise RuntimeError(f"revify: an input, parameter or buffer of {type(self.stem.module).__name__} (the "
                               "stem recomputed in backward) was modified in place after the forward; its "
                               "recompute would differ")
        with torch.no_grad(), self.rng.replayed():
            unshard_fsdp((self.stem.module,))
            out, _ = fed_tensor(self.stem.forward(*self.args, **self.kwargs))
        if not self.requires_grad:
            return out
        leaf = out.detach().requires_grad_()
        with torch.enable_grad():
            return leaf.view_as(leaf)


class StemInput:
    """What a segment's checkpoint holds instead of its input: the tensor in forward, the recipe after."""

    def __init__(self, call: StemCall, hidden: torch.Tensor):
        self.call = call
        self.hidden: torch.Tensor | None = hidden
        self.rebuilt: torch.Tensor | None = None

    def prepare(self) -> None:
        """Rebuild the input before the segment's recompute enters its dispatch modes."""
        if self.hidden is None:
            self.rebuilt = self.call.recompute()

    def get(self) -> torch.Tensor:
        if self.hidden is not None:
            return self.hidden
        rebuilt, self.rebuilt = self.rebuilt, None  # held no longer than the recompute needs it
        return rebuilt if rebuilt is not None else self.call.recompute()

    def release(self) -> None:
        self.hidden = None


class CheckpointStem:
    """The module that computes a chain's first input, recomputed with the chain's first segment."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.forward: Callable = original_forward(module)
        self.last: StemCall | None = None
        self.recipe_uses = 0  # segments that rebuilt their input from this stem (tests, reports)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "last": None}  # one forward's call

    def install(self) -> None:
        install_forwards(self, [self.module])

    def uninstall(self) -> None:
        uninstall_forwards([self.module])

    def run_head(self, *args: Any, **kwargs: Any) -> Any:
        """The stem module's call: checkpointed, and remembered for the segment to rebuild it from."""
        self.last = None
        tensors = _tensors(args, kwargs)
        owned = list(self.module.parameters()) + list(self.module.buffers())
        devices = [t.device for t in tensors + owned]
        # a full backward hook wraps the output in a Function: the segment would never see the output
        if (not torch.is_grad_enabled() or has_hooks(self.module)
                or any(d.type not in ("cpu", "cuda") for d in devices)
                or runtime_refusal(args, kwargs, None) is not None):  # a mutable argument: no rerun
            # hooks see the call, not its recompute; other accelerators' RNG is not replayed here
            return self.forward(*args, **kwargs)
        rng = RngState.capture(devices)
        before = _versions(tensors)
        out = _checkpoint(self.forward, "recompute", *args, _devices=devices, **kwargs)
        hidden, _ = fed_tensor(out)
        if hidden is not None and _versions(tensors) == before:  # a stem that changes its inputs cannot rerun
            self.last = StemCall(self, args, kwargs, rng, hidden)
        return out

    def take(self, hidden: Any) -> StemInput | None:
        """A ``StemInput`` for ``hidden`` if it is this forward's stem output, unchanged; else None."""
        call, self.last = self.last, None
        if call is None or not call.matches(hidden):
            return None
        self.recipe_uses += 1
        return StemInput(call, hidden)
