"""One training step as every measurement runs it: call, loss, backward, gradients reset.

``measure``, ``forward_timing``, ``step_timing`` and the planner's profiles all call a model the
same way (positional inputs from a tuple or list, keyword inputs from a mapping), derive the
same default loss, and wait for CUDA kernels before reading a clock; this module is that
shared floor. It imports nothing of revify, so every stage may use it.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence, Union

import torch

ExampleInputs = Union[Sequence[Any], Mapping[str, Any]]
LossFn = Callable[[Any], torch.Tensor]


def run_model(model: Callable[..., Any], example_inputs: ExampleInputs) -> Any:
    """Call ``model`` with positional args (tuple/list) or keyword args (mapping)."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    # A single tensor (or other object) is treated as the only positional arg.
    return model(example_inputs)


def default_loss_fn(out: Any) -> torch.Tensor:
    """Pick a tensor from a model output and return ``out.float().pow(2).mean()``."""
    if hasattr(out, "logits") and getattr(out, "logits") is not None:
        t = out.logits
    elif hasattr(out, "last_hidden_state") and getattr(out, "last_hidden_state") is not None:
        t = out.last_hidden_state
    elif isinstance(out, (tuple, list)):
        t = out[0]
    elif isinstance(out, torch.Tensor):
        t = out
    else:
        raise TypeError(
            f"cannot derive a loss from model output of type {type(out).__name__}; "
            "pass loss_fn=..."
        )
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"model output element is {type(t).__name__}, not a tensor; pass loss_fn=...")
    return t.float().pow(2).mean()


def zero_grads(model: Any) -> None:
    """Drop every gradient: each measured step starts from none, as a training step after ``zero_grad``."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            p.grad = None


def backward(loss: torch.Tensor) -> None:
    """Backward, unless nothing requires grad (a frozen model still gets its forward measured)."""
    if loss.requires_grad:
        loss.backward()


def sync(model: Any) -> None:
    """Wait for the model's CUDA kernels: a clock read before they finish measures the launch only."""
    if torch.cuda.is_available() and isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_cuda:
                torch.cuda.synchronize(p.device)
            break


def timed_step(model: Callable[..., Any], example_inputs: ExampleInputs, loss_fn: LossFn) -> float:
    """Seconds of one forward + loss + backward, from a fixed seed (dropout masks alike in every run)."""
    zero_grads(model)
    torch.manual_seed(0)
    sync(model)
    t0 = time.perf_counter()
    out = run_model(model, example_inputs)
    loss = loss_fn(out)
    del out
    backward(loss)
    sync(model)
    dt = time.perf_counter() - t0
    del loss
    return dt
