"""The Distiller loop: teacher signals → student forward → Σ wᵢ·objectiveᵢ → optimizer step.

One loop for every method: a method is an objective (a loss function, or a small stateful `nn.Module`),
the task adapter supplies the signals. Built on Accelerate, so the same code runs on one CPU, one GPU, or
`accelerate launch --num_processes N` (DDP).

Contracts:
- Loss normalisation: each objective is evaluated with `reduction="sum"` and the total is divided by the
  number of counted rows of the whole optimizer step, over all micro-batches and all processes. Batch 8 ×
  accumulation 1 and batch 4 × accumulation 2 (or 2 processes × batch 4) give the same update.
- Data order: epoch e visits the records in a permutation drawn from `seed` and e (with
  `trainer.group_by_length`, rearranged by `length_grouped_order` so that a global micro-batch holds records
  of similar length); optimizer step t uses global micro-batches t·A … t·A + A − 1 of that stream, each split
  evenly across processes. The position is derived from the step, so a resumed run sees exactly the batches
  it would have seen.
- The teacher runs only when some objective reads its signal (hard-label-only runs skip it).
- Checkpoints hold the student, optimizer, scheduler, objective state and every process's RNG state; a run
  killed at any moment and resumed ends with the weights of an uninterrupted run (CPU, same seed).
- A non-finite loss stops the run before the optimizer step, naming the step and the objective; no
  checkpoint is written after it.
- Stateful objectives (e.g. TAID) get `on_optimizer_step(loss, step, total_steps)` once per optimizer step,
  with their own loss averaged over the step's counted rows on all processes (the same value everywhere).
- When evaluation reports a teacher–student divergence (`kl_to_teacher`), the teacher-hacking monitor
  watches it (and the student's NLL on references, `nll`) and logs warnings; its state is checkpointed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.config import EvalConfig, TrainerConfig
from potstill.data.samplers import length_grouped_order
from potstill.errors import UserError
from potstill.io import atomic_write_json, atomic_write_text
from potstill.losses.fused import FUSED_DIVERGENCES, LMHeadInputs, fused_linear_divergence
from potstill.losses.sparse import TopKTeacher, sparse_version
from potstill.signals import Signals
from potstill.tasks.base import Task
from potstill.train import checkpoint as ckpt


class _Parameters(nn.Module):
    """A bag of parameters (objective projections), so that `param_groups` can split them like a model's."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the objective."""


@dataclass
class Objective:
    """One weighted term of the loss: `weight · fn(student_signal, teacher_signal, mask=…, reduction="sum", **params)`.

    `fn` is a pure loss function, or an `nn.Module` whose `state_dict` is checkpointed with the run.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        """What the loop divides this objective's sum by: "rows" (the task's counted rows: samples, sentences
        or target tokens) or "tokens" (real input tokens, for objectives on internals)."""
        return getattr(self.fn, "unit", "rows")

    def __call__(self, student: Any, teacher: Any, mask: torch.Tensor | None) -> torch.Tensor:
        """The objective's sum over the counted rows. A cached top-k teacher (`TopKTeacher`) switches a
        divergence to its sparse form over the teacher's top-k ids plus one tail bucket; a student given as
        its lm_head inputs (`LMHeadInputs`, `trainer.fused_lm_head`) to the fused form, which never builds
        the student's full logits."""
        signal = getattr(self.fn, "signal", None)
        if signal is not None:  # an objective on internals (hidden states, q/k/v): token rows
            return self.fn(getattr(student, signal), getattr(teacher, signal), mask=student.token_mask,
                           reduction="sum")
        if isinstance(student, Signals):
            student = student.main
        if isinstance(teacher, Signals):
            teacher = teacher.main
        kwargs = dict(self.params)
        if mask is not None:
            kwargs["mask"] = mask
        if isinstance(student, LMHeadInputs):
            if self.name not in FUSED_DIVERGENCES:
                raise UserError(f"objective {self.name!r} has no fused form; trainer.fused_lm_head works with "
                                f"{', '.join(FUSED_DIVERGENCES)}")
            if kwargs.get("chunk_size") is None:
                kwargs.pop("chunk_size", None)
            return fused_linear_divergence(student.hidden, student.weight, teacher, divergence=self.name,
                                           lm_head_bias=student.bias, vocab_size=student.vocab_size,
                                           reduction="sum", **kwargs)
        fn = self.fn
        if isinstance(teacher, TopKTeacher):
            fn = sparse_version(self.name)
            if fn is None:
                raise UserError(f"objective {self.name!r} needs the teacher's full logits; a cached top-k "
                                f"teacher feeds only forward_kl, reverse_kl, soft_cross_entropy, "
                                f"generalized_jsd, skew_kl, skew_reverse_kl and tvd")
        return fn(student, teacher, reduction="sum", **kwargs)

    @classmethod
    def from_name(cls, name: str, weight: float = 1.0, **params: Any) -> Objective:
        from potstill.losses import get_objective

        return cls(name=name, fn=get_objective(name).fn, weight=weight, params=params)


