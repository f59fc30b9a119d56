"""The test zoo: small models of every family revify must handle.

Each builder returns a ``ZooCase`` with a model in train mode (dropout on
where the architecture has it), example inputs and a loss function.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

# the MLP-ResNet is shared with bench/planner_bench.py
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from toy_models import MLPResNet  # noqa: E402


@dataclass
class ZooCase:
    name: str
    model: nn.Module
    example_inputs: Any
    loss_fn: Callable[[Any], torch.Tensor]
    n_blocks: int


def train_step(model: nn.Module, case: ZooCase, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One seeded forward and backward; returns (output, loss, gradients) and clears the gradients."""
    from revify.passes.capture.record_calls import call_model
    torch.manual_seed(seed)
    out = call_model(model, case.example_inputs)
    loss = case.loss_fn(out)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    value = out.logits if hasattr(out, "logits") else out
    return value.detach(), loss.detach(), grads


def _logits_loss(out) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float().pow(2).mean()


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class CNNResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32), BasicBlock(32, 32))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


class Attention(nn.Module):
    def __init__(self, dim, heads, p):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        att = self.drop(att.masked_fill(~causal, float("-inf")).softmax(-1))
        return self.proj((att @ v).transpose(1, 2).reshape(b, s, d))


class PreLNBlock(nn.Module):
    def __init__(self, dim, heads, p):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, p)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(p)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class PreLNTransformer(nn.Module):
    def __init__(self, vocab=50, dim=32, heads=4, n_blocks=4, seq=16, p=0.1):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(PreLNBlock(dim, heads, p) for _ in range(n_blocks))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


class Embeddings(nn.Module):
    def __init__(self, vocab, seq, dim, p):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq, dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(p)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.drop(self.norm(x))


class EmbeddedTransformer(PreLNTransformer):
    """PreLNTransformer whose embeddings are one module (as in BERT): a chain with a stem (``find_stem``)."""

    def __init__(self, vocab=50, dim=32, heads=4, n_blocks=4, seq=16, p=0.1):
        super().__init__(vocab, dim, heads, n_blocks, seq, p)
        del self.tok, self.pos
        self.embed = Embeddings(vocab, seq, dim, p)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


def mlp_resnet() -> ZooCase:
    torch.manual_seed(0)
    return ZooCase("mlp_resnet", MLPResNet().train(), (torch.randn(8, 32),), _logits_loss, 6)


def cnn_resnet() -> ZooCase:
    torch.manual_seed(0)
    return ZooCase("cnn_resnet", CNNResNet().train(), (torch.randn(4, 3, 16, 16),), _logits_loss, 4)


def pre_ln_transformer() -> ZooCase:
    torch.manual_seed(0)
    return ZooCase("pre_ln_transformer", PreLNTransformer().train(), (torch.randint(0, 50, (2, 16)),),
                   _logits_loss, 4)


_SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=100)


def _text(model) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # padding in one row: the mask is a real input
    return {"input_ids": ids, "attention_mask": mask}


def bert() -> ZooCase:
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(**_SMALL)).train()
    return ZooCase("bert", m, _text(m), _logits_loss, 3)


def roberta() -> ZooCase:
    from transformers import RobertaConfig, RobertaForSequenceClassification
    torch.manual_seed(0)
    m = RobertaForSequenceClassification(RobertaConfig(**_SMALL, max_position_embeddings=64, pad_token_id=1)).train()
    return ZooCase("roberta", m, _text(m), _logits_loss, 3)


def gpt2() -> ZooCase:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100, n_positions=64, use_cache=False)
    m = GPT2LMHeadModel(cfg).train()
    return ZooCase("gpt2", m, _text(m), _logits_loss, 3)


def opt() -> ZooCase:
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    cfg = OPTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=64, vocab_size=100,
                    max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.1, use_cache=False)
    m = OPTForCausalLM(cfg).train()
    return ZooCase("opt", m, _text(m), _logits_loss, 3)


def llama() -> ZooCase:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**_SMALL, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
                      attention_dropout=0.1)
    m = LlamaForCausalLM(cfg).train()
    return ZooCase("llama", m, _text(m), _logits_loss, 3)


def vit() -> ZooCase:
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                    image_size=32, patch_size=8, num_labels=5)
    m = ViTForImageClassification(cfg).train()
    torch.manual_seed(1)
    return ZooCase("vit", m, {"pixel_values": torch.randn(2, 3, 32, 32)}, _logits_loss, 3)


ALL_CASES: dict[str, Callable[[], ZooCase]] = {
    f.__name__: f for f in (mlp_resnet, cnn_resnet, pre_ln_transformer, bert, roberta, gpt2, opt, llama, vit)
}
HF_CASES = ["bert", "roberta", "gpt2", "opt", "llama", "vit"]


def two_block_plan(chain, prof, policy: str, stem: bool = False):
    """Blocks 0-1 of ``chain`` in one segment under ``policy`` (save_ops: a time-priced menu cut in its
    middle), the rest recomputed in another; the stem recomputed with the first segment when asked."""
    from revify.passes.planning.chain_costs import Pricing, SaveOpsMenus, save_ops_plan
    from revify.passes.planning.plan_checkpoint import ChainPlan, Segment

    n = len(chain.blocks)
    if policy == "save_ops":
        menus = SaveOpsMenus(prof.blocks, Pricing("time"))
        levels = menus.levels()
        first = Segment(0, 2, "save_ops", *save_ops_plan(prof.blocks, 0, 2, levels[len(levels) // 2],
                                                         Pricing("time"), menus))
    else:
        first = Segment(0, 2, policy)
    return ChainPlan(chain, (first, Segment(2, n)), "test", stem=chain.stem.path if stem and chain.stem else None)


def save_small_bert(folder, hidden: int, layers: int, heads: int, vocab: int):
    """A randomly initialised BERT classifier saved as a Hugging Face folder (the CLI's usual source)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, vocab_size=vocab, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder
