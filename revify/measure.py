"""Measure, never estimate, the activation memory and speed of a training step.

Every number revify reports about a model comes from actually running it on
the user's example inputs -- on real tensors, or on fake tensors
(``torch._subclasses.FakeTensorMode``: same shapes, dtypes, aliasing and
kernels, no data) when the model is too big to run, in which case the report
says so:

* **saved for backward** -- the bytes autograd keeps alive between forward and
  backward.  We observe them with ``torch.autograd.graph.saved_tensors_hooks``:
  every tensor autograd packs is seen, its *storage* is deduplicated (views of
  one buffer count once) and model parameters/buffers are excluded because
  they live regardless of activation checkpointing.  Tensors saved *inside* a
  ``torch.utils.checkpoint`` region are (correctly) not seen: only the
  checkpoint's inputs are kept, which is exactly the saving we want to show.
  Each saved storage is attributed to the innermost block (a module named in
  ``block_paths``) running when autograd first saved it, so reports can say
  which chain keeps what.
* **retained after forward** -- bytes of storages created during forward
  and still alive when backward starts: what autograd saved, plus what
  selective checkpointing caches in its own dispatch mode (invisible to
  saved-tensor hooks), plus the outputs and the loss.
* **peak live tensors** -- the peak number of bytes in tensor storages that were
  created during one forward+backward step and were still alive at the same
  time.  A :class:`LiveStorageTracker` (a ``TorchDispatchMode``) sees every
  aten op, including those run by the autograd engine during ``backward()``,
  and tracks when each new storage dies with a weak reference.  This works on
  CPU, where no allocator statistics exist, and under fake tensors.  At the
  peak the live bytes are split by category: *activations* (created in
  forward, or recomputed in backward under grad mode), *temporaries* (created
  in backward: activation gradients, workspaces) and *gradients* (storages
  that became a parameter's ``.grad``).  Parameters and buffers are counted
  apart (``param_bytes``): they are alive before the step starts.
* **step time** -- median wall-clock time of several forward+backward steps.

Estimates from shapes and dtypes are easy to get wrong (views, in-place ops,
dtype promotion, checkpoint recomputation); measurements are not.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "CATEGORIES",
    "MemoryProfile",
    "StepMeasurement",
    "LiveStorageTracker",
    "measure_saved_bytes",
    "measure_peak_bytes",
    "measure_memory",
    "measure_training_memory",
    "measure_block_times",
    "measure_step",
    "parameter_bytes",
    "run_model",
]

ExampleInputs = Union[Sequence[Any], Mapping[str, Any]]
LossFn = Callable[[Any], torch.Tensor]

CATEGORIES = ("activations", "temporaries", "gradients")
"""Categories of the bytes created during a step (parameters are counted apart)."""


@dataclass(frozen=True)
class StepMeasurement:
    """Measured figures of one training step (forward + loss + backward)."""

    saved_bytes: int
    """Bytes of distinct non-parameter storages saved for backward."""
    saved_tensors: int
    """Number of distinct non-parameter storages saved for backward."""
    peak_bytes: int
    """Peak bytes of live tensor storages created during the step (above baseline)."""
    step_time_s: float | None
    """Median wall-clock seconds of one forward+backward step (None: not timed, e.g. fake tensors)."""
    retained_bytes: int = 0
    """Bytes of storages created in forward and alive when backward starts (saved, cached, outputs)."""
    peak_by_category: dict[str, int] = field(default_factory=dict)
    """``peak_bytes`` split into activations, temporaries and gradients at the moment of the peak."""
    saved_by_block: dict[str, int] = field(default_factory=dict)
    """Saved bytes by the block that first saved them ("" = outside every block asked for)."""
    param_bytes: int = 0
    """Bytes of the model's parameters and buffers (alive before and after the step)."""


@dataclass(frozen=True)
class MemoryProfile:
    """One forward+loss+backward observed with saved-tensor hooks and a :class:`LiveStorageTracker`."""

    saved_bytes: int
    saved_tensors: int
    saved_by_block: dict[str, int]
    peak_bytes: int
    retained_bytes: int
    peak_by_category: dict[str, int]
    param_bytes: int
    series: tuple[tuple[int, int, int], ...] = ()
    """Live (activations, temporaries, gradients) bytes after each new storage, when recorded."""


