"""Pass 6c: split a block at its first residual sub-layer, for MEFT3.

MEFT3 couples a block's two residual sub-layers as F and G, so it needs to
call them separately. This pass captures the block (fx, else torch.export),
finds its residual sub-layers with ``residual_spine`` and cuts the graph
after the first one's output (with three or more, as in a decoder block with
cross-attention, before the last one: the first half holds every attention
sub-layer, the second the MLP). Both halves are executable graphs that read
the block's parameters and buffers at call time, so autograd reaches the
block's own parameters and replaced parameters (``to_empty``, sharding) are
the ones used.

Before (a pre-LN block, or post-LN BERT with ``LN`` around each add)::

    x → ln1 → attn → add(x, ·) = h → ln2 → mlp → add(h, ·) = y

After::

    halves = split_block(block, args, kwargs, hidden_slot=("arg", 0))
    halves.first(x, args, kwargs)     # h = x + attn(ln1(x))
    halves.second(h, args, kwargs)    # y = h + mlp(ln2(h)), so second(first(x)) == block(x)

Side-input computations that do not depend on the hidden state (mask
processing) are duplicated into both halves. Everything else must be cut
cleanly: the second half may depend on the hidden input only through the
cut, and random ops (dropout) must run once each, in the block's order, so
that under the same RNG state ``second(first(x))`` draws exactly what
``block(x)`` draws. Otherwise ``split_block`` raises ``SplitError``.

torch.export specialises on shapes, constants and train/eval mode, so the
halves are captured per call signature and cached on the ``BlockHalves``.
"""
from __future__ import annotations

import functools
import inspect
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from revify.passes.capture.capture import _first_output_leaf
from revify.passes.analysis.find_residual_blocks import Sublayer, _op_name, residual_spine
from revify.passes.capture.record_calls import get_slot, set_slot


class SplitError(Exception):
    """A block cannot be split into its two residual sub-layers; the message says why."""


# Where a half-graph placeholder gets its value at call time:
#   ("leaf", i)   i-th pytree leaf of the call's (args, kwargs)   (torch.export inputs)
#   ("arg", name) the forward's argument ``name``                  (fx inputs)
#   ("attr", p)   attribute path ``p`` on the block, read live     (parameters, buffers, submodules)
#   ("const", v)  a value fixed at capture (lifted constants)
#   ("mid",)      the second half's input, the first half's output
Feed = tuple


def _call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # fx call_module nodes become calls of a module passed in as an input, so
    # the halves own no submodules and always call the block's current ones
    return module(*args, **kwargs)


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


# --- capture --------------------------------------------------------------------------

def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


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


def _rng_states() -> list[Tensor]:
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += torch.cuda.get_rng_state_all()
    return states


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
    before = _rng_states()
    gm = fx.symbolic_trace(block, concrete_args=concrete)
    if not all(torch.equal(a, b) for a, b in zip(before, _rng_states())):
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


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))  # the cache entry keeps the object alive, so the id stays unique
    return (type(value), value)


@dataclass
class _Entry:
    first: _Half
    second: _Half
    engine: str
    keep_alive: tuple  # non-tensor leaves keyed by id


