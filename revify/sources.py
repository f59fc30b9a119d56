"""Reading a model checkpoint from disk (SRC) and the example inputs to convert it with.

The command line and ``revify.load`` start from files, not Python objects.
This module turns what is on disk into a model and example inputs:

* a Hugging Face folder written by ``save_pretrained`` (``config.json`` plus
  ``model.safetensors`` or ``pytorch_model.bin``): the class named in
  ``config.architectures[0]`` is looked up on the ``transformers`` module
  (never ``trust_remote_code``) and loaded with every weight accounted for;
* a state dict (``.safetensors`` or ``torch.save``, read with
  ``weights_only=True``) plus ``--arch module.path:Factory``, a callable the
  user names explicitly (this imports and runs the user's code);
* a whole pickled module, only with ``trust_pickle=True`` (unpickling runs
  arbitrary code).

Example inputs are described by an ``InputSpec`` (recorded in ``revify.json``)
and synthesised from it with a seeded generator, so ``revify.load`` rebuilds
exactly the inputs the conversion analysed.

Before::

    "bert-small/"  (config.json, model.safetensors)

After::

    Source(model=BertForSequenceClassification(...).train(),
           spec=InputSpec(entries=(("input_ids", TensorSpec((2, 128), "int64", "randint", high=30522)),
                                   ("attention_mask", TensorSpec((2, 128), "int64", "full", value=1)))),
           info={"kind": "transformers", "architecture": "BertForSequenceClassification", ...})
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from revify.safe_paths import source_kind_problem

# files of a Hugging Face folder that are not weights and that a converted folder keeps
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
                "preprocessor_config.json", "added_tokens.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ADAPTER_KEY = ".revify_adapter_"  # keys of adapters revify adds under blocks
_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
_SMALL_MASK = 65536  # 0/1 masks up to this many elements are recorded exactly


class SourceError(ValueError):
    """SRC cannot be read, or it is not what its form claims; the message is one line."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# --- example inputs ------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """How to synthesise one tensor input: random ints, normal floats, a constant, or exact values."""

    shape: tuple[int, ...]
    dtype: str
    fill: str  # "randint" | "randn" | "full" | "values"
    low: int = 0
    high: int | None = None  # exclusive, for randint
    value: Any = None  # for full
    values: list | None = None  # for values (small integer tensors, e.g. a padding mask)

    def make(self, generator: torch.Generator, device: str | torch.device = "cpu") -> torch.Tensor:
        dtype = _DTYPES[self.dtype]
        if self.fill == "randint":
            t = torch.randint(self.low, self.high, self.shape, generator=generator, dtype=torch.int64)
            return t.to(dtype=dtype, device=device)
        if self.fill == "randn":
            return torch.randn(self.shape, generator=generator, dtype=torch.float32).to(dtype=dtype, device=device)
        if self.fill == "full":
            return torch.full(self.shape, self.value, dtype=dtype, device=device)
        return torch.tensor(self.values, dtype=dtype, device=device).reshape(self.shape)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype, "fill": self.fill}
        if self.fill == "randint":
            out.update(low=self.low, high=self.high)
        elif self.fill == "full":
            out["value"] = self.value
        elif self.fill == "values":
            out["values"] = self.values
        return out

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        spec = cls(tuple(int(s) for s in d["shape"]), str(d["dtype"]), str(d["fill"]), int(d.get("low", 0)),
                   d.get("high"), d.get("value"), d.get("values"))
        if spec.dtype not in _DTYPES or spec.fill not in ("randint", "randn", "full", "values"):
            raise ValueError(f"unknown input tensor spec {d}")
        if spec.fill == "randint" and not (isinstance(spec.high, int) and spec.high > spec.low):
            raise ValueError(f"randint input needs high > low, got {d}")
        return spec

    @classmethod
    def describe(cls, t: torch.Tensor) -> "TensorSpec":
        """A spec that stands for ``t``: constants and 0/1 masks exactly, else its kind, shape and range."""
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"cannot record an example input of dtype {t.dtype}")
        shape = tuple(t.shape)
        if t.is_floating_point():
            return cls(shape, dtype, "randn")
        from torch._subclasses.fake_tensor import is_fake

        if t.is_meta or is_fake(t):  # revify.estimate's inputs: integer values unknown, nothing to record
            raise ValueError("cannot record the values of an integer example input on the meta device or "
                             "a fake tensor")
        flat = t.detach().cpu().reshape(-1)
        if flat.numel() and bool((flat == flat[0]).all()):
            return cls(shape, dtype, "full", value=flat[0].item())
        # a 0/1 mask is kept exactly (its padding pattern can matter); other integers, such as
        # token ids of the user's data, are never written out: only their range
        if flat.numel() <= _SMALL_MASK and bool(((flat == 0) | (flat == 1)).all()):
            return cls(shape, dtype, "values", values=flat.tolist())
        return cls(shape, dtype, "randint", low=int(flat.min()), high=int(flat.max()) + 1)


@dataclass(frozen=True)
class InputSpec:
    """Example inputs as a recipe: keyword or positional entries, each a tensor spec or a constant."""

    call: str  # "kwargs" or "args"
    entries: tuple[tuple[Any, Any], ...]  # (name or position, TensorSpec | constant)
    seed: int = 0

    def synthesise(self, device: str | torch.device = "cpu") -> dict | tuple:
        generator = torch.Generator().manual_seed(self.seed)  # never touches the global RNG
        values = [(k, v.make(generator, device) if isinstance(v, TensorSpec) else v) for k, v in self.entries]
        return dict(values) if self.call == "kwargs" else tuple(v for _, v in values)

    def describe(self) -> str:
        parts = []
        for k, v in self.entries:
            what = f"{v.dtype}{list(v.shape)}" if isinstance(v, TensorSpec) else repr(v)
            parts.append(f"{k}={what}" if self.call == "kwargs" else what)
        return ", ".join(parts)

    def to_json(self) -> dict:
        return {"call": self.call, "seed": self.seed,
                "entries": [{"name": k, "tensor": v.to_json()} if isinstance(v, TensorSpec) else {"name": k, "value": v}
                            for k, v in self.entries]}

    @classmethod
    def from_json(cls, d: dict) -> "InputSpec":
        if d.get("call") not in ("kwargs", "args"):
            raise ValueError(f"unknown input call style {d.get('call')!r}")
        entries = tuple((e["name"], TensorSpec.from_json(e["tensor"]) if "tensor" in e else e["value"])
                        for e in d["entries"])
        return cls(d["call"], entries, int(d.get("seed", 0)))

    @classmethod
    def from_example(cls, example_inputs: Any) -> "InputSpec":
        """Record the inputs a model was converted with (tensors by shape and kind, constants by value)."""
        if isinstance(example_inputs, dict):
            call, items = "kwargs", list(example_inputs.items())
        elif isinstance(example_inputs, (tuple, list)):
            call, items = "args", list(enumerate(example_inputs))
        else:
            call, items = "args", [(0, example_inputs)]
        entries = []
        for k, v in items:
            if isinstance(v, torch.Tensor):
                entries.append((k, TensorSpec.describe(v)))
            elif v is None or isinstance(v, (bool, int, float, str)):
                entries.append((k, v))
            else:
                raise ValueError(f"cannot record example input {k!r} of type {type(v).__name__}; "
                                 "example inputs must be tensors or plain constants")
        return cls(call, tuple(entries))


def parse_input_shape(text: str) -> TensorSpec:
    """``8x32`` (normal floats), ``2x16:int64:50`` (ints in [0, 50)), ``2x16:float16``."""
    parts = text.split(":")
    try:
        shape = tuple(int(s) for s in parts[0].replace(",", "x").split("x") if s)
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise SourceError(f"--input-shape {text!r}: write sizes like 8x32, optionally :DTYPE[:HIGH] "
                          "(e.g. 2x16:int64:50 for token ids below 50)")
    dtype = parts[1] if len(parts) > 1 else "float32"
    if dtype not in _DTYPES:
        raise SourceError(f"--input-shape {text!r}: unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    if dtype in ("int64", "int32"):
        if len(parts) < 3 or not parts[2].isdigit() or int(parts[2]) < 1:
            raise SourceError(f"--input-shape {text!r}: integer inputs need an exclusive upper bound, "
                              "e.g. 2x16:int64:50")
        return TensorSpec(shape, dtype, "randint", high=int(parts[2]))
    if dtype == "bool":
        return TensorSpec(shape, dtype, "full", value=True)
    return TensorSpec(shape, dtype, "randn")


def inputs_from_config(config: Any, model_cls: type, batch_size: int, seq_len: int,
                       dtype: torch.dtype = torch.float32) -> InputSpec:
    """Token ids and an attention mask (text), or pixel values (vision), at the config's sizes."""
    params = inspect.signature(model_cls.forward).parameters
    entries: list[tuple[str, Any]] = []
    vocab = getattr(config, "vocab_size", None)
    image = getattr(config, "image_size", None)
    if isinstance(vocab, int) and vocab > 0 and "input_ids" in params:
        for name in ("max_position_embeddings", "n_positions"):
            limit = getattr(config, name, None)
            if isinstance(limit, int) and seq_len > limit:
                raise SourceError(f"--seq-len {seq_len} is longer than the model's {name} ({limit})")
        entries.append(("input_ids", TensorSpec((batch_size, seq_len), "int64", "randint", high=vocab)))
        if "attention_mask" in params:
            entries.append(("attention_mask", TensorSpec((batch_size, seq_len), "int64", "full", value=1)))
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            entries.append(("decoder_input_ids", TensorSpec((batch_size, seq_len), "int64", "randint", high=vocab)))
    elif image is not None and "pixel_values" in params:
        size = tuple(image) if isinstance(image, (tuple, list)) else (image, image)
        channels = getattr(config, "num_channels", 3)
        entries.append(("pixel_values", TensorSpec((batch_size, channels, *size),
                                                   str(dtype).removeprefix("torch."), "randn")))
    else:
        raise SourceError(f"cannot synthesise example inputs for a {getattr(config, 'model_type', '?')} config "
                          "(neither token ids with a vocab_size nor pixel values with an image_size)")
    # no use_cache=False here: revify analyses the example call as a training call, and the
    # converted model turns the cache off for training calls itself (runtime/training_cache)
    return InputSpec("kwargs", tuple(entries))


