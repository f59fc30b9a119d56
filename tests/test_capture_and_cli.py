"""Capture degrades gracefully on real models; the console script runs."""
from __future__ import annotations

import os
import subprocess
import sys

import revify
from zoo import ALL_CASES


def test_untraceable_transformers_model_is_captured_by_parts():
    case = ALL_CASES["bert"]()
    plan = revify.revify(case.model, case.example_inputs).revify_plan
    by_path = {r.path: r for r in plan.regions}
    assert by_path[""].engine == "eager" and by_path[""].reason  # the top level does not trace, and says why
    assert any(r.engine == "fx" for r in plan.regions)  # but parts of it do
    (chain,) = plan.chains
    assert [b.path for b in chain.chain.blocks] == [f"bert.encoder.layer.{i}" for i in range(3)]
    # the layers themselves fail fx and are captured with torch.export; both residual sub-layers are found
    assert chain.chain.blocks[0].engine == "export"
    assert chain.chain.blocks[0].sublayers == 2


def test_cnn_resnet_rejects_the_downsampling_block_with_its_shape():
    case = ALL_CASES["cnn_resnet"]()
    plan = revify.revify(case.model, case.example_inputs).revify_plan
    assert [c.chain.parent for c in plan.chains] == ["layer1", "layer2"]
    assert [len(c.chain.blocks) for c in plan.chains] == [3, 2]
    reasons = {r.where: r.reason for r in plan.rejections}
    assert "changes shape (4, 16, 16, 16) → (4, 32, 8, 8)" in reasons["layer2.0"]
    notes = [n for b in plan.chains[0].chain.blocks for n in b.legality.notes]
    assert any("running_mean" in n for n in notes)


def test_console_script_demo_runs_small():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "revify.cli", "demo", "--layers", "2", "--hidden", "64",
                          "--seq-len", "16", "--repeats", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "saved for backward" in out.stdout and "chain 0: 2 × BertLayer" in out.stdout


def test_console_script_rejects_bad_usage():
    out = subprocess.run([sys.executable, "-m", "revify.cli", "demo", "--layers", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["revify: error: --layers must be positive, got 0"]
