"""revify.load on hostile or damaged folders: the same gradients, or CheckpointError -- nothing else."""
from __future__ import annotations

import io
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import revify
from revify.checkpoint_io import CheckpointError
from revify.safe_paths import sha256_of

sys.path.insert(0, str(Path(__file__).parent))
import hostile_models as hm  # noqa: E402

ARCH = "hostile_models:net"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("hostile") / "converted"
    hm.elided_folder(dst)
    return dst


@pytest.fixture(scope="module")
def reference() -> dict:
    return hm.gradients(hm.net())


def _copy(folder: Path, tmp: Path) -> Path:
    out = tmp / f"copy{time.monotonic_ns()}"
    shutil.copytree(folder, out)
    return out


def _edit(dst: Path, change, *, rehash: bool = False) -> None:
    """Edit revify.json with ``change(manifest)``; ``rehash`` re-records the checksums (a deliberate edit)."""
    file = dst / "revify.json"
    manifest = json.loads(file.read_text())
    change(manifest)
    if rehash:
        manifest["files"] = {n: sha256_of(dst / n) for n in manifest["files"] if (dst / n).is_file()}
    file.write_text(json.dumps(manifest))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_valid_folder_trains_like_the_original(folder, reference):
    manifest = json.loads((folder / "revify.json").read_text())
    segment = manifest["plan"]["chains"][0]["segments"][0]
    assert segment[2] == "save_ops" and any(segment[4]), "the folder must elide ops in recompute"
    assert set(manifest["files"]) == {"model.safetensors"}
    assert _equal(hm.gradients(revify.load(folder, arch=ARCH)), reference)


# --- a tampered plan is validated against the fresh analysis ---------------------------------

def _segment(m):
    return m["plan"]["chains"][0]["segments"][0]


TAMPERED = {
    # the reported case: kept lists emptied, elided lists kept (trained NaN before)
    "kept emptied": (lambda m: _segment(m).__setitem__(3, [[] for _ in _segment(m)[3]]), "recompute needs it"),
    # eliding the kept residual sum of the last block, which the backward needs
    "needed op elided": (lambda m: _segment(m)[4][2].append([19, "aten.add.Tensor"]), "recompute needs it"),
    "kept op renamed": (lambda m: _segment(m)[3][0].__setitem__(0, [19, "aten.mm.default"]), "not an op of this"),
    "segment outside": (lambda m: _segment(m).__setitem__(1, 7), "segment"),
    "null plan": (lambda m: m.__setitem__("plan", None), "plan"),
}


@pytest.mark.parametrize("case", list(TAMPERED), ids=list(TAMPERED))
def test_a_tampered_plan_is_refused_with_its_first_inconsistency(folder, tmp_path, case):
    change, words = TAMPERED[case]
    dst = _copy(folder, tmp_path)
    _edit(dst, change, rehash=True)
    with pytest.raises(CheckpointError, match=words):
        revify.load(dst, arch=ARCH)


def test_an_op_checksum_of_another_op_sequence_elides_nothing(folder, tmp_path, reference):
    """A checksum that does not match the ops a block runs now (loaded on another device, or edited): the
    segment elides nothing -- the runtime would not elide there either -- and trains exactly; combined with
    emptied kept lists it is not a way around the validation."""
    for change in (lambda m: _segment(m)[5].__setitem__(1, 1234),
                   lambda m: (TAMPERED["kept emptied"][0](m), _segment(m)[5].__setitem__(0, 1234))):
        dst = _copy(folder, tmp_path)
        _edit(dst, change, rehash=True)
        loaded = revify.load(dst, arch=ARCH)
        (segment,) = loaded.revify_plan.chains[0].segments
        assert segment.policy == "save_ops" and segment.elided_ops is None
        assert _equal(hm.gradients(loaded), reference)


