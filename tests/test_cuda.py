"""CUDA: RNG replay, autocast recompute, SDPA's flash kernel under reversible chains, and the allocator's peak.

``pytest -m cuda`` runs these on a GPU (they are skipped, with the reason, where
none is present). ``REVIFY_CUDA_TESTS_ON_CPU=1`` runs the same code on CPU (CPU
autocast, no flash kernel, the live-tensor tracker instead of the allocator) so
that the tests themselves can be checked on a machine without a GPU.

Exactness on CUDA needs deterministic kernels in the original too (embedding and
attention backwards use atomics by default), so the exactness tests turn on
``torch.use_deterministic_algorithms`` and first check that the original model
reproduces itself bit for bit (else they skip, saying why); revify is compared
against that.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import replace

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; read when its handle is made

import pytest
import torch

import revify
from revify.api import analyse_model
from revify.device_step import measure_peak, to_device, train_step as plain_step
from revify.passes.planning.profile_blocks import profile_chains
from revify.passes.rewrite.rewrite_checkpoint import rewrite_checkpoint
from zoo import ALL_CASES, MLPResNet, ZooCase, _logits_loss, train_step, two_block_plan

ON_CPU = os.environ.get("REVIFY_CUDA_TESTS_ON_CPU", "") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU,
                                 reason="no CUDA device (set REVIFY_CUDA_TESTS_ON_CPU=1 to run this code on CPU)")]


@pytest.fixture
def deterministic():
    # strict, not warn_only: SDPA then leaves out its nondeterministic memory-efficient backward
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def _original_runs(fn, case):
    """The original's step twice; an op without a deterministic kernel on this device skips, naming it."""
    try:
        return fn(case.model, case), fn(case.model, case)
    except RuntimeError as exc:
        if "deterministic" not in str(exc):
            raise
        pytest.skip(f"the original {case.name} has no deterministic kernels on {DEVICE}: {str(exc).splitlines()[0]}")


def _on_device(case: ZooCase) -> ZooCase:
    return replace(case, model=case.model.to(DEVICE), example_inputs=to_device(case.example_inputs, DEVICE))


def _reproducible(model, case) -> tuple:
    """The original's (output, loss, grads); the test is void if the original does not reproduce itself."""
    first, second = _original_runs(lambda m, c: train_step(m, c), replace(case, model=model))
    same = torch.equal(first[0], second[0]) and all(torch.equal(first[2][k], second[2][k]) for k in first[2])
    if not same:
        pytest.skip(f"the original {case.name} is not bit-reproducible on {DEVICE} even with deterministic "
                    "algorithms: exactness cannot be tested here")
    return first


def _assert_same(got, ref, what):
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), what
    assert got[2].keys() == ref[2].keys(), what
    bad = [k for k in ref[2] if not torch.equal(got[2][k], ref[2][k])]
    assert not bad, (what, bad[:5])


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("name", ["bert", "llama", "gpt2"])
def test_segments_stems_and_save_ops_replay_cuda_rng_exactly(name):
    """Dropout on (BERT's hidden dropout, Llama's attention dropout inside SDPA, GPT-2's residual dropout):
    outputs and gradients bit-identical to the original for a recomputing segment with its stem, a
    save_matmuls segment and a save_ops segment (ops elided in recompute), on the device's RNG."""
    case = _on_device(ALL_CASES[name]())
    reference = _reproducible(case.model, case)
    _, _, analysis = analyse_model(case.model, case.example_inputs, "checkpoint")
    chain = analysis.chains[0]
    assert chain.stem is not None or name == "gpt2", name
    (prof,) = profile_chains(case.model, [chain], repeats=1)
    for policy, stem in (("recompute", True), ("save_matmuls", False), ("save_ops", True)):
        rmodel, _ = rewrite_checkpoint(case.model, [two_block_plan(chain, prof, policy, stem)])
        _assert_same(train_step(rmodel, replace(case, model=rmodel)), reference, (name, policy, stem))
    planned = revify.revify(case.model, case.example_inputs, strict=True)  # the budget planner's own plan
    _assert_same(train_step(planned, replace(case, model=planned)), reference, (name, "planner"))


