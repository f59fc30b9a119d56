"""Pass 1: capture graphs with torch.fx, degrading gracefully.

``torch.fx.symbolic_trace`` fails on current transformers models at the top
level. Capture therefore works top-down over the module tree: a module that
traces becomes a *captured region* (its whole subtree inlined into one fx
graph); a module that does not trace stays *eager* with the reason, and its
children are tried in turn. Nothing here raises on an untraceable model.

Before::

    BertForSequenceClassification          (opaque)

After::

    Region("", eager, "TraceError: Proxy object cannot be iterated")
    Region("bert.embeddings", fx)
    Region("bert.encoder", eager, ...)
    Region("bert.encoder.layer.0", export)     # torch.export as second engine
    ...

An fx region keeps its graph; analysis counts its residual adds (``count_residual_adds``).

``capture_block_graph`` captures a single block for the residual analysis,
with the arguments it was really called with (from ``record_calls``): fx
first, with ``None`` and constant arguments baked in, then ``torch.export``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from revify.messages import one_line
from revify.passes.capture.record_calls import CallRecord, CallTrace
from revify.runtime.call_arguments import get_slot, set_slot


@dataclass(frozen=True)
class Region:
    path: str
    module_type: str
    engine: str  # "fx", "export" or "eager"
    reason: str = ""
    residual_adds: int = 0  # residual sub-layers in its graph, counted by analysis (``count_residual_adds``)
    graph: fx.Graph | None = field(default=None, repr=False, compare=False)  # fx regions: what was traced


@dataclass
class BlockGraph:
    """A block's graph plus which of its nodes carry the hidden state in and out."""

    graph: fx.Graph | None
    engine: str  # "fx", "export" or "opaque"
    entry: fx.Node | None = None
    exit: fx.Node | None = None
    reason: str = ""


def _concrete_args(module: nn.Module, rec: CallRecord) -> dict[str, Any] | None:
    """Bake every non-tensor argument of the recorded call into the trace."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    args, kwargs = rec.example_args or (), rec.example_kwargs or {}
    concrete: dict[str, Any] = {}
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = args[i] if i < len(args) else kwargs.get(p.name, p.default)
        if value is inspect.Parameter.empty:
            continue
        if not isinstance(value, torch.Tensor):
            concrete[p.name] = value
    return concrete


def capture_regions(model: nn.Module, trace: CallTrace) -> list[Region]:
    """Top-down: the largest traceable subtrees become fx regions."""
    first_call = {}
    for rec in trace.calls:
        first_call.setdefault(rec.path, rec)
    regions: list[Region] = []

    def visit(path: str, module: nn.Module) -> None:
        rec = first_call.get(path)
        if rec is None:
            return  # never called on the example inputs
        try:
            gm = fx.symbolic_trace(module, concrete_args=_concrete_args(module, rec))
            regions.append(Region(path, type(module).__name__, "fx", graph=gm.graph))
            return
        except Exception as exc:  # fx raises many exception types on untraceable code
            regions.append(Region(path, type(module).__name__, "eager", one_line(exc)))
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    return regions


def _hidden_param_name(module: nn.Module, rec: CallRecord) -> str | None:
    kind, key = rec.hidden_slot
    if kind == "kw":
        return key
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return params[key].name if key < len(params) else None


def _first_output_leaf(graph: fx.Graph) -> fx.Node | None:
    out = next(n for n in graph.nodes if n.op == "output")
    value = out.args[0]
    while isinstance(value, (tuple, list)):
        if not value:
            return None
        value = value[0]
    if isinstance(value, dict):
        value = next(iter(value.values()), None)
    return value if isinstance(value, fx.Node) else None


class _TensorArgsOnly(nn.Module):
    """Calls a block with its recorded non-tensor arguments baked in.

    torch.export accepts only pytrees of tensors and constants; transformers
    blocks also receive cache objects. Baking them as constants is sound for
    analysis because the graph is never executed.
    """

    def __init__(self, block: nn.Module, rec: CallRecord):
        super().__init__()
        self.block = block
        self.args, self.kwargs = tuple(rec.example_args), dict(rec.example_kwargs or {})
        slots = [("arg", i) for i, a in enumerate(self.args) if isinstance(a, torch.Tensor)]
        slots += [("kw", k) for k, v in self.kwargs.items() if isinstance(v, torch.Tensor)]
        slots.remove(rec.hidden_slot)
        self.slots = [rec.hidden_slot] + slots
        self.tensors = [get_slot(self.args, self.kwargs, s) for s in self.slots]

    def forward(self, *tensors):
        args, kwargs = self.args, self.kwargs
        for slot, t in zip(self.slots, tensors):
            args, kwargs = set_slot(args, kwargs, slot, t)
        return self.block(*args, **kwargs)


def capture_block_graph(module: nn.Module, rec: CallRecord) -> BlockGraph:
    """Capture one block's graph for analysis; never raises."""
    if rec.example_args is None or rec.hidden_slot is None:
        return BlockGraph(None, "opaque", reason="no recorded call to capture from")
    name = _hidden_param_name(module, rec)
    reasons = []
    try:
        gm = fx.symbolic_trace(module, concrete_args=_concrete_args(module, rec))
        entry = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.target == name), None)
        if entry is not None:
            return BlockGraph(gm.graph, "fx", entry, _first_output_leaf(gm.graph))
        reasons.append("fx: hidden input not found among placeholders")
    except Exception as exc:
        reasons.append("fx: " + one_line(exc))
    try:
        wrapper = _TensorArgsOnly(module, rec)
        with torch.random.fork_rng(devices=[]):
            ep = torch.export.export(wrapper, tuple(wrapper.tensors), strict=False)
        user_inputs = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        # the wrapper takes the hidden state as its first argument
        entry = next((n for n in ep.graph.nodes if n.op == "placeholder" and user_inputs and n.name == user_inputs[0]), None)
        if entry is not None:
            return BlockGraph(ep.graph, "export", entry, _first_output_leaf(ep.graph))
        reasons.append("export: hidden input not found")
    except Exception as exc:
        reasons.append("export: " + one_line(exc))
    return BlockGraph(None, "opaque", reason="; ".join(reasons))
