"""Pass 5b: find each chain's *stem*, the module call that produced its first input.

A checkpoint segment keeps its input for backward. For the first segment of
a chain that input is what the model computed before the chain (BERT's
embeddings: word + position + type, LayerNorm, dropout), and that stem keeps
its own saved tensors too (the LayerNorm input, the dropout mask). A whole-graph
compiler recomputes both from ``input_ids``; eager checkpointing can too, if
the stem is recomputed with the first segment instead of its output being
kept (``runtime/checkpoint_stem``). This pass finds which call that is and
whether it may be recomputed; ``profile_stem`` measures what it would free.

Before (calls recorded by ``record_calls``)::

    bert.embeddings(input_ids=ids) → h0,   encoder.layer.0(h0) → h1, …

After::

    Chain(parent="bert.encoder", blocks=(…), stem=StemInfo("bert.embeddings", "BertEmbeddings", call))

The stem is the outermost call whose output is, by identity and version, the
chain's first hidden input. It must run once per forward, before the chain,
neither inside nor around any chain's blocks (recomputing it must not rerun
a chain), leave buffers and its inputs unchanged
(recomputing it must not update anything twice), take no mutable objects,
carry no hooks, have recorded example arguments to be profiled with, and
feed one chain only.
Random ops are allowed: the runtime replays its RNG state.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

from torch import nn

from revify.passes.analysis.call_tree import ancestors, descendant_buffers, subtree
from revify.passes.analysis.chain_types import Chain, ChainAnalysis, StemInfo
from revify.passes.capture.record_calls import CallRecord, CallTrace
from revify.runtime.hooks import has_hooks




def _legal(model: nn.Module, trace: CallTrace, rec: CallRecord) -> bool:
    module = model.get_submodule(rec.path)
    return (trace.call_counts.get(rec.path, 1) == 1 and not rec.mutated_inputs
            and not descendant_buffers(trace, rec) and rec.example_kwargs is not None
            and not any(kind == "object" for _, kind, *_ in rec.side_signature)
            and not getattr(module.__dict__.get("forward"), "revify_installed", False)
            and not has_hooks(module, global_hooks=False))


def find_stem(model: nn.Module, trace: CallTrace, chain: Chain, blocked: set[int]) -> StemInfo | None:
    """The stem of ``chain``, or None; ``blocked``: calls inside chains (a stem neither is nor holds one)."""
    first = chain.blocks[0].call
    if first.hidden_in_id is None:
        return None
    before = ancestors(trace, first)
    for rec in trace.calls[:first.index]:  # parents come before their children: outermost first
        if (rec.hidden_out_id == first.hidden_in_id and rec.hidden_out_version == first.hidden_in_version
                and rec.index not in before and not subtree(trace, rec) & blocked and _legal(model, trace, rec)):
            return StemInfo(rec.path, rec.module_type, rec)
    return None


def find_stems(model: nn.Module, trace: CallTrace, analysis: ChainAnalysis) -> ChainAnalysis:
    """``analysis`` with each chain's ``stem`` set where one is found."""
    blocked: set[int] = set()
    for chain in analysis.chains:
        for b in chain.blocks:
            blocked |= subtree(trace, b.call)
    stems = [find_stem(model, trace, c, blocked) for c in analysis.chains]
    # a stem feeding two chains (two towers on one embedding) belongs to neither: each would count
    # freeing it, and it can be recomputed with one segment only
    counts = Counter(s.call.index for s in stems if s is not None)
    stems = [s if s is not None and counts[s.call.index] == 1 else None for s in stems]
    return replace(analysis, chains=tuple(replace(c, stem=s) for c, s in zip(analysis.chains, stems)))