def run_model(model: Callable[..., Any], example_inputs: ExampleInputs) -> Any:
    """Call ``model`` with positional args (tuple/list) or keyword args (mapping)."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    # A single tensor (or other object) is treated as the only positional arg.
    return model(example_inputs)


def _storage_key(t: torch.Tensor) -> int | None:
    """Identity of a tensor's storage: the same for all its views, for real, meta and fake tensors.

    Not ``data_ptr()``: fake and meta storages have none.
    """
    try:
        return t.untyped_storage()._cdata
    except Exception:  # tensor subclasses / sparse tensors without storage
        return None


def _persistent_storage_keys(model: Any) -> set[int]:
    """Storage keys of the model's parameters and buffers."""
    keys: set[int] = set()
    if isinstance(model, torch.nn.Module):
        for t in list(model.parameters()) + list(model.buffers()):
            k = _storage_key(t)
            if k is not None:
                keys.add(k)
    return keys


def parameter_bytes(model: Any) -> int:
    """Bytes of the distinct storages of ``model``'s parameters and buffers (tied weights once)."""
    sizes: dict[int, int] = {}
    if isinstance(model, torch.nn.Module):
        for t in list(model.parameters()) + list(model.buffers()):
            k = _storage_key(t)
            if k is not None:
                sizes[k] = t.untyped_storage().nbytes()
    return sum(sizes.values())


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """Let ``gc.collect()`` inside scan only the objects created since entry.

    A reference cycle in user code must not count as retained, so the step
    collects garbage before reading the live bytes; a full collection walks
    every object of the process (0.2 s with transformers and sympy loaded).
    ``gc.freeze`` sets the older objects aside for the duration. If the
    process froze objects itself, nothing is changed (a full collection).
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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


class _SavedBytes:
    """``saved_tensors_hooks`` pack function: distinct non-parameter storages, by block."""

    def __init__(self, model: Any, block_paths: Sequence[str] = ()) -> None:
        self.persistent = _persistent_storage_keys(model)
        self.seen: dict[int, tuple[int, str]] = {}
        self.stack: list[str] = []
        self.handles: list[Any] = []
        if block_paths and isinstance(model, torch.nn.Module):
            for path in dict.fromkeys(block_paths):
                module = model.get_submodule(path)
                self.handles.append(module.register_forward_pre_hook(self._enter(path)))
                self.handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, path: str) -> Callable:
        def hook(module: Any, args: Any) -> None:
            self.stack.append(path)
        return hook

    def _leave(self, module: Any, args: Any, output: Any) -> None:
        self.stack.pop()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is None or key in self.persistent or key in self.seen:
            return t
        self.seen[key] = (t.untyped_storage().nbytes(), self.stack[-1] if self.stack else "")
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.seen.values())

    def by_block(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n, path in self.seen.values():
            out[path] = out.get(path, 0) + n
        return out


def measure_saved_bytes(
    model: Callable[..., Any],
    example_inputs: ExampleInputs,
    loss_fn: LossFn,
) -> tuple[int, int]:
    """Return ``(bytes, count)`` of distinct storages saved for backward.

    Runs forward + loss under ``saved_tensors_hooks``; every packed tensor's
    untyped storage is recorded once (deduplicated by storage identity),
    parameters and buffers of ``model`` are excluded.  Backward is then run so
    the graph (and what it saved) is freed.
    """
    saved = _SavedBytes(model)
    _zero_grads(model)
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        out = run_model(model, example_inputs)
        loss = loss_fn(out)
    del out
    _backward(loss)
    del loss
    _zero_grads(model)
    return saved.total, len(saved.seen)


class LiveStorageTracker(TorchDispatchMode):
    """Track live bytes of tensor storages created while the mode is active.

    Every output of every aten op is inspected; a storage that is not one of
    the op's input storages is new, and its bytes are added to ``live_bytes``
    until the storage is freed (a weak reference on the ``UntypedStorage``
    Python object, which PyTorch keeps alive exactly as long as the C++
    storage, fires on free).  ``peak_bytes`` is the maximum of ``live_bytes``.
    Storages alive before the tracker started are the baseline and are not
    counted.  Backward ops run by the autograd engine are seen too.

    Each storage gets a category when it is created: ``"activations"`` while
    ``phase == "forward"`` or while grad mode is on in backward (checkpoint
    and reversible recomputation), ``"temporaries"`` otherwise;
    :meth:`mark_gradient` moves a parameter's ``.grad`` to ``"gradients"``.
    ``peak_by_category`` is the split at the moment of the peak. With
    ``record_series`` the live bytes per category are appended to ``series``
    after every new storage (zero-byte ones included, so runs of one model at
    different sizes produce series of the same length).
    """

    def __init__(self, record_series: bool = False) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.total_allocated_bytes = 0
        self.phase = "forward"
        self.live_by_category = dict.fromkeys(CATEGORIES, 0)
        self.peak_by_category = dict.fromkeys(CATEGORIES, 0)
        self.series: list[tuple[int, int, int]] | None = [] if record_series else None
        self._refs: dict[int, tuple[weakref.ref, int, str]] = {}
        self._lock = threading.RLock()

    def _on_free(self, key: int) -> None:
        with self._lock:
            entry = self._refs.pop(key, None)
            if entry is not None:
                self.live_bytes -= entry[1]
                self.live_by_category[entry[2]] -= entry[1]

    def _category(self) -> str:
        return "activations" if self.phase == "forward" or torch.is_grad_enabled() else "temporaries"

    def _record(self) -> None:
        if self.series is not None:
            c = self.live_by_category
            self.series.append((c["activations"], c["temporaries"], c["gradients"]))

    def _track(self, st: torch.UntypedStorage) -> None:
        key = id(st)
        nbytes = st.nbytes()
        if nbytes == 0:
            self._record()
            return
        with self._lock:
            if key in self._refs:
                return
            category = self._category()
            ref = weakref.ref(st, lambda _r, k=key: self._on_free(k))
            self._refs[key] = (ref, nbytes, category)
            self.live_bytes += nbytes
            self.live_by_category[category] += nbytes
            self.total_allocated_bytes += nbytes
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes = self.live_bytes
                self.peak_by_category = dict(self.live_by_category)
            self._record()

    def mark_gradient(self, t: torch.Tensor) -> None:
        """Count the storage of ``t`` (a parameter's new ``.grad``) as gradients from now on."""
        try:
            key = id(t.untyped_storage())
        except Exception:
            return
        with self._lock:
            entry = self._refs.get(key)
            if entry is not None and entry[2] != "gradients":
                self._refs[key] = (entry[0], entry[1], "gradients")
                self.live_by_category[entry[2]] -= entry[1]
                self.live_by_category["gradients"] += entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        in_flat, _ = tree_flatten((args, kwargs))
        in_keys = set()
        for a in in_flat:
            if isinstance(a, torch.Tensor):
                k = _storage_key(a)
                if k is not None:
                    in_keys.add(k)
        out_flat, _ = tree_flatten(out)
        for o in out_flat:
            if not isinstance(o, torch.Tensor):
                continue
            try:
                st = o.untyped_storage()
            except Exception:
                continue
            if st._cdata in in_keys:
                continue  # view / in-place / out= result: not a new storage
            try:
                self._track(st)
            except TypeError:  # storage not weak-referenceable: cannot track
                continue
        return out


def measure_training_memory(
    model: Callable[..., Any],
    example_inputs: ExampleInputs,
    loss_fn: LossFn,
    block_paths: Sequence[str] = (),
    *,
    record_series: bool = False,
    track_peak: bool = True,
) -> MemoryProfile:
    """Saved bytes (by block), retained bytes and the peak (by category) of one step, in one run.

    Works on real tensors and under ``FakeTensorMode`` (call it inside the
    mode, with a model and inputs made of fake tensors). ``track_peak=False``
    observes saved bytes only (faster; peak and retained figures are 0).
    """
    saved = _SavedBytes(model, block_paths)
    tracker = LiveStorageTracker(record_series)
    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, torch.nn.Module) else []
    handles = [p.register_post_accumulate_grad_hook(lambda p: tracker.mark_gradient(p.grad)) for p in params]
    _zero_grads(model)
    torch.manual_seed(0)
    try:
        with _heap_frozen(), tracker if track_peak else contextlib.nullcontext():
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                out = run_model(model, example_inputs)
                loss = loss_fn(out)
            del out
            gc.collect()  # a reference cycle in user code must not count as retained
            retained = tracker.live_bytes
            tracker.phase = "backward"
            _backward(loss)
            del loss
    finally:
        saved.close()
        for h in handles:
            h.remove()
    _zero_grads(model)
    return MemoryProfile(
        saved_bytes=saved.total,
        saved_tensors=len(saved.seen),
        saved_by_block=saved.by_block(),
        peak_bytes=tracker.peak_bytes,
        retained_bytes=retained,
        peak_by_category=dict(tracker.peak_by_category),
        param_bytes=parameter_bytes(model),
        series=tuple(tracker.series or ()),
    )


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
    with _heap_frozen(), tracker:
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


