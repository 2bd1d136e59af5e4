"""A sandboxed Python executor for teacher-written programs (the verifier of program distillation).

Program distillation (Jie & Lu, "Leveraging Training Data in Few-Shot Prompting for Numerical Reasoning", ACL
Findings 2023) keeps a teacher's program only when running it gives the gold answer. `run_program` runs one
program in a child process and returns an `ExecutionResult` whose `status` is one of

- ``ok``: it ran and produced an answer (`value`);
- ``wrong_answer``: it ran, but `check_answer` found its value differs from the gold one;
- ``timeout``: it ran past the wall-clock or the CPU-time limit and was killed;
- ``memory``: it hit the address-space limit (a MemoryError, or the interpreter died for lack of memory);
- ``output``: it printed up to the output cap (the kernel refuses bytes past it: RLIMIT_FSIZE);
- ``blocked``: it tried something the sandbox forbids (network, new processes, ctypes);
- ``error``: anything else (syntax error, an exception, no answer).

The answer is the program's module-level variable ``answer``; else the return value of a ``solution()``
function it defines (the PAL prompt style); else the last non-empty line it printed. A value that reads as a
number (``"1,234"`` too) becomes a float. `check_answer` compares numbers with the paper's absolute tolerance
``|value − gold| < 1e-2`` and anything else as stripped strings.

How the child is run: ``python -I -S -c <runner>`` (isolated mode: no environment variables read, no user or
system site-packages, not even `site`), with an empty environment, its working directory a fresh temporary
folder that is deleted afterwards, stdin carrying the program text, stdout/stderr into files of that folder,
and its own session (process group), killed as a group on timeout. The runner sets its kernel limits before it
compiles the program (not in a `preexec_fn`: that is unsafe in a parent with threads, such as the endpoint
client's pool): RLIMIT_AS (memory), RLIMIT_CPU (CPU seconds, SIGXCPU then SIGKILL), RLIMIT_FSIZE (bytes per
written file, which caps the output), RLIMIT_CORE 0, and RLIMIT_NPROC 0 (no new processes; ignored for root).

What is blocked, best effort: a `sys.addaudithook` hook (which Python code cannot remove) refuses the audit
events of sockets (``socket.*``: creating, connecting, resolving names), processes (``subprocess.Popen``,
``os.system``, ``os.exec*``, ``os.posix_spawn``, ``os.spawn*``, ``os.fork``, ``os.forkpty``, ``pty.spawn``) and
``ctypes.*`` (so ``import ctypes`` fails), and records the attempt even if the program catches the error.
What is NOT blocked: reading any file the user can read, writing files (up to the size cap) wherever the user
may, C extension code that goes around the audit hooks, and network or processes reached that way. This is a
guard against mistakes and runaway programs, not a security boundary: run untrusted code in a container or VM
(network namespace, seccomp, read-only file system) as well.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from potstill.errors import UserError

Status = Literal["ok", "wrong_answer", "timeout", "memory", "output", "blocked", "error"]
#: The paper's acceptance test: |answer − gold| < ANSWER_TOLERANCE.
ANSWER_TOLERANCE = 1e-2
_VALUE_CHARS = 200
_TEXT_CHARS = 2000

# The child's code: limits, audit hook, then the program; the result goes to argv[1] as JSON.
_RUNNER = r'''
import sys, resource
_result_path, _mem, _cpu, _fsize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
del sys.argv[1:]
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_AS, (_mem, _mem))
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (_fsize, _fsize))
try:
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
except (ValueError, OSError):
    pass
import json
_dumps, _open, _exc_info = json.dumps, open, sys.exc_info
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
            "os.forkpty", "pty.", "ctypes.")
_violations = []
def _hook(event, args):
    if event.startswith(_BLOCKED):
        _violations.append(event)
        raise PermissionError("sandbox: " + event + " is not allowed")
sys.addaudithook(_hook)
_source = sys.stdin.read()
_status, _error, _value, _has = "ok", None, None, False
_globals = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(_source, "<program>", "exec"), _globals)
    if "answer" in _globals:
        _value, _has = _globals["answer"], True
    elif callable(_globals.get("solution")):
        _value, _has = _globals["solution"](), True
except MemoryError:
    _status, _error = "memory", "MemoryError"
except BaseException as _err:
    _status, _error = "error", type(_err).__name__ + ": " + str(_err)
if _violations:
    _status, _error = "blocked", "sandbox: " + _violations[0] + " is not allowed"
try:
    _shown = _value if isinstance(_value, (int, float, str)) and not isinstance(_value, bool) else repr(_value)
except BaseException:
    _shown = "<unprintable>"
with _open(_result_path, "w") as _f:
    _f.write(_dumps({"status": _status, "error": _error, "has_answer": _has, "value": _shown}))
'''


@dataclass(frozen=True)
class ExecutionLimits:
    """Limits of one run. Defaults: 5 s wall clock, 5 s CPU, 512 MiB address space, 64 KiB per output file."""

    wall_seconds: float = 5.0
    cpu_seconds: int = 5
    memory_bytes: int = 512 * 2**20
    output_bytes: int = 64 * 2**10

    def __post_init__(self) -> None:
        for name in ("wall_seconds", "cpu_seconds", "memory_bytes", "output_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"execution limit {name}: expected a positive number, got {value!r}")


@dataclass(frozen=True)
class ExecutionResult:
    """One program's run: `status` (see the module docstring), its answer `value` (a float when it reads as a
    number), the `error` (one line) when it failed, the start of what it printed, and the wall time."""

    status: Status
    value: float | str | None = None
    error: str | None = None
    stdout: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def reason(self) -> str:
        """One line for a rejection log."""
        if self.status == "wrong_answer":
            return f"wrong answer: the program gives {self.value!r}"
        if self.status == "ok":
            return "ok"
        return f"{self.status}: {self.error}" if self.error else self.status


def as_number(value: Any) -> float | None:
    """`value` as a finite float (numbers, or text such as " 1,234.5 "), else None; bools are not numbers."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        value = value.strip().replace(",", "").rstrip(".")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _killed_status(returncode: int, stderr: str) -> tuple[Status, str]:
    signals = {-signal.SIGXCPU: ("timeout", "CPU-time limit exceeded"),
               -signal.SIGKILL: ("timeout", "killed (CPU-time limit)"),
               -signal.SIGXFSZ: ("output", "output limit exceeded")}
    if returncode in signals:
        return signals[returncode]  # type: ignore[return-value]
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory", "the interpreter ran out of memory"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}"
    return "error", last[:_TEXT_CHARS]


