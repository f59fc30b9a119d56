"""Checkpoint strategy on the test zoo: identical outputs and gradients, fewer saved bytes."""
from __future__ import annotations

import copy

import pytest
import torch

import revify
from revify.measure import measure_memory, measure_saved_bytes
from zoo import ALL_CASES, train_step


def _step(model, case):
    value, _, grads = train_step(model, case)
    return value, grads


@pytest.mark.parametrize("schedule", ["budget", "per-block"])
@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_checkpoint_matches_original_exactly(name, schedule):
    case = ALL_CASES[name]()
    original = case.model
    twin = copy.deepcopy(original)  # separate buffers: BatchNorm statistics compared after one step
    rmodel = revify.revify(twin, case.example_inputs, strategy="checkpoint", schedule=schedule)
    plan = rmodel.revify_plan
    assert plan.converted if schedule == "per-block" else plan.planned, plan.summary()
    n_chain_blocks = sum(len(c.chain.blocks) for c in plan.chains)
    assert n_chain_blocks >= 2

    # same names, same parameter objects as the model it was made from
    assert list(rmodel.state_dict()) == list(twin.state_dict())
    assert all(a is b for a, b in zip(rmodel.parameters(), twin.parameters()))

    out_a, grads_a = _step(original, case)
    out_b, grads_b = _step(rmodel, case)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k
    for (na, ba), (nb, bb) in zip(original.named_buffers(), twin.named_buffers()):
        assert na == nb and torch.equal(ba, bb), na

    if schedule == "per-block":
        saved_plain, _ = measure_saved_bytes(original, case.example_inputs, case.loss_fn)
        saved_ckpt, _ = measure_saved_bytes(rmodel, case.example_inputs, case.loss_fn)
        assert saved_ckpt < saved_plain
    else:
        # the planner minimises the step's peak: never above plain training's, and as
        # predicted (its model rounds boundary tensors up, so it errs high)
        peak_plain, _ = measure_memory(original, case.example_inputs, case.loss_fn)
        peak, _ = measure_memory(rmodel, case.example_inputs, case.loss_fn)
        assert peak <= peak_plain
        predicted = plan.budget.predicted_peak
        assert abs(predicted - peak) <= 0.1 * peak, (predicted, peak)


def test_original_module_is_untouched():
    case = ALL_CASES["mlp_resnet"]()
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    rmodel = revify.revify(case.model, case.example_inputs)
    assert rmodel is not case.model
    assert all("forward" not in m.__dict__ for m in case.model.modules())
    assert all(torch.equal(before[k], v) for k, v in case.model.state_dict().items())


def _grads(model):
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    return g


def _same(fn, a, b):
    out_a = fn(a)
    grads_a = _grads(a)
    out_b = fn(b)
    grads_b = _grads(b)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_training_patterns_users_have():
    case = ALL_CASES["bert"]()
    model, inputs = case.model, case.example_inputs
    rmodel = revify.revify(model, inputs)

    def all_hidden_states(m):  # the parent also keeps every layer's output
        torch.manual_seed(3)
        out = m(**inputs, output_hidden_states=True)
        (sum(h.pow(2).mean() for h in out.hidden_states) + out.logits.pow(2).mean()).backward()
        return out.logits.detach()

    def two_forwards_one_backward(m):
        torch.manual_seed(4)
        first, second = m(**inputs).logits, m(**inputs).logits
        (first.pow(2).sum() + second.sum()).backward()
        return second.detach()

    def frozen_embeddings(m):
        for p in model.bert.embeddings.parameters():  # shared with rmodel
            p.requires_grad_(False)
        torch.manual_seed(5)
        out = m(**inputs).logits
        out.pow(2).sum().backward()
        for p in model.bert.embeddings.parameters():
            p.requires_grad_(True)
        return out.detach()

    for fn in (all_hidden_states, two_forwards_one_backward, frozen_embeddings):
        _same(fn, model, rmodel)
    clone = copy.deepcopy(rmodel)  # a deep copy is an independent converted module
    assert not any(p is q for p, q in zip(clone.parameters(), model.parameters()))
    _same(two_forwards_one_backward, copy.deepcopy(model), clone)


@pytest.mark.parametrize("name", ["pre_ln_transformer", "bert", "cnn_resnet"])
def test_per_block_and_selective_segments_are_exact(name):
    """Per-block segments, and selective segments keeping matmul outputs or the planner's op
    choice (two thresholds), give the original gradients, dropout included."""
    from dataclasses import replace

    from revify.api import _analyse, convert
    from revify.passes.planning.chain_costs import SaveOpsMenus, save_ops_plan
    from revify.passes.planning.save_ops_menu import ALL_STEPS
    from revify.passes.planning.plan_checkpoint import Segment
    from revify.passes.planning.profile_blocks import profile_chains

    results = {}
    for policy in ("recompute", "save_matmuls", "save_ops:all", "save_ops:some"):
        case = ALL_CASES[name]()
        plan, trace = _analyse(case.model, case.example_inputs, "checkpoint", None, "per-block")
        if policy.startswith("save_ops"):
            profiles = profile_chains(case.model, [cp.chain for cp in plan.chains], repeats=1)
            chains = []
            for cp, prof in zip(plan.chains, profiles):
                levels = SaveOpsMenus(prof.blocks).levels()
                assert levels, "no op of these blocks may be kept"
                t = ALL_STEPS if policy == "save_ops:all" else levels[len(levels) // 2]
                chains.append(replace(cp, segments=tuple(
                    Segment(s.start, s.end, "save_ops", *save_ops_plan(prof.blocks, s.start, s.end, t))
                    for s in cp.segments)))
            plan.chains = chains
        else:
            plan.chains = [replace(cp, segments=tuple(Segment(s.start, s.end, policy) for s in cp.segments))
                           for cp in plan.chains]
        twin = copy.deepcopy(case.model)
        rmodel = convert(twin, plan, trace, case.example_inputs, strict=True)
        out_a, grads_a = _step(case.model, case)
        out_b, grads_b = _step(rmodel, case)
        assert torch.equal(out_a, out_b), policy
        assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a), policy
        # selective checkpointing caches what it keeps outside saved-tensor hooks:
        # count everything alive when backward starts
        results[policy] = measure_memory(rmodel, case.example_inputs, case.loss_fn)[1]
        plain = measure_memory(case.model, case.example_inputs, case.loss_fn)[1]
    # keeping op outputs costs memory; more ops kept, more memory
    assert results["recompute"] < results["save_ops:some"] < results["save_ops:all"], results
    assert results["recompute"] < results["save_matmuls"] < plain, (results, plain)
