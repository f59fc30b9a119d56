"""Tests for revify.measure / revify.report: the figures must be exact measurements."""

from __future__ import annotations

import gc
import json

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp

from revify.measure import (
    LiveStorageTracker,
    StepMeasurement,
    measure_saved_bytes,
    measure_step,
)
from revify.report import MemoryReport, format_bytes, report


def _sq_sum(y: torch.Tensor) -> torch.Tensor:
    return (y**2).sum()


def test_saved_bytes_linear_exact() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 64, bias=False)
    x = torch.randn(8, 64, requires_grad=True)
    nbytes, count = measure_saved_bytes(lin, (x,), _sq_sum)
    # mm saves x (for dW) and W (for dx; excluded, it is a parameter);
    # pow saves its base y.  sum saves only sizes.
    assert nbytes == 8 * 64 * 4 + 8 * 64 * 4
    assert count == 2
    assert lin.weight.grad is None  # graph was run and grads reset


def test_checkpoint_reduces_saved_bytes() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 64, bias=False)
    x = torch.randn(8, 64, requires_grad=True)

    class Ckpt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return cp.checkpoint(lambda t: self.lin(t) ** 2, x, use_reentrant=False)

    plain, _ = measure_saved_bytes(lin, (x,), _sq_sum)
    ck, _ = measure_saved_bytes(Ckpt(), (x,), lambda y: y.sum())
    assert ck < plain
    assert ck == 8 * 64 * 4  # only the checkpoint input x


def test_tracker_sees_large_temporary_and_backward() -> None:
    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tmp = torch.ones(1 << 20) * self.w  # 4 MiB intermediate
            return tmp.sum() + x.sum()

    m = Big()
    x = torch.randn(4)
    meas = measure_step(m, (x,), lambda y: y, repeats=1, warmup=0)
    assert meas.peak_bytes >= 4 * (1 << 20)
    assert isinstance(meas, StepMeasurement)

    # backward allocations are seen: grad of a 1M-element input.
    big = torch.randn(1 << 20, requires_grad=True)
    tr = LiveStorageTracker()
    with tr:
        loss = (big * 2.0).sum()
        fwd_peak = tr.peak_bytes
        loss.backward()
    assert tr.total_allocated_bytes > fwd_peak
    assert tr.peak_bytes >= 4 * (1 << 20)


def test_tracker_frees() -> None:
    tr = LiveStorageTracker()
    with tr:
        a = torch.zeros(1000)
        b = a.view(10, 100)  # view: no new storage
        assert tr.live_bytes == 4000
        del a, b
        gc.collect()
        assert tr.live_bytes == 0
        c = torch.zeros(10)
    assert tr.peak_bytes == 4000
    assert tr.live_bytes == 40
    del c


def test_frozen_params_and_kwargs() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))
    m[0].weight.requires_grad_(False)
    m[0].bias.requires_grad_(False)

    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = m

        def forward(self, *, inp: torch.Tensor) -> torch.Tensor:
            return self.m(inp)

    x = torch.randn(8, 16)
    meas = measure_step(KW(), {"inp": x}, lambda y: y.pow(2).mean(), repeats=2)
    assert meas.saved_bytes > 0 and meas.peak_bytes > 0 and meas.step_time_s > 0
    assert all(p.grad is None for p in m.parameters())


def test_report_str_and_json() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))

    class R(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model
            self.revify_plan = "checkpoint everything"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return cp.checkpoint(self.inner, x, use_reentrant=False)

    x = torch.randn(4, 32, requires_grad=True)
    rep = report(model, R(), (x,), repeats=1)
    assert isinstance(rep, MemoryReport)
    s = str(rep)
    for row in ("saved for backward", "peak live tensors", "step time", "MEASURED"):
        assert row in s
    assert "checkpoint everything" in s
    d = json.loads(rep.to_json())
    assert set(d["ratios"]) == {"saved", "peak", "time"}
    assert d["before"]["saved_bytes"] == rep.before.saved_bytes
    assert rep.after.saved_bytes < rep.before.saved_bytes


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(2048) == "2.00 KiB"
    assert format_bytes(3 * 1024**2) == "3.00 MiB"
    assert format_bytes(5 * 1024**3) == "5.00 GiB"


def test_saved_bytes_are_attributed_to_the_block_that_saved_them() -> None:
    from revify.measure import measure_training_memory

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False))
    x = torch.randn(4, 16, requires_grad=True)
    prof = measure_training_memory(model, (x,), _sq_sum, ["0", "1"])
    # block 0's mm saves the input x, block 1's its input (block 0's output); pow saves the output
    assert prof.saved_by_block == {"0": 4 * 16 * 4, "1": 4 * 16 * 4, "": 4 * 16 * 4}
    assert sum(prof.saved_by_block.values()) == prof.saved_bytes


def test_peak_split_by_category_is_the_same_on_fake_tensors() -> None:
    from revify.measure import measure_training_memory
    from revify.passes.prediction.fake_copy import fake_copy, fake_inputs, new_fake_mode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(8, 64)
    real = measure_training_memory(model, (x,), _sq_sum)
    assert sum(real.peak_by_category.values()) == real.peak_bytes
    # the peak comes in the first layer's backward: the last layer's gradients are accumulated by then
    assert real.peak_by_category["gradients"] == sum(p.numel() * 4 for p in model[2].parameters())
    assert real.param_bytes == sum(p.numel() * 4 for p in model.parameters())
    mode = new_fake_mode()
    fmodel, fx = fake_copy(model, mode), fake_inputs((x,), mode)
    with mode:
        fake = measure_training_memory(fmodel, fx, _sq_sum)
    assert (fake.saved_bytes, fake.peak_bytes, fake.retained_bytes, fake.peak_by_category, fake.param_bytes) == \
        (real.saved_bytes, real.peak_bytes, real.retained_bytes, real.peak_by_category, real.param_bytes)
    assert all(p.grad is None for p in model.parameters())


def test_allocator_peaks_reads_each_phase_above_the_base(monkeypatch):
    """``AllocatorPeaks`` (the planner's and peak_timeline's reading of the CUDA allocator), on a fake
    allocator: each read gives what is allocated and the peak since the previous read, above ``start``."""
    from revify.storage_tracking import AllocatorPeaks

    state = {"now": 100, "peak": 100}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=state["now"]))

    def alloc(n: int) -> None:
        state["now"] += n
        state["peak"] = max(state["peak"], state["now"])

    meter = AllocatorPeaks(torch.device("cuda"))
    meter.start()
    alloc(50), alloc(-30)  # a phase that peaks at 50 above the base and leaves 20
    assert meter.read() == (20, 50)
    alloc(5)  # the next phase's peak starts where the previous read left off
    assert meter.read() == (25, 25)
    meter.start()  # a new base
    alloc(10)
    assert meter.read() == (10, 10)
