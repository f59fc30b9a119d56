"""Bad input to the console script: one line on stderr, the right exit code, nothing written."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from revify.cli import main

TINYARCH = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(torch.relu(x))


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(4))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def deep():
    return Deep()


def flat():  # no residual blocks: nothing to convert
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
'''


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """One folder holding every broken source, shared by the cases."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("bad")
    (root / "tinyarch.py").write_text(TINYARCH)
    sys.path.insert(0, str(root))
    try:
        import tinyarch
    finally:
        sys.path.remove(str(root))
    torch.manual_seed(0)
    torch.save(tinyarch.deep().state_dict(), root / "deep.pt")
    torch.save(tinyarch.flat().state_dict(), root / "flat.pt")
    torch.save(tinyarch.deep(), root / "whole.pt")  # a pickled module
    (root / "garbage.pt").write_bytes(os.urandom(256))
    from safetensors.torch import save_file
    save_file(tinyarch.deep().state_dict(), str(root / "deep.safetensors"))
    data = (root / "deep.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(data[: len(data) // 2])

    cfg = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=50,
                     max_position_embeddings=32)
    good = root / "bert"
    BertForSequenceClassification(cfg).save_pretrained(good)
    for name in ("noconfig", "badconfig", "noweights", "truncated", "mismatch"):
        shutil.copytree(good, root / name)
    (root / "noconfig" / "config.json").unlink()
    (root / "badconfig" / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
    (root / "noweights" / "model.safetensors").unlink()
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    config = json.loads((good / "config.json").read_text())
    (root / "mismatch" / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))

    (root / "afile").write_text("not a folder")
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("mine")
    return root


