"""PEFT-wrapped models converted by revify: the user's adapters keep training, save/load round-trips.

Tiny BERT from its config's default values (sizes changed only); LoRA, IA3
and prompt tuning from peft; token ids made here.
"""
from __future__ import annotations

import pytest
import torch

import revify

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from training_stack_fixtures import collate, example_batch, tiny_bert, token_rows  # noqa: E402


def _lora():
    return peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, target_modules=["query", "value"])


def _configs():
    return {"lora": _lora(),
            "ia3": peft.IA3Config(task_type=peft.TaskType.SEQ_CLS, target_modules=["key", "value", "output.dense"],
                                  feedforward_modules=["output.dense"]),
            "prompt": peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=4)}


def _trainable(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def _peft_names(module) -> set[str]:
    return {n for n in _trainable(module) if "revify_adapter" not in n}


@pytest.mark.parametrize("kind", ["lora", "ia3", "prompt"])
@pytest.mark.parametrize("strategy", ["reversible", "auto"])
def test_peft_parameters_stay_trainable(kind, strategy, one_thread):
    model = peft.get_peft_model(tiny_bert(), _configs()[kind])
    before = _trainable(model)
    assert before
    # auto: freeze_backbone asked for explicitly (its default is off), whatever the planner chooses
    rmodel = revify.revify(model, example_batch(False), strategy=strategy, freeze_backbone=True)
    plan = rmodel.revify_plan
    assert plan.converted and (plan.reversible or strategy == "auto"), plan.summary()
    after = _trainable(rmodel)
    assert before <= after, sorted(before - after)
    # freeze_backbone froze only pretrained weights: what trains now is PEFT's set plus revify's adapters
    assert after - before == {n for n in after if "revify_adapter" in n}
    if plan.reversible:
        assert after - before  # revify's adapters train too
    assert f"PEFT: {len(before)} of {len(before)} PEFT parameter(s) trainable" in plan.summary()


def test_lora_then_meft1_trains_lora_and_adapters(one_thread):
    torch.manual_seed(0)
    rmodel = revify.revify(peft.get_peft_model(tiny_bert(), _lora()), example_batch(False), strategy="reversible")
    lora = {n: p for n, p in rmodel.named_parameters() if "lora_" in n}
    adapters = {n: p for n, p in rmodel.named_parameters() if "revify_adapter" in n}
    assert len(lora) == 12 and adapters
    start = {n: p.detach().clone() for n, p in list(lora.items()) + list(adapters.items())}
    batch = collate(token_rows(False)[:4])

    def grads():
        torch.manual_seed(5)  # the same dropout masks in both runs
        rmodel(**batch).loss.backward()
        out = {n: p.grad.clone() for n, p in rmodel.named_parameters() if p.grad is not None}
        rmodel.zero_grad(set_to_none=True)
        return out

    optimizer = torch.optim.AdamW([p for p in rmodel.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        got = grads()
        with revify.stored_activations(rmodel):
            want = grads()
        assert got.keys() == want.keys() == _trainable(rmodel)
        for name in want:
            err = (got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-30)
            assert err <= 1e-4 or (got[name] - want[name]).abs().max() < 1e-9, (name, err.item())
        for name, p in rmodel.named_parameters():
            p.grad = got.get(name)
        optimizer.step()
        rmodel.zero_grad(set_to_none=True)
    for name, p in list(lora.items()) + list(adapters.items()):
        assert not torch.equal(p, start[name]), f"{name} did not train"


def _logits(module, batch):
    module.eval()
    with torch.no_grad():
        return module(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("strategy", ["checkpoint", "reversible"])
@pytest.mark.parametrize("order", ["peft_then_revify", "revify_then_peft"])
def test_peft_wrapped_converted_model_saves_and_loads(tmp_path, strategy, order, one_thread):
    example = example_batch(False)
    kw = {"schedule": "per-block"} if strategy == "checkpoint" else {}
    if order == "peft_then_revify":
        rmodel = revify.revify(peft.get_peft_model(tiny_bert(), _lora()), example, strategy=strategy, **kw)
    else:  # PEFT wraps the converted model; its revify_plan names blocks of the inner model
        rmodel = peft.get_peft_model(revify.revify(tiny_bert(), example, strategy=strategy, **kw), _lora())
    with torch.no_grad():  # trained-looking values, so a load that kept the fresh ones would show
        for name, p in rmodel.named_parameters():
            if p.requires_grad or "revify_adapter" in name:
                p.add_(torch.randn_like(p) * 0.05)
    revify.save(rmodel, tmp_path / "saved", example)
    loaded = revify.load(tmp_path / "saved", model=peft.get_peft_model(tiny_bert(), _lora()))
    assert loaded.revify_plan.converted
    assert _trainable(loaded) == _trainable(rmodel)
    batch = collate(token_rows(False)[4:9])
    assert torch.equal(_logits(loaded, batch), _logits(rmodel, batch))


def test_peft_save_pretrained_still_writes_only_the_adapter(tmp_path, one_thread):
    rmodel = revify.revify(peft.get_peft_model(tiny_bert(), _lora()), example_batch(False), schedule="per-block")
    with torch.no_grad():
        for p in rmodel.parameters():
            if p.requires_grad:
                p.add_(0.1)
    rmodel.save_pretrained(str(tmp_path / "adapter"))
    files = {f.name for f in (tmp_path / "adapter").iterdir()}
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert "model.safetensors" not in files and "revify.json" not in files
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
    assert keys and all("lora_" in k or "classifier" in k for k in keys), sorted(keys)
    # the plain PEFT way back gives the trained adapter on a fresh base
    again = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "adapter"))
    batch = collate(token_rows(False)[4:9])
    assert torch.equal(_logits(again, batch), _logits(rmodel, batch))


def test_reversible_peft_save_pretrained_warns_that_revify_adapters_are_not_in_it(tmp_path, one_thread):
    rmodel = revify.revify(peft.get_peft_model(tiny_bert(), _lora()), example_batch(False), strategy="reversible")
    with pytest.warns(UserWarning, match="revify.save"):
        rmodel.save_pretrained(str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
    assert keys and not any("revify_adapter" in k for k in keys)
