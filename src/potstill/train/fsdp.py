"""Sharded training with FSDP2 (`trainer.distributed: fsdp`, or an Accelerate config with `distributed_type: FSDP`).

FSDP2 is PyTorch's `torch.distributed.fsdp.fully_shard`: each process keeps 1/N of every parameter (a `DTensor`
shard), gathers a block's full weights just before the block runs and frees them after; gradients are
reduce-scattered, so each process also keeps only its share of gradients and optimizer state. Here every block
class a Hugging Face model names in `_no_split_modules` (its decoder / encoder layers) becomes one unit, and the
root module takes the rest (embeddings, heads; tied weights stay tied). The frozen teacher is sharded the same way
and has no optimizer.

Why `fully_shard` is called here rather than through Accelerate's `FullyShardedDataParallelPlugin(fsdp_version=2)`:
Accelerate 1.16 switches to FSDP only for accelerator devices (MULTI_GPU, MULTI_XPU, ...); on CPU processes
(`DistributedType.MULTI_CPU`, gloo) it keeps the plugin aside and `prepare` wraps the model in DDP, silently.
`accelerate launch` still passes an FSDP config on to its processes (`ACCELERATE_USE_FSDP=true`,
`FSDP_VERSION`, `FSDP_RESHARD_AFTER_FORWARD`), which `fsdp_settings` reads, so one launch config works on CPU and
GPU and the loop has a single sharded code path.

What the loop does differently under FSDP (`potstill.train.distiller`):
- evaluation and the saved student use a whole copy of the student gathered on the main process
  (`Sharding.whole_student`; the teacher likewise, once, for metrics that compare with it);
- gradient clipping adds the sharded norms across processes (`clip_grad_norm`);
- checkpoints hold the student and optimizer as a `torch.distributed.checkpoint` folder (`sharded/`, one file per
  process plus `.metadata`) written into the checkpoint's temporary folder before the rename, as every other file.

Not combined with FSDP (refused by `check_fsdp_run`): LoRA students, `trainer.early_stopping`, `data.domains`
(DDK), on-policy generation (`generation.lmbda`), `trainer.fused_lm_head`, fp16 loss scaling. The models are
loaded whole on every process before being sharded (no meta-device loading).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.errors import UserError

SHARDED_DIR = "sharded"  # the DCP folder inside a checkpoint


@dataclass(frozen=True)
class FSDPSettings:
    """How the models are sharded: `reshard_after_forward` frees a block's gathered weights after its forward
    (less memory, one more all-gather in backward), as FSDP's FULL_SHARD."""

    reshard_after_forward: bool = True


def _env_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def fsdp_settings(distributed: str, world_size: int, env: dict[str, str] | None = None) -> FSDPSettings | None:
    """The run's FSDP settings, None when it is not sharded: `trainer.distributed: fsdp` or an `accelerate launch`
    FSDP config asks for it; a single process has nothing to shard."""
    env = dict(os.environ) if env is None else env
    from_launcher = _env_true(env.get("ACCELERATE_USE_FSDP"))
    if distributed != "fsdp" and not from_launcher:
        return None
    if from_launcher and env.get("FSDP_VERSION", "1").strip() != "2":
        raise UserError(f"accelerate config: fsdp_config.fsdp_version is {env.get('FSDP_VERSION', '1')}; potstill "
                        f"shards with FSDP2: set fsdp_version: 2")
    if world_size <= 1:
        return None
    return FSDPSettings(reshard_after_forward=env.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
                        not in ("0", "false", "no"))


def check_fsdp_run(recipe: Any) -> None:
    """Refuse the options the sharded loop does not handle, each in one line naming the field."""
    trainer = recipe.trainer
    refused = [
        (getattr(recipe.student, "lora", None) is not None, "student.lora"),
        (trainer.early_stopping is not None, "trainer.early_stopping"),
        (getattr(recipe.data, "domains", None) is not None, "data.domains"),
        (bool(getattr(getattr(recipe, "generation", None), "lmbda", 0)), "generation.lmbda"),
        (bool(getattr(trainer, "fused_lm_head", False)), "trainer.fused_lm_head"),
        (trainer.mixed_precision == "fp16", "trainer.mixed_precision: fp16"),
    ]
    for bad, field in refused:
        if bad:
            raise UserError(f"{field} is not supported with sharded training (trainer.distributed: fsdp); drop it or "
                            f"use trainer.distributed: ddp")


