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

DRAWS = (11, 12, 13)  # three fresh dropout / drop-path draws, none of them the calibration's; the last
# on a batch of another shape


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


def _other_batch(inputs: dict | tuple) -> dict | tuple:
    """The example inputs with another batch size (and sequence length): what training feeds later."""
    if isinstance(inputs, tuple):
        torch.manual_seed(4)
        return tuple(torch.randn(3, *x.shape[1:]) for x in inputs)
    if "pixel_values" in inputs:
        torch.manual_seed(4)
        return {"pixel_values": torch.randn(3, 3, 32, 32)}
    other = {**inputs, **_text(batch=3, seq=9)}
    if "decoder_input_ids" in inputs:
        other["decoder_input_ids"] = inputs["decoder_input_ids"][:1].repeat(3, 1)
    return other


def _assert_matches_stored_on_fresh_draws(case: ZooCase, rmodel: nn.Module) -> None:
    _perturb_adapters(rmodel)
    other = ZooCase(case.name, case.model, _other_batch(case.example_inputs), case.loss_fn, case.n_blocks)
    for seed, batch in zip(DRAWS, (case, case, other)):
        _, loss_rev, grads_rev = train_step(rmodel, batch, seed=seed)
        with revify.stored_activations(rmodel):
            _, loss_ref, grads_ref = train_step(rmodel, batch, seed=seed)
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
    ("swin", "meft3", {"swin.encoder.layers.0", "swin.encoder.layers.1"}),  # its attention weights are None
    ("t5", "meft3", {"encoder", "decoder"}),  # hands its position bias back
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


def test_calibration_covers_several_dropout_draws():
    case, rmodel = _converted("bart", "meft3")
    for rp in rmodel.revify_plan.reversible:
        assert rp.calibrated_on == "the example inputs, 3 dropout draws", rmodel.revify_plan.summary()
        assert rp.gradient_error <= rp.options.tolerance
        assert rp.reconstruction_tolerance <= rp.options.tolerance
    assert "3 dropout draws" in rmodel.revify_plan.summary()
    # the decoder's blocks have three sub-layers: F = self- and cross-attention, G = the MLP
    assert _parents(rmodel) == {"model.encoder", "model.decoder"}
    _assert_matches_stored_on_fresh_draws(case, rmodel)


# --- refusals, each naming its construct ------------------------------------------------

def _summary(model: nn.Module, inputs, coupling: str) -> str:
    rmodel = revify.revify(model, inputs, strategy="reversible", coupling=coupling)
    return rmodel.revify_plan.summary()


@pytest.mark.parametrize("family,coupling,reason", [
    ("albert", "meft1", "shared module"),
    ("falcon", "meft3", "has 1 residual sub-layer(s)"),  # parallel attention and MLP: one residual add
    ("resnet", "meft1", "with channels first: use coupling='revnet'"),
])
def test_family_refusal_names_the_construct(family, coupling, reason):
    case, rmodel = _converted(family, coupling)
    assert not rmodel.revify_plan.reversible
    assert reason in rmodel.revify_plan.summary(), rmodel.revify_plan.summary()


class _DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int):
        super().__init__()
        self.norm, self.conv = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, growth, 3, padding=1)

    def forward(self, prev: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(torch.relu(self.norm(torch.cat(prev, 1))))


class _DenseNet(nn.Module):
    """A DenseNet dense block as torchvision writes it: each layer gets the list of all earlier outputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layers = nn.ModuleList(_DenseLayer(8 + 4 * i, 4) for i in range(3))
        self.head = nn.Linear(20, 5)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        return self.head(torch.cat(features, 1).mean((2, 3)))


def test_densenet_concatenation_shortcut_is_named():
    summary = _summary(_DenseNet().train(), (torch.randn(2, 3, 8, 8),), "revnet")
    assert "layers.0 … layers.2: concatenation shortcut (DenseNet-like)" in summary, summary


class _Mlp(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln, self.fc1, self.fc2, self.drop = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d), \
            nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x)))))


class _ListBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mlp = _Mlp(d)

    def forward(self, pair: list[torch.Tensor]) -> list[torch.Tensor]:
        x, context = pair
        return [x + self.mlp(x + context), context]


class _Stack(nn.Module):
    def __init__(self, block, d: int = 16, n: int = 3, identities: bool = False):
        super().__init__()
        self.patch_drop, self.norm_pre = nn.Identity(), nn.Identity()  # timm ViT's no-op stages
        self.blocks = nn.ModuleList(block(d) for _ in range(n))
        self.head = nn.Linear(d, 5)
        self.identities = identities

    def forward(self, x):
        if self.identities:
            x = self.norm_pre(self.patch_drop(x))
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_list_of_tensors_input_is_named():
    class Lists(_Stack):
        def forward(self, x):
            pair = [x, torch.ones_like(x)]
            for b in self.blocks:
                pair = b(pair)
            return self.head(pair[0])

    summary = _summary(Lists(_ListBlock).train(), (torch.randn(2, 5, 16),), "meft1")
    assert "blocks.0 … blocks.2: list-of-tensors input" in summary, summary


class _PreLN(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attn, self.mlp = _Mlp(d), _Mlp(d)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


def test_identity_blocks_get_no_adapters():
    torch.manual_seed(0)
    model = _Stack(_PreLN, identities=True).train()
    rmodel = revify.revify(model, (torch.randn(2, 5, 16),), strategy="reversible", coupling="meft1")
    plan = rmodel.revify_plan
    assert [rp.chain.parent for rp in plan.reversible] == [""]
    assert [b.path for b in plan.reversible[0].chain.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert "patch_drop … norm_pre: identity blocks without compute" in plan.summary(), plan.summary()
    assert not any(n.startswith(("patch_drop", "norm_pre")) for n, _ in rmodel.named_parameters())


class _CastBlock(nn.Module):
    """Mamba's block: the residual is kept in float32, so the skip is ``residual.to(float32)``."""

    def __init__(self, d: int):
        super().__init__()
        self.norm, self.mixer = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, h):
        residual = h
        h = self.norm(h.to(dtype=self.norm.weight.dtype))
        residual = residual.to(torch.float32)
        return residual + self.mixer(h)


