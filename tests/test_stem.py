"""The stem: what made a chain's first input, recomputed with its first segment instead of kept."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import revify
from revify.api import analyse_model
from revify.measure import measure_memory, measure_training_memory
from revify.passes.planning.chain_costs import Pricing, SaveOpsMenus, save_ops_plan
from revify.passes.planning.plan_budget import build_problem, checkpoint_plans, schedule_path
from revify.passes.planning.plan_checkpoint import ChainPlan, Segment
from revify.passes.planning.profile_blocks import profile_chains
from revify.passes.rewrite.rewrite_checkpoint import rewrite_checkpoint
from revify.passes.planning.solve_schedule import min_budget, path_peak
from revify.checkpoint_io import CheckpointError
from planner_fixtures import backward_flops, planner_profile
from zoo import ALL_CASES, EmbeddedTransformer, ZooCase, _logits_loss, train_step


def _embedded(p: float = 0.1) -> ZooCase:
    torch.manual_seed(0)
    return ZooCase("embedded", EmbeddedTransformer(p=p).train(), (torch.randint(0, 50, (2, 16)),), _logits_loss, 4)


CASES = {"embedded": _embedded, **{k: ALL_CASES[k] for k in ("mlp_resnet", "bert", "gpt2", "llama")}}


@pytest.mark.parametrize("name, stem", [("embedded", "embed"), ("mlp_resnet", "inp"), ("bert", "bert.embeddings"),
                                        ("roberta", "roberta.embeddings"), ("gpt2", "transformer.drop"),
                                        ("llama", "model.embed_tokens"), ("vit", "vit.embeddings"),
                                        ("pre_ln_transformer", None), ("opt", None)])
def test_the_stem_is_the_outermost_module_that_made_the_first_input(name, stem):
    # pre_ln_transformer and OPT add their embeddings in the parent's own code: no module made the sum
    case = _embedded() if name == "embedded" else ALL_CASES[name]()
    _, _, analysis = analyse_model(case.model, case.example_inputs, "checkpoint")
    found = analysis.chains[0].stem
    assert (found.path if found else None) == stem


def test_a_module_around_another_chain_is_no_stem():
    """``stage1`` made ``stage2``'s input, but recomputing it would rerun chain ``stage1``."""
    from torch import nn
    from toy_models import ResidualMLPBlock

    class First(nn.Sequential):  # two types, so the stages themselves form no chain
        pass

    class Second(nn.Sequential):
        pass

    model = nn.Sequential()
    model.inp = nn.Linear(16, 16)
    model.stage1 = First(*(ResidualMLPBlock(16) for _ in range(2)))
    model.stage2 = Second(*(ResidualMLPBlock(16) for _ in range(2)))
    _, _, analysis = analyse_model(model.train(), (torch.randn(4, 16),), "checkpoint")
    stems = {c.parent: c.stem.path if c.stem else None for c in analysis.chains}
    assert stems == {"stage1": "inp", "stage2": None}


