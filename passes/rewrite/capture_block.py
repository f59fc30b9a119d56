"""Pass 6c, part 1: capture a block's forward as one graph, knowing where each input comes from.

``split_sublayers`` cuts a block's graph in two and runs each half on later
calls, so every placeholder of the graph must be fed again at call time: from
the call's arguments, from the block's parameters and buffers (read live, so
replaced parameters are the ones used), or from a constant fixed at capture.
fx traces the class's forward with the non-tensor arguments baked in; where it
cannot (Python control flow on tensors, containers of tensors), torch.export
(non-strict) captures the forward as a function of the call's tensor leaves.

Before::

    block(x, attention_mask=m)                                  # a module call

After::

    _Captured(graph, engine="fx", entry=<x>, exit=<output 0>,
              feeds={<x>: ("arg", "x"), <attention_mask>: ("arg", "attention_mask")}, ...)
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from revify.passes.capture.capture import _first_output_leaf
from revify.runtime.rng import RngState


class SplitError(Exception):
    """A block cannot be split into its two residual sub-layers; the message says why."""


# Where a half-graph placeholder gets its value at call time:
#   ("leaf", i)   i-th pytree leaf of the call's (args, kwargs)   (torch.export inputs)
#   ("arg", name) the forward's argument ``name``                  (fx inputs)
#   ("attr", p)   attribute path ``p`` on the block, read live     (parameters, buffers, submodules)
#   ("const", v)  a value fixed at capture (lifted constants)
#   ("mid",)      the second half's input, the first half's output
Feed = tuple


def _fetch(block: nn.Module, path: str) -> Any:
    obj = block
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _has_attr(block: nn.Module, path: str) -> bool:
    try:
        _fetch(block, path)
        return True
    except AttributeError:
        return False


@dataclass
class _Captured:
    """A block's whole graph with the source of every placeholder."""

    graph: fx.Graph
    engine: str  # "fx" or "export"
    entry: fx.Node
    exit: fx.Node
    feeds: dict[fx.Node, Feed]
    root: nn.Module  # holds get_attr targets that are not on the block (fx constants, export subgraphs)
    live: Callable[[str], bool]  # whether a get_attr target is read from the block at call time


class _FlatCall(nn.Module):
    """The block's forward as a function of the call's tensor leaves only.

    Tensors nested in containers (Llama's ``position_embeddings=(cos, sin)``)
    become real inputs, which the executed halves need; non-tensor leaves
    (``None`` caches, flags) are baked in.
    """

    def __init__(self, block: nn.Module, forward: Callable, leaves: list, spec: Any):
        super().__init__()
        self.block = block  # registered, so export lifts its parameters and buffers
        self._forward = forward
        self._spec = spec
        self._tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, Tensor)]
        self._leaves = [None if isinstance(x, Tensor) else x for x in leaves]

    def forward(self, *tensors: Tensor) -> Any:
        leaves = list(self._leaves)
        for i, t in zip(self._tensor_pos, tensors):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self._spec)
        return self._forward(*args, **kwargs)


def _capture_fx(block: nn.Module, sig: inspect.Signature, args: tuple, kwargs: dict,
                slot: tuple[str, Any]) -> _Captured:
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    params = list(sig.parameters.values())
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise TypeError("forward takes *args or **kwargs")
    concrete = {}
    for name, value in bound.arguments.items():
        if isinstance(value, Tensor):
            continue
        if any(isinstance(x, Tensor) for x in tree_flatten(value)[0]):
            # fx would bake these tensors as constants; export takes them as inputs
            raise TypeError(f"argument {name} holds tensors in a container")
        concrete[name] = value
    before = RngState.capture_all()
    gm = fx.symbolic_trace(block, concrete_args=concrete)
    if not before.same_as(RngState.capture_all()):
        # a random op on no traced input (torch.rand(n)) ran at trace time and is
        # now a constant: every call would reuse one draw. export keeps it an op
        raise TypeError("tracing drew random numbers, which fx would bake in as constants")
    # specialised arguments get placeholders named ``name_1``… that only feed
    # fx's asserts; the halves never read them
    feeds = {n: ("arg", n.target) for n in gm.graph.nodes
             if n.op == "placeholder" and n.target in bound.arguments and n.target not in concrete}
    hidden_name = params[slot[1]].name if slot[0] == "arg" else slot[1]
    entry = next((ph for ph, f in feeds.items() if f[1] == hidden_name), None)
    exit_ = _first_output_leaf(gm.graph)
    if entry is None or exit_ is None:
        raise TypeError("hidden input or output not found in the traced graph")
    return _Captured(gm.graph, "fx", entry, exit_, feeds, gm, functools.partial(_has_attr, block))


def _capture_export(block: nn.Module, forward: Callable, leaves: list, spec: Any, hidden_leaf: int) -> _Captured:
    wrapper = _FlatCall(block, forward, leaves, spec)
    tensors = tuple(x.detach() for x in leaves if isinstance(x, Tensor))
    ep = torch.export.export(wrapper, tensors, strict=False)
    outputs = [s for s in ep.graph_signature.output_specs]
    if any(s.kind.name != "USER_OUTPUT" for s in outputs):
        kinds = sorted({s.kind.name for s in outputs if s.kind.name != "USER_OUTPUT"})
        raise SplitError(f"exported graph has {', '.join(kinds)} outputs that the halves cannot write back")
    feeds: dict[fx.Node, Feed] = {}
    by_name = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    user = 0
    for spec_ in ep.graph_signature.input_specs:
        node = by_name[spec_.arg.name]
        kind = spec_.kind.name
        if kind == "USER_INPUT":
            feeds[node] = ("leaf", wrapper._tensor_pos[user])
            user += 1
        elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR") and spec_.target.startswith("block.") \
                and _has_attr(block, spec_.target[len("block."):]):
            feeds[node] = ("attr", spec_.target[len("block."):])
        elif kind in ("CONSTANT_TENSOR", "CUSTOM_OBJ"):
            feeds[node] = ("const", ep.constants[spec_.target])
        else:
            raise SplitError(f"exported graph takes a {kind} input ({spec_.target})")
    entry = next((n for n, f in feeds.items() if f == ("leaf", hidden_leaf)), None)
    if entry is None:
        raise SplitError("the hidden state is not an input of the exported graph")
    out = next(n for n in ep.graph.nodes if n.op == "output")
    exit_ = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    if not isinstance(exit_, fx.Node):
        raise SplitError("the block's first output is not a tensor")
    return _Captured(ep.graph, "export", entry, exit_, feeds, ep.graph_module, lambda target: False)
