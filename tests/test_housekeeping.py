"""Run-folder housekeeping: stale temp folders swept at start, no duplicate final rows on resume, keep_last on
every start, reproducible cache bytes, weight files with the umask's mode, fsync before rename, and a server
that survives a client hanging up mid-body."""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from potstill import io
from potstill.config import validate_recipe
from potstill.train import checkpoint as ckpt
from potstill.train import run_recipe


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _short(raw: dict, **trainer) -> dict:
    return dict(raw, trainer={**raw["trainer"], **trainer})


def test_a_start_sweeps_our_stale_temp_folders_only(digits_recipe):
    recipe = validate_recipe(_short(digits_recipe, max_steps=2))
    run = recipe.run_dir
    ours = [".student.k3j_x9q2.tmp", ".teacher_cache.abcdefgh.tmp", ".tas_clusters.0a1b2c3d.tmp",
            ".student.old-4242", "checkpoints/.step-00000002.tmp", "pgkd/.train-cycle0.jsonl.zz99zz99.tmp"]
    theirs = ["notes.tmp", ".hidden", "my.student.tmp", ".student.short.tmp", "data/deep/.x.abcdefgh.tmp"]
    for name in ours[:5] + theirs[4:]:
        (run / name).mkdir(parents=True)
        (run / name / "weights.bin").write_bytes(b"half")
    for name in ours[5:] + theirs[:4]:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("half")
    run_recipe(recipe)
    assert not [name for name in ours if (run / name).exists()]
    assert [name for name in theirs if (run / name).exists()] == theirs  # not ours, or too deep


def test_resume_at_the_final_step_adds_no_rows_and_keep_last_holds_on_every_start(digits_recipe):
    raw = _short(digits_recipe, max_steps=4, save_every=1, keep_last=3)
    raw["eval"] = {**raw["eval"], "every": 2}
    recipe = validate_recipe(raw)
    run_recipe(recipe)
    log = (recipe.run_dir / "metrics.jsonl").read_text()
    assert [s for s, _ in ckpt.list_checkpoints(recipe.run_dir / "checkpoints")] == [2, 3, 4]
    # trainer.keep_last may change on resume; the lower value applies from this start on
    again = validate_recipe(_short(raw, keep_last=1))
    summary = run_recipe(again, resume=True)
    assert summary["steps"] == 4
    assert (recipe.run_dir / "metrics.jsonl").read_text() == log
    rows = [json.loads(line) for line in log.splitlines()]
    assert [r["step"] for r in rows if any(k.startswith("eval/") for k in r)] == [2, 4]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [s for s, _ in ckpt.list_checkpoints(recipe.run_dir / "checkpoints")] == [4]


def test_two_builds_of_a_cache_have_the_same_bytes(tmp_path):
    from test_teacher_cache import _records, _write

    a, b = _write(tmp_path / "a", _records()), _write(tmp_path / "b", _records())
    names = sorted(p.name for p in a.iterdir())
    assert len(names) >= 4 and names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_safetensors_metadata_is_written_sorted():
    from safetensors.numpy import load

    from potstill.teachers.cache_writer import safetensors_bytes

    tensors = {"b": np.arange(3, dtype=np.int64), "a": np.ones(2, dtype=np.float16)}
    metadata = {key: str(i) for i, key in enumerate("zyxwvuts")}
    data = safetensors_bytes(tensors, metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    assert list(header["__metadata__"]) == sorted(metadata) and header["__metadata__"] == metadata
    assert size % 8 == 0
    loaded = load(data)
    assert loaded["b"].tolist() == [0, 1, 2] and loaded["a"].tolist() == [1.0, 1.0]


def test_atomic_dir_gives_weight_files_the_umask_mode_and_fsyncs_them_before_the_rename(tmp_path, umask_022,
                                                                                        monkeypatch):
    settled = []
    real = io.settle_file
    monkeypatch.setattr(io, "settle_file", lambda path, **kw: settled.append(str(path)) or real(path, **kw))
    target = tmp_path / "student"
    with io.atomic_dir(target) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")
    assert oct((target / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert sorted(os.path.basename(p) for p in settled) == ["config.json", "model.safetensors"]
    assert all(".student." in p and p.endswith(".tmp/model.safetensors") or p.endswith("config.json")
               for p in settled)  # settled in the temp folder, i.e. before the rename
    os.umask(0o027)
    with io.atomic_dir(target) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
    assert oct((target / "model.safetensors").stat().st_mode & 0o777) == oct(0o640)


def test_a_run_writes_readable_weights_and_fsyncs_the_checkpoint_before_its_rename(digits_recipe, umask_022,
                                                                                  monkeypatch):
    settled = []
    real = io.settle_file
    monkeypatch.setattr(io, "settle_file", lambda path, **kw: settled.append(str(path)) or real(path, **kw))
    recipe = validate_recipe(_short(digits_recipe, max_steps=2, save_every=1))
    run_recipe(recipe)
    for path in [recipe.run_dir / "student" / "model.safetensors",
                 recipe.run_dir / "checkpoints" / "step-00000002" / "student.safetensors"]:
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path
    in_tmp = [p for p in settled if "/.step-00000001.tmp/" in p]
    assert sorted(os.path.basename(p) for p in in_tmp) == sorted(
        p.name for p in (recipe.run_dir / "checkpoints" / "step-00000001").iterdir())
    assert any(p.endswith("/.step-00000001.tmp/student.safetensors") for p in in_tmp)


def test_server_logs_a_client_that_hangs_up_mid_body_without_a_traceback(tmp_path, caplog):
    from test_causal_lm import llama, make_tokenizer
    from test_serve import read_log, serving

    tok = make_tokenizer()
    model = llama(len(tok), layers=1, init=0.3).eval()
    log = tmp_path / "requests.jsonl"
    with caplog.at_level("INFO"), serving(model, tok, request_log=log) as (server, _):
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"prompt\": \"the")
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while not read_log(log) and time.monotonic() < deadline:
            time.sleep(0.02)
    records = read_log(log)
    assert [(r["path"], r["status"], r["body_sha256"]) for r in records] == [("/v1/completions", 499, None)]
    messages = [r.getMessage() for r in caplog.records]
    assert any("client disconnected before sending the whole body" in m for m in messages), messages
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]
