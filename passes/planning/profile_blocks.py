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

What each field means is in ``block_costs``; the op list (``ops``,
``replayed_ops``, ``dataflow``) comes from ``profile_ops``, and the block is
called standalone through ``block_run``. This module measures the block as
a whole: the storages autograd saves, classified; peaks of forward and
backward; the median forward time; what ``save_matmuls`` keeps; and the
eager overhead checkpointing adds beyond the ops it replays.

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

import torch
from torch import nn

from revify.storage_tracking import AllocatorPeaks, LiveStorageTracker
from revify.runtime.autocast_state import autocast_cache_off
from revify.runtime.checkpoint_call import _checkpoint
from revify.runtime.checkpoint_policy import SaveListedOps

from revify.passes.analysis.chain_types import BlockInfo, Chain
from revify.passes.capture.record_calls import CallRecord
from revify.passes.planning.block_costs import BlockCost
from revify.passes.planning.block_run import BlockRun, storage_ptr, sync
from revify.passes.planning.count_flops import flop_counter
from revify.passes.planning.profile_ops import profile_ops
from revify.passes.planning.profile_stem import StemCost, profile_stem

def _signature(module: nn.Module) -> tuple:
    return (type(module).__qualname__, module.training,
            tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in module.named_parameters()))


def _grad_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def profile_block(module: nn.Module, info: BlockInfo, call_args: tuple, call_kwargs: dict,
                  repeats: int = 3) -> BlockCost:
    """Run ``module`` standalone and measure its costs (buffers and RNG are restored)."""
    run = BlockRun(module, info, call_args, call_kwargs)
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


def _allocator_excess(run: BlockRun) -> tuple[int, int, int]:
    """On CUDA, what the caching allocator counts beyond the dispatch-level tracker, one block alone:
    (forward transient as the allocator counts it, backward scratch of the block kept, backward scratch
    of the block recomputed), the scratch being the allocator's backward peak less the tracker's in the
    same run.

    Kernels allocate scratch that is no op's output, which the tracker cannot see, and how much depends
    on how the block runs: on an H200 the MLP-ResNet block's backward peaked 8 MiB above the tracker's
    figure kept and 2 MiB recomputed; a BERT-large layer 128 MiB kept and none recomputed (bf16, the
    step's timeline in ``bench/peak_timeline.py``). The planner bounds ``max_memory_allocated`` there,
    so it adds each to the backward of the blocks that run that way.
    """
    allocator = AllocatorPeaks(run.device)
    forward_transient, excess = 0, {}
    for mode in ("keep", "recompute"):
        run.module.zero_grad(set_to_none=True)
        x = run.hidden()
        tracker = LiveStorageTracker()
        allocator.start()
        with tracker:
            out = run(x) if mode == "keep" else _checkpoint(lambda h: run(h), "recompute", x)
            retained, peak = allocator.read()
            if mode == "keep":
                forward_transient = peak - retained
            grad_out = torch.randn_like(out)
            allocator.start()  # the backward's peak above what is allocated when it starts
            tracker.peak_bytes = tracked = tracker.live_bytes
            if out.requires_grad:
                out.backward(grad_out)
            allocated = allocator.read()[1]
            excess[mode] = max(0, allocated - (tracker.peak_bytes - tracked))
        del out, grad_out
    run.module.zero_grad(set_to_none=True)
    return max(0, forward_transient), excess["keep"], excess["recompute"]


def _measure(run: BlockRun, repeats: int) -> BlockCost:
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
    x_ptr, out_ptr = storage_ptr(x), storage_ptr(out)
    forward_transient = max(0, forward_peak - retained)
    backward_transient, recompute_backward_transient = max(0, backward_peak), None
    if run.device.type == "cuda":
        allocator_forward, kept_scratch, recompute_scratch = _allocator_excess(run)
        forward_transient = max(forward_transient, allocator_forward)
        backward_transient, recompute_backward_transient = (backward_transient + kept_scratch,
                                                            backward_transient + recompute_scratch)
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
        sync(run.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            run(x)
        sync(run.device)
        times.append(time.perf_counter() - t0)
    forward_s = statistics.median(times[1:])
    ops, replayed, dataflow = profile_ops(run, forward_s, repeats)
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
        forward_transient=forward_transient, backward_transient=backward_transient,
        recompute_backward_transient=recompute_backward_transient,
        grad_bytes=_grad_bytes(run.module), forward_s=forward_s,
        selective_saved_bytes=max(0, selective_retained), selective_recompute_s=selective_s,
        ops=ops, replayed_ops=replayed, forward_flops=forward_flops, selective_recompute_flops=selective_flops,
        dataflow=dataflow)
    ckpt_over, sac_over = _overheads(run, cost, repeats)
    return replace(cost, checkpoint_overhead_s=ckpt_over, selective_overhead_s=sac_over)


def _overheads(run: BlockRun, cost: BlockCost, repeats: int) -> tuple[float, float]:
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
    kept = tuple(o for o in (cost.replayed or ()) if o.savable)
    keep_all = (tuple((o.index, o.name) for o in kept),)
    extra: dict[str, list[float]] = {"recompute": [], "selective": []}
    for _ in range(4 * (repeats + 1)):
        times = {}
        for mode in ("plain", "recompute", "selective"):
            x = run.hidden()
            sync(run.device)
            t0 = time.perf_counter()
            if mode == "plain":
                out = run(x)
            else:
                policy = SaveListedOps(keep_all) if mode == "selective" else "recompute"
                out = _checkpoint(lambda h: run(h), policy, x)
            if out.requires_grad:
                out.backward(torch.ones_like(out))
            sync(run.device)
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
    """One ``BlockCost`` per block of every chain (identical blocks are measured once), and its stem's cost.

    Profiled with autocast's weight-cast cache off, as checkpointed calls run (``autocast_cache_off``): op
    indices in the plan then count the same casts as the runtime's.
    """
    with autocast_cache_off():
        return _profile_chains(model, chains, repeats)


def _profile_chains(model: nn.Module, chains: list[Chain] | tuple[Chain, ...], repeats: int) -> list[ChainProfile]:
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
