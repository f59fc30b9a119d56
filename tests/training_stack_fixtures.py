"""Tiny BERT and Llama and a made-up token data set, shared by the training-stack test modules.

``test_training_stack`` (Trainer, accelerate), ``test_training_stack_devices``,
``test_training_stack_peft`` and ``test_training_stack_trl`` train these models:
built from their configs' default values (only sizes changed), on token ids
made here, padded to the longest row so the mask has zeros and batch lengths change.
A test module importing this one is skipped when transformers is not installed,
as when these helpers lived in ``test_training_stack``.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

_SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=100)
_ROWS = 16  # examples in the made-up data set


def tiny_bert():
    """A seeded BERT sequence classifier from ``BertConfig``'s defaults, small sizes, in training mode."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**_SMALL, max_position_embeddings=64)).train()


def tiny_llama():
    """A seeded Llama causal LM from ``LlamaConfig``'s defaults, small sizes, in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(**_SMALL, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).train()


def token_rows(causal: bool) -> list[dict]:
    """Token ids of varied length; labels are a class (BERT) or the ids themselves (causal LM)."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(_ROWS):
        n = int(torch.randint(5, 14, (1,), generator=g))
        ids = torch.randint(1, 100, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids if causal else i % 2})
    return rows


def collate(rows: list[dict]) -> dict:
    """Right padding to the longest row: the attention mask has zeros and the length changes per batch."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    causal = isinstance(rows[0]["labels"], list)
    labels = torch.full((len(rows), n), -100, dtype=torch.long) if causal else torch.tensor([r["labels"] for r in rows])
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, :len(r["input_ids"])] = 1
        if causal:
            labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def example_batch(causal: bool) -> dict:
    """The example inputs for conversion: the first 3 rows, a batch shape other than training's 4."""
    return collate(token_rows(causal)[:3])


def count_forwards(monkeypatch, cls) -> list[int]:
    """Count every run of ``cls.forward`` (forward, checkpoint recompute, reversible reconstruction).

    ``cls`` is a module inside each block (its MLP), run once per block run: transformers wraps the
    layer's own ``forward`` in its checkpoint at class creation, so a count on the layer's class
    attribute would sit outside the recompute.
    """
    calls = [0]
    original = cls.forward

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counted)
    return calls
