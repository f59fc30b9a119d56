"""Reading a Hugging Face model folder as ``save_pretrained`` writes it, running no code from it.

A folder holds ``config.json`` and ``model.safetensors`` or
``pytorch_model.bin``. The class named in ``config.architectures[0]`` is
looked up on the ``transformers`` module itself (never ``trust_remote_code``;
a config with ``auto_map`` is refused), its size is checked on the meta device
before any allocation, and every weight must be accounted for: a missing,
unexpected or mis-shaped tensor is a one-line ``SourceError``, not the
per-key warning transformers would print and continue after. Cheap checks
(config.json parses, weights present, a safetensors header that covers its
file) run before transformers is imported, so a wrong folder fails fast.

Before::

    "bert-small/"  (config.json, model.safetensors)

After::

    (BertForSequenceClassification(...), BertConfig(...))
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from revify.source_errors import SourceError, first_line

# files of a Hugging Face folder that are not weights and that a converted folder keeps
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                "preprocessor_config.json", "added_tokens.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ADAPTER_KEY = ".revify_adapter_"  # keys of adapters revify adds under blocks


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise SourceError("reading a Hugging Face model folder needs transformers>=5: "
                          "pip install 'transformers>=5'") from None
    return transformers


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-key loading report or progress bar from transformers; revify reports problems itself."""
    logging = _import_transformers().utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    stdin, sys.stdin = sys.stdin, io.StringIO()  # nothing transformers asks (run custom code?) is answered
    try:
        yield
    finally:
        sys.stdin = stdin
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def transformers_class(config: Any, where: str) -> type:
    """The model class ``config.architectures[0]`` names, from the ``transformers`` module only."""
    transformers = _import_transformers()
    names = getattr(config, "architectures", None) or []
    if not names:
        raise SourceError(f"{where}: config.json names no architecture (its 'architectures' list is empty); "
                          "cannot tell which model class to build")
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SourceError(f"{where}: architecture {names[0]!r} is not a model class of transformers "
                          f"{transformers.__version__} (custom code is never run)")
    return cls


def _check_config_json(folder: Path) -> None:
    """config.json present and a JSON object, checked before transformers is imported (fails fast)."""
    file = folder / "config.json"
    if not file.is_file():
        raise SourceError(f"{folder}: no config.json (not a Hugging Face model folder); "
                          "for a state dict file pass the file and --arch module.path:Factory")
    try:
        config = json.loads(file.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SourceError(f"{file} is corrupt: {first_line(exc)}") from None
    if "auto_map" in config:  # whatever a terminal or stdin would answer, code from the folder never runs
        auto_map = config["auto_map"]
        names = ", ".join(map(str, auto_map)) if isinstance(auto_map, dict) else str(auto_map)
        raise SourceError(f"{file} names custom code (auto_map: {names[:120]}); revify never runs code from a "
                          "model folder (custom code is never run)")


def read_config(folder: Path) -> Any:
    _check_config_json(folder)
    file = folder / "config.json"
    transformers = _import_transformers()
    try:
        with _quiet_transformers():
            return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                                           trust_remote_code=False)
    except Exception as exc:
        raise SourceError(f"{file} cannot be read: {first_line(exc)}") from None


def _check_weight_files(folder: Path) -> None:
    """Weights present, and a safetensors header that covers the file (a truncated copy does not)."""
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise SourceError(f"{folder}: no weights (model.safetensors or pytorch_model.bin) beside config.json")
    file = folder / "model.safetensors"
    if file.is_file():
        from safetensors import safe_open
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as exc:
            raise SourceError(f"{file} is truncated or corrupt: {first_line(exc)}") from None


def _loading_problems(info: dict, allow_unexpected: Callable[[str], bool] = lambda k: False) -> str | None:
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    if mismatched:
        key, got, want = mismatched[0]
        return (f"weights do not match config.json: {key} has shape {tuple(got)} in the checkpoint but "
                f"{tuple(want)} in the model ({len(mismatched)} tensor(s) differ)")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        return (f"weights do not match config.json: {len(missing)} tensor(s) of the model are missing from "
                f"the checkpoint, e.g. {missing[0]}")
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not allow_unexpected(k))
    if unexpected:
        return (f"weights do not match config.json: {len(unexpected)} tensor(s) in the checkpoint are not in "
                f"the model, e.g. {unexpected[0]}")
    errors = info.get("error_msgs") or []
    return f"weights could not be loaded: {errors[0].strip().splitlines()[0]}" if errors else None


def read_hf_folder(folder: Path, *, allow_adapters: bool = False) -> tuple[nn.Module, Any]:
    """Build the model ``config.json`` names and load every weight; returns (model, config)."""
    _check_config_json(folder)
    _check_weight_files(folder)
    config = read_config(folder)
    cls = transformers_class(config, str(folder))
    from revify.fits import StepTooLarge, check_model_fits

    try:  # sizes before allocation: counted on the meta device
        check_model_fits(lambda: cls(config), str(folder / "config.json"))
    except StepTooLarge as exc:
        raise SourceError(str(exc)) from None
    try:
        # weights_only: pytorch_model.bin is a state dict and is unpickled as one
        with _quiet_transformers():
            model, info = cls.from_pretrained(str(folder), config=config, local_files_only=True,
                                              output_loading_info=True, ignore_mismatched_sizes=True,
                                              weights_only=True, trust_remote_code=False)
    except Exception as exc:
        what = "truncated or corrupt" if "safetensor" in type(exc).__name__.lower() else "unreadable"
        raise SourceError(f"{folder}: weights are {what}: {first_line(exc)}") from None
    problem = _loading_problems(info, (lambda k: ADAPTER_KEY in k) if allow_adapters else (lambda k: False))
    if problem:
        raise SourceError(f"{folder}: {problem}")
    return model, config
