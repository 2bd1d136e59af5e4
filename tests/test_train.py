"""The Distiller loop: accumulation equivalence, kill-and-resume, NaN guard, schedules, outputs."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import POTSTILL, REPO, write_yaml
from safetensors.torch import load_file

from potstill.config import validate_recipe
from potstill.tasks import build_task
from potstill.train import Distiller, TrainingDiverged, build_objectives, run_recipe
from potstill.train import checkpoint as ckpt
from potstill.train.distiller import lr_lambda


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "model.safetensors"))


def test_accumulation_equivalence(digits_recipe):
    """Batch 8 × accumulation 1 and batch 4 × accumulation 2 make the same updates."""
    a = dict(digits_recipe, name="a", trainer={**digits_recipe["trainer"], "batch_size": 8, "grad_accum": 1})
    b = dict(digits_recipe, name="b", trainer={**digits_recipe["trainer"], "batch_size": 4, "grad_accum": 2})
    # a hard-label term too: both objectives and the CE go through the same normalisation
    for raw in (a, b):
        raw["trainer"]["hard_label_weight"] = 0.5
    ra, rb = validate_recipe(a), validate_recipe(b)
    run_recipe(ra)
    run_recipe(rb)
    wa, wb = _weights(ra.run_dir), _weights(rb.run_dir)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    # and training moved the weights at all (the test would be vacuous otherwise)
    c = validate_recipe(dict(a, name="c", trainer={**a["trainer"], "max_steps": 1}))
    run_recipe(c)
    assert not torch.allclose(_weights(c.run_dir)["0.weight"], wa["0.weight"])


def test_outputs_and_metrics(digits_recipe):
    raw = dict(digits_recipe, eval={"compare_before": True, "throughput": True, "every": 5})
    recipe = validate_recipe(raw)
    summary = run_recipe(recipe)
    run = recipe.run_dir
    for name in ("summary.json", "metrics.jsonl", "report.html", "loss_curve.png", "recipe.yaml"):
        assert (run / name).is_file(), name
    assert [row["model"] for row in summary["table"]] == ["teacher", "student (before)", "student (after)"]
    after = summary["table"][-1]
    assert {"accuracy", "macro_f1", "agreement", "params", "samples_per_s"} <= after.keys()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [x["step"] for x in lines if "loss" in x]
    assert train_steps == list(range(1, 11))
    assert any("eval/accuracy" in x and x["step"] == 5 for x in lines)
    assert lines[0]["step"] == 0 and "eval/accuracy" in lines[0]  # the untrained student
    assert all(math.isfinite(x["loss"]) and "obj/forward_kl" in x and "lr" in x for x in lines if "loss" in x)
    # one checkpoint at the end, loadable
    found = ckpt.list_checkpoints(run / "checkpoints")
    assert [s for s, _ in found] == [10]


def test_keep_last_checkpoints(digits_recipe):
    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 12, "save_every": 2,
                                       "keep_last": 3})
    recipe = validate_recipe(raw)
    run_recipe(recipe)
    steps = [s for s, _ in ckpt.list_checkpoints(recipe.run_dir / "checkpoints")]
    assert steps == [8, 10, 12]
    assert not [p for p in (recipe.run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_user_callbacks_see_every_step_and_the_evaluations(digits_recipe):
    from potstill.train.callbacks import Callback

    class Recorder(Callback):
        def __init__(self):
            self.steps, self.losses, self.evaluated, self.ended = [], [], [], False

        def on_step_end(self, state, result):
            self.steps.append(result.step)
            self.losses.append(result.loss)

        def on_evaluate(self, state, step, metrics):
            self.evaluated.append((step, "accuracy" in metrics))

        def on_fit_end(self, state, summary):
            self.ended = summary["steps"] == state.total

    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 6},
               eval={**digits_recipe.get("eval", {}), "every": 3})
    recipe = validate_recipe(raw)
    recorder = Recorder()
    task = build_task(recipe, run_dir=recipe.run_dir)
    Distiller(task, build_objectives(recipe), recipe.trainer, run_dir=recipe.run_dir, eval_config=recipe.eval,
              callbacks=[recorder]).fit()
    assert recorder.steps == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(x) for x in recorder.losses) and recorder.losses[0] != recorder.losses[-1]
    assert recorder.evaluated == [(3, True), (6, True)]
    assert recorder.ended


class _Interrupt(Exception):
    pass


def _distiller_with_teacher_hook(recipe, hook):
    """A Distiller whose teacher signal at micro-batch n (1-based) goes through `hook(n, signal_fn, batch)`."""
    task = build_task(recipe, run_dir=recipe.run_dir)
    original, calls = task.teacher_signal, {"n": 0}

    def hooked(batch):
        calls["n"] += 1
        return hook(calls["n"], original, batch)

    task.teacher_signal = hooked
    return Distiller(task, build_objectives(recipe), recipe.trainer, run_dir=recipe.run_dir,
                     eval_config=recipe.eval)


def test_resume_in_process_matches_uninterrupted(digits_recipe):
    """Interrupt at step 8 (checkpoint at 6), resume: same weights and log as 12 straight steps."""
    base = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 12, "save_every": 3})
    straight = validate_recipe(dict(base, name="straight"))
    run_recipe(straight)

    halted = validate_recipe(dict(base, name="halted"))

    def interrupt_at_8(n, signal, batch):
        if n == 8:
            raise _Interrupt
        return signal(batch)

    distiller = _distiller_with_teacher_hook(halted, interrupt_at_8)
    with pytest.raises(_Interrupt):
        distiller.fit()
    assert [s for s, _ in ckpt.list_checkpoints(halted.run_dir / "checkpoints")] == [3, 6]
    run_recipe(halted, resume=True)
    wa, wb = _weights(straight.run_dir), _weights(halted.run_dir)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    log_a = [json.loads(x) for x in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (halted.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["loss"]) for x in log_a if "loss" in x] == [(x["step"], x["loss"]) for x in log_b
                                                                        if "loss" in x]


def _run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    return subprocess.run(POTSTILL + args, capture_output=True, text=True, env=env, cwd=REPO, **kw)


def test_sigkill_and_resume_gives_identical_weights(digits_recipe, tmp_path):
    """Kill a real training process with SIGKILL at random moments; resuming ends with identical weights."""
    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 400, "save_every": 25,
                                       "keep_last": 2, "log_every": 5})
    ref = write_yaml(tmp_path / "ref.yaml", dict(raw, name="ref"))
    victim = write_yaml(tmp_path / "victim.yaml", dict(raw, name="victim"))
    done = _run_cli(["run", str(ref)])
    assert done.returncode == 0, done.stderr
    runs = Path(raw["output_dir"])

    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO / "src"))
    rng = random.Random(0)
    kills = 0
    for attempt in range(3):
        args = POTSTILL + ["run", str(victim)] + (["--resume"] if attempt else [])
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
        # wait until this attempt has written a new checkpoint, then kill at a random moment
        start_steps = {s for s, _ in ckpt.list_checkpoints(runs / "victim" / "checkpoints")}
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            steps = {s for s, _ in ckpt.list_checkpoints(runs / "victim" / "checkpoints")}
            if steps - start_steps:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    finished = _run_cli(["run", str(victim), "--resume"])
    assert finished.returncode == 0, finished.stderr
    wa, wb = _weights(runs / "ref"), _weights(runs / "victim")
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    ref_log = [json.loads(x) for x in (runs / "ref" / "metrics.jsonl").read_text().splitlines()]
    victim_log = [json.loads(x) for x in (runs / "victim" / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in ref_log if "loss" in x] == [x["loss"] for x in victim_log if "loss" in x]


def test_nan_guard_names_step_and_objective(digits_recipe):
    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 12, "save_every": 5})
    recipe = validate_recipe(raw)
    distiller = _distiller_with_teacher_hook(
        recipe, lambda n, signal, batch: signal(batch) * float("nan") if n == 7 else signal(batch))
    with pytest.raises(TrainingDiverged, match=r"step 7 in objective 'forward_kl'") as info:
        distiller.fit()
    assert "step-00000005" in str(info.value)
    steps = [s for s, _ in ckpt.list_checkpoints(recipe.run_dir / "checkpoints")]
    assert steps == [5]
    state = load_file(str(recipe.run_dir / "checkpoints" / "step-00000005" / "student.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_nan_guard_cli_exit_code(digits_recipe, tmp_path):
    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "lr": 1e30, "max_grad_norm": None,
                                       "max_steps": 30})
    path = write_yaml(tmp_path / "r.yaml", raw)
    out = _run_cli(["run", str(path)])
    assert out.returncode == 3, out.stderr
    assert "training diverged" in out.stderr and "Traceback" not in out.stderr


def test_lr_schedules():
    cos = lr_lambda("cosine", warmup=2, total=10)
    assert cos(0) == pytest.approx(1 / 3) and cos(1) == pytest.approx(2 / 3)
    assert cos(2) == pytest.approx(1.0) and cos(10) == pytest.approx(0.0, abs=1e-12)
    lin = lr_lambda("linear", warmup=0, total=4)
    assert [lin(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert lr_lambda("constant", warmup=0, total=4)(3) == 1.0


def test_too_little_data_is_a_user_error(digits_recipe):
    from potstill.errors import UserError

    raw = dict(digits_recipe, data={**digits_recipe["data"], "train": {"path": "builtin:digits", "split": "train",
                                                                       "limit": 4}})
    with pytest.raises(UserError, match="fewer than trainer.batch_size"):
        run_recipe(validate_recipe(raw))


def test_existing_run_needs_resume_or_overwrite(digits_recipe):
    from potstill.errors import UserError

    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 4, "save_every": 2})
    recipe = validate_recipe(raw)
    run_recipe(recipe)
    with pytest.raises(UserError, match="already holds checkpoints up to step 4.*--resume.*--overwrite"):
        run_recipe(recipe)
    summary = run_recipe(recipe, overwrite=True)
    assert summary["steps"] == 4


def test_resume_refuses_a_changed_recipe(digits_recipe):
    from potstill.errors import UserError

    raw = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 4, "save_every": 2})
    run_recipe(validate_recipe(raw))
    changed = validate_recipe(dict(raw, trainer={**raw["trainer"], "lr": 0.5}))
    with pytest.raises(UserError, match=r"recipe changed since the run started \(trainer.lr\)"):
        run_recipe(changed, resume=True)
    # logging / checkpoint cadence and evaluation settings may change
    harmless = validate_recipe(dict(raw, trainer={**raw["trainer"], "log_every": 3}, eval={"every": 2}))
    assert run_recipe(harmless, resume=True)["steps"] == 4


def test_lone_cpu_launch_size_reads_accelerate_command_line():
    from potstill.train.launch import lone_cpu_launch_size, processes_requested

    launch = ["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m", "potstill"]
    assert processes_requested(launch) == 2
    assert processes_requested(["accelerate", "launch", "--num_processes=3", "--cpu", "x.py"]) == 3
    assert processes_requested(["python", "train.py", "--num_processes", "2"]) == 1  # not an accelerate launch
    assert processes_requested(["accelerate", "launch", "--cpu", "x.py"]) == 1
    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}
    assert lone_cpu_launch_size(env, launch) == 2
    assert lone_cpu_launch_size(dict(env, WORLD_SIZE="2"), launch) == 1  # already a process group
    assert lone_cpu_launch_size(dict(env, ACCELERATE_USE_CPU="False"), launch) == 1
    assert lone_cpu_launch_size({"ACCELERATE_USE_CPU": "True"}, launch) == 1  # not asked for several processes


def test_taid_state_advances_per_optimizer_step_and_resumes_exactly(digits_recipe):
    """TAID's t moves once per optimizer step (not per micro-batch), is logged, checkpointed and resumed."""
    taid = [{"name": "taid", "params": {"t_start": 0.4, "temperature": 2.0}}]
    base = dict(digits_recipe, objectives=taid,
                trainer={**digits_recipe["trainer"], "max_steps": 10, "save_every": 5, "grad_accum": 2,
                         "log_every": 1})
    straight = validate_recipe(dict(base, name="taid_straight"))
    run_recipe(straight)
    log = [json.loads(x) for x in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    ts = [x["state/taid.t"] for x in log if "state/taid.t" in x]
    assert len(ts) == 10 and ts[0] == 0.4  # the first step only records the loss
    assert all(b >= a for a, b in zip(ts, ts[1:], strict=False)) and ts[-1] == pytest.approx(1.0)
    saved = ckpt.load_torch(straight.run_dir / "checkpoints" / "step-00000005" / "objectives.pt")
    assert float(saved["taid"]["t"]) == ts[4]

    halted = validate_recipe(dict(base, name="taid_halted"))

    def interrupt_at_14(n, signal, batch):  # micro-batch 14 = optimizer step 7
        if n == 14:
            raise _Interrupt
        return signal(batch)

    with pytest.raises(_Interrupt):
        _distiller_with_teacher_hook(halted, interrupt_at_14).fit()
    run_recipe(halted, resume=True)
    wa, wb = _weights(straight.run_dir), _weights(halted.run_dir)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_bad_stateful_objective_params_are_user_errors(digits_recipe):
    from potstill.errors import UserError

    for params, match in (({"t_strat": 0.1}, 'did you mean "t_start"'), ({"t_start": 2.0}, "t_start")):
        with pytest.raises(UserError, match=match):  # refused when the recipe loads, before build_objectives
            build_objectives(validate_recipe(dict(digits_recipe, objectives=[{"name": "taid", "params": params}])))


def test_fp16_run_checkpoints_its_loss_scale_and_resumes_to_the_same_weights(digits_recipe):
    """fp16 autocast with a GradScaler (on CPU here): the scaler's state is part of the checkpoint."""
    base = dict(digits_recipe, trainer={**digits_recipe["trainer"], "max_steps": 6, "save_every": 3,
                                        "mixed_precision": "fp16"})
    straight = validate_recipe(dict(base, name="fp16-straight"))
    run_recipe(straight)
    scaler_state = ckpt.load_torch(ckpt.step_dir(straight.run_dir / "checkpoints", 6) / ckpt.GRAD_SCALER_FILE)
    assert scaler_state["scale"] > 0 and "_growth_tracker" in scaler_state

    halted = validate_recipe(dict(base, name="fp16-halted"))

    def interrupt_at_5(n, signal, batch):
        if n == 5:
            raise _Interrupt
        return signal(batch)

    with pytest.raises(_Interrupt):
        _distiller_with_teacher_hook(halted, interrupt_at_5).fit()
    assert (ckpt.step_dir(halted.run_dir / "checkpoints", 3) / ckpt.GRAD_SCALER_FILE).exists()
    run_recipe(halted, resume=True)
    wa, wb = _weights(straight.run_dir), _weights(halted.run_dir)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
