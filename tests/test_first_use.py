"""What a new user sees first: plans that lead with results, one recompute unit, honest step times, the CLI."""
from __future__ import annotations

import argparse
import copy
import json
import re

import pytest
import torch

import revify
import zoo
from revify.cli import main


def _peft_bert() -> zoo.ZooCase:
    peft = pytest.importorskip("peft")
    case = zoo.bert()
    case.model = peft.get_peft_model(case.model, peft.LoraConfig(r=4, target_modules=["query", "value"]))
    return case


CASES = {"bert": zoo.bert, "gpt2": zoo.gpt2, "peft-bert": _peft_bert}


@pytest.mark.parametrize("name", list(CASES))
def test_plan_summary_leads_with_results_and_hides_capture_details(name):
    case = CASES[name]()
    plan = revify.revify(case.model, case.example_inputs, loss_fn=case.loss_fn).revify_plan
    text, verbose = plan.summary(), plan.summary(verbose=True)
    assert plan.converted and text.splitlines()[1].startswith("  converted: ")
    assert text.splitlines()[2].startswith("  saves (predicted): ") and "costs (predicted): recompute" in text
    eager = [r for r in plan.regions if r.engine == "eager"]
    assert eager  # these models have modules fx cannot trace: their exceptions must stay out of the summary
    for r in eager:
        first = r.reason.splitlines()[0]
        assert first not in text and first in verbose
        assert len(first) < 200 or first.endswith(" …")  # a long reason is cut between words, and marked
    for fx_text in ("Error", "Proxy", "co_varnames", "torch.fx"):
        assert fx_text not in text, text
    # the schedule in words comes after the results, refusals and capture counts after it
    assert text.index("converted:") < text.index("schedule (budget):") < text.index("capture:")


def test_a_plan_that_keeps_everything_says_what_fits_and_within_which_budget():
    """A budget larger than the whole step: nothing converted, and the summary says why with the figures."""
    case = zoo.ALL_CASES["bert"]()
    plan = revify.revify(case.model, case.example_inputs, memory_budget="1GiB").revify_plan
    assert not plan.converted and plan.budget is not None
    summary = plan.summary()
    assert "the plan already fits" in summary
    fits = next(line for line in summary.splitlines() if line.strip().startswith("fits (predicted)"))
    assert "without recompute, within the budget 1.00 GiB" in fits, summary


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_recompute_share_of_a_plan_is_within_one_forward_as_printed(name):
    case = getattr(zoo, name)()
    plan = revify.revify(case.model, case.example_inputs, loss_fn=case.loss_fn).revify_plan
    share = sum(cp.recompute_fraction for cp in plan.chains)
    assert plan.converted and 0 < share <= 1.0, plan.summary()
    # the summary prints the same figure, in the same unit, for the plan and for its chain
    assert f"recompute {share:.0%} of one model forward" in plan.summary()
    rep = revify.report(case.model, revify.revify(case.model, case.example_inputs, loss_fn=case.loss_fn),
                        case.example_inputs, case.loss_fn, repeats=1, formulas=False)
    assert all(0 < c.recompute_fraction <= 1.0 for c in rep.chains)
    assert "of one model forward" in str(rep).split("chain 0:")[1].splitlines()[2]


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_recompute_share_of_the_same_plan_agrees_across_two_profiles(name):
    """Every block checkpointed alone (the most a checkpoint plan recomputes), priced from two profiles."""
    from revify.api import analyse_model
    from revify.passes.planning.plan_budget import build_problem, recompute_of, schedule_path
    from revify.passes.planning.plan_checkpoint import plan_checkpoint
    from revify.passes.planning.profile_blocks import profile_chains
    from revify.passes.planning.profile_step import profile_step
    from revify.passes.planning.recompute_share import (chain_paths, measure_model_forward, recompute_share,
                                                  segment_overhead_s)
    from revify.passes.rewrite.rewrite_checkpoint import rewrite_checkpoint

    case = getattr(zoo, name)()
    # a batch of 8 × 64 tokens, padded: blocks of about a millisecond, so that timing noise of a busy
    # machine (microsecond ops, preemption) does not dominate what is measured
    torch.manual_seed(2)
    ids = torch.randint(0, 100, (8, 64))
    mask = torch.ones_like(ids)
    mask[::2, -16:] = 0
    case.example_inputs = {"input_ids": ids, "attention_mask": mask}
    _, _, analysis = analyse_model(case.model, case.example_inputs, "checkpoint")
    chains = list(analysis.chains)
    plans = [plan_checkpoint(c, "per-block") for c in chains]
    shares = []
    for _ in range(2):
        profiles = profile_chains(case.model, chains)
        reference, _ = rewrite_checkpoint(case.model, plans)
        problem = build_problem(profiles, profile_step(reference, chains, case.example_inputs, case.loss_fn))
        forward = measure_model_forward(case.model, case.example_inputs, chain_paths(profiles))
        path, share = schedule_path(problem, plans), 0.0
        for c, (prof, cp) in enumerate(zip(profiles, plans)):
            recompute = recompute_of([o for o in path if o.label[1] == c])[0]
            share += recompute_share(prof, recompute, segment_overhead_s(prof, cp.segments), forward).share
        assert 0 < share <= 1.0
        shares.append(share)
    assert abs(shares[0] - shares[1]) <= 0.10, shares


