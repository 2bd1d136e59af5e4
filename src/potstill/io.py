"""Atomic file writes (a reader sees either the old file or the new one, never half of one), checksums, and state
dicts in the form safetensors writes (`safetensors_state`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Names of the temporary files and folders this module leaves behind when its process is killed mid-write:
#: `.<name>.<8 random chars>.tmp` (tempfile's mkstemp / mkdtemp) and `.<name>.old-<pid>` (`atomic_dir`).
TEMP_NAME = re.compile(r"^\..+\.(?:[a-z0-9_]{8}\.tmp|old-\d+)$")


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def settle_file(path: str | os.PathLike, *, mode: int | None = None) -> None:
    """Give the file `path` the mode a plain `open` would (0666 minus the umask: 0644 under the usual 022;
    safetensors' writer makes 0600) and flush it to disk."""
    os.chmod(path, (0o666 & ~_umask()) if mode is None else mode)
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes writable handles only
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def settle_tree(folder: str | os.PathLike) -> None:
    """`settle_file` every regular file under `folder` (symlinks left alone), then fsync the folders, deepest
    first: what must hold before `folder` is renamed into place."""
    mode = 0o666 & ~_umask()
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                settle_file(path, mode=mode)
        fsync_dir(Path(root))


def sweep_temp(folder: str | os.PathLike, *, depth: int = 1, of: str | None = None) -> list[Path]:
    """Delete the leftovers of interrupted atomic writes (names matching `TEMP_NAME`) in `folder` and in its
    sub-folders down to `depth` levels; returns what was removed. `of`: only entries named after writes to
    `folder/of`. Call it only on what no other process is writing (whose lock this process holds)."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        if of is not None and not entry.name.startswith(f".{of}."):
            continue
        if TEMP_NAME.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        elif depth > 0 and entry.is_dir() and not entry.is_symlink():
            removed += sweep_temp(entry, depth=depth - 1)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temp file in the same folder and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` whole (old one removed last).

    Before the rename every file in it gets the umask's mode and is fsynced (`settle_tree`), so a crash right
    after leaves a complete folder. On failure the temp folder is deleted and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    settle_tree(tmp)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def safetensors_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict safetensors can write: detached, contiguous, on the CPU, and tied tensors (e.g. input
    embeddings = lm_head) stored as separate copies (`load_state_dict` fills both keys back into one tensor)."""
    out, seen = {}, set()
    for key, value in state_dict.items():
        value = value.detach().contiguous().cpu()
        if value.data_ptr() in seen:
            value = value.clone()
        seen.add(value.data_ptr())
        out[key] = value
    return out
