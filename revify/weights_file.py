"""Reading a weights file: a state dict for the user's ``--arch`` factory, or a trusted pickled module.

Outside a Hugging Face folder, SRC is a single file:

* a state dict, as ``.safetensors`` or ``torch.save`` read with
  ``weights_only=True``, plus ``--arch module.path:Factory``, a callable the
  user names explicitly (this imports and runs the user's code). The state
  dict must match the model the factory builds tensor for tensor
  (``load_state_dict_exactly``; tied weights may be saved once);
* a whole pickled module, only with ``trust_pickle=True``: unpickling runs
  arbitrary code, so a file the weights-only reader refuses for holding
  Python objects is refused with a line that names the flag.

Before::

    "weights.safetensors", arch="mypkg.models:build"

After::

    build() with every tensor of weights.safetensors copied in
"""
from __future__ import annotations

import importlib
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from revify.source_errors import SourceError, first_line


def resolve_factory(arch: str) -> Callable[[], nn.Module]:
    """``module.path:Factory`` → the callable. Imports the user's module: their explicit choice."""
    module_name, sep, attr = arch.partition(":")
    if not sep or not module_name or not attr:
        raise SourceError(f"--arch {arch!r}: write module.path:Factory (a callable that builds the model)")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise SourceError(f"--arch {arch!r}: cannot import {module_name}: {first_line(exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SourceError(f"--arch {arch!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SourceError(f"--arch {arch!r}: {attr} is not callable")
    return obj


def build_from_factory(arch: str) -> nn.Module:
    factory = resolve_factory(arch)
    try:
        model = factory()
    except Exception as exc:
        raise SourceError(f"--arch {arch!r}: calling {arch.partition(':')[2]}() failed: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise SourceError(f"--arch {arch!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _looks_like_torch_save(path: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a pickle stream (protocol 2 or later starts with 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as fh:
        return fh.read(1) == b"\x80"


def _is_pickle_refusal(exc: BaseException) -> bool:
    """The weights-only unpickler met a class or function: a pickled object, not a corrupt file."""
    return "Unsupported global" in str(exc)


def read_weights_file(path: Path, *, trust_pickle: bool) -> dict[str, torch.Tensor] | nn.Module:
    """A state dict (safetensors, or ``torch.save`` read with ``weights_only=True``), or with
    ``trust_pickle`` a whole pickled module."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:
            raise SourceError(f"{path}: truncated or corrupt safetensors file: {first_line(exc)}") from None
    if not _looks_like_torch_save(path):
        raise SourceError(f"{path}: not a readable torch.save or safetensors file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if not _is_pickle_refusal(exc):
            raise SourceError(f"{path}: not a readable torch.save or safetensors file: {first_line(exc)}") from None
        if not trust_pickle:
            raise SourceError(f"{path} holds pickled Python objects, not only tensors; unpickling runs arbitrary "
                              "code, so revify refuses it. If you trust this file, pass --trust-pickle") from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise SourceError(f"{path}: cannot unpickle: {first_line(exc2)}") from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        return obj
    raise SourceError(f"{path} holds a {type(obj).__name__}, not a state dict (names → tensors) or a module")


def load_state_dict_exactly(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model``; every tensor must match by name and shape.

    A key absent from ``state`` is fine only if it names the same tensor as a
    key that is present (tied weights, saved once).
    """
    own = model.state_dict(keep_vars=True)
    alias: dict[int, list[str]] = {}
    for k, v in own.items():
        alias.setdefault(id(v), []).append(k)
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise SourceError(f"{where}: weights do not match the architecture: {k} has shape {tuple(v.shape)} "
                              f"in the file but {tuple(own[k].shape)} in the model")
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        raise SourceError(f"{where}: weights do not match the architecture: {len(unexpected)} tensor(s) in the "
                          f"file are not in the model, e.g. {unexpected[0]}")
    missing = sorted(k for k in own if k not in state and not any(a in state for a in alias[id(own[k])]))
    if missing:
        raise SourceError(f"{where}: weights do not match the architecture: {len(missing)} tensor(s) of the model "
                          f"are missing from the file, e.g. {missing[0]}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
