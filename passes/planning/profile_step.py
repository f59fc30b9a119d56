"""Pass 9b: measure one training step phase by phase, around the chains.

The planner models the chains block by block (``profile_blocks``); what the
rest of the model costs (embeddings, head, loss, gradients of parameters
outside the chains) it takes from one measured step of a *reference*
conversion in which every chain block is checkpointed on its own. Markers
at the chains' boundaries split the step into phases; for each phase the
live bytes at its start and its peak are recorded.

Before::

    model, chains, example_inputs

After (one chain)::

    StepProfile(events=[Event("fwd_start", 0, live=…, peak=…), Event("fwd_end", 0, …),
                        Event("loss", None, …), Event("bwd_start", 0, …), Event("bwd_end", 0, …),
                        Event("end", None, …)])

``peak`` of an event is the highest live byte count since the previous
event: the peak of the phase that the event closes. Bytes are those of
storages created during the step (parameters and inputs are the baseline).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from revify.storage_tracking import AllocatorPeaks, LiveStorageTracker
from revify.training_step import default_loss_fn

from revify.passes.analysis.chain_types import Chain
from revify.passes.capture.record_calls import call_model
from revify.runtime.call_arguments import fed_tensor, get_slot


@dataclass(frozen=True)
class Event:
    kind: str  # fwd_start, fwd_end, loss, bwd_start, bwd_end, end
    chain: int | None
    live: int
    peak: int  # of the phase this event closes


@dataclass(frozen=True)
class StepProfile:
    events: tuple[Event, ...]

    def find(self, kind: str, chain: int | None = None) -> Event | None:
        return next((e for e in self.events if e.kind == kind and e.chain == chain), None)

    def phase_peak(self, closing: str, chain: int | None = None) -> int | None:
        event = self.find(closing, chain)
        return None if event is None else event.peak


class _Recorder:
    """Marks phases. On CUDA a phase's peak is also read from the caching allocator and the larger kept:
    kernels allocate scratch that is no op's output (``profile_blocks._allocator_excess``)."""

    def __init__(self, tracker: LiveStorageTracker, device: torch.device):
        self.tracker = tracker
        self.events: list[Event] = []
        self.allocator = AllocatorPeaks(device) if device.type == "cuda" else None

    def start(self) -> None:
        if self.allocator is not None:
            self.allocator.start()

    def mark(self, kind: str, chain: int | None) -> None:
        t = self.tracker
        peak = t.peak_bytes if self.allocator is None else max(t.peak_bytes, self.allocator.read()[1])
        self.events.append(Event(kind, chain, t.live_bytes, peak))
        t.peak_bytes = t.live_bytes  # the next phase's peak starts here


def profile_step(rmodel: nn.Module, chains: list[Chain], example_inputs: Any,
                 loss_fn: Callable[[Any], torch.Tensor] | None = None) -> StepProfile:
    """Run one forward+backward of ``rmodel`` with markers around each chain.

    ``chains`` name blocks by path, so they are looked up in ``rmodel`` (a
    conversion of the analysed model). Gradients, buffers and the RNG are
    restored afterwards.
    """
    loss_fn = loss_fn or default_loss_fn
    params = list(rmodel.parameters())
    grads = [p.grad for p in params]
    buffers = {n: b.detach().clone() for n, b in rmodel.named_buffers()}
    tracker = LiveStorageTracker()
    rec = _Recorder(tracker, params[0].device if params else torch.device("cpu"))
    handles = []
    for c, chain in enumerate(chains):
        first = rmodel.get_submodule(chain.blocks[0].path)
        last = rmodel.get_submodule(chain.blocks[-1].path)
        slot = chain.blocks[0].call.hidden_slot

        def pre(module, args, kwargs, c=c, slot=slot):
            rec.mark("fwd_start", c)
            x = get_slot(args, kwargs, slot)
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.register_hook(lambda g, c=c: rec.mark("bwd_end", c))

        def post(module, args, kwargs, output, c=c):
            rec.mark("fwd_end", c)
            out, _ = fed_tensor(output)
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda g, c=c: rec.mark("bwd_start", c))

        handles.append(first.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(last.register_forward_hook(post, with_kwargs=True))
    for p in params:
        p.grad = None
    rec.start()
    try:
        with torch.random.fork_rng(devices=[]), tracker:
            out = call_model(rmodel, example_inputs)
            loss = loss_fn(out)
            del out
            rec.mark("loss", None)
            if loss.requires_grad:
                loss.backward()
            del loss
            rec.mark("end", None)
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for n, b in rmodel.named_buffers():
                b.copy_(buffers[n])
    return StepProfile(tuple(rec.events))