class BlockHalves:
    """A block's two residual sub-layers as separately callable functions.

    ``second(first(x, args, kwargs), args, kwargs)`` equals the block's hidden
    output. ``args``/``kwargs`` are a call's arguments; whatever is in the
    hidden slot is ignored. Halves are captured per call signature (shapes,
    dtypes, devices, constant arguments, train/eval mode of every submodule)
    and cached here.
    """

    def __init__(self, block: nn.Module, hidden_slot: tuple[str, Any], forward: Callable | None = None):
        self.block = block
        self.hidden_slot = hidden_slot
        installed = block.__dict__.get("forward")
        self._class_forward = installed is None or getattr(installed, "revify_installed", False)
        # a partial of the class function, not block.forward: revify later installs
        # its own forward on the block, and re-capture must see the original
        self._forward = forward or (functools.partial(type(block).forward, block) if self._class_forward
                                    else installed)
        self._cache: dict[Any, _Entry] = {}

    @property
    def engine(self) -> str:
        """How the most recently captured halves were obtained: ``fx`` or ``export``."""
        return next(reversed(self._cache.values())).engine if self._cache else "none"

    def first(self, hidden: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """The block from its hidden input through the first residual sub-layer."""
        args, kwargs = set_slot(tuple(args), dict(kwargs), self.hidden_slot, hidden)
        entry, leaves, bound = self._lookup(args, kwargs)
        return entry.first(self.block, leaves, bound, None)

    def second(self, mid: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """The rest of the block, from the first sub-layer's output to the block's hidden output."""
        # the cut has the hidden input's shape and dtype, so ``mid`` stands in for it
        # in the cache key and, if needed, as the example input to capture from
        args, kwargs = set_slot(tuple(args), dict(kwargs), self.hidden_slot, mid)
        entry, leaves, bound = self._lookup(args, kwargs)
        return entry.second(self.block, leaves, bound, mid)

    def _lookup(self, args: tuple, kwargs: dict) -> tuple[_Entry, list, dict | None]:
        leaves, spec = tree_flatten((args, kwargs))
        key = (spec, tuple(("t", tuple(x.shape), x.dtype, x.device) if isinstance(x, Tensor) else _hashable(x)
                           for x in leaves),
               tuple(m.training for m in self.block.modules()))
        entry = self._cache.get(key)
        if entry is None:
            entry = self._capture(args, kwargs, leaves, spec)
            self._cache[key] = entry
        bound = None
        if entry.engine == "fx":
            b = inspect.signature(self._forward).bind(*args, **kwargs)
            b.apply_defaults()
            bound = b.arguments
        return entry, leaves, bound

    def _capture(self, args: tuple, kwargs: dict, leaves: list, spec: Any) -> _Entry:
        if not isinstance(get_slot(args, kwargs, self.hidden_slot), Tensor):
            raise SplitError(f"no hidden tensor in slot {self.hidden_slot}")
        reasons = []
        keep = tuple(x for x in leaves if not isinstance(x, Tensor))
        # capture runs no real computation, but export may still touch the global
        # generator; enable_grad: one graph serves calls with and without grad
        fx_refusal: SplitError | None = None
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            if self._class_forward:  # fx traces the class's forward, not an instance override
                try:
                    cap = _capture_fx(self.block, inspect.signature(self._forward), args, kwargs, self.hidden_slot)
                    return _Entry(*_split(cap, self.block), "fx", keep)
                except SplitError as exc:
                    # fx records x.shape / x.dtype as values computed from x, which can hide
                    # a clean cut; export bakes them as constants, so it gets the last word
                    fx_refusal = exc
                except Exception as exc:  # fx raises many exception types on untraceable code
                    reasons.append("fx: " + _one_line(exc))
            idx_args, idx_kwargs = tree_unflatten(list(range(len(leaves))), spec)
            hidden_leaf = get_slot(idx_args, idx_kwargs, self.hidden_slot)
            try:
                cap = _capture_export(self.block, self._forward, leaves, spec, hidden_leaf)
            except SplitError:
                raise
            except Exception as exc:
                if fx_refusal is not None:
                    raise fx_refusal from exc
                reasons.append("export: " + _one_line(exc))
                raise SplitError("cannot capture the block: " + "; ".join(reasons)) from exc
            return _Entry(*_split(cap, self.block), "export", keep)

    def __getstate__(self) -> dict:
        # captured graphs hold fake tensors and references into export's module;
        # a copy re-captures on its first call instead
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state


def split_block(block: nn.Module, args: tuple, kwargs: dict, hidden_slot: tuple[str, Any]) -> BlockHalves:
    """Capture ``block(*args, **kwargs)`` and split it after its first residual sub-layer.

    The hidden state is at ``hidden_slot`` (see ``record_calls.get_slot``).
    Raises ``SplitError`` with a one-line reason if the block cannot be split.
    """
    halves = BlockHalves(block, hidden_slot)
    args, kwargs = tuple(args), dict(kwargs or {})
    halves._lookup(args, kwargs)  # capture and split now, so failures surface at conversion time
    return halves
