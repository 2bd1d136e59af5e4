"""Image classification: teacher and student map an image batch (N, C, H, W) to class logits.

Models: a Hugging Face image classifier (`AutoModelForImageClassification`: a folder as `teacher.path`; students
by `from_config` / `layers_from_teacher` / `pretrained`), or any `torch.nn.Module` from a factory (e.g.
`potstill.assets_image:mnist_cnn`, `potstill.students.cnn:small_cnn`, or `timm:create_model` with kwargs when timm
is installed). `student.init: pretrained` also takes a potstill factory-student folder (a run's `student/`), which
is how a second stage (SSLD's labelled fine-tune) starts from the first stage's student.

Data (`potstill.data.images`): IDX, `.npz`, image folders, `datasets` folders, `builtin:mnist-5k` and
`builtin:fashion-mnist`. Both models see the same tensors: pixels in [0, 1], then `data.transforms` (resize,
channel repeat, normalise; training augmentation by random crop / flip / mixup, drawn from (seed, micro-batch, process),
`potstill.data.image_transforms`). With `data.ssld`, the teacher's most confident images of an unlabelled pool join
the training images without labels (`potstill.data.ssld`; kept rows in `<run>/ssld_selection.json`).

The teacher's logits on the training images are computed once (`<run>/teacher_cache/`, with a manifest of teacher
weights, images and transforms) unless the training images are augmented, objectives read internals, or
`teacher.cache_logits` is off; the teacher then runs on every batch.
Metrics on `data.eval`: accuracy, macro-F1, top-1 agreement with the teacher; params and images/s of both models
(measured interleaved).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.data import image_transforms as tf
from potstill.data.images import NO_LABEL, ImageSet, fingerprint_images, load_image_source
from potstill.errors import UserError
from potstill.eval import classification_metrics
from potstill.hub import looks_like_hub_id
from potstill.tasks.base import Task
from potstill.tasks.models import build_student, load_factory_teacher, load_hf_teacher


def state_digest(model: nn.Module) -> str:
    """sha256 over a model's parameters and buffers (the teacher-logit cache's model key)."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def labelled_cross_entropy(logits: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Summed cross-entropy of `logits` against the batch's labels, unlabelled rows (-100) left out; a batch with no
    labels at all (SSLD's pool, unlabelled images) adds 0, still attached to the graph. A mixup batch (`mix_partner`,
    `mix_weight` λ) gives λ·CE(y) + (1 − λ)·CE(y_partner) per row."""
    if "labels" not in batch:
        return logits.float().sum() * 0.0
    if "mix_partner" not in batch:
        return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum", ignore_index=NO_LABEL)
    labels, lam = batch["labels"], batch["mix_weight"].to(logits.device)
    own = nn.functional.cross_entropy(logits.float(), labels, reduction="none", ignore_index=NO_LABEL)
    partner = nn.functional.cross_entropy(logits.float(), labels[batch["mix_partner"].to(labels.device)],
                                          reduction="none", ignore_index=NO_LABEL)
    return (lam * own + (1 - lam) * partner).sum()


class ImageClassificationTask(Task):
    export_kind = "logits"  # potstill export: input `pixels` (N, C, H, W) in [0, 1], normalisation in the graph
    signal_kind = "logits"
    name = "image_classification"
    metric_names = ("accuracy", "macro_f1", "agreement")

    def check_records(self) -> None:
        data = self.recipe.data
        self.train_set = load_image_source(data.train, where="data.train")
        self.eval_set = load_image_source(data.eval, where="data.eval") if data.eval else None
        self.pool = load_image_source(data.ssld.pool, where="data.ssld.pool").without_labels() \
            if data.ssld else None
        shapes = {tuple(s.images.shape[1:]) for s in (self.train_set, self.eval_set, self.pool) if s is not None}
        if len(shapes) > 1:
            raise UserError(f"data: the image sources have different shapes {sorted(shapes)}; set "
                            f"data.transforms.resize and give images of one channel count")

    def setup(self, *, is_main: bool = True, barrier=lambda: None) -> None:
        r = self.recipe
        if not hasattr(self, "train_set"):
            self.check_records()
        from transformers import AutoModelForImageClassification

        self.hf = r.teacher.path is not None
        if self.hf:
            self.teacher, _ = load_hf_teacher(r.teacher.path, AutoModelForImageClassification, tokenizer=False)
        else:
            self.teacher = load_factory_teacher(r.teacher)
        self.teacher.to(self.device)
        self.student = self._build_student(AutoModelForImageClassification)
        self.num_classes = self._check_models()
        for where, images in (("data.train", self.train_set), ("data.eval", self.eval_set)):
            if images is not None and int(images.labels.max()) >= self.num_classes:
                raise UserError(f"{where}: label {int(images.labels.max())} but the teacher has "
                                f"{self.num_classes} classes (ids 0..{self.num_classes - 1})")
        if self.pool is not None:
            self.train_set = self._with_ssld_pool(is_main, barrier)
        self.train_records = [{"i": i} for i in range(len(self.train_set))]
        self.eval_records = [{"i": i, "eval": True} for i in range(len(self.eval_set))] if self.eval_set else []
        self._teacher_logits = None
        if r.teacher.cache_logits and not r.data.transforms.augments:
            self._teacher_logits = self._cached_teacher_logits(is_main, barrier)
        self._eval_cache: dict[str, Any] | None = None

    def _build_student(self, auto_cls: Any) -> nn.Module:
        cfg = self.recipe.student
        if (cfg.init == "pretrained" and not cfg.path.startswith("builtin:") and not Path(cfg.path).exists()
                and not looks_like_hub_id(cfg.path)):
            raise UserError(f"field student.path: folder not found: {cfg.path} (a saved student: a Hugging Face "
                            f"image classifier, or a run's student/ folder, e.g. of the first stage)")
        return build_student(cfg, self.teacher, seed=self.recipe.seed, auto_cls=auto_cls)

    def _check_models(self) -> int:
        """Run both models once on a zero batch of the data's shape: the class count, or a one-line error."""
        probe = self.model_inputs(self.pixels(torch.zeros(1, *self.train_set.images.shape[1:])))
        widths = {}
        for role, model in (("teacher", self.teacher), ("student", self.student)):
            try:
                with torch.inference_mode():
                    out = self._forward(model.to(self.device), probe.to(self.device))
            except (RuntimeError, ValueError, TypeError) as exc:
                raise UserError(f"field {role}: the {role} does not take images of shape "
                                f"{tuple(probe.shape[1:])} ({str(exc).splitlines()[0][:200]}); see "
                                f"data.transforms (resize, channels)") from None
            if out.dim() != 2 or out.shape[0] != 1:
                raise UserError(f"field {role}: the {role} returned shape {tuple(out.shape)} for one image; expected "
                                f"logits (1, classes)")
            widths[role] = int(out.shape[-1])
        if widths["student"] != widths["teacher"]:
            raise UserError(f"field student: the student gives {widths['student']} logits, the teacher "
                            f"{widths['teacher']}; they must have the same classes")
        return widths["teacher"]

    # ---- inputs
    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Float pixels in [0, 1], resized and with the channels of `data.transforms` (no augmentation)."""
        t = self.recipe.data.transforms
        x = tf.to_unit(images)
        if t.resize is not None:
            x = tf.resize(x, t.resize)
        return tf.repeat_channels(x, t.channels) if t.channels is not None else x

    def model_inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        t = self.recipe.data.transforms
        return tf.normalize(pixels, t.mean, t.std) if t.mean is not None and t.std is not None else pixels

    def _forward(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        if hasattr(model, "config") and hasattr(model, "save_pretrained"):
            return model(pixel_values=pixel_values).logits
        out = model(pixel_values)
        return out.logits if hasattr(out, "logits") else out

    # ---- teacher signals computed once
    def _teacher_pass(self, images: torch.Tensor) -> torch.Tensor:
        bs, out = self.recipe.eval.batch_size, []
        self.teacher.eval()
        with torch.inference_mode():
            for start in range(0, len(images), bs):
                x = self.model_inputs(self.pixels(images[start:start + bs])).to(self.device)
                out.append(self._forward(self.teacher, x).float().cpu())
        return torch.cat(out)

    def _manifest(self, images: ImageSet, what: str) -> dict[str, Any]:
        r = self.recipe
        return {"format": 1, "what": what, "teacher": str(r.teacher.path or r.teacher.factory),
                "teacher_kwargs": json.dumps(r.teacher.kwargs, sort_keys=True, default=str),
                "teacher_state": state_digest(self.teacher), "images": fingerprint_images(images),
                "transforms": r.data.transforms.model_dump_json()}

    def _cached_teacher_logits(self, is_main: bool, barrier: Any) -> torch.Tensor:
        from potstill.teachers.score_cache import cached_tensor

        return cached_tensor(self.run_dir / "teacher_cache", self._manifest(self.train_set, "train logits"),
                             "logits", lambda: self._teacher_pass(self.train_set.images), is_main=is_main,
                             barrier=barrier)

    def _with_ssld_pool(self, is_main: bool, barrier: Any) -> ImageSet:
        """The training images plus SSLD's pick from the pool (unlabelled), the pick saved beside the run."""
        from potstill.data.ssld import duplicates_of, ssld_select
        from potstill.io import atomic_write_json
        from potstill.teachers.score_cache import cached_tensor

        cfg, pool = self.recipe.data.ssld, self.pool
        assert cfg is not None and pool is not None
        logits = cached_tensor(self.run_dir / "teacher_cache" / "ssld_pool", self._manifest(pool, "pool logits"),
                               "logits", lambda: self._teacher_pass(pool.images), is_main=is_main, barrier=barrier)
        exclude = duplicates_of(pool.images, self.eval_set.images) if cfg.dedupe and self.eval_set else None
        pick = ssld_select(logits.softmax(-1), per_class=cfg.per_class, exclude=exclude,
                           min_confidence=cfg.min_confidence)
        if is_main:
            atomic_write_json(self.run_dir / "ssld_selection.json", pick.as_json())
        chosen = pool.take(pick.indices)
        return ImageSet(torch.cat([self.train_set.images, chosen.images.to(self.train_set.images.dtype)]),
                        torch.cat([self.train_set.labels, chosen.labels]))

    # ---- batches
    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        """A batch of training images, or of evaluation images for `eval_records` (e.g. `potstill export`'s check)."""
        images = self.eval_set if records and records[0].get("eval") and self.eval_set is not None else self.train_set
        rows = torch.tensor([rec["i"] for rec in records], dtype=torch.long)
        labels = images.labels[rows]
        batch: dict[str, Any] = {"pixels": self.pixels(images.images[rows]), "index": rows}
        if bool((labels != NO_LABEL).any()):
            batch["labels"] = labels
        return batch

    def prepare_batch(self, batch: dict[str, Any], student: nn.Module, micro_batch: int) -> dict[str, Any]:
        """Training augmentation of this micro-batch, drawn from (seed, micro-batch, process)."""
        t = self.recipe.data.transforms
        if not t.augments:
            return batch
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        generator = torch.Generator().manual_seed((self.recipe.seed * 1_000_003 + micro_batch) * 1_009 + rank)
        x = tf.random_crop(batch["pixels"], t.random_crop_padding, generator)
        if t.horizontal_flip:
            x = tf.horizontal_flip(x, generator)
        if t.mixup_alpha > 0:
            x, partner, lam = tf.mixup(x, t.mixup_alpha, generator)
            return {**batch, "pixels": x, "mix_partner": partner, "mix_weight": lam}
        return {**batch, "pixels": x}

    def count_rows(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    def count_tokens(self, batch: dict[str, Any]) -> int:
        """Tokens a ViT-like model sees per image (patches + CLS), for objectives on internals."""
        config = getattr(self.student, "config", None)
        size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
        if not isinstance(size, int) or not isinstance(patch, int):
            raise UserError("objectives on hidden states or attention need Hugging Face transformer image models "
                            "(a config with image_size and patch_size)")
        return int(batch["index"].numel()) * (1 + (size // patch) ** 2)

    def _run(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self._forward(model, self.model_inputs(batch["pixels"]))

    def export_output(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self._run(model, batch)

    def teacher_signal(self, batch: dict[str, Any]) -> Any:
        if self._teacher_logits is not None and not self.internals.get("teacher"):
            return self._teacher_logits[batch["index"].cpu()].to(self.device)
        from potstill.teachers import teacher_outputs

        return teacher_outputs(self.with_internals, "teacher", self._run, self.teacher, batch)

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        return self.with_internals("student", self._run, model, batch)

    def hard_label_loss(self, student_signal: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return labelled_cross_entropy(student_signal, batch)

    # ---- evaluation
    def logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Logits (float32, CPU) of `model` on raw `images`, in eval mode, batch by batch."""
        bs, out, was_training = self.recipe.eval.batch_size, [], model.training
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(images), bs):
                x = self.model_inputs(self.pixels(images[start:start + bs])).to(self.device)
                out.append(self._forward(model, x).float().cpu())
        model.train(was_training)
        return torch.cat(out)

    def evaluate(self, model: nn.Module, *, role: str = "student") -> dict[str, float]:
        if self.eval_set is None:
            return {}
        if self._eval_cache is None:
            self._eval_cache = {"teacher": self.logits(self.teacher, self.eval_set.images)}
        teacher = self._eval_cache["teacher"]
        logits = teacher if role == "teacher" else self.logits(model, self.eval_set.images)
        keep = self.eval_set.labels != NO_LABEL
        metrics = classification_metrics(logits, teacher_logits=teacher)
        if bool(keep.any()):
            metrics.update(classification_metrics(logits[keep], labels=self.eval_set.labels[keep]))
        return metrics

    def measure(self, student: nn.Module) -> dict[str, dict[str, float]]:
        source = self.eval_set or self.train_set
        images = self.model_inputs(self.pixels(source.images[:1024]))

        def runner(model: nn.Module):
            def run(chunk: list[torch.Tensor]) -> Any:
                return self._forward(model, torch.stack(chunk).to(self.device))

            return run

        return self.compare_speed(student, list(images), runner, unit="images_per_s",
                                  batch_size=self.recipe.eval.batch_size)

    # ---- output
    def save_student(self, model: nn.Module, path: Path) -> None:
        if hasattr(model, "save_pretrained"):
            from potstill.students import save_hf_student

            save_hf_student(model, None, path)
            return
        from potstill.students.save import built_with, save_factory_student

        factory, kwargs = built_with(self.recipe.student)
        save_factory_student(model, path, factory=factory, kwargs=kwargs,
                             extra={"image_shape": list(self.train_set.images.shape[1:]),
                                    "transforms": self.recipe.data.transforms.model_dump()})
