"""Pass 7c: split a block into its two residual sub-layers, as executable graphs (MEFT3).

MEFT3 couples a block's attention sub-layer (F) with its MLP sub-layer (G),
so each must be callable on its own. The block is captured with
``torch.export`` (every tensor leaf of its arguments, including tuples such as
Llama's ``(cos, sin)``, is a graph input; cache objects and flags are baked),
the residual analysis finds the first sub-layer's exit, and the graph is cut
there into two graphs. Parameters stay lifted inputs and are fed from the
block at every call, so autograd differentiates the block's own parameters.

Before::

    x → ln1 → attn → add(x, ·) = h → ln2 → mlp → add(h, ·) = y

After::

    first:  (x, side inputs)  → h          second: (h, side inputs) → y

The cut is clean only if everything after it depends on the hidden input
through ``h`` alone; computations on side inputs only (mask preparation) are
repeated in both halves. ``torch.export`` specialises on shapes, so halves are
captured again for every new input signature (cached per signature).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .dataflow_graph import dataflow_graph, hidden_subgraph
from .find_residual_blocks import residual_spine
from revify.runtime.checkpoint_segment import original_forward

from .record_calls import get_slot, set_slot


class SplitError(Exception):
    """The block cannot be cut into two residual sub-layers; the message says why."""


class _FlatCall(nn.Module):
    """The block as a function of its flat tensor leaves, hidden state first."""

    def __init__(self, block: nn.Module, forward: Any, leaves: list, spec: Any, tensor_pos: list[int], slot):
        super().__init__()
        self.block, self.leaves, self.spec, self.tensor_pos, self.slot = block, leaves, spec, tensor_pos, slot
        self.block_forward = forward  # the original forward: the block's own may be revify's by now

    def forward(self, hidden, *tensors):
        leaves = list(self.leaves)
        for j, t in zip(self.tensor_pos, tensors):
            leaves[j] = t
        args, kwargs = tree_unflatten(leaves, self.spec)
        args, kwargs = set_slot(args, kwargs, self.slot, hidden)
        return self.block_forward(*args, **kwargs)


def _ancestors(node: fx.Node, stop: fx.Node | None = None) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is stop:
            continue
        todo.extend(n.all_input_nodes)
    return seen


def _subgraph(graph: fx.Graph, keep: set[fx.Node], output: fx.Node, replace: fx.Node | None) -> fx.Graph:
    """Copy ``keep`` in graph order; every placeholder is kept so calls stay uniform."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n.op == "placeholder":
            env[n] = new.placeholder(n.name)
    if replace is not None:
        mid = new.placeholder("revify_mid")
    for n in graph.nodes:
        if n.op in ("placeholder", "output") or n not in keep:
            continue
        if replace is not None and n is replace:
            env[n] = mid
            continue
        env[n] = new.node_copy(n, lambda a: env[a])
    new.output(env[output])
    return new


class _Captured:
    """Both halves for one input signature."""

    def __init__(self, block: nn.Module, forward: Any, hidden: torch.Tensor, leaves: list, spec: Any, slot):
        tensor_pos = [j for j, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        wrapper = _FlatCall(block, forward, leaves, spec, tensor_pos, slot)
        with torch.random.fork_rng(devices=[]):
            try:
                ep = torch.export.export(wrapper, (hidden, *[leaves[j] for j in tensor_pos]), strict=False)
            except Exception as exc:
                raise SplitError(f"torch.export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
        graph = ep.graph
        self.specs = list(ep.graph_signature.input_specs)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        user = [p for p, s in zip(placeholders, self.specs) if s.kind.name == "USER_INPUT"]
        entry = user[0]
        out_node = next(n for n in graph.nodes if n.op == "output")
        result = out_node.args[0]
        while isinstance(result, (tuple, list)):
            result = result[0]
        spine = residual_spine(graph, entry, result)
        if len(spine.sublayers) != 2 or not spine.complete:
            raise SplitError(f"block has {spine.describe()}; meft3 needs exactly two residual sub-layers "
                             "that chain from input to output")
        cut = spine.sublayers[0].exit
        users = list(cut.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target is operator.getitem:
            cut = users[0]  # native_layer_norm returns (out, mean, rstd)
        dataflow = dataflow_graph(graph)
        hidden_dep = set(hidden_subgraph(dataflow, entry).nodes)
        after_cut = set(hidden_subgraph(dataflow, cut).nodes)
        second = _ancestors(result, stop=cut)
        for n in second:
            if n in hidden_dep and n not in after_cut and n is not cut:
                raise SplitError(f"the second sub-layer reads {n.name}, computed from the hidden state "
                                 "before the cut")
        self.first = fx.GraphModule(nn.Module(), _subgraph(graph, _ancestors(cut), cut, None))
        self.second = fx.GraphModule(nn.Module(), _subgraph(graph, second, result, cut))
        self.constants = ep.constants
        self.tensor_pos = tensor_pos

    def inputs(self, block: nn.Module, hidden: torch.Tensor, leaves: list) -> list:
        user = [hidden] + [leaves[j] for j in self.tensor_pos]
        values, k = [], 0
        for s in self.specs:
            kind = s.kind.name
            if kind == "USER_INPUT":
                values.append(user[k])
                k += 1
            elif kind == "PARAMETER":
                values.append(block.get_parameter(s.target.removeprefix("block.")))
            elif kind == "BUFFER":
                values.append(block.get_buffer(s.target.removeprefix("block.")))
            else:
                values.append(self.constants[s.target])
        return values


class BlockHalves:
    """``first(x, args, kwargs)`` and ``second(h, args, kwargs)`` of one block."""

    def __init__(self, block: nn.Module, slot: tuple[str, Any]):
        self.block, self.slot = block, slot
        self.forward = original_forward(block)
        self._cache: dict[tuple, _Captured] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}}  # graphs are re-captured after unpickling

    def _get(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple[_Captured, list]:
        a, k = set_slot(args, kwargs, self.slot, None)
        leaves, spec = tree_flatten((a, k))
        key = (tuple(hidden.shape), hidden.dtype, hidden.device, self.block.training, str(spec),
               tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else repr(t)
                     for t in leaves))
        if key not in self._cache:
            self._cache[key] = _Captured(self.block, self.forward, hidden.detach(), leaves, spec, self.slot)
        return self._cache[key], leaves

    def first(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        cap, leaves = self._get(x, args, kwargs)
        return cap.first(*cap.inputs(self.block, x, leaves))

    def second(self, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        cap, leaves = self._get(h, args, kwargs)
        return cap.second(*cap.inputs(self.block, h, leaves), h)


def split_block(block: nn.Module, args: tuple, kwargs: dict, hidden_slot: tuple[str, Any]) -> BlockHalves:
    """Split ``block`` at its first residual sub-layer; raises ``SplitError`` with the reason."""
    halves = BlockHalves(block, hidden_slot)
    hidden = get_slot(args, kwargs, hidden_slot)
    # capture and run once now: a block that cannot be split fails at conversion, not in training
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        mid = halves.first(hidden, args, kwargs)
        out = halves.second(mid, args, kwargs) if mid.shape == hidden.shape else mid
    if mid.shape != hidden.shape or out.shape != hidden.shape:
        raise SplitError(f"the sub-layers do not map the hidden shape {tuple(hidden.shape)} to itself "
                         f"(first gives {tuple(mid.shape)}, second {tuple(out.shape)}): the block reshapes "
                         "its hidden state between them")
    return halves
