"""The GPU suite's --quick mode: the same code as the GPU run, tiny shapes on CPU; every row and column printed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_suite  # noqa: E402

COLUMNS = ["peak", "reserved", "step peak", "/plain", "saved", "step ms", "x plain [spread]", "tokens/s",
           "pred peak", "pred err", "vs"]


def test_quick_suite_prints_every_row_and_column(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--quick", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    (md,) = tmp_path.glob("gpu-*-quick.md")
    (js,) = tmp_path.glob("gpu-*-quick.json")
    assert md.read_text().strip() in out  # the printed table is the one written
    header = next(line for line in out.splitlines() if line.startswith("| row |"))
    assert all(f" {c} |" in header for c in COLUMNS), header
    data = json.loads(js.read_text())
    rows = {(r["model"], r["row"]): r for r in data["rows"]}
    assert set(rows) == {(m, r) for m in gpu_suite.MODELS for r in gpu_suite.ROWS}
    for (model, row), r in rows.items():
        assert r["status"] == "ok", (model, row, r["error"])
        assert f"| {row} | {gpu_suite.LABELS[row]} |" in out
        assert r["step_peak"] > 0 and r["step_ms"] > 0 and r["tokens_per_s"] > 0
        lo, hi = r["spread"]
        assert lo <= r["ratio"] <= hi and len(r["ratios"]) == 2
        if row not in gpu_suite.COMPILE_ROWS:
            assert r["saved"] > 0
        if row.startswith("budget") or row in ("perblock", "flops"):
            assert r["predicted"] > 0 and r["pred_error"] is not None  # planner rows carry their prediction
        else:
            assert r["predicted"] is None
    for model in gpu_suite.MODELS:
        # checkpointing keeps less for backward than plain training, the reversible rows less than stored
        assert rows[model, "perblock"]["saved"] < rows[model, "plain"]["saved"]
        assert rows[model, "meft1"]["saved"] < rows[model, "stored"]["saved"]
        assert "stored" in rows[model, "meft1"]["vs"] and "compile" in rows[model, "perblock+compile"]["vs"]
    assert "done in" in out and "failed: none" in out


def test_a_failing_row_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    """--only keeps plain (every ratio needs it); an error in one row leaves the others measured."""
    def broken(self, w):
        raise RuntimeError("profiling broke")

    monkeypatch.setattr(gpu_suite.Suite, "planner", broken)
    assert gpu_suite.main(["--quick", "--models", "bert", "--only", "perblock", "stored", "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("gpu-*-quick.json")).read_text())
    status = {r["row"]: (r["status"], r["error"]) for r in data["rows"]}
    assert status == {"plain": ("ok", None), "perblock": ("error", "RuntimeError: profiling broke"),
                      "stored": ("ok", None)}


def test_peak_timeline_marks_every_block_and_finds_the_step_peak():
    """bench/peak_timeline.py (the tool that found the GPU's kernel scratch): on CPU the tracker's column; a
    mark at both ends of every layer's forward and backward, and its highest peak is the step's peak as
    revify.measure counts it."""
    import torch
    from peak_timeline import format_timeline, step_timeline
    from revify.measure import measure_training_memory
    from zoo import ALL_CASES

    case = ALL_CASES["bert"]()
    layers = {n: m for n, m in case.model.named_modules() if n.rsplit(".", 1)[-1].isdigit() and ".layer." in n}
    assert len(layers) >= 2
    torch.manual_seed(0)
    marks = step_timeline(case.model, case.example_inputs, case.loss_fn, layers, torch.device("cpu"))
    names = [m.name for m in marks]
    assert names[0] == "start" and names[-1] == "end" and "loss" in names
    for n in layers:
        assert {f"fwd> {n}", f"fwd< {n}", f"bwd> {n}", f"bwd< {n}"} <= set(names), n
    assert names.index("loss") < min(names.index(f"bwd> {n}") for n in layers)
    torch.manual_seed(0)
    measured = measure_training_memory(case.model, case.example_inputs, case.loss_fn).peak_bytes
    assert max(m.peak for m in marks) == measured
    assert all(m.alloc_peak is None for m in marks)  # no allocator column on CPU
    assert len(format_timeline(marks)) == len(marks) + 2
