"""Measure, never estimate, the activation memory and speed of a training step.

Every number revify reports about a model comes from actually running it on
the user's example inputs:

* **saved for backward** -- the bytes autograd keeps alive between forward and
  backward.  We observe them with ``torch.autograd.graph.saved_tensors_hooks``:
  every tensor autograd packs is seen, its *storage* is deduplicated (views of
  one buffer count once) and model parameters/buffers are excluded because
  they live regardless of activation checkpointing.  Tensors saved *inside* a
  ``torch.utils.checkpoint`` region are (correctly) not seen: only the
  checkpoint's inputs are kept, which is exactly the saving we want to show.
* **retained after forward** -- bytes of storages created during forward
  and still alive when backward starts: what autograd saved, plus what
  selective checkpointing caches in its own dispatch mode (invisible to
  saved-tensor hooks), plus the outputs and the loss.
* **peak live tensors** -- the peak number of bytes in tensor storages that were
  created during one forward+backward step and were still alive at the same
  time.  A :class:`LiveStorageTracker` (a ``TorchDispatchMode``) sees every
  aten op, including those run by the autograd engine during ``backward()``,
  and tracks when each new storage dies with a weak reference.  This works on
  CPU, where no allocator statistics exist.
* **step time** -- median wall-clock time of several forward+backward steps.

Estimates from shapes and dtypes are easy to get wrong (views, in-place ops,
dtype promotion, checkpoint recomputation); measurements are not.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "StepMeasurement",
    "LiveStorageTracker",
    "measure_saved_bytes",
    "measure_peak_bytes",
    "measure_memory",
    "measure_step",
    "run_model",
]

ExampleInputs = Union[Sequence[Any], Mapping[str, Any]]
LossFn = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class StepMeasurement:
    """Measured figures of one training step (forward + loss + backward)."""

    saved_bytes: int
    """Bytes of distinct non-parameter storages saved for backward."""
    saved_tensors: int
    """Number of distinct non-parameter storages saved for backward."""
    peak_bytes: int
    """Peak bytes of live tensor storages created during the step (above baseline)."""
    step_time_s: float
    """Median wall-clock seconds of one forward+backward step."""
    retained_bytes: int = 0
    """Bytes of storages created in forward and alive when backward starts (saved, cached, outputs)."""


def run_model(model: Callable[..., Any], example_inputs: ExampleInputs) -> Any:
    """Call ``model`` with positional args (tuple/list) or keyword args (mapping)."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    # A single tensor (or other object) is treated as the only positional arg.
    return model(example_inputs)


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # tensor subclasses / sparse tensors without storage
        return None


def _persistent_storage_ptrs(model: Any) -> set[int]:
    """Storage pointers of the model's parameters and buffers."""
    ptrs: set[int] = set()
    tensors: list[torch.Tensor] = []
    if isinstance(model, torch.nn.Module):
        tensors.extend(model.parameters())
        tensors.extend(model.buffers())
    for t in tensors:
        p = _storage_ptr(t)
        if p:
            ptrs.add(p)
    return ptrs


def _zero_grads(model: Any) -> None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            p.grad = None


def _backward(loss: torch.Tensor) -> None:
    if loss.requires_grad:
        loss.backward()


def _sync(model: Any) -> None:
    if torch.cuda.is_available() and isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_cuda:
                torch.cuda.synchronize(p.device)
            break


def measure_saved_bytes(
    model: Callable[..., Any],
    example_inputs: ExampleInputs,
    loss_fn: LossFn,
) -> tuple[int, int]:
    """Return ``(bytes, count)`` of distinct storages saved for backward.

    Runs forward + loss under ``saved_tensors_hooks``; every packed tensor's
    untyped storage is recorded once (deduplicated by storage data pointer),
    parameters and buffers of ``model`` are excluded.  Backward is then run so
    the graph (and what it saved) is freed.
    """
    persistent = _persistent_storage_ptrs(model)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            nbytes = st.nbytes()
        except Exception:
            return t
        if ptr in persistent:
            return t
        key = ptr if ptr != 0 else -id(st)  # zero-size storages share ptr 0
        if key not in seen:
            seen[key] = nbytes
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    _zero_grads(model)
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = run_model(model, example_inputs)
        loss = loss_fn(out)
    del out
    _backward(loss)
    del loss
    _zero_grads(model)
    return sum(seen.values()), len(seen)


