"""Reversible strategy: refusals that name the construct, and the constructs now supported (issue 18).

Small models, each showing one construct: a DenseNet dense block, a list of
tensors as input, identity blocks, a residual behind a dtype cast (Mamba),
channels-last feature maps, blocks returning (hidden, extra), a chain whose
calibration fails beside one that does not.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import revify
from reversible_checks import assert_matches_stored_on_fresh_draws
from zoo import ZooCase, _logits_loss


def _summary(model: nn.Module, inputs, coupling: str) -> str:
    rmodel = revify.revify(model, inputs, strategy="reversible", coupling=coupling)
    return rmodel.revify_plan.summary(verbose=True)  # refusals and, for the cast test, each block's structure


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
    assert_matches_stored_on_fresh_draws(case, rmodel)


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
