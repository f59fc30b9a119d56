"""``.to()``, ``.half()``, ``.cuda()`` on a converted module: parameters AND buffers stay shared with the original.

A dtype or device move assigns new buffer tensors; the converted module and
the original hold one buffer dictionary per module, so both see the move,
and BatchNorm statistics stay one set whichever module trains.
"""
from __future__ import annotations

import pytest
import torch

import revify
from training_stack_fixtures import collate, example_batch, tiny_llama, token_rows
from zoo import cnn_resnet


def _assert_shared(model, rmodel) -> None:
    own = dict(rmodel.named_parameters())
    for name, p in model.named_parameters():
        assert p is own[name], name
    own = dict(rmodel.named_buffers())
    for name, b in model.named_buffers():
        assert b is own[name], name


@pytest.mark.parametrize("move", ["to_bfloat16", "half", "original_to_bfloat16"])
def test_dtype_move_keeps_llama_parameters_and_buffers_shared(move, one_thread):
    model = tiny_llama()
    rmodel = revify.revify(model, example_batch(True), schedule="per-block")
    assert rmodel.revify_plan.converted
    if move == "to_bfloat16":
        rmodel.to(torch.bfloat16)
    elif move == "half":
        rmodel.half()
    else:
        model.to(torch.bfloat16)  # moving the original moves the converted module too
    dtype = torch.float16 if move == "half" else torch.bfloat16
    _assert_shared(model, rmodel)
    assert model.model.rotary_emb.inv_freq.dtype == rmodel.model.rotary_emb.inv_freq.dtype
    assert all(p.dtype == dtype for p in model.parameters())
    batch = collate(token_rows(True)[:4])
    torch.manual_seed(3)
    rmodel(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in rmodel.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    model(**batch).loss.backward()
    for name, p in model.named_parameters():  # the same function, in the new precision
        assert torch.equal(p.grad, grads[name]), name


def test_batchnorm_statistics_stay_one_set_after_a_dtype_move(one_thread):
    case = cnn_resnet()
    model = case.model.train()
    rmodel = revify.revify(model, case.example_inputs, schedule="per-block")
    assert rmodel.revify_plan.converted
    rmodel.to(torch.float64)
    _assert_shared(model, rmodel)
    bn = model.layer1[0].bn1
    before, tracked = bn.running_mean.clone(), int(bn.num_batches_tracked)
    x = case.example_inputs[0].double()
    rmodel(x).sum().backward()
    assert bn.running_mean.dtype == torch.float64
    assert not torch.equal(bn.running_mean, before)  # the user's model sees the step rmodel took
    assert int(bn.num_batches_tracked) == tracked + 1  # once: the recompute did not count the batch again
    # a step on the original moves the converted module's statistics: one set, whichever module trains
    mid = rmodel.layer1[0].bn1.running_mean.clone()
    model(x).sum().backward()
    assert not torch.equal(rmodel.layer1[0].bn1.running_mean, mid)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_move_keeps_parameters_and_buffers_shared():
    case = cnn_resnet()
    model = case.model.train()
    rmodel = revify.revify(model, case.example_inputs, schedule="per-block")
    rmodel.cuda()
    _assert_shared(model, rmodel)
    assert all(t.is_cuda for t in list(model.parameters()) + list(model.buffers()))
    x = case.example_inputs[0]
    before = model.layer1[0].bn1.running_mean.clone()
    rmodel(x.cuda()).sum().backward()
    assert not torch.equal(model.layer1[0].bn1.running_mean, before)
