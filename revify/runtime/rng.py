"""Runtime core: one snapshot of the random generators a block draws from, to draw the same again.

A recompute (checkpoint segment, stem rebuild, reversible step in backward)
must draw exactly the dropout masks its forward drew, or gradients are wrong.
``torch.utils.checkpoint`` replays the RNG of the devices it sees; revify's
own runtime replays more places: a relay that computes its block itself after
the head ran ahead, a stem rebuilt from its recipe, each F and G of a
reversible step. They all snapshot the same thing: the CPU generator and the
generator of every CUDA device the call touches (other accelerators are not
replayed; callers refuse them).

Before: ``torch.get_rng_state()`` and ``torch.cuda.get_rng_state(d)`` scattered over the callers.
After::

    state = RngState.capture([hidden.device])    # before the block's forward
    ...
    state.restore()                              # the same masks again
    ctx.save_for_backward(*state.tensors())      # where an autograd node keeps it
    RngState.from_tensors(state.cuda, saved)     # and gets it back in backward
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch


@dataclass(frozen=True)
class RngState:
    """The CPU generator's state and that of every CUDA device in ``cuda`` (sorted by name)."""

    cpu: torch.Tensor
    cuda: tuple[torch.device, ...]
    cuda_states: tuple[torch.Tensor, ...]

    @classmethod
    def capture(cls, devices: Iterable[torch.device]) -> RngState:
        """The generators now: the CPU's, and the CUDA ones among ``devices``."""
        cuda = tuple(sorted({d for d in devices if d.type == "cuda"}, key=str))
        return cls(torch.get_rng_state(), cuda, tuple(torch.cuda.get_rng_state(d) for d in cuda))

    @classmethod
    def capture_all(cls) -> RngState:
        """The CPU generator and every initialised CUDA device's (for code that may touch any)."""
        initialised = torch.cuda.is_available() and torch.cuda.is_initialized()
        cuda = tuple(torch.device("cuda", i) for i in range(torch.cuda.device_count())) if initialised else ()
        return cls.capture(cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in zip(self.cuda, self.cuda_states):
            torch.cuda.set_rng_state(state, d)

    @contextmanager
    def replayed(self) -> Iterator[None]:
        """Run with the generators as they were at capture, and as they are now afterwards."""
        with torch.random.fork_rng(devices=self.cuda):
            self.restore()
            yield

    def same_as(self, other: RngState) -> bool:
        """Whether nothing was drawn between the two snapshots."""
        return self.cuda == other.cuda and all(torch.equal(a, b) for a, b in zip(self.tensors(), other.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The states as tensors, for ``ctx.save_for_backward``; ``from_tensors`` rebuilds the snapshot."""
        return (self.cpu, *self.cuda_states)

    @classmethod
    def from_tensors(cls, cuda: tuple[torch.device, ...], tensors: Sequence[torch.Tensor]) -> RngState:
        return cls(tensors[0], cuda, tuple(tensors[1:1 + len(cuda)]))
