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
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

# the floor every measurement stands on, named here too: measure is where users and tests look for them
from revify.forward_timing import measure_block_times
from revify.storage_tracking import CATEGORIES, LiveStorageTracker, SavedBytes, parameter_bytes
from revify.training_step import ExampleInputs, LossFn, backward, run_model, timed_step, zero_grads

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


@contextlib.contextmanager
def heap_frozen() -> Iterator[None]:
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
    saved = SavedBytes(model)
    zero_grads(model)
    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        out = run_model(model, example_inputs)
        loss = loss_fn(out)
    del out
    backward(loss)
    del loss
    zero_grads(model)
    return saved.total, len(saved.seen)


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
    saved = SavedBytes(model, block_paths)
    tracker = LiveStorageTracker(record_series)
    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, torch.nn.Module) else []
    handles = [p.register_post_accumulate_grad_hook(lambda p: tracker.mark_gradient(p.grad)) for p in params]
    zero_grads(model)
    torch.manual_seed(0)
    try:
        with heap_frozen(), tracker if track_peak else contextlib.nullcontext():
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                out = run_model(model, example_inputs)
                loss = loss_fn(out)
            del out
            gc.collect()  # a reference cycle in user code must not count as retained
            retained = tracker.live_bytes
            tracker.phase = "backward"
            backward(loss)
            del loss
    finally:
        saved.close()
        for h in handles:
            h.remove()
    zero_grads(model)
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
    zero_grads(model)
    torch.manual_seed(0)
    tracker = LiveStorageTracker()
    with heap_frozen(), tracker:
        out = run_model(model, example_inputs)
        loss = loss_fn(out)
        del out
        gc.collect()  # a reference cycle in user code must not count as retained
        retained = tracker.live_bytes
        backward(loss)
        del loss
    peak = tracker.peak_bytes
    zero_grads(model)
    return peak, retained


def measure_peak_bytes(
    model: Callable[..., Any],
    example_inputs: ExampleInputs,
    loss_fn: LossFn,
) -> int:
    """Peak live bytes of storages created during one forward+loss+backward."""
    return measure_memory(model, example_inputs, loss_fn)[0]


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
        timed_step(model, example_inputs, loss_fn)
    times = [timed_step(model, example_inputs, loss_fn) for _ in range(max(1, repeats))]
    zero_grads(model)
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
