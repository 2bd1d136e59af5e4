"""The sandboxed program executor: answers, limits (wall, CPU, memory, output), blocked network and processes."""

from __future__ import annotations

import pytest

from potstill.data.program_executor import (
    ExecutionLimits,
    ExecutionResult,
    as_number,
    check_answer,
    run_program,
    verify_program,
)
from potstill.errors import UserError

FAST = ExecutionLimits(wall_seconds=3.0, cpu_seconds=1)


@pytest.mark.parametrize("source, value", [
    ("a = 12\nb = a * 3\nanswer = b - 5", 31.0),           # the `answer` variable
    ("def solution():\n    return 10 / 4", 2.5),            # PAL's solution()
    ("print('thinking')\nprint('1,234')", 1234.0),          # the last printed line
    ("answer = 'Paris'", "Paris"),
])
def test_a_correct_program_returns_its_answer(source, value):
    result = run_program(source, FAST)
    assert result.status == "ok" and result.value == value and result.error is None


def test_a_hanging_program_is_killed_at_the_wall_clock_limit():
    limits = ExecutionLimits(wall_seconds=1.0, cpu_seconds=30)
    result = run_program("import time\ntime.sleep(600)\nanswer = 1", limits)
    assert result.status == "timeout" and "wall-clock" in result.error
    assert result.seconds >= 1.0  # killed at its limit, not before


def test_a_busy_loop_is_killed_at_the_cpu_limit():
    result = run_program("while True:\n    pass", ExecutionLimits(wall_seconds=60.0, cpu_seconds=1))
    assert result.status == "timeout" and "CPU" in result.error


def test_allocating_2_gb_is_a_memory_result():
    result = run_program("blob = bytearray(2 * 1024 ** 3)\nanswer = len(blob)", FAST)
    assert result.status == "memory" and result.value is None


@pytest.mark.parametrize("source, event", [
    ("import socket\nsocket.socket().connect(('127.0.0.1', 80))", "socket.__new__"),
    ("import urllib.request\nurllib.request.urlopen('http://example.com')", "socket."),
    # caught by the program, still recorded: the run is refused
    ("import socket\ntry:\n    socket.create_connection(('10.0.0.1', 80))\nexcept OSError:\n    pass\nanswer = 1",
     "socket.getaddrinfo"),
    ("import subprocess\nsubprocess.run(['true'])", "subprocess.Popen"),
    ("import os\nos.system('true')", "os.system"),
    ("import ctypes", "ctypes."),
])
def test_network_processes_and_ctypes_are_blocked(source, event):
    result = run_program(source, FAST)
    assert result.status == "blocked" and event in result.error and result.value is None


def test_output_is_capped():
    limits = ExecutionLimits(wall_seconds=3.0, cpu_seconds=1, output_bytes=1000)
    assert run_program("print('x' * 5000)\nanswer = 1", limits).status == "output"
    assert run_program("import os\nos.write(1, b'y' * 5000)\nanswer = 1", limits).status == "output"
    assert run_program("print('x' * 10)\nanswer = 1", limits).status == "ok"


@pytest.mark.parametrize("source, error", [
    ("answer = = 1", "SyntaxError"),
    ("raise ValueError('no')", "ValueError: no"),
    ("x = 1", "no answer"),
    ("import sys\nsys.exit(0)", "SystemExit"),
])
def test_failures_are_errors_with_one_line(source, error):
    result = run_program(source, FAST)
    assert result.status == "error" and error in result.error


def test_the_child_has_an_empty_environment_and_a_temporary_folder():
    result = run_program("import os, sys\nanswer = f'{sorted(os.environ)} {os.getcwd()} {sys.flags.isolated}'",
                         FAST)
    names, cwd, isolated = result.value.rsplit(" ", 2)
    # only what Python's own C-locale coercion (PEP 538) may add
    assert names in ("[]", "['LC_CTYPE']") and "potstill-program-" in cwd and isolated == "1"


def test_check_answer_uses_the_absolute_tolerance():
    ok = ExecutionResult("ok", value=7.004)
    assert check_answer(ok, 7).status == "ok" and check_answer(ok, "7").status == "ok"
    assert check_answer(ok, 7.02).status == "wrong_answer"
    assert check_answer(ExecutionResult("ok", value="Paris"), " paris ").status == "ok"
    assert check_answer(ExecutionResult("timeout", error="x"), 7).status == "timeout"
    wrong = verify_program("answer = 8", 7, FAST)
    assert wrong.status == "wrong_answer" and wrong.reason() == "wrong answer: the program gives 8.0"
    assert as_number(" 1,234. ") == 1234.0 and as_number(True) is None and as_number("nan") is None


def test_bad_limits_and_sources_are_user_errors():
    with pytest.raises(UserError, match="wall_seconds"):
        ExecutionLimits(wall_seconds=0)
    with pytest.raises(UserError, match="program"):
        run_program(None)  # type: ignore[arg-type]
