"""Builders of transformers families from small configs that keep each family's DEFAULT values.

Shared by the tests that train models as users load them (``test_zoo_defaults``,
``test_reversible_reach``): ``use_cache`` as the config has it, ``layer_types``
as the family sets them (Gemma 2 alternates sliding and full attention over 4
layers, Gemma 3 has 5 sliding to 1 full over 7), dropout turned on where the
family defaults it off. Only sizes are changed. A test module importing this
one is skipped when transformers is not installed.
"""
from __future__ import annotations

import pytest

T = pytest.importorskip("transformers")

_S = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=100, max_position_embeddings=64)


def _dec(config: str, model: str, layers: int = 3, **kw):
    """A builder of ``T.<model>(T.<config>(...))`` with the small sizes above and ``kw`` on top."""
    return lambda: getattr(T, model)(getattr(T, config)(**{**_S, "num_hidden_layers": layers, **kw}))


FAMILIES = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100, n_positions=64,
                                                   bos_token_id=0, eos_token_id=0)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
                                                vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=32)),
    "llama": _dec("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2, attention_dropout=0.1),
    "mistral": _dec("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, attention_dropout=0.1),
    "qwen3": _dec("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=8, attention_dropout=0.1),
    "gemma2": _dec("Gemma2Config", "Gemma2ForCausalLM", layers=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                   attention_dropout=0.1),
    "gemma3": _dec("Gemma3TextConfig", "Gemma3ForCausalLM", layers=7, num_key_value_heads=2, head_dim=8,
                   sliding_window=4, attention_dropout=0.1),
    "phi3": _dec("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2, pad_token_id=0, eos_token_id=0,
                 attention_dropout=0.1, resid_pdrop=0.1),
    "gpt_neox": _dec("GPTNeoXConfig", "GPTNeoXForCausalLM", attention_dropout=0.1, hidden_dropout=0.1),
    "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                         vocab_size=100, attention_dropout=0.1, hidden_dropout=0.1)),
    "mixtral": _dec("MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, attention_dropout=0.1),
    "distilbert": lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_position_embeddings=64)),
    "deberta_v2": lambda: T.DebertaV2ForSequenceClassification(T.DebertaV2Config(**_S, num_hidden_layers=3)),
    "albert": lambda: T.AlbertForSequenceClassification(T.AlbertConfig(  # one layer shared by all 3 calls
        vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=3,
                                                          num_heads=4)),
    "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
    "swin": lambda: T.SwinForImageClassification(T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4,
        drop_path_rate=0.1, hidden_dropout_prob=0.1)),
    "convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[3, 3], drop_path_rate=0.1, image_size=32)),
    "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[3, 3], layer_type="basic")),
}
