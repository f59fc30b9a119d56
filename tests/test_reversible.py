"""Reversible strategy: gradients against the stored-activation reference, starting point, anchors."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import revify
from revify.measure import measure_saved_bytes
from revify.runtime.reversible_chain import reversible_chains
from reversible_checks import assert_grads_close, perturb_adapters
from zoo import ALL_CASES, MLPResNet, ZooCase, _logits_loss, train_step

TRANSFORMERS = ["pre_ln_transformer", "bert", "roberta", "gpt2", "opt", "llama", "vit"]


def _step(model, case):
    _, loss, grads = train_step(model, case, seed=5)
    return loss, grads


def _convert(name: str, coupling: str, **kw) -> tuple[ZooCase, nn.Module, nn.Module]:
    case = ALL_CASES[name]()
    original = copy.deepcopy(case.model)
    rmodel = revify.revify(case.model, case.example_inputs, strategy="reversible", coupling=coupling,
                           strict=True, **kw)
    return case, original, rmodel


CASES = [(m, c) for m in TRANSFORMERS for c in ("meft1", "meft2", "meft3")] + \
        [("cnn_resnet", "revnet"), ("mlp_resnet", "revnet"), ("mlp_resnet", "meft1")]


@pytest.mark.parametrize("name,coupling", CASES)
def test_reversible_gradients_match_stored_activations(name, coupling):
    # meft3 divides both streams by 0.1 at every step: gradient error runs up to ~100x the
    # reconstruction error; calibration tightens the anchors until the gradients it measures
    # are within the tolerance, so the default serves here too
    case, original, rmodel = _convert(name, coupling)
    plan = rmodel.revify_plan
    assert plan.reversible, plan.summary()
    rp = plan.reversible[0]
    assert rp.step_errors and max(rp.step_errors) <= rp.options.tolerance, plan.summary()

    # the original weights, shared, plus adapters under the blocks
    original_keys = set(case.model.state_dict())
    keys = set(rmodel.state_dict())
    assert original_keys <= keys
    if coupling != "revnet":
        assert any("revify_adapter_f" in k for k in keys - original_keys)
        # starting point within the bound the scaling implies, measured at conversion
        assert rp.start_error is not None and rp.start_error <= rp.start_bound, plan.summary()

    perturb_adapters(rmodel)
    loss_rev, grads_rev = _step(rmodel, case)
    with revify.stored_activations(rmodel):
        loss_ref, grads_ref = _step(rmodel, case)
    assert torch.allclose(loss_rev, loss_ref, rtol=1e-6)
    assert grads_rev, "nothing trainable"
    assert_grads_close(grads_rev, grads_ref)

    saved_rev, _ = measure_saved_bytes(rmodel, case.example_inputs, case.loss_fn)
    with revify.stored_activations(rmodel):
        saved_ref, _ = measure_saved_bytes(rmodel, case.example_inputs, case.loss_fn)
    assert saved_rev < saved_ref


def test_meft3_needs_two_sublayers():
    case = ALL_CASES["mlp_resnet"]()
    rmodel = revify.revify(case.model, case.example_inputs, strategy="reversible", coupling="meft3")
    assert not rmodel.revify_plan.converted
    assert "two residual sub-layers" in rmodel.revify_plan.summary()
    with pytest.raises(revify.RevifyError):
        revify.revify(case.model, case.example_inputs, strategy="reversible", coupling="meft3", strict=True)


def test_meft_refuses_feature_maps_with_reason():
    case = ALL_CASES["cnn_resnet"]()
    rmodel = revify.revify(case.model, case.example_inputs, strategy="reversible", coupling="meft1")
    assert "use coupling='revnet'" in rmodel.revify_plan.summary()


def _deep_mlp(n_blocks=12) -> ZooCase:
    torch.manual_seed(0)
    return ZooCase("deep_mlp", MLPResNet(dim=32, n_blocks=n_blocks).train(), (torch.randn(8, 32),),
                   _logits_loss, n_blocks)


def test_anchors_bound_the_reconstruction_error():
    # fp32 streams and λ = 0.1: the error grows about tenfold per block, so a
    # tight tolerance needs anchors; the measured error must respect it
    case = _deep_mlp()
    rmodel = revify.revify(case.model, case.example_inputs, strategy="reversible", coupling="meft1",
                           stream_dtype="float32", tolerance=1e-5, strict=True)
    rp = rmodel.revify_plan.reversible[0]
    assert rp.anchors, rmodel.revify_plan.summary()
    assert max(rp.step_errors) <= 1e-5
    assert len(rp.segments) == len(set((0,) + rp.anchors))
    perturb_adapters(rmodel)
    _, grads_rev = _step(rmodel, case)
    with revify.stored_activations(rmodel):
        _, grads_ref = _step(rmodel, case)
    assert_grads_close(grads_rev, grads_ref)

    # without anchors the same chain reconstructs worse than the tolerance
    chain = reversible_chains(rmodel)[0]
    chain.anchors = ()
    chain.check_tolerance = 1e-5
    with pytest.raises(revify.ReconstructionError, match="block"):
        _step(rmodel, case)


def test_wider_streams_reconstruct_better_than_compute_dtype_streams():
    errs = {}
    for dtype in ("float32", "float64"):
        case = _deep_mlp(8)
        rmodel = revify.revify(case.model, case.example_inputs, strategy="reversible", coupling="meft1",
                               stream_dtype=dtype, tolerance=1.0, strict=True)
        errs[dtype] = max(rmodel.revify_plan.reversible[0].step_errors)
    assert errs["float64"] < errs["float32"] / 10, errs


def test_check_reconstruction_passes_when_within_tolerance(monkeypatch):
    monkeypatch.setenv("REVIFY_CHECK_RECONSTRUCTION", "1")
    case, _, rmodel = _convert("bert", "meft1")
    assert reversible_chains(rmodel)[0].check_tolerance == 1e-4
    _step(rmodel, case)


def test_zero_adapter_init_starts_closer_than_normal():
    errs = {}
    for init in ("zero", "normal"):
        _, _, rmodel = _convert("bert", "meft1", adapter_init=init)
        errs[init] = rmodel.revify_plan.reversible[0].start_error
    assert errs["zero"] < errs["normal"], errs


def test_freeze_backbone_keeps_adapters_and_head_trainable():
    case, _, rmodel = _convert("bert", "meft1")
    trainable = [n for n, p in rmodel.named_parameters() if p.requires_grad]
    assert trainable and all("revify_adapter" in n or n.startswith(("bert.pooler", "classifier"))
                             for n in trainable), trainable
    assert any(n.startswith("classifier") for n in trainable)
    case, _, rmodel = _convert("bert", "meft1", freeze_backbone=False)
    assert all(p.requires_grad for p in rmodel.parameters())


def test_batchnorm_statistics_updated_once_and_rng_undisturbed():
    case, _, rmodel = _convert("cnn_resnet", "revnet")
    twin_state = copy.deepcopy(rmodel.state_dict())
    torch.manual_seed(7)
    _step(rmodel, case)
    rng_after_rev = torch.get_rng_state()
    after_rev = {k: v.clone() for k, v in rmodel.state_dict().items() if "running" in k}
    rmodel.load_state_dict(twin_state)
    with revify.stored_activations(rmodel):
        _step(rmodel, case)
        rng_after_ref = torch.get_rng_state()
    after_ref = {k: v for k, v in rmodel.state_dict().items() if "running" in k}
    for k in after_ref:
        torch.testing.assert_close(after_rev[k], after_ref[k], rtol=1e-6, atol=1e-7)
    assert torch.equal(rng_after_rev, rng_after_ref)


def test_relay_called_out_of_order_raises_clear_error():
    class Meddling(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(MLPResNet(dim=16, n_blocks=4).blocks)

        def forward(self, x, scale=1.0):
            for b in self.blocks:
                x = b(x)
                if scale != 1.0:  # a parent that changes the hidden state between blocks
                    x = x * scale
            return x

    torch.manual_seed(0)
    model = Meddling()
    x = torch.randn(4, 16)
    rmodel = revify.revify(model, (x,), strategy="reversible", coupling="revnet", strict=True)
    rmodel(x).sum().backward()
    with pytest.raises(RuntimeError, match="reversible chain"):
        rmodel(x, 2.0)


def test_inference_and_copies():
    case, _, rmodel = _convert("gpt2", "meft2")
    rmodel.eval()  # no dropout: outputs comparable
    with torch.no_grad():
        a = revify.api.call_model(rmodel, case.example_inputs).logits
    clone = pickle.loads(pickle.dumps(rmodel))
    deep = copy.deepcopy(rmodel)
    for other in (clone, deep):
        with torch.no_grad():
            b = revify.api.call_model(other, case.example_inputs).logits
        torch.testing.assert_close(a, b)


def test_autocast_bfloat16_matches_reference():
    case, _, rmodel = _convert("pre_ln_transformer", "meft1")
    perturb_adapters(rmodel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, grads_rev = _step(rmodel, case)
        with revify.stored_activations(rmodel):
            _, grads_ref = _step(rmodel, case)
    for k in grads_ref:
        err = (grads_rev[k].float() - grads_ref[k].float()).norm() / grads_ref[k].float().norm().clamp_min(1e-30)
        assert err < 1e-2, (k, err.item())
