"""Checkpoint mode on models as users load them: each family's DEFAULT config (issue 18).

Every model is built (``zoo_defaults.FAMILIES``) from a small config that keeps the family's defaults:
``use_cache`` as the config has it (True for the decoders), ``layer_types``
as the family sets them (Gemma 2 alternates sliding and full attention over
4 layers, Gemma 3 has 5 sliding to 1 full over 7). Dropout is turned on where
the family defaults it off, so that recompute must replay the RNG. Each
model is converted with ``revify(model, inputs)`` (the budget planner) and
``schedule="per-block"``, then trained the way users train: a default call
(no ``use_cache=False``), a padded attention mask, a batch shape other than
the example's. Losses and gradients must be ``torch.equal`` to the original's,
and per-block must keep fewer bytes for backward.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import revify
from revify.measure import measure_saved_bytes

transformers = pytest.importorskip("transformers")
T = transformers

from zoo_defaults import FAMILIES  # noqa: E402  (the family builders, shared with test_reversible_reach)

VISION = {"swin", "convnext", "resnet"}
CACHE_CHANGES_BITS = {"gpt2", "t5"}
ENCODER_DECODER = {"t5", "bart"}


def _inputs(name: str, batch: int, seq: int, left_pad: bool = False) -> dict:
    g = torch.Generator().manual_seed(100 * batch + seq)
    if name in VISION:
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0  # padding in one row: the mask is a real input
    out = {"input_ids": ids, "attention_mask": mask}
    if name in ENCODER_DECODER:
        out["decoder_input_ids"] = torch.randint(3, 100, (batch, seq - 2), generator=g)
    return out


def _loss(out) -> torch.Tensor:
    return out.logits.float().pow(2).mean()


def _step(model, batch: dict, seed: int = 7) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    loss = _loss(model(**batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same(reference: tuple, converted: tuple) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = reference, converted
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_default_config_converts_and_trains_exactly(name):
    torch.manual_seed(0)
    model = FAMILIES[name]().train()
    example = _inputs(name, 2, 12)
    batch = _inputs(name, 3, 9, left_pad=name not in ENCODER_DECODER)  # the call users train with
    reference_batch = batch
    if name in CACHE_CHANGES_BITS:
        # the KV cache alone changes these families' gradients in the last bits (the cache's cat makes
        # keys contiguous): the converted model trains without a cache, as HF's gradient checkpointing
        # does, so it is compared with the original called the same way
        reference_batch = {**batch, "use_cache": False}
        cached, uncached = _step(model, batch), _step(model, reference_batch)
        assert torch.allclose(cached[0], uncached[0], rtol=1e-5)
        assert all(torch.allclose(cached[1][k], uncached[1][k], rtol=1e-4, atol=1e-7) for k in cached[1])
    reference = _step(model, reference_batch)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warnings of transformers' code
        planned = revify.revify(model, example)
        per_block = revify.revify(model, example, schedule="per-block")
    for rmodel in (planned, per_block):
        plan = rmodel.revify_plan
        # the planner may keep every activation where that is the least peak (tiny MoE blocks)
        assert (plan.converted if rmodel is per_block else plan.planned) and not plan.errors, plan.summary()
        assert sum(len(c.chain.blocks) for c in plan.chains) >= 3, plan.summary()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _assert_same(reference, _step(planned, batch))
        _assert_same(reference, _step(per_block, batch))
    messages = [str(w.message) for w in caught]
    # nothing ran plainly: the run-time argument check found nothing to refuse
    assert not [m for m in messages if "runs without recomputation" in m], messages
    if getattr(model.config, "use_cache", False):
        assert any("setting use_cache=False" in m for m in messages)

    saved_plain, _ = measure_saved_bytes(model, reference_batch, _loss)
    saved_ckpt, _ = measure_saved_bytes(per_block, batch, _loss)
    assert saved_ckpt < saved_plain


def test_alternating_layer_types_form_one_chain_with_segments_per_side_input():
    """Gemma 3 (5 sliding : 1 full): one chain of 7; no multi-block segment mixes masks."""
    torch.manual_seed(0)
    model = FAMILIES["gemma3"]().train()
    assert model.config.layer_types[5] == "full_attention" and model.config.layer_types[4] == "sliding_attention"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = revify.revify(model, _inputs("gemma3", 2, 12), schedule="sqrt(n)").revify_plan
    (chain,) = plan.chains
    groups = chain.chain.side_groups
    assert len(chain.chain.blocks) == 7 and groups[0] == groups[4] == groups[6] != groups[5]
    for s in chain.segments:
        assert len(set(groups[s.start:s.end])) == 1, [x.describe() for x in chain.segments]
    assert sum(s.end - s.start for s in chain.segments) == 7 and any(s.end - s.start > 1 for s in chain.segments)


def test_planner_profiles_each_kind_of_block_once_with_its_own_side_inputs():
    """Gemma 2 alternates two masks: two profiles, each block priced with the one of its own kind."""
    from revify.api import analyse_model
    from revify.passes.planning import profile_blocks

    torch.manual_seed(0)
    model = FAMILIES["gemma2"]().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, analysis = analyse_model(model, _inputs("gemma2", 2, 12), "checkpoint")
    (chain,) = analysis.chains
    assert chain.side_groups == (0, 1, 0, 1)
    seen = []
    original = profile_blocks.profile_block

    def counting(module, info, args, kwargs, repeats=3):
        seen.append(kwargs.get("attention_mask"))
        return original(module, info, args, kwargs, 1)

    profile_blocks.profile_block = counting
    try:
        (prof,) = profile_blocks.profile_chains(model, [chain])
    finally:
        profile_blocks.profile_block = original
    assert len(seen) == 2 and seen[0] is not seen[1]
    assert prof.blocks[0] is prof.blocks[2] and prof.blocks[1] is prof.blocks[3] and prof.blocks[0] is not prof.blocks[1]


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2"])
def test_generate_gives_the_original_tokens(name):
    torch.manual_seed(0)
    model = FAMILIES[name]().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rmodel = revify.revify(model, _inputs(name, 2, 12))
    assert rmodel.revify_plan.converted
    prompt = _inputs(name, 3, 6, left_pad=True)
    outs = []
    for m in (model, rmodel):
        m.eval()
        outs.append(m.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0))
    assert outs[0].shape == (3, 11) and torch.equal(outs[0], outs[1])


def test_cache_passed_in_training_runs_plainly_and_exactly():
    """Regression (issue 18): converted with use_cache=False, trained with a default call on a padded batch
    of another shape; and a call that hands the layers a cache anyway (an explicit one, or eval mode with
    grad enabled) runs those blocks plainly, with a warning, instead of recomputing with the cache."""
    torch.manual_seed(0)
    model = FAMILIES["llama"]().train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rmodel = revify.revify(model, {**_inputs("llama", 2, 12), "use_cache": False}, schedule="sqrt(n)")
    assert rmodel.revify_plan.converted
    batch = _inputs("llama", 3, 9, left_pad=True)
    _assert_same(_step(model, batch), _step(rmodel, batch))

    def cached():
        return {**batch, "past_key_values": T.DynamicCache(config=model.config), "use_cache": True}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _assert_same(_step(model, cached()), _step(rmodel, cached()))
    assert any("receives a mutable object (DynamicCache)" in str(w.message) for w in caught)
    model.eval(), rmodel.eval()  # eval with grad enabled: the cache is built, as in the original
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same(_step(model, batch), _step(rmodel, batch))


def test_shared_module_each_call_is_a_block():
    """ALBERT's one layer group, called 3 times: 3 blocks, each call checkpointed on its own."""
    torch.manual_seed(0)
    model = FAMILIES["albert"]().train()
    rmodel = revify.revify(model, _inputs("albert", 2, 12), schedule="sqrt(n)")
    (chain,) = rmodel.revify_plan.chains
    assert chain.chain.shared and len({b.path for b in chain.chain.blocks}) == 1
    assert [s.end - s.start for s in chain.segments] == [1, 1, 1]
    batch = _inputs("albert", 3, 9)
    _assert_same(_step(model, batch), _step(rmodel, batch))
    rev = revify.revify(model, _inputs("albert", 2, 12), strategy="reversible").revify_plan
    assert not rev.reversible and any("shared module" in r.reason for r in rev.rejections)


