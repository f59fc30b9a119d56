"""--device/--dtype plumbing: autocast around each forward (backward outside), paired step ratios, the report."""
from __future__ import annotations

import json

import pytest
import torch

import revify
from revify.cli import main
from revify.device_step import PairedTimes, autocast_forward, measure_step_memory, paired_step_times, with_precision
from zoo import ALL_CASES, ZooCase

def _bert() -> ZooCase:
    """The zoo's BERT with 8 x 64 tokens: activations outweigh the bf16 copies of the weights autocast keeps."""
    case = ALL_CASES["bert"]()
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (8, 64))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    case.example_inputs = {"input_ids": ids, "attention_mask": mask}
    return case


pytestmark = pytest.mark.usefixtures("one_thread")


def test_autocast_forward_runs_each_forward_in_bf16_and_leaves_autocast_after_it():
    case = ALL_CASES["bert"]()
    seen = []
    layer = case.model.bert.encoder.layer[0]
    handle = layer.register_forward_hook(lambda m, a, o: seen.append((torch.is_autocast_enabled("cpu"), o[0].dtype
                                                                       if isinstance(o, tuple) else o.dtype)))
    with autocast_forward(case.model, "cpu", "bf16") as m:
        assert m is case.model  # the module itself: paths and attributes stay
        out = case.model(**case.example_inputs)
        assert not torch.is_autocast_enabled("cpu")  # left before the loss and backward
    assert out.logits.dtype == torch.bfloat16 and seen[-1][0]
    case.model(**case.example_inputs)
    handle.remove()
    assert not seen[-1][0] and seen[-1][1] == torch.float32  # hooks removed on exit


def test_bf16_steps_keep_fewer_bytes_and_paired_ratios_have_their_spread():
    case = _bert()
    fp32 = measure_step_memory(case.model, case.example_inputs, case.loss_fn)
    bf16 = measure_step_memory(with_precision(case.model, "cpu", "bf16"), case.example_inputs, case.loss_fn)
    assert 0 < bf16.saved_bytes < fp32.saved_bytes
    times = paired_step_times(with_precision(case.model, "cpu", "bf16"), case.model, case.example_inputs,
                              case.loss_fn, pairs=3)
    assert len(times.times_s) == len(times.base_times_s) == 3
    lo, hi = times.spread
    assert lo <= times.ratio <= hi and times.ratio == sorted(times.ratios)[1]
    assert PairedTimes((2.0, 3.0), (1.0, 2.0)).spread == (1.5, 2.0)


def test_report_measures_under_the_dtype_asked_for():
    case = _bert()
    rmodel = revify.revify(case.model, case.example_inputs, schedule="per-block", strict=True)
    fp32 = revify.report(case.model, rmodel, case.example_inputs, case.loss_fn, repeats=1, formulas=False)
    bf16 = revify.report(case.model, rmodel, case.example_inputs, case.loss_fn, repeats=1, formulas=False,
                         dtype="bf16")
    assert 0 < bf16.before.saved_bytes < fp32.before.saved_bytes
    assert 0 < bf16.after.saved_bytes < bf16.before.saved_bytes
    with pytest.raises(ValueError, match="dtype must be"):
        revify.report(case.model, rmodel, case.example_inputs, dtype="int8")


def test_cli_report_dtype(tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=100)).save_pretrained(tmp_path / "bert")
    saved = {}
    for dtype in ("fp32", "bf16"):
        code = main(["report", str(tmp_path / "bert"), "--seq-len", "64", "--batch-size", "8", "--schedule", "per-block", "--repeats", "1",
                     "--json", "--dtype", dtype, "--device", "cpu"])
        out, err = capsys.readouterr()
        assert code == 0, err
        saved[dtype] = json.loads(out)["before"]["saved_bytes"]
    assert 0 < saved["bf16"] < saved["fp32"]
    assert main(["report", str(tmp_path / "bert"), "--dtype", "int8"]) == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err
