"""Pass 9d: the memory model — what each way of running a stretch of a chain costs.

For blocks ``[i, j)`` of a chain this pass builds the solver's options from
the measured block costs (``profile_blocks``) and the measured phases around
the chain (``profile_step``):

* ``keep``: the blocks run under plain autograd and keep what they save;
* ``recompute``: one checkpoint segment keeps only its input;
* ``save_matmuls``: a selective segment also keeps its matmul outputs;
* ``save_ops`` at a few menu levels: a selective segment keeps, in each
  block, the steps of the block's menu (``save_ops_menu``) up to that level
  (a recompute saved per byte, in seconds or FLOPs), and its recompute
  elides the ops nothing then needs;
* ``reversible`` (whole chain): two streams kept, blocks reconstructed;
* ``stem``: a checkpointed segment at block 0 that recomputes the chain's
  stem (``profile_stem``) instead of keeping its input, and frees what the
  stem saves.

Recompute time counts early stopping: the last block of a segment is
replayed only up to its last op whose inputs backward needs
(``BlockCost.replay_s``), and ``save_ops`` keeps nothing beyond that point
in it (an output there would be kept and never used). It also counts the
measured eager overhead of each checkpointed block (``checkpoint_overhead_s``,
``selective_overhead_s``): selective checkpointing runs a Python dispatch
mode on every op, which on CPU can cost as much as the recompute it saves.

Recompute is priced by ``Pricing``: measured seconds (``"time"``, the
default), or FLOPs as ``torch.utils.flop_counter`` counts them
(``"flops"``), with the time model only breaking ties among options of
equal FLOPs. Every option also carries both figures (``Option.parts``).

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

from dataclasses import dataclass, replace
from itertools import accumulate

from revify.runtime.checkpoint_policy import op_digest

from revify.passes.planning.block_costs import BlockCost, OpCost
from revify.passes.planning.profile_stem import StemCost
from revify.passes.planning.save_ops_menu import MenuStep, Replay, kept_at, replay, save_ops_menu
from revify.passes.planning.solve_schedule import Option

POLICY_OPTIONS = ("keep", "recompute", "save_matmuls", "save_ops")
SAVE_OPS_LEVELS = 12  # menu levels tried per chain: more options, a slower solve
RECOMPUTE_COSTS = ("time", "flops")
Level = tuple[float, float]  # a cut of every block's save_ops menu (``MenuStep.level``)


@dataclass(frozen=True)
class Pricing:
    """What the planner minimises when it recomputes: measured seconds, or FLOPs.

    ``"time"`` prices an op at its measured share of the block's forward, plus
    the measured eager overheads of checkpointing: the plan that should step
    fastest on the machine that profiled it, though ops of similar cost per
    byte can swap places between two profiles. ``"flops"`` prices an op at
    its FLOPs and adds the seconds, so that among options of equal FLOPs
    (pointwise ops count zero) the time model decides. A second weighs as one
    FLOP, far below any matmul, so it never outweighs a FLOP difference (in
    float64, sums beyond about 1e13 FLOPs lose the milliseconds, and ties are
    then broken arbitrarily). The ``save_ops`` menu is ranked by FLOPs saved
    per byte alone, every op that saves no FLOPs in one last step, so the
    options and the least FLOPs under a budget do not depend on timing.
    """

    unit: str = "time"

    def __post_init__(self) -> None:
        if self.unit not in RECOMPUTE_COSTS:
            raise ValueError(f"unknown recompute_cost {self.unit!r}; choose one of {', '.join(RECOMPUTE_COSTS)}")

    def price(self, seconds: float, flops: float) -> float:
        return seconds if self.unit == "time" else flops + seconds


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
    adapter_flops: int = 0  # forward FLOPs of all the chain's adapters (as flop_counter counts matmuls)


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

    def backward_need(self, i: int, j: int, recomputed: bool = False) -> int:
        """Peak above the stretch's start while backward runs through blocks [i, j), all recomputed or kept."""
        n = len(self.blocks)
        later = self.grads[n] - self.grads[j]
        return max(self.kept(i, k + 1) + self.grads[j] - self.grads[k + 1]
                   + self.blocks[k].backward_transient_for(recomputed) for k in range(i, j)) + later

    def forward_need(self, i: int, j: int, kept_before: list[int]) -> int:
        """Peak above the stretch's start while forward runs blocks [i, j); ``kept_before[k]``: kept ahead of k."""
        return max(kept_before[k - i] + self.blocks[k].saved_bytes + self.blocks[k].input_bytes
                   + self.blocks[k].forward_transient for k in range(i, j))


