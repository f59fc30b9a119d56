"""Pass 6c, part 2: cut a captured block graph after its first residual sub-layer into two halves.

The cut is the first residual sub-layer's output (``residual_spine``; with
three or more sub-layers, before the last one). Each half is a copy of the
nodes it needs, with the cut as the second half's input ``mid``. Random ops
and in-place state updates must run once each, in the block's order, so that
under the same RNG state ``second(first(x))`` draws exactly what ``block(x)``
draws; anything that would break that raises ``SplitError``.

Before::

    x → ln1 → attn → add(x, ·) = h → ln2 → mlp → add(h, ·) = y       (one graph)

After::

    first:  x → ln1 → attn → add = h           second:  mid → ln2 → mlp → add(mid, ·) = y
"""
from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from revify.passes.analysis.find_residual_blocks import Sublayer, _op_name, residual_spine
from revify.passes.rewrite.capture_block import Feed, SplitError, _Captured, _fetch


def _call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # fx call_module nodes become calls of a module passed in as an input, so
    # the halves own no submodules and always call the block's current ones
    return module(*args, **kwargs)


class _Half:
    """One executable half: a GraphModule and where each of its inputs comes from."""

    def __init__(self, gm: fx.GraphModule, feeds: list[Feed]):
        self.gm, self.feeds = gm, tuple(feeds)

    def __call__(self, block: nn.Module, leaves: list, bound: dict | None, mid: Tensor | None) -> Tensor:
        values = []
        for feed in self.feeds:
            kind = feed[0]
            if kind == "leaf":
                values.append(leaves[feed[1]])
            elif kind == "arg":
                values.append(bound[feed[1]])
            elif kind == "attr":
                values.append(_fetch(block, feed[1]))
            elif kind == "const":
                values.append(feed[1])
            else:
                values.append(mid)
        return self.gm(*values)


# --- which nodes are random or mutate state -----------------------------------------

_RANDOM_NAMES = ("dropout", "bernoulli", "rand", "normal", "multinomial", "rrelu", "uniform_", "exponential_",
                 "geometric_", "cauchy_", "log_normal_", "random_")
_VIEW_NAMES = {"view", "reshape", "transpose", "permute", "select", "slice", "expand", "unsqueeze", "squeeze",
               "as_strided", "alias", "t", "narrow", "detach", "getitem", "_unsafe_view", "unflatten", "flatten"}
_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul}
_SHAPE_CHANGING = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "squeeze", "unsqueeze",
                   "expand", "_unsafe_view", "select", "narrow", "getitem"}


def _target_module(node: fx.Node, block: nn.Module) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return block.get_submodule(node.target)
    except AttributeError:
        return None


def _is_random(node: fx.Node, block: nn.Module) -> bool:
    if node.op == "call_module":
        mod = _target_module(node, block)
        name = type(mod).__name__.lower() if mod is not None else ""
        return ("dropout" in name or "rrelu" in name) and mod.training
    if node.op not in ("call_function", "call_method"):
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        # sdpa is tagged too: its dropout_p draws random numbers in training
        if torch.Tag.nondeterministic_seeded not in node.target.tags:
            return False
    else:
        name = _op_name(node).lower()
        if not (any(r in name for r in _RANDOM_NAMES) or name == "scaled_dot_product_attention"):
            return False
    return not _dropout_is_off(node)


def _dropout_is_off(node: fx.Node) -> bool:
    """A dropout op with ``train=False`` or ``p=0`` (eval mode in export graphs) draws nothing."""
    if isinstance(node.target, torch._ops.OpOverload):
        names = [a.name for a in node.target._schema.arguments]
    elif node.op == "call_function":
        try:
            names = list(inspect.signature(node.target).parameters)
        except (TypeError, ValueError):
            return False
    else:
        return False
    values = dict(zip(names, node.args))
    values.update(node.kwargs)
    for flag in ("train", "training"):
        if values.get(flag) is False:
            return True
    return any(values.get(p) in (0, 0.0) and isinstance(values.get(p), (int, float)) for p in ("p", "dropout_p"))


