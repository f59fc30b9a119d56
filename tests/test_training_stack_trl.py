"""A converted causal LM under TRL's SFTTrainer, with and without packing.

The data set is token ids made here (TRL takes an ``input_ids`` column as
already tokenized); the tokenizer SFTTrainer wants for padding and EOS is a
word-level one built from a made-up vocabulary, so nothing is downloaded.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import revify

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from training_stack_fixtures import count_forwards, example_batch, tiny_llama, token_rows  # noqa: E402


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _sft(model, tmp_path, packing: bool, steps: int = 3, **kw):
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, max_length=32,
                         packing=packing, learning_rate=1e-2, logging_steps=1, save_strategy="no", seed=0,
                         report_to="none", use_cpu=True, disable_tqdm=True, **kw)
    data = datasets.Dataset.from_dict({"input_ids": [r["input_ids"] for r in token_rows(True)]})
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("packing", [False, True])
def test_sft_checkpoint_losses_equal_the_unconverted_model(tmp_path, monkeypatch, packing, one_thread):
    from transformers.models.llama.modeling_llama import LlamaMLP
    calls = count_forwards(monkeypatch, LlamaMLP)
    plain = tiny_llama()
    plain_losses = _sft(plain, tmp_path / "plain", packing, gradient_checkpointing=False)
    plain_calls = calls[0]
    rmodel = revify.revify(tiny_llama(), example_batch(True), schedule="per-block")
    calls[0] = 0  # count the training only, not the analysis
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        # SFTConfig turns gradient checkpointing on by default: revify's plan stays the only recompute
        losses = _sft(rmodel, tmp_path / "revify", packing)
    assert any("already recomputes" in str(w.message) for w in seen)
    assert len(losses) == 3 and losses == plain_losses
    for (name, a), b in zip(plain.named_parameters(), rmodel.parameters()):
        assert torch.equal(a, b), name
    assert calls[0] == 2 * plain_calls  # per-block: every block ran again in backward, once


def test_sft_trains_a_meft1_model(tmp_path, one_thread):
    rmodel = revify.revify(tiny_llama(), example_batch(True), strategy="reversible")
    assert rmodel.revify_plan.reversible
    adapters = {n: p.detach().clone() for n, p in rmodel.named_parameters() if "revify_adapter" in n}
    losses = _sft(rmodel, tmp_path, packing=False)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(p, adapters[n]) for n, p in rmodel.named_parameters() if n in adapters)
