"""One writer per run folder / generate output (`potstill.lockfile`): a second process is refused naming the
holder's PID; the lock goes with its process, SIGKILL included; a stale lock file does not block."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import POTSTILL, REPO, write_yaml

from potstill import lockfile
from potstill.config import validate_recipe
from potstill.errors import UserError
from potstill.lockfile import LockHeld, hold
from potstill.train import run_recipe

ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))


def _holder_process(lock_path) -> subprocess.Popen:
    """A second process that takes the lock, says "held" and sleeps."""
    code = textwrap.dedent(f"""
        import time
        from potstill.lockfile import hold
        with hold({str(lock_path)!r}, what="test folder"):
            print("held", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_process_is_refused_with_the_holders_pid_and_sigkill_releases(tmp_path):
    lock_path = tmp_path / "run" / ".lock"
    proc = _holder_process(lock_path)
    try:
        with pytest.raises(LockHeld, match=rf"test folder is in use by another potstill process \(PID {proc.pid}"):
            with hold(lock_path, what="test folder"):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert lock_path.exists()  # left behind by the killed holder, naming a dead PID
    assert lockfile.read_holder(lock_path)["pid"] == proc.pid
    with hold(lock_path, what="test folder"):
        assert lockfile.read_holder(lock_path)["pid"] == os.getpid()
    assert not lock_path.exists()


def test_the_lock_is_reentrant_in_one_process_and_removed_after_the_outermost(tmp_path):
    lock_path = tmp_path / "x.lock"
    with hold(lock_path, what="x"):
        with hold(lock_path, what="x"):
            assert lock_path.exists()
        assert lock_path.exists()
    assert not lock_path.exists()


def test_a_stale_lock_file_with_a_dead_pid_does_not_block_a_run(digits_recipe):
    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 2})
    recipe = validate_recipe(raw)
    recipe.run_dir.mkdir(parents=True)
    import json
    import socket

    (recipe.run_dir / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    assert run_recipe(recipe)["steps"] == 2
    assert not (recipe.run_dir / ".lock").exists()


def test_exclusive_file_fallback_takes_over_a_dead_pid_and_refuses_a_live_one(tmp_path, monkeypatch):
    import json
    import socket

    monkeypatch.setattr(lockfile, "_HAS_FLOCK", False)
    lock_path = tmp_path / "o.lock"
    lock_path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    with hold(lock_path, what="output o"):
        assert lockfile.read_holder(lock_path)["pid"] == os.getpid()
    assert not lock_path.exists()
    lock_path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(LockHeld, match=f"PID {os.getppid()}"):
        with hold(lock_path, what="output o"):
            pass
    assert lockfile.pid_alive(os.getpid()) and not lockfile.pid_alive(_dead_pid())


def test_cli_run_into_a_held_folder_exits_2_naming_the_pid(digits_recipe, tmp_path):
    path = write_yaml(tmp_path / "r.yaml", dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 2}))
    run_dir = validate_recipe(digits_recipe).run_dir
    with hold(run_dir / ".lock", what=f"run folder {run_dir}"):
        (run_dir / ".student.abcd1234.tmp").mkdir()  # the holder's write in progress: not swept by the refused run
        out = subprocess.run(POTSTILL + ["run", str(path)], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert f"run folder {run_dir} is in use by another potstill process (PID {os.getpid()}" in lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [".student.abcd1234.tmp"]  # the refused run wrote nothing


def test_a_failed_run_releases_its_lock(digits_recipe):
    raw = dict(digits_recipe, data={**digits_recipe["data"], "train": {"path": "builtin:digits", "split": "train",
                                                                       "limit": 4}})
    recipe = validate_recipe(raw)
    with pytest.raises(UserError, match="fewer than trainer.batch_size"):
        run_recipe(recipe)
    assert not recipe.run_dir.exists()  # the lock released with it: a failed start leaves no folder behind
    recipe.run_dir.mkdir(parents=True)
    (recipe.run_dir / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="fewer than trainer.batch_size"):
        run_recipe(recipe)
    assert sorted(p.name for p in recipe.run_dir.iterdir()) == ["keep.txt", "recipe.yaml"]  # not its folder


def test_a_run_folder_made_only_for_the_lock_is_removed_when_the_run_fails_at_once(tmp_path):
    from types import SimpleNamespace

    from potstill.train.run_folder import run_lock

    single = SimpleNamespace(is_main_process=True, num_processes=1)
    run_dir = tmp_path / "runs" / "new"
    with pytest.raises(RuntimeError, match="boom"), run_lock(run_dir, single):
        assert (run_dir / ".lock").exists()
        raise RuntimeError("boom")
    assert not run_dir.exists()
    run_dir.mkdir()
    with pytest.raises(RuntimeError, match="boom"), run_lock(run_dir, single):
        raise RuntimeError("boom")
    assert run_dir.is_dir() and not any(run_dir.iterdir())  # it was there before: kept


def test_a_run_folder_that_cannot_hold_a_lock_is_a_user_error(digits_recipe):
    recipe = validate_recipe(digits_recipe)
    recipe.run_dir.parent.mkdir(parents=True)
    recipe.run_dir.write_text("a file, not a folder")
    with pytest.raises(UserError, match="is a file; the run needs a folder there"):  # checked before the lock
        run_recipe(recipe)
    with pytest.raises(UserError, match="cannot create the lock file"), hold(recipe.run_dir / ".lock", what="run"):
        pass


def test_cli_generate_on_a_held_output_exits_2_before_sending_anything(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    out = tmp_path / "gen" / "data.jsonl"
    with hold(tmp_path / "gen" / "data.lock", what=f"output {out}"):
        done = subprocess.run(POTSTILL + ["generate", str(prompts), "--out", str(out), "--base-url",
                                          "http://127.0.0.1:9/v1", "--model", "m", "--max-retries", "0"],
                              capture_output=True, text=True, env=ENV, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert f"output {out} is in use by another potstill process (PID {os.getpid()}" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_generate_dataset_is_refused_while_another_holds_the_output(tmp_path):
    from test_generate import ScriptedTeacher

    from potstill.generate import generate_dataset

    teacher, out = ScriptedTeacher(), tmp_path / "d.jsonl"
    proc = _holder_process(tmp_path / "d.lock")
    try:
        with pytest.raises(LockHeld, match=f"PID {proc.pid}"):
            generate_dataset([{"prompt": "what is 1 plus 2?"}], teacher, out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert teacher.stats["requests"] == 0
    report = generate_dataset([{"prompt": "what is 1 plus 2?"}], teacher, out)
    assert report.answered == 1 and not (tmp_path / "d.lock").exists()
