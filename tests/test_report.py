"""Report v2: per-chain figures, formulas, max batch, JSON and plot."""
from __future__ import annotations

import io
import json
import sys

import pytest
import sympy

import revify
import zoo


@pytest.fixture(scope="module")
def bert_report():
    case = zoo.bert()
    rmodel = revify.revify(case.model, case.example_inputs, strategy="checkpoint", schedule="sqrt(n)")
    return revify.report(case.model, rmodel, case.example_inputs, case.loss_fn, repeats=1)


def test_per_chain_figures_add_up_to_the_totals(bert_report):
    rep = bert_report
    (chain,) = rep.chains
    assert chain.strategy == "checkpoint" and chain.blocks == 3 and chain.block_type == "BertLayer"
    assert "segments [0-1, 2]" in chain.layout
    for which in ("before", "after"):
        m = getattr(rep, which)
        in_chain = sum(getattr(b, f"saved_{which}") for b in rep.blocks)
        assert in_chain == getattr(chain, f"saved_{which}")
        assert in_chain + m.saved_by_block[""] == m.saved_bytes
        assert sum(m.peak_by_category.values()) == m.peak_bytes
    heads = [b.saved_after for b in rep.blocks]
    assert heads[0] > 0 and heads[1] == 0 and heads[2] > 0  # segment 0-1's relay keeps nothing
    assert chain.saved_after < chain.saved_before / 5
    # every block of the chain is recomputed once: measured forward time of the three blocks
    assert chain.recompute_s == pytest.approx(chain.forward_s) and chain.recompute_s > 0
    assert 0 < chain.recompute_fraction < 2
    text = str(rep)
    for piece in ("MEASURED", "chain 0: 3 × BertLayer", "recompute:", "outside the chains", "gradients at peak"):
        assert piece in text


def test_formulas_are_fitted_on_demand_and_agree_with_the_measurement(bert_report):
    rep = bert_report
    out = io.StringIO()
    rep.formula(file=out)
    text = out.getvalue()
    assert "PREDICTED" in text and "saved for backward = L·(" in text and "L = 3 × BertLayer (chain 0)" in text
    for which in ("before", "after"):
        f = rep.formulas[which]
        at_example = f.evaluate()
        assert at_example["saved"] == getattr(rep, which).saved_bytes
        assert at_example["peak"] == getattr(rep, which).peak_bytes
    assert rep.chains[0].predicted_saved_after == rep.chains[0].saved_after
    assert "memory formulas:" in str(rep)
    b, a = rep.max_batch("256MiB", seq_len=512, which="before"), rep.max_batch("256MiB", seq_len=512)
    assert 0 < b < a
    with pytest.raises(ValueError, match="which must be"):
        rep.max_batch("1GiB", which="during")


def test_json_is_complete(bert_report):
    d = json.loads(bert_report.to_json())
    assert {"before", "after", "ratios", "chains", "blocks", "formulas", "pareto", "estimated"} <= set(d)
    assert d["chains"][0]["saved_after"] == bert_report.chains[0].saved_after
    assert d["before"]["peak_by_category"] == bert_report.before.peak_by_category
    after = d["formulas"]["after"]
    names = {k: sympy.Symbol(k) for k in after["symbols"]}  # "S" would otherwise parse as sympy.S
    saved = sympy.sympify(after["saved_bytes"], locals=names)
    value = saved.subs({names[k]: v for k, v in after["example"].items() if k in names})
    assert int(value) == bert_report.after.saved_bytes


def test_reversible_chain_reports_reconstruction_error():
    case = zoo.pre_ln_transformer()
    rmodel = revify.revify(case.model, case.example_inputs, strategy="reversible", coupling="meft1")
    rep = revify.report(case.model, rmodel, case.example_inputs, case.loss_fn, repeats=1, formulas=False)
    (chain,) = rep.chains
    assert chain.strategy == "reversible (meft1)" and "coupling step" in chain.layout
    assert chain.reconstruction_error is not None and chain.start_error is not None
    assert chain.recompute_s == pytest.approx(chain.forward_s)
    assert "reconstruction error" in str(rep)
    with pytest.raises(RuntimeError, match="formulas=False"):
        rep.formula()
    assert "formulas" not in rep.to_dict()


def test_plot_draws_blocks_categories_and_the_pareto_front(bert_report, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    two = bert_report.plot(str(tmp_path / "two.png"))
    case = zoo.mlp_resnet()
    rmodel = revify.revify(case.model, case.example_inputs)  # the budget planner: the plan carries a front
    rep = revify.report(case.model, rmodel, case.example_inputs, case.loss_fn, repeats=1, formulas=False)
    if not rep.pareto:
        pytest.skip("this plan has no Pareto front (budget planner not in use)")
    three = rep.plot(str(tmp_path / "three.png"))
    w2, w3 = Image.open(two).size[0], Image.open(three).size[0]
    assert w3 > w2 * 1.3  # a third panel
    assert "Pareto" in str(rep)


def test_plot_without_matplotlib_says_how_to_install(bert_report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'revify\[plot\]'"):
        bert_report.plot(str(tmp_path / "x.png"))