def _multi_process_without_accelerator() -> bool:
    """Launched as several processes (torchrun / `accelerate launch --multi_gpu`) on a machine with no GPU:
    Accelerate then needs `cpu=True` to form a gloo process group instead of running N lone copies."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    has_accelerator = getattr(torch, "accelerator", None)
    return not (has_accelerator.is_available() if has_accelerator else torch.cuda.is_available())


def _new_accelerator(mixed_precision: str) -> Any:
    """An Accelerator for this run. Accelerate keeps one global state per process; a single-process Python
    session that runs several recipes with different precisions gets a fresh state for each."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=_multi_process_without_accelerator())


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate after `step` optimizer steps: linear warm-up, then decay to 0."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and norm weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Distiller:
    """Train `task.student` to match `task.teacher` with weighted `objectives`.

    >>> distiller = Distiller(task, [Objective.from_name("forward_kl", temperature=4.0)], TrainerConfig(),
    ...                       run_dir="runs/x", seed=0)
    >>> summary = distiller.fit()
    """

    def __init__(self, task: Task, objectives: list[Objective], trainer: TrainerConfig, *, run_dir: str | Path,
                 seed: int = 0, eval_config: EvalConfig | None = None, recipe_text: str | None = None,
                 accelerator: Any = None) -> None:
        self.task, self.objectives, self.cfg = task, objectives, trainer
        self.eval_cfg = eval_config or EvalConfig()
        self.run_dir, self.seed, self.recipe_text = Path(run_dir), seed, recipe_text
        self.ckpt_root = self.run_dir / "checkpoints"
        self.accelerator = accelerator or _new_accelerator(trainer.mixed_precision)
        self.task.device = self.accelerator.device
        from potstill.eval.teacher_hacking import TeacherHackingMonitor

        self.monitor = TeacherHackingMonitor()
        self._lengths: list[int] | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _print(self, message: str) -> None:
        if self.is_main:
            from potstill.ui import console

            console.print(message)

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum").cpu()

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """Record indices of `epoch` in visiting order: the task's own (`Task.epoch_order`, e.g. TAS-Balanced
        batches), else a seeded shuffle, length-grouped when `trainer.group_by_length`."""
        n, global_batch = len(self.task.train_records), self.cfg.batch_size * self.accelerator.num_processes
        order = self.task.epoch_order(epoch, global_batch)
        if order is not None:
            return torch.as_tensor(order, dtype=torch.long)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=gen)
        if self._lengths is not None:
            perm = length_grouped_order(perm, self._lengths, global_batch, generator=gen)
        return perm

    def _micro_batch_indices(self, global_mb: int) -> list[int]:
        """Record indices of this process's share of global micro-batch number `global_mb`."""
        bs, world = self.cfg.batch_size, self.accelerator.num_processes
        per_epoch = self._epoch_rows // (bs * world)
        epoch, pos = divmod(global_mb, per_epoch)
        if getattr(self, "_perm_epoch", None) != epoch:
            self._perm, self._perm_epoch = self._epoch_order(epoch), epoch
        start = pos * bs * world + self.accelerator.process_index * bs
        return self._perm[start:start + bs].tolist()

    def _epochs(self, step: int) -> float:
        """Passes over the training records after `step` optimizer steps (how often each was seen; with a
        task's own epoch order, passes over that order)."""
        seen = step * self.cfg.grad_accum * self.cfg.batch_size * self.accelerator.num_processes
        return seen / max(1, self._epoch_rows)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def _truncate_metrics(self, step: int) -> None:
        """On resume, forget log lines written after the checkpoint (they will be written again)."""
        path = self.run_dir / "metrics.jsonl"
        if not self.is_main or not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(path, "".join(x + "\n" for x in keep))

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, step: int, student: nn.Module, optimizer, scheduler) -> None:
        acc = self.accelerator
        tmp = ckpt.tmp_dir(self.ckpt_root, step)
        if self.is_main:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        ckpt.save_torch(ckpt.rng_state(), tmp / f"rng-rank{acc.process_index}.pt")
        state_dict = acc.get_state_dict(student)
        if self.is_main:
            from safetensors.torch import save_file

            from potstill.students.save import safetensors_state

            save_file(safetensors_state(state_dict), str(tmp / "student.safetensors"))
            ckpt.save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
            ckpt.save_torch(scheduler.state_dict(), tmp / "scheduler.pt")
            ckpt.save_torch({o.name: o.fn.state_dict() for o in self.objectives if isinstance(o.fn, nn.Module)},
                            tmp / "objectives.pt")
            atomic_write_json(tmp / "monitor.json", self.monitor.state_dict())
            ckpt.write_state(tmp, {"step": step, "micro_batches": step * self.cfg.grad_accum,
                                   "world_size": acc.num_processes, "seed": self.seed})
        acc.wait_for_everyone()
        if self.is_main:
            final = ckpt.step_dir(self.ckpt_root, step)
            if final.exists():
                import shutil

                shutil.rmtree(final)
            os.replace(tmp, final)
            ckpt.prune(self.ckpt_root, self.cfg.keep_last)
        acc.wait_for_everyone()

    def _load_checkpoint(self, path: Path, student: nn.Module, optimizer, scheduler) -> int:
        from safetensors.torch import load_file

        acc = self.accelerator
        state = ckpt.read_state(path)
        if state["world_size"] != acc.num_processes:
            raise UserError(f"{path}: written by {state['world_size']} process(es), resumed with "
                            f"{acc.num_processes}; resume with the same number of processes")
        acc.unwrap_model(student).load_state_dict(load_file(str(path / "student.safetensors")))
        optimizer.load_state_dict(ckpt.load_torch(path / "optimizer.pt"))
        scheduler.load_state_dict(ckpt.load_torch(path / "scheduler.pt"))
        objective_states = ckpt.load_torch(path / "objectives.pt")
        for o in self.objectives:
            if isinstance(o.fn, nn.Module) and o.name in objective_states:
                o.fn.load_state_dict(objective_states[o.name])
        if (path / "monitor.json").exists():
            self.monitor.load_state_dict(json.loads((path / "monitor.json").read_text()))
        ckpt.set_rng_state(ckpt.load_torch(path / f"rng-rank{acc.process_index}.pt"))
        return int(state["step"])

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, model: nn.Module, role: str) -> dict[str, float]:
        """Main process scores `model`; the others wait."""
        metrics: dict[str, float] = {}
        if self.is_main:
            metrics = self.task.evaluate(model, role=role)
        self.accelerator.wait_for_everyone()
        return metrics

    def _watch_teacher_hacking(self, step: int, metrics: dict[str, float], epochs: float) -> None:
        """Feed one evaluation of the student to the teacher-hacking monitor; log its warnings."""
        if not self.is_main or "kl_to_teacher" not in metrics:
            return
        golden = metrics.get("nll")
        for message in self.monitor.update(step, metrics["kl_to_teacher"], golden, epochs_seen=epochs):
            self._print(f"[yellow]warning:[/] {message}")
            self._append_metrics({"step": step, "warning": message})

    def _cached_eval(self, name: str, model: nn.Module, role: str) -> dict[str, float]:
        """Score the teacher / the untrained student once per run (kept across resumes). The untrained
        student's scores also go into metrics.jsonl as step 0, so curves start from them."""
        path = self.run_dir / f"eval_{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        metrics = self._evaluate(model, role)
        if self.is_main:
            atomic_write_json(path, metrics)
            if name == "before" and metrics:
                self._append_metrics({"step": 0, **{f"eval/{k}": v for k, v in metrics.items()}})
        return metrics

    # ------------------------------------------------------------------ objectives on internals
    def _bind_objectives(self) -> None:
        """Bind objectives on internals to the two models' shapes (layer pairs, projections), move stateful
        objectives to the device, and tell the task which internals to capture for each model."""
        needs: dict[str, dict[str, Any]] = {}
        for o in self.objectives:
            if hasattr(o.fn, "bind"):
                try:
                    o.fn.bind(self.task.model_shape("student"), self.task.model_shape("teacher"))
                except ValueError as err:
                    raise UserError(f"objective {o.name!r}: {err}") from None
                for role, layers in o.fn.needs().items():
                    want = needs.setdefault(role, {"hidden": False, "hidden_layers": set(), "qkv": set()})
                    if o.fn.signal == "hidden_states":
                        want["hidden"] = True
                        want["hidden_layers"].update(layers)
                    else:
                        want["qkv"].update(layers)
            if isinstance(o.fn, nn.Module):
                o.fn.to(self.accelerator.device)
        self.task.internals = {role: {"hidden": w["hidden"], "hidden_layers": sorted(w["hidden_layers"]),
                                      "qkv": sorted(w["qkv"])} for role, w in needs.items()}

    def _objective_parameters(self) -> list[nn.Parameter]:
        return [p for o in self.objectives if isinstance(o.fn, nn.Module) for p in o.fn.parameters()
                if p.requires_grad]

    def _sync_objective_gradients(self, params: list[nn.Parameter]) -> None:
        """DDP averages the student's gradients; objective parameters (projections) get the same average."""
        if self.accelerator.num_processes == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    # ------------------------------------------------------------------ the loop
    def _check_run_dir(self, resume: bool, overwrite: bool) -> None:
        """Refuse to wipe an earlier run by accident, and to resume a run whose recipe has changed."""
        done = ckpt.list_checkpoints(self.ckpt_root)
        if not resume and not overwrite and (done or (self.run_dir / "summary.json").exists()):
            where = f"checkpoints up to step {done[-1][0]}" if done else "a finished run"
            raise UserError(f"{self.run_dir} already holds {where}; pass --resume to continue it, --overwrite "
                            f"to start over, or choose another run name (--set name=...)")
        stored = self.run_dir / "recipe.yaml"
        if resume and done and self.recipe_text is not None and stored.exists():
            import yaml

            old, new = yaml.safe_load(stored.read_text()), yaml.safe_load(self.recipe_text)
            harmless = {"eval", "output_dir", "name"}
            trainer_harmless = {"log_every", "save_every", "keep_last", "num_threads", "fused_lm_head"}
            changed = [k for k in sorted(set(old) | set(new)) if k not in harmless | {"trainer"}
                       and old.get(k) != new.get(k)]
            old_t, new_t = old.get("trainer", {}), new.get("trainer", {})
            changed += [f"trainer.{k}" for k in sorted(set(old_t) | set(new_t))
                        if k not in trainer_harmless and old_t.get(k) != new_t.get(k)]
            if changed:
                raise UserError(f"{stored}: the recipe changed since the run started ({', '.join(changed)}); "
                                f"resuming would not reproduce the run. Undo the change, or start a new run")

    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Train, evaluate, save. `resume` continues from the newest checkpoint of `run_dir`; without it an
        existing run in `run_dir` is an error unless `overwrite`."""
        from accelerate.utils import set_seed

        acc, cfg, task = self.accelerator, self.cfg, self.task
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        set_seed(self.seed)
        self._check_run_dir(resume, overwrite)
        acc.wait_for_everyone()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.recipe_text is not None:
                atomic_write_text(self.run_dir / "recipe.yaml", self.recipe_text)
            if not resume:
                for stale in ("metrics.jsonl", "summary.json", "eval_before.json", "eval_teacher.json",
                              "domain_weights.json"):
                    (self.run_dir / stale).unlink(missing_ok=True)
                if self.ckpt_root.exists():
                    import shutil

                    shutil.rmtree(self.ckpt_root)
            ckpt.remove_partial(self.ckpt_root)
        acc.wait_for_everyone()
        task.setup(is_main=self.is_main, barrier=acc.wait_for_everyone)
        student = task.student
        n, world = len(task.train_records), acc.num_processes
        order = task.epoch_order(0, cfg.batch_size * world)
        self._epoch_rows = n if order is None else len(order)
        per_epoch = self._epoch_rows // (cfg.batch_size * world)
        if per_epoch == 0:
            raise UserError(f"data.train has {n} records, fewer than trainer.batch_size × processes = "
                            f"{cfg.batch_size} × {world}")
        total = cfg.max_steps if cfg.max_steps is not None else max(1, int(cfg.epochs * per_epoch) // cfg.grad_accum)
        if cfg.group_by_length:
            self._lengths = task.record_lengths()
            if self._lengths is None:
                raise UserError(f"trainer.group_by_length: the {task.name} task's records have no token length "
                                f"to group by; turn it off")
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total)

        self._bind_objectives()
        teacher_metrics = self._cached_eval("teacher", task.teacher, "teacher")
        before = self._cached_eval("before", student, "student") if self.eval_cfg.compare_before else {}

        groups = param_groups(student, cfg.weight_decay)
        extra = self._objective_parameters()
        if extra:  # learned projections of intermediate objectives train with the student
            groups += param_groups(_Parameters(extra), cfg.weight_decay)
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, warmup, total))
        student, optimizer = acc.prepare(student, optimizer)

        start = 0
        latest = ckpt.latest_checkpoint(self.ckpt_root) if resume else None
        if latest is not None:
            start = self._load_checkpoint(latest, student, optimizer, scheduler)
            self._print(f"resumed from {latest} (step {start} of {total})")
        elif resume:
            self._print(f"no checkpoint in {self.ckpt_root}; starting from step 0")
        self._truncate_metrics(start)
        student.train()

        history = self._train_steps(student, optimizer, scheduler, start, total)

        if start < total or latest is None or ckpt.read_state(latest)["step"] != total:
            self._save_checkpoint(total, student, optimizer, scheduler)
        unwrapped = acc.unwrap_model(student)
        after = self._evaluate(unwrapped, "student")
        summary: dict[str, Any] = {}
        if self.is_main:
            task.save_student(unwrapped, self.run_dir / "student")
            sizes = task.measure(unwrapped) if self.eval_cfg.throughput else {}
            rows = [{"model": "teacher", **teacher_metrics, **sizes.get("teacher", {})}]
            if before:
                rows.append({"model": "student (before)", **before, **sizes.get("student", {})})
            rows.append({"model": "student (after)", **after, **sizes.get("student", {})})
            self._watch_teacher_hacking(total, after, self._epochs(total))
            summary = {"steps": total, "final_loss": history.get("loss"), "train_seconds": history.get("seconds"),
                       "table": rows, "student_dir": str(self.run_dir / "student"),
                       "world_size": world, "objectives": [o.name for o in self.objectives],
                       "warnings": [w["message"] for w in self.monitor.warnings]}
            self._append_metrics({"step": total, **{f"eval/{k}": v for k, v in after.items()}})
            atomic_write_json(self.run_dir / "summary.json", summary)
        acc.wait_for_everyone()
        return summary

    def _train_steps(self, student: nn.Module, optimizer, scheduler, start: int, total: int) -> dict[str, Any]:
        acc, cfg, task = self.accelerator, self.cfg, self.task
        from rich.progress import TextColumn

        from potstill.ui import console, make_progress

        names = [o.name for o in self.objectives] + (["hard_label"] if cfg.hard_label_weight else [])
        weights = torch.tensor([o.weight for o in self.objectives] + ([cfg.hard_label_weight]
                                                                      if cfg.hard_label_weight else []))
        units = [o.unit for o in self.objectives] + (["rows"] if cfg.hard_label_weight else [])
        by_tokens = torch.tensor([u == "tokens" for u in units])
        extra = self._objective_parameters()
        last: dict[str, Any] = {}
        progress = make_progress(TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}"))
        bar = progress.add_task("distilling", total=total, completed=start, loss="-", speed="")
        tick, rows_since, t_start = time.perf_counter(), 0, time.perf_counter()
        with progress if self.is_main else contextlib.nullcontext():
            for step in range(start, total):
                records = task.train_records
                batches = []
                for j in range(cfg.grad_accum):
                    micro_batch = step * cfg.grad_accum + j
                    idx = self._micro_batch_indices(micro_batch)
                    batch = task.to_device(task.collate([records[i] for i in idx], idx))
                    batches.append(task.prepare_batch(batch, acc.unwrap_model(student), micro_batch))
                local = torch.tensor([float(sum(task.count_rows(b) for b in batches)),
                                      float(sum(task.count_tokens(b) for b in batches)) if by_tokens.any() else 0.0])
                global_rows, global_tokens = (float(x) for x in self._reduce_sum(local))
                counts = torch.where(by_tokens, max(global_tokens, 1.0), max(global_rows, 1.0))
                scale = acc.num_processes / counts
                term_sums = torch.zeros(len(names))
                for j, batch in enumerate(batches):
                    sync = j == len(batches) - 1
                    with contextlib.nullcontext() if sync else acc.no_sync(student):
                        with acc.autocast():
                            teacher_signal = task.teacher_signal(batch) if self.objectives else None
                            student_signal = task.student_signal(student, batch)
                        mask = task.signal_mask(batch)
                        terms = [o(student_signal, teacher_signal, mask) for o in self.objectives]
                        if cfg.hard_label_weight:
                            main = student_signal.main if isinstance(student_signal, Signals) else student_signal
                            terms.append(task.hard_label_loss(main, batch))
                        stacked = torch.stack([t.float() for t in terms])
                        loss = (stacked * (weights * scale).to(stacked.device)).sum()
                        acc.backward(loss)
                    term_sums += stacked.detach().float().cpu()
                term_sums = self._reduce_sum(term_sums)
                if not torch.isfinite(term_sums).all():
                    bad = names[int((~torch.isfinite(term_sums)).nonzero()[0])]
                    good = ckpt.latest_checkpoint(self.ckpt_root)
                    raise TrainingDiverged(
                        f"loss is {term_sums[names.index(bad)].item()} at step {step + 1} in objective {bad!r}; "
                        f"no update was applied. Last good checkpoint: {good or 'none yet'}. Lower trainer.lr, "
                        f"check the data, or use trainer.max_grad_norm.")
                self._sync_objective_gradients(extra)
                grad_norm = None
                if cfg.max_grad_norm:
                    grad_norm = float(acc.clip_grad_norm_([*student.parameters(), *extra], cfg.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                done = step + 1
                rows_since += global_rows
                per_row = term_sums / counts
                for o, value in zip(self.objectives, per_row, strict=False):
                    if hasattr(o.fn, "on_optimizer_step"):
                        o.fn.on_optimizer_step(loss=float(value), step=done, total_steps=total)
                loss_value = float((per_row * weights).sum())
                if self.is_main:
                    elapsed = time.perf_counter() - tick
                    speed = rows_since / elapsed if elapsed > 0 else 0.0
                    progress.update(bar, advance=1, loss=f"{loss_value:.4g}", speed=f"{speed:,.0f} rows/s")
                if done % cfg.log_every == 0 or done == total:
                    elapsed = time.perf_counter() - tick
                    record = {"step": done, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                              "rows_per_s": rows_since / elapsed if elapsed > 0 else None,
                              "epoch": self._epochs(done)}
                    record.update({f"state/{o.name}.{k}": v for o in self.objectives
                                   for k, v in getattr(o.fn, "log_values", dict)().items()})
                    record.update({f"obj/{k}": float(v) for k, v in zip(names, per_row, strict=True)})
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    self._append_metrics(record)
                    if self.is_main and not console.is_terminal:
                        console.print(f"step {done}/{total} loss {loss_value:.4g}")
                    tick, rows_since = time.perf_counter(), 0
                last = {"loss": loss_value}
                if self.eval_cfg.every and done % self.eval_cfg.every == 0 and done < total:
                    metrics = self._evaluate(acc.unwrap_model(student), "student")
                    student.train()
                    self._append_metrics({"step": done, **{f"eval/{k}": v for k, v in metrics.items()}})
                    self._watch_teacher_hacking(done, metrics, self._epochs(done))
                if cfg.save_every and done % cfg.save_every == 0 and done < total:
                    self._save_checkpoint(done, student, optimizer, scheduler)
        last["seconds"] = time.perf_counter() - t_start
        return last
