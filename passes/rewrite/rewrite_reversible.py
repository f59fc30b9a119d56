"""Pass 7b: emit the converted module for reversible plans.

Like the checkpoint rewrite, this never edits the user's module: it builds a
structural copy sharing every parameter and buffer, registers the adapters
as children of the blocks in the copy (so they appear in ``parameters()``,
``state_dict()``, optimizers and DDP), and installs a ``ReversibleChain`` as
the blocks' ``forward``.

Before::

    model.encoder.layer[0..11]                   plain blocks

After (``meft1``)::

    rmodel.encoder.layer[i].revify_adapter_f     Adapter(768 → 8 → 768), zero output
    rmodel.encoder.layer[i].revify_adapter_g     Adapter (not on the last block: its G output is dropped)
    rmodel.encoder.layer[0].forward  = InstalledHead(chain)   (runs all 12 couplings)
    rmodel.encoder.layer[1..11].forward = InstalledRelay(chain, k)

``freeze_backbone`` sets ``requires_grad=False`` on the chain blocks'
pretrained parameters. They are shared with the original model, so the
original sees the change too.
"""
from __future__ import annotations


import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from revify.runtime.adapter import Adapter
from revify.runtime.couplings import (AdapterCall, BlockCall, CouplingStep, FixedExtras, HalfCall, ResidualBranch,
                                      WithAdapter)
from revify.runtime.installed_forward import original_forward
from revify.runtime.reversible_chain import ReversibleChain
from revify.passes.capture.peft_parameters import peft_parameters

