"""Pass: a copy of a module (converted or not) whose tensors are fake.

Memory predictions run the model's real code under
``torch._subclasses.FakeTensorMode``: every aten op computes output shapes,
dtypes, strides and storage aliasing as on the real device, and nothing is
allocated. The copy shares no tensor with the original, so a fake step
neither touches the user's ``.grad`` fields nor its buffers; the revify
runtime objects installed on a converted module (checkpoint segments,
reversible chains) are copied with it and refer to the copy's blocks.

Meta tensors (a model built under ``torch.device("meta")``) become fake
tensors on ``device`` (default CPU), so a model too big to allocate runs
with the kernels of a real device (which decide, e.g., what scaled dot
product attention saves).

Before::

    model.layer[0].weight: Parameter(torch.float32[4096, 4096], device=cpu or meta)

After::

    fake.layer[0].weight: Parameter(FakeTensor(float32[4096, 4096], device=cpu))   # no storage
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._pytree import tree_map


def fake_tensor(t: torch.Tensor, mode: FakeTensorMode, device: torch.device | str | None = None) -> torch.Tensor:
    """A fake tensor with the metadata of ``t`` (meta tensors land on ``device``, default CPU)."""
    if isinstance(t, FakeTensor) and t.fake_mode is mode:
        return t
    target = torch.device(device) if device is not None else (
        torch.device("cpu") if t.device.type == "meta" else t.device)
    with mode:
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=target)
    return out.requires_grad_(t.requires_grad) if t.is_leaf and t.requires_grad else out


def fake_copy(module: nn.Module, mode: FakeTensorMode, device: torch.device | str | None = None) -> nn.Module:
    """Deep copy of ``module`` with every parameter, buffer and tensor attribute fake.

    Tied parameters stay tied (one fake tensor each). The ``revify_plan`` of
    a converted module is shared, not copied (it holds recorded real
    tensors).
    """
    memo: dict[int, Any] = {}
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(fake_tensor(p.detach(), mode, device), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None and id(b) not in memo:
                memo[id(b)] = fake_tensor(b, mode, device)
        for value in vars(m).values():  # plain tensor attributes (e.g. rotary tables kept outside buffers)
            if isinstance(value, torch.Tensor) and id(value) not in memo:
                memo[id(value)] = fake_tensor(value.detach(), mode, device)
    plan = getattr(module, "revify_plan", None)
    if plan is not None:
        memo[id(plan)] = plan
    return copy.deepcopy(module, memo)


def fake_inputs(example_inputs: Any, mode: FakeTensorMode, device: torch.device | str | None = None) -> Any:
    """The example inputs (a tuple, a dict or one tensor) with every tensor fake, nested structure kept."""
    return tree_map(lambda v: fake_tensor(v, mode, device) if isinstance(v, torch.Tensor) else v, example_inputs)


def new_fake_mode() -> FakeTensorMode:
    """The fake mode revify runs models under: real (non-fake) constants created in forward are allowed."""
    return FakeTensorMode(allow_non_fake_inputs=True)
