"""Bottleneck adapters that MEFT inserts next to pretrained blocks.

``Adapter(x) = up(act(down(x)))``. With ``init="zero"`` (revify's default)
the up-projection starts at zero, so the adapter's output is exactly zero
and the converted model starts from the pretrained function up to the
coupling's scaling term only. ``init="normal"`` is the MEFT reference
initialisation (every weight N(0, 0.02)); it adds a small random function
at the start. ``tests/test_reversible.py`` measures the starting error of both.
"""
from __future__ import annotations

import torch
from torch import nn

ADAPTER_INITS = ("zero", "normal")


class Adapter(nn.Module):
    revify_adapter = True  # marks parameters that are not the pretrained backbone's
    def __init__(self, dim: int, rank: int = 8, init: str = "zero", *,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        if init not in ADAPTER_INITS:
            raise ValueError(f"unknown adapter init {init!r}; choose one of {', '.join(ADAPTER_INITS)}")
        self.down = nn.Linear(dim, rank, dtype=dtype, device=device)
        self.act = nn.GELU()
        self.up = nn.Linear(rank, dim, dtype=dtype, device=device)
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)
            if init == "zero":
                nn.init.zeros_(self.up.weight)
            else:
                nn.init.normal_(self.up.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))
