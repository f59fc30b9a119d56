"""Pass 3: find residual blocks ``y = x + f(x)`` by dominator analysis.

An ``add(u, v)`` is a residual connection when ``u`` dominates ``v`` in the
subgraph that depends on the block's hidden input: every path from the input
to ``v`` passes through ``u``, so ``v = f(u)`` and the region between them is
single-entry single-exit. Side inputs (masks, parameters) do not break this,
because dominance is computed only over hidden-dependent nodes. Variants
found by the same rule: ``x + s*f(x)`` (the scale is part of f), in-place
``x += f(x)`` (``iadd``/``add_``), post-norm ``LN(x + f(x))`` and
``relu(x + f(x))`` (unary tail after the add, kept in the sub-layer).

Before (a pre-LN transformer block)::

    x → ln1 → attn → add(x, ·) = h → ln2 → mlp → add(h, ·) = y

After::

    ResidualSpine(sublayers=[Sublayer(skip=x, add=add, exit=add),
                             Sublayer(skip=h, add=add_1, exit=add_1)],
                  complete=True)     # the sub-layers chain from x to y

``complete`` says whether the sub-layers cover the block from entry to exit:
the block as a whole is then residual. MEFT3 uses the individual sub-layers.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from revify.passes.capture.dataflow_graph import dataflow_graph, hidden_subgraph

_ADD_TARGETS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_,
                torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_INPLACE_TARGETS = {operator.iadd, torch.Tensor.add_, torch.ops.aten.add_.Tensor, "add_", "__iadd__"}
_CAT_TARGETS = {torch.cat, torch.concat, torch.ops.aten.cat.default}


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_TARGETS
    return node.op == "call_method" and node.target in ("add", "add_", "__add__", "__iadd__")


def _is_inplace(node: fx.Node) -> bool:
    return node.target in _INPLACE_TARGETS


@dataclass(frozen=True)
class Sublayer:
    skip: fx.Node
    branch: fx.Node
    add: fx.Node
    exit: fx.Node  # the add, or the last node of its unary tail (post-norm / activation)
    inplace: bool
    tail: tuple[str, ...] = ()
    cast_skip: bool = False  # the skip is a cast of a node that dominates the branch (Mamba: residual.to(float32))

    def describe(self) -> str:
        kind = "x += f(x)" if self.inplace else "x + f(x)"
        if self.cast_skip:
            kind = kind.replace("x +", "cast(x) +", 1)
        if self.tail:
            kind = f"{'→'.join(self.tail)}({kind})"
        return kind


@dataclass(frozen=True)
class ResidualSpine:
    sublayers: tuple[Sublayer, ...] = field(default_factory=tuple)
    complete: bool = False
    concat_shortcut: bool = False

    def describe(self) -> str:
        if self.concat_shortcut:
            return "concatenation shortcut cat(x, f(x))"
        if not self.sublayers:
            return "no residual connection"
        parts = ", ".join(s.describe() for s in self.sublayers)
        return f"{len(self.sublayers)} residual sub-layer(s): {parts}" + ("" if self.complete else " (partial)")


def _dominates(idom: dict, u: fx.Node, v: fx.Node) -> bool:
    while True:
        if v == u:
            return True
        parent = idom.get(v)
        if parent is None or parent == v:
            return False
        v = parent


def find_residual_sublayers(graph: fx.Graph, entry: fx.Node) -> list[Sublayer]:
    """Every residual add that depends on ``entry``, in graph order."""
    g = dataflow_graph(graph)
    h = hidden_subgraph(g, entry)
    idom = nx.immediate_dominators(h, entry)
    found = []
    for node in graph.nodes:
        if node not in h or not _is_add(node):
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and a in h]
        if len(operands) != 2 or operands[0] == operands[1]:
            continue
        u, v = operands
        cast = False
        if _dominates(idom, v, u):
            u, v = v, u
        elif not _dominates(idom, u, v):
            # the skip may be a dtype cast the branch does not read through: ``residual.to(float32)
            # + mixer(norm(x))`` is still x + f(x); look through the cast for the dominating node
            su, sv = _strip_identity(u), _strip_identity(v)
            if su is not u and su in h and _dominates(idom, su, v):
                cast = True
            elif sv is not v and sv in h and _dominates(idom, sv, u):
                u, v, cast = v, u, True
            else:
                continue
        found.append(_with_tail(h, Sublayer(u, v, node, node, _is_inplace(node), cast_skip=cast)))
    return found


def _with_tail(h: nx.DiGraph, sub: Sublayer) -> Sublayer:
    """Extend the exit over single-user ops that only read the sum (post-norm, relu)."""
    exit_, tail = sub.add, []
    while True:
        users = [u for u in h.successors(exit_)]
        if len(users) != 1 or users[0].op == "output":
            break
        user = users[0]
        if _is_add(user) or sum(1 for p in h.predecessors(user)) != 1:
            break
        tail.append(_op_name(user))
        exit_ = user
    return Sublayer(sub.skip, sub.branch, sub.add, exit_, sub.inplace, tuple(tail), sub.cast_skip)


def _op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return str(t) if node.op in ("call_module", "call_method") else getattr(t, "__name__", str(t))


_IDENTITY_OPS = {"to", "_to_copy", "contiguous", "clone", "alias", "type_as", "float", "detach_"}


def _strip_identity(node: fx.Node) -> fx.Node:
    """Look through dtype casts and copies: ``x.to(float32)`` is still ``x``."""
    while node.op in ("call_function", "call_method") and _op_name(node) in _IDENTITY_OPS \
            and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def residual_spine(graph: fx.Graph, entry: fx.Node, exit_: fx.Node | None) -> ResidualSpine:
    """Chain residual sub-layers from the block input to its output."""
    if exit_ is not None and exit_.op == "call_function" and exit_.target in _CAT_TARGETS:
        tensors = exit_.args[0] if exit_.args else []
        if isinstance(tensors, (list, tuple)) and entry in tensors:
            return ResidualSpine(concat_shortcut=True)
    subs = find_residual_sublayers(graph, entry)
    by_skip = {}
    for s in subs:
        by_skip.setdefault(_strip_identity(s.skip), s)
    spine, cur = [], entry
    while cur in by_skip:
        s = by_skip[cur]
        spine.append(s)
        cur = s.exit
        if cur.op == "call_function" and cur.target is operator.getitem:
            break
        # native_layer_norm returns a tuple: step through getitem 0
        users = list(cur.users)
        if len(users) == 1 and users[0].op == "call_function" and users[0].target is operator.getitem \
                and users[0].args[1] == 0:
            cur = users[0]
    return ResidualSpine(tuple(spine), complete=bool(spine) and cur == exit_)