def test_a_module_feeding_two_chains_is_no_stem():
    """Two towers on one embedding: the embedding can be recomputed with one segment only."""
    from torch import nn
    from toy_models import ResidualMLPBlock

    class First(nn.Sequential):
        pass

    class Second(nn.Sequential):
        pass

    class Towers(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(16, 16)
            self.a = First(*(ResidualMLPBlock(16) for _ in range(2)))
            self.b = Second(*(ResidualMLPBlock(16) for _ in range(2)))

        def forward(self, x):
            h = self.inp(x)
            return self.a(h) + self.b(h)

    model = Towers().train()
    _, _, analysis = analyse_model(model, (torch.randn(4, 16),), "checkpoint")
    assert {c.parent: c.stem for c in analysis.chains} == {"a": None, "b": None}
    rmodel = revify.revify(model, (torch.randn(4, 16),), budget_for="activations", recompute_cost="flops")
    assert [cp.stem for cp in rmodel.revify_plan.chains] == [None, None]


def _plan(chain, policy: str, stem: bool, prof=None) -> ChainPlan:
    n = len(chain.blocks)
    if policy != "save_ops":
        first = Segment(0, 2, policy)
    else:  # a time-priced menu cut in its middle: some ops kept, some elided where it can
        menus = SaveOpsMenus(prof.blocks, Pricing("time"))
        levels = menus.levels()
        first = Segment(0, 2, "save_ops", *save_ops_plan(prof.blocks, 0, 2, levels[len(levels) // 2],
                                                         Pricing("time"), menus))
    return ChainPlan(chain, (first, Segment(2, n)), "test", stem=chain.stem.path if stem else None)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("policy", ["recompute", "save_matmuls", "save_ops"])
def test_a_recomputed_stem_trains_exactly_and_frees_what_was_measured(name, policy):
    """Outputs and gradients bit-identical to the original (dropout masks replayed); the bytes kept
    when backward starts drop by exactly what the profile says: the stem's saved tensors and the
    segment's input, less the stem's arguments the step made (GPT-2's dropout input). The FLOPs a
    backward adds are the stem's measured recompute (nonzero only for the MLP-ResNet's Linear stem:
    embeddings, LayerNorm and dropout count none)."""
    case = CASES[name]()
    _, _, analysis = analyse_model(case.model, case.example_inputs, "checkpoint")
    (prof,) = profile_chains(case.model, [analysis.chains[0]], repeats=1)
    reference = train_step(case.model, case)
    kept, flops = {}, {}
    for stem in (False, True):
        rmodel, segments = rewrite_checkpoint(case.model, [_plan(prof.chain, policy, stem, prof)])
        out, _, grads = train_step(rmodel, replace(case, model=rmodel))
        assert torch.equal(out, reference[0]) and grads.keys() == reference[2].keys()
        assert all(torch.equal(grads[k], reference[2][k]) for k in grads), (stem, name)
        assert (segments[0].stem.recipe_uses == 1) if stem else segments[0].stem is None
        kept[stem] = measure_training_memory(rmodel, case.example_inputs, case.loss_fn).retained_bytes
        flops[stem] = backward_flops(rmodel, case.example_inputs, case.loss_fn)  # a counter in backward
    freed = prof.stem.saved_bytes + prof.blocks[0].input_bytes - prof.stem.held_bytes
    assert freed > 0 and kept[False] - kept[True] == freed, (kept, prof.stem)
    assert flops[True] - flops[False] == prof.stem.recompute_flops


def test_the_planner_predicts_what_a_stem_plan_keeps():
    """At the least activation memory the plan recomputes BERT's embeddings; its predicted bytes
    are the measured ones, and no plan without the stem comes as low."""
    case = ALL_CASES["bert"]()
    _, profiles, step = planner_profile(case.model, case.example_inputs, case.loss_fn)
    problem = build_problem(profiles, step, budget_for="activations", recompute_cost="flops")
    budget, sol = min_budget(problem)
    (plan,) = checkpoint_plans(sol, profiles)
    assert plan.stem == "bert.embeddings"
    rmodel, _ = rewrite_checkpoint(case.model, [plan])
    measured = measure_training_memory(rmodel, case.example_inputs, case.loss_fn).retained_bytes
    assert abs(sol.peak - measured) <= 0.005 * measured, (sol.peak, measured)
    blind = [replace(p, stem=None) for p in profiles]
    without = min_budget(build_problem(blind, step, budget_for="activations", recompute_cost="flops"))
    stem = profiles[0].stem
    assert without[1].peak - sol.peak == stem.saved_bytes + profiles[0].blocks[0].input_bytes - stem.held_bytes


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_the_predicted_peak_counts_the_stem(name):
    """Peak budgets: per-block checkpointing with and without the stem recomputed, and the plan at the
    smallest peak, are predicted within the planner's usual band (-3 % .. +12 %, tests/test_plan_budget)."""
    case = ALL_CASES[name]()
    chains, profiles, step = planner_profile(case.model, case.example_inputs, case.loss_fn)
    problem = build_problem(profiles, step)
    per_block = [ChainPlan(c, tuple(Segment(i, i + 1) for i in range(len(c.blocks)))) for c in chains]
    plain = schedule_path(problem, per_block)
    by_label = {o.label: o for o in problem.options}
    with_stem = [by_label["stem", 0, 0, 1, plain[0].label]] + plain[1:]
    paths = {"per-block": (plain, per_block), "per-block +stem": (with_stem, [replace(per_block[0], stem=chains[0].stem.path)]
                                                                   + per_block[1:])}
    least = min_budget(problem)[1]
    paths["least"] = (list(least.options), checkpoint_plans(least, profiles))
    for label, (path, plans) in paths.items():
        predicted, _ = path_peak(problem, path)
        rmodel, _ = rewrite_checkpoint(case.model, plans)
        measured = measure_memory(rmodel, case.example_inputs, case.loss_fn)[0]
        assert -0.03 * measured <= predicted - measured <= 0.12 * measured, (label, predicted, measured)


class _Scaled(EmbeddedTransformer):
    """After conversion, can change what the chain gets: the embeddings' output scaled in place or
    as a copy, or the blocks run under autocast."""

    change = None

    def forward(self, ids):
        x = self.embed(ids)
        if self.change == "in place":
            x.mul_(2.0)
        elif self.change == "copy":
            x = x * 2.0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.change == "autocast"):
            for b in self.blocks:
                x = b(x)
        return self.head(self.ln_f(x.float()))


def test_anything_unexpected_keeps_the_input_and_stays_exact():
    torch.manual_seed(0)
    model = _Scaled().train()
    case = ZooCase("scaled", model, (torch.randint(0, 50, (2, 16)),), _logits_loss, 4)
    _, _, analysis = analyse_model(model, case.example_inputs, "checkpoint")
    chain = analysis.chains[0]
    rmodel, segments = rewrite_checkpoint(model, [_plan(chain, "recompute", True)])
    stem = segments[0].stem
    # the parent hands the chain something else than the stem's output (or under another autocast
    # state): the segment must keep what it was given
    for change in ("in place", "copy", "autocast"):
        model.change = rmodel.change = change
        reference = train_step(model, case)
        out, _, grads = train_step(rmodel, replace(case, model=rmodel))
        assert torch.equal(out, reference[0]) and all(torch.equal(grads[k], reference[2][k]) for k in grads), change
        assert stem.recipe_uses == 0, change
    model.change = rmodel.change = None
    train_step(rmodel, replace(case, model=rmodel))
    assert stem.recipe_uses == 1  # and otherwise it is rebuilt
    # a hook on the stem sees the call as written: no checkpoint, no recipe
    for register in (rmodel.embed.register_forward_hook, rmodel.embed.register_full_backward_hook):
        handle = register(lambda m, a, o: None)
        reference = train_step(model, case)
        out, _, grads = train_step(rmodel, replace(case, model=rmodel))
        assert torch.equal(out, reference[0]) and all(torch.equal(grads[k], reference[2][k]) for k in grads)
        assert stem.recipe_uses == 1 and stem.last is None
        handle.remove()
    # inference: nothing to recompute
    with torch.no_grad():
        torch.manual_seed(1)
        expected = model.eval()(*case.example_inputs)
        torch.manual_seed(1)
        assert torch.equal(rmodel.eval()(*case.example_inputs), expected)
    model.train(), rmodel.train()
    # the stem's argument changed after forward: its recompute would differ, so backward refuses
    ids = case.example_inputs[0].clone()
    loss = _logits_loss(rmodel(ids))
    ids.add_(1)
    with pytest.raises(RuntimeError, match="modified in place after the forward"):
        loss.backward()


def _second_order(model, ids) -> tuple[list[torch.Tensor], ...]:
    """Gradients from two backwards of one graph (retain_graph), and of a gradient penalty."""
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(1)
    loss = _logits_loss(model(ids))
    first = torch.autograd.grad(loss, params, retain_graph=True)
    again = torch.autograd.grad(loss, params, create_graph=True)
    penalty = torch.autograd.grad(sum(g.pow(2).sum() for g in again), params)
    return first, again, penalty


def test_retain_graph_and_double_backward_through_a_rebuilt_stem():
    """A second backward of the same graph rebuilds the stem again; a gradient penalty (double
    backward) reaches the stem's parameters through the original graph, as without revify."""
    case = _embedded()
    model, (ids,) = case.model, case.example_inputs
    _, _, analysis = analyse_model(model, case.example_inputs, "checkpoint")
    rmodel, segments = rewrite_checkpoint(model, [_plan(analysis.chains[0], "recompute", True)])
    expected, got = _second_order(model, ids), _second_order(rmodel, ids)
    assert segments[0].stem.recipe_uses == 1
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for what, e, g in zip(("first", "retained", "penalty"), expected, got):
        for name, a, b in zip(names, e, g):
            same = torch.equal(a, b) if what != "penalty" else torch.allclose(a, b, rtol=1e-5, atol=1e-7)
            assert same, (what, name)
    embed_norm = names.index("embed.norm.weight")
    assert expected[2][embed_norm].abs().sum() > 0  # the penalty does reach the stem


def test_a_stem_plan_round_trips_and_a_wrong_stem_is_named(tmp_path):
    torch.manual_seed(0)
    model = EmbeddedTransformer().train()
    example = (torch.randint(0, 50, (2, 16)),)
    rmodel = revify.revify(model, example, budget_for="activations", recompute_cost="flops", strict=True)
    assert rmodel.revify_plan.chains[0].stem == "embed"
    folder = revify.save(rmodel, tmp_path / "stem", example)
    loaded = revify.load(folder, model=EmbeddedTransformer())
    assert loaded.revify_plan.chains[0].stem == "embed"
    case = ZooCase("embedded", rmodel, example, _logits_loss, 4)
    out_a, _, grads_a = train_step(rmodel, case)
    out_b, _, grads_b = train_step(loaded, replace(case, model=loaded))
    assert torch.equal(out_a, out_b) and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    manifest = folder / "revify.json"
    manifest.write_text(manifest.read_text().replace('"stem": "embed"', '"stem": "head"'))
    with pytest.raises(CheckpointError, match="recorded stem 'head'"):
        revify.load(folder, model=EmbeddedTransformer())
