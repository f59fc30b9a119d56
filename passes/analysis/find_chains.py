"""Pass 5: find chains of shape-preserving blocks — the spine of a model.

A chain is a run of sibling module calls inside one parent where each call
receives, as its hidden input, exactly the tensor the previous call returned
(object identity, from ``record_calls``). The other inputs may differ from
block to block: Gemma 2 alternates sliding-window and full attention masks
(``config.layer_types``), T5's first block computes the position bias the
later ones receive. ``Chain.side_groups`` numbers the distinct side inputs;
a checkpoint segment of several blocks stays within one group, since its
head runs the later blocks with its own side inputs. A module the parent
calls several times in a row (ALBERT's shared layer) is a block per call.
This works whether the parent was captured by fx or left eager, because it
reads the recorded dataflow, not the parent's source. Each block is then
captured on its own and analysed for residual structure and legality.

Before (calls recorded inside ``bert.encoder``)::

    layer.0(h0) → h1,  layer.1(h1) → h2,  ...,  layer.11(h11) → h12

After::

    Chain(parent="bert.encoder", blocks=[BlockInfo("bert.encoder.layer.0", ...), ...])

Candidates that are not chains are kept with their reasons (``Rejection``),
so ``inspect`` can say why a stage was left alone.
"""
from __future__ import annotations

from torch import nn

from revify.passes.capture.capture import BlockGraph, capture_block_graph
from revify.passes.analysis.check_legality import Legality, check_legality
from revify.passes.analysis.find_residual_blocks import ResidualSpine, residual_spine
from revify.passes.capture.record_calls import CallRecord, CallTrace
from revify.passes.analysis.call_tree import descendant_buffers
from revify.passes.analysis.chain_types import BlockInfo, Chain, ChainAnalysis, Rejection


def _linked(prev: CallRecord, cur: CallRecord) -> bool:
    return (prev.hidden_out_id is not None and cur.hidden_in_id == prev.hidden_out_id
            and cur.hidden_in_version == prev.hidden_out_version
            and cur.hidden_slot == prev.hidden_slot)


def _runs(children: list[CallRecord]) -> list[list[CallRecord]]:
    """Maximal runs of same-type sibling calls, each fed by the previous one."""
    runs: list[list[CallRecord]] = []
    for rec in children:
        if runs and runs[-1][-1].module_type == rec.module_type and _linked(runs[-1][-1], rec):
            runs[-1].append(rec)
        else:
            runs.append([rec])
    return [r for r in runs if len(r) >= 2]


def find_chains(model: nn.Module, trace: CallTrace) -> ChainAnalysis:
    chains: list[Chain] = []
    rejections: list[Rejection] = []
    graphs: dict[tuple, tuple[BlockGraph, ResidualSpine | None]] = {}
    covered: set[int] = set()  # calls inside an accepted block: their chains would nest

    for parent in [None] + trace.calls:
        pidx = parent.index if parent else None
        if pidx is not None and (pidx in covered or (parent.parent in covered)):
            covered.add(pidx)
            continue
        for run in _runs(trace.children(pidx)):
            blocks: list[BlockInfo] = []

            def flush() -> None:
                if len(blocks) >= 2:
                    chains.append(Chain(parent.path if parent else "", tuple(blocks)))
                    covered.update(b.call.index for b in blocks)
                elif blocks:
                    rejections.append(Rejection(blocks[0].path, "chain of length 1 after legality checks"))
                blocks.clear()

            for rec in run:
                key = (rec.module_type, rec.hidden_in_shape, rec.side_signature)
                if key not in graphs:
                    bg = capture_block_graph(model.get_submodule(rec.path), rec)
                    spine = residual_spine(bg.graph, bg.entry, bg.exit) if bg.graph is not None else None
                    graphs[key] = (bg, spine)
                bg, spine = graphs[key]
                buffers = descendant_buffers(trace, rec)
                calls = trace.call_counts.get(rec.path, 1)
                # a shared module whose every call is a block of this run: each call is checkpointed
                # on its own (one installed forward serves them all), so it may be called n times
                shared = calls > 1 and sum(r.path == rec.path for r in run) == calls
                legality = check_legality(rec, 1 if shared else calls, bg, spine, buffers)
                if shared:
                    legality = Legality(legality.ok, legality.reasons, legality.notes + (
                        f"shared module called {calls} times per forward: each call is a block",))
                installed = model.get_submodule(rec.path).__dict__.get("forward")
                if getattr(installed, "revify_installed", False):
                    legality = Legality(False, ("already converted by revify",) + legality.reasons, legality.notes)
                info = BlockInfo(rec.path, rec.module_type, rec, bg.engine,
                                 spine.describe() if spine else f"unknown ({bg.reason})",
                                 len(spine.sublayers) if spine else 0, legality, tuple(buffers))
                if legality.ok:
                    blocks.append(info)
                else:
                    rejections.append(Rejection(rec.path, "; ".join(legality.reasons)))
                    flush()
            flush()
    return ChainAnalysis(tuple(chains), tuple(rejections))
