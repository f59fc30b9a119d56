"""End to end: the real console script on folders written by save_pretrained, then revify.load."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import revify
from revify.cli import main
from revify.sources import read_source

TESTS = Path(__file__).parent


SCRIPT = Path(sys.executable).with_name("revify")  # the installed console script, when there is one


def run_cli(*args: str, script: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("REVIFY_TRACEBACK", None)
    command = [str(SCRIPT)] if script and SCRIPT.exists() else [sys.executable, "-m", "revify.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=timeout)


def _tiny_models() -> dict:
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)
    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=100,
                 max_position_embeddings=64)
    torch.manual_seed(0)
    return {  # GPT-2 and Llama keep use_cache=True in their config: the CLI must train without a KV cache
        "bert": BertForSequenceClassification(BertConfig(**small)),
        "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100, n_positions=64,
                                           bos_token_id=0, eos_token_id=0)),
        "llama": LlamaForCausalLM(LlamaConfig(**small, num_key_value_heads=2, attention_dropout=0.1)),
    }


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, model in _tiny_models().items():
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _step(model, inputs, seed=3):
    torch.manual_seed(seed)
    out = model(**inputs).logits
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


CASES = [("bert", "checkpoint", []), ("gpt2", "checkpoint", ["--schedule", "sqrt(n)"]),
         ("llama", "checkpoint", ["--schedule", "per-block"]), ("gpt2", "checkpoint", ["--recompute-cost", "flops"]),
         ("bert", "reversible", []), ("gpt2", "reversible", ["--coupling", "meft2"]), ("llama", "reversible", [])]


@pytest.mark.parametrize("name,strategy,extra", CASES, ids=[f"{n}-{s}" for n, s, _ in CASES])
def test_convert_then_load(hf_folders, tmp_path, name, strategy, extra):
    src, dst = hf_folders[name], tmp_path / "out"
    res = run_cli("convert", str(src), "--out", str(dst), "--strategy", strategy, "--seq-len", "16", *extra,
                  script=name == "bert")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # no warnings, no progress bar when stderr is not a terminal
    assert f"wrote {dst}" in res.stdout and "chain 0: 3 ×" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left beside it
    files = {p.name for p in dst.iterdir()}
    assert {"config.json", "model.safetensors", "revify.json"} <= files
    assert (dst / "config.json").read_bytes() == (src / "config.json").read_bytes()  # the original config
    manifest = json.loads((dst / "revify.json").read_text())
    assert manifest["format_version"] == 1 and manifest["source"]["kind"] == "transformers"
    assert manifest["strategy"] == strategy
    entries = {e["name"]: e for e in manifest["inputs"]["entries"]}
    assert entries["input_ids"]["tensor"]["shape"] == [2, 16]
    # no use_cache=False recorded: the converted model turns the KV cache off for training calls itself
    assert "use_cache" not in entries

    loaded = revify.load(dst)
    inputs = loaded._revify_record.inputs.synthesise()
    plan = loaded.revify_plan
    if strategy == "checkpoint":
        recorded = manifest["plan"]["chains"][0]
        # save_ops segments also record the op outputs they keep, per block, those their recompute elides,
        # and the checksums of the op sequences the elision was planned on
        assert [list(s) for s in recorded["segments"]] == \
            [[s.start, s.end, s.policy] + [[[list(op) for op in ops] for ops in lists]
                                           for lists in (s.saved_ops, s.elided_ops) if lists]
             + ([list(s.op_digests)] if s.op_digests else []) for s in plan.chains[0].segments]
        # the same function and gradients as the original checkpoint, dropout on
        original = read_source(src, seq_len=16).model
        # the converted model trains without a KV cache, as Hugging Face's gradient checkpointing does;
        # GPT-2's cache alone changes its gradients in the last bits (a cat makes the keys contiguous)
        plain = {**inputs, "use_cache": False} if name != "bert" else inputs
        out_o, grads_o = _step(original, plain)
        out_l, grads_l = _step(loaded, inputs)
        assert torch.equal(out_o, out_l)
        assert grads_o.keys() == grads_l.keys() and all(torch.equal(grads_o[k], grads_l[k]) for k in grads_o)
    else:
        # the in-memory conversion of the same checkpoint, same seed as the command line's
        model = read_source(src, seq_len=16).model
        torch.manual_seed(0)
        memory = revify.revify(model, inputs, strategy="reversible",
                               coupling="meft2" if "meft2" in extra else "meft1")
        rp, lp = memory.revify_plan.reversible[0], plan.reversible[0]
        assert lp.anchors == rp.anchors and lp.coupling == rp.coupling and lp.steps == rp.steps
        assert lp.step_errors == manifest["plan"]["reversible"][0]["step_errors"]
        out_m, grads_m = _step(memory, inputs)
        out_l, grads_l = _step(loaded, inputs)
        assert torch.equal(out_m, out_l)
        assert grads_m.keys() == grads_l.keys() and all(torch.equal(grads_m[k], grads_l[k]) for k in grads_m)
        assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
            {n for n, p in memory.named_parameters() if p.requires_grad}


# inspect and report run the console script's main in this process: the same code, no new interpreter

def test_inspect_json(hf_folders, capsys):
    code = main(["inspect", str(hf_folders["llama"]), "--seq-len", "16", "--strategy", "reversible",
                 "--coupling", "meft3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    (chain,) = data["plan"]["reversible"]
    assert chain["blocks"] == [f"model.layers.{i}" for i in range(3)]
    assert chain["coupling"]["name"] == "meft3" and chain["steps"] == [[0], [1], [2]]
    assert all(b["sublayers"] == 2 for b in chain["block_info"])
    assert chain["anchors"] == [] and chain["step_errors"] == []  # analysis only: nothing calibrated
    assert data["inputs"]["entries"][0]["tensor"]["shape"] == [2, 16]


def test_report_json_and_plot(hf_folders, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "memory.png"
    code = main(["report", str(hf_folders["bert"]), "--seq-len", "16", "--schedule", "per-block",
                 "--repeats", "1", "--json", "--plot", str(png)])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert 0 < data["after"]["saved_bytes"] < data["before"]["saved_bytes"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_command_has_help_with_examples(capsys):
    for command in ([], ["convert"], ["inspect"], ["report"], ["demo"]):
        assert main([*command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "examples:" in text and "usage: revify" in text
