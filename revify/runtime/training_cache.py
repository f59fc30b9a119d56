"""Runtime: no KV cache while a converted model trains, as Hugging Face's gradient checkpointing does.

A decoder whose config says ``use_cache=True`` (GPT-2, OPT, Llama, ... as
``from_pretrained`` returns them) builds a ``DynamicCache`` in every forward
and hands it to each layer, which appends its keys and values. Recomputing a
layer in backward would append them a second time. Hugging Face's own
gradient checkpointing turns ``use_cache`` off in training, with a one-time
warning; a converted model does the same:

Before (the user's call, in training)::

    model(input_ids, attention_mask=mask)             # config.use_cache=True: a cache is built

After (``revify`` installs ``NoCacheInTraining`` on the outermost modules
whose ``forward`` takes ``use_cache``)::

    model(input_ids, attention_mask=mask)             # train mode, grad enabled: use_cache=False
    model.eval(); model.generate(...)                 # untouched: the cache works as in the original

Analysis runs the example inputs as a training call (``record_calls`` under
``no_grad`` included), so ``analysing_without_cache`` applies the same rule
there whatever the mode: the plan is made for the call the model will train
with, and a user need not pass ``use_cache=False`` in the example inputs.
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import warnings
from typing import Any, Iterator

import torch
from torch import nn

# set while revify analyses a model: its example call is a training call, whatever the mode
_ANALYSING: contextvars.ContextVar[bool] = contextvars.ContextVar("revify_analysing_without_cache", default=False)

WARNING = ("revify: use_cache=True is incompatible with recomputing blocks in training; "
           "setting use_cache=False for training calls (as Hugging Face's gradient checkpointing does). "
           "Evaluation, no_grad and generate() keep the cache.")


def _use_cache_default(module: nn.Module) -> Any:
    """The default of ``forward``'s ``use_cache`` parameter; ``inspect.Parameter.empty`` without one."""
    try:
        param = inspect.signature(module.forward).parameters.get("use_cache")
    except (TypeError, ValueError):  # a forward without a signature (a C extension): leave it alone
        return inspect.Parameter.empty
    return inspect.Parameter.empty if param is None else param.default


def _takes_use_cache(module: nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_owners(model: nn.Module) -> list[nn.Module]:
    """The outermost modules whose ``forward`` takes ``use_cache`` (they pass it down themselves)."""
    owners: list[nn.Module] = []
    seen: set[int] = set()

    def visit(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if _takes_use_cache(module):
            owners.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return owners


class NoCacheInTraining:
    """Forward pre-hook (with kwargs): ``use_cache=False`` for training calls and while revify analyses."""

    def __init__(self) -> None:
        self.warned = False

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        analysing = _ANALYSING.get()
        if not (analysing or (module.training and torch.is_grad_enabled())):
            return None
        asked = kwargs.get("use_cache")
        if asked is False:
            return None
        if "use_cache" not in kwargs:
            asked = _use_cache_default(module)
        if asked is None:  # transformers' convention: None means the config's value
            asked = getattr(getattr(module, "config", None), "use_cache", False)
        if asked is not True:
            return None  # this call builds no cache
        if not analysing and not self.warned:
            self.warned = True
            warnings.warn(WARNING, stacklevel=3)
        return args, {**kwargs, "use_cache": False}


def _has_hook(module: nn.Module) -> bool:
    return any(isinstance(h, NoCacheInTraining) for h in module._forward_pre_hooks.values())


def install_no_cache(rmodel: nn.Module) -> int:
    """Install ``NoCacheInTraining`` on the converted model's cache owners; returns how many got one."""
    count = 0
    for owner in cache_owners(rmodel):
        if not _has_hook(owner):
            owner.register_forward_pre_hook(NoCacheInTraining(), with_kwargs=True)
            count += 1
    return count


@contextlib.contextmanager
def analysing_without_cache(model: nn.Module) -> Iterator[None]:
    """While revify runs ``model`` on the example inputs: ``use_cache=False`` as in a training call.

    The hooks are removed on exit, so ``model`` is left as it was. Re-entrant.
    """
    handles: list[Any] = []
    token = _ANALYSING.set(True)
    try:
        for owner in cache_owners(model):
            if not _has_hook(owner):
                handles.append(owner.register_forward_pre_hook(NoCacheInTraining(), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        _ANALYSING.reset(token)
