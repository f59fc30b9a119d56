"""One training step on a chosen device and precision: its peak memory and its time, paired with a baseline.

The benches, the GPU suite and ``revify report --device/--dtype`` measure the
same way, so their figures compare:

* **precision** -- ``fp32`` (no autocast), ``bf16`` or ``fp16``: the model's
  weights stay fp32 and forward runs under ``torch.autocast`` on the device,
  as mixed-precision training does (fp16 without a loss scaler: memory and
  time are those of a scaled step; the loss value is not used).
* **peak** -- on CUDA, ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats`` (with ``max_memory_reserved`` beside it, and the
  bytes allocated when the step starts, so the step's own peak is the
  difference); on CPU, where no allocator statistics exist, the live-storage
  tracker of :mod:`revify.measure` (the step's peak only).
* **paired step time** -- steps of the variant alternate with steps of a
  baseline (plain training), the order flipped every pair, and each variant
  step is divided by its neighbour: a machine whose speed drifts by 10-20% over
  minutes (a shared CPU, a GPU warming up) reads as that drift, not as a
  slowdown. CUDA steps are timed with CUDA events, CPU steps with
  ``time.perf_counter``. The median ratio and its spread (lowest, highest)
  are reported.

Before::

    measure_step(model, inputs, loss_fn).step_time_s            # unpaired median, CPU only

After::

    amp = with_precision(rmodel, "cuda", "bf16")                    # forward under autocast, backward outside
    peak = measure_peak(amp, inputs, loss_fn)                         # PeakMemory(peak_bytes=…, step_peak_bytes=…)
    times = paired_step_times(amp, with_precision(model, "cuda", "bf16"), inputs, loss_fn)  # ratio 1.08 [1.05-1.12]
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from revify.measure import measure_training_memory
from revify.step_timing import alternating_pairs
from revify.training_step import backward, run_model, zero_grads

__all__ = ["DTYPES", "precision", "to_device", "train_step", "PeakMemory", "measure_peak", "PairedTimes",
           "paired_step_times", "device_of", "Autocast", "with_precision", "autocast_forward",
           "StepMemory", "measure_step_memory"]

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--dtype`` values: the autocast dtype (None: no autocast, fp32)."""

LossFn = Callable[[Any], torch.Tensor]


def device_of(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def precision(device: str | torch.device, dtype: str, cache_enabled: bool = True) -> Iterator[None]:
    """``torch.autocast`` on ``device`` for ``bf16`` / ``fp16``; nothing for ``fp32``.

    ``cache_enabled=False`` for anything that runs several forwards and backwards inside one
    region (revify's planner profiles): autocast caches the bf16 copy of each weight for the
    whole region, so a second forward (or a recompute in a backward inside the region) runs
    fewer cast ops than the first, and selective checkpointing, which matches its saved ops to
    the recompute's by order, hands back a wrong tensor (measured: BERT, torch 2.13).
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    amp = DTYPES[dtype]
    if amp is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=amp, cache_enabled=cache_enabled):
        yield


@contextlib.contextmanager
def autocast_forward(model: torch.nn.Module, device: str | torch.device, dtype: str) -> Iterator[torch.nn.Module]:
    """While active, each call of ``model`` runs its forward under autocast and leaves it before the
    loss and backward. Hooks on the module itself, not a wrapper: submodule paths and attributes
    (``revify_plan``) stay as they are. Nothing is installed for fp32."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if DTYPES[dtype] is None:
        yield model
        return
    active: list[Any] = []

    def enter(module: Any, args: Any) -> None:
        ctx = torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])
        ctx.__enter__()
        active.append(ctx)

    def leave(module: Any, args: Any, output: Any) -> None:
        if active:
            active.pop().__exit__(None, None, None)

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


class Autocast(torch.nn.Module):
    """Runs ``model``'s forward (and the loss inside it) under autocast; backward runs outside,
    as PyTorch's AMP recipe has it. A Module, so measurements see the model's parameters."""

    def __init__(self, model: Any, device: str | torch.device, dtype: str) -> None:
        super().__init__()
        self.model, self.device, self.dtype = model, torch.device(device), dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with precision(self.device, self.dtype):
            return self.model(*args, **kwargs)


def with_precision(model: Any, device: str | torch.device, dtype: str) -> Any:
    """``model`` itself for fp32, else an :class:`Autocast` wrapper around it."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return model if DTYPES[dtype] is None else Autocast(model, device, dtype)


def to_device(value: Any, device: str | torch.device) -> Any:
    """Move every tensor in a (nested) tuple, list or mapping of example inputs to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def train_step(model: Any, inputs: Any, loss_fn: LossFn) -> None:
    """Forward, loss, backward; gradients are set to None before (``zero_grad(set_to_none=True)``)."""
    zero_grads(model)
    out = run_model(model, inputs)
    loss = loss_fn(out)
    del out
    backward(loss)


