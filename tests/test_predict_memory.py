"""Predicted memory formulas: exact polynomial fits, checked against real-tensor measurements at new sizes."""
from __future__ import annotations

import pytest
import sympy
import torch

import revify
import zoo
from revify.measure import measure_training_memory
from revify.passes.prediction.fit_polynomial import NotPolynomial, fit_polynomials
from revify.passes.prediction.predict_memory import ChainLabel, pretty, predict_memory
from revify.passes.prediction.symbolic_inputs import find_input_symbols


def real_tensor(example: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A real input of ``shape`` with values like ``example``'s (token ids in range, masks padded alike)."""
    if example.dtype.is_floating_point:
        return torch.randn(shape, dtype=example.dtype)
    values = example.unique()
    if len(values) == 1:
        return torch.full(shape, int(values[0]), dtype=example.dtype)
    if set(values.tolist()) <= {0, 1}:  # a mask: padding at the end of the last row, as in the example
        out = torch.ones(shape, dtype=example.dtype)
        out[-1, -max(1, shape[-1] // 4):] = 0
        return out
    return torch.randint(0, int(example.max()) + 1, shape, dtype=example.dtype)


def validation_points(case, formula) -> list[dict[str, int]]:
    """Three sizes the fit did not run, inside what the real model accepts (positions, image sizes)."""
    symbols = find_input_symbols(case.example_inputs)
    b0, fitted = symbols.example["B"], {tuple(sorted(p.items())) for p in formula.fit_points}
    points = []
    if "S" in formula.symbols:
        s0, step = symbols.example["S"], symbols.step["S"]
        sizes = [s for s in (s0 - step, s0 - 2 * step, s0 - 3 * step) if s >= max(step, 2)] or [s0]
        candidates = [{"B": b0 + k, "S": sizes[i % len(sizes)]} for i, k in enumerate((1, 2, 4, 5, 6, 7))]
    else:
        candidates = [{"B": b0 + k, **{k2: v for k2, v in symbols.example.items() if k2 != "B"}} for k in range(1, 10)]
    for p in candidates:
        if tuple(sorted(p.items())) not in fitted and len(points) < 3:
            points.append(p)
    return points


def measured_saved(model, case, point) -> int:
    symbols = find_input_symbols(case.example_inputs)
    inputs = symbols.inputs_at(case.example_inputs, point, real_tensor)
    return measure_training_memory(model, inputs, case.loss_fn, track_peak=False).saved_bytes


def test_fit_polynomials_is_exact_and_refuses_what_is_not_a_polynomial():
    def f(p):
        b, s = p["B"], p["S"]
        return [3 * b * s ** 2 + 5 * b + 7, s * (s + 1) // 2, 11, b ** 2 * s ** 3]

    polys, points = fit_polynomials(f, {"B": list(range(2, 14)), "S": list(range(8, 20))}, guess={"B": 1, "S": 2})
    B, S = sympy.symbols("B S")
    exprs = [polys.expr(i, {"B": B, "S": S}) for i in range(4)]
    assert sympy.expand(exprs[0] - (3 * B * S ** 2 + 5 * B + 7)) == 0
    assert sympy.expand(exprs[1] - S * (S + 1) / 2) == 0  # rational coefficients are exact
    assert sympy.expand(exprs[3] - B ** 2 * S ** 3) == 0
    far = {"B": 1000, "S": 777}
    assert [int(v) for v in polys.evaluate(far)] == f(far)
    assert len(points) < 30
    with pytest.raises(NotPolynomial):  # a maximum of two polynomials is not one
        fit_polynomials(lambda p: [max(100 * p["B"], 30 * p["S"])],
                        {"B": list(range(2, 14)), "S": list(range(8, 20))}, guess={"B": 1, "S": 2})


def test_input_symbols_name_batch_sequence_and_image_side():
    text = find_input_symbols({"input_ids": torch.zeros(2, 12, dtype=torch.long),
                               "attention_mask": torch.ones(2, 12, dtype=torch.long)})
    assert text.example == {"B": 2, "S": 12} and text.s_meaning == "sequence length"
    assert {(d.leaf, d.dim, d.symbol) for d in text.dims} == {(0, 0, "B"), (0, 1, "S"), (1, 0, "B"), (1, 1, "S")}
    image = find_input_symbols((torch.zeros(4, 3, 16, 16),))
    assert image.example == {"B": 4, "S": 16} and image.step["S"] == 8 and image.s_meaning == "image side"
    assert image.shape_at(0, (4, 3, 16, 16), {"B": 5, "S": 24}) == (5, 3, 24, 24)
    features = find_input_symbols((torch.zeros(8, 32),))
    assert features.example == {"B": 8}  # 32 features are not a size the user changes


@pytest.mark.parametrize("name", list(zoo.ALL_CASES))
def test_saved_bytes_formula_matches_real_measurements_at_new_sizes(name):
    """Before and after checkpointing, fitted on fake tensors, measured on real ones at three unseen sizes."""
    case = zoo.ALL_CASES[name]()
    rmodel = revify.revify(case.model, case.example_inputs, strategy="checkpoint", schedule="sqrt(n)")
    assert rmodel.revify_plan.converted
    for model in (case.model, rmodel):
        formula = predict_memory(model, case.example_inputs, case.loss_fn, peak=False)
        points = validation_points(case, formula)
        assert len(points) == 3
        for point in points:
            predicted = formula.evaluate(**point)["saved"]
            real = measured_saved(model, case, point)
            assert abs(predicted - real) <= 0.05 * real, (name, point, predicted, real)


def test_peak_formula_and_categories_match_real_peaks():
    case = zoo.pre_ln_transformer()
    rmodel = revify.revify(case.model, case.example_inputs, strategy="checkpoint", schedule="sqrt(n)")
    for model in (case.model, rmodel):
        formula = predict_memory(model, case.example_inputs, case.loss_fn)
        assert isinstance(formula.peak, sympy.Max)  # the highest allocation moves with the sizes
        for point in ({"B": 3, "S": 15}, {"B": 7, "S": 9}):
            predicted = formula.evaluate(**point)
            inputs = find_input_symbols(case.example_inputs).inputs_at(case.example_inputs, point, real_tensor)
            real = measure_training_memory(model, inputs, case.loss_fn)
            assert abs(predicted["peak"] - real.peak_bytes) <= 0.05 * real.peak_bytes
            for category, value in real.peak_by_category.items():
                assert abs(predicted["peak_by_category"][category] - value) <= 0.05 * real.peak_bytes
            assert predicted["retained"] == pytest.approx(real.retained_bytes, rel=0.05)


def test_reversible_formula_matches_real_measurement():
    case = zoo.pre_ln_transformer()
    rmodel = revify.revify(case.model, case.example_inputs, strategy="reversible", coupling="meft1")
    assert rmodel.revify_plan.reversible
    formula = predict_memory(rmodel, case.example_inputs, case.loss_fn, peak=False)
    for point in ({"B": 3, "S": 14}, {"B": 5, "S": 11}):
        real = measured_saved(rmodel, case, point)
        assert abs(formula.evaluate(**point)["saved"] - real) <= 0.05 * real


def test_describe_pulls_out_the_chain_and_max_batch_solves_the_formula():
    case = zoo.pre_ln_transformer()
    paths = [f"blocks.{i}" for i in range(4)]
    formula = predict_memory(case.model, case.example_inputs, case.loss_fn, paths)
    lines = formula.describe([ChainLabel("chain 0", tuple(paths), "PreLNBlock")])
    assert lines[0].startswith("saved for backward = L·(") and "where L = 4 × PreLNBlock (chain 0)" in lines[1]
    # per-block terms times L plus the rest is the whole formula
    by_block = formula.saved_by_block()
    assert sympy.expand(sum(by_block.values()) - formula.saved) == 0
    assert sympy.expand(by_block["blocks.1"] - by_block["blocks.2"]) == 0
    # max_batch: the largest B whose parameters + peak fit, exactly at the boundary
    total = formula.evaluate(B=37, S=16)["total"]
    assert formula.max_batch(total, seq_len=16) == 37
    assert formula.max_batch(total - 1, seq_len=16) == 36
    assert formula.max_batch(1000) == 0  # not even one sample
    gib = formula.max_batch("1GiB", seq_len=8)
    assert formula.evaluate(B=gib, S=8)["total"] <= 2 ** 30 < formula.evaluate(B=gib + 1, S=8)["total"]
    with pytest.raises(ValueError, match="not a byte count"):
        formula.max_batch("lots")


def test_a_size_the_model_refuses_is_held_with_the_reason():
    case = zoo.vit()
    formula = predict_memory(case.model, case.example_inputs, case.loss_fn, peak=False)
    assert formula.symbols == ("B",) and "held at 32" in formula.held["S"]
    assert formula.evaluate(B=5, S=32)["saved"] == formula.evaluate(B=5)["saved"]
    with pytest.raises(ValueError, match="S is not a variable"):
        formula.evaluate(B=5, S=64)


def test_pretty_groups_by_batch_power():
    B, S = sympy.Symbol("B", positive=True, integer=True), sympy.Symbol("S", positive=True, integer=True)
    assert pretty(64 * B * S ** 2 + 2176 * B * S + 16 * S + 8) == "64·B·S·(S + 34) + 8·(2·S + 1)"
    assert pretty(sympy.Integer(0)) == "0"

