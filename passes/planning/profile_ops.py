"""The op-level profile of one block: each op selective checkpointing sees, timed, sized, counted and traced.

The budget planner may keep single op outputs of a checkpointed block
(``save_ops``) and elide ops a recompute does not need (``save_ops_menu``);
both need the block's forward as a list of ops. Under a
``TorchDispatchMode`` each op's wall time, new output bytes, FLOPs and
whether keeping its output is safe are recorded over a few forwards (median
times, scaled to the block's measured forward), and one more forward with
every parameter requiring grad records the dataflow: which earlier ops'
storages each op reads, whether autograd saves its outputs, whether they
leave the block. A checkpointed run counts how many ops a recompute ending in
the block replays (non-reentrant checkpointing stops early).

Before::

    BlockRun(GPT2Block)

After::

    ((OpCost(0, "aten.native_layer_norm.default", 1.5 MiB, 0.002, True, reads=(), saved=True, ...), …),
     41,     # ops a recompute ending here replays
     True)   # the dataflow is complete
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.checkpoint import SAC_IGNORED_OPS

from revify.runtime.checkpoint_call import _checkpoint
from revify.runtime.checkpoint_policy import saves_under_save_matmuls

from revify.passes.planning.block_costs import OpCost
from revify.passes.planning.block_run import BlockRun, storage_ptr
from revify.passes.planning.count_flops import op_flops


@dataclass
class _Recorded:
    name: str
    seconds: float
    fresh_bytes: int
    outs: list[tuple[torch.Tensor, int]]  # held to the forward's end: (tensor, version when returned)
    ok: bool  # fresh storages only, not random
    flops: int
    in_ptrs: frozenset[int]
    out_ptrs: tuple[int, ...]  # per output, in order (0: no storage)
    random: bool
    alias: bool
    mutates: bool  # writes an argument (BatchNorm's running stats): an effect beyond its outputs
    kept_by_save_matmuls: bool  # the save_matmuls policy keeps it (decided per call: dropout_p matters)


# outputs whose values do not depend on the op's input values: dropout's mask is
# drawn from the RNG alone, so a recompute that needs only the mask can feed dropout
# any tensor of the right shape
_MASK_OUTPUTS = {"aten.native_dropout.default": frozenset({1})}
# ops that read only their input's shape, dtype and device (dropout's mask starts as
# ``empty_like(x)``): they never make the recompute compute their input
_SHAPE_ONLY = frozenset(f"aten.{name}.default" for name in
                        ("empty_like", "zeros_like", "ones_like", "rand_like", "randn_like", "full_like"))


class _OpRecorder(TorchDispatchMode):
    """Every op selective checkpointing would see: name, wall time, new output storages, FLOPs, dataflow.

    Outputs are held until the forward ends, to notice ones modified in place later
    (selective checkpointing refuses to hand back a mutated saved output); holding
    them also keeps storage addresses unique, so they identify tensors in the dataflow.
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.cuda = device.type == "cuda"
        self.ops: list[_Recorded] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SAC_IGNORED_OPS:
            return func(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        inputs = frozenset(storage_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        fresh = {storage_ptr(t): t.untyped_storage().nbytes() for t in outs
                 if storage_ptr(t) not in inputs and storage_ptr(t) != 0}
        random = torch.Tag.nondeterministic_seeded in func.tags
        mutates = func._schema.is_mutable
        ok = bool(outs) and len(fresh) == len({storage_ptr(t) for t in outs}) and not random
        alias = bool(outs) and not fresh and not mutates
        flops = op_flops(func, args, kwargs, out)
        self.ops.append(_Recorded(str(func), dt, sum(fresh.values()), [(t, t._version) for t in outs], ok, flops,
                                  inputs, tuple(storage_ptr(t) for t in outs), random, alias, mutates,
                                  saves_under_save_matmuls(func, args, kwargs)))
        return out


def _dataflow(ops: list[_Recorded], saved: set[int], escaping: set[int]) -> list[dict]:
    """Per op: which earlier ops' storages it reads, and whether autograd or the caller keeps its outputs."""
    producer: dict[int, int] = {}
    flows = []
    for k, op in enumerate(ops):
        reads = [] if op.name in _SHAPE_ONLY else sorted({producer[p] for p in op.in_ptrs if p in producer})
        masks = _MASK_OUTPUTS.get(op.name, frozenset())
        valued = [p for i, p in enumerate(op.out_ptrs) if p and i not in masks]
        flows.append(dict(reads=tuple(reads), saved=any(p in saved for p in valued),
                          escapes=any(p in escaping for p in op.out_ptrs if p), random=op.random,
                          alias=op.alias, mutates=op.mutates, mask_only=bool(masks)))
        for p in op.out_ptrs:
            if p and p not in op.in_ptrs:
                producer.setdefault(p, k)
    return flows


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in SAC_IGNORED_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))



