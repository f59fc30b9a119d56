"""Pass 8: measure the converted module and place anchors (reversible chains only).

Two measurements on the example inputs, both recorded in the plan:

1. **Starting point** (eval mode, no grad): each chain's output against the
   original blocks run on the same input, with the bound the coupling's
   scaling implies (``ReversibleChain.start_point``), and the model's output
   against the original model's.
2. **Anchors** (the model's own train/eval mode, forward and backward):
   backward reconstructs every step's input from its output. Going down the
   chain, the first step whose reconstructed input is off by more than the
   reconstruction tolerance gets an anchor (its exact input is stored in
   forward from then on) and reconstruction continues from the exact value.
   One pass gives the greedy anchor set: segments are as long as the
   measured error allows, and adapt to where the error actually grows.
   Dropout and drop-path change the error from one draw to the next, so a
   model with random ops is calibrated on ``DRAWS`` draws (the union of
   their anchors). Then the gradients of the trainable parameters are
   compared with ``stored_activations`` on the same draws: dividing by λ
   and β amplifies reconstruction error in the gradients (MEFT3 by ~100×),
   so while the gradient error exceeds ``tolerance / GRADIENT_MARGIN`` the
   reconstruction tolerance is divided by ten and the anchors found again
   (as long as that at least halves the gradient error: below some level
   the error is the recompute's own rounding, which anchors do not reduce).
   ``plan.calibrated_on``, ``plan.gradient_error`` and
   ``plan.reconstruction_tolerance`` say what was measured. The anchors belong
   to the precision state the conversion ran in (``plan.precision``, e.g.
   ``"float32"``); the first training step in another state (under
   ``torch.autocast``) calibrates its own anchors the same way and records
   them in ``plan.anchor_sets``.

The calibration steps restore gradients, buffers and the RNG afterwards.
A chain whose calibration raises is uninstalled and dropped with its reason;
the other chains stay converted.

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

from revify.runtime.reconstruction import Probe, relative_error
from revify.runtime.reversible_chain import ReversibleChain, stored_activations

from revify.passes.analysis.chain_types import Rejection
from revify.passes.planning.plan_reversible import ReversiblePlan
from revify.passes.capture.record_calls import call_model
from revify.runtime.call_arguments import get_slot, set_slot
from revify.passes.rewrite.rewrite_reversible import drop_adapters

DRAWS = 3  # dropout / drop-path draws calibrated on, for a model with random ops
GRADIENT_MARGIN = 4  # gradient error aimed at, as a fraction of ``tolerance``: fresh draws vary
MAX_TIGHTENINGS = 3  # reconstruction tolerance down to tolerance / 1000 at most


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
    calls: dict[tuple[int, int], tuple[tuple, dict]] = {}  # (chain, block) -> the block's call
    hooks = []
    for j, chain in enumerate(chains):
        for k, block in enumerate(chain.blocks):
            def grab(module, args, kwargs, key=(j, k)):
                calls.setdefault(key, (args, kwargs))
            hooks.append(block.register_forward_pre_hook(grab, with_kwargs=True))
    flags_r, flags_m = _set_training(rmodel, None), _set_training(model, None)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out_r = _first_float(call_model(rmodel, example_inputs))
            out_m = _first_float(call_model(model, example_inputs))
            for j, (chain, plan) in enumerate(zip(chains, plans)):
                firsts = [step.blocks[0] for step in chain.steps]
                if any((j, k) not in calls for k in firsts) or plan.coupling.name == "revnet":
                    continue  # revnet does not keep the pretrained function: only the output error
                x = get_slot(*calls[j, 0], chain.hidden_slot)
                # each step with its own block's side inputs (Gemma 2's masks differ between layers)
                sides = [set_slot(*calls[j, k], chain.hidden_slot, None) for k in firsts]
                err, bound, _ = chain.start_point(x, sides)
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


def _loss(out: Any) -> torch.Tensor | None:
    leaves, _ = tree_flatten(out if not hasattr(out, "to_tuple") else out.to_tuple())
    loss = sum(t.float().mean() for t in leaves
               if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point())
    return loss if isinstance(loss, torch.Tensor) else None


def _train_step(rmodel: nn.Module, example_inputs: Any, seed: int) -> dict[str, torch.Tensor]:
    """One seeded forward and backward; returns the gradients and leaves RNG, grads and buffers as they were."""
    params = [(n, p) for n, p in rmodel.named_parameters()]
    before = [p.grad for _, p in params]
    buffers = {n: b.detach().clone() for n, b in rmodel.named_buffers()}
    devices = sorted({p.device.index or 0 for _, p in params if p.is_cuda})
    try:
        for _, p in params:
            p.grad = None
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(seed)
            loss = _loss(call_model(rmodel, example_inputs))
            if loss is not None:
                loss.backward()
        return {n: p.grad.detach().clone() for n, p in params if p.grad is not None}
    finally:
        for (_, p), g in zip(params, before):
            p.grad = g
        with torch.no_grad():
            for n, b in rmodel.named_buffers():
                b.copy_(buffers[n])


def gradient_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Largest relative error over parameters (norm of the difference over the reference's norm)."""
    worst = 0.0
    for name, r in ref.items():
        g = got.get(name, torch.zeros_like(r))
        diff, norm = (g.double() - r.double()).norm().item(), r.double().norm().item()
        worst = max(worst, diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


def _find_anchors(rmodel: nn.Module, chains: list[ReversibleChain], tolerances: list[float],
                  example_inputs: Any, seeds: list[int]) -> list[tuple | None]:
    """Per chain: (anchors, step errors, precision) over the draws, or None if no gradient reached it."""
    found: list[tuple | None] = [None] * len(chains)
    for seed in seeds:
        probes = []
        for chain, tol in zip(chains, tolerances):
            chain.anchors = ()
            chain.probe = Probe("calibrate", tol)
            probes.append(chain.probe)
        try:
            _train_step(rmodel, example_inputs, seed)
        finally:
            for chain in chains:
                chain.probe = None
        for j, probe in enumerate(probes):
            if not probe.exact:  # the reversible backward did not run
                continue
            anchors, errors, _ = found[j] or (set(), {}, None)
            anchors |= probe.new_anchors
            for i, e in probe.errors.items():
                errors[i] = max(errors.get(i, 0.0), e)
            found[j] = (anchors, errors, probe.precision)
    return found


def place_anchors(rmodel: nn.Module, chains: list[ReversibleChain], plans: list[ReversiblePlan],
                  example_inputs: Any) -> None:
    random = any(c.random for c in chains)
    seeds = list(range(DRAWS if random else 1))
    on = f"the example inputs, {len(seeds)} dropout draws" if random else "the example inputs"
    tolerances = [p.options.tolerance for p in plans]
    target = min(tolerances) / GRADIENT_MARGIN
    previous = float("inf")
    for tightening in range(MAX_TIGHTENINGS + 1):
        found = _find_anchors(rmodel, chains, tolerances, example_inputs, seeds)
        for chain, plan, f in zip(chains, plans, found):
            if f is None:  # left uncalibrated: the first training step calibrates (ReversibleChain.run_head)
                chain.anchors = plan.anchors = ()
                plan.step_errors = []
                continue
            anchors, errors, precision = f
            chain.anchors = plan.anchors = tuple(sorted(anchors))
            chain.precision = plan.precision = precision
            plan.step_errors = [0.0 if i in anchors else errors.get(i, 0.0) for i in range(len(chain.steps))]
        if not any(found):
            return
        worst = 0.0
        for seed in seeds:
            got = _train_step(rmodel, example_inputs, seed)
            with stored_activations(rmodel):
                ref = _train_step(rmodel, example_inputs, seed)
            worst = max(worst, gradient_error(got, ref))
        for plan, tol, f in zip(plans, tolerances, found):
            if f is not None:
                plan.calibrated_on, plan.gradient_error, plan.reconstruction_tolerance = on, worst, tol
        # done when within the margin, or when tightening stopped helping: what remains is
        # rounding in the recompute itself (fp32 noise on tiny gradients), not reconstruction
        if worst <= target or worst > previous / 2:
            return
        previous = worst
        tolerances = [t / 10 for t in tolerances]


def _calibrate(model: nn.Module, rmodel: nn.Module, chains: list[ReversibleChain],
               plans: list[ReversiblePlan], example_inputs: Any) -> None:
    measure_start(model, rmodel, chains, plans, example_inputs)
    place_anchors(rmodel, chains, plans, example_inputs)


def calibrate_reversible(model: nn.Module, rmodel: nn.Module, chains: list[ReversibleChain],
                         plans: list[ReversiblePlan], example_inputs: Any) -> list[Rejection]:
    """Measure and place anchors; returns the chains dropped because their calibration raised.

    ``chains`` and ``plans`` are edited in place to the chains kept.
    """
    try:
        _calibrate(model, rmodel, chains, plans, example_inputs)
        return []
    except Exception:  # find the chains that fail on their own, drop those, calibrate the rest again
        pass
    failed: dict[int, str] = {}
    for j, chain in enumerate(chains):
        for other in chains:
            other.uninstall()
        chain.install()
        try:
            _calibrate(model, rmodel, [chain], [plans[j]], example_inputs)
        except Exception as exc:
            failed[j] = f"calibration failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    rejections = []
    for j in sorted(failed, reverse=True):
        plan = plans.pop(j)
        chains.pop(j).uninstall()
        drop_adapters(rmodel, plan)
        rejections.append(Rejection(f"{plan.chain.blocks[0].path} … {plan.chain.blocks[-1].path}", failed[j]))
    for chain in chains:
        chain.install()
    if chains:
        _calibrate(model, rmodel, chains, plans, example_inputs)  # raises if the chains fail only together
    return rejections[::-1]