@dataclass(frozen=True)
class PeakMemory:
    """The peak of one training step; on CPU only ``step_peak_bytes`` is known."""

    step_peak_bytes: int
    """Peak bytes above those allocated when the step started (activations, gradients, temporaries)."""
    peak_bytes: int | None
    """``torch.cuda.max_memory_allocated`` over the step (everything resident included); None on CPU."""
    reserved_bytes: int | None
    """``torch.cuda.max_memory_reserved`` over the step (the caching allocator's pool); None on CPU."""
    resident_bytes: int | None
    """``torch.cuda.memory_allocated`` when the step started (weights, inputs, anything else alive)."""
    source: str
    """"cuda allocator" or "live tensors" (the live-storage tracker)."""


def measure_peak(model: Any, inputs: Any, loss_fn: LossFn, device: str | torch.device | None = None) -> PeakMemory:
    """One step's peak. Run it after a warm-up step, so that lazily built state (cuBLAS workspaces,
    compiled graphs, reversible anchors for a new precision) is not counted as the step's."""
    device = torch.device(device) if device is not None else device_of(model)
    if device.type != "cuda":
        prof = measure_training_memory(model, inputs, loss_fn)
        return PeakMemory(prof.peak_bytes, None, None, None, "live tensors")
    zero_grads(model)
    gc.collect()
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    train_step(model, inputs, loss_fn)
    torch.cuda.synchronize(device)
    peak, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    zero_grads(model)
    return PeakMemory(peak - resident, peak, reserved, resident, "cuda allocator")


@dataclass(frozen=True)
class StepMemory:
    """Bytes saved for backward (saved-tensor hooks) beside the step's peak (see :class:`PeakMemory`)."""

    saved_bytes: int
    peak: PeakMemory


def measure_step_memory(model: Any, inputs: Any, loss_fn: LossFn, device: str | torch.device | None = None,
                        warmup: int = 1) -> StepMemory:
    """Saved bytes and the peak of one step, after ``warmup`` steps. On CPU one observed step gives both;
    on CUDA the peak comes from a step without hooks (they would add their own bookkeeping)."""
    device = torch.device(device) if device is not None else device_of(model)
    for _ in range(max(0, warmup)):
        train_step(model, inputs, loss_fn)
    if device.type != "cuda":
        prof = measure_training_memory(model, inputs, loss_fn)
        return StepMemory(prof.saved_bytes, PeakMemory(prof.peak_bytes, None, None, None, "live tensors"))
    from revify.measure import measure_saved_bytes
    saved = measure_saved_bytes(model, inputs, loss_fn)[0]
    return StepMemory(saved, measure_peak(model, inputs, loss_fn, device))


@dataclass(frozen=True)
class PairedTimes:
    """Step times of a variant and of the baseline steps run alternately with it."""

    times_s: tuple[float, ...]
    base_times_s: tuple[float, ...]

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(t / b for t, b in zip(self.times_s, self.base_times_s))

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def ratio(self) -> float:
        """Median of the per-pair ratios: the variant's step time over the baseline's."""
        return statistics.median(self.ratios)

    @property
    def spread(self) -> tuple[float, float]:
        """(lowest, highest) per-pair ratio."""
        return min(self.ratios), max(self.ratios)

    def describe(self) -> str:
        lo, hi = self.spread
        return f"{self.ratio:.2f}x [{lo:.2f}-{hi:.2f}] over {len(self.times_s)} pairs"


def _timed(model: Any, inputs: Any, loss_fn: LossFn, device: torch.device, clock: str = "wall") -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        train_step(model, inputs, loss_fn)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    now = time.process_time if clock == "cpu" else time.perf_counter
    t0 = now()
    train_step(model, inputs, loss_fn)
    return now() - t0


def paired_step_times(model: Any, base: Any, inputs: Any, loss_fn: LossFn, *, pairs: int = 5, warmup: int = 1,
                      device: str | torch.device | None = None, base_inputs: Any = None,
                      clock: str = "wall") -> PairedTimes:
    """Time ``pairs`` steps of ``model``, each next to a step of ``base``, after ``warmup`` steps of each.

    Pair ``k`` runs the variant first when ``k`` is even and the baseline first when odd, so neither
    always follows the other (a step after a slower one can find caches cold or the clock lower).
    ``base_inputs`` (default ``inputs``) lets the baseline take its own inputs. On CPU,
    ``clock="cpu"`` times with the process's CPU time (``time.process_time``) instead of the wall
    clock: on cores shared with other processes, time spent waiting for a core is not the step's
    (CUDA steps are always timed with CUDA events).
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    device = torch.device(device) if device is not None else device_of(model)
    base_inputs = inputs if base_inputs is None else base_inputs
    for _ in range(max(0, warmup)):
        train_step(model, inputs, loss_fn)
        train_step(base, base_inputs, loss_fn)
    times, base_times = alternating_pairs(lambda: _timed(model, inputs, loss_fn, device, clock),
                                          lambda: _timed(base, base_inputs, loss_fn, device, clock), pairs)
    zero_grads(model)
    zero_grads(base)
    return PairedTimes(tuple(times), tuple(base_times))
