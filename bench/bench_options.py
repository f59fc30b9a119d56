"""Command-line options the CPU/GPU benches share: paired steps, device, clock and precision.

``checkpoint_bench.py`` and ``reversible_bench.py`` time variants the same way
(each step paired with a baseline step, on CPU or CUDA, at fp32 or under
autocast), so their flags and their device check are written once here.
"""
from __future__ import annotations

import argparse

import torch

from revify.device_step import DTYPES


def add_step_options(ap: argparse.ArgumentParser, baseline: str) -> None:
    """``--pairs``, ``--device``, ``--clock`` and ``--dtype``; ``baseline`` names what each step is paired with."""
    ap.add_argument("--pairs", type=int, default=5, help=f"timed steps per variant, each paired with {baseline}")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="CPU steps: wall clock, or the process's CPU time (steadier on shared cores)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                    help="fp32, or bf16/fp16 autocast over fp32 weights (default fp32)")


def check_device(args: argparse.Namespace, bench: str) -> torch.device:
    """The device asked for; exits with one line when it is CUDA and none is available."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{bench}: --device cuda, but no CUDA device is available")
    return device