class SaveOpsMenus:
    """Each distinct block's ``save_ops`` menu (``save_ops_menu``), inside a segment and as its last block."""

    def __init__(self, blocks: tuple[BlockCost, ...], pricing: Pricing = Pricing()):
        self.blocks = blocks  # keeps the blocks alive: menus are keyed by their ids
        self.menus: dict[tuple[int, bool], tuple[MenuStep, ...]] = {}
        for b in blocks:  # identical blocks share one profile, so one menu
            for last in (False, True):
                if (id(b), last) not in self.menus:
                    self.menus[id(b), last] = save_ops_menu(b, last, pricing.unit)

    def levels(self, at_most: int = SAVE_OPS_LEVELS) -> tuple[Level, ...]:
        """Levels to cut every menu at: the menus' own steps' levels, at most ``at_most``.

        With more distinct levels than that, they split the recompute the
        menus save (best ratio first) into near-equal parts, so levels are
        dense where keeping pays; the best level (the cheapest selective
        option) and the last (keep every savable op) always stay.
        """
        gains: dict[Level, float] = {}
        for menu in self.menus.values():
            for step in menu:
                gains[step.level] = gains.get(step.level, 0.0) + step.ratio * sum(o.out_bytes for o in step.ops)
        ordered = sorted(gains.items(), key=lambda item: (-item[0][0], item[0][1]))
        if len(ordered) <= at_most:
            return tuple(level for level, _ in ordered)
        total = sum(g for _, g in ordered) or 1.0
        picked, cumulative, part = [ordered[0][0]], 0.0, 1
        for level, g in ordered[:-1]:
            cumulative += g
            if cumulative * (at_most - 2) >= part * total:
                if level != picked[-1]:
                    picked.append(level)
                while cumulative * (at_most - 2) >= part * total:
                    part += 1
        if ordered[-1][0] != picked[-1]:
            picked.append(ordered[-1][0])
        return tuple(picked)

    def kept(self, block: BlockCost, threshold: Level, last: bool) -> tuple[OpCost, ...]:
        """The ops whose outputs a ``save_ops`` segment keeps in ``block`` at ``threshold``."""
        return kept_at(self.menus[id(block), last], threshold)

    def replay(self, block: BlockCost, threshold: Level, last: bool) -> Replay:
        return replay(block, frozenset(o.index for o in self.kept(block, threshold, last)), last)


OpList = tuple[tuple[tuple[int, str], ...], ...]


def save_ops_plan(blocks: tuple[BlockCost, ...], i: int, j: int, level: Level, pricing: Pricing = Pricing(),
                  menus: SaveOpsMenus | None = None) -> tuple[OpList, OpList | None, tuple[int, ...] | None]:
    """``Segment.saved_ops``, ``.elided_ops`` and ``.op_digests`` of a ``save_ops`` option (None: nothing elided).

    ``menus``: the chain's, when the caller has them (a menu costs O(ops³) to build), else built here.
    """
    menus = SaveOpsMenus(blocks[i:j], pricing) if menus is None else menus
    saved, elided = [], []
    for k in range(i, j):
        last = k == j - 1
        saved.append(tuple((o.index, o.name) for o in menus.kept(blocks[k], level, last)))
        elided.append(tuple((o.index, o.name) for o in menus.replay(blocks[k], level, last).elided))
    if not any(elided):
        return tuple(saved), None, None
    return tuple(saved), tuple(elided), tuple(op_digest(o.name for o in b.ops) for b in blocks[i:j])


class _Selective:
    """Per block and threshold: bytes kept, and (seconds, FLOPs) recomputed, inside a segment or as its last block."""

    def __init__(self, blocks: tuple[BlockCost, ...], thresholds: tuple[Level, ...], menus: SaveOpsMenus):
        self.inner: dict[tuple[int, Level], tuple[int, float, float]] = {}
        self.last: dict[tuple[int, Level], tuple[int, float, float]] = {}
        for k, b in enumerate(blocks):
            for t in thresholds:
                for last, table in ((False, self.inner), (True, self.last)):
                    kept = menus.kept(b, t, last)
                    runs = menus.replay(b, t, last)
                    table[k, t] = (sum(o.out_bytes for o in kept), runs.seconds, runs.flops)


