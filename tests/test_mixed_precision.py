"""Mixed precision: ``torch.autocast(device_type="cpu", dtype=torch.bfloat16)``.

Checkpointing recomputes under the forward's autocast state, so it is exact
against the original model under the same autocast. Reversible chains keep
anchors per precision state: anchors calibrated at conversion (fp32) are far
too sparse for bf16 recompute noise, so the first training step under a new
autocast state stores the streams and places anchors for that state (one
step's extra cost), recorded in the plan with the error they achieve.
"""
from __future__ import annotations

import copy

import pytest
import torch

import revify
from revify.runtime.reconstruction import ReconstructionError
from revify.runtime.reversible_chain import reversible_chains
from zoo import ALL_CASES, MLPResNet, ZooCase, _logits_loss, train_step

BF16 = "bfloat16, autocast cpu bfloat16"  # the chain input is bf16: it comes out of an autocast Linear

pytestmark = pytest.mark.usefixtures("one_thread")



def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["pre_ln_transformer", "bert"])
def test_checkpoint_under_autocast_is_exact(name):
    case = ALL_CASES[name]()  # dropout on
    original = copy.deepcopy(case.model)
    rmodel = revify.revify(case.model, case.example_inputs, strategy="checkpoint", schedule="sqrt(n)", strict=True)
    with _bf16():
        out_r, loss_r, grads_r = train_step(rmodel, case)
        out_o, loss_o, grads_o = train_step(original, case)
    assert out_r.dtype == torch.bfloat16  # autocast really ran
    assert torch.equal(out_r, out_o) and torch.equal(loss_r, loss_o)
    assert grads_r.keys() == grads_o.keys()
    assert all(torch.equal(grads_r[k], grads_o[k]) for k in grads_o)


def _deep_meft(coupling: str) -> tuple[ZooCase, torch.nn.Module]:
    # 12 blocks at λ = 0.1: bf16 recompute noise, amplified ~10× per block, needs anchors
    torch.manual_seed(0)
    case = ZooCase("deep_mlp", MLPResNet(dim=32, n_blocks=12).train(), (torch.randn(8, 32),), _logits_loss, 12)
    rmodel = revify.revify(case.model, case.example_inputs, strategy="reversible", coupling=coupling, strict=True)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in rmodel.named_parameters():
            if "revify_adapter" in name:
                p.normal_(0, 0.05)
    return case, rmodel


def _rel(got: dict, ref: dict) -> float:
    return max(((got[k].float() - ref[k].float()).norm() / ref[k].float().norm().clamp_min(1e-30)).item()
               for k in ref)


@pytest.mark.parametrize("coupling", ["meft1", "meft2"])
def test_reversible_anchors_tighten_on_the_first_bf16_step(coupling):
    case, rmodel = _deep_meft(coupling)
    rp = rmodel.revify_plan.reversible[0]
    chain = reversible_chains(rmodel)[0]
    tol = rp.options.tolerance
    assert rp.precision == "float32" and rp.anchor_sets == {}
    fp32_anchors = rp.anchors

    with _bf16():
        with revify.stored_activations(rmodel):
            _, _, grads_ref = train_step(rmodel, case)
        # the fp32 anchors are not enough under bf16: the debug check names the block
        chain.check_tolerance, chain.tolerance = tol, None
        with pytest.raises(ReconstructionError, match="block"):
            train_step(rmodel, case)
        for p in rmodel.parameters():  # the raising backward had already given later steps their gradients
            p.grad = None
        chain.check_tolerance, chain.tolerance = None, tol

        _, _, grads_first = train_step(rmodel, case)  # calibrates for this precision state
        assert list(rp.anchor_sets) == [BF16], rp.anchor_sets
        found = rp.anchor_sets[BF16]
        assert found.calibrated_on == "first training step"
        assert len(found.anchors) > len(fp32_anchors), (found.anchors, fp32_anchors)
        assert 0 < found.max_error <= tol, found
        assert f"under {BF16}: anchors at steps {list(found.anchors)}" in rmodel.revify_plan.summary()

        _, _, grads_next = train_step(rmodel, case)  # uses them, without calibrating again
        assert rp.anchor_sets[BF16] is found
        chain.check_tolerance = tol  # and reconstruction stays within the tolerance
        train_step(rmodel, case)
        chain.check_tolerance = None

    # bf16 gradients against the stored-activation reference, also in bf16: within bf16 noise
    assert _rel(grads_first, grads_ref) < 2e-2
    assert _rel(grads_next, grads_ref) < 2e-2

    # back in fp32 the conversion's anchors apply again, unchanged
    train_step(rmodel, case)
    assert rp.anchors == fp32_anchors and list(rp.anchor_sets) == [BF16]
    assert chain.anchors_for("float32") == fp32_anchors


def test_uncalibrated_chain_calibrates_on_its_first_training_step():
    # a chain the conversion could not calibrate (no gradient reached it on the
    # example inputs) gets its anchors on the first step that trains it
    case, rmodel = _deep_meft("meft1")
    rp = rmodel.revify_plan.reversible[0]
    chain = reversible_chains(rmodel)[0]
    chain.precision, chain.anchors = None, ()
    train_step(rmodel, case)
    assert list(rp.anchor_sets) == ["float32"]
    assert rp.anchor_sets["float32"].max_error <= rp.options.tolerance
