"""The Distiller loop: teacher signals → student forward → Σ wᵢ·objectiveᵢ → optimizer step.

One loop for every method: a method is an objective (`potstill.train.objective`: a loss function, or a small
stateful `nn.Module`), the task adapter supplies the signals. Built on Accelerate, so the same code runs on one
CPU, one GPU, or `accelerate launch --num_processes N` (DDP, or FSDP2 sharding: `potstill.train.fsdp`). Progress,
metrics, periodic evaluation, the teacher-hacking monitor, early stopping (`potstill.train.early_stopping`) and
checkpoints are callbacks (`potstill.train.callbacks`). With `trainer.weight_average` the student's EMA / SWA
average (`potstill.train.weight_average`) replaces its weights, and with `trainer.wise_ft_alpha` the student is then
mixed with its init (`potstill.train.wise_ft`), both before the final evaluation and save.

Contracts:
- Loss normalisation: each objective is evaluated with `reduction="sum"` and the total is divided by the
  number of counted rows of the whole optimizer step, over all micro-batches and all processes. Batch 8 ×
  accumulation 1 and batch 4 × accumulation 2 (or 2 processes × batch 4) give the same update.
- Data order (`potstill.train.data_order`): optimizer step t uses global micro-batches t·A … t·A + A − 1 of
  the run's record stream, each split evenly across processes; the position is derived from the step, so a
  resumed run sees exactly the batches it would have seen. With `data.domains` the loop calls DDK's
  `on_block_end(step)` after every `data.domains.every` steps. `trainer.epochs` counts passes over the records.
- The teacher runs only when some objective reads its signal (hard-label-only runs skip it).
- Checkpoints hold the student, optimizer, scheduler, objective state, callback state and every process's RNG
  state; a run killed at any moment and resumed ends with the weights of an uninterrupted run (CPU, same seed).
- Ctrl-C (SIGINT) lets the step in flight finish, writes a checkpoint at it and raises KeyboardInterrupt
  (`potstill.train.interrupt`); `--resume` then continues as from any checkpoint.
- A non-finite loss stops the run before the optimizer step, naming the step and the objective; no
  checkpoint is written after it.
- Stateful objectives (`StatefulObjective`, e.g. TAID) get `on_optimizer_step(loss, step, total_steps)` once
  per optimizer step, with their own loss averaged over the step's counted rows on all processes.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from potstill.config import EvalConfig, TrainerConfig
from potstill.data.ddk import DomainBlocks
from potstill.errors import UserError
from potstill.io import atomic_write_json
from potstill.signals import Signals
from potstill.students.gradient_checkpointing import enable_gradient_checkpointing
from potstill.students.lora import save_adapter_and_merge, with_lora
from potstill.tasks.base import Task
from potstill.train import callbacks as cb
from potstill.train import checkpoint as ckpt
from potstill.train.data_order import domain_blocks, shuffled_order
from potstill.train.early_stopping import EarlyStopping
from potstill.train.fsdp import Sharding, check_fsdp_run, clip_grad_norm, fsdp_settings
from potstill.train.interrupt import StopRequest
from potstill.train.objective import Objective, bind_objectives, loss_terms, objective_parameters
from potstill.train.optim import ParameterBag, build_optimizer, lr_lambda, param_groups
from potstill.train.precision import Precision, new_accelerator
from potstill.train.run_folder import check_run_dir, prepare_run_dir, run_lock
from potstill.train.trackers import RunTrackers
from potstill.train.weight_average import WeightAverage
from potstill.train.wise_ft import WiSEFT
from potstill.ui import console, phase


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the objective."""


