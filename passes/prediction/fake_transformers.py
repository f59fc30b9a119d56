"""Let transformers take, on fake tensors, the attention-mask path a real run takes.

transformers treats fake tensors as tracing (``is_tracing``), so it never
reads their values. Given no attention mask, it checks whether the position
ids describe several sequences packed into one row; under tracing it cannot
tell and builds a causal mask (B, 1, S, S) that a real run leaves to SDPA's
``is_causal``, which makes a fake step keep more than the real one (for
SDPA on CPU, a 4·S² float mask per layer). When the caller passes no
``position_ids``, transformers derives them from ``arange``: never packed.
Inside :func:`real_mask_path`, for such inputs, the packed-sequence check
answers "not packed" for fake tensors, as it would on real ones. Everything
else keeps transformers' own path (an attention mask, even all ones, is
built under fake tensors; a real run skips an all-ones mask).

Before (fake step, input_ids only)::

    find_packed_sequence_indices(fake position_ids) -> fake tensor   # → a (B, 1, S, S) mask is built

After::

    find_packed_sequence_indices(fake position_ids) -> None          # → SDPA is_causal, as in a real run
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from torch._subclasses.fake_tensor import FakeTensor


def _passes_position_ids(example_inputs: Any) -> bool:
    return isinstance(example_inputs, Mapping) and example_inputs.get("position_ids") is not None


@contextmanager
def real_mask_path(example_inputs: Any) -> Iterator[None]:
    """While active, fake position ids derived by transformers count as not packed (see module docstring)."""
    masking = sys.modules.get("transformers.masking_utils")
    original = getattr(masking, "find_packed_sequence_indices", None)
    if original is None or _passes_position_ids(example_inputs):
        yield
        return

    def find_packed_sequence_indices(position_ids: Any) -> Any:
        if isinstance(position_ids, FakeTensor):
            return None
        return original(position_ids)

    masking.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking.find_packed_sequence_indices = original
