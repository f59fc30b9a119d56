"""Pass: find the batch size B and the sequence length (or image side) S in the example inputs.

Memory formulas are polynomials in the sizes a user changes: the batch size
and the sequence length (or, for images, the side of a square image). This
pass names those dimensions in the example inputs and rebuilds inputs of
the same structure at other sizes.

* **B** is dimension 0 of every tensor whose dimension 0 equals that of the
  first tensor.
* **S** is dimension 1 of 2-D integer or boolean tensors (token ids,
  attention masks, token type ids) and of 3-D floating tensors (batch,
  tokens, features) when no token ids are given; or dimensions 2 and 3 of
  4-D floating tensors with a square image (batch, channels, H, W). Other
  dimensions (features, channels) are fixed. The sizes S is sampled at are
  multiples of ``step``: 1 for tokens, the largest power of two dividing the
  image side and at most half of it for images (strided convolutions and
  patches need divisible sizes).

Before::

    {"input_ids": int64[2, 12], "attention_mask": int64[2, 12]}

After::

    InputSymbols(dims=(SizeDim(0, 0, "B"), SizeDim(0, 1, "S"), SizeDim(1, 0, "B"), SizeDim(1, 1, "S")),
                 example={"B": 2, "S": 12}, step={"B": 1, "S": 1}, s_meaning="sequence length")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten



@dataclass(frozen=True)
class SizeDim:
    leaf: int  # index of the tensor among the flattened example inputs
    dim: int
    symbol: str  # "B" or "S"


@dataclass(frozen=True)
class InputSymbols:
    dims: tuple[SizeDim, ...]
    example: dict[str, int]  # the symbols' values in the example inputs
    step: dict[str, int]  # sizes are sampled at multiples of this
    s_meaning: str = ""  # what S is: "sequence length" or "image side"; "" when there is no S

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(s for s in ("B", "S") if s in self.example)

    def without(self, symbol: str) -> "InputSymbols":
        """The same inputs with ``symbol`` held at its example value."""
        return InputSymbols(tuple(d for d in self.dims if d.symbol != symbol),
                            {k: v for k, v in self.example.items() if k != symbol},
                            {k: v for k, v in self.step.items() if k != symbol},
                            "" if symbol == "S" else self.s_meaning)

    def shape_at(self, leaf: int, shape: tuple[int, ...], values: Mapping[str, int]) -> tuple[int, ...]:
        out = list(shape)
        for d in self.dims:
            if d.leaf == leaf and d.symbol in values:
                out[d.dim] = int(values[d.symbol])
        return tuple(out)

    def inputs_at(self, example_inputs: Any, values: Mapping[str, int],
                  make: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]) -> Any:
        """Inputs like ``example_inputs`` with B and S set to ``values``; ``make(example_tensor, shape)``
        builds each tensor (fake or real)."""
        leaves, spec = tree_flatten(example_inputs)
        out, i = [], 0
        for v in leaves:
            if isinstance(v, torch.Tensor):
                out.append(make(v, self.shape_at(i, tuple(v.shape), values)))
                i += 1
            else:
                out.append(v)
        return tree_unflatten(out, spec)


def _tensors(example_inputs: Any) -> list[torch.Tensor]:
    return [v for v in tree_flatten(example_inputs)[0] if isinstance(v, torch.Tensor)]


def _image_step(side: int) -> int:
    step = 1
    while side % (step * 2) == 0 and step * 2 <= side // 2:
        step *= 2
    return step


def find_input_symbols(example_inputs: Any) -> InputSymbols:
    """Name the batch and sequence (or image side) dimensions of the example inputs."""
    tensors = _tensors(example_inputs)
    if not tensors or tensors[0].dim() == 0:
        return InputSymbols((), {}, {})
    b0 = tensors[0].shape[0]
    dims: list[SizeDim] = [SizeDim(i, 0, "B") for i, t in enumerate(tensors) if t.dim() >= 1 and t.shape[0] == b0]
    is_int = [not (t.dtype.is_floating_point or t.dtype.is_complex) for t in tensors]
    tokens = [i for i, t in enumerate(tensors) if t.dim() == 2 and is_int[i] and t.shape[0] == b0]
    example, step, meaning = {"B": int(b0)}, {"B": 1}, ""
    if tokens:
        s0 = tensors[tokens[0]].shape[1]
        dims += [SizeDim(i, 1, "S") for i in tokens if tensors[i].shape[1] == s0]
        example["S"], step["S"], meaning = int(s0), 1, "sequence length"
    else:
        seq = [i for i, t in enumerate(tensors) if t.dim() == 3 and not is_int[i] and t.shape[0] == b0]
        images = [i for i, t in enumerate(tensors)
                  if t.dim() == 4 and not is_int[i] and t.shape[0] == b0 and t.shape[2] == t.shape[3]]
        if seq:
            s0 = tensors[seq[0]].shape[1]
            dims += [SizeDim(i, 1, "S") for i in seq if tensors[i].shape[1] == s0]
            example["S"], step["S"], meaning = int(s0), 1, "sequence length"
        elif images:
            s0 = tensors[images[0]].shape[2]
            dims += [SizeDim(i, d, "S") for i in images if tensors[i].shape[2] == s0 for d in (2, 3)]
            example["S"], step["S"], meaning = int(s0), _image_step(int(s0)), "image side"
    return InputSymbols(tuple(dims), example, step, meaning)
