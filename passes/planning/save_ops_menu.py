"""Pass 9c: the ``save_ops`` menu — which op outputs to keep in a block, and what a recompute then runs.

Selective checkpointing replays a block's Python forward in backward and
returns the kept outputs from its cache; every other op runs again. Many of
those ops are dead in the recompute: their outputs feed only kept ops (which
ignore their inputs) and nothing autograd saved. ``torch.compile`` never
recomputes such ops, because its backward graph holds only what backward
needs. ``replay`` finds them from the dataflow ``profile_blocks`` recorded,
so the runtime can elide them: it hands their consumers an uninitialised
tensor of the right shape instead of running them.

An op is elided when all of these hold:

* its outputs are new storages, not random, not modified in place later
  (``OpCost.savable``), and not kept; it writes none of its arguments;
* autograd saves none of them and none leaves the block (in the segment's
  last block nothing does: its output is dropped in recompute);
* no op that runs reads them, except views and dropout, whose mask does not
  depend on its input (kept ops do not run in recompute).

This assumes the recorded dataflow is complete and still true at run time:
``profile_blocks`` records it with every parameter requiring grad (the most
autograd saves), marks a block whose autograd graph holds a Python
``autograd.Function`` (which could read tensors through a kernel the
recorder does not see) as without dataflow, and the runtime elides only
where the forward ran the profiled op sequence.

Dropout reads its input only for its output, not for the mask autograd saves:
when its output is not needed it still runs (to draw the same random
numbers) but on whatever tensor it is given.

Before (a post-LN BERT layer, keeping ``sdpa``, FFN-up and the two residual
sums; every uncached op replays)::

    q, k, v = mm(x), mm(x), mm(x)     # run: sdpa saves them
    a = sdpa(q, k, v)                 # kept
    o = mm(a)                         # run: its output feeds dropout → the kept sum
    r = x + dropout(o)                # kept
    ...

After::

    o = mm(a)                         # elided: dropout's output feeds only the kept sum

The menu is greedy: starting from nothing kept, it adds the op whose keeping
shortens the recompute most per byte, measured with ``replay`` (so keeping a
residual sum is worth the projection it lets the recompute skip); ops that
shorten nothing come last, in one step. Steps are merged into their upper
concave hull, so the gain per byte falls along the menu, and a level on it
(a ratio, and a share of the steps of that ratio) picks a prefix in every
block at once, like a knapsack's marginal price.

Before::

    BlockCost(ops=(OpCost(0, "aten.mm.default", …), …), dataflow=True)

After::

    (MenuStep(ratio=1536.0, ops=(OpCost(62, "aten.addmm.default", …),), share=1.0),
     MenuStep(ratio=384.0, ops=(OpCost(2, "aten.addmm.default", …),), share=0.125), …)
"""
from __future__ import annotations

from dataclasses import dataclass

from revify.passes.planning.block_costs import BlockCost, OpCost


@dataclass(frozen=True)
class Replay:
    """What a recompute of one block runs, and which ops it elides, for one kept set."""

    runs: tuple[OpCost, ...]
    elided: tuple[OpCost, ...]

    @property
    def seconds(self) -> float:
        return sum(o.seconds for o in self.runs)

    @property
    def flops(self) -> int:
        return sum(o.flops for o in self.runs)


def replay_pool(block: BlockCost, last: bool) -> tuple[OpCost, ...]:
    """The ops a recompute reaches: all of them, or up to early stopping in a segment's last block."""
    return block.replayed if last and block.replayed is not None else block.ops


def replay(block: BlockCost, kept: frozenset[int], last: bool) -> Replay:
    """The ops a recompute runs when the outputs of ops ``kept`` (indices) come from the cache."""
    pool = replay_pool(block, last)
    if not block.dataflow:  # without the dataflow every uncached op runs
        return Replay(tuple(o for o in pool if o.index not in kept), ())
    required: set[int] = set()
    runs, elided = [], []
    for o in reversed(pool):  # readers come after what they read
        if o.index in kept:
            continue
        if o.alias:  # a view of garbage costs nothing; its readers read the viewed storage's producer
            runs.append(o)
            continue
        needed = o.saved or (o.escapes and not last) or o.index in required
        if needed or o.random or o.mutates or not o.savable:
            runs.append(o)
            if needed or not o.mask_only:
                required.update(o.reads)
        else:
            elided.append(o)
    return Replay(tuple(reversed(runs)), tuple(reversed(elided)))