def profile_ops(run: BlockRun, forward_s: float,
                repeats: int = 3) -> tuple[tuple[OpCost, ...], int | None, bool]:
    """The block's ops (times scaled to ``forward_s``), how many a recompute replays, and whether
    their dataflow is complete (no Python ``autograd.Function`` inside, see ``_runs_python_functions``).

    Each op's time is its median over ``repeats`` recorded forwards. The planner
    ranks ops by time per byte, and in a single run one interrupted op on a
    shared CPU can read many times its cost. The same 1.5 MiB pointwise op read
    6.6 ms with another process running and 0.25 ms without. A median removes
    such one-off spikes; it cannot fix load that lasts the whole profile.

    Returns ``((), None, False)`` when a checkpointed run does not see the same number of
    ops as the recorded one: then op indices would not line up with the runtime
    policy's, and the planner falls back to whole-block figures.
    """
    runs = []
    for _ in range(max(1, repeats) + 1):  # the first run warms caches up
        recorder = _OpRecorder(run.device)
        x = run.hidden()
        with recorder:
            run(x)
        # keep no outputs past their run: (name, seconds, bytes, savable, flops, kept by save_matmuls)
        runs.append([(op.name, op.seconds, op.fresh_bytes,
                      op.ok and op.fresh_bytes > 0 and all(t._version == v for t, v in op.outs), op.flops,
                      op.kept_by_save_matmuls)
                     for op in recorder.ops])
        del recorder
    last = runs[-1]
    names = [op[0] for op in last]
    flows = _record_dataflow(run, names)
    timed = [r for r in runs[1:] if [op[0] for op in r] == names]  # includes the last run
    dts = [statistics.median(r[k][1] for r in timed) for k in range(len(last))]
    scale = forward_s / (sum(dts) or 1e-12)
    ops = tuple(OpCost(k, name, nbytes, dt * scale, savable, flops, **(flows[k] if flows else {}),
                       kept_by_save_matmuls=kept)
                for k, ((name, _, nbytes, savable, flops, kept), dt) in enumerate(zip(last, dts)))

    counter = _OpCounter()

    def counted(h: torch.Tensor) -> torch.Tensor:
        with counter:
            return run(h)

    x = run.hidden()
    out = _checkpoint(counted, "recompute", x)
    seen, counter.count = counter.count, 0
    if out.requires_grad:
        out.backward(torch.randn_like(out))
    replayed = counter.count
    run.module.zero_grad(set_to_none=True)
    if seen != len(ops):
        return (), None, False
    return ops, min(replayed, len(ops)), flows is not None


def _record_dataflow(run: BlockRun, names: list[str]) -> list[dict] | None:
    """Per op, what it reads and whether autograd saves or the block returns its outputs.

    Recorded with every floating-point parameter and side input requiring
    grad: autograd then saves the most it ever saves (``mm`` saves its input
    only for its weight's gradient), so a block planned with frozen layers
    elides nothing a later unfreezing would need. None when that forward runs
    other ops than ``names``, or the block holds a Python ``autograd.Function``
    (``_runs_python_functions``): the dataflow would be incomplete.
    """
    saved: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.add(storage_ptr(t))
        return t

    frozen = [p for p in run.module.parameters() if not p.requires_grad and p.is_floating_point()]
    args, kwargs = tree_map(_requiring_grad, (run.args, run.kwargs))
    recorder = _OpRecorder(run.device)
    x = run.hidden()
    try:
        for p in frozen:
            p.requires_grad_(True)
        with recorder, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run.raw(x, args=args, kwargs=kwargs)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if [op.name for op in recorder.ops] != names or _runs_python_functions(outs):
        return None
    return _dataflow(recorder.ops, saved, {storage_ptr(t) for t in outs})


def _requiring_grad(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.requires_grad:
        return value.detach().clone().requires_grad_(True)
    return value


def _runs_python_functions(outputs: list[torch.Tensor]) -> bool:
    """Whether the block's autograd graph holds a Python ``autograd.Function``.

    Such a Function may read tensors without an op the recorder sees (a Triton
    or C++ kernel reading ``data_ptr``), so the recorded dataflow could miss a
    reader: the block then elides nothing.
    """
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if hasattr(fn, "_forward_cls"):
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False