def test_report_of_a_model_and_its_copy_reads_one_within_its_spread():
    case = zoo.vit()
    rep = revify.report(case.model, copy.deepcopy(case.model), case.example_inputs, case.loss_fn, formulas=False)
    text = str(rep)
    found = re.search(r"ratio (\d+\.\d+)x, spread (\d+\.\d+)x-(\d+\.\d+)x", text)
    assert found, text
    ratio, low, high = map(float, found.groups())
    assert low <= 1.00 <= high, text
    assert low <= ratio <= high and rep.ratios()["time"] == rep.timing.ratio
    assert rep.timing.pairs == 7 and rep.timing.warmup >= 1 and rep.timing.confidence >= 0.95


def test_median_interval_is_the_sign_test_interval():
    from revify.step_timing import median_interval

    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0, 7.0, 6.0]) == (1.0, 7.0, 1 - 2 / 2 ** 7)  # 7: min-max
    low, high, confidence = median_interval([float(i) for i in range(11)])
    assert (low, high) == (1.0, 9.0) and confidence == 1 - 2 * 12 / 2 ** 11  # drops one value at each end


def test_cli_version_and_every_value_flag_shows_its_default(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"revify {revify.__version__}"
    from revify.cli.parser import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if action.option_strings and action.nargs != 0 and not action.required and action.help != argparse.SUPPRESS:
                assert action.help and "default" in action.help, (command, action.option_strings)
    assert "--budget-for" in sub.choices["convert"].format_help()
    assert main(["inspect", "--layers", "1", "--hidden", "32", "--budget-for", "activations"]) == 2
    assert "--budget-for says what --budget bounds; give --budget too" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return zoo.save_small_bert(tmp_path_factory.mktemp("hf") / "bert", hidden=32, layers=3, heads=4, vocab=100)


def test_convert_of_a_keep_everything_plan_writes_a_loadable_folder_and_inspect_reads_it(bert_folder, tmp_path,
                                                                                         capsys):
    dst = tmp_path / "out"
    # a budget far above the step's peak: the least-recompute plan keeps every activation
    assert main(["convert", str(bert_folder), "--out", str(dst), "--seq-len", "16", "--budget", "10GiB",
                 "--budget-for", "activations"]) == 0
    out, err = capsys.readouterr()
    recorded = json.loads((dst / "revify.json").read_text())["plan"]["budget"]
    assert recorded["budget_for"] == "activations" and recorded["budget"] == 10 * 2**30
    assert "keeps every activation" in err and "written anyway" in err and f"wrote {dst}" in out
    loaded = revify.load(dst)
    assert loaded.revify_plan.planned and not loaded.revify_plan.converted
    assert main(["inspect", str(dst)]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith(f"converted folder {dst}") and "every chain keeps its activations" in out
    assert "chain 0: 3 × BertLayer" in out and "eager <root>" not in out


def test_inspect_of_a_converted_folder_prints_its_plan_and_predictions(bert_folder, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(["convert", str(bert_folder), "--out", str(dst), "--seq-len", "16"]) == 0
    converted = capsys.readouterr().out
    assert main(["inspect", str(dst), "--verbose"]) == 0
    out, _ = capsys.readouterr()
    # the recorded predictions, the same lines convert printed
    for line in ("saves (predicted):", "costs (predicted): recompute", "schedule (budget):"):
        recorded = next(ln for ln in converted.splitlines() if line in ln)
        assert recorded.strip() in out
    assert "eager <root>" in out  # --verbose: capture details


def test_inspect_of_a_folder_converted_with_arch(tmp_path, monkeypatch, capsys):
    """A folder converted from a state dict names its --arch; inspect needs it too, and says so without it."""
    (tmp_path / "tinyres.py").write_text(
        "import torch\n"
        "class Block(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.f = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))\n"
        "    def forward(self, x):\n"
        "        return x + self.f(x)\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(*[Block() for _ in range(4)])\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import tinyres

    torch.save(tinyres.build().state_dict(), tmp_path / "w.pt")
    args = ["--arch", "tinyres:build"]
    assert main(["convert", "w.pt", *args, "--input-shape", "32x16", "--out", "out", "--schedule", "per-block"]) == 0
    capsys.readouterr()
    assert main(["inspect", "out"]) == 2
    assert "pass model= (a module of that architecture) or arch='tinyres:build'" in capsys.readouterr().err
    assert main(["inspect", "out", *args]) == 0
    out = capsys.readouterr().out
    assert "from tinyres:build" in out and "blocks 0-3 each recomputed alone in backward" in out