def _sums(values: list[float]) -> list[float]:
    """Prefix sums, starting at 0: ``out[j] - out[i]`` is the sum over ``[i, j)``."""
    return list(accumulate(values, initial=0.0))


def chain_options(blocks: tuple[BlockCost, ...], bases: ChainBases, offset: int, chain_index: int,
                  policies: tuple[str, ...] = POLICY_OPTIONS, max_segment: int | None = None,
                  reversible: ReversibleCost | None = None, pricing: Pricing = Pricing(),
                  stem: StemCost | None = None, side_groups: tuple[int, ...] | None = None,
                  shared: bool = False) -> list[Option]:
    """Every option for every stretch of one chain, at global positions ``offset + i``.

    ``side_groups`` (``Chain.side_groups``): a checkpointed stretch of several
    blocks must not mix side inputs (its head runs them all with its own).
    ``shared`` (``Chain.shared``): one module is several blocks, and its one
    installed forward checkpoints every call alike: each block is its own
    ``recompute`` segment, nothing else.

    With a ``stem``, the bases leave out what the stem saves: every option at
    block 0 keeps it (until the stem's own backward, after the option's),
    except the stem variants of checkpointed segments.
    """
    runs = _Runs(blocks)
    n = len(blocks)
    options = []
    menus = SaveOpsMenus(blocks, pricing) if "save_ops" in policies else None
    thresholds = menus.levels() if menus is not None else ()
    selective = _Selective(blocks, thresholds, menus) if menus is not None else None
    # prefix sums of whole-block recompute over the inner blocks of a segment, in seconds and FLOPs
    full = _sums([b.forward_s for b in blocks])
    full_f = _sums([b.forward_flops for b in blocks])
    matmul_free = _sums([b.selective_recompute_s for b in blocks])
    matmul_free_f = _sums([b.selective_recompute_flops for b in blocks])
    ckpt_over = _sums([b.checkpoint_overhead_s for b in blocks])
    sac_over = _sums([b.selective_overhead_s for b in blocks])

    def priced(start: int, end: int, keep: int, need: int, seconds: float, flops: float, label: tuple) -> Option:
        return Option(start, end, keep, need, pricing.price(seconds, flops), label, (seconds, flops))

    saved = stem.saved_bytes if stem is not None else 0

    def emit(i: int, j: int, keep: int, fwd: int, bwd: int, seconds: float, flops: float, label: tuple,
             checkpointed: bool) -> None:
        """The option for blocks [i, j); at block 0 with a stem, also its stem variant (``_stem_variant``)."""
        extra = bases.start_need if i == 0 else 0
        if i > 0 or stem is None:
            options.append(priced(offset + i, offset + j, keep, max(fwd, bwd, extra), seconds, flops, label))
            return
        # what the stem saves stays alive until its own backward, after this stretch's
        options.append(priced(offset, offset + j, keep + saved, max(fwd, bwd + saved, extra), seconds, flops, label))
        if checkpointed:
            options.append(_stem_variant(stem, blocks[0].input_bytes, bases, keep, max(fwd, bwd, extra), seconds,
                                         flops, label, offset, j, pricing))

    if shared:
        policies, max_segment, stem = tuple(p for p in policies if p == "recompute") or ("recompute",), 1, None
    for i in range(n):
        top = n if max_segment is None else min(n, i + max_segment)
        x = blocks[i].input_bytes
        # a segment's own input is in ``kept(i, …)`` when block i saves it; count it once
        own = 0 if blocks[i].saves_input else x
        for j in range(i + 1, top + 1):
            bwd = bases.base_b + runs.backward_need(i, j)
            bwd_rec = bases.base_b + runs.backward_need(i, j, recomputed=True)
            if side_groups is not None and len(set(side_groups[i:j])) > 1:
                if "keep" in policies:  # blocks that keep their activations may mix side inputs
                    kept_before = [runs.kept(i, k) for k in range(i, j)]
                    fwd = bases.base_f + runs.forward_need(i, j, kept_before)
                    emit(i, j, runs.kept(i, j), fwd, bwd, 0.0, 0.0, ("keep", chain_index, i, j), False)
                continue
            if "keep" in policies:
                kept_before = [runs.kept(i, k) for k in range(i, j)]
                fwd = bases.base_f + runs.forward_need(i, j, kept_before)
                emit(i, j, runs.kept(i, j), fwd, bwd, 0.0, 0.0, ("keep", chain_index, i, j), False)
            if "recompute" in policies:
                fwd = bases.base_f + x + runs.forward_need(i, j, [0] * (j - i))
                seconds = full[j - 1] - full[i] + blocks[j - 1].replay_s + ckpt_over[j] - ckpt_over[i]
                flops = full_f[j - 1] - full_f[i] + blocks[j - 1].replay_flops
                emit(i, j, x, fwd, bwd_rec + own, seconds, flops, ("recompute", chain_index, i, j), True)
            if "save_matmuls" in policies:
                cached = [sum(b.selective_saved_bytes for b in blocks[i:k]) for k in range(i, j)]
                fwd = bases.base_f + x + runs.forward_need(i, j, cached)
                keep = x + sum(b.selective_saved_bytes for b in blocks[i:j])
                seconds = (matmul_free[j - 1] - matmul_free[i] + blocks[j - 1].selective_replay_s
                           + sac_over[j] - sac_over[i])
                flops = matmul_free_f[j - 1] - matmul_free_f[i] + blocks[j - 1].selective_replay_flops
                emit(i, j, keep, fwd, bwd_rec + own, seconds, flops, ("save_matmuls", chain_index, i, j), True)
            for t in thresholds:
                per_block = [selective.inner[k, t] for k in range(i, j - 1)] + [selective.last[j - 1, t]]
                cached = [0]
                for kept, _, _ in per_block[:-1]:
                    cached.append(cached[-1] + kept)
                fwd = bases.base_f + x + runs.forward_need(i, j, cached)
                keep = x + sum(kept for kept, _, _ in per_block)
                seconds = sum(s for _, s, _ in per_block) + sac_over[j] - sac_over[i]
                flops = sum(f for _, _, f in per_block)
                emit(i, j, keep, fwd, bwd_rec + own, seconds, flops, ("save_ops", chain_index, i, j, t, pricing.unit),
                     True)
    if reversible is not None and n >= 2:
        rev = _reversible_option(blocks, bases, offset, chain_index, runs, reversible, pricing)
        options.append(replace(rev, keep=rev.keep + saved, need=rev.need + saved))
    return options