class Distiller:
    """Train `task.student` to match `task.teacher` with weighted `objectives`.

    >>> distiller = Distiller(task, [Objective.from_name("forward_kl", temperature=4.0)], TrainerConfig(),
    ...                       run_dir="runs/x", seed=0)
    >>> summary = distiller.fit()

    `callbacks` (`potstill.train.callbacks.Callback`) run after the built-in ones: progress, metrics.jsonl,
    periodic evaluation, the teacher-hacking watch and checkpointing.
    """

    def __init__(self, task: Task, objectives: list[Objective], trainer: TrainerConfig, *, run_dir: str | Path,
                 seed: int = 0, eval_config: EvalConfig | None = None, recipe_text: str | None = None,
                 accelerator: Any = None, callbacks: Sequence[cb.Callback] = ()) -> None:
        self.task, self.objectives, self.cfg = task, objectives, trainer
        self.eval_cfg = eval_config or EvalConfig.model_validate({})
        self.run_dir, self.seed, self.recipe_text = Path(run_dir), seed, recipe_text
        self.ckpt_root = self.run_dir / "checkpoints"
        self.accelerator = accelerator or new_accelerator(trainer.report_to, self.run_dir)
        self.precision = Precision(trainer.mixed_precision, self.accelerator.device)
        self.task.device = self.accelerator.device
        self.metrics = cb.MetricsLog(self.run_dir, self.is_main, trainer.log_every)
        self.trackers = RunTrackers(self.accelerator, trainer.report_to)
        self.metrics.listeners.append(self.trackers.log)
        self.monitor = cb.TeacherHackingWatch(self.metrics)
        self.clock = cb.WallClock(trainer.max_seconds)
        self.callbacks: list[cb.Callback] = [
            cb.ProgressBar(trainer.log_every), self.metrics, cb.PeriodicEval(self.eval_cfg.every, self._eval_step),
            self.monitor, cb.Checkpointing(trainer.save_every, self._save), self.clock, *callbacks]
        self.early = None if trainer.early_stopping is None else EarlyStopping(trainer.early_stopping,
                                                                               self.accelerator.unwrap_model)
        if self.early is not None:
            self.callbacks.insert(self.callbacks.index(self.monitor) + 1, self.early)
        self.averaging = None if trainer.weight_average is None else WeightAverage(trainer.weight_average,
                                                                                   self.accelerator.unwrap_model)
        if self.averaging is not None:  # before Checkpointing: a checkpoint at step s holds step s in the average
            self.callbacks.insert(self.callbacks.index(self.monitor) + 1, self.averaging)
        self._lengths: list[int] | None = None
        self._ddk: DomainBlocks | None = None
        self._perm_epoch: int | None = None
        self._epoch_rows = 0
        self.sharding: Sharding | None = None  # trainer.distributed: fsdp with several processes

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self.state, *args)

    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        acc = self.accelerator
        return tensor if acc.num_processes == 1 else acc.reduce(tensor.to(acc.device), reduction="sum").cpu()

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """Record indices of `epoch` (a DDK block with `data.domains`) in visiting order: DDK's, the task's own
        (`Task.epoch_order`), else a seeded shuffle, length-grouped when `trainer.group_by_length`."""
        if self._ddk is not None:
            return torch.as_tensor(self._ddk.order(epoch), dtype=torch.long)
        global_batch = self.cfg.batch_size * self.accelerator.num_processes
        order = self.task.epoch_order(epoch, global_batch)
        if order is not None:
            return torch.as_tensor(order, dtype=torch.long)
        return shuffled_order(len(self.task.train_records), seed=self.seed, epoch=epoch, global_batch=global_batch,
                              lengths=self._lengths)

    def _micro_batch_indices(self, global_mb: int) -> list[int]:
        """Record indices of this process's share of global micro-batch number `global_mb`."""
        bs, world = self.cfg.batch_size, self.accelerator.num_processes
        period = self._ddk.block_rows if self._ddk is not None else self._epoch_rows
        epoch, pos = divmod(global_mb, period // (bs * world))
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = self._epoch_order(epoch), epoch
        start = pos * bs * world + self.accelerator.process_index * bs
        return self._perm[start:start + bs].tolist()

    def _evaluate(self, model: nn.Module, role: str, *, announce: bool = True) -> dict[str, float]:
        """Main process scores `model` (saying so unless `announce` is off: evaluations during training show in
        the progress display); the others wait."""
        whole_teacher = self.sharding.whole_teacher(self.task) if self.sharding else contextlib.nullcontext()
        with phase(f"evaluating the {role}", enabled=self.is_main and announce), whole_teacher:
            metrics = self.task.evaluate(model, role=role) if self.is_main else {}
        self.accelerator.wait_for_everyone()
        return metrics

    def _plain_student(self, student: nn.Module) -> nn.Module:
        """The student as a plain module: unwrapped from DDP, or (sharded) gathered whole on the main process
        (collective; the other processes get the sharded module, which they do not evaluate or save)."""
        if self.sharding is None:
            return self.accelerator.unwrap_model(student)
        return self.sharding.whole_student(student) or student

    def _eval_step(self, step: int) -> None:
        metrics = self._evaluate(self._plain_student(self.state.student), "student", announce=False)
        self.state.student.train()
        self._emit("on_evaluate", step, metrics)

    def _cached_eval(self, name: str, model: nn.Module | None, role: str) -> dict[str, float]:
        """Score the teacher / the untrained student once per run (kept across resumes). The untrained
        student's scores also go into metrics.jsonl as step 0, so curves start from them."""
        path = self.run_dir / f"eval_{name}.json"
        if path.exists():
            return dict(json.loads(path.read_text()))
        metrics = self._evaluate(model, role)  # type: ignore[arg-type]  # a task may score "no teacher"
        if self.is_main:
            atomic_write_json(path, metrics)
            if name == "before" and metrics:
                self.metrics.append({"step": 0, **{f"eval/{k}": v for k, v in metrics.items()}})
        return metrics

    def _save(self, state: cb.FitState, step: int) -> None:
        ckpt.save_checkpoint(self.ckpt_root, step, accelerator=self.accelerator, student=state.student,
                             optimizer=state.optimizer, scheduler=state.scheduler, objectives=self.objectives,
                             callbacks=self.callbacks, seed=self.seed, grad_accum=self.cfg.grad_accum,
                             keep_last=self.cfg.keep_last, grad_scaler=self.precision.scaler,
                             sharded=self.sharding is not None)

    def _bind_objectives(self) -> None:
        bind_objectives(self.objectives, self.task, self.accelerator.device)

    def fit(self, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Train, evaluate, save. `resume` continues from the newest usable checkpoint of `run_dir`; without it an
        existing run in `run_dir` is an error unless `overwrite`. The run folder's lock is held throughout
        (`run_folder.run_lock`): a second run into the same folder is refused."""
        with run_lock(self.run_dir, self.accelerator):
            try:
                return self._fit(resume, overwrite)
            finally:
                self.trackers.close()

    def _warn(self, message: str) -> None:
        console.print(f"[yellow]warning:[/] {message}", soft_wrap=True, highlight=False)

    def _fit(self, resume: bool, overwrite: bool) -> dict[str, Any]:
        from accelerate.utils import set_seed

        acc, cfg, task = self.accelerator, self.cfg, self.task
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        set_seed(self.seed)
        fsdp = fsdp_settings(cfg.distributed, acc.num_processes)
        if fsdp is not None:
            check_fsdp_run(task.recipe)
        if fsdp is not None and self.averaging is not None:
            raise UserError("field trainer.weight_average: not supported with FSDP sharding (the main process "
                            "holds only a shard of the student to average); use trainer.distributed: ddp")
        check_run_dir(self.run_dir, self.recipe_text, resume=resume, overwrite=overwrite)
        acc.wait_for_everyone()
        if self.is_main:
            prepare_run_dir(self.run_dir, self.recipe_text, resume=resume)
        acc.wait_for_everyone()
        self.trackers.start(self.run_dir.name, yaml.safe_load(self.recipe_text) if self.recipe_text else
                            {"trainer": self.cfg.model_dump(mode="json")})
        with phase(f"setting up the {task.name} run: data, teacher and student", enabled=self.is_main):
            task.setup(is_main=self.is_main, barrier=acc.wait_for_everyone)
        lora = getattr(task.recipe.student, "lora", None)
        if lora is not None and task.student is not None:
            task.student = with_lora(task.student, lora)
        n, world = len(task.train_records), acc.num_processes
        self._ddk = domain_blocks(task, run_dir=self.run_dir, seed=self.seed, global_batch=cfg.batch_size * world,
                                  grad_accum=cfg.grad_accum, fresh=not resume)
        order = None if self._ddk is not None else task.epoch_order(0, cfg.batch_size * world)
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
        self._terms = loss_terms(self.objectives, cfg.hard_label_weight)
        teacher_metrics = self._cached_eval("teacher", task.teacher, "teacher")
        student = task.student
        assert student is not None, "Task.setup must load the student"
        before = self._cached_eval("before", student, "student") if self.eval_cfg.compare_before else {}

        wise = None if cfg.wise_ft_alpha is None or not self.is_main else WiSEFT(cfg.wise_ft_alpha, self.run_dir)
        if wise is not None:  # θ₀: stored by the run's start, read back by a resume
            if resume and ckpt.list_checkpoints(self.ckpt_root):
                wise.load()
            else:
                wise.capture(student, write=True)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(student)
        if fsdp is not None:  # after the evaluations above, which run whole models on the main process
            self.sharding = Sharding(fsdp, is_main=self.is_main, device=acc.device)
            student = self.sharding.shard(task)
        groups = param_groups(student, cfg.weight_decay)
        extra = objective_parameters(self.objectives)
        if extra:  # learned projections of intermediate objectives train with the student
            groups += param_groups(ParameterBag(extra), cfg.weight_decay)
        optimizer = build_optimizer(cfg.optimizer, [g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas,
                                    momentum=cfg.momentum)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, warmup, total))
        if self.sharding is None:
            student, optimizer = acc.prepare(student, optimizer)
        self.state = cb.FitState(self.run_dir, self.is_main, 0, total, cfg.grad_accum * cfg.batch_size * world,
                                 self._epoch_rows, student, optimizer, scheduler)

        resumed = None
        if resume:
            resumed = ckpt.resume_newest(self.ckpt_root, accelerator=acc, say=self._warn, student=student,
                                         optimizer=optimizer, scheduler=scheduler, objectives=self.objectives,
                                         callbacks=self.callbacks, grad_scaler=self.precision.scaler,
                                         sharded=self.sharding is not None)
            self.state.start = resumed or 0
        if self.is_main:
            ckpt.prune(self.ckpt_root, cfg.keep_last)  # also when trainer.keep_last was lowered for this start
            if resume:
                console.print(f"resumed from {ckpt.step_dir(self.ckpt_root, resumed)} (step {resumed} of {total})"
                              if resumed is not None else f"no checkpoint in {self.ckpt_root}; starting from step 0",
                              soft_wrap=True, highlight=False)
        student.train()
        t_start, last = time.perf_counter(), None
        self._emit("on_fit_start")
        stop = StopRequest()
        try:
            with stop:
                for step in range(self.state.start, total):
                    if self._stopped_early():  # a run resumed from the checkpoint where it stopped
                        break
                    last = self._step(step, extra)
                    if self._ddk is not None and last.step % self._ddk.every == 0 and last.step < total:
                        self._ddk.on_block_end(last.step)
                    self._emit("on_step_end", last)
                    if self._any_process(stop.requested):
                        self._save_on_interrupt(last.step, total)
                        raise KeyboardInterrupt
                    if self._out_of_time() or self._stopped_early():
                        break
        finally:
            self._emit("on_train_end")
        seconds = time.perf_counter() - t_start
        done = last.step if last is not None else self.state.start  # < total when trainer.max_seconds stopped it

        if resumed is None or self.state.start != done:  # else the newest checkpoint is already the final one
            self._save(self.state, done)
        unwrapped = self._plain_student(student)
        if self.averaging is not None and self.is_main:
            if self.averaging.apply(unwrapped):
                method = self.averaging.cfg.method.upper()
                console.print(f"weight average: the student is now the {method} of its weights over "
                              f"{self.averaging.count} steps", soft_wrap=True, highlight=False)
            elif done > 0:
                self._warn(f"trainer.weight_average: the run stopped at step {done}, before averaging began; the "
                           f"student keeps its last weights")
        if wise is not None:
            wise.apply(unwrapped)
            console.print(f"WiSE-FT: the student is now {1 - wise.alpha:g} × its init + {wise.alpha:g} × its trained "
                          f"weights", soft_wrap=True, highlight=False)
        after = self._evaluate(unwrapped, "student")
        summary: dict[str, Any] = {}
        if self.is_main:
            self._emit("on_evaluate", done, after)
            if self.early is not None:  # the saved student is the best evaluation's
                after = self.early.restore_best(unwrapped) or after
            if lora is not None:  # the adapter, then the plain student with it merged
                unwrapped = task.student = save_adapter_and_merge(unwrapped, self.run_dir / "adapter")
            task.save_student(unwrapped, self.run_dir / "student")
            sizes = {}
            if self.eval_cfg.throughput:
                whole_teacher = self.sharding.whole_teacher(task) if self.sharding else contextlib.nullcontext()
                with phase("measuring teacher and student throughput (interleaved)"), whole_teacher:
                    sizes = task.measure(unwrapped)
            rows = [{"model": "teacher", **teacher_metrics, **sizes.get("teacher", {})}]
            if before:  # the same architecture as after training: its size, but no second speed (only noise)
                rows.append({"model": "student (before)", **before,
                             **{k: v for k, v in sizes.get("student", {}).items() if k == "params"}})
            rows.append({"model": "student (after)", **after, **sizes.get("student", {})})
            summary = {"steps": done, "final_loss": last.loss if last else None, "train_seconds": seconds,
                       "table": rows, "student_dir": str(self.run_dir / "student"), "world_size": world,
                       "sharded": self.sharding is not None,
                       "objectives": [o.name for o in self.objectives], "wise_ft_alpha": cfg.wise_ft_alpha,
                       "complete": done >= total or self._stopped_early()}
            self._emit("on_fit_end", summary)
            atomic_write_json(self.run_dir / "summary.json", summary)
        acc.wait_for_everyone()
        return summary

    def _stopped_early(self) -> bool:
        """trainer.early_stopping ran out of patience (decided on the main process, which evaluates)."""
        if self.early is None:
            return False
        return self._any_process(self.early.stopped)

    def _out_of_time(self) -> bool:
        """trainer.max_seconds spent: every process stops at the same step (any one's clock past it stops all)."""
        if self.cfg.max_seconds is None:
            return False
        return self._any_process(self.clock.out_of_time())

    def _any_process(self, flag: bool) -> bool:
        return bool(self._reduce_sum(torch.tensor([float(flag)])).item() > 0)

    def _save_on_interrupt(self, step: int, total: int) -> None:
        """The checkpoint of a Ctrl-C'd run at the step it finished (unless `trainer.save_every` just wrote it)."""
        every = self.cfg.save_every
        if not (every and step % every == 0 and step < total):
            self._save(self.state, step)
        if self.is_main:
            console.print(f"checkpoint written at step {step} of {total}: {ckpt.step_dir(self.ckpt_root, step)}",
                          soft_wrap=True, highlight=False)

    def _step(self, step: int, extra: list[nn.Parameter]) -> cb.StepResult:
        """Optimizer step `step` (0-based): its micro-batches, the normalised loss, backward, clip, update."""
        acc, cfg, task, student = self.accelerator, self.cfg, self.task, self.state.student
        names, weights, by_tokens = self._terms
        records, batches, unwrapped = task.train_records, [], acc.unwrap_model(student)
        for j in range(cfg.grad_accum):
            micro_batch = step * cfg.grad_accum + j
            idx = self._micro_batch_indices(micro_batch)
            batch = task.to_device(task.collate([records[i] for i in idx], idx))
            batches.append(task.prepare_batch(batch, unwrapped, micro_batch))
        local = torch.tensor([float(sum(task.count_rows(b) for b in batches)),
                              float(sum(task.count_tokens(b) for b in batches)) if by_tokens.any() else 0.0])
        global_rows, global_tokens = (float(x) for x in self._reduce_sum(local))
        counts = torch.where(by_tokens, max(global_tokens, 1.0), max(global_rows, 1.0))
        scale = acc.num_processes / counts
        term_sums = torch.zeros(len(names))
        for j, batch in enumerate(batches):
            last_micro_batch = j == len(batches) - 1 or self.sharding is not None  # FSDP2 reduces every backward
            with contextlib.nullcontext() if last_micro_batch else acc.no_sync(student):
                with self.precision.autocast():
                    teacher_signal = task.teacher_signal(batch) if self.objectives else None
                    student_signal = task.student_signal(student, batch)
                mask = task.signal_mask(batch)
                terms = [o(student_signal, teacher_signal, mask, batch) for o in self.objectives]
                if cfg.hard_label_weight:
                    main = student_signal.main if isinstance(student_signal, Signals) else student_signal
                    terms.append(task.hard_label_loss(main, batch))
                stacked = torch.stack([t.float() for t in terms])
                acc.backward(self.precision.scale((stacked * (weights * scale).to(stacked.device)).sum()))
            term_sums += stacked.detach().float().cpu()
        term_sums = self._reduce_sum(term_sums)
        if not torch.isfinite(term_sums).all():
            bad = names[int((~torch.isfinite(term_sums)).nonzero()[0])]
            good = ckpt.latest_checkpoint(self.ckpt_root)
            raise TrainingDiverged(
                f"loss is {term_sums[names.index(bad)].item()} at step {step + 1} in objective {bad!r}; "
                f"no update was applied. Last good checkpoint: {good or 'none yet'}. Lower trainer.lr, "
                f"check the data, or use trainer.max_grad_norm.")
        if acc.num_processes > 1:  # DDP averages the student's gradients; objective parameters get the same
            for p in extra:
                p.grad = acc.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")
        grad_norm = None
        if cfg.max_grad_norm:
            self.precision.unscale(self.state.optimizer)
            grad_norm = (clip_grad_norm(list(student.parameters()), extra, cfg.max_grad_norm) if self.sharding else
                         float(acc.clip_grad_norm_([*student.parameters(), *extra], cfg.max_grad_norm)))
        self.precision.step(self.state.optimizer)
        self.state.scheduler.step()
        self.state.optimizer.zero_grad(set_to_none=True)

        done, per_row = step + 1, term_sums / counts
        for o, value in zip(self.objectives, per_row, strict=False):
            if o.stateful is not None:
                o.stateful.on_optimizer_step(loss=float(value), step=done, total_steps=self.state.total)
        return cb.StepResult(
            step=done, loss=float((per_row * weights).sum()), rows=global_rows,
            objectives={k: float(v) for k, v in zip(names, per_row, strict=True)},
            lr=self.state.scheduler.get_last_lr()[0], grad_norm=grad_norm,
            state_values={f"{o.name}.{k}": v for o in self.objectives if o.stateful is not None
                          for k, v in o.stateful.log_values().items()})
