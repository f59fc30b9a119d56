"""A converted model inside transformers' Trainer: checkpoints that reload as converted, one owner of recompute.

Tiny BERT and Llama built from their configs' default values (only sizes
changed), token ids made here, padded batches of changing length (all from
``training_stack_fixtures``).
"""
from __future__ import annotations

import warnings

import pytest
import torch

import revify

transformers = pytest.importorskip("transformers")

from training_stack_fixtures import (  # noqa: E402
    collate, count_forwards, example_batch, tiny_bert, tiny_llama, token_rows)


def _args(tmp_path, **kw):
    from transformers import TrainingArguments
    base = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4, save_steps=2,
                learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, seed=0,
                dataloader_num_workers=0, disable_tqdm=True, save_only_model=False)
    base.update(kw)
    return TrainingArguments(**base)


def _train(rmodel, tmp_path, causal: bool, **kw):
    from transformers import Trainer
    trainer = Trainer(model=rmodel, args=_args(tmp_path, **kw), train_dataset=token_rows(causal), data_collator=collate)
    trainer.train()
    return trainer


def _eval_logits(module, batch: dict) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        out = module(**{k: v for k, v in batch.items() if k != "labels"}).logits
    module.train()
    return out


@pytest.mark.parametrize("strategy", ["checkpoint", "reversible"])
def test_trainer_checkpoints_reload_as_converted(tmp_path, strategy, one_thread):
    rmodel = revify.revify(tiny_bert(), example_batch(False), strategy=strategy, **(
        {"schedule": "per-block"} if strategy == "checkpoint" else {}))
    assert rmodel.revify_plan.converted
    trainable = sorted(n for n, p in rmodel.named_parameters() if p.requires_grad)
    trainer = _train(rmodel, tmp_path, causal=False)
    trainer.save_model(str(tmp_path / "final"))
    batch = collate(token_rows(False)[5:10])
    want = _eval_logits(rmodel, batch)
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-4"):
        assert (folder / "revify.json").is_file(), folder
        loaded = revify.load(folder)
        assert loaded.revify_plan.converted
        assert sorted(n for n, p in loaded.named_parameters() if p.requires_grad) == trainable
        assert torch.equal(_eval_logits(loaded, batch), want), folder
    # the earlier checkpoint holds the earlier weights, not the final ones
    early = revify.load(tmp_path / "run" / "checkpoint-2")
    assert not torch.equal(_eval_logits(early, batch), want)


def test_meft_folder_loads_backbone_with_plain_from_pretrained(tmp_path, one_thread):
    from transformers import BertForSequenceClassification
    rmodel = revify.revify(tiny_bert(), example_batch(False), strategy="reversible")
    _train(rmodel, tmp_path, causal=False, max_steps=2)
    plain = BertForSequenceClassification.from_pretrained(str(tmp_path / "run" / "checkpoint-2"))
    for name, p in plain.named_parameters():
        assert torch.equal(p, rmodel.get_parameter(name)), name  # backbone as trained; adapters left out


def test_resume_from_converted_checkpoint_continues_exactly(tmp_path, one_thread):
    example = example_batch(False)
    straight = revify.revify(tiny_bert(), example, schedule="per-block")
    _train(straight, tmp_path / "a", causal=False)
    resumed = revify.load(tmp_path / "a" / "run" / "checkpoint-2")  # the model rebuilt as converted
    from transformers import Trainer
    trainer = Trainer(model=resumed, args=_args(tmp_path / "b"), train_dataset=token_rows(False), data_collator=collate)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "run" / "checkpoint-2"))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family,strategy", [("bert", "checkpoint"), ("bert", "reversible"),
                                             ("llama", "checkpoint")])
def test_hf_gradient_checkpointing_flag_does_not_stack(tmp_path, monkeypatch, family, strategy, one_thread):
    from transformers.models.bert.modeling_bert import BertIntermediate
    from transformers.models.llama.modeling_llama import LlamaMLP
    calls = count_forwards(monkeypatch, BertIntermediate if family == "bert" else LlamaMLP)
    causal = family == "llama"
    counts, warned = {}, {}
    for flag in (False, True):
        model = tiny_llama() if causal else tiny_bert()
        rmodel = revify.revify(model, example_batch(causal), strategy=strategy)
        assert rmodel.revify_plan.converted
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            calls[0] = 0
            _train(rmodel, tmp_path / str(flag), causal, max_steps=2, save_strategy="no", gradient_checkpointing=flag)
        counts[flag] = calls[0]
        warned[flag] = any("already recomputes" in str(w.message) for w in seen)
    # 2 steps x 3 blocks: at least one forward each, and the flag adds none
    assert counts[True] == counts[False] >= 2 * 3, counts
    assert warned == {False: False, True: True}


@pytest.mark.parametrize("strategy", ["checkpoint", "reversible"])
def test_checkpointing_on_before_conversion_is_turned_off_on_the_copy(monkeypatch, strategy, one_thread):
    from transformers.models.bert.modeling_bert import BertIntermediate
    calls = count_forwards(monkeypatch, BertIntermediate)
    example = example_batch(False)
    counts = []
    for flag in (False, True):
        model = tiny_bert()
        if flag:
            model.gradient_checkpointing_enable()
        rmodel = revify.revify(model, example, strategy=strategy)  # budget plan: some blocks keep activations
        calls[0] = 0
        rmodel(**example).loss.backward()
        counts.append(calls[0])
        if flag:
            assert "gradient checkpointing was on" in rmodel.revify_plan.summary()
            assert model.bert.encoder.layer[0].gradient_checkpointing  # the user's model keeps its flag
    assert counts[0] == counts[1] > 3, counts


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_converting_twice_says_already_converted(build, one_thread):
    causal = build is tiny_llama
    rmodel = revify.revify(build(), example_batch(causal))  # the default budget plan keeps some blocks as they are
    assert rmodel.revify_plan.converted
    again = revify.revify(rmodel, example_batch(causal))
    assert not again.revify_plan.converted
    assert "already converted" in again.revify_plan.summary()
    with pytest.raises(revify.RevifyError, match="already converted"):
        revify.revify(rmodel, example_batch(causal), strategy="reversible", strict=True)


def test_accelerate_with_gradient_accumulation_saves_as_converted(tmp_path, one_thread):
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    rmodel = revify.revify(tiny_bert(), example_batch(False), strategy="reversible")
    optimizer = torch.optim.AdamW([p for p in rmodel.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(rmodel, optimizer)
    rows = token_rows(False)
    for i in range(4):
        with accelerator.accumulate(model):
            accelerator.backward(model(**collate(rows[2 * i:2 * i + 2])).loss)
            optimizer.step()
            optimizer.zero_grad()
    unwrapped = accelerator.unwrap_model(model)
    assert unwrapped is rmodel
    unwrapped.save_pretrained(str(tmp_path / "out"), is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save)
    loaded = revify.load(tmp_path / "out")
    batch = collate(rows[10:14])
    assert torch.equal(_eval_logits(loaded, batch), _eval_logits(rmodel, batch))


def test_sharded_save_pretrained_reloads_as_converted(tmp_path, one_thread):
    rmodel = revify.revify(tiny_bert(), example_batch(False), strategy="reversible")
    rmodel.save_pretrained(str(tmp_path / "out"), max_shard_size="20KB")  # large models: shards and an index
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    loaded = revify.load(tmp_path / "out")
    batch = collate(token_rows(False)[:4])
    assert torch.equal(_eval_logits(loaded, batch), _eval_logits(rmodel, batch))