def run_program(source: str, limits: ExecutionLimits = ExecutionLimits()) -> ExecutionResult:
    """Run the Python program `source` in the sandbox (see the module docstring) and return its result."""
    if not isinstance(source, str):
        raise UserError(f"program: expected Python source text, got {type(source).__name__}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="potstill-program-") as folder:
        tmp = Path(folder)
        result_path = tmp / "result.json"
        args = [sys.executable, "-I", "-S", "-c", _RUNNER, str(result_path), str(int(limits.memory_bytes)),
                str(int(math.ceil(limits.cpu_seconds))), str(int(limits.output_bytes))]
        with open(tmp / "stdout.txt", "wb") as out, open(tmp / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=tmp, env={},
                                    start_new_session=True, close_fds=True)
            try:
                proc.communicate(source.encode("utf-8"), timeout=limits.wall_seconds)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
        seconds = time.perf_counter() - start
        stdout = _read_text(tmp / "stdout.txt")
        written = max(_size(tmp / "stdout.txt"), _size(tmp / "stderr.txt"))
        if written >= limits.output_bytes:
            return ExecutionResult("output", error=f"output limit of {limits.output_bytes} bytes reached",
                                   stdout=stdout, seconds=seconds)
        if timed_out:
            return ExecutionResult("timeout", error=f"wall-clock limit of {limits.wall_seconds:g} s exceeded",
                                   stdout=stdout, seconds=seconds)
        report = _read_report(result_path)
        if report is None:
            status, error = _killed_status(proc.returncode, _read_text(tmp / "stderr.txt"))
            return ExecutionResult(status, error=error, stdout=stdout, seconds=seconds)
    if report["status"] != "ok":
        return ExecutionResult(report["status"], error=report["error"], stdout=stdout, seconds=seconds)
    if report["has_answer"]:
        value = report["value"]
    else:
        lines = [line.strip() for line in stdout.splitlines() if line.strip()]
        if not lines:
            return ExecutionResult("error", error="no answer: the program sets no `answer`, defines no "
                                   "`solution()` and prints nothing", stdout=stdout, seconds=seconds)
        value = lines[-1]
    number = as_number(value)
    shown = number if number is not None else str(value)[:_VALUE_CHARS]
    return ExecutionResult("ok", value=shown, stdout=stdout, seconds=seconds)


def check_answer(result: ExecutionResult, gold: Any, *, tolerance: float = ANSWER_TOLERANCE) -> ExecutionResult:
    """`result` marked ``wrong_answer`` when it ran but its value is not the gold answer: numbers within
    `tolerance` (absolute), anything else equal as stripped, lower-cased text."""
    if not result.ok:
        return result
    value, expected = as_number(result.value), as_number(gold)
    if value is not None and expected is not None:
        same = abs(value - expected) < tolerance
    else:
        same = str(result.value).strip().lower() == str(gold).strip().lower()
    return result if same else replace(result, status="wrong_answer")


def verify_program(source: str, gold: Any, limits: ExecutionLimits = ExecutionLimits(), *,
                   tolerance: float = ANSWER_TOLERANCE) -> ExecutionResult:
    """Run `source` and check its answer against `gold` (`run_program` then `check_answer`)."""
    return check_answer(run_program(source, limits), gold, tolerance=tolerance)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _read_text(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(_TEXT_CHARS).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_report(path: Path) -> dict | None:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("status") in ("ok", "memory", "error", "blocked") \
        else None