@dataclass(frozen=True)
class MenuStep:
    """Ops kept together; ``ratio``: recompute they save per byte, in the menu's unit.

    ``share`` places the step among the menu's steps of the same ratio: the
    fraction of that class's bytes kept once it is taken (the Q, K, V and O
    projections of an attention layer all save 384 FLOPs per byte, and a
    budget may have room for two of them).
    """

    ratio: float
    ops: tuple[OpCost, ...]
    share: float = 1.0

    @property
    def level(self) -> tuple[float, float]:
        """Its place on the menu: a level ``(ratio, share)`` takes every step at or before it."""
        return self.ratio, self.share


def _cost(block: BlockCost, kept: set[int], last: bool, unit: str) -> float:
    r = replay(block, frozenset(kept), last)
    return r.flops if unit == "flops" else r.seconds


def save_ops_menu(block: BlockCost, last: bool, unit: str = "time") -> tuple[MenuStep, ...]:
    """The block's kept sets, cheapest first: keeping the first k steps is the k-th option.

    ``unit`` ("time" or "flops") is what a step saves: with ``"flops"`` the
    menu depends on FLOP counts alone (ties go to the earlier op), never on
    timing. Ops that save nothing in that unit form the last step (ratio 0).
    """
    candidates = [o for o in replay_pool(block, last) if o.savable]
    kept: set[int] = set()
    current = _cost(block, kept, last, unit)
    raw: list[tuple[int, float, tuple[OpCost, ...]]] = []  # (bytes, gain, ops)
    while candidates:
        best: tuple[float, OpCost, float] | None = None
        for o in candidates:
            after = _cost(block, kept | {o.index}, last, unit)
            ratio = (current - after) / o.out_bytes
            if ratio > 0 and (best is None or ratio > best[0]):
                best = (ratio, o, after)
        if best is None:
            break
        _, o, after = best
        raw.append((o.out_bytes, current - after, (o,)))
        kept.add(o.index)
        candidates.remove(o)
        current = after
    hull: list[tuple[int, float, tuple[OpCost, ...]]] = []
    for step in raw:
        hull.append(step)
        # a step that saves more per byte than the one before it is only worth taking with it
        # (steps of equal ratio stay apart: a budget may fit some of them)
        while len(hull) >= 2 and hull[-1][1] * hull[-2][0] > hull[-2][1] * hull[-1][0]:
            (b2, g2, o2), (b1, g1, o1) = hull.pop(), hull.pop()
            hull.append((b1 + b2, g1 + g2, o1 + o2))
    ratios = [(gain / nbytes, nbytes, ops) for nbytes, gain, ops in hull]
    if candidates:
        ratios.append((0.0, sum(o.out_bytes for o in candidates), tuple(candidates)))
    class_bytes: dict[float, int] = {}
    for ratio, nbytes, _ in ratios:
        class_bytes[ratio] = class_bytes.get(ratio, 0) + nbytes
    steps, taken = [], dict.fromkeys(class_bytes, 0)
    for ratio, nbytes, ops in ratios:
        taken[ratio] += nbytes
        steps.append(MenuStep(ratio, ops, taken[ratio] / class_bytes[ratio]))
    return tuple(steps)


ALL_STEPS = (0.0, 1.0)  # the level that takes every step of every menu


def reaches(step: MenuStep, level: tuple[float, float]) -> bool:
    """Whether a menu cut at ``level`` takes ``step``."""
    ratio, share = level
    return step.ratio > ratio or (step.ratio == ratio and step.share <= share + 1e-9)


def kept_at(menu: tuple[MenuStep, ...], level: tuple[float, float]) -> tuple[OpCost, ...]:
    """The ops of every step the menu cut at ``level`` takes, in op order."""
    ops = [o for step in menu if reaches(step, level) for o in step.ops]
    return tuple(sorted(ops, key=lambda o: o.index))
