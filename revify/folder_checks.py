"""A converted folder checked before ``revify.load`` builds anything from it.

``revify.json`` is data from disk, possibly edited by hand or by someone
else. Before the model is built, this checks what the manifest names and
what the folder holds:

* every file name in it (``weights``, the ``files`` list) is a plain name
  that resolves to a regular file inside the folder (``safe_paths``);
* every listed file has the SHA-256 recorded when it was written: a flipped
  byte in ``model.safetensors`` or ``config.json`` is refused, not trained;
* the input recipe has only known keys, integer shapes, finite constants,
  one 0/1 value per element of an exact mask, and its tensors fit in free
  memory (``fits``) -- nothing is allocated for an 80 GB shape;
* the device exists (``device='cuda'`` without CUDA is refused here);
* the other fields have the types ``load`` reads them as.

Any failure raises ``FolderProblem`` (a ``ValueError``) naming the first
problem; ``load`` turns it into ``CheckpointError``.

Before::

    {"weights": "../elsewhere/model.safetensors", "inputs": {"entries": [{"name": "x",
      "tensor": {"shape": [100000, 100000, 2], ...}}]}}

After::

    FolderProblem("weights '../elsewhere/model.safetensors' is not inside the folder ...")
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from revify import safe_paths
from revify.fits import StepTooLarge, check_inputs_fit
from revify.example_inputs import InputSpec

_ENTRY_KEYS = {"name", "tensor", "value"}
_TENSOR_KEYS = {"shape", "dtype", "fill", "low", "high", "value", "values"}
_MAX_DIMS = 8


class FolderProblem(ValueError):
    """Something in a converted folder that ``load`` must not use; the message is one line."""


@dataclass(frozen=True)
class CheckedFolder:
    weights: Path  # the weights file, inside the folder
    spec: InputSpec  # the input recipe, validated
    device: torch.device


def check_device(device: Any) -> torch.device:
    """``device`` as a torch.device that exists here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise FolderProblem(f"device {device!r} is not a device torch knows (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FolderProblem(f"device {device!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise FolderProblem(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda", "meta", "mps", "xpu"):
        raise FolderProblem(f"device {device!r} is not supported")
    return dev


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_constant(v: Any) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    return v is None or isinstance(v, (bool, int, str))


def _check_tensor(where: str, t: Any) -> None:
    if not isinstance(t, dict):
        raise FolderProblem(f"{where}: a tensor entry must be an object")
    unknown = set(t) - _TENSOR_KEYS
    if unknown:
        raise FolderProblem(f"{where}: unknown key(s) {sorted(unknown)}")
    shape = t.get("shape")
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(_is_int(s) and s >= 0 for s in shape)):
        raise FolderProblem(f"{where}: shape must be a list of at most {_MAX_DIMS} non-negative integers, "
                            f"got {shape!r}"[:300])
    fill = t.get("fill")
    numel = math.prod(shape)
    if fill == "randint":
        low, high = t.get("low", 0), t.get("high")
        if not (_is_int(low) and _is_int(high) and high > low and abs(low) < 2**62 and abs(high) < 2**62):
            raise FolderProblem(f"{where}: randint needs integers low < high, got {low!r}, {high!r}")
    elif fill == "full":
        value = t.get("value")
        if isinstance(value, str) or not _is_constant(value) or value is None:
            raise FolderProblem(f"{where}: full needs a finite number, got {value!r}")
    elif fill == "values":
        values = t.get("values")
        if not (isinstance(values, list) and len(values) == numel
                and all(_is_int(v) and v in (0, 1) for v in values)):
            raise FolderProblem(f"{where}: values must be {numel} zeros and ones (a mask)")
    elif fill != "randn":
        raise FolderProblem(f"{where}: unknown fill {fill!r}")


def check_inputs_json(d: Any) -> None:
    """The recorded input recipe: known keys, integer shapes, finite constants (before ``InputSpec.from_json``)."""
    if not isinstance(d, dict) or d.get("call") not in ("kwargs", "args") or not isinstance(d.get("entries"), list):
        raise FolderProblem("inputs must be an object with call 'kwargs' or 'args' and a list of entries")
    if not _is_int(d.get("seed", 0)):
        raise FolderProblem(f"inputs: seed must be an integer, got {d.get('seed')!r}")
    names = []
    for i, e in enumerate(d["entries"]):
        where = f"inputs entry {i}"
        if not isinstance(e, dict) or set(e) - _ENTRY_KEYS or "name" not in e or ("tensor" in e) == ("value" in e):
            raise FolderProblem(f"{where}: must hold a name and either a tensor or a value, nothing else")
        name = e["name"]
        if not (isinstance(name, str) if d["call"] == "kwargs" else _is_int(name) and name == i):
            raise FolderProblem(f"{where}: name {name!r} is not a keyword (kwargs) or its position (args)")
        names.append(name)
        if "tensor" in e:
            _check_tensor(where, e["tensor"])
        elif not _is_constant(e["value"]):
            raise FolderProblem(f"{where}: value must be a finite number, string, boolean or null")
    if len(set(names)) != len(names):
        raise FolderProblem("inputs: an input is named twice")


def _check_fields(manifest: dict) -> None:
    for key, kind in (("source", dict), ("options", dict), ("plan", dict), ("frozen", list), ("training", bool)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise FolderProblem(f"{key} must be a {kind.__name__}, got {type(manifest[key]).__name__}")
    if not all(isinstance(n, str) for n in manifest.get("frozen", [])):
        raise FolderProblem("frozen must list parameter names")


def check_files(folder: Path, manifest: dict) -> Path:
    """Every named file is inside the folder and has its recorded checksum; returns the weights file."""
    weights = safe_paths.file_inside(folder, manifest.get("weights", "model.safetensors"), "weights")
    if "files" not in manifest:  # written before revify.json listed its files: names only
        return weights
    listed = safe_paths.listed_files(manifest)
    if listed is None:
        raise FolderProblem("files must map file names to SHA-256 checksums")
    if weights.name not in listed:
        raise FolderProblem(f"weights {weights.name!r} is not among the folder's listed files")
    for name, digest in sorted(listed.items()):
        path = safe_paths.file_inside(folder, name, "listed file")
        if digest is not None and safe_paths.sha256_of(path) != digest:
            raise FolderProblem(f"{name} has changed since revify wrote it (its SHA-256 differs from the one in "
                                "revify.json): the file is corrupt or was edited")
    return weights


def check_folder(folder: Path, manifest: dict, device: Any) -> CheckedFolder:
    """All of the module docstring, in order: device, field types, files, inputs (and their size)."""
    dev = check_device(device)
    _check_fields(manifest)
    if manifest.get("source", {}).get("kind") == "transformers":
        safe_paths.file_inside(folder, "config.json", "config")
    try:
        weights = check_files(folder, manifest)
    except safe_paths.UnsafePathError as exc:
        raise FolderProblem(str(exc)) from None
    check_inputs_json(manifest.get("inputs"))
    spec = InputSpec.from_json(manifest["inputs"])
    try:
        check_inputs_fit(spec, dev if dev.type != "meta" else "cpu")
    except StepTooLarge as exc:
        raise FolderProblem(str(exc)) from None
    return CheckedFolder(weights, spec, dev)
