"""Reversible strategy on real families as users build them (issue 18, reversible part).

Each model is built from a small config that keeps the family's defaults
(dropout, drop-path, layer norms); what is checked: which chains convert,
gradients against ``revify.stored_activations`` within 1e-4 at the default
tolerance after perturbing the adapters away from zero, on three fresh
dropout draws; and for each refusal, the reason that names the construct.
Decoder-only LMs and encoder-decoders keep their default ``use_cache=True``: revify turns the
KV cache off in training calls, as users load these models.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

import revify
from reversible_checks import assert_matches_stored_on_fresh_draws, text_inputs
from zoo import ZooCase, _logits_loss
from zoo_defaults import FAMILIES as DEFAULT_BUILDERS


def _seq2seq() -> dict:
    inputs = text_inputs()
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
    return ZooCase("distilbert", m, text_inputs(), _logits_loss, 3)


def deberta() -> ZooCase:
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification
    torch.manual_seed(0)
    m = DebertaV2ForSequenceClassification(DebertaV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                                           num_attention_heads=4, intermediate_size=64)).train()
    return ZooCase("deberta", m, text_inputs(), _logits_loss, 3)


def albert() -> ZooCase:
    from transformers import AlbertConfig, AlbertForSequenceClassification
    torch.manual_seed(0)
    m = AlbertForSequenceClassification(AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32,
                                                     num_hidden_layers=3, num_attention_heads=4,
                                                     intermediate_size=64)).train()
    return ZooCase("albert", m, text_inputs(), _logits_loss, 3)


def t5() -> ZooCase:
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4, decoder_start_token_id=0)
    m = T5ForConditionalGeneration(cfg).train()
    return ZooCase("t5", m, _seq2seq(), _logits_loss, 3)


def bart() -> ZooCase:
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=100, d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    m = BartForConditionalGeneration(cfg).train()
    return ZooCase("bart", m, _seq2seq(), _logits_loss, 3)


def gpt2() -> ZooCase:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100, n_positions=64)).train()
    return ZooCase("gpt2", m, text_inputs(), _logits_loss, 3)


def llama() -> ZooCase:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=100, num_key_value_heads=2, max_position_embeddings=64)).train()
    return ZooCase("llama", m, text_inputs(), _logits_loss, 3)


def falcon() -> ZooCase:
    from transformers import FalconConfig, FalconForCausalLM
    torch.manual_seed(0)
    m = FalconForCausalLM(FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                       num_attention_heads=4)).train()
    return ZooCase("falcon", m, text_inputs(), _logits_loss, 3)


def whisper() -> ZooCase:
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=100, num_mel_bins=8, encoder_layers=2, decoder_layers=2, d_model=32,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1)
    m = WhisperForConditionalGeneration(cfg).train()
    torch.manual_seed(1)
    inputs = {"input_features": torch.randn(2, 8, 32), "decoder_input_ids": torch.randint(3, 100, (2, 7))}
    return ZooCase("whisper", m, inputs, _logits_loss, 2)


def mamba() -> ZooCase:
    from transformers import MambaConfig, MambaForCausalLM
    torch.manual_seed(0)
    m = MambaForCausalLM(MambaConfig(vocab_size=100, hidden_size=32, state_size=8, num_hidden_layers=3)).train()
    return ZooCase("mamba", m, {"input_ids": text_inputs()["input_ids"]}, _logits_loss, 3)


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


def _default_decoder(name: str) -> Callable[[], ZooCase]:
    """A decoder-only LM from ``zoo_defaults``' builder: the family's default config (``use_cache``,
    ``layer_types``: Gemma 2 alternates sliding/full over 4 layers, Gemma 3 has 5 sliding : 1 full over 7),
    attention / residual dropout on where the family has it."""
    def build() -> ZooCase:
        torch.manual_seed(0)
        m = DEFAULT_BUILDERS[name]().train()
        return ZooCase(name, m, text_inputs(), _logits_loss, m.config.num_hidden_layers)
    build.__name__ = name
    return build


FAMILIES = {f.__name__: f for f in (distilbert, deberta, albert, t5, bart, whisper, gpt2, llama, falcon, mamba,
                                    resnet, convnext, swin)}
FAMILIES.update({name: _default_decoder(name) for name in ("mistral", "qwen3", "phi3", "gpt_neox", "mixtral",
                                                            "gemma2", "gemma3")})


def _converted(family: str, coupling: str) -> tuple[ZooCase, nn.Module]:
    case = FAMILIES[family]()
    rmodel = revify.revify(case.model, case.example_inputs, strategy="reversible", coupling=coupling)
    return case, rmodel


def _parents(rmodel: nn.Module) -> set[str]:
    return {p.chain.parent for p in rmodel.revify_plan.reversible}


# family, coupling, the parents whose chains must convert
CONVERTS = [
    ("distilbert", "meft1", {"distilbert.transformer"}),
    ("distilbert", "meft3", {"distilbert.transformer"}),
    ("deberta", "meft1", {"deberta.encoder"}),
    ("deberta", "meft3", {"deberta.encoder"}),
    ("t5", "meft1", {"encoder", "decoder"}),
    ("bart", "meft1", {"model.encoder", "model.decoder"}),
    ("bart", "meft2", {"model.encoder", "model.decoder"}),
    ("whisper", "meft1", {"model.encoder", "model.decoder"}),
    ("gpt2", "meft1", {"transformer"}),
    ("gpt2", "meft3", {"transformer"}),
    ("llama", "meft1", {"model"}),
    ("llama", "meft3", {"model"}),
    ("falcon", "meft1", {"transformer"}),
    ("mamba", "meft1", {"backbone"}),  # its residual is kept in float32: found through the cast
    ("resnet", "revnet", {"resnet.encoder.stages.0", "resnet.encoder.stages.1"}),
    ("convnext", "revnet", {"convnext.encoder.stages.0", "convnext.encoder.stages.1"}),
    ("swin", "meft1", {"swin.encoder.layers.0", "swin.encoder.layers.1"}),
    ("swin", "meft3", {"swin.encoder.layers.0", "swin.encoder.layers.1"}),  # its attention weights are None
    ("t5", "meft3", {"encoder", "decoder"}),  # hands its position bias back
    ("swin", "revnet", {"swin.encoder.layers.0", "swin.encoder.layers.1"}),
    # Gemma 2 alternates sliding-window and full attention masks: each MEFT step runs with its own layer's
    ("gemma2", "meft1", {"model"}),
    ("gemma2", "meft2", {"model"}),
    ("gemma2", "meft3", {"model"}),
    ("mistral", "meft1", {"model"}),
    ("mistral", "meft3", {"model"}),
    ("qwen3", "meft1", {"model"}),
    ("qwen3", "meft3", {"model"}),
    ("phi3", "meft1", {"model"}),  # fused qkv and gate_up projections, residual dropout
    ("phi3", "meft3", {"model"}),
    ("gpt_neox", "meft1", {"gpt_neox"}),  # parallel residual (the default): meft3 refused below
    ("mixtral", "meft1", {"model"}),  # MoE: routed experts in the MLP sub-layer
    ("mixtral", "meft3", {"model"}),
]  # Gemma 3: test_gemma3_converts_every_layer_each_step_with_its_own_mask


@pytest.mark.parametrize("family,coupling,parents", CONVERTS, ids=[f"{f}-{c}" for f, c, _ in CONVERTS])
def test_family_converts_and_matches_stored_activations(family, coupling, parents):
    case, rmodel = _converted(family, coupling)
    plan = rmodel.revify_plan
    assert parents <= _parents(rmodel), plan.summary()
    for rp in plan.reversible:
        assert max(rp.step_errors, default=0.0) <= rp.options.tolerance, plan.summary()
    assert_matches_stored_on_fresh_draws(case, rmodel)


def test_calibration_covers_several_dropout_draws():
    case, rmodel = _converted("bart", "meft3")
    for rp in rmodel.revify_plan.reversible:
        assert rp.calibrated_on == "the example inputs, 3 dropout draws", rmodel.revify_plan.summary()
        assert rp.gradient_error <= rp.options.tolerance
        assert rp.reconstruction_tolerance <= rp.options.tolerance
    assert "3 dropout draws" in rmodel.revify_plan.summary()
    # the decoder's blocks have three sub-layers: F = self- and cross-attention, G = the MLP
    assert _parents(rmodel) == {"model.encoder", "model.decoder"}
    assert_matches_stored_on_fresh_draws(case, rmodel)


REFUSES = [  # family, coupling, the reason's words in the plan
    ("albert", "meft1", "shared module"),
    ("falcon", "meft3", "has 1 residual sub-layer(s)"),  # parallel attention and MLP: one residual add
    ("mamba", "meft3", "has 1 residual sub-layer(s): cast(x) + f(x)"),
    ("resnet", "meft1", "with channels first: use coupling='revnet'"),
    ("gpt_neox", "meft3", "gpt_neox.layers.0 has 1 residual sub-layer(s): x + f(x)"),  # x + attn(ln1 x) + mlp(ln2 x)
    # a RevNet step runs two blocks at the first one's call; Gemma 2 alternates sliding/full masks per layer
    ("gemma2", "revnet", "refused model.layers.0 … model.layers.3: coupling='revnet' pairs consecutive blocks into "
                         "one step, and these pairs receive different side inputs"),
]


def test_t5_block_0_runs_unchanged_and_the_refusal_names_the_cause(tmp_path):
    """T5's block 0 computes the position bias that blocks 1… receive as a side input: its gradient would
    flow between coupling steps outside the hidden state, so block 0 runs unchanged, blocks 1… convert,
    and the refusal says so (not a generic side-input reason)."""
    case, rmodel = _converted("t5", "meft1")
    summary = rmodel.revify_plan.summary()
    starts = {p.chain.blocks[0].path for p in rmodel.revify_plan.reversible}
    assert starts == {"encoder.block.1", "decoder.block.1"}, summary
    assert ("refused encoder.block.0: encoder.block.1 receives a tensor an earlier block of the chain computed "
            "and returned (T5's position bias)") in summary, summary
    assert "(side inputs by block: pattern ABB); the runs of two or more blocks that share theirs convert, and " \
           "this block runs unchanged" in summary, summary
    headline = next(line for line in summary.splitlines() if "converted:" in line)
    assert "4 block(s) made reversible, of 6 in 2 chain(s)" in headline, headline
    loaded = revify.load(revify.save(rmodel, tmp_path / "t5", case.example_inputs))
    assert headline in loaded.revify_plan.summary(), loaded.revify_plan.summary()  # counted alike when loaded


@pytest.mark.parametrize("family,coupling,reason", REFUSES, ids=[f"{f}-{c}" for f, c, _ in REFUSES])
def test_family_refusal_names_the_construct(family, coupling, reason):
    case, rmodel = _converted(family, coupling)
    assert not rmodel.revify_plan.reversible
    assert reason in rmodel.revify_plan.summary(), rmodel.revify_plan.summary()


@pytest.mark.parametrize("coupling", ["meft1", "meft3"])
def test_gemma3_converts_every_layer_each_step_with_its_own_mask(coupling):
    """Gemma 3 (5 sliding : 1 full, 7 layers): one reversible chain of all 7 layers. Each coupling step runs
    its layer with the mask that layer is called with (sliding-window for 0-4 and 6, full for 5), in forward
    and in the backward recompute; gradients match stored activations on fresh dropout draws."""
    case, rmodel = _converted("gemma3", coupling)
    plan = rmodel.revify_plan
    assert case.model.config.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    (rp,) = plan.reversible
    assert [b.path for b in rp.chain.blocks] == [f"model.layers.{i}" for i in range(7)], plan.summary()
    assert len(set(rp.chain.side_groups)) == 2  # two masks among the layers' side inputs
    assert max(rp.step_errors, default=0.0) <= rp.options.tolerance, plan.summary()
    assert rp.start_error <= rp.start_bound, plan.summary()
    assert "converted: 7 block(s) made reversible, of 7 in 1 chain(s)" in plan.summary(), plan.summary()
    assert not plan.rejections, plan.summary()
    assert_matches_stored_on_fresh_draws(case, rmodel)


def test_each_step_runs_its_layer_with_that_layers_mask_in_forward_and_recompute():
    """Gemma 2 (sliding-window and full attention alternate): step i's block sees the mask layer i was called
    with, both in forward and in the backward recompute (before, every step ran with layer 0's)."""
    from revify.runtime.reversible_chain import reversible_chains

    case, rmodel = _converted("gemma2", "meft1")
    (chain,) = reversible_chains(rmodel)
    given, seen = {}, {i: [] for i in range(len(chain.steps))}
    hooks = [block.register_forward_pre_hook(lambda m, a, kw, k=k: given.__setitem__(k, kw["attention_mask"]),
                                             with_kwargs=True) for k, block in enumerate(chain.blocks)]
    for i, step in enumerate(chain.steps):  # meft1: F is the block itself (``reference``) beside an adapter
        inner = step.reference.forward
        step.reference.forward = lambda *a, inner=inner, i=i, **kw: (seen[i].append(kw["attention_mask"]),
                                                                     inner(*a, **kw))[1]
    torch.manual_seed(5)
    case.loss_fn(rmodel(**case.example_inputs)).backward()
    for h in hooks:
        h.remove()
    assert not torch.equal(given[0], given[1])  # a sliding-window mask, then a full one
    for i in range(len(chain.steps)):
        assert len(seen[i]) == 2, (i, len(seen[i]))  # forward, and the recompute in backward
        assert all(torch.equal(m, given[i]) for m in seen[i]), i


def test_gemma2_reversible_round_trips_through_save_and_load(tmp_path):
    case, rmodel = _converted("gemma2", "meft1")
    dst = revify.save(rmodel, tmp_path / "gemma2", case.example_inputs)
    loaded = revify.load(dst)
    (rp,), (lp,) = rmodel.revify_plan.reversible, loaded.revify_plan.reversible
    assert [b.path for b in lp.chain.blocks] == [b.path for b in rp.chain.blocks] and lp.anchors == rp.anchors
    for m in (rmodel, loaded):
        torch.manual_seed(5)
        loss = case.loss_fn(m(**case.example_inputs))
        loss.backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(rmodel.parameters(), loaded.parameters())
               if a.grad is not None)