def _is_mutating(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    if node.target in _INPLACE_OPERATORS:
        return True
    name = _op_name(node)
    if name.startswith("__i") and name.endswith("__"):  # __iadd__ and friends
        return True
    return name.endswith("_") and not name.startswith("_")


def _mutated_base(node: fx.Node) -> fx.Node | None:
    """The node whose storage ``node`` writes, looking through views."""
    target = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    while target is not None and target.op in ("call_function", "call_method") \
            and _op_name(target) in _VIEW_NAMES and target.args and isinstance(target.args[0], fx.Node):
        target = target.args[0]
    return target


# --- where to cut ---------------------------------------------------------------------

def _val(node: fx.Node) -> Any:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)) and val:
        val = val[0]  # native_layer_norm and friends: the tensor is element 0
    return val


def _keeps_hidden_layout(node: fx.Node, ref: Any, block: nn.Module) -> bool:
    """Whether ``node``'s value has the hidden input's shape and dtype."""
    val = _val(node)
    if isinstance(val, torch.Tensor) and isinstance(ref, torch.Tensor):
        return tuple(val.shape) == tuple(ref.shape) and val.dtype == ref.dtype
    # fx graphs carry no shapes: judge by the op
    mod = _target_module(node, block)
    if mod is not None:
        return not isinstance(mod, (nn.Flatten, nn.Unflatten))
    return _op_name(node) not in _SHAPE_CHANGING


