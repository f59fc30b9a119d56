"""Example inputs as a recipe: what a model was converted with, written to and rebuilt from ``revify.json``.

A converted folder must be loadable without the user's data, yet analysed
with the inputs the conversion saw. So the example inputs are recorded as an
``InputSpec``: per entry a ``TensorSpec`` (shape, dtype and how to fill it) or a
plain constant, synthesised again with a seeded generator. Float tensors are
recorded by kind (normal floats), constants and 0/1 masks exactly (a padding
pattern can matter), other integer tensors (token ids of the user's data) only
by their range, never their values.

The command line builds the same recipe from ``--input-shape`` (an ``--arch``
or pickled source) or from a Hugging Face config (token ids and a mask, or
pixel values).

Before::

    {"input_ids": tensor([[101, 7592, ...]]), "attention_mask": tensor([[1, 1, ..., 0]])}

After::

    InputSpec("kwargs", (("input_ids", TensorSpec((2, 128), "int64", "randint", low=101, high=30000)),
                         ("attention_mask", TensorSpec((2, 128), "int64", "values", values=[1, 1, ..., 0]))))
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from revify.source_errors import SourceError

# the dtypes an input may have, by the name revify.json records
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
_SMALL_MASK = 65536  # 0/1 masks up to this many elements are recorded exactly


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
        dtype = DTYPES[self.dtype]
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
        if spec.dtype not in DTYPES or spec.fill not in ("randint", "randn", "full", "values"):
            raise ValueError(f"unknown input tensor spec {d}")
        if spec.fill == "randint" and not (isinstance(spec.high, int) and spec.high > spec.low):
            raise ValueError(f"randint input needs high > low, got {d}")
        return spec

    @classmethod
    def describe(cls, t: torch.Tensor) -> "TensorSpec":
        """A spec that stands for ``t``: constants and 0/1 masks exactly, else its kind, shape and range."""
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
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
    if dtype not in DTYPES:
        raise SourceError(f"--input-shape {text!r}: unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
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