def run_cli(bad: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real console script in its own process."""
    env = {**os.environ, "PYTHONPATH": str(bad)}
    env.pop("REVIFY_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "revify.cli", *args], capture_output=True, text=True, env=env,
                          cwd=bad, timeout=timeout)


@pytest.fixture
def run_main(bad, capsys, monkeypatch):
    """The console script's ``main`` in this process: the same code path, without paying for a new
    interpreter (importing torch) per case; an escaping exception would fail the test."""
    monkeypatch.chdir(bad)
    monkeypatch.syspath_prepend(str(bad))
    monkeypatch.delenv("REVIFY_TRACEBACK", raising=False)

    def run(*args: str) -> subprocess.CompletedProcess:
        code = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".revify-tmp-" in p.name or ".revify-old-" in p.name]


def assert_refused(res: subprocess.CompletedProcess, code: int, pattern: str, dst: Path | None = None) -> None:
    lines = res.stderr.splitlines()
    assert res.returncode == code, res.stderr
    assert len(lines) == 1 and lines[0].startswith("revify: error: "), res.stderr
    assert re.search(pattern, lines[0]), lines[0]
    if dst is not None:
        assert not dst.exists()
        _no_leftovers(dst.parent)


# (SRC, extra arguments, exit code, message): every case writes to a DST that must stay absent
CASES = {
    "missing src": ("nowhere", [], 2, r"nowhere: no such file or folder"),
    "folder without config": ("noconfig", [], 2, r"no config\.json \(not a Hugging Face model folder\)"),
    "corrupt config": ("badconfig", [], 2, r"config\.json is corrupt: JSONDecodeError"),
    "no weights": ("noweights", [], 2, r"no weights \(model\.safetensors or pytorch_model\.bin\)"),
    "truncated safetensors": ("truncated", [], 2, r"model\.safetensors is truncated or corrupt"),
    "weights do not match the config": ("mismatch", [], 2,
                                        r"weights do not match config\.json: .*intermediate.* has shape"),
    "pickle without --trust-pickle": ("whole.pt", ["--input-shape", "4x8"], 2,
                                      r"unpickling runs arbitrary code.*pass --trust-pickle"),
    "state dict without --arch": ("deep.pt", ["--input-shape", "4x8"], 2, r"is a state dict: name the "
                                                                          r"architecture with --arch"),
    "state dict of another architecture": ("flat.pt", ["--arch", "tinyarch:deep", "--input-shape", "4x8"], 2,
                                           r"weights do not match the architecture"),
    "corrupt torch file": ("garbage.pt", ["--arch", "tinyarch:deep"], 2, r"not a readable torch\.save"),
    "truncated safetensors state dict": ("cut.safetensors", ["--arch", "tinyarch:deep"], 2,
                                         r"truncated or corrupt safetensors file"),
    "unknown --arch module": ("deep.pt", ["--arch", "nosuchmodule:build", "--input-shape", "4x8"], 2,
                              r"cannot import nosuchmodule"),
    "--arch without --input-shape": ("deep.pt", ["--arch", "tinyarch:deep"], 2, r"need --input-shape"),
    "bad --input-shape": ("deep.pt", ["--arch", "tinyarch:deep", "--input-shape", "4xq"], 2,
                          r"--input-shape '4xq': write sizes like 8x32"),
    "bad --budget": ("deep.pt", ["--arch", "tinyarch:deep", "--input-shape", "4x8", "--budget", "lots"], 2,
                     r"--budget: not a byte count: 'lots'"),
    "bad --tolerance": ("bert", ["--strategy", "reversible", "--tolerance", "0"], 2, r"tolerance must be positive"),
    "seq-len beyond the positions": ("bert", ["--seq-len", "100"], 2, r"--seq-len 100 is longer than the "
                                                                      r"model's max_position_embeddings \(32\)"),
    "unreadable destination parent": ("deep.pt", ["--arch", "tinyarch:deep", "--input-shape", "4x8",
                                                  "--out", "afile/dst"], 2, r"cannot write afile/dst: afile is "
                                                                            r"not a folder"),
}
# the list, also through the console script in a process of its own
IN_A_PROCESS = ["pickle without --trust-pickle", "truncated safetensors"]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_in_one_line(bad, tmp_path, run_main, case):
    src, extra, code, pattern = CASES[case]
    dst = tmp_path / "dst"
    out = str(dst) if "--out" not in extra else None
    args = ["convert", src, *(["--out", out] if out else []), "--seq-len", "8", *extra]
    assert_refused(run_main(*args), code, pattern, dst)
    if out is None:
        assert (bad / "afile").read_text() == "not a folder"
    if case in IN_A_PROCESS:
        assert_refused(run_cli(bad, *args), code, pattern, dst)


def test_usage_error_is_one_line(run_main):
    res = run_main("convert", "bert")
    assert_refused(res, 2, r"the following arguments are required: --out \(see revify convert --help\)")


def test_nothing_to_convert_exits_0_without_writing_unless_strict(bad, tmp_path, run_main):
    dst = tmp_path / "dst"
    args = ("convert", "flat.pt", "--arch", "tinyarch:flat", "--input-shape", "4x8", "--out", str(dst))
    res = run_cli(bad, *args)
    assert res.returncode == 0, res.stderr
    assert "nothing was converted" in res.stdout and "no convertible chain" in res.stdout
    assert not dst.exists()
    res = run_main(*args, "--strict")
    assert res.returncode == 1 and "nothing was converted" in res.stdout
    assert not dst.exists()
    _no_leftovers(tmp_path)


def test_destination_that_exists(bad, run_main):
    before = sorted(p.name for p in (bad / "existing").iterdir())
    src = ("convert", "deep.pt", "--arch", "tinyarch:deep", "--input-shape", "4x8", "--out")
    res = run_main(*src, str(bad / "existing"))
    assert_refused(res, 2, r"existing already exists; pass --force to replace it")
    res = run_main(*src, str(bad / "existing"), "--force")
    assert_refused(res, 2, r"refusing to replace .*existing: it is not a revify folder")
    assert sorted(p.name for p in (bad / "existing").iterdir()) == before
    assert (bad / "existing" / "keep.txt").read_text() == "mine"
    _no_leftovers(bad)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_read_only_parent(tmp_path, run_main):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        res = run_main("convert", "deep.pt", "--arch", "tinyarch:deep", "--input-shape", "4x8",
                       "--out", str(parent / "dst"))
        assert_refused(res, 2, r"no permission to write in", parent / "dst")
    finally:
        parent.chmod(0o755)


def test_sigterm_while_writing_leaves_no_destination_and_no_temporary_folder(bad, tmp_path):
    dst = tmp_path / "dst"
    driver = textwrap.dedent(f"""
        import os, signal, sys
        import revify.checkpoint_io as io
        from revify.cli import main
        write = io.save_weights
        def write_then_die(module, file):
            write(module, file)  # the temporary folder holds the weights when the signal comes
            os.kill(os.getpid(), signal.SIGTERM)
        io.save_weights = write_then_die
        # per-block: blocks this small do not lower the peak, so the default planner would keep them
        sys.exit(main(["convert", "deep.pt", "--arch", "tinyarch:deep", "--input-shape", "4x8",
                       "--schedule", "per-block", "--out", {str(dst)!r}]))
    """)
    env = {**os.environ, "PYTHONPATH": str(bad)}
    res = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env, cwd=bad,
                         timeout=300)
    assert_refused(res, 143, r"terminated by SIGTERM; nothing written", dst)
    assert os.listdir(tmp_path) == []
