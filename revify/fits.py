"""Will one training step fit? Sizes checked before anything is allocated.

A ``--batch-size 1000000`` or a hand-edited ``revify.json`` asking for an
80 GB input must get one line naming the size and what would fit, not an
OOM kill. Two checks, cheapest first:

* ``input_bytes(spec)``: the bytes the example inputs would take, from their
  recorded shapes (no tensor made);
* ``predicted_step_bytes(model, spec)``: parameters plus the peak of one
  training step of the original model, observed on fake tensors with the
  same measurement ``revify.estimate`` uses (nothing is allocated);

both compared with ``available_bytes(device)``: the kernel's MemAvailable
(and the cgroup's limit, when lower) on CPU, ``cuda.mem_get_info`` on a GPU.

Before::

    revify convert ./bert --batch-size 1000000      # OOM-killed after 12 s, no message

After::

    check_step_fits(model, spec, "cpu")  →  StepTooLarge("one training step needs 310.4 GiB (...);
                                               19.8 GiB is free: at most batch size 63 fits")
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from revify.example_inputs import DTYPES, InputSpec, TensorSpec
from revify.passes.prediction.fake_copy import fake_copy, fake_inputs, new_fake_mode
from revify.passes.prediction.fake_step import measure_fake_step
from revify.training_step import default_loss_fn
from revify.units import format_bytes


class StepTooLarge(ValueError):
    """The requested inputs, or one training step on them, would not fit in free memory."""


def _cgroup_free() -> int | None:
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Free memory on ``device`` now (None: unknown, nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    cgroup = _cgroup_free()
    known = [v for v in (free, cgroup) if v is not None]
    return min(known) if known else None


def tensor_bytes(spec: TensorSpec) -> int:
    return math.prod(spec.shape) * torch.empty((), dtype=DTYPES[spec.dtype]).element_size()


def input_bytes(spec: InputSpec) -> int:
    return sum(tensor_bytes(v) for _, v in spec.entries if isinstance(v, TensorSpec))


def _meta_inputs(spec: InputSpec) -> Any:
    values = [(k, torch.empty(v.shape, dtype=DTYPES[v.dtype], device="meta") if isinstance(v, TensorSpec) else v)
              for k, v in spec.entries]
    return dict(values) if spec.call == "kwargs" else tuple(v for _, v in values)


def predicted_step_bytes(model: nn.Module, spec: InputSpec, device: str | torch.device = "cpu") -> int | None:
    """Parameters plus the peak of one training step of ``model`` on ``spec``, on fake tensors (None: the
    fake run failed, e.g. data-dependent control flow; then only the inputs are checked)."""
    mode = new_fake_mode()
    try:
        fmodel = fake_copy(model, mode, device)
        inputs = fake_inputs(_meta_inputs(spec), mode, device)
        step = measure_fake_step(fmodel, inputs, default_loss_fn, [], mode)
    except Exception:  # an estimate we cannot make refuses nothing; the real step still reports its failure
        return None
    return int(step.param_bytes + step.peak_bytes)


def _batch_that_fits(spec: InputSpec, need: int, free: int) -> str:
    batch = next((v.shape[0] for _, v in spec.entries if isinstance(v, TensorSpec) and v.shape), None)
    if not batch or need <= 0:
        return ""
    fits = int(batch * free / need)
    return f": at most batch size {fits} fits" if 0 < fits < batch else ""


def check_inputs_fit(spec: InputSpec, device: str | torch.device = "cpu") -> None:
    """Refuse inputs whose tensors alone exceed free memory (before any is made)."""
    free = available_bytes(device)
    need = input_bytes(spec)
    if free is not None and need > free:
        raise StepTooLarge(f"the example inputs alone need {format_bytes(need)} ({spec.describe()}); "
                           f"{format_bytes(free)} is free{_batch_that_fits(spec, need, free)}")


def check_step_fits(model: nn.Module, spec: InputSpec, device: str | torch.device = "cpu") -> None:
    """Refuse a training step (parameters + peak, predicted on fake tensors) larger than free memory."""
    check_inputs_fit(spec, device)
    free = available_bytes(device)
    if free is None:
        return
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if weights > free:  # cheap, and a fake step of a huge model takes minutes
        raise StepTooLarge(f"the model's weights alone need {format_bytes(weights)}; {format_bytes(free)} is free")
    need = predicted_step_bytes(model, spec, device)
    if need is not None and need > free:
        raise StepTooLarge(f"one training step on {spec.describe()} needs {format_bytes(need)} (predicted on fake "
                           f"tensors); {format_bytes(free)} is free{_batch_that_fits(spec, need, free)}")


def check_model_fits(build: Any, where: str, device: str | torch.device = "cpu") -> None:
    """Refuse a model whose parameters and buffers alone exceed free memory, counted on ``build()``
    called on the meta device (a config.json asking for a huge model is one line, not an OOM kill)."""
    free = available_bytes(device)
    if free is None:
        return
    try:
        with torch.device("meta"):
            model = build()
    except Exception:  # the real build reports its own failure
        return
    need = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if need > free:
        raise StepTooLarge(f"{where}: the model's weights alone need {format_bytes(need)}; "
                           f"{format_bytes(free)} is free")


def is_allocation_failure(text: str) -> bool:
    """An error message of a failed allocation (CPU or CUDA), as torch words them."""
    lowered = text.lower()
    return any(s in lowered for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                      "defaultcpuallocator", "not enough memory"))


__all__ = ["StepTooLarge", "available_bytes", "input_bytes", "check_inputs_fit", "check_step_fits",
           "check_model_fits", "predicted_step_bytes", "is_allocation_failure"]