def shard_model(model: nn.Module, settings: FSDPSettings) -> nn.Module:
    """`fully_shard` each block named in `model._no_split_modules`, then the root (in place; returns `model`).
    `fully_shard` moves each process's shards (and the buffers) to the device of the default mesh (the process's
    GPU under NCCL, the CPU under gloo), so the whole model never has to fit on one device."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for name, module in model.named_modules():
        if name and type(module).__name__ in blocks:
            fully_shard(module, reshard_after_forward=settings.reshard_after_forward)
    fully_shard(model, reshard_after_forward=settings.reshard_after_forward)
    return model


def _full_state(model: nn.Module) -> dict[str, Any]:
    """The whole state dict on the main process's CPU (empty elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class Sharding:
    """The run's sharded student and teacher, and whole copies of them on the main process for evaluation."""

    def __init__(self, settings: FSDPSettings, *, is_main: bool, device: torch.device) -> None:
        self.settings, self.is_main, self.device = settings, is_main, device
        self._student_template: nn.Module | None = None
        self._teacher_template: nn.Module | None = None
        self._whole_teacher: nn.Module | None = None

    def shard(self, task: Any) -> nn.Module:
        """Shard `task.student` and, when it is a module with weights, `task.teacher`; returns the student. An empty
        (meta-device) copy of each is kept to rebuild whole models from gathered state dicts."""
        student = task.student
        self._student_template = copy.deepcopy(student).to("meta")
        shard_model(student, self.settings)
        teacher = task.teacher
        if isinstance(teacher, nn.Module) and any(True for _ in teacher.parameters()):
            self._teacher_template = copy.deepcopy(teacher).to("meta")
            shard_model(teacher, self.settings)
        return student

    def _rebuild(self, template: nn.Module, sharded: nn.Module) -> nn.Module | None:
        state = _full_state(sharded)
        if not self.is_main:
            return None
        model = copy.deepcopy(template).to_empty(device="cpu")
        model.load_state_dict(state)
        for name, buffer in sharded.named_buffers():  # non-persistent buffers (e.g. rotary frequencies)
            model.get_buffer(name).copy_(buffer.detach().cpu())
        tie_weights = getattr(model, "tie_weights", None)
        if callable(tie_weights):
            tie_weights()
        model.train(sharded.training)
        return model.to(self.device)

    def whole_student(self, student: nn.Module) -> nn.Module | None:
        """The current student as one plain module on the main process, None on the others (collective)."""
        assert self._student_template is not None, "shard() first"
        return self._rebuild(self._student_template, student)

    @contextlib.contextmanager
    def whole_teacher(self, task: Any) -> Iterator[None]:
        """Within the block, `task.teacher` is the whole frozen teacher on the main process (gathered once: its
        weights never change), so evaluation there can compare with it (collective)."""
        if self._teacher_template is None:
            yield
            return
        sharded = task.teacher
        if self._whole_teacher is None:
            self._whole_teacher = self._rebuild(self._teacher_template, sharded)
        if self.is_main:
            task.teacher = self._whole_teacher
        try:
            yield
        finally:
            task.teacher = sharded


def clip_grad_norm(sharded: Sequence[nn.Parameter], extra: Sequence[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so that their total L2 norm is at most `max_norm`; returns the norm before. `sharded`
    are the student's DTensor parameters (each process holds part of each gradient), `extra` plain parameters
    whose gradients every process already holds whole (objective projections)."""
    grads = [p.grad for p in sharded if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    extra_grads = [p.grad for p in extra if p.grad is not None]
    squares = full.float().cpu() ** 2
    if extra_grads:
        squares = squares + torch.nn.utils.get_total_norm(extra_grads).float().cpu() ** 2
    total = squares.sqrt()
    # torch 2.13's clip_grads_with_norm_ leaves DTensor gradients unscaled (its foreach multiply skips them
    # silently), so each gradient is scaled here by the coefficient it computes
    coefficient = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    for grad in [*grads, *extra_grads]:
        grad.mul_(coefficient)
    return float(total)


def save_sharded(folder: Path, student: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shard of the student and optimizer state to `folder` (torch.distributed.checkpoint;
    collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(student, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(folder: Path, student: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore what `save_sharded` wrote into the sharded student and optimizer (collective). Raises
    FileNotFoundError when the folder has no DCP metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"{folder.name}/.metadata")
    model_state, optimizer_state = get_state_dict(student, optimizer)
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))  # fills `state` in place
    set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
