"""Checkpoint strategy on the test zoo: identical outputs and gradients, fewer saved bytes."""
from __future__ import annotations

import copy

import pytest
import torch

import revify
from revify.measure import measure_saved_bytes
from zoo import ALL_CASES


def _step(model, case, seed=1):
    torch.manual_seed(seed)
    out = revify.api.call_model(model, case.example_inputs)
    loss = case.loss_fn(out)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    value = out.logits if hasattr(out, "logits") else out
    return value.detach(), grads


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_checkpoint_matches_original_exactly(name):
    case = ALL_CASES[name]()
    original = case.model
    twin = copy.deepcopy(original)  # separate buffers: BatchNorm statistics compared after one step
    rmodel = revify.revify(twin, case.example_inputs, strategy="checkpoint")
    plan = rmodel.revify_plan
    assert plan.converted, plan.summary()
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

    saved_plain, _ = measure_saved_bytes(original, case.example_inputs, case.loss_fn)
    saved_ckpt, _ = measure_saved_bytes(rmodel, case.example_inputs, case.loss_fn)
    assert saved_ckpt < saved_plain


def test_original_module_is_untouched():
    case = ALL_CASES["mlp_resnet"]()
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    rmodel = revify.revify(case.model, case.example_inputs)
    assert rmodel is not case.model
    assert all("forward" not in m.__dict__ for m in case.model.modules())
    assert all(torch.equal(before[k], v) for k, v in case.model.state_dict().items())
