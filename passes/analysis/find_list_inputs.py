"""Pass 5b: say why sibling blocks fed a list of tensors form no chain.

``find_chains`` links a block to the previous one through the tensor in its
hidden slot. A block that receives a list of tensors has no hidden slot, so
its siblings never form a run and nothing would explain why. The common case
is a DenseNet dense block: every layer receives the outputs of all earlier
layers and concatenates them (a concatenation shortcut, not a residual).

Before (calls recorded inside ``features.denseblock1``)::

    denselayer1([x0]) → x1,  denselayer2([x0, x1]) → x2,  denselayer3([x0, x1, x2]) → x3

After::

    [Rejection("features.denseblock1.denselayer1 … denselayer3",
               "concatenation shortcut (DenseNet-like): each block receives the list of all earlier "
               "blocks' outputs ...")]
"""
from __future__ import annotations

from revify.passes.analysis.chain_types import Rejection
from revify.passes.capture.record_calls import CallRecord, CallTrace


def _tensor_lists(rec: CallRecord) -> list[int]:
    """Lengths of the list/tuple arguments of ``rec`` that hold tensors."""
    return [len(parts) for _, kind, parts in rec.side_signature
            if kind == "tuple" and any(k == "tensor" for k, _ in parts)]


def find_list_inputs(trace: CallTrace) -> list[Rejection]:
    """One rejection per run of ≥ 2 same-type sibling calls whose only tensor input is a list."""
    rejections = []
    for parent in [None] + [c.index for c in trace.calls]:
        run: list[CallRecord] = []
        for rec in trace.children(parent) + [None]:
            fits = rec is not None and rec.hidden_slot is None and _tensor_lists(rec)
            if fits and run and rec.module_type == run[-1].module_type:
                run.append(rec)
                continue
            if len(run) >= 2:
                rejections.append(_reject(run))
            run = [rec] if fits else []
    return rejections


def _reject(run: list[CallRecord]) -> Rejection:
    where = f"{run[0].path} … {run[-1].path}"
    lengths = [max(_tensor_lists(r)) for r in run]
    if all(b > a for a, b in zip(lengths, lengths[1:])):
        return Rejection(where, "concatenation shortcut (DenseNet-like): each block receives the list of all "
                                "earlier blocks' outputs and concatenates them, so no block is fed the previous "
                                "one's output alone; there is no chain to checkpoint or make reversible")
    return Rejection(where, "list-of-tensors input: the blocks receive a list of tensors, not one hidden-state "
                            "tensor fed from the previous block; there is no chain to checkpoint or make reversible")
