"""Small models shared by the benchmarks and the test zoo (importable without revify).

``MLPResNet``: ``x → inp → [x + fc2(gelu(fc1(norm(x))))] × n_blocks → out``, the
simplest chain of residual blocks; its activations per block (the LayerNorm
input and output, fc1's output, gelu's output) are what every schedule trades.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class ResidualMLPBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class MLPResNet(nn.Module):
    def __init__(self, dim: int = 32, n_blocks: int = 6):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(ResidualMLPBlock(dim) for _ in range(n_blocks))
        self.out = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.out(x)
