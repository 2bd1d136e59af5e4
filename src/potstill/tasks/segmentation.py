"""Semantic segmentation: teacher and student map images (N, C, H, W) to per-pixel class logits (N, K, H, W).

Models come from factories (e.g. LAD's `potstill.teachers.lad:load_lad_teacher` and `:segmentation_net`). A
teacher whose `reads_labels` is true (LAD's `LabelAssistedTeacher`, Qiu et al. 2024) is called as
`teacher(images, N(y))`: N(y) is a fresh noised copy of the micro-batch's mask (`potstill.losses.lad.noise_labels`,
`teacher.label_noise`), drawn from (seed, micro-batch, process) so that a resumed run sees the same draws.

The signals are the logits flattened to one row per pixel, (N·H·W, K): every logit objective (`forward_kl`, ...)
and `trainer.hard_label_weight` (cross-entropy against the mask) then act per pixel, and the loop normalises by
the pixel count. LAD's student loss, CE + α·T²·KL(teacher ‖ student) per pixel, is `trainer.hard_label_weight: 1`
with `forward_kl` at weight α (`scale_t2: true`).

Data (`potstill.data.segmentation`): builtin:shapes or .npz pairs. Metrics on data.eval and data.shifted
(prefixed `shifted_`): mIoU (intersection and union summed over the split), pixel accuracy, pixel agreement with
the teacher's argmax. A label-reading teacher is scored with one noised copy of the held-out masks, drawn from
the seed (privileged input: not a deployable segmenter's score).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.data.segmentation import SegmentationSet, load_segmentation_source
from potstill.data.shapes import ShapesConfig
from potstill.errors import UserError
from potstill.eval.segmentation import segmentation_metrics
from potstill.losses.lad import noise_labels
from potstill.tasks.base import Task
from potstill.tasks.models import build_student, load_factory_teacher

EVAL_SPLITS = (("eval", ""), ("shifted", "shifted_"))


def pixel_rows(logits: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) logits as (N·H·W, K) rows, pixel order n, h, w (that of `mask.flatten()`)."""
    return logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])


