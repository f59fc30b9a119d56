"""Checks of the reversible strategy against ``revify.stored_activations``, shared by its test modules.

``test_reversible``, ``test_reversible_reach`` and ``test_reversible_refusals``
compare a reversible model's gradients with those of the same model storing
its activations: the adapters are first moved away from zero (so every path
carries gradient), then each parameter's gradient must be within ``GRAD_RTOL``.
"""
from __future__ import annotations

import torch
from torch import nn

import revify
from zoo import ZooCase, train_step

GRAD_RTOL = 1e-4  # relative, per parameter, fp32
DRAWS = (11, 12, 13)  # three fresh dropout / drop-path draws, none of them the calibration's; the last
# on a batch of another shape


def perturb_adapters(rmodel: nn.Module, seed: int = 3) -> None:
    """Zero-initialised adapters make G = 0: give them values so every path carries gradient."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in rmodel.named_parameters():
            if "revify_adapter" in name:
                p.normal_(0, 0.05)


def assert_grads_close(got: dict, ref: dict) -> None:
    """Same parameters, each gradient within ``GRAD_RTOL`` of the reference (relative norm) or below 1e-9 off."""
    assert got.keys() == ref.keys()
    for k in ref:
        err = (got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)
        assert err <= GRAD_RTOL or (got[k] - ref[k]).abs().max() < 1e-9, (k, err.item())


def text_inputs(vocab: int = 100, batch: int = 2, seq: int = 12) -> dict:
    """Seeded token ids with an attention mask that pads the last 3 positions of row 1."""
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in one row
    return {"input_ids": ids, "attention_mask": mask}


def other_batch(inputs: dict | tuple) -> dict | tuple:
    """The example inputs with another batch size (and sequence length): what training feeds later."""
    torch.manual_seed(4)
    if isinstance(inputs, tuple):
        return tuple(torch.randn(3, *x.shape[1:]) for x in inputs)
    if "input_features" in inputs:
        return {**inputs, "input_features": torch.randn(3, *inputs["input_features"].shape[1:]),
                "decoder_input_ids": inputs["decoder_input_ids"][:1].repeat(3, 1)}
    if "pixel_values" in inputs:
        torch.manual_seed(4)
        return {"pixel_values": torch.randn(3, 3, 32, 32)}
    other = {**inputs, **text_inputs(batch=3, seq=9)}
    if "decoder_input_ids" in inputs:
        other["decoder_input_ids"] = inputs["decoder_input_ids"][:1].repeat(3, 1)
    return other


def assert_matches_stored_on_fresh_draws(case: ZooCase, rmodel: nn.Module) -> None:
    """Loss and gradients match stored activations on the ``DRAWS`` seeds, the last on ``other_batch``."""
    perturb_adapters(rmodel)
    other = ZooCase(case.name, case.model, other_batch(case.example_inputs), case.loss_fn, case.n_blocks)
    for seed, batch in zip(DRAWS, (case, case, other)):
        _, loss_rev, grads_rev = train_step(rmodel, batch, seed=seed)
        with revify.stored_activations(rmodel):
            _, loss_ref, grads_ref = train_step(rmodel, batch, seed=seed)
        assert torch.allclose(loss_rev, loss_ref, rtol=1e-6), (seed, loss_rev, loss_ref)
        assert grads_rev, "nothing trainable"
        assert_grads_close(grads_rev, grads_ref)
