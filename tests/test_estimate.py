"""Estimates on fake tensors for models too big to run: against real measurements, and fast at 7B widths."""
from __future__ import annotations

import time

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import revify
from revify.estimate import estimate, fit_scaled
from revify.measure import CATEGORIES

transformers = pytest.importorskip("transformers")


def llama(hidden=64, inter=128, layers=2, heads=4, vocab=200):
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                   use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).train()


def padded_text(batch, seq, vocab=200):
    torch.manual_seed(1)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, -3:] = 0
    return {"input_ids": torch.randint(0, vocab, (batch, seq)), "attention_mask": mask}


def close(a: int, b: int, rel: float = 0.05) -> bool:
    return abs(a - b) <= rel * max(abs(b), 1)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.parametrize("strategy,options,mask", [("checkpoint", {"schedule": "per-block"}, True),
                                                   ("checkpoint", {"schedule": "per-block"}, False),
                                                   ("reversible", {"coupling": "meft1", "tolerance": 1.0}, True)])
def test_fake_estimate_matches_real_measurement(strategy, options, mask):
    """Same small config, same inputs: revify's pipeline and the step on fake tensors vs real tensors.

    Without an attention mask, transformers would build a causal mask on fake tensors that a real run
    leaves to SDPA (``passes/prediction/fake_transformers.py``); the figures must still agree.
    """
    inputs = padded_text(2, 16) if mask else {"input_ids": padded_text(2, 16)["input_ids"]}
    rmodel = revify.revify(llama(), inputs, strategy, **options)
    # before: a fresh copy, as estimate measures it before converting (freeze_backbone changes what trains)
    real = revify.report(llama(), rmodel, inputs, repeats=1, formulas=False)
    fake = estimate(lambda: llama(), inputs, strategy, formulas=False, **options)
    assert fake.estimated and fake.before.step_time_s is None
    assert [c.strategy for c in fake.chains] == [c.strategy for c in real.chains] and fake.chains
    for which in ("before", "after"):
        r, f = getattr(real, which), getattr(fake, which)
        for name in ("saved_bytes", "peak_bytes", "retained_bytes", "param_bytes"):
            assert close(getattr(f, name), getattr(r, name)), (which, name, getattr(f, name), getattr(r, name))
        for c in CATEGORIES:
            assert abs(f.peak_by_category[c] - r.peak_by_category[c]) <= 0.05 * r.peak_bytes, (which, c)
    for fc, rc in zip(fake.chains, real.chains):
        assert close(fc.saved_before, rc.saved_before) and close(fc.saved_after, rc.saved_after)


def test_scaled_formulas_from_real_runs_predict_a_bigger_fake_estimate():
    """The reduced version of bench/estimate_7b.py part 2: widths scaled by w, depth fixed."""
    def build(v):
        w = v["w"]
        return llama(hidden=64 * w, inter=172 * w, heads=w, vocab=500 * w), \
            {"input_ids": torch.randint(0, 500 * w, (1, v["S"]))}

    formulas = fit_scaled(build, {"w": [2, 3, 4, 5, 6, 7], "S": [8, 16, 24, 32, 40, 48]}, guess={"w": 2, "S": 2})
    assert formulas["before"].symbols == ("w", "S")
    target = {"w": 12, "S": 160}
    rep = estimate(lambda: build(target)[0], {"input_ids": torch.empty(1, 160, dtype=torch.long, device="meta")},
                   formulas=False)
    for which in ("before", "after"):
        predicted, fake = formulas[which].evaluate(**target), getattr(rep, which)
        assert predicted["params"] == fake.param_bytes  # exact: a polynomial in w
        assert close(predicted["saved"], fake.saved_bytes), which
        assert close(predicted["peak"], fake.peak_bytes), which


def test_llama_7b_widths_estimate_fast_without_memory():
    """Llama-2-7B widths at sequence 4096 with 2 of its 32 layers (the bench runs all 32)."""
    layers, hidden, inter, vocab = 2, 4096, 11008, 32000
    rss0, t0 = rss_bytes(), time.perf_counter()
    rep = estimate(lambda: llama(hidden, inter, layers, 32, vocab),
                   {"input_ids": torch.empty(1, 4096, dtype=torch.long, device="meta")}, formulas=False)
    elapsed, grown = time.perf_counter() - t0, rss_bytes() - rss0
    assert elapsed < 60 and grown < 2 ** 30, (elapsed, grown)
    n_params = 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) + hidden
    rotary_buffers = 2 * (hidden // 32 // 2)  # inv_freq and original_inv_freq
    assert rep.before.param_bytes == 4 * (n_params + rotary_buffers)  # fp32, nothing allocated
    # every parameter trains: at the end of backward all their gradients are alive
    assert rep.after.peak_by_category["gradients"] <= 4 * n_params
    assert rep.after.saved_bytes < rep.before.saved_bytes / 3
    assert rep.chains[0].blocks == layers and "estimated" in str(rep).lower()


def test_meta_models_and_report_on_meta_device():
    inputs = padded_text(2, 12)
    with torch.device("meta"):
        meta_model = llama()
    meta_inputs = {k: v.to("meta") for k, v in inputs.items()}
    from_meta = estimate(meta_model, meta_inputs, schedule="sqrt(n)", formulas=False)
    from_builder = estimate(lambda: llama(), inputs, schedule="sqrt(n)", formulas=False)
    assert from_meta.before == from_builder.before and from_meta.after == from_builder.after
    assert from_meta.device == "cpu"  # meta tensors run with the CPU kernels
    # report(device="meta") on real models: fake copies, the user's model untouched
    model = llama()
    rmodel = revify.revify(model, inputs, schedule="sqrt(n)")
    est = revify.report(model, rmodel, inputs, device="meta", formulas=False)
    real = revify.report(model, rmodel, inputs, repeats=1, formulas=False)
    assert est.estimated and "ESTIMATED" in str(est) and "not timed" in str(est)
    assert est.before.saved_bytes == real.before.saved_bytes and est.after.peak_bytes == real.after.peak_bytes
    assert all(not isinstance(p, FakeTensor) and p.grad is None for p in model.parameters())


def test_estimate_refuses_what_fake_tensors_cannot_plan():
    with pytest.raises(ValueError, match="budget planner needs measured"):
        estimate(lambda: llama(), padded_text(1, 4), schedule="budget")
    with pytest.raises(ValueError, match="strategy must be"):
        estimate(lambda: llama(), padded_text(1, 4), strategy="auto")


def test_mask_shim_is_scoped_to_fake_tensors_and_derived_position_ids():
    import transformers.masking_utils as masking

    from revify.passes.prediction.fake_copy import new_fake_mode
    from revify.passes.prediction.fake_transformers import real_mask_path

    original = masking.find_packed_sequence_indices
    packed = torch.tensor([[0, 1, 2, 0, 1]])  # two sequences in one row
    with real_mask_path({"input_ids": torch.zeros(1, 5, dtype=torch.long)}):
        assert masking.find_packed_sequence_indices(packed) is not None  # real tensors: transformers decides
        with new_fake_mode() as mode:
            fake = mode.from_tensor(packed)
            assert masking.find_packed_sequence_indices(fake) is None
    assert masking.find_packed_sequence_indices is original
    with real_mask_path({"input_ids": packed, "position_ids": packed}):  # the caller's own positions: untouched
        assert masking.find_packed_sequence_indices is original