def _autocast():
    return torch.autocast(DEVICE, dtype=torch.bfloat16)


def _amp_step(model, case):
    """Forward under bf16 autocast, backward outside (PyTorch's AMP recipe)."""
    torch.manual_seed(1)
    with _autocast():
        out = model(**case.example_inputs) if isinstance(case.example_inputs, dict) else model(*case.example_inputs)
        loss = case.loss_fn(out)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    value = out.logits if hasattr(out, "logits") else out
    return value.detach(), loss.detach(), grads


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("name", ["bert", "llama"])
@pytest.mark.parametrize("schedule", ["per-block", "budget"])
def test_bf16_autocast_recompute_is_bit_identical(name, schedule):
    case = _on_device(ALL_CASES[name]())
    first, second = _original_runs(_amp_step, case)
    if not all(torch.equal(first[2][k], second[2][k]) for k in first[2]):
        pytest.skip(f"the original {name} is not bit-reproducible under bf16 autocast on {DEVICE}")
    # the planner profiles under the training precision (no weight-cast cache: see revify.device_step)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, cache_enabled=False):
        rmodel = revify.revify(case.model, case.example_inputs, schedule=schedule if schedule != "budget" else None,
                               strict=True)
    got = _amp_step(rmodel, case)
    assert got[0].dtype == torch.bfloat16
    _assert_same(got, first, (name, schedule))


def _amp_two_forwards(model, case):
    """Two forwards in one bf16 autocast region (the second finds autocast's weight-cast cache warm, as
    gradient accumulation inside one region does), backward outside."""
    torch.manual_seed(1)
    with _autocast():
        losses = [case.loss_fn(model(**case.example_inputs)) for _ in range(2)]
    (losses[0] + losses[1]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return torch.stack([l.detach() for l in losses]), grads


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("policy", ["save_matmuls", "save_ops"])
def test_selective_segments_under_cuda_autocast_with_its_weight_cache(policy):
    """Selective segments match kept outputs to the recompute's ops by order; autocast's weight-cast cache
    (on by default) removes cast ops from a second forward in one region. Checkpointed calls run with the
    cache off: one forward per region is bit-identical, two in one region run and give the same losses
    (gradients within bf16 rounding: the original shares one cast across both forwards)."""
    case = _on_device(ALL_CASES["bert"]())
    first, second = _original_runs(_amp_step, case)
    if not all(torch.equal(first[2][k], second[2][k]) for k in first[2]):
        pytest.skip(f"the original bert is not bit-reproducible under bf16 autocast on {DEVICE}")
    two_ref = _amp_two_forwards(case.model, case)
    _, _, analysis = analyse_model(case.model, case.example_inputs, "checkpoint")
    chain = analysis.chains[0]
    (prof,) = profile_chains(case.model, [chain], repeats=1)
    rmodel, _ = rewrite_checkpoint(case.model, [two_block_plan(chain, prof, policy)])
    _assert_same(_amp_step(rmodel, case), first, policy)
    losses, grads = _amp_two_forwards(rmodel, case)
    assert torch.equal(losses, two_ref[0]), policy
    assert grads.keys() == two_ref[1].keys() and _rel(grads, two_ref[1]) < 2e-2, policy


def _flash():
    if DEVICE != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # raises where flash cannot run: the test sees it


def _rel(got: dict, ref: dict) -> float:
    return max(((got[k].float() - ref[k].float()).norm() / ref[k].float().norm().clamp_min(1e-30)).item()
               for k in ref)


@pytest.mark.parametrize("coupling", ["meft1", "meft3"])
def test_reversible_bf16_gradients_with_flash_attention_match_stored_activations(coupling):
    """Llama (attention dropout on, causal, no padding mask: SDPA takes the flash kernel, bf16 under
    autocast), reversible chain against the same model under ``stored_activations``: the first bf16
    step places anchors for bf16, later steps' adapter gradients stay within bf16 noise of stored."""
    case = ALL_CASES["llama"]()
    case = _on_device(replace(case, example_inputs={"input_ids": case.example_inputs["input_ids"]}))
    rmodel = revify.revify(case.model, case.example_inputs, strategy="reversible", coupling=coupling, strict=True)
    torch.manual_seed(3)
    with torch.no_grad():  # adapters away from zero, so their gradients carry the coupling's error
        for n, p in rmodel.named_parameters():
            if "revify_adapter" in n:
                p.normal_(0, 0.05)
    with _flash():
        with revify.stored_activations(rmodel):
            ref = _amp_step(rmodel, case)
        first = _amp_step(rmodel, case)  # calibrates anchors for bf16
        nxt = _amp_step(rmodel, case)
    assert ref[2] and ref[2].keys() == nxt[2].keys()
    assert any("revify_adapter" in k for k in ref[2])
    assert _rel(first[2], ref[2]) < 2e-2 and _rel(nxt[2], ref[2]) < 2e-2, (_rel(first[2], ref[2]),
                                                                              _rel(nxt[2], ref[2]))
    assert (nxt[0].float() - ref[0].float()).abs().max() <= 2e-2 * ref[0].float().abs().max()


def _bert_mid():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    model = BertForSequenceClassification(cfg).train().to(DEVICE)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (16, 128), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -20:] = 0
    return ZooCase("bert_mid", model, to_device({"input_ids": ids, "attention_mask": mask}, DEVICE), _logits_loss, 4)