def test_reversible_coupling_parameters_must_be_finite(tmp_path):
    from revify.saved_plan import RecordedPlan

    entry = {"blocks": ["b.0", "b.1"], "coupling": {"name": "meft1", "lam": math.inf, "beta": 1.0},
             "steps": [[0], [1]], "options": {}}
    for lam in (math.inf, math.nan, 0.0, -1.0):
        entry["coupling"]["lam"] = lam
        with pytest.raises(ValueError):
            RecordedPlan.from_json({"strategy": "reversible", "reversible": [entry]})


# --- paths stay inside the folder ------------------------------------------------------------

def test_paths_in_revify_json_stay_inside_the_folder(folder, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(folder / "model.safetensors", elsewhere / "model.safetensors")
    for name in ("../elsewhere/model.safetensors", str(elsewhere / "model.safetensors"), "", None, 7):
        dst = _copy(folder, tmp_path)
        _edit(dst, lambda m: m.__setitem__("weights", name))
        with pytest.raises(CheckpointError, match="weights"):
            revify.load(dst, arch=ARCH)
    # a symlink inside the folder that leads out of it
    dst = _copy(folder, tmp_path)
    (dst / "model.safetensors").unlink()
    (dst / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    with pytest.raises(CheckpointError, match="outside the folder"):
        revify.load(dst, arch=ARCH)


def test_a_changed_file_is_refused_by_its_checksum(folder, tmp_path):
    dst = _copy(folder, tmp_path)
    data = bytearray((dst / "model.safetensors").read_bytes())
    data[-3] ^= 0x40  # a weight's bits: still a valid safetensors file
    (dst / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        revify.load(dst, arch=ARCH)


# --- one exception type for malformed fields -------------------------------------------------

def _entry(m):
    return m["inputs"]["entries"][0]


MALFORMED = {
    "entry not an object": lambda m: m["inputs"]["entries"].__setitem__(0, 5),
    "unknown entry keyword": lambda m: _entry(m).__setitem__("dtype", "float32"),
    "unknown tensor keyword": lambda m: _entry(m)["tensor"].__setitem__("device", "cuda"),
    "shape of strings": lambda m: _entry(m)["tensor"].__setitem__("shape", ["4", "x"]),
    "negative shape": lambda m: _entry(m)["tensor"].__setitem__("shape", [-4, 8, 16]),
    "80 GB input": lambda m: _entry(m)["tensor"].__setitem__("shape", [100000, 100000, 2]),
    "infinite constant": lambda m: m["inputs"]["entries"].append({"name": "extra", "value": math.inf}),
    "source not an object": lambda m: m.__setitem__("source", [1]),
    "frozen not a list": lambda m: m.__setitem__("frozen", {"a": 1}),
    "files not a mapping": lambda m: m.__setitem__("files", ["model.safetensors"]),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_fields_raise_checkpoint_error(folder, tmp_path, case):
    dst = _copy(folder, tmp_path)
    _edit(dst, MALFORMED[case])
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError):
        revify.load(dst, arch=ARCH)
    assert time.perf_counter() - t0 < 30  # the 80 GB input is refused before anything is allocated


def test_a_recorded_step_too_large_for_free_memory_is_refused_before_allocation(folder, tmp_path, monkeypatch):
    """Inputs of 2 GB pass the inputs check with 4 GiB free; the step on them (predicted on fake tensors,
    tens of GB) does not."""
    import revify.fits

    monkeypatch.setattr(revify.fits, "available_bytes", lambda device="cpu": 4 * 2**30)
    dst = _copy(folder, tmp_path)
    _edit(dst, lambda m: _entry(m)["tensor"].__setitem__("shape", [4 * 10**6, 8, 16]))
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="one training step .* needs"):
        revify.load(dst, arch=ARCH)
    assert time.perf_counter() - t0 < 30


def test_deeply_nested_revify_json_and_missing_cuda(folder, tmp_path):
    dst = _copy(folder, tmp_path)
    (dst / "revify.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError):
        revify.load(dst, arch=ARCH)
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="CUDA is not available"):
            revify.load(folder, arch=ARCH, device="cuda")
    with pytest.raises(CheckpointError, match="not a device"):
        revify.load(folder, arch=ARCH, device="nosuch")


def test_load_never_reads_stdin_for_custom_code(tmp_path, monkeypatch):
    """A converted Hugging Face folder whose config.json asks for custom code (checksums re-recorded):
    refused, with 'y' waiting on stdin, and the folder's Python file never imported."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=32, vocab_size=50))
    inputs = {"input_ids": torch.randint(0, 50, (2, 8))}
    dst = tmp_path / "hf"
    revify.save(revify.revify(model, inputs, schedule="per-block"), dst, inputs)
    marker = tmp_path / "custom-code-ran"
    (dst / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((dst / "config.json").read_text())
    config.update(auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}, model_type="evilnet")
    (dst / "config.json").write_text(json.dumps(config))
    _edit(dst, lambda m: None, rehash=True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 100))
    with pytest.raises(CheckpointError, match="custom code"):
        revify.load(dst)
    assert not marker.exists()
    assert sys.stdin.read(2) == "y\n"  # nothing read it


# --- property: any corruption loads to the same gradients, or raises CheckpointError ----------

def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


REPLACEMENTS = [None, 0, 1, -1, 3, 10**12, 0.5, math.inf, math.nan, "", "../x", "aten.mm.default", [], {},
                True, "DELETE", "PLUS_ONE"]


def _apply(manifest, path, replacement):
    if not path:
        return replacement if replacement != "DELETE" else {}
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if replacement == "DELETE":
        del parent[key]
    elif replacement == "PLUS_ONE":
        old = parent[key]
        parent[key] = old + 1 if isinstance(old, (int, float)) and not isinstance(old, bool) else old
    else:
        parent[key] = replacement
    return manifest


class _Timeout(Exception):
    pass


def _load_and_check(dst: Path, reference: dict) -> None:
    """Within 60 s: CheckpointError, or a model whose gradients equal the original's (none NaN)."""
    def on_alarm(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    try:
        try:
            model = revify.load(dst, arch=ARCH)
        except CheckpointError:
            event("refused")
            return
        event("loaded")
        grads = hm.gradients(model)
        assert all(torch.isfinite(g).all() for g in grads.values()), "NaN or inf gradients"
        assert _equal(grads, reference), "loaded without error, but trains differently"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_random_corruption_gives_the_same_gradients_or_checkpoint_error(folder, reference, tmp_path_factory, data):
    dst = _copy(folder, tmp_path_factory.mktemp("corrupt"))
    name = data.draw(st.sampled_from(["model.safetensors", "revify.json"]))
    raw = bytearray((dst / name).read_bytes())
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    (dst / name).write_bytes(bytes(raw))
    _load_and_check(dst, reference)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_random_json_edits_give_the_same_gradients_or_checkpoint_error(folder, reference, tmp_path_factory, data):
    """Edits of revify.json with the checksums left as written, and (half the time) re-recorded as a
    deliberate editor would: the plan validation, not the checksum, must then catch what trains wrong."""
    dst = _copy(folder, tmp_path_factory.mktemp("edit"))
    manifest = json.loads((dst / "revify.json").read_text())
    paths = sorted(_paths(manifest), key=repr)
    path = data.draw(st.sampled_from(paths))
    replacement = data.draw(st.sampled_from(REPLACEMENTS))
    edited = _apply(manifest, path, replacement)
    if isinstance(edited, dict) and isinstance(edited.get("files"), dict) and data.draw(st.booleans()):
        edited["files"] = {n: sha256_of(dst / n) if (dst / n).is_file() else None for n in edited["files"]}
    (dst / "revify.json").write_text(json.dumps(edited))
    _load_and_check(dst, reference)
