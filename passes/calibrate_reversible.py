"""Pass 8: measure the converted module and place anchors (reversible chains only).

Two measurements on the example inputs, both recorded in the plan:

1. **Starting point** (eval mode, no grad): each chain's output against the
   original blocks run on the same input, with the bound the coupling's
   scaling implies (``ReversibleChain.start_point``), and the model's output
   against the original model's.
2. **Anchors** (the model's own train/eval mode, one forward and backward):
   backward reconstructs every step's input from its output. Going down the
   chain, the first step whose reconstructed input is off by more than
   ``tolerance`` gets an anchor (its exact input is stored in forward from
   then on) and reconstruction continues from the exact value. One pass
   gives the greedy anchor set: segments are as long as the measured error
   allows, and adapt to where the error actually grows. The anchors belong
   to the precision state the conversion ran in (``plan.precision``, e.g.
   ``"float32"``); the first training step in another state (under
   ``torch.autocast``) calibrates its own anchors the same way and records
   them in ``plan.anchor_sets``.

The calibration step restores gradients, buffers and the RNG afterwards.

Before::

    ReversiblePlan(anchors=(), step_errors=[])

After::

    ReversiblePlan(anchors=(4, 8), step_errors=[3e-7, …], precision="float32",
                   start_error=0.021, start_bound=0.31)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from revify.runtime.reversible_chain import Probe, ReversibleChain, relative_error

from .plan_reversible import ReversiblePlan
from .record_calls import call_model, get_slot, set_slot


def _first_float(out: Any) -> torch.Tensor | None:
    if hasattr(out, "logits"):
        return out.logits
    leaves, _ = tree_flatten(out if not hasattr(out, "to_tuple") else out.to_tuple())
    return next((t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()), None)


def _set_training(model: nn.Module, flags: dict[nn.Module, bool] | None) -> dict[nn.Module, bool]:
    before = {m: m.training for m in model.modules()}
    for m in model.modules():
        m.training = False if flags is None else flags[m]
    return before


def measure_start(model: nn.Module, rmodel: nn.Module, chains: list[ReversibleChain],
                  plans: list[ReversiblePlan], example_inputs: Any) -> None:
    calls: dict[int, tuple[tuple, dict]] = {}
    hooks = []
    for j, chain in enumerate(chains):
        def grab(module, args, kwargs, j=j):
            calls.setdefault(j, (args, kwargs))
        hooks.append(chain.blocks[0].register_forward_pre_hook(grab, with_kwargs=True))
    flags_r, flags_m = _set_training(rmodel, None), _set_training(model, None)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out_r = _first_float(call_model(rmodel, example_inputs))
            out_m = _first_float(call_model(model, example_inputs))
            for j, (chain, plan) in enumerate(zip(chains, plans)):
                if j not in calls or plan.coupling.name == "revnet":
                    continue  # revnet does not keep the pretrained function: only the output error
                args, kwargs = calls[j]
                x = get_slot(args, kwargs, chain.hidden_slot)
                side_args, side_kwargs = set_slot(args, kwargs, chain.hidden_slot, None)
                err, bound, _ = chain.start_point(x, side_args, side_kwargs)
                plan.start_error = err
                plan.start_bound = None if plan.coupling.name == "revnet" else bound
        output_error = relative_error(out_r, out_m) if out_r is not None and out_m is not None \
            and out_r.shape == out_m.shape else None
        for plan in plans:
            plan.output_error = output_error
    finally:
        for h in hooks:
            h.remove()
        _set_training(rmodel, flags_r)
        _set_training(model, flags_m)


def place_anchors(rmodel: nn.Module, chains: list[ReversibleChain], plans: list[ReversiblePlan],
                  example_inputs: Any) -> None:
    params = list(rmodel.parameters())
    grads = [p.grad for p in params]
    buffers = {n: b.detach().clone() for n, b in rmodel.named_buffers()}
    probes = []
    for chain, plan in zip(chains, plans):
        chain.anchors = ()
        chain.probe = Probe("calibrate", plan.options.tolerance)
        probes.append(chain.probe)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            out = call_model(rmodel, example_inputs)
            leaves, _ = tree_flatten(out if not hasattr(out, "to_tuple") else out.to_tuple())
            loss = sum(t.float().mean() for t in leaves
                       if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point())
            if isinstance(loss, torch.Tensor):
                loss.backward()
    finally:
        for chain in chains:
            chain.probe = None
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for n, b in rmodel.named_buffers():
                b.copy_(buffers[n])
    for chain, plan, probe in zip(chains, plans, probes):
        if probe.exact:  # the reversible backward ran: nothing to measure if no gradient reaches the chain
            found = chain.record_anchors(probe, "example inputs")
            plan.anchors, plan.step_errors, plan.precision = found.anchors, found.step_errors, found.precision
        else:  # left uncalibrated: the first training step calibrates (ReversibleChain.run_head)
            chain.anchors = plan.anchors = ()


def calibrate_reversible(model: nn.Module, rmodel: nn.Module, chains: list[ReversibleChain],
                         plans: list[ReversiblePlan], example_inputs: Any) -> None:
    measure_start(model, rmodel, chains, plans, example_inputs)
    place_anchors(rmodel, chains, plans, example_inputs)