def test_residual_behind_a_cast_is_found_through_it():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    summary = _summary(_Stack(_CastBlock).train(), (x,), "meft3")
    assert "meft3 needs blocks with two residual sub-layers (attention, MLP); blocks.0 has 1 residual " \
           "sub-layer(s): cast(x) + f(x)" in summary, summary
    summary = _summary(_Stack(_CastBlock).train(), (x,), "meft1")
    assert "structure: 1 residual sub-layer(s): cast(x) + f(x)" in summary, summary


@pytest.mark.parametrize("coupling", ["meft1", "meft3"])
def test_channels_last_feature_maps_accepted_by_meft(coupling):
    torch.manual_seed(0)
    case = ZooCase("channels_last", _Stack(_PreLN).train(), (torch.randn(2, 4, 4, 16),), _logits_loss, 3)
    rmodel = revify.revify(case.model, case.example_inputs, strategy="reversible", coupling=coupling, strict=True)
    adapter = rmodel.blocks[0].revify_adapter_f
    assert adapter.down.in_features == 16  # on the channels, the last dimension
    _assert_matches_stored_on_fresh_draws(case, rmodel)


class _Extras(nn.Module):
    """A block returning (hidden, extra): attention weights, or something a reversible chain cannot hand on."""

    def __init__(self, d: int, extra: str = "weights"):
        super().__init__()
        self.block, self.extra = _PreLN(d), extra

    def forward(self, x):
        y = self.block(x)
        return y, (y.detach().softmax(-1) * x if self.extra == "weights" else {"weights": y})


class _TwoTowers(nn.Module):
    def __init__(self, extra: str, d: int = 16):
        super().__init__()
        self.tower_a = nn.ModuleList(_PreLN(d) for _ in range(3))
        self.tower_b = nn.ModuleList(_Extras(d, extra) for _ in range(3))
        self.head = nn.Linear(d, 5)
        self.use_weights = False

    def forward(self, x):
        for b in self.tower_a:
            x = b(x)
        weights = None
        for b in self.tower_b:
            x, weights = b(x)
        out = self.head(x)
        return out + weights.sum() if self.use_weights else out


def test_a_failing_chain_is_dropped_alone_with_its_reason():
    torch.manual_seed(0)
    model = _TwoTowers("dict").train()
    rmodel = revify.revify(model, (torch.randn(2, 5, 16),), strategy="reversible", coupling="meft1")
    plan = rmodel.revify_plan
    assert [rp.chain.blocks[0].path for rp in plan.reversible] == ["tower_a.0"], plan.summary()
    assert "tower_b.0 … tower_b.2: calibration failed: TypeError" in plan.summary(), plan.summary()
    assert "a tuple (hidden, *extras) of tensors and None" in plan.summary()
    assert not any("tower_b" in n and "revify_adapter" in n for n, _ in rmodel.named_parameters())


def test_meft3_refuses_blocks_returning_attention_weights():
    torch.manual_seed(0)
    model = _Stack(lambda d: _Extras(d)).train()

    def forward(x):
        for b in model.blocks:
            x, _ = b(x)
        return model.head(x)

    model.forward = forward
    summary = _summary(model, (torch.randn(2, 5, 16),), "meft3")
    assert "meft3 runs each block as two sub-layer halves, but blocks.0 returns tensor (2, 5, 16) beside its " \
           "hidden state (attention weights or a side output)" in summary, summary


def test_extra_output_in_the_loss_raises_instead_of_dropping_its_gradient():
    torch.manual_seed(0)
    model = _TwoTowers("weights").train()
    x = torch.randn(2, 5, 16)
    rmodel = revify.revify(model, (x,), strategy="reversible", coupling="meft1", strict=True)
    assert len(rmodel.revify_plan.reversible) == 2
    rmodel(x).sum().backward()  # the weights are returned but unread: trains
    rmodel.use_weights = True
    with pytest.raises(RuntimeError, match="beside its hidden state"):
        rmodel(x).sum().backward()
