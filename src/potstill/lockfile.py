"""One writer at a time: an OS file lock on a run folder (`<run>/.lock`) or an output (`<out>.lock`).

`hold(path, what=...)` takes an exclusive, non-blocking lock on the file `path` for the length of a `with`
block and writes the holder's PID, host and start time into it. A second process asking for the same lock is
refused at once with a `UserError` that names the holder (`LockHeld`). The lock is the kernel's
(`fcntl.flock` on POSIX), so it goes away with its process however that process ends, SIGKILL included: a lock
file left behind by a dead process does not block. The holder deletes the file when it lets go; a waiter that
had opened the old file notices (its inode is no longer the path's) and tries again.

Where `flock` is missing (Windows) or refused by the filesystem (some network mounts), the lock is a file
created with O_EXCL instead; one whose PID is dead on this host is stale and taken over.

Locks are re-entrant within a process: an inner `hold` of a lock the process already holds is free, and the
lock is released when the outermost one exits.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from potstill.errors import UserError

if sys.platform != "win32":
    import fcntl

    _HAS_FLOCK = True
else:  # pragma: no cover - exercised on Windows only
    _HAS_FLOCK = False

#: errno values of a filesystem that does not do `flock` (the O_EXCL lock file is used there instead).
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class LockHeld(UserError):
    """Another process holds the lock; `holder` is what it wrote (pid, host, started), possibly empty."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


# path → [fd (or -1 for an O_EXCL lock file), nesting depth]
_held: dict[str, list[int]] = {}


def _holder_info() -> bytes:
    return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n").encode()


def read_holder(path: str | os.PathLike) -> dict[str, Any]:
    """What the holder of the lock file `path` wrote about itself ({} when unreadable or empty)."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _refusal(path: Path, what: str, holder: dict[str, Any]) -> LockHeld:
    pid, host = holder.get("pid"), holder.get("host")
    who = f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname() else "") if pid else "a process"
    since = f" since {holder['started']}" if holder.get("started") else ""
    return LockHeld(f"{what} is in use by another potstill process ({who}{since}); wait for it to finish or stop "
                    f"it (lock file {path})", holder)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _flock(path: Path, what: str) -> int | None:
    """The fd of the locked file, or None when this filesystem does not do flock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder: dict[str, Any] = {}
            for _ in range(20):  # the holder may not have written its PID yet
                holder = read_holder(path)
                if holder:
                    break
                time.sleep(0.01)
            raise _refusal(path, what, holder) from None
        except OSError as err:
            os.close(fd)
            if err.errno in _NO_FLOCK:
                return None
            raise
        if _same_file(fd, path):  # else the previous holder deleted it between our open and flock
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_info(), 0)
    return fd


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    if pid <= 0:
        return False
    if sys.platform == "win32":  # pragma: no cover - Windows only
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exclusive_file(path: Path, what: str) -> None:
    """The fallback lock: create `path` with O_EXCL; take over a file whose PID is dead on this host."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = read_holder(path)
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == socket.gethostname() and not pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # stale: its process is gone
                continue
            raise _refusal(path, what, holder) from None
        try:
            os.write(fd, _holder_info())
        finally:
            os.close(fd)
        return
    raise _refusal(path, what, read_holder(path))


@contextlib.contextmanager
def hold(path: str | os.PathLike, *, what: str) -> Iterator[None]:
    """Hold the exclusive lock file `path` (its folder is created) for the `with` block; `what` names the
    guarded thing in the refusal ("run folder runs/x"). Raises `LockHeld` when another process holds it, and
    a `UserError` when the lock file cannot be created."""
    path = Path(path)
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _flock(path, what) if _HAS_FLOCK else None
        if fd is None:
            _exclusive_file(path, what)
    except OSError as err:
        raise UserError(f"cannot create the lock file {path} ({err.strerror or err}); {what} must be a writable "
                        f"folder") from None
    _held[key] = [-1 if fd is None else fd, 1]
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked, so no other process can be holding this file
        if fd is not None:
            os.close(fd)
