"""Paths revify reads and writes, checked: nothing leaves a folder, nothing of the user's is replaced.

Four checks, each a small function the writers and readers call:

* ``replace_problem(dst)``: ``--force`` / ``force=True`` replaces a folder
  only if revify wrote it and it holds nothing else -- every entry is a
  regular file its ``revify.json`` lists (``"files"``), plus ``revify.json``
  itself. A ``revify.json`` copied into a home folder does not make the home
  folder replaceable.
* ``file_inside(folder, name)``: a file name read from ``revify.json``
  (weights, listed files) is a plain relative name that resolves, symlinks
  followed, to a regular file inside the folder.
* ``regular_files_inside(root, paths)``: the files ``convert`` copies from
  SRC -- regular files that resolve inside SRC (a ``vocab.txt`` symlinked to
  ``~/.ssh/id_rsa`` is not copied).
* ``remove_stale_temporaries(parent)``: temporary folders of revify's own
  naming (``.NAME.revify-tmp-PID-HEX``) whose process is gone (SIGKILL,
  power loss) are removed by the next write in that parent folder.

Before::

    check_destination("~", force=True)   # ~/revify.json exists → ~ replaced, ~/Documents gone

After::

    replace_problem(Path("~"))  →  "it holds files revify did not write: Documents, notes.txt"
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Iterable

MANIFEST = "revify.json"
# what a revify folder written before revify.json listed its files could hold
LEGACY_FILES = frozenset({"revify.json", "model.safetensors", "config.json", "generation_config.json",
                          "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                          "vocab.json", "merges.txt", "tokenizer.model", "preprocessor_config.json",
                          "added_tokens.json"})
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.revify-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")
_MAX_MANIFEST_BYTES = 64 * 2**20  # a revify.json is kilobytes; a larger one is not ours


class UnsafePathError(ValueError):
    """A path would leave its folder, or a write would replace something revify did not write."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def listed_files(manifest: object) -> dict[str, str | None] | None:
    """The files a manifest says its folder holds, name → sha256 (None: not recorded); None: no list."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if isinstance(files, dict) and all(isinstance(k, str) and (v is None or isinstance(v, str))
                                       for k, v in files.items()):
        return dict(files)
    return None


def _read_manifest_quietly(folder: Path) -> dict | None:
    import json

    file = folder / MANIFEST
    try:
        st = os.stat(file, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MANIFEST_BYTES:
            return None
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def replace_problem(dst: Path) -> str | None:
    """Why ``dst`` must not be replaced (None: it is an empty folder, or a revify folder holding only its files)."""
    if dst.is_symlink() or not dst.is_dir():
        return f"refusing to replace {dst}: it is not a folder revify wrote (not a folder); remove it yourself"
    entries = sorted(os.listdir(dst))
    if not entries:
        return None
    manifest = _read_manifest_quietly(dst)
    if manifest is None or "format_version" not in manifest:
        return (f"refusing to replace {dst}: it is not a revify folder (no readable {MANIFEST}); "
                "remove it yourself")
    listed = listed_files(manifest)
    allowed = (set(listed) | {MANIFEST}) if listed is not None else set(LEGACY_FILES)
    foreign = [e for e in entries
               if e not in allowed or not stat.S_ISREG(os.stat(dst / e, follow_symlinks=False).st_mode)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return (f"refusing to replace {dst}: it holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
                f"revify did not write, which would be lost: {shown}; remove them or choose another destination")
    return None


def file_inside(folder: Path, name: object, what: str) -> Path:
    """``folder / name`` for a plain relative ``name`` that resolves to a regular file inside ``folder``."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafePathError(f"{what} must be a file name, got {name!r}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or name.startswith("~"):
        raise UnsafePathError(f"{what} {name!r} is not inside the folder (absolute or '..' paths are refused)")
    path = folder / rel
    try:
        resolved, root = path.resolve(strict=True), folder.resolve(strict=True)
    except (OSError, RuntimeError):
        raise UnsafePathError(f"{what} {name!r}: no such file in {folder}") from None
    if not resolved.is_relative_to(root):
        raise UnsafePathError(f"{what} {name!r} is a link to {resolved}, outside the folder")
    if not stat.S_ISREG(os.stat(resolved).st_mode):
        raise UnsafePathError(f"{what} {name!r} is not a regular file")
    return path


def regular_files_inside(root: Path, paths: Iterable[Path]) -> list[Path]:
    """The ``paths`` that resolve (symlinks followed) to regular files inside ``root``, resolved."""
    base = root.resolve()
    out = []
    for p in paths:
        try:
            resolved = Path(p).resolve(strict=True)
            if resolved.is_relative_to(base) and stat.S_ISREG(os.stat(resolved).st_mode):
                out.append(resolved)
        except (OSError, RuntimeError):
            continue
    return out


def copy_regular_file(src: Path, dst: Path) -> None:
    """Copy the bytes of a regular file, opened without following a final symlink, keeping its permissions."""
    fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fin:
        st = os.fstat(fin.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{src} is not a regular file")
        with open(dst, "xb") as fout:
            shutil.copyfileobj(fin, fout)
    os.chmod(dst, stat.S_IMODE(st.st_mode))


def source_kind_problem(path: Path) -> str | None:
    """Why SRC cannot be read (a FIFO, a device, a socket: reading would block or never end); None: fine."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"{path}: {exc.strerror or 'cannot be read'}"
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    return f"{path} is {kind}, not a regular file or folder; refusing to read it"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as exc:  # EPERM: someone else's process, alive
        return exc.errno != errno.ESRCH
    return True


def remove_stale_temporaries(parent: Path) -> list[Path]:
    """Remove ``.NAME.revify-tmp-PID-HEX`` folders in ``parent`` whose process is gone; returns them.

    A ``.NAME.revify-old-…`` folder (a replaced destination, removed after the rename) is removed only
    when ``NAME`` exists again: otherwise it is the only copy of the user's previous folder.
    """
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = _TEMPORARY.match(name)
        if m is None or _process_alive(int(m.group("pid"))):
            continue
        path = parent / name
        if path.is_symlink() or not path.is_dir():
            continue
        if m.group("kind") == "old" and not (parent / m.group("name")).exists():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def output_file_problem(path: Path, force: bool, flag: str = "--force") -> str | None:
    """Why the file ``path`` must not be written (exists without ``force``, a folder, no parent); None: fine."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        return f"{path} is a folder, not a file"
    if (path.exists() or path.is_symlink()) and not force:
        return f"{path} already exists; pass {flag} to overwrite it"
    if not parent.is_dir():
        return f"cannot write {path}: folder {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write {path}: no permission to write in {parent}"
    return None


def is_write_failure(exc: BaseException) -> bool:
    """An I/O error reported by a writer that wraps it in its own exception (safetensors: "I/O error: No space
    left on device (os error 28)")."""
    text = str(exc)
    return isinstance(exc, OSError) or "(os error " in text or "I/O error" in text
