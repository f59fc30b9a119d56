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

This module decides which form SRC has and hands it to its reader:
``revify.hf_folder`` (Hugging Face folders), ``revify.weights_file`` (state
dicts, ``--arch`` factories, pickled modules) and ``revify.example_inputs``
(the input recipe); their errors are ``revify.source_errors.SourceError``.

Before::

    "bert-small/"  (config.json, model.safetensors)

After::

    Source(model=BertForSequenceClassification(...).train(),
           spec=InputSpec(entries=(("input_ids", TensorSpec((2, 128), "int64", "randint", high=30522)),
                                   ("attention_mask", TensorSpec((2, 128), "int64", "full", value=1)))),
           info={"kind": "transformers", "architecture": "BertForSequenceClassification", ...})
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from revify.example_inputs import InputSpec, inputs_from_config, parse_input_shape
from revify.hf_folder import CONFIG_FILES, read_hf_folder
from revify.safe_paths import source_kind_problem
from revify.source_errors import SourceError
from revify.weights_file import build_from_factory, load_state_dict_exactly, read_weights_file


@dataclass
class Source:
    """A model read from disk, with how to synthesise its example inputs and how it was found."""

    model: nn.Module
    spec: InputSpec | None  # None: no inputs known yet (a factory without --input-shape)
    info: dict  # recorded in revify.json: kind, path, architecture / arch / class
    copy_files: list[Path] = field(default_factory=list)  # non-weight files a converted folder keeps


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