def measure_block_times(
    model: torch.nn.Module,
    example_inputs: ExampleInputs,
    block_paths: Sequence[str],
    *,
    repeats: int = 3,
) -> tuple[float, dict[str, float]]:
    """Median forward time of the whole model and of each block, in training mode with grad on.

    This is what recomputation repeats: a block recomputed in backward costs
    about its forward time again. The RNG and the buffers (BatchNorm
    statistics) are left as they were.
    """
    times: dict[str, list[float]] = {p: [] for p in block_paths}
    totals: list[float] = []
    starts: dict[str, float] = {}
    handles = []
    for path in dict.fromkeys(block_paths):
        module = model.get_submodule(path)

        def pre(m, a, p=path):
            starts[p] = time.perf_counter()

        def post(m, a, o, p=path):
            _sync(model)
            times[p].append(time.perf_counter() - starts.pop(p, time.perf_counter()))

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.random.fork_rng(devices=[]):
            for _ in range(max(1, repeats)):
                _sync(model)
                t0 = time.perf_counter()
                out = run_model(model, example_inputs)
                _sync(model)
                totals.append(time.perf_counter() - t0)
                del out
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, value in buffers:
                b.copy_(value)
    return statistics.median(totals), {p: statistics.median(v) if v else 0.0 for p, v in times.items()}


