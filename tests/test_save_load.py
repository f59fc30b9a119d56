"""revify.save / revify.load: round trips, strict loading, format versions, atomic writes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import revify
from revify.checkpoint_io import CheckpointError, write_folder_atomically
from revify.example_inputs import InputSpec, TensorSpec, parse_input_shape
from revify.source_errors import SourceError
from zoo import ALL_CASES, MLPResNet, train_step


def _outputs(model, case, seed=7):
    out, loss, grads = train_step(model, case, seed=seed)
    return out, loss, grads


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".revify-tmp-" in p.name or ".revify-old-" in p.name]


# --- input specs ------------------------------------------------------------------------------

def test_input_spec_records_and_synthesises_the_same_inputs():
    ids = torch.randint(0, 50, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    spec = InputSpec.from_example({"input_ids": ids, "attention_mask": mask, "pixel": torch.randn(2, 3),
                                   "use_cache": False})
    again = InputSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again == spec
    made = again.synthesise()
    # a 0/1 mask is recorded exactly (the padding pattern matters); token ids only by range (they may
    # be the user's data), floats by shape
    assert torch.equal(made["attention_mask"], mask)
    assert "values" not in json.dumps(spec.to_json()["entries"][0])
    assert made["input_ids"].shape == ids.shape and made["input_ids"].dtype == torch.int64
    assert int(made["input_ids"].min()) >= int(ids.min()) and int(made["input_ids"].max()) <= int(ids.max())
    assert made["pixel"].shape == (2, 3) and made["pixel"].dtype == torch.float32
    assert made["use_cache"] is False
    # seeded: the same tensors every time, and the global RNG is not touched
    state = torch.get_rng_state()
    assert torch.equal(again.synthesise()["pixel"], made["pixel"])
    assert torch.equal(torch.get_rng_state(), state)


def test_input_shape_syntax():
    assert parse_input_shape("8x32") == TensorSpec((8, 32), "float32", "randn")
    ids = parse_input_shape("2x16:int64:50")
    assert ids == TensorSpec((2, 16), "int64", "randint", high=50)
    t = ids.make(torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) < 50
    for bad in ("", "8x-1", "2x16:int64", "8x32:complex"):
        with pytest.raises(SourceError):
            parse_input_shape(bad)


# --- round trips --------------------------------------------------------------------------------

def test_checkpoint_round_trip_of_a_plain_module(tmp_path):
    case = ALL_CASES["mlp_resnet"]()
    rmodel = revify.revify(case.model, case.example_inputs, schedule="sqrt(n)")
    dst = revify.save(rmodel, tmp_path / "mlp", case.example_inputs)
    assert sorted(p.name for p in dst.iterdir()) == ["model.safetensors", "revify.json"]
    _no_leftovers(tmp_path)

    # a plain module: the folder does not name code to import; the caller says what to build
    with pytest.raises(CheckpointError, match="pass model="):
        revify.load(dst)
    torch.manual_seed(123)
    loaded = revify.load(dst, model=MLPResNet())  # other random weights, overwritten from the file
    assert [s.describe() for s in loaded.revify_plan.chains[0].segments] == \
        [s.describe() for s in rmodel.revify_plan.chains[0].segments]
    out_a, loss_a, grads_a = _outputs(rmodel, case)
    out_b, loss_b, grads_b = _outputs(loaded, case)
    assert torch.equal(out_a, out_b) and torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)

    by_arch = revify.load(dst, arch="zoo:MLPResNet")
    assert torch.equal(_outputs(by_arch, case)[0], out_a)


def test_reversible_round_trip_restores_anchors_adapters_and_frozen_backbone(tmp_path):
    case = ALL_CASES["bert"]()
    rmodel = revify.revify(case.model, case.example_inputs, strategy="reversible", coupling="meft1",
                           adapter_init="normal", tolerance=1e-6)
    rp = rmodel.revify_plan.reversible[0]
    dst = revify.save(rmodel, tmp_path / "bert", case.example_inputs)
    assert json.loads((dst / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]

    loaded = revify.load(dst)
    lp = loaded.revify_plan.reversible[0]
    assert (lp.anchors, lp.step_errors, lp.start_error, lp.start_bound) == \
        (rp.anchors, rp.step_errors, rp.start_error, rp.start_bound)
    assert lp.coupling == rp.coupling and lp.steps == rp.steps and lp.options == rp.options
    # freeze_backbone re-applied: requires_grad flags are not in safetensors
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in rmodel.named_parameters() if p.requires_grad}
    assert trainable and all("revify_adapter" in n or n.startswith(("bert.pooler", "classifier")) for n in trainable)
    assert any(not p.requires_grad for p in loaded.parameters())
    out_a, loss_a, grads_a = _outputs(rmodel, case)
    out_b, loss_b, grads_b = _outputs(loaded, case)
    assert torch.equal(out_a, out_b) and torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)

    # train the adapters a few steps, save without example inputs (the loaded module remembers them)
    opt = torch.optim.SGD([p for p in loaded.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        torch.manual_seed(step)
        case.loss_fn(loaded(**case.example_inputs)).backward()
        opt.step()
        opt.zero_grad()
    dst2 = revify.save(loaded, tmp_path / "bert-trained")
    again = revify.load(dst2)
    trained = loaded.state_dict()
    restored = again.state_dict()
    assert trained.keys() == restored.keys()
    assert all(torch.equal(trained[k], restored[k]) for k in trained)
    assert not torch.equal(trained["bert.encoder.layer.0.revify_adapter_f.up.weight"],
                           rmodel.state_dict()["bert.encoder.layer.0.revify_adapter_f.up.weight"])
    assert torch.equal(_outputs(again, case)[0], _outputs(loaded, case)[0])


def test_tied_weights_are_stored_once_and_plain_transformers_reads_the_folder(tmp_path):
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    case = ALL_CASES["gpt2"]()
    original = {k: v.clone() for k, v in case.model.state_dict().items()}
    rmodel = revify.revify(case.model, case.example_inputs, strategy="reversible")
    dst = revify.save(rmodel, tmp_path / "gpt2", case.example_inputs)
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "pt"
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys  # as save_pretrained does
    plain, info = GPT2LMHeadModel.from_pretrained(str(dst), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] and all(".revify_adapter_" in k for k in info["unexpected_keys"])
    assert plain.lm_head.weight is plain.transformer.wte.weight
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in original.items())
    loaded = revify.load(dst)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_a_plan_mixing_checkpoint_and_reversible_chains_round_trips(tmp_path):
    # what the budget planner produces with strategy="auto": both kinds of chain in one plan
    from revify.api import analyse_model, convert
    from revify.passes.planning.plan_checkpoint import plan_checkpoint
    from revify.passes.planning.plan_reversible import ReversibleOptions, plan_reversible
    from zoo import CNNResNet

    case = ALL_CASES["cnn_resnet"]()
    plan, trace, analysis = analyse_model(case.model, case.example_inputs, "checkpoint")
    first, second = analysis.chains
    plan.strategy = "auto"
    plan.chains = [plan_checkpoint(first, "per-block")]
    plan.reversible = [plan_reversible(second, ReversibleOptions("revnet"))]
    rmodel = convert(case.model, plan, trace, case.example_inputs)
    assert len(rmodel.revify_plan.chains) == 1 and len(rmodel.revify_plan.reversible) == 1
    dst = revify.save(rmodel, tmp_path / "mixed", case.example_inputs)

    loaded = revify.load(dst, model=CNNResNet())
    assert loaded.revify_plan.strategy == "auto"
    assert [c.block_paths for c in loaded.revify_plan.chains] == [["layer1.0", "layer1.1", "layer1.2"]]
    (rp,) = loaded.revify_plan.reversible
    assert [b.path for b in rp.chain.blocks] == ["layer2.1", "layer2.2"] and rp.coupling.name == "revnet"
    assert rp.anchors == rmodel.revify_plan.reversible[0].anchors
    out_a, loss_a, grads_a = _outputs(rmodel, case)
    out_b, loss_b, grads_b = _outputs(loaded, case)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    # BatchNorm statistics are weights too: equal after the same step
    assert all(torch.equal(a, b) for a, b in zip(rmodel.buffers(), loaded.buffers()))


def test_selective_segments_round_trip_with_their_op_lists(tmp_path):
    """A ``save_ops`` plan (the budget planner's op-level choice) is saved and rebuilt as is."""
    from dataclasses import replace

    from revify.api import analyse_model, convert
    from revify.passes.planning.chain_costs import save_ops_plan
    from revify.passes.planning.save_ops_menu import ALL_STEPS
    from revify.passes.planning.plan_checkpoint import Segment, plan_checkpoint
    from revify.passes.planning.profile_blocks import profile_chains

    case = ALL_CASES["mlp_resnet"]()
    plan, trace, analysis = analyse_model(case.model, case.example_inputs, "checkpoint")
    (chain,) = analysis.chains
    (prof,) = profile_chains(case.model, [chain], repeats=1)
    segments = tuple(Segment(i, i + 2, "save_ops", *save_ops_plan(prof.blocks, i, i + 2, ALL_STEPS))
                     for i in range(0, len(chain.blocks) - 1, 2))
    plan.chains = [replace(plan_checkpoint(chain, "per-block"), segments=segments)]
    rmodel = convert(case.model, plan, trace, case.example_inputs)
    dst = revify.save(rmodel, tmp_path / "selective", case.example_inputs)
    loaded = revify.load(dst, model=MLPResNet())
    assert loaded.revify_plan.chains[0].segments == segments
    assert any(ops for s in segments for ops in s.saved_ops)
    out_a, loss_a, grads_a = _outputs(rmodel, case)
    out_b, loss_b, grads_b = _outputs(loaded, case)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


# --- refusals ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_mlp(tmp_path_factory):
    case = ALL_CASES["mlp_resnet"]()
    rmodel = revify.revify(case.model, case.example_inputs, schedule="per-block")
    return revify.save(rmodel, tmp_path_factory.mktemp("saved") / "mlp", case.example_inputs)


def _copy(folder: Path, to: Path) -> Path:
    to.mkdir()
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_newer_format_version_is_refused(saved_mlp, tmp_path):
    dst = _copy(saved_mlp, tmp_path / "newer")
    manifest = json.loads((dst / "revify.json").read_text())
    manifest["format_version"] = 99
    (dst / "revify.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99, newer than this revify reads"):
        revify.load(dst, model=MLPResNet())


def _rehash(folder: Path) -> None:
    """Re-record the checksums in revify.json after replacing a file (else load refuses it as changed)."""
    from revify.safe_paths import sha256_of

    manifest = json.loads((folder / "revify.json").read_text())
    manifest["files"] = {n: sha256_of(folder / n) for n in manifest["files"]}
    (folder / "revify.json").write_text(json.dumps(manifest))


def test_weights_load_strictly(saved_mlp, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved_mlp / "model.safetensors"))
    extra = _copy(saved_mlp, tmp_path / "extra")
    save_file({**state, "blocks.0.surprise": torch.zeros(3)}, str(extra / "model.safetensors"))
    _rehash(extra)
    with pytest.raises(CheckpointError, match="1 tensor.* not in the model, e.g. blocks.0.surprise"):
        revify.load(extra, model=MLPResNet())
    missing = _copy(saved_mlp, tmp_path / "missing")
    save_file({k: v for k, v in state.items() if k != "out.bias"}, str(missing / "model.safetensors"))
    _rehash(missing)
    with pytest.raises(CheckpointError, match="missing from the file, e.g. out.bias"):
        revify.load(missing, model=MLPResNet())
    other_head = MLPResNet()
    other_head.out = torch.nn.Linear(32, 5)
    with pytest.raises(CheckpointError, match=r"out.bias has shape \(10,\) in the file but \(5,\)"):
        revify.load(saved_mlp, model=other_head)


