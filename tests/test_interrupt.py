"""Ctrl-C during `potstill run`: the step in flight finishes, a checkpoint is written, --resume ends identical."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch
from conftest import POTSTILL, REPO, write_yaml
from safetensors.torch import load_file

from potstill.train import checkpoint as ckpt
from potstill.train.interrupt import StopRequest


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "model.safetensors"))


def _logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count('"loss"') if metrics.exists() else 0


def test_sigint_writes_a_checkpoint_and_resume_matches_an_uninterrupted_run(digits_recipe, tmp_path):
    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 400, "save_every": 0,
                                       "log_every": 1})
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    ref = write_yaml(tmp_path / "ref.yaml", dict(raw, name="ref"))
    victim = write_yaml(tmp_path / "victim.yaml", dict(raw, name="victim"))
    assert subprocess.run(POTSTILL + ["run", str(ref)], env=env, cwd=REPO, capture_output=True).returncode == 0
    runs = Path(raw["output_dir"])

    proc = subprocess.Popen(POTSTILL + ["run", str(victim)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and _logged_steps(runs / "victim") < 5:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    steps = [s for s, _ in ckpt.list_checkpoints(runs / "victim" / "checkpoints")]
    assert len(steps) == 1 and 5 <= steps[0] < 400  # save_every: 0 writes none before the end: this is Ctrl-C's

    resumed = subprocess.run(POTSTILL + ["run", str(victim), "--resume"], env=env, cwd=REPO, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {steps[0]} of 400" in resumed.stdout + resumed.stderr
    wa, wb = _weights(runs / "ref"), _weights(runs / "victim")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_stop_request_sets_a_flag_first_and_interrupts_on_the_second_signal():
    previous = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            raise AssertionError("the second SIGINT did not interrupt")
        except KeyboardInterrupt:
            pass
    assert signal.getsignal(signal.SIGINT) is previous