def measure_step(
    model: Callable[..., Any],
    example_inputs: ExampleInputs,
    loss_fn: LossFn,
    *,
    repeats: int = 3,
    warmup: int = 1,
    block_paths: Sequence[str] = (),
) -> StepMeasurement:
    """Measure saved-for-backward bytes, peak live bytes (by category) and step time.

    ``example_inputs`` is a tuple/list of positional arguments or a mapping of
    keyword arguments; ``loss_fn(output)`` must return a scalar tensor.
    Saved bytes are attributed to the modules named in ``block_paths``.
    Gradients of ``model`` are reset (``p.grad = None``) between steps and
    left as ``None`` afterwards.
    """
    prof = measure_training_memory(model, example_inputs, loss_fn, block_paths)
    for _ in range(max(0, warmup)):
        _timed_step(model, example_inputs, loss_fn)
    times = [_timed_step(model, example_inputs, loss_fn) for _ in range(max(1, repeats))]
    _zero_grads(model)
    return StepMeasurement(
        saved_bytes=int(prof.saved_bytes),
        saved_tensors=int(prof.saved_tensors),
        peak_bytes=int(prof.peak_bytes),
        step_time_s=float(statistics.median(times)),
        retained_bytes=int(prof.retained_bytes),
        peak_by_category=dict(prof.peak_by_category),
        saved_by_block=dict(prof.saved_by_block),
        param_bytes=int(prof.param_bytes),
    )


def profile_to_measurement(prof: MemoryProfile) -> StepMeasurement:
    """A :class:`StepMeasurement` without a step time (fake-tensor runs are not timed)."""
    return StepMeasurement(
        saved_bytes=prof.saved_bytes, saved_tensors=prof.saved_tensors, peak_bytes=prof.peak_bytes,
        step_time_s=None, retained_bytes=prof.retained_bytes, peak_by_category=dict(prof.peak_by_category),
        saved_by_block=dict(prof.saved_by_block), param_bytes=prof.param_bytes)
