"""The README's Trainer example, as written there: a revified model trains under transformers' Trainer."""
from __future__ import annotations

import copy

import pytest
import torch

import revify

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # Trainer needs it


def _bert():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).train()


def _dataset(n: int = 8, seq: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        mask = torch.ones(seq, dtype=torch.long)
        mask[seq - 1 - i % 4:] = 0  # padded rows, as a tokenizer makes them
        rows.append({"input_ids": torch.randint(0, 100, (seq,), generator=g), "attention_mask": mask,
                     "labels": torch.tensor(i % 2)})
    return rows


def _train(model, tmp_path) -> list[float]:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                             seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset())
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_trainer_trains_a_revified_model_exactly_like_the_original(tmp_path):
    model = _bert()
    original = copy.deepcopy(model)
    example = {k: torch.stack([r[k] for r in _dataset()[:4]]) for k in ("input_ids", "attention_mask")}
    rmodel = revify.revify(model, example, memory_budget=None)  # the README's line
    assert rmodel.revify_plan.converted, rmodel.revify_plan.summary()
    losses = _train(rmodel, tmp_path / "revified")
    expected = _train(original, tmp_path / "original")
    assert len(losses) == 3 and losses == expected
    for (name, p), q in zip(rmodel.named_parameters(), original.parameters()):
        assert torch.equal(p, q), name