def _cut_node(sub: Sublayer, entry: fx.Node, block: nn.Module) -> fx.Node:
    """The first sub-layer's output, where the second half takes over.

    Normally the sub-layer's exit (after a post-norm ``LN(x + f(x))``). A
    tail that reshapes (OPT flattens to ``(B·S, D)`` after the add) stays in
    the second half: MEFT3 adds adapters and streams of the hidden state's
    shape to the first half's output.
    """
    ref = _val(entry)
    if not _keeps_hidden_layout(sub.add, ref, block):
        shape = tuple(_val(sub.add).shape) if isinstance(_val(sub.add), torch.Tensor) else "?"
        hidden = tuple(ref.shape) if isinstance(ref, torch.Tensor) else "?"
        raise SplitError(f"first sub-layer's output has shape {shape}, the hidden input {hidden}")
    cut = node = sub.add
    while node is not sub.exit:
        node = next(iter(node.users))  # a tail is a chain of single-user ops
        if not _keeps_hidden_layout(node, ref, block):
            break
        cut = node
    users = list(cut.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target is operator.getitem \
            and users[0].args[1] == 0 and (isinstance(cut.meta.get("val"), (tuple, list)) or "val" not in cut.meta):
        cut = users[0]  # a tuple-returning op (native_layer_norm): cut after its element 0
    return cut


# --- splitting a captured graph -----------------------------------------------------

def _ancestors(starts: list[fx.Node], stop: fx.Node | None) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(starts)
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node is not stop:
            todo.extend(node.all_input_nodes)
    return seen


def _emit(cap: _Captured, order: list[fx.Node], keep: set[fx.Node], cut: fx.Node | None,
          out: fx.Node, block: nn.Module) -> _Half:
    """Copy ``keep`` (in graph order) into a new graph; ``cut`` becomes the input ``mid``."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    feeds: list[Feed] = []
    modules: dict[fx.Node, fx.Node] = {}
    if cut is not None:
        env[cut] = g.placeholder("mid")
        feeds.append(("mid",))
    # every input first: fx wants placeholders ahead of the computation
    for node in order:
        if node not in keep or node in env:
            continue
        if node.op == "placeholder":
            if node not in cap.feeds:
                raise SplitError(f"a sub-layer reads the specialised argument {node.name}")
            env[node] = g.placeholder(node.name)
            feeds.append(cap.feeds[node])
        elif node.op == "get_attr" and cap.live(node.target):
            env[node] = g.placeholder(node.name)
            feeds.append(("attr", node.target))
        elif node.op == "call_module":
            modules[node] = g.placeholder(f"{node.name}_module")
            feeds.append(("attr", node.target))
    for node in order:
        if node not in keep or node in env:
            continue
        if node.op == "call_module":
            args = fx.map_arg(node.args, env.__getitem__)
            kwargs = fx.map_arg(node.kwargs, env.__getitem__)
            env[node] = g.call_function(_call_module, (modules[node], *args), kwargs)
        else:
            env[node] = g.node_copy(node, env.__getitem__)
        # fake tensors in "val" would keep export's fake mode alive with every cached half
        env[node].meta = {k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")}
    g.output(env[out])
    g.lint()
    return _Half(fx.GraphModule(cap.root, g), feeds)


def _split(cap: _Captured, block: nn.Module) -> tuple[_Half, _Half]:
    spine = residual_spine(cap.graph, cap.entry, cap.exit)
    n = len(spine.sublayers)
    if n < 2:
        detail = ", ".join(s.describe() for s in spine.sublayers) if n else spine.describe()
        partial = "" if spine.complete or not n else ", not covering the whole block"
        raise SplitError(f"block has {n} residual sub-layer(s), MEFT3 needs 2 ({detail}{partial})")
    if not spine.complete:
        raise SplitError("the residual sub-layers do not chain from the block's input to its output "
                         f"({spine.describe()})")
    # more than two (a decoder's self-attention, cross-attention, MLP): the first half is every
    # attention sub-layer, the second the last sub-layer (the MLP)
    cut = _cut_node(spine.sublayers[-2], cap.entry, block)
    order = list(cap.graph.nodes)
    pos = {node: i for i, node in enumerate(order)}
    # what depends on the hidden input other than through the cut
    hidden = {cap.entry}
    for node in order:
        if node is not cut and any(a in hidden for a in node.all_input_nodes):
            hidden.add(node)

    first = _ancestors([cut], None)
    second = _ancestors([cap.exit], cut)
    # state updates and random draws nobody reads (num_batches_tracked += 1) must
    # still run: in the half that holds their place in the block's order
    for node in order:
        if node in first or node in second or node.op in ("placeholder", "output"):
            continue
        if _is_mutating(node) or _is_random(node, block):
            if pos[node] < pos[cut]:
                first |= _ancestors([node], None)
            else:
                second |= _ancestors([node], cut)

    bad = [n for n in second if n in hidden]
    if bad:
        # name a value computed upstream of the cut when there is one
        bad.sort(key=lambda n: (1 if n is cap.entry else 0 if n in first else 2, pos[n]))
        if bad[0] is cap.entry:
            reader = min((n for n in bad if cap.entry in n.all_input_nodes), key=pos.__getitem__)
            raise SplitError(f"second sub-layer reads the block's hidden input directly (in {reader.name}), "
                             "not only the first sub-layer's output")
        raise SplitError(f"second sub-layer reads hidden-dependent value {bad[0].name} computed before the cut")

    both = [n for n in order if n in first and n in second and n is not cut
            and n.op not in ("placeholder", "get_attr")]
    for node in both:
        if _is_random(node, block):
            raise SplitError(f"random op {node.name} is needed by both sub-layers and would draw twice")
        base = _mutated_base(node) if _is_mutating(node) else None
        if base is not None and base.op in ("placeholder", "get_attr"):
            raise SplitError(f"{node.name} updates {base.name} in place and is needed by both sub-layers")
    random_order = [n for n in order if _is_random(n, block) and (n in first or n in second)]
    split_order = [n for n in order if n in first and _is_random(n, block)] \
        + [n for n in order if n in second and n is not cut and _is_random(n, block)]
    if random_order != split_order:
        moved = next(b for a, b in zip(split_order, random_order) if a is not b)
        raise SplitError(f"random op {moved.name} would run in a different order than in the block, "
                         "so dropout would draw different numbers")
    return _emit(cap, order, first, None, cut, block), _emit(cap, order, second, cut, cap.exit, block)
