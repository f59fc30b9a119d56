"""Pass 0: run the example inputs once and record every module call.

fx cannot trace most real models from the top (transformers models iterate
proxies and forward ``**kwargs``), but every model can be *run*. This pass
runs the model eagerly under forward hooks and a dispatch mode and records,
for each module call, its place in the call tree, the tensor that flows in
and out of it, and its side effects. Later passes find chains of blocks from
this record even when the parent's Python code is opaque.

Before::

    model(**example_inputs)          # an opaque Python function

After::

    CallRecord(path="encoder.layer.3", parent=4, hidden_in=(2, 16, 64),
               hidden_out=(2, 16, 64), input_from=6, random=True, ...)

The run uses ``torch.no_grad`` and restores RNG state and every buffer, so
recording has no effect on the model (BatchNorm statistics stay untouched).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from revify.storage_tracking import storage_key
# the slot primitives run on every call of a converted block, so the runtime owns them
from revify.runtime.call_arguments import fed_tensor, get_slot, side_signature


@dataclass
class CallRecord:
    """One call of one module during the recording run."""

    index: int
    path: str
    module_type: str
    parent: int | None
    hidden_slot: tuple[str, Any] | None  # ("arg", i) or ("kw", name): the first tensor input
    hidden_in_shape: tuple[int, ...] | None
    hidden_in_dtype: str | None
    hidden_in_id: int | None
    hidden_in_version: int | None
    feed_index: int | None  # None: output is the tensor; 0: output[0] is the tensor
    hidden_out_shape: tuple[int, ...] | None
    hidden_out_dtype: str | None
    hidden_out_id: int | None
    hidden_out_version: int | None = None  # to see a parent that mutates the output in place
    side_signature: tuple = ()  # identity of the other inputs, to check that siblings share them
    random_ops: set[str] = field(default_factory=set)
    mutated_buffers: list[str] = field(default_factory=list)
    mutated_inputs: bool = False
    example_args: tuple | None = None
    example_kwargs: dict | None = None
    # bytes of the tensor inputs that this forward created (not the caller's inputs, parameters or
    # buffers): what a checkpoint of this call would keep alive (``find_stem``)
    created_input_bytes: int = 0
    # tensors the call returned beside the fed one that it computed (not one of its inputs handed back):
    # T5's first block returns the position bias that the later blocks receive as a side input
    computed_extra_ids: tuple[int, ...] = ()


@dataclass
class CallTrace:
    """Everything the recording run saw."""

    calls: list[CallRecord]
    call_counts: dict[str, int]
    error: str | None = None

    def children(self, index: int | None) -> list[CallRecord]:
        return [c for c in self.calls if c.parent == index]


def _first_tensor_slot(args: tuple, kwargs: dict) -> tuple[str, Any] | None:
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return ("arg", i)
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return ("kw", k)
    return None


class _RandomOpWatcher(TorchDispatchMode):
    """Marks every module on the call stack that runs a random aten op; notes the storages ops create."""

    def __init__(self, stack: list[CallRecord]):
        super().__init__()
        self.stack = stack
        self.created: set[int] = set()  # storage keys; a freed key reused is again a created storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            for rec in self.stack:
                rec.random_ops.add(func.overloadpacket.__name__)
        out = func(*args, **(kwargs or {}))
        inputs = {storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (key := storage_key(t)) not in inputs and key is not None:
                self.created.add(key)  # views, in-place and out= results alias an input: not new
        return out

    def created_bytes(self, values: Any) -> int:
        """Bytes of the distinct storages among ``values`` that ops of this run created."""
        found = {}
        for t in tree_flatten(values)[0]:
            if isinstance(t, torch.Tensor) and (key := storage_key(t)) in self.created:
                found[key] = t.untyped_storage().nbytes()
        return sum(found.values())


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return torch.equal(a, b)
    except Exception:  # fake or meta tensors hold no values (memory estimates): the version counter decides
        return True


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Call ``model`` the way the user would: tuple → *args, dict → **kwargs."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def record_calls(model: nn.Module, example_inputs: Any) -> CallTrace:
    """Run ``model`` once on ``example_inputs`` and record every module call."""
    calls: list[CallRecord] = []
    stack: list[CallRecord] = []
    keep_alive: list[Any] = []  # ids are only meaningful while the objects live
    counts: dict[str, int] = {}
    seen_types: set[tuple] = set()
    pending_versions: dict[int, tuple[dict, list]] = {}
    watcher = _RandomOpWatcher(stack)
    handles = []
    names = {m: n for n, m in model.named_modules(remove_duplicate=False)}

    def pre_hook(module, args, kwargs):
        path = names.get(module, "?")
        counts[path] = counts.get(path, 0) + 1
        slot = _first_tensor_slot(args, kwargs)
        hidden = get_slot(args, kwargs, slot) if slot else None
        # arguments are kept for the first call of each kind of call, so that every
        # chain (a ResNet stage after another of the same block type) can be captured
        side = side_signature(args, kwargs, slot)
        kind = (type(module).__name__, tuple(hidden.shape) if hidden is not None else None, side)
        first_of_type = kind not in seen_types
        seen_types.add(kind)
        rec = CallRecord(
            index=len(calls), path=path, module_type=type(module).__name__,
            parent=stack[-1].index if stack else None, hidden_slot=slot,
            hidden_in_shape=tuple(hidden.shape) if hidden is not None else None,
            hidden_in_dtype=str(hidden.dtype) if hidden is not None else None,
            hidden_in_id=id(hidden) if hidden is not None else None,
            hidden_in_version=hidden._version if hidden is not None else None,
            feed_index=None, hidden_out_shape=None, hidden_out_dtype=None, hidden_out_id=None,
            side_signature=side,
            example_args=args if first_of_type else None,
            example_kwargs=dict(kwargs) if first_of_type else None,
            created_input_bytes=watcher.created_bytes((args, kwargs)),
        )
        keep_alive.append((args, kwargs))
        # kernels such as batch_norm update running stats without bumping the
        # version counter, so compare values as well
        buf_versions = {n: (b._version, b.detach().clone()) for n, b in module.named_buffers(recurse=False)}
        in_versions = [(t, t._version) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        pending_versions[rec.index] = (buf_versions, in_versions)
        calls.append(rec)
        stack.append(rec)

    def post_hook(module, args, kwargs, output):
        rec = stack.pop()
        keep_alive.append(output)
        out, feed = fed_tensor(output)
        if out is not None:
            rec.feed_index = feed
            rec.hidden_out_shape = tuple(out.shape)
            rec.hidden_out_dtype = str(out.dtype)
            rec.hidden_out_id = id(out)
            rec.hidden_out_version = out._version
        inputs = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        rec.computed_extra_ids = tuple(id(t) for t in tree_flatten(output)[0]  # kept alive: ids stay unique
                                       if isinstance(t, torch.Tensor) and t is not out and id(t) not in inputs)
        buf_versions, in_versions = pending_versions.pop(rec.index)
        rec.mutated_buffers = [n for n, b in module.named_buffers(recurse=False)
                               if n not in buf_versions or buf_versions[n][0] != b._version
                               or not _same_values(buf_versions[n][1], b)]
        rec.mutated_inputs = any(t._version != v for t, v in in_versions)

    for module in dict.fromkeys(names):  # each module object once
        # prepend: hooks already on the module (spectral_norm) may update buffers
        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))

    saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    error = None
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), watcher:
            call_model(model, example_inputs)
    except Exception as exc:  # any failure of the user's forward is reported, not raised
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved_buffers[n])
    trace = CallTrace(calls=calls, call_counts=counts, error=error)
    del keep_alive
    return trace
