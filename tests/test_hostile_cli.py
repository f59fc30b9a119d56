"""The console script against hostile files and bad input: no custom code runs, no user file is lost,
signals end with one line and the shell's exit code, sizes are checked before allocation."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from revify.cli import main

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
import hostile_models as hm  # noqa: E402
from zoo import save_small_bert  # noqa: E402


def _env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **extra}
    env.pop("REVIFY_TRACEBACK", None)
    return env


CLI = [sys.executable, "-m", "revify.cli"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return save_small_bert(tmp_path_factory.mktemp("bert") / "bert", hidden=16, layers=2, heads=2, vocab=50)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    file = tmp_path_factory.mktemp("sd") / "net.safetensors"
    save_file(hm.net().state_dict(), str(file))
    return file


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("revify: error: "), err
    return lines[0]


# --- custom code never runs ------------------------------------------------------------------

@pytest.fixture()
def custom_code(tmp_path, bert) -> tuple[Path, Path]:
    """A folder whose config.json asks for its own Python file (auto_map, unknown model_type)."""
    src = tmp_path / "custom"
    src.mkdir()
    marker = tmp_path / "custom-code-ran"
    config = json.loads((bert / "config.json").read_text())
    config.update(model_type="evilnet", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").write_bytes((bert / "model.safetensors").read_bytes())
    (src / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return src, marker


def test_custom_code_does_not_run_with_yes_on_stdin(custom_code, tmp_path):
    src, marker = custom_code
    res = subprocess.run([*CLI, "convert", str(src), "--out", str(tmp_path / "out")], input="y\n" * 20,
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 2 and "custom code" in _one_line_error(res.stderr)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_custom_code_does_not_run_with_yes_typed_on_a_terminal(custom_code, tmp_path):
    src, marker = custom_code
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the pseudo-terminal
        os.execve(sys.executable, [*CLI, "convert", str(src), "--out", str(tmp_path / "out")], _env())
    output, deadline, status = b"", time.monotonic() + 120, None
    while time.monotonic() < deadline and status is None:
        ready, _, _ = select.select([fd], [], [], 0.2)
        try:
            os.write(fd, b"y\n")  # typed at whatever prompt there is
            if ready:
                output += os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            pass
        done, code = os.waitpid(pid, os.WNOHANG)
        status = code if done else None
    if status is None:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    try:
        while select.select([fd], [], [], 0.2)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            output += chunk
    except OSError:
        pass
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 2, output
    assert b"custom code" in output, output
    assert not marker.exists() and not (tmp_path / "out").exists()


# --- --force and --plot never replace what revify did not write ------------------------------

def test_force_replaces_only_a_folder_revify_wrote_holding_nothing_else(weights, tmp_path):
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "thesis.tex").write_text("years of work")
    args = ["convert", str(weights), "--arch", "hostile_models:net", "--input-shape", "4x8x16", "--force"]
    first = tmp_path / "first"
    assert main([*args, "--out", str(first)]) == 0
    manifest = json.loads((first / "revify.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors"}
    (home / "revify.json").write_text((first / "revify.json").read_text())  # a copy does not make it ours
    assert main([*args, "--out", str(home)]) == 2
    assert (home / "Documents" / "thesis.tex").read_text() == "years of work"
    # one unlisted file in a real revify folder: refused too, with the list of what would be lost
    (first / "notes.txt").write_text("mine")
    assert main([*args, "--out", str(first)]) == 2
    assert (first / "notes.txt").exists()
    (first / "notes.txt").unlink()
    assert main([*args, "--out", str(first)]) == 0  # only its own files: replaced


def test_plot_is_not_overwritten_without_force(bert, tmp_path, capsys):
    png = tmp_path / "memory.png"
    png.write_bytes(b"the user's image")
    assert main(["report", str(bert), "--seq-len", "8", "--repeats", "1", "--plot", str(png)]) == 2
    assert png.read_bytes() == b"the user's image"
    assert "already exists" in _one_line_error(capsys.readouterr().err)
    assert main(["report", str(bert), "--plot", str(tmp_path / "missing" / "m.png")]) == 2
    assert "does not exist" in _one_line_error(capsys.readouterr().err)


# --- convert copies only regular files inside SRC, with SRC's permissions --------------------

def test_convert_copies_no_symlink_out_of_src_and_keeps_permissions(bert, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in bert.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    secret.chmod(0o600)
    (src / "tokenizer.json").symlink_to(secret)  # a link out of SRC: not copied
    (src / "vocab.txt").write_text("[PAD]\n")
    (src / "vocab.txt").chmod(0o600)  # a private file inside SRC: copied, still private
    dst = tmp_path / "dst"
    assert main(["convert", str(src), "--out", str(dst), "--seq-len", "8", "--schedule", "per-block"]) == 0
    assert not (dst / "tokenizer.json").exists()
    assert stat.S_IMODE((dst / "vocab.txt").stat().st_mode) == 0o600
    assert "private key" not in "".join(p.read_text(errors="ignore") for p in dst.iterdir())


# --- SRC that is not a regular file or folder ------------------------------------------------

def test_fifo_and_device_are_refused_before_reading(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for src in (fifo, Path("/dev/zero")):
        res = subprocess.run([*CLI, "convert", str(src), "--arch", "hostile_models:net", "--input-shape", "4x8x16",
                              "--out", str(tmp_path / "out")], capture_output=True, text=True, env=_env(),
                             timeout=60)
        assert res.returncode == 2 and "refusing to read it" in _one_line_error(res.stderr)


# --- bad values: exit 2 with one line --------------------------------------------------------

@pytest.mark.parametrize("extra,words", [
    (["--budget", "1e400"], "--budget"),
    (["--strategy", "reversible", "--lam", "inf"], "finite"),
    (["--device", "nosuch"], "not a device"),
    (["--batch-size", "1000000"], "is free"),
], ids=["budget-overflow", "lam-inf", "device", "too-large"])
def test_bad_values_exit_2_with_one_line(bert, tmp_path, capsys, extra, words):
    t0 = time.perf_counter()
    assert main(["convert", str(bert), "--out", str(tmp_path / "out"), "--seq-len", "16", *extra]) == 2
    assert words in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and time.perf_counter() - t0 < 60


@pytest.mark.parametrize("repeats", ["0", "-5"])
def test_report_repeats_must_be_positive(bert, capsys, repeats):
    assert main(["report", str(bert), "--repeats", repeats]) == 2
    assert "--repeats" in _one_line_error(capsys.readouterr().err)


def test_deeply_nested_config_is_one_line(tmp_path, capsys):
    src = tmp_path / "deep"
    src.mkdir()
    (src / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    (src / "model.safetensors").write_bytes(b"")
    assert main(["convert", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "corrupt" in _one_line_error(capsys.readouterr().err)


def test_an_allocation_failure_is_an_error_not_nothing_converted():
    from revify.input_checks import raise_if_allocation_failed
    from revify.plan import Plan

    plan = Plan(strategy="checkpoint")
    plan.errors.append("RuntimeError: [enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate "
                       "memory: you tried to allocate 80000000000 bytes")
    with pytest.raises(RuntimeError, match="allocation failed"):
        raise_if_allocation_failed(plan)
    raise_if_allocation_failed(Plan(strategy="checkpoint"))  # no error: nothing raised


ALLOCATION_DRIVER = """
import resource, sys
import torch, transformers  # imported before the limit: they map much address space
from revify.cli import main
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 400 * 2**20, resource.RLIM_INFINITY))
sys.exit(main(sys.argv[1:]))
"""


def test_a_failed_allocation_exits_1_with_one_line(weights, tmp_path):
    """Memory the free-memory check cannot see (an address-space limit) runs out in the analysis: exit 1 and
    one line naming the allocation, never "nothing was converted" with exit 0."""
    res = subprocess.run([sys.executable, "-c", ALLOCATION_DRIVER, "convert", str(weights), "--arch",
                          "hostile_models:net", "--input-shape", "2048x512x16", "--schedule", "per-block",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "allocat" in _one_line_error(res.stderr) and "nothing was converted" not in res.stdout
    assert not (tmp_path / "out").exists()


FULL_DISK_DRIVER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (5000, resource.RLIM_INFINITY))
from revify.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_while_writing_exits_2_and_leaves_nothing(weights, tmp_path):
    res = subprocess.run([sys.executable, "-c", FULL_DISK_DRIVER, "convert", str(weights), "--arch",
                          "hostile_models:net", "--input-shape", "4x8x16", "--schedule", "per-block",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 2 and "cannot write" in _one_line_error(res.stderr)
    assert not (tmp_path / "out").exists() and not _temporaries(tmp_path)


def test_a_config_asking_for_a_huge_model_is_refused_before_allocation(bert, tmp_path, capsys):
    src = tmp_path / "huge"
    src.mkdir()
    for f in bert.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["hidden_size"] = 2**20  # about 100 TB of weights
    (src / "config.json").write_text(json.dumps(config))
    t0 = time.perf_counter()
    assert main(["convert", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "weights alone need" in _one_line_error(capsys.readouterr().err)
    assert time.perf_counter() - t0 < 60


def test_demo_too_large_is_refused_before_allocation(capsys):
    t0 = time.perf_counter()
    assert main(["demo", "--seq-len", "65536"]) == 2
    assert "is free" in _one_line_error(capsys.readouterr().err)
    assert time.perf_counter() - t0 < 60


# --- signals ---------------------------------------------------------------------------------

def _start(weights: Path, out: Path, mark: Path, *, arch: str = "hostile_models:net", pause: bool = True):
    env = _env(REVIFY_TEST_MARK=str(mark))
    if pause:
        env["REVIFY_TEST_PAUSE_GLOB"] = str(out.parent / f".{out.name}.revify-tmp-*")
    return subprocess.Popen([*CLI, "convert", str(weights), "--arch", arch, "--input-shape", "4x8x16",
                             "--schedule", "per-block", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(mark: Path, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not mark.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command never reached the point to signal it at"
        time.sleep(0.05)


def _temporaries(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".revify-" in p.name]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_while_writing_gives_one_line_its_exit_code_and_no_leftovers(weights, tmp_path, sig, code):
    out, mark = tmp_path / "out", tmp_path / "mark"
    proc = _start(weights, out, mark)
    try:
        _wait_for(mark, proc)
        assert _temporaries(tmp_path), "the signal must arrive while the temporary folder exists"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code
    assert signal.Signals(sig).name in _one_line_error(err)
    assert not out.exists() and not _temporaries(tmp_path)


def test_a_signal_while_reading_gives_one_line(weights, tmp_path):
    mark = tmp_path / "mark"
    proc = _start(weights, tmp_path / "out", mark, arch="hostile_models:slow_net", pause=False)
    try:
        _wait_for(mark, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "SIGINT" in _one_line_error(err)


def test_stale_temporary_folder_of_a_killed_run_is_removed_by_the_next(weights, tmp_path):
    out, mark = tmp_path / "out", tmp_path / "mark"
    proc = _start(weights, out, mark)
    try:
        _wait_for(mark, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    (left,) = _temporaries(tmp_path)  # SIGKILL runs no cleanup
    # a live process's temporary folder is never touched
    live = tmp_path / f".other.revify-tmp-{os.getpid()}-0123abcd"
    live.mkdir()
    assert main(["convert", str(weights), "--arch", "hostile_models:net", "--input-shape", "4x8x16",
                 "--schedule", "per-block", "--out", str(out)]) == 0
    assert not (tmp_path / left).exists() and live.exists() and out.is_dir()
