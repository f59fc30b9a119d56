"""Pass 9d: the memory model — what each way of running a stretch of a chain costs.

For blocks ``[i, j)`` of a chain this pass builds the solver's options from
the measured block costs (``profile_blocks``) and the measured phases around
the chain (``profile_step``):

* ``keep``: the blocks run under plain autograd and keep what they save;
* ``recompute``: one checkpoint segment keeps only its input;
* ``save_matmuls``: a selective segment also keeps its matmul outputs;
* ``reversible`` (whole chain): two streams kept, blocks reconstructed.

Each option's ``keep`` is what it adds to the bytes kept for backward, and
its ``need`` the peak above what was kept before it, in forward
(``base_f`` + the blocks' forward transients) or backward (``base_b`` + the
stretch's recomputed activations + gradients of the later blocks of the
chain + the transient of one block's backward). Boundary tensors (a block's
hidden input and output) count once when a block saves them.

Before::

    ChainProfile(blocks=(BlockCost(input_bytes=1.5 MiB, saved_bytes=19 MiB, …), …)),
    ChainBases(base_f=…, base_b=…, start_need=…)

After::

    [Option(0, 1, keep=20.5 MiB, need=…, cost=0.0, label=("keep", 0)),
     Option(0, 3, keep=1.5 MiB, need=…, cost=0.24, label=("recompute", 0)), …]
"""
from __future__ import annotations

from dataclasses import dataclass

from .profile_blocks import BlockCost
from .solve_schedule import Option

POLICY_OPTIONS = ("keep", "recompute", "save_matmuls")


@dataclass(frozen=True)
class ChainBases:
    """Live bytes around one chain, above the bytes kept by earlier chains."""

    base_f: int  # live when the chain's forward starts
    base_b: int  # live when the chain's backward starts, minus what this chain keeps
    start_need: int = 0  # peaks of phases outside chains that must fit where this chain starts


@dataclass(frozen=True)
class ReversibleCost:
    """What differs when the chain runs as reversible couplings."""

    stream_ratio: float  # stream bytes per hidden byte (2.0: fp64 streams for fp32 blocks)
    grad_bytes: tuple[int, ...]  # per block, after conversion (adapters; the backbone if trainable)
    adapter_s: float = 0.0  # extra forward seconds of the adapters, per block


class _Runs:
    """Prefix sums over one chain's blocks, for stretches [i, j)."""

    def __init__(self, blocks: tuple[BlockCost, ...]):
        self.blocks = blocks
        n = len(blocks)
        self.saved = [0] * (n + 1)
        self.grads = [0] * (n + 1)
        for k, b in enumerate(blocks):
            self.saved[k + 1] = self.saved[k] + b.saved_bytes
            self.grads[k + 1] = self.grads[k] + b.grad_bytes

    def boundary_alive(self, b: int, i: int, j: int) -> bool:
        """Whether blocks [i, j) under plain autograd keep hidden tensor b alive."""
        inside_in = i <= b < j and self.blocks[b].saves_input
        inside_out = i < b <= j and self.blocks[b - 1].saves_output
        return inside_in or inside_out

    def kept(self, i: int, j: int) -> int:
        """Bytes blocks [i, j) keep under plain autograd."""
        if j <= i:
            return 0
        x = self.blocks[i].input_bytes
        bounds = sum(x for b in range(i, j + 1) if self.boundary_alive(b, i, j))
        return self.saved[j] - self.saved[i] + bounds

    def backward_need(self, i: int, j: int) -> int:
        """Peak above the stretch's start while backward runs through blocks [i, j), all recomputed or kept."""
        n = len(self.blocks)
        later = self.grads[n] - self.grads[j]
        return max(self.kept(i, k + 1) + self.grads[j] - self.grads[k + 1] + self.blocks[k].backward_transient
                   for k in range(i, j)) + later

    def forward_need(self, i: int, j: int, kept_before: list[int]) -> int:
        """Peak above the stretch's start while forward runs blocks [i, j); ``kept_before[k]``: kept ahead of k."""
        return max(kept_before[k - i] + self.blocks[k].saved_bytes + self.blocks[k].input_bytes
                   + self.blocks[k].forward_transient for k in range(i, j))


def chain_options(blocks: tuple[BlockCost, ...], bases: ChainBases, offset: int, chain_index: int,
                  policies: tuple[str, ...] = POLICY_OPTIONS, max_segment: int | None = None,
                  reversible: ReversibleCost | None = None) -> list[Option]:
    """Every option for every stretch of one chain, at global positions ``offset + i``."""
    runs = _Runs(blocks)
    n = len(blocks)
    options = []
    for i in range(n):
        extra = bases.start_need if i == 0 else 0
        top = n if max_segment is None else min(n, i + max_segment)
        for j in range(i + 1, top + 1):
            x = blocks[i].input_bytes
            bwd = bases.base_b + runs.backward_need(i, j)
            if "keep" in policies:
                kept_before = [runs.kept(i, k) for k in range(i, j)]
                fwd = bases.base_f + runs.forward_need(i, j, kept_before)
                options.append(Option(offset + i, offset + j, runs.kept(i, j), max(fwd, bwd, extra), 0.0,
                                       ("keep", chain_index, i, j)))
            if "recompute" in policies:
                fwd = bases.base_f + x + runs.forward_need(i, j, [0] * (j - i))
                # the segment's own input is in ``kept(i, …)`` when block i saves it; count it once
                own = 0 if blocks[i].saves_input else x
                options.append(Option(offset + i, offset + j, x, max(fwd, bwd + own, extra),
                                      sum(b.forward_s for b in blocks[i:j]), ("recompute", chain_index, i, j)))
            if "save_matmuls" in policies:
                cached = [sum(b.selective_saved_bytes for b in blocks[i:k]) for k in range(i, j)]
                fwd = bases.base_f + x + runs.forward_need(i, j, cached)
                own = 0 if blocks[i].saves_input else x
                keep = x + sum(b.selective_saved_bytes for b in blocks[i:j])
                options.append(Option(offset + i, offset + j, keep, max(fwd, bwd + own, extra),
                                      sum(b.selective_recompute_s for b in blocks[i:j]),
                                      ("save_matmuls", chain_index, i, j)))
    if reversible is not None and n >= 2:
        options.append(_reversible_option(blocks, bases, offset, chain_index, runs, reversible))
    return options


def _reversible_option(blocks: tuple[BlockCost, ...], bases: ChainBases, offset: int, chain_index: int,
                       runs: _Runs, rev: ReversibleCost) -> Option:
    stream = int(blocks[0].input_bytes * rev.stream_ratio)
    # saved: the two final streams (the chain's output, like every option's, is live in
    # the phase after the chain and so counted there)
    keep = 2 * stream
    # backward: one block recomputed under autograd at a time, beside the streams being
    # reconstructed (x1, x2, y1, y2) and their gradients (d1, d2)
    grads_total = sum(rev.grad_bytes)
    bwd = max(runs.kept(k, k + 1) + blocks[k].backward_transient for k in range(len(blocks))) \
        + 6 * stream + grads_total
    fwd = max(b.saved_bytes + b.forward_transient for b in blocks) + 3 * stream
    need = max(bases.base_f + fwd, bases.base_b + keep + bwd, bases.start_need)
    cost = sum(b.forward_s for b in blocks) + rev.adapter_s * len(blocks)
    return Option(offset, offset + len(blocks), keep, need, cost, ("reversible", chain_index, 0, len(blocks)))