def _mlp_mid():
    torch.manual_seed(0)
    x = torch.randn(2048, 512, generator=torch.Generator().manual_seed(1))
    return ZooCase("mlp_mid", MLPResNet(dim=512, n_blocks=8).train().to(DEVICE), (x.to(DEVICE),), _logits_loss, 8)


MID = {"bert_mid": _bert_mid, "mlp_mid": _mlp_mid}


def _step_peak(model, case) -> int:
    plain_step(model, case.example_inputs, case.loss_fn)  # warm-up: workspaces, kernels
    return measure_peak(model, case.example_inputs, case.loss_fn, DEVICE).step_peak_bytes


@pytest.mark.parametrize("name", sorted(MID))
def test_planner_predicted_peak_within_10_percent_of_max_memory_allocated(name):
    """The planner's predicted step peak (activations, gradients, temporaries) against
    ``max_memory_allocated`` over the step, less what was allocated when it started."""
    case = MID[name]()
    rmodel = revify.revify(case.model, case.example_inputs, loss_fn=case.loss_fn, strict=True)
    predicted = rmodel.revify_plan.budget.predicted_peak
    measured = _step_peak(rmodel, case)
    assert abs(predicted - measured) <= 0.10 * measured, (name, predicted, measured)


@pytest.mark.parametrize("name", sorted(MID))
def test_estimate_within_10_percent_of_the_measured_peak(name):
    """``revify.estimate`` (fake tensors, the device's kernels faked) against the allocator's step peak of the
    same model, before (plain) and after (per-block checkpointing)."""
    case = MID[name]()
    est = revify.estimate(case.model, case.example_inputs, loss_fn=case.loss_fn, device=DEVICE)
    plain = _step_peak(case.model, case)
    rmodel = revify.revify(case.model, case.example_inputs, schedule="per-block", strict=True)
    after = _step_peak(rmodel, case)
    assert abs(est.before.peak_bytes - plain) <= 0.10 * plain, (name, est.before.peak_bytes, plain)
    assert abs(est.after.peak_bytes - after) <= 0.10 * after, (name, est.after.peak_bytes, after)