def test_a_recorded_chain_the_model_does_not_have_is_named(saved_mlp, tmp_path):
    with pytest.raises(CheckpointError, match=r"recorded chain blocks.0 … blocks.5 \(6 blocks\) is not a chain "
                                              r"of this model \(analysis now finds: blocks.0 … blocks.3"):
        revify.load(saved_mlp, model=MLPResNet(n_blocks=4))


# --- atomic writes -----------------------------------------------------------------------------

def test_interrupted_write_leaves_nothing(tmp_path):
    def fill(tmp: Path) -> None:
        (tmp / "part").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(tmp_path / "dst", fill)
    assert not (tmp_path / "dst").exists()
    _no_leftovers(tmp_path)


def test_existing_destination_is_replaced_only_with_force_and_only_if_revify_wrote_it(saved_mlp, tmp_path):
    case = ALL_CASES["mlp_resnet"]()
    rmodel = revify.revify(case.model, case.example_inputs, schedule="sqrt(n)")
    dst = _copy(saved_mlp, tmp_path / "dst")
    before = (dst / "revify.json").read_bytes()
    with pytest.raises(CheckpointError, match="already exists; pass force=True"):
        revify.save(rmodel, dst, case.example_inputs)
    assert (dst / "revify.json").read_bytes() == before
    revify.save(rmodel, dst, case.example_inputs, force=True)
    assert json.loads((dst / "revify.json").read_text())["plan"]["chains"][0]["schedule"] == "sqrt(n)"
    _no_leftovers(tmp_path)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a revify folder"):
        revify.save(rmodel, mine, case.example_inputs, force=True)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_save_needs_the_example_inputs_of_a_fresh_conversion(tmp_path):
    case = ALL_CASES["mlp_resnet"]()
    rmodel = revify.revify(case.model, case.example_inputs, schedule="sqrt(n)")
    with pytest.raises(CheckpointError, match="pass example_inputs="):
        revify.save(rmodel, tmp_path / "x")
    with pytest.raises(CheckpointError, match="not returned by revify"):
        revify.save(MLPResNet(), tmp_path / "x", case.example_inputs)
    assert not (tmp_path / "x").exists()
    assert os.listdir(tmp_path) == []
