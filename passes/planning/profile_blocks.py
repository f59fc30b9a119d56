"""Pass 9a: measure what each chain block costs, one block at a time.

The budget planner needs, per block, the bytes it keeps for backward, the
transient bytes of its forward and backward, and its forward time, measured
rather than derived from FLOPs (pointwise ops are memory-bound and a FLOP
count gives them no weight). Each *distinct* block (module type, parameter
shapes and trainability, train/eval mode) is run once on its own, on a fresh
tensor of the recorded hidden shape with the recorded side inputs, so the
profile never needs the whole model's activations in memory at once.

Before::

    Chain(blocks=[layer.0 … layer.11])

After::

    BlockCost(input_bytes=1.5 MiB, saved_bytes=19 MiB, saves_input=True, saves_output=False,
              forward_transient=6 MiB, backward_transient=14 MiB, grad_bytes=27 MiB,
              forward_s=0.081, selective_saved_bytes=9 MiB, selective_recompute_s=0.012,
              ops=(OpCost(0, "aten.native_layer_norm.default", 1.5 MiB, 0.002, True, flops=0), …),
              replayed_ops=41, forward_flops=43.5e9)

``ops`` lists every op of the forward that selective checkpointing sees, in
order, with its output bytes and time: the planner's menu for keeping single
op outputs (``save_ops``). ``replayed_ops`` is how many of them a recompute
that ends in this block runs: non-reentrant checkpointing stops recomputing
as soon as autograd has every saved tensor back, so a block ending in
``x + fc2(h)`` never recomputes fc2 when it is the last of its segment.

``saved_bytes`` is the block's *interior*: storages autograd saves that are
neither its hidden input or output, nor a side input (mask, rotary tables),
nor a parameter. The boundary tensors are flags, because whether they are
kept depends on the neighbouring blocks' schedule.

FLOPs (``OpCost.flops``, ``forward_flops``) are counted as
``torch.utils.flop_counter`` counts them: matmuls, convolutions and the
attention kernels in its registry (not the CPU flash kernel
``_scaled_dot_product_flash_attention_for_cpu``); pointwise ops count zero.
The planner's ``recompute_cost="flops"`` minimises them instead of the
measured time: the least FLOPs under a budget do not depend on timing, and
they are what ``torch.compile``'s activation-memory knapsack weighs by
default.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from torch.utils.checkpoint import SAC_IGNORED_OPS

from revify.measure import LiveStorageTracker
from revify.runtime.checkpoint_call import _checkpoint
from revify.runtime.checkpoint_policy import saves_under_save_matmuls

from revify.passes.planning.count_flops import flop_counter, op_flops
from revify.passes.analysis.find_chains import BlockInfo, Chain
from revify.passes.planning.profile_stem import StemCost, profile_stem
from revify.passes.capture.record_calls import CallRecord, fed_tensor, get_slot, set_slot


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
    ops: tuple[OpCost, ...] = ()  # empty: the op-level profile was not usable (see ``_profile_ops``)
    replayed_ops: int | None = None  # ops a recompute ending in this block runs; None: all
    # eager overheads beyond the recomputed ops, measured (see ``_overheads``)
    checkpoint_overhead_s: float = 0.0
    selective_overhead_s: float = 0.0
    forward_flops: int = 0  # the ops' FLOPs summed (FlopCounterMode over a forward without an op profile)
    selective_recompute_flops: int = 0  # FLOPs of the ops the save_matmuls policy recomputes
    dataflow: bool = False  # ``ops`` record what they read, save and leave (recompute may elide ops)

    @property
    def replayed(self) -> tuple[OpCost, ...] | None:
        """The ops a recompute that ends in this block runs (early stop); None without an op profile."""
        if self.replayed_ops is None or not self.ops:
            return None
        return self.ops[:self.replayed_ops]

    def _replayed_sum(self, measure: str, whole: float, skip_matmuls: bool) -> float:
        """``measure`` ("seconds" or "flops") summed over the replayed ops; ``whole`` without an op profile."""
        replayed = self.replayed
        if replayed is None:
            return whole
        return sum(getattr(o, measure) for o in replayed if not (skip_matmuls and o.kept_by_save_matmuls))

    @property
    def replay_s(self) -> float:
        """Forward seconds a recompute that ends in this block spends in it."""
        return self._replayed_sum("seconds", self.forward_s, skip_matmuls=False)

    @property
    def selective_replay_s(self) -> float:
        """The same for a ``save_matmuls`` segment: the replayed ops that are not matmuls."""
        return self._replayed_sum("seconds", self.selective_recompute_s, skip_matmuls=True)

    @property
    def replay_flops(self) -> int:
        """FLOPs a recompute that ends in this block spends in it."""
        return self._replayed_sum("flops", self.forward_flops, skip_matmuls=False)

    @property
    def selective_replay_flops(self) -> int:
        """FLOPs of a ``save_matmuls`` segment's last block: the replayed ops that are not matmuls."""
        return self._replayed_sum("flops", self.selective_recompute_flops, skip_matmuls=True)

    @property
    def kept_bytes(self) -> int:
        """What the block keeps when not checkpointed, not counting a neighbour's share."""
        return self.saved_bytes + self.input_bytes * self.saves_input + self.input_bytes * self.saves_output


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
        inputs = frozenset(_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        fresh = {_ptr(t): t.untyped_storage().nbytes() for t in outs if _ptr(t) not in inputs and _ptr(t) != 0}
        random = torch.Tag.nondeterministic_seeded in func.tags
        mutates = func._schema.is_mutable
        ok = bool(outs) and len(fresh) == len({_ptr(t) for t in outs}) and not random
        alias = bool(outs) and not fresh and not mutates
        flops = op_flops(func, args, kwargs, out)
        self.ops.append(_Recorded(str(func), dt, sum(fresh.values()), [(t, t._version) for t in outs], ok, flops,
                                  inputs, tuple(_ptr(t) for t in outs), random, alias, mutates,
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


def _profile_ops(run: "_BlockRun", forward_s: float,
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


def _record_dataflow(run: "_BlockRun", names: list[str]) -> list[dict] | None:
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
        saved.add(_ptr(t))
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
    return _dataflow(recorder.ops, saved, {_ptr(t) for t in outs})


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


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _signature(module: nn.Module) -> tuple:
    return (type(module).__qualname__, module.training,
            tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in module.named_parameters()))


class _BlockRun:
    """One block called standalone with the recorded side inputs and a fresh hidden tensor."""

    def __init__(self, module: nn.Module, info: BlockInfo, call_args: tuple, call_kwargs: dict):
        self.forward = module.forward  # find_chains rejects blocks revify already converted
        self.module = module
        self.slot = info.call.hidden_slot
        self.args, self.kwargs = call_args, call_kwargs
        hidden = get_slot(call_args, call_kwargs, self.slot)
        self.shape, self.dtype, self.device = hidden.shape, hidden.dtype, hidden.device
        self.side_ptrs = {_ptr(t) for t in tree_flatten((call_args, call_kwargs))[0]
                          if isinstance(t, torch.Tensor) and t is not hidden}
        self.persistent = {_ptr(t) for t in list(module.parameters()) + list(module.buffers())}

    def hidden(self) -> torch.Tensor:
        x = torch.randn(self.shape, dtype=self.dtype, device=self.device)
        return x.requires_grad_(self.dtype.is_floating_point)

    def __call__(self, x: torch.Tensor, forward=None) -> torch.Tensor:
        out, _ = fed_tensor(self.raw(x, forward))
        return out

    def raw(self, x: torch.Tensor, forward=None, args: tuple | None = None, kwargs: dict | None = None) -> Any:
        """The block's whole output (tuples of HF layers included); ``args``/``kwargs`` replace the side inputs."""
        a, k = set_slot(self.args if args is None else args, self.kwargs if kwargs is None else kwargs, self.slot, x)
        return (forward or self.forward)(*a, **k)


def _grad_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def profile_block(module: nn.Module, info: BlockInfo, call_args: tuple, call_kwargs: dict,
                  repeats: int = 3) -> BlockCost:
    """Run ``module`` standalone and measure its costs (buffers and RNG are restored)."""
    run = _BlockRun(module, info, call_args, call_kwargs)
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    grads = {p: p.grad for p in module.parameters()}
    try:
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            cost = _measure(run, repeats)
    finally:
        with torch.no_grad():
            for n, b in module.named_buffers():
                b.copy_(buffers[n])
        for p, g in grads.items():
            p.grad = g
    return cost


def _measure(run: _BlockRun, repeats: int) -> BlockCost:
    # saved storages, classified
    x = run.hidden()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        saved.setdefault(st.data_ptr(), st.nbytes())
        return t

    tracker = LiveStorageTracker()
    with tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = run(x)
        retained = tracker.live_bytes
        forward_peak = tracker.peak_bytes
        grad_out = torch.randn_like(out)
        tracker.peak_bytes = tracker.live_bytes
        start = tracker.live_bytes
        if out.requires_grad:
            out.backward(grad_out)
        backward_peak = tracker.peak_bytes - start
    x_ptr, out_ptr = _ptr(x), _ptr(out)
    interior = sum(n for p, n in saved.items()
                   if p not in (x_ptr, out_ptr) and p not in run.side_ptrs and p not in run.persistent)
    input_bytes = x.untyped_storage().nbytes()
    del out, grad_out

    # what save_matmuls keeps: everything alive after a selective forward, minus input and output
    x = run.hidden()
    tracker = LiveStorageTracker()
    with tracker:
        out = _checkpoint(lambda h: run(h), "save_matmuls", x)
        selective_retained = tracker.live_bytes - out.untyped_storage().nbytes()
    del out
    run.module.zero_grad(set_to_none=True)

    times = []
    for _ in range(repeats + 1):  # the first call warms caches up
        x = run.hidden()
        _sync(run.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            run(x)
        _sync(run.device)
        times.append(time.perf_counter() - t0)
    forward_s = statistics.median(times[1:])
    ops, replayed, dataflow = _profile_ops(run, forward_s, repeats)
    if ops:  # the same count as the ops' own, so a block's parts add up to its whole
        forward_flops = sum(o.flops for o in ops)
    else:
        counter = flop_counter()
        with torch.no_grad(), counter:
            run(run.hidden())
        forward_flops = counter.get_total_flops()
    selective_s = sum(o.seconds for o in ops if not o.kept_by_save_matmuls) if ops else forward_s
    selective_flops = sum(o.flops for o in ops if not o.kept_by_save_matmuls) if ops else forward_flops
    cost = BlockCost(
        input_bytes=input_bytes, saved_bytes=interior, saves_input=x_ptr in saved, saves_output=out_ptr in saved,
        forward_transient=max(0, forward_peak - retained), backward_transient=max(0, backward_peak),
        grad_bytes=_grad_bytes(run.module), forward_s=forward_s,
        selective_saved_bytes=max(0, selective_retained), selective_recompute_s=selective_s,
        ops=ops, replayed_ops=replayed, forward_flops=forward_flops, selective_recompute_flops=selective_flops,
        dataflow=dataflow)
    ckpt_over, sac_over = _overheads(run, cost, repeats)
    return replace(cost, checkpoint_overhead_s=ckpt_over, selective_overhead_s=sac_over)


def _overheads(run: _BlockRun, cost: BlockCost, repeats: int) -> tuple[float, float]:
    """Eager time a checkpointed block costs beyond the ops it replays: (plain, selective) checkpoint.

    Measured, not modelled: a training step of the block alone, plain, under a
    recomputing checkpoint, and under selective checkpointing that keeps every
    op output it may keep, back to back; per mode the median over
    ``4 * (repeats + 1)`` rounds of its difference to the plain step beside it
    (pairs cancel the machine's drift; the differences are a few percent of a
    step, so they need more rounds than the forward time). The differences,
    less the replayed ops' time, are what the runtime adds:
    re-allocating the recomputed tensors, the checkpoint's hooks, and selective
    checkpointing's Python dispatch mode on every op (tens of microseconds
    each, which on CPU blocks of a few milliseconds is a large share).
    """
    from revify.runtime.checkpoint_policy import SaveListedOps

    kept = tuple(o for o in (cost.replayed or ()) if o.savable)
    keep_all = (tuple((o.index, o.name) for o in kept),)
    extra: dict[str, list[float]] = {"recompute": [], "selective": []}
    for _ in range(4 * (repeats + 1)):
        times = {}
        for mode in ("plain", "recompute", "selective"):
            x = run.hidden()
            _sync(run.device)
            t0 = time.perf_counter()
            if mode == "plain":
                out = run(x)
            else:
                policy = SaveListedOps(keep_all) if mode == "selective" else "recompute"
                out = _checkpoint(lambda h: run(h), policy, x)
            if out.requires_grad:
                out.backward(torch.ones_like(out))
            _sync(run.device)
            times[mode] = time.perf_counter() - t0
            del out
        for mode in extra:
            extra[mode].append(times[mode] - times["plain"])
    run.module.zero_grad(set_to_none=True)
    unsaved = cost.replay_s - sum(o.seconds for o in kept)
    return (max(0.0, statistics.median(extra["recompute"]) - cost.replay_s),
            max(0.0, statistics.median(extra["selective"]) - unsaved))


def _kind(call: CallRecord) -> tuple:
    return (call.module_type, call.hidden_in_shape, call.side_signature)


@dataclass(frozen=True)
class ChainProfile:
    chain: Chain
    blocks: tuple[BlockCost, ...]
    stem: StemCost | None = None  # the chain's stem, if it has one (``profile_stem``)


def profile_chains(model: nn.Module, chains: list[Chain] | tuple[Chain, ...], repeats: int = 3) -> list[ChainProfile]:
    """One ``BlockCost`` per block of every chain (identical blocks are measured once), and its stem's cost."""
    measured: dict[tuple, BlockCost] = {}
    profiles = []
    # record_calls keeps the arguments of the first call of each kind only: a chain whose blocks
    # are of the kind of another chain's (two towers of one block type) profiles with those
    recorded = {}
    for chain in chains:
        for b in chain.blocks:
            if b.call.example_kwargs is not None:
                recorded.setdefault(_kind(b.call), b.call)
    for chain in chains:
        costs = []
        for info in chain.blocks:
            # each block with the side inputs it receives (Gemma 2 alternates sliding and full
            # masks): the recorded arguments of the first call of its kind, measured once per kind
            first = info.call if info.call.example_kwargs is not None else recorded.get(_kind(info.call), info.call)
            if first.example_kwargs is None:  # its kind's first call is no chain's block: the chain's first one
                head = chain.blocks[0].call
                first = head if head.example_kwargs is not None else recorded.get(_kind(head), head)
            if first.example_kwargs is None:
                raise ValueError(f"no recorded arguments to profile {info.path} with")
            module = model.get_submodule(info.path)
            key = (_signature(module), info.call.hidden_in_shape, first.index)
            if key not in measured:
                args, kwargs = tuple(first.example_args or ()), dict(first.example_kwargs or {})
                measured[key] = profile_block(module, info, args, kwargs, repeats)
            costs.append(measured[key])
        stem = profile_stem(model, chain.stem, repeats) if chain.stem is not None else None
        profiles.append(ChainProfile(chain, tuple(costs), stem))
    return profiles