class LiveStorageTracker(TorchDispatchMode):
    """Track live bytes of tensor storages created while the mode is active.

    Every output of every aten op is inspected; a storage that is not one of
    the op's input storages is new, and its bytes are added to ``live_bytes``
    until the storage is freed (a weak reference on the ``UntypedStorage``
    Python object, which PyTorch keeps alive exactly as long as the C++
    storage, fires on free).  ``peak_bytes`` is the maximum of ``live_bytes``.
    Storages alive before the tracker started are the baseline and are not
    counted.  Backward ops run by the autograd engine are seen too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.total_allocated_bytes = 0
        self._refs: dict[int, tuple[weakref.ref, int]] = {}
        self._lock = threading.RLock()

    def _on_free(self, key: int) -> None:
        with self._lock:
            entry = self._refs.pop(key, None)
            if entry is not None:
                self.live_bytes -= entry[1]

    def _track(self, st: torch.UntypedStorage) -> None:
        key = id(st)
        nbytes = st.nbytes()
        if nbytes == 0:
            return
        with self._lock:
            if key in self._refs:
                return
            ref = weakref.ref(st, lambda _r, k=key: self._on_free(k))
            self._refs[key] = (ref, nbytes)
            self.live_bytes += nbytes
            self.total_allocated_bytes += nbytes
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes = self.live_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        in_flat, _ = tree_flatten((args, kwargs))
        in_ptrs = set()
        for a in in_flat:
            if isinstance(a, torch.Tensor):
                p = _storage_ptr(a)
                if p is not None:
                    in_ptrs.add(p)
        out_flat, _ = tree_flatten(out)
        for o in out_flat:
            if not isinstance(o, torch.Tensor) or o.device.type == "meta":
                continue
            try:
                st = o.untyped_storage()
                ptr = st.data_ptr()
            except Exception:
                continue
            if ptr in in_ptrs:
                continue  # view / in-place / out= result: not a new storage
            try:
                self._track(st)
            except TypeError:  # storage not weak-referenceable: cannot track
                continue
        return out


def measure_memory(
    model: Callable[..., Any],
    example_inputs: ExampleInputs,
    loss_fn: LossFn,
) -> tuple[int, int]:
    """``(peak, retained)``: peak live bytes of storages created during one
    forward+loss+backward, and the live bytes when backward starts."""
    _zero_grads(model)
    torch.manual_seed(0)
    tracker = LiveStorageTracker()
    with tracker:
        out = run_model(model, example_inputs)
        loss = loss_fn(out)
        del out
        gc.collect()  # a reference cycle in user code must not count as retained
        retained = tracker.live_bytes
        _backward(loss)
        del loss
    peak = tracker.peak_bytes
    _zero_grads(model)
    return peak, retained


def measure_peak_bytes(
    model: Callable[..., Any],
    example_inputs: ExampleInputs,
    loss_fn: LossFn,
) -> int:
    """Peak live bytes of storages created during one forward+loss+backward."""
    return measure_memory(model, example_inputs, loss_fn)[0]


def _timed_step(model: Callable[..., Any], example_inputs: ExampleInputs, loss_fn: LossFn) -> float:
    _zero_grads(model)
    torch.manual_seed(0)
    _sync(model)
    t0 = time.perf_counter()
    out = run_model(model, example_inputs)
    loss = loss_fn(out)
    del out
    _backward(loss)
    _sync(model)
    dt = time.perf_counter() - t0
    del loss
    return dt


def measure_step(
    model: Callable[..., Any],
    example_inputs: ExampleInputs,
    loss_fn: LossFn,
    *,
    repeats: int = 3,
    warmup: int = 1,
) -> StepMeasurement:
    """Measure saved-for-backward bytes, peak live bytes and step time.

    ``example_inputs`` is a tuple/list of positional arguments or a mapping of
    keyword arguments; ``loss_fn(output)`` must return a scalar tensor.
    Gradients of ``model`` are reset (``p.grad = None``) between steps and
    left as ``None`` afterwards.
    """
    saved_bytes, saved_tensors = measure_saved_bytes(model, example_inputs, loss_fn)
    peak, retained = measure_memory(model, example_inputs, loss_fn)
    for _ in range(max(0, warmup)):
        _timed_step(model, example_inputs, loss_fn)
    times = [_timed_step(model, example_inputs, loss_fn) for _ in range(max(1, repeats))]
    _zero_grads(model)
    return StepMeasurement(
        saved_bytes=int(saved_bytes),
        saved_tensors=int(saved_tensors),
        peak_bytes=int(peak),
        step_time_s=float(statistics.median(times)),
        retained_bytes=int(retained),
    )
