"""Runtime core: the autocast state a forward ran under, to compare with later or run under again.

A stem's recipe is valid only if autocast did not change between the stem's
call and the segment that rebuilds its output; a reversible step's backward
recomputes F and G and must do so in the precision its forward used, though
backward runs outside the user's ``torch.autocast`` block. Both capture the
same thing: per device type, whether autocast is on and its dtype.

Before::

    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = AutocastState.capture(("cpu",))   # (("cpu", True, torch.bfloat16),)

After (in backward, outside the ``with``)::

    with state.entered():                         # bf16 autocast on the CPU again
        recompute()
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch


@dataclass(frozen=True)
class AutocastState:
    """Per device type: (type, enabled, dtype)."""

    entries: tuple[tuple[str, bool, torch.dtype], ...]

    @classmethod
    def capture(cls, device_types: Iterable[str]) -> AutocastState:
        """The state of each device type in ``device_types`` (repeats counted once, order kept)."""
        return cls(tuple((k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k))
                         for k in dict.fromkeys(device_types)))

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run under this state, whatever autocast is now."""
        with contextlib.ExitStack() as stack:
            for device, enabled, dtype in self.entries:
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            yield


@contextlib.contextmanager
def autocast_cache_off() -> Iterator[None]:
    """Run with autocast's weight-cast cache off; every other autocast setting stays as it is.

    The cache keeps each weight's low-precision copy for a whole autocast
    region, so a forward that follows another in one region runs fewer cast
    ops than the first, and a recompute in backward (a fresh region) runs them
    all. Selective checkpointing matches the outputs it kept by their order
    among ops, and the planner's op lists are indices in that order: with the
    cache on, a kept output could be handed to the wrong op. Checkpointed
    calls and the planner's profiles run with it off, so every run casts the
    same way. A cast gives the same values cached or not: results do not change.
    """
    previous = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(previous)
