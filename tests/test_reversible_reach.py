"""Reversible strategy on real families as users build them (issue 18, reversible part).

Each model is built from a small config that keeps the family's defaults
(dropout, drop-path, layer norms); what is checked: which chains convert,
gradients against ``revify.stored_activations`` within 1e-4 at the default
tolerance after perturbing the adapters away from zero, on three fresh
dropout draws; and for each refusal, the reason that names the construct.
Decoder-only LMs are called with ``use_cache=False`` here: the KV-cache
default is issue 18's other part.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import revify
from test_reversible import _assert_grads_close, _perturb_adapters
from zoo import ZooCase, _logits_loss, train_step

DRAWS = (11, 12, 13)  # three fresh dropout / drop-path draws, none of them the calibration's


def _text(vocab: int = 100, batch: int = 2, seq: int = 12) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (batch, seq))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in one row
    return {"input_ids": ids, "attention_mask": mask}


def _seq2seq() -> dict:
    inputs = _text()
    torch.manual_seed(2)
    inputs["decoder_input_ids"] = torch.randint(3, 100, (2, 7))
    return inputs


def _pixels() -> dict:
    torch.manual_seed(1)
    return {"pixel_values": torch.randn(2, 3, 32, 32)}


def distilbert() -> ZooCase:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    torch.manual_seed(0)
    m = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=3, n_heads=4,
                                                             hidden_dim=64)).train()
    return ZooCase("distilbert", m, _text(), _logits_loss, 3)


def deberta() -> ZooCase:
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification
    torch.manual_seed(0)
    m = DebertaV2ForSequenceClassification(DebertaV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                                           num_attention_heads=4, intermediate_size=64)).train()
    return ZooCase("deberta", m, _text(), _logits_loss, 3)


def albert() -> ZooCase:
    from transformers import AlbertConfig, AlbertForSequenceClassification
    torch.manual_seed(0)
    m = AlbertForSequenceClassification(AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32,
                                                     num_hidden_layers=3, num_attention_heads=4,
                                                     intermediate_size=64)).train()
    return ZooCase("albert", m, _text(), _logits_loss, 3)


def t5() -> ZooCase:
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4, decoder_start_token_id=0)
    m = T5ForConditionalGeneration(cfg).train()
    return ZooCase("t5", m, {**_seq2seq(), "use_cache": False}, _logits_loss, 3)


def bart() -> ZooCase:
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=100, d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    m = BartForConditionalGeneration(cfg).train()
    return ZooCase("bart", m, {**_seq2seq(), "use_cache": False}, _logits_loss, 3)


def gpt2() -> ZooCase:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100, n_positions=64)).train()
    return ZooCase("gpt2", m, {**_text(), "use_cache": False}, _logits_loss, 3)


def llama() -> ZooCase:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=100, num_key_value_heads=2, max_position_embeddings=64)).train()
    return ZooCase("llama", m, {**_text(), "use_cache": False}, _logits_loss, 3)


def falcon() -> ZooCase:
    from transformers import FalconConfig, FalconForCausalLM
    torch.manual_seed(0)
    m = FalconForCausalLM(FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                       num_attention_heads=4)).train()
    return ZooCase("falcon", m, {**_text(), "use_cache": False}, _logits_loss, 3)


def resnet() -> ZooCase:
    from transformers import ResNetConfig, ResNetForImageClassification
    torch.manual_seed(0)
    m = ResNetForImageClassification(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[3, 3],
                                                  num_labels=5)).train()
    return ZooCase("resnet", m, _pixels(), _logits_loss, 6)


def convnext() -> ZooCase:
    from transformers import ConvNextConfig, ConvNextForImageClassification
    torch.manual_seed(0)
    m = ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[16, 32], depths=[3, 3], num_stages=2,
                                                      num_labels=5, image_size=32)).train()
    return ZooCase("convnext", m, _pixels(), _logits_loss, 6)


def swin() -> ZooCase:
    from transformers import SwinConfig, SwinForImageClassification
    torch.manual_seed(0)
    m = SwinForImageClassification(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2],
                                              num_heads=[2, 4], window_size=4, num_labels=5)).train()
    return ZooCase("swin", m, _pixels(), _logits_loss, 4)


FAMILIES = {f.__name__: f for f in (distilbert, deberta, albert, t5, bart, gpt2, llama, falcon, resnet, convnext,
                                    swin)}


def _converted(family: str, coupling: str) -> tuple[ZooCase, nn.Module]:
    case = FAMILIES[family]()
    rmodel = revify.revify(case.model, case.example_inputs, strategy="reversible", coupling=coupling)
    return case, rmodel


def _parents(rmodel: nn.Module) -> set[str]:
    return {p.chain.parent for p in rmodel.revify_plan.reversible}


def _assert_matches_stored_on_fresh_draws(case: ZooCase, rmodel: nn.Module) -> None:
    _perturb_adapters(rmodel)
    for seed in DRAWS:
        _, loss_rev, grads_rev = train_step(rmodel, case, seed=seed)
        with revify.stored_activations(rmodel):
            _, loss_ref, grads_ref = train_step(rmodel, case, seed=seed)
        assert torch.allclose(loss_rev, loss_ref, rtol=1e-6), (seed, loss_rev, loss_ref)
        assert grads_rev, "nothing trainable"
        _assert_grads_close(grads_rev, grads_ref)


# family, coupling, the parents whose chains must convert
CONVERTS = [
    ("distilbert", "meft1", {"distilbert.transformer"}),
    ("distilbert", "meft3", {"distilbert.transformer"}),
    ("deberta", "meft1", {"deberta.encoder"}),
    ("deberta", "meft3", {"deberta.encoder"}),
    ("t5", "meft1", {"encoder", "decoder"}),
    ("bart", "meft1", {"model.encoder", "model.decoder"}),
    ("bart", "meft2", {"model.encoder", "model.decoder"}),
    ("gpt2", "meft1", {"transformer"}),
    ("gpt2", "meft3", {"transformer"}),
    ("llama", "meft1", {"model"}),
    ("llama", "meft3", {"model"}),
    ("falcon", "meft1", {"transformer"}),
    ("resnet", "revnet", {"resnet.encoder.stages.0", "resnet.encoder.stages.1"}),
    ("convnext", "revnet", {"convnext.encoder.stages.0", "convnext.encoder.stages.1"}),
    ("swin", "meft1", {"swin.encoder.layers.0", "swin.encoder.layers.1"}),
    ("swin", "revnet", {"swin.encoder.layers.0", "swin.encoder.layers.1"}),
]


@pytest.mark.parametrize("family,coupling,parents", CONVERTS, ids=[f"{f}-{c}" for f, c, _ in CONVERTS])
def test_family_converts_and_matches_stored_activations(family, coupling, parents):
    case, rmodel = _converted(family, coupling)
    plan = rmodel.revify_plan
    assert parents <= _parents(rmodel), plan.summary()
    for rp in plan.reversible:
        assert max(rp.step_errors, default=0.0) <= rp.options.tolerance, plan.summary()
    _assert_matches_stored_on_fresh_draws(case, rmodel)