from revify.passes.analysis.chain_types import Rejection
from revify.passes.planning.plan_reversible import ReversiblePlan
from revify.passes.capture.record_calls import CallTrace
from revify.runtime.call_arguments import set_slot
from revify.passes.rewrite.rewrite_checkpoint import share_structure
from revify.passes.rewrite.split_sublayers import SplitError, split_block

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve(rmodel: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    owner, _, name = qualified.rpartition(".")
    return rmodel.get_submodule(owner), name


def _adapter(block: nn.Module, name: str, dim: int, plan: ReversiblePlan) -> Adapter:
    ref = next(iter(block.parameters()), None)
    adapter = Adapter(dim, plan.options.adapter_rank, plan.options.adapter_init,
                      dtype=ref.dtype if ref is not None else None, device=ref.device if ref is not None else None)
    block.add_module(name, adapter)
    return adapter


class RewriteRefusal(Exception):
    """A chain the rewrite cannot make reversible; the message names the construct."""


def _meft3_extras(forward, call) -> tuple | None:
    """What the block returns beside its hidden state, from a run on its recorded arguments.

    MEFT3 runs a block as two sub-layer halves that produce only the hidden
    state, so it keeps a tuple output only when every extra is None or a side
    input handed back (T5's position bias): the template of ``FixedExtras``.
    """
    if call.example_args is None:
        return None
    args, kwargs = tuple(call.example_args), dict(call.example_kwargs or {})
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        out = forward(*args, **kwargs)
    if isinstance(out, torch.Tensor):
        return None
    side = tree_flatten(set_slot(args, kwargs, call.hidden_slot, None))[0]
    extras = tuple(out[1:]) if isinstance(out, tuple) else ()
    template = tuple(None if e is None else next((j for j, t in enumerate(side) if t is e), -1) for e in extras)
    if -1 in template:
        kinds = ", ".join(type(e).__name__ if not isinstance(e, torch.Tensor) else f"tensor {tuple(e.shape)}"
                          for e, j in zip(extras, template) if j == -1)
        raise RewriteRefusal(f"meft3 runs each block as two sub-layer halves, but {call.path} returns "
                             f"{kinds} beside its hidden state (attention weights or a side output) that "
                             "the halves do not produce; use meft1 or meft2")
    return template


def build_chain(rmodel: nn.Module, plan: ReversiblePlan) -> ReversibleChain:
    """Add adapters and build the coupling steps of one chain inside ``rmodel``.

    MEFT3 splits every block into its residual sub-layers; a block that cannot
    be split raises ``SplitError`` with the reason.
    """
    infos = plan.chain.blocks
    blocks = [rmodel.get_submodule(b.path) for b in infos]
    forwards = [original_forward(m) for m in blocks]
    slot = infos[0].call.hidden_slot
    calls = [BlockCall(fwd, slot, b.path) for fwd, b in zip(forwards, infos)]
    name = plan.coupling.name
    dim = (infos[0].call.hidden_in_shape or (0,))[-1]
    buffers = [tuple(_resolve(rmodel, n) for n in b.mutated_buffers) for b in infos]
    # the recorded call of each block's kind (record_calls keeps the first call with given side inputs):
    # Gemma 2's full-attention layers split on a full mask, its sliding ones on a sliding-window mask
    recorded = {}
    for b in infos:
        if b.call.example_args is not None:
            recorded.setdefault(b.call.side_signature, b.call)
    steps = []
    extras_by_kind: dict[tuple, FixedExtras] = {}  # meft3: what each kind of block hands back, and from where
    for idx in plan.steps:
        i = idx[0]
        block = blocks[i]
        step_buffers = tuple(x for j in idx for x in buffers[j])
        if name == "meft1" and idx == plan.steps[-1]:
            # the last G would write the stream the chain drops (the function rides on y1):
            # an adapter there never gets a gradient, which DDP would all-reduce as zeros
            af = _adapter(block, "revify_adapter_f", dim, plan)
            steps.append(CouplingStep(WithAdapter(calls[i], af), None, (block, af), (), idx, step_buffers, calls[i],
                                      (calls[i],)))
        elif name == "meft1":
            af, ag = _adapter(block, "revify_adapter_f", dim, plan), _adapter(block, "revify_adapter_g", dim, plan)
            steps.append(CouplingStep(WithAdapter(calls[i], af), AdapterCall(ag), (block, af), (ag,), idx,
                                      step_buffers, calls[i], (calls[i],)))
        elif name == "meft2":
            af, ag = _adapter(block, "revify_adapter_f", dim, plan), _adapter(block, "revify_adapter_g", dim, plan)
            steps.append(CouplingStep(AdapterCall(af), WithAdapter(calls[i], ag), (af,), (block, ag), idx,
                                      step_buffers, calls[i], (calls[i],)))
        elif name == "meft3":
            kind = infos[i].call.side_signature
            call = recorded.get(kind, infos[0].call)
            if kind not in extras_by_kind:  # positions among this kind's own side inputs
                extras_by_kind[kind] = FixedExtras(_meft3_extras(forwards[i], call))
            extras = extras_by_kind[kind]
            halves = split_block(block, tuple(call.example_args), dict(call.example_kwargs or {}), slot)
            af, ag = _adapter(block, "revify_adapter_f", dim, plan), _adapter(block, "revify_adapter_g", dim, plan)
            steps.append(CouplingStep(WithAdapter(HalfCall(halves, "first"), af),
                                      WithAdapter(HalfCall(halves, "second"), ag),
                                      (block, af), (block, ag), idx, step_buffers, calls[i], (extras,)))
        else:  # revnet: consecutive blocks as F and G
            g = ResidualBranch(calls[idx[1]]) if len(idx) > 1 else None
            steps.append(CouplingStep(ResidualBranch(calls[i]), g, (block,),
                                      (blocks[idx[1]],) if len(idx) > 1 else (), idx, step_buffers,
                                      extras_from=tuple(calls[j] for j in idx)))
    stream = _DTYPES[plan.options.stream_dtype] if plan.options.stream_dtype else None
    check = plan.options.tolerance if plan.options.check_reconstruction else None
    # RNG states are saved per F and G call only where the recording run saw random
    # ops; a chain converted in eval mode saves them whenever it later trains
    random = any(b.call.random_ops for b in infos)
    random_if_training = not random and not blocks[0].training
    return ReversibleChain(blocks, steps, plan.coupling, slot, random=random,
                           random_if_training=random_if_training, anchors=plan.anchors,
                           precision=plan.precision, anchor_sets=plan.anchor_sets,
                           tolerance=plan.options.tolerance, stream_dtype=stream, check_tolerance=check,
                           name=f"reversible chain {infos[0].path} … {infos[-1].path}")


def drop_adapters(rmodel: nn.Module, plan: ReversiblePlan) -> None:
    """Remove the adapters a chain's rewrite added (it failed, or its calibration did)."""
    for b in plan.chain.blocks:
        for name in ("revify_adapter_f", "revify_adapter_g"):
            rmodel.get_submodule(b.path)._modules.pop(name, None)


def freeze_backbone(rmodel: nn.Module, plans: list[ReversiblePlan], trace: CallTrace) -> list[str]:
    """Freeze every parameter but the adapters and the task head; return the trainable names.

    PEFT parameters (LoRA, IA3, prompt vectors, ``modules_to_save``) that
    were trainable stay trainable: only pretrained weights are frozen.

    The head is every module first called after the last reversible chain
    (pooler and classifier, final norm and LM head). A parameter tied to the
    head (GPT-2's embedding and LM head) stays trainable.
    """
    last = max((p.chain.blocks[-1].call.index for p in plans), default=None)
    inside: set[int] = set()
    head: set[str] = set()
    if last is not None:
        inside.add(last)
        for c in trace.calls[last + 1:]:
            if c.parent in inside:
                inside.add(c.index)
            elif c.path not in {x.path for x in trace.calls[:last + 1]}:
                head.add(c.path)
    keep: set[int] = set()
    for path in head:
        keep.update(id(p) for p in rmodel.get_submodule(path).parameters())
    for m in rmodel.modules():
        if getattr(m, "revify_adapter", False):
            keep.update(id(p) for p in m.parameters())
    # a PEFT model's LoRA / IA3 / prompt parameters are the user's fine-tuning set, not pretrained weights
    peft = peft_parameters(rmodel)
    keep.update(id(p) for p in rmodel.parameters() if id(p) in peft and p.requires_grad)
    trainable = []
    for name, p in rmodel.named_parameters():
        if id(p) in keep:
            trainable.append(name)
        else:
            p.requires_grad_(False)
    return trainable


def rewrite_reversible(model: nn.Module, plans: list[ReversiblePlan], trace: CallTrace,
                       rmodel: nn.Module | None = None) -> tuple[nn.Module, list[ReversibleChain], list[Rejection]]:
    """Returns the converted module, its chains (one per plan kept) and the plans it had to drop.

    Installs on ``rmodel`` if given (a structural copy already made), else on a new copy.
    """
    rmodel = share_structure(model) if rmodel is None else rmodel
    chains, kept, rejections = [], [], []
    for plan in plans:
        try:
            chain = build_chain(rmodel, plan)
        except Exception as exc:  # this chain only: the others are still converted
            drop_adapters(rmodel, plan)
            reason = f"meft3: {exc}" if isinstance(exc, SplitError) else str(exc) \
                if isinstance(exc, RewriteRefusal) else f"rewrite failed: {type(exc).__name__}: {exc}"
            rejections.append(Rejection(f"{plan.chain.blocks[0].path} … {plan.chain.blocks[-1].path}", reason))
            continue
        chain.install()
        chains.append(chain)
        kept.append(plan)
    plans[:] = kept
    if any(p.options.freeze_backbone and p.coupling.name != "revnet" for p in plans):
        freeze_backbone(rmodel, plans, trace)
    return rmodel, chains, rejections