class SegmentationTask(Task):
    signal_kind = "logits"
    captures_internals = False
    name = "segmentation"
    metric_names = ("miou", "pixel_accuracy", "agreement", "shifted_miou", "shifted_pixel_accuracy",
                    "shifted_agreement")
    export_kind = "pixel_logits"  # potstill export: `pixels` (N, C, H, W) → logits (N, classes, H, W)

    # ---- set-up
    def check_records(self) -> None:
        data, seed = self.recipe.data, self.recipe.seed
        cfg = data.shapes
        shapes = ShapesConfig(size=cfg.size, max_shapes=cfg.max_shapes, min_radius=cfg.min_radius,
                              max_radius=cfg.max_radius, contrast=cfg.contrast, texture=cfg.texture, noise=cfg.noise)
        shapes_seed = seed if cfg.seed is None else cfg.seed
        self.sets: dict[str, SegmentationSet] = {}
        for where, default_split in (("train", "train"), ("eval", "test"), ("shifted", "shifted")):
            source = getattr(data, where)
            if source is not None:
                self.sets[where] = load_segmentation_source(source.path, split=source.split or default_split,
                                                            limit=source.limit, shapes=shapes, seed=shapes_seed,
                                                            where=f"data.{where}")
        shapes_seen = {where: tuple(s.images.shape[1:]) for where, s in self.sets.items()}
        if len(set(shapes_seen.values())) > 1:
            raise UserError("data: the sources' images differ in shape (C, H, W): "
                            + ", ".join(f"{k} {v}" for k, v in shapes_seen.items()))

    def setup(self, *, is_main: bool = True, barrier=lambda: None) -> None:
        r = self.recipe
        if not hasattr(self, "sets"):
            self.check_records()
        self.train_set = self.sets["train"]
        self.teacher = load_factory_teacher(r.teacher).to(self.device)
        self.reads_labels = bool(getattr(self.teacher, "reads_labels", False))
        self.student = build_student(r.student, self.teacher, seed=r.seed)
        self.num_classes = self._check_models()
        for where, pairs in self.sets.items():
            if int(pairs.masks.max()) >= self.num_classes:
                raise UserError(f"data.{where}: mask class {int(pairs.masks.max())} but the teacher gives "
                                f"{self.num_classes} class logits (ids 0..{self.num_classes - 1})")
        self.train_records = [{"i": i} for i in range(len(self.train_set))]
        eval_set = self.sets.get("eval")
        self.eval_records = [{"i": i, "eval": True} for i in range(len(eval_set))] if eval_set is not None else []
        self._teacher_eval: dict[str, torch.Tensor] = {}

    def _check_models(self) -> int:
        """Run both models once on a zero image: the class count, or a one-line error."""
        image = torch.zeros(1, *self.train_set.images.shape[1:], device=self.device)
        mask = torch.zeros(1, *image.shape[2:], dtype=torch.long, device=self.device)
        outs = {}
        for role, model in (("teacher", self.teacher), ("student", self.student)):
            try:
                with torch.inference_mode():
                    out = self.run_model(model.to(self.device), image, mask)
            except (RuntimeError, ValueError, TypeError, UserError) as exc:
                raise UserError(f"field {role}: the {role} does not take images of shape {tuple(image.shape[1:])} "
                                f"({str(exc).splitlines()[0][:200]})") from None
            if out.dim() != 4 or out.shape[0] != 1 or tuple(out.shape[2:]) != tuple(image.shape[2:]):
                raise UserError(f"field {role}: the {role} returned shape {tuple(out.shape)} for one image of shape "
                                f"{tuple(image.shape[1:])}; expected logits (1, classes, "
                                f"{image.shape[2]}, {image.shape[3]})")
            outs[role] = int(out.shape[1])
        if outs["student"] != outs["teacher"]:
            raise UserError(f"field student: the student gives {outs['student']} class logits per pixel, the teacher "
                            f"{outs['teacher']}; they must have the same classes")
        return outs["teacher"]

    # ---- models
    def run_model(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N, K, H, W) logits; a label-reading teacher also gets `labels` (an already noised mask)."""
        if model is self.teacher and getattr(self, "reads_labels", False):
            return model(images, labels)
        return model(images)

    def noised_labels(self, masks: torch.Tensor, micro_batch: int, rank: int = 0) -> torch.Tensor:
        """N(y) of a micro-batch's masks, a pure function of (recipe seed, micro-batch, process rank, masks)."""
        noise = self.recipe.teacher.label_noise
        generator = torch.Generator().manual_seed((self.recipe.seed * 1_000_003 + micro_batch) * 1_009 + rank)
        return noise_labels(masks.cpu(), self.num_classes, noise.p, noise.mode, noise.block, generator).to(masks.device)

    # ---- batches
    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        """Training pairs, or held-out ones for `eval_records` (`potstill export`'s check)."""
        pairs = self.sets["eval"] if records and records[0].get("eval") else self.train_set
        rows = torch.tensor([rec["i"] for rec in records], dtype=torch.long)
        return {"pixels": pairs.images[rows], "masks": pairs.masks[rows], "index": rows}

    def prepare_batch(self, batch: dict[str, Any], student: nn.Module, micro_batch: int) -> dict[str, Any]:
        """A label-reading teacher's noised mask for this micro-batch."""
        if not self.reads_labels:
            return batch
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return {**batch, "teacher_labels": self.noised_labels(batch["masks"], micro_batch, rank)}

    def count_rows(self, batch: dict[str, Any]) -> int:
        return int(batch["masks"].numel())

    def teacher_signal(self, batch: dict[str, Any]) -> Any:
        from potstill.teachers import teacher_outputs

        return teacher_outputs(lambda: pixel_rows(self.run_model(self.teacher, batch["pixels"],
                                                                 batch.get("teacher_labels"))))

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        return pixel_rows(model(batch["pixels"]))

    def export_output(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return model(batch["pixels"])

    def hard_label_loss(self, student_signal: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return nn.functional.cross_entropy(student_signal.float(), batch["masks"].flatten(), reduction="sum")

    # ---- evaluation
    def predict(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Argmax class maps (N, H, W) of `model` on `images`, in eval mode, batch by batch (CPU)."""
        bs, out, was_training = self.recipe.eval.batch_size, [], model.training
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(images), bs):
                chunk = labels[start:start + bs].to(self.device) if labels is not None else None
                out.append(self.run_model(model, images[start:start + bs].to(self.device), chunk).argmax(1).cpu())
        model.train(was_training)
        return torch.cat(out)

    def _teacher_predictions(self, where: str) -> torch.Tensor:
        """The teacher's class maps on a held-out split (a label reader's from one seeded noise draw), once."""
        if where not in self._teacher_eval:
            pairs = self.sets[where]
            labels = None
            if self.reads_labels:
                noise = self.recipe.teacher.label_noise
                generator = torch.Generator().manual_seed(10_000 + self.recipe.seed + (where == "shifted"))
                labels = noise_labels(pairs.masks, self.num_classes, noise.p, noise.mode, noise.block, generator)
            self._teacher_eval[where] = self.predict(self.teacher, pairs.images, labels)
        return self._teacher_eval[where]

    def evaluate(self, model: nn.Module, *, role: str = "student") -> dict[str, float]:
        metrics: dict[str, float] = {}
        for where, prefix in EVAL_SPLITS:
            if where not in self.sets:
                continue
            teacher = self._teacher_predictions(where)
            pred = teacher if role == "teacher" else self.predict(model, self.sets[where].images)
            scores = segmentation_metrics(pred, self.sets[where].masks, self.num_classes, teacher_pred=teacher)
            metrics.update({prefix + k: v for k, v in scores.items()})
        return metrics

    def measure(self, student: nn.Module) -> dict[str, dict[str, float]]:
        pairs = self.sets.get("eval", self.train_set)
        items = list(range(min(len(pairs), 1024)))

        def runner(model: nn.Module):
            def run(chunk: list[int]) -> Any:
                rows = torch.tensor(chunk)
                return self.run_model(model, pairs.images[rows].to(self.device), pairs.masks[rows].to(self.device))

            return run

        return self.compare_speed(student, items, runner, unit="images_per_s", batch_size=self.recipe.eval.batch_size)

    # ---- output
    def save_student(self, model: nn.Module, path: Path) -> None:
        from potstill.students.save import built_with, save_factory_student

        factory, kwargs = built_with(self.recipe.student)
        save_factory_student(model, path, factory=factory, kwargs=kwargs,
                             extra={"image_shape": list(self.train_set.images.shape[1:]),
                                    "num_classes": self.num_classes, "output": "logits (N, classes, H, W)"})