# --- models --------------------------------------------------------------------------------

@dataclass
class Source:
    """A model read from disk, with how to synthesise its example inputs and how it was found."""

    model: nn.Module
    spec: InputSpec | None  # None: no inputs known yet (a factory without --input-shape)
    info: dict  # recorded in revify.json: kind, path, architecture / arch / class
    copy_files: list[Path] = field(default_factory=list)  # non-weight files a converted folder keeps


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


def read_source(src: str | Path, *, arch: str | None = None, trust_pickle: bool = False,
                batch_size: int = 2, seq_len: int = 128, input_shapes: list[str] | None = None) -> Source:
    """Read SRC (see the module docstring) into a model in train mode and an input recipe."""
    path = Path(src)
    if not path.exists():
        raise SourceError(f"{src}: no such file or folder")
    problem = source_kind_problem(path)  # a FIFO or /dev/zero would block or never end
    if problem:
        raise SourceError(problem)
    shapes = [parse_input_shape(s) for s in input_shapes or []]
    if path.is_dir() and (path / "revify.json").is_file():
        raise SourceError(f"{src} is already a converted revify folder; load it with revify.load()")
    if path.is_dir() and arch is None:
        if shapes:
            raise SourceError("--input-shape is for --arch and pickled sources; for a Hugging Face folder "
                              "use --batch-size and --seq-len")
        model, config = read_hf_folder(path)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        spec = inputs_from_config(config, type(model), batch_size, seq_len, dtype)
        info = {"kind": "transformers", "path": str(path.resolve()), "architecture": type(model).__name__}
        return Source(model.train(), spec, info, [path / f for f in CONFIG_FILES if (path / f).is_file()])
    if path.is_dir():  # a folder's weights file, for the user's own architecture
        weights = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()), None)
        if weights is None:
            raise SourceError(f"{src}: no model.safetensors or pytorch_model.bin in the folder")
        path = weights
    loaded = read_weights_file(path, trust_pickle=trust_pickle)
    spec = InputSpec("args", tuple(enumerate(shapes))) if shapes else None
    if isinstance(loaded, nn.Module):
        if arch is not None:
            raise SourceError(f"{src} is a whole pickled module; --arch is for state dicts")
        cls = type(loaded)
        info = {"kind": "pickle", "path": str(path.resolve()), "class": f"{cls.__module__}:{cls.__qualname__}"}
        return Source(loaded.train(), spec, info)
    if arch is None:
        raise SourceError(f"{src} is a state dict: name the architecture with --arch module.path:Factory")
    model = build_from_factory(arch)
    load_state_dict_exactly(model, loaded, str(src))
    info = {"kind": "arch", "path": str(path.resolve()), "arch": arch}
    return Source(model.train(), spec, info)