def test_no_cache_in_training_rules():
    """The hook turns the cache off for training calls only, honours a forward's own default, warns once,
    and the analysis context leaves the user's model without hooks."""
    from torch import nn

    from revify.runtime.argument_check import runtime_refusal
    from revify.runtime.training_cache import analysing_without_cache, install_no_cache

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x, use_cache=True):
            self.seen.append(use_cache)
            return x

    class Wrapper(nn.Module):  # a user's module around a decoder: the hook goes on the decoder
        def __init__(self):
            super().__init__()
            self.decoder = Decoder()

        def forward(self, x):
            return self.decoder(x)

    model = Wrapper()
    assert install_no_cache(model) == 1
    x = torch.ones(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x), model(x)  # training: off, one warning
        with torch.no_grad():
            model(x)  # no_grad: the default (True) stays
        model.eval()(x)  # eval: stays
    assert model.decoder.seen == [False, False, True, True]
    assert len([w for w in caught if "use_cache" in str(w.message)]) == 1
    fresh = Wrapper().eval()
    with analysing_without_cache(fresh):
        fresh(x)  # revify's analysis: a training call whatever the mode
    fresh(x)
    assert fresh.decoder.seen == [False, True] and not fresh.decoder._forward_pre_hooks

    slot = ("arg", 0)
    assert runtime_refusal((x,), {"mask": None, "bias": (x, x), "n": 3}, slot) is None
    assert "mutable object (dict)" in runtime_refusal((x,), {"cache": {"k": x}}, slot)
    assert "mutable object (Decoder)" in runtime_refusal((x, (x, Decoder())), {}, slot)
    assert runtime_refusal((x, x.requires_grad_()), {}, slot) is None
    assert "requiring grad" in runtime_refusal((x, x), {}, slot, grad_free=[("arg", 1)])
