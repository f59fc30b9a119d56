"""``revify.save`` / ``revify.load``: a converted module as a folder, written atomically.

A converted folder is readable by plain ``transformers`` (the original
``config.json``; ``model.safetensors`` with the original keys, so
``from_pretrained`` loads it and reports the adapters as unexpected keys) and
by ``revify.load``, which re-captures the architecture, applies the plan
recorded in ``revify.json`` (``saved_plan``) and loads every weight strictly.

Before::

    rmodel = revify.revify(model, inputs, strategy="reversible")

After (``revify.save(rmodel, "out", inputs)``)::

    out/config.json          the model's config (Hugging Face models)
    out/model.safetensors    every weight, adapters included; tied weights stored once
    out/revify.json          format version, source, options, inputs, plan, frozen parameters

Writes go to a hidden temporary folder beside the destination, renamed into
place at the end: an interrupted or failed save leaves neither a partial
destination nor the temporary folder. An existing destination is replaced only
with ``force``, and only if it is a revify folder (or empty).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from revify import safe_paths
from revify.api import analyse_model, convert
from revify.example_inputs import InputSpec
from revify.hf_folder import read_hf_folder
from revify.saved_plan import PlanMismatchError, RecordedPlan, apply_recorded_plan
from revify.source_errors import SourceError, first_line
from revify.weights_file import build_from_factory, load_state_dict_exactly
# the revify.json format lives in manifest (the save_pretrained installed at conversion writes it too);
# ConversionRecord and options_from_plan are named here as well, where the CLI and users import them
from revify.manifest import (FORMAT_VERSION, MANIFEST, WEIGHTS, ConversionRecord, describe_module, manifest_of,
                             options_from_plan)


class CheckpointError(ValueError):
    """A folder cannot be written or read back; the message is one line."""


# --- destination and atomic writes ----------------------------------------------------------

def check_destination(dst: str | Path, force: bool, flag: str = "force=True") -> Path:
    """Refuse early what the final rename would refuse, before any work is done."""
    dst = Path(dst)
    parent = dst.parent if str(dst.parent) else Path(".")
    if dst.exists() or dst.is_symlink():
        if not force:
            raise CheckpointError(f"{dst} already exists; pass {flag} to replace it")
        problem = safe_paths.replace_problem(dst)  # only a folder revify wrote, holding nothing else
        if problem:
            raise CheckpointError(problem)
    if not parent.exists():
        raise CheckpointError(f"cannot write {dst}: folder {parent} does not exist")
    if not parent.is_dir():
        raise CheckpointError(f"cannot write {dst}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write {dst}: no permission to write in {parent}")
    return dst


def _finish_files(folder: Path, keep_mode: frozenset[str] = frozenset()) -> None:
    """Flush every file to disk, with the permissions the umask gives (some writers use 0600);
    files copied from SRC (``keep_mode``) keep SRC's, so a private tokenizer stays private."""
    mode = folder.stat().st_mode & 0o666  # the folder was made with mkdir, which applies the umask
    for f in folder.iterdir():
        if f.name not in keep_mode:
            os.chmod(f, mode)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def write_folder_atomically(dst: str | Path, fill: Callable[[Path], Any], *, force: bool = False,
                            flag: str = "force=True") -> Path:
    """Create ``dst`` by ``fill(tmp)`` on a temporary folder in the same parent, then one rename.

    ``fill`` may return the names of files whose permissions it set itself (copies of SRC's files).
    """
    dst = check_destination(dst, force, flag)
    parent = dst.parent if str(dst.parent) else Path(".")
    safe_paths.remove_stale_temporaries(parent)  # left by a run that was killed (SIGKILL, power loss)
    tmp = parent / f".{dst.name}.revify-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()  # not mkdtemp: its 0700 mode would stay on the result
    except OSError as exc:
        raise CheckpointError(f"cannot write {dst}: {exc.strerror or first_line(exc)}") from None
    old: Path | None = None
    try:
        keep_mode = fill(tmp)
        _finish_files(tmp, frozenset(keep_mode or ()))
        if dst.exists():
            check_destination(dst, force, flag)  # it may have appeared while we worked
            old = parent / f".{dst.name}.revify-old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            if old is not None:
                os.rename(old, dst)
                old = None
            raise
    except OSError as exc:
        raise CheckpointError(f"cannot write {dst}: {exc.strerror or first_line(exc)}") from None
    except Exception as exc:
        if not safe_paths.is_write_failure(exc):  # a full disk inside a writer (safetensors) is not a bug
            raise
        raise CheckpointError(f"cannot write {dst}: {first_line(exc)}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return dst


# --- weights --------------------------------------------------------------------------------

def save_weights(module: nn.Module, file: Path) -> None:
    """``module.state_dict()`` as safetensors, each shared tensor once, under its first name.

    ``safetensors.torch.save_model`` keeps the alphabetically first name of a
    tied pair (GPT-2's ``lm_head.weight``) and writes no ``format`` metadata;
    transformers wants the first-registered name (the embedding) and
    ``format: pt``. The first name is also the one ``save_pretrained`` keeps.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    storages: set[int] = set()
    for name, t in module.state_dict().items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:
            continue  # the same tensor under another name (tied weights)
        seen.add(key)
        ptr = t.untyped_storage().data_ptr()
        # another view of a storage already written: safetensors refuses shared memory
        tensors[name] = t.contiguous().clone() if t.numel() and ptr in storages else t.contiguous()
        storages.add(ptr)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


def _load_weights(rmodel: nn.Module, file: Path, device: str | torch.device) -> None:
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"{file.parent}: no {file.name}")
    shards = [file]
    if file.name.endswith(".index.json"):  # save_pretrained of a large model: shards listed in an index
        try:
            shards = [file.parent / name for name in sorted(set(json.loads(file.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{file}: not a weight index: {first_line(exc)}") from None
    state = {}
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{file.parent}: no {shard.name} (listed in {file.name})")
        try:
            state.update(load_file(str(shard), device=str(device)))
        except Exception as exc:
            raise CheckpointError(f"{shard}: truncated or corrupt safetensors file: {first_line(exc)}") from None
    try:
        load_state_dict_exactly(rmodel, state, str(file))
    except SourceError as exc:
        raise CheckpointError(str(exc)) from None


# --- revify.json -----------------------------------------------------------------------------

def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    file = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    if not file.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (not a folder written by revify)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{file} cannot be read: {first_line(exc)}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{file}: no integer format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{file} has format version {version}, newer than this revify reads "
                              f"(up to {FORMAT_VERSION}; written by revify {manifest.get('revify_version', '?')}): "
                              "upgrade revify to load it")
    return manifest


# --- save ------------------------------------------------------------------------------------

def _write_config(rmodel: nn.Module, folder: Path) -> None:
    config = getattr(rmodel, "config", None)
    if config is None or not hasattr(config, "to_json_file"):
        return
    config = copy.deepcopy(config)
    config.architectures = [type(rmodel).__name__]  # what from_pretrained and revify.load build
    config.to_json_file(str(folder / "config.json"))
    generation = getattr(rmodel, "generation_config", None)
    if generation is not None and hasattr(generation, "to_json_file"):
        generation.to_json_file(str(folder / "generation_config.json"))


def save(rmodel: nn.Module, path: str | Path, example_inputs: Any = None, *, force: bool = False,
         _flag: str = "force=True") -> Path:
    """Write a converted module to the folder ``path`` (see the module docstring).

    ``example_inputs`` are the inputs the module was converted with; they may
    be left out for a module returned by ``revify.load`` (or the command line),
    which remembers them. ``force`` replaces an existing revify folder.
    """
    plan = getattr(rmodel, "revify_plan", None)
    if plan is None:
        raise CheckpointError("revify.save: this module was not returned by revify.revify or revify.load "
                              "(it has no revify_plan)")
    record: ConversionRecord | None = getattr(rmodel, "_revify_record", None)
    if example_inputs is not None:
        try:
            spec = InputSpec.from_example(example_inputs)
        except ValueError as exc:
            raise CheckpointError(f"revify.save: {exc}") from None
    elif record is not None:
        spec = record.inputs
    else:
        raise CheckpointError("revify.save: pass example_inputs= (the inputs the model was converted with) "
                              "so that revify.load can analyse the architecture again")
    if record is None:
        record = ConversionRecord(describe_module(rmodel), spec, options_from_plan(plan), rmodel.training)
    else:
        record = dataclasses.replace(record, inputs=spec)
    manifest = manifest_of(rmodel, record)

    def fill(tmp: Path) -> set[str]:
        copied = set()
        for f in record.files:  # regular files inside SRC only, with SRC's permissions (never through a link out)
            source = Path(f)
            inside = safe_paths.regular_files_inside(source.parent, [source])
            if source.name not in copied and inside:
                safe_paths.copy_regular_file(inside[0], tmp / source.name)
                copied.add(source.name)
        if not (tmp / "config.json").exists():
            _write_config(rmodel, tmp)
        save_weights(rmodel, tmp / WEIGHTS)
        # every file the folder holds, with its checksum: load detects corruption, --force replaces
        # only a folder holding nothing else
        manifest["files"] = {p.name: safe_paths.sha256_of(p) for p in sorted(tmp.iterdir()) if p.name != MANIFEST}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        return copied

    return write_folder_atomically(path, fill, force=force, flag=_flag)


# --- load ------------------------------------------------------------------------------------

def _base_model(folder: Path, source: dict, model: nn.Module | None, arch: str | None) -> nn.Module:
    if model is not None:
        return model
    if arch is not None:
        return build_from_factory(arch)
    kind = source.get("kind")
    if kind == "transformers":
        return read_hf_folder(folder, allow_adapters=True)[0]
    what = source.get("arch") or source.get("class") or "an unknown architecture"
    hint = f"arch={source['arch']!r}" if kind == "arch" else "arch='module.path:Factory'"
    raise CheckpointError(f"{folder} was converted from {what}; pass model= (a module of that architecture) "
                          f"or {hint} (imports and runs your code) to revify.load")


def load(path: str | Path, model: nn.Module | None = None, *, arch: str | None = None,
         device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the converted module saved in ``path``: same plan, same weights, same trainable parameters.

    Hugging Face models are rebuilt from ``config.json``. Other models need
    ``model=`` (a module of the same architecture; its parameters are
    overwritten and shared with the result) or ``arch="module.path:Factory"``
    (imports and calls your code; never taken from the folder itself).
    Raises ``CheckpointError`` with a one-line reason: newer format version,
    a recorded chain this model does not have, missing or unexpected weights,
    a file that changed since it was written, a path leading out of the folder,
    a recorded plan inconsistent with the model analysed now; never another
    exception type for anything wrong in the folder.
    """
    try:
        return _load(Path(path), model, arch, device)
    except CheckpointError:
        raise
    except (Exception, RecursionError) as exc:  # one exception type for everything a folder can get wrong
        raise CheckpointError(f"{path}: cannot be loaded: {first_line(exc)}") from exc


def _load(folder: Path, model: nn.Module | None, arch: str | None, device: str | torch.device) -> nn.Module:
    from revify.folder_checks import FolderProblem, check_folder
    from revify.validate_plan import validate_plan

    manifest = read_manifest(folder)
    try:
        checked = check_folder(folder, manifest, device)  # paths, checksums, inputs and their size, device
        recorded = RecordedPlan.from_json(manifest["plan"])
        spec = checked.spec
        source = dict(manifest["source"])
    except FolderProblem as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / MANIFEST}: malformed: {first_line(exc)}") from None
    training = bool(manifest.get("training", True))
    try:
        base = _base_model(folder, source, model, arch)
    except SourceError as exc:
        raise CheckpointError(str(exc)) from None
    base.to(device).train(training)
    from revify.fits import StepTooLarge, check_step_fits

    try:  # the recorded inputs may ask for a step far larger than this machine: refused before allocation
        check_step_fits(base, spec, checked.device)
    except StepTooLarge as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    inputs = spec.synthesise(device)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    # adapters draw their initial values from the RNG; the values come from the file, the user's RNG stays
    with torch.random.fork_rng(devices=devices):
        try:
            plan, trace = apply_recorded_plan(recorded, base, inputs, analyse_model)
            validate_plan(plan, base)  # a recorded plan is data from disk: checked before it is applied
        except PlanMismatchError as exc:
            raise CheckpointError(f"{folder}: {exc}") from None
        rmodel = convert(base, plan, trace, inputs, calibrate=False)
    if plan.errors:
        raise CheckpointError(f"{folder}: the recorded plan could not be applied: {plan.errors[0]}")
    if len(plan.chains) != len(recorded.chains) or len(plan.reversible) != len(recorded.reversible):
        reason = plan.rejections[-1].reason if plan.rejections else "a chain was dropped"
        raise CheckpointError(f"{folder}: the recorded plan could not be applied: {reason}")
    _load_weights(rmodel, checked.weights, device)
    frozen = set(manifest.get("frozen", []))
    names = {n for n, _ in rmodel.named_parameters()}
    if frozen - names:
        raise CheckpointError(f"{folder / MANIFEST}: frozen parameter {sorted(frozen - names)[0]} is not in "
                              "the model")
    for name, p in rmodel.named_parameters():
        p.requires_grad_(name not in frozen)
    files = [folder / f.name for f in folder.iterdir()
             if f.is_file() and f.name not in (MANIFEST, WEIGHTS) and not f.name.startswith(".")]
    rmodel._revify_record = ConversionRecord(source, spec, dict(manifest.get("options", {})), training, files)
    return rmodel


__all__ = ["save", "load", "CheckpointError", "ConversionRecord", "FORMAT_VERSION"]
