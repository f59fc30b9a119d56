"""What the budget planner knows of a block: its measured costs (``BlockCost``) and its forward's ops (``OpCost``).

``profile_blocks`` fills these in, one per distinct block; ``chain_costs``,
``save_ops_menu`` and ``recompute_share`` read them. They are plain frozen
data, kept apart from the measuring code so that readers need no profiler.

``saved_bytes`` is the block's *interior*: storages autograd saves that are
neither its hidden input or output, nor a side input (mask, rotary tables),
nor a parameter. The boundary tensors are flags, because whether they are
kept depends on the neighbouring blocks' schedule.

``ops`` lists every op of the forward that selective checkpointing sees, in
order, with its output bytes and time: the planner's menu for keeping single
op outputs (``save_ops``). ``replayed_ops`` is how many of them a recompute
that ends in this block runs: non-reentrant checkpointing stops recomputing
as soon as autograd has every saved tensor back, so a block ending in
``x + fc2(h)`` never recomputes fc2 when it is the last of its segment.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpCost:
    """One op of a block's forward, as selective checkpointing counts them."""

    index: int  # position among the ops selective checkpointing sees (``SAC_IGNORED_OPS`` are skipped)
    name: str  # e.g. "aten.addmm.default"
    out_bytes: int  # bytes of the new storages it returns
    seconds: float  # its share of the block's measured forward time
    savable: bool  # keeping its output is safe: new storage, not random, not modified in place later
    flops: int = 0  # as torch.utils.flop_counter counts them (zero for pointwise ops)
    # dataflow inside the block, for eliding ops a recompute does not need (``passes/planning/save_ops_menu``);
    # ``BlockCost.dataflow`` says whether it was recorded
    reads: tuple[int, ...] = ()  # indices of the earlier ops whose output storages it reads
    saved: bool = False  # autograd saves one of its outputs (not counting a dropout mask)
    escapes: bool = False  # one of its outputs leaves the block (the block's output)
    random: bool = False  # draws random numbers: a recompute must run it to keep the RNG in step
    alias: bool = False  # returns views of its inputs and mutates nothing (reading costs nothing)
    mask_only: bool = False  # dropout: its saved mask does not depend on its input's values
    mutates: bool = False  # writes an argument too: a recompute must run it
    kept_by_save_matmuls: bool = False  # a ``save_matmuls`` segment keeps its output (a matmul drawing no RNG)

    @property
    def seconds_per_byte(self) -> float:
        return self.seconds / self.out_bytes if self.out_bytes else 0.0


def _replayed(measure: str, whole: str, skip_matmuls: bool, doc: str) -> property:
    """A ``BlockCost`` property: ``measure`` ("seconds" or "flops") summed over the ops a recompute
    ending in the block replays, leaving out what a ``save_matmuls`` segment keeps when
    ``skip_matmuls``; the whole-block field ``whole`` when there is no op profile."""

    def total(self: "BlockCost") -> float:
        replayed = self.replayed
        if replayed is None:
            return getattr(self, whole)
        return sum(getattr(o, measure) for o in replayed if not (skip_matmuls and o.kept_by_save_matmuls))

    return property(total, doc=doc)


@dataclass(frozen=True)
class BlockCost:
    """Measured costs of one block for one call signature (bytes, seconds and FLOPs)."""

    input_bytes: int  # the hidden input, which a segment starting here keeps
    saved_bytes: int  # interior storages saved for backward
    saves_input: bool  # the block itself saves its hidden input (a LayerNorm first)
    saves_output: bool  # the block itself saves its output (a ReLU last)
    forward_transient: int  # peak during forward above what the forward leaves behind
    backward_transient: int  # peak during backward above what is live when it starts
    grad_bytes: int  # gradients of the block's trainable parameters, alive after its backward
    forward_s: float  # median forward time
    selective_saved_bytes: int  # interior kept by the save_matmuls policy (outputs of matmuls)
    selective_recompute_s: float  # time of the ops that policy recomputes
    ops: tuple[OpCost, ...] = ()  # empty: the op-level profile was not usable (see ``profile_ops``)
    replayed_ops: int | None = None  # ops a recompute ending in this block runs; None: all
    # eager overheads beyond the recomputed ops, measured (see ``profile_blocks``)
    checkpoint_overhead_s: float = 0.0
    selective_overhead_s: float = 0.0
    forward_flops: int = 0  # the ops' FLOPs summed (FlopCounterMode over a forward without an op profile)
    selective_recompute_flops: int = 0  # FLOPs of the ops the save_matmuls policy recomputes
    dataflow: bool = False  # ``ops`` record what they read, save and leave (recompute may elide ops)
    # on CUDA a recomputed block's backward can need other kernel scratch than a kept one's (measured by
    # ``profile_blocks``); None: the same as ``backward_transient``
    recompute_backward_transient: int | None = None

    def backward_transient_for(self, recomputed: bool) -> int:
        """Peak during this block's backward above what is live when it starts, kept or recomputed."""
        if recomputed and self.recompute_backward_transient is not None:
            return self.recompute_backward_transient
        return self.backward_transient

    @property
    def replayed(self) -> tuple[OpCost, ...] | None:
        """The ops a recompute that ends in this block runs (early stop); None without an op profile."""
        if self.replayed_ops is None or not self.ops:
            return None
        return self.ops[:self.replayed_ops]

    replay_s = _replayed("seconds", "forward_s", False,
                         "Forward seconds a recompute that ends in this block spends in it.")
    selective_replay_s = _replayed("seconds", "selective_recompute_s", True,
                                   "The same for a ``save_matmuls`` segment: the replayed ops that are not matmuls.")
    replay_flops = _replayed("flops", "forward_flops", False,
                             "FLOPs a recompute that ends in this block spends in it.")
    selective_replay_flops = _replayed("flops", "selective_recompute_flops", True,
                                       "FLOPs of a ``save_matmuls`` segment's last block: the replayed ops that "
                                       "are not matmuls.")

    @property
    def kept_bytes(self) -> int:
        """What the block keeps when not checkpointed, not counting a neighbour's share."""
        return self.saved_bytes + self.input_bytes * self.saves_input + self.input_bytes * self.saves_output