def _stem_variant(stem: StemCost, hidden_bytes: int, bases: ChainBases, keep: int, need: int, seconds: float,
                  flops: float, label: tuple, offset: int, end: int, pricing: Pricing) -> Option:
    """A checkpointed segment at block 0 that recomputes the chain's stem instead of keeping its input.

    It keeps the stem's arguments instead of the segment's input and the
    stem's saved tensors, and runs the stem again in backward: once to
    rebuild the input, once (in part) for the stem's own gradients
    (``runtime/checkpoint_stem``). Label ``("stem", chain, 0, end, inner
    label)``. Its need is the plain segment's without the stem's saved
    tensors (the forward part, measured with them alive, still counts them:
    it errs high), at least the rebuild's (the input and the stem's forward
    transient), plus the arguments held.
    """
    rebuild = bases.base_b + hidden_bytes + stem.forward_transient
    cost = (seconds + stem.recompute_s, flops + stem.recompute_flops)
    return Option(offset, offset + end, keep - hidden_bytes + stem.held_bytes, max(need, rebuild) + stem.held_bytes,
                  pricing.price(*cost), ("stem", label[1], 0, end, label), cost)


def _reversible_option(blocks: tuple[BlockCost, ...], bases: ChainBases, offset: int, chain_index: int,
                       runs: _Runs, rev: ReversibleCost, pricing: Pricing) -> Option:
    stream = int(blocks[0].input_bytes * rev.stream_ratio)
    # saved: the two final streams (the chain's output, like every option's, is live in
    # the phase after the chain and so counted there)
    keep = 2 * stream
    # backward: one block recomputed under autograd at a time, beside the streams being
    # reconstructed (x1, x2, y1, y2) and their gradients (d1, d2)
    grads_total = sum(rev.grad_bytes)
    bwd = max(runs.kept(k, k + 1) + blocks[k].backward_transient_for(True) for k in range(len(blocks))) \
        + 6 * stream + grads_total
    fwd = max(b.saved_bytes + b.forward_transient for b in blocks) + 3 * stream
    need = max(bases.base_f + fwd, bases.base_b + keep + bwd, bases.start_need)
    seconds = sum(b.forward_s for b in blocks) + rev.adapter_s * len(blocks)
    flops = sum(b.forward_flops for b in blocks) + rev.adapter_flops
    return Option(offset, offset + len(blocks), keep, need, pricing.price(seconds, flops),
                  ("reversible", chain_index, 0, len(blocks)), (seconds, flops))
