"""Vision–language distillation: an image student learns a CLIP-style teacher's zero-shot logits.

The teacher (`potstill.teachers.vision_language`) embeds images and texts in one space: a Hugging Face
`CLIPModel` / `SiglipModel` (teacher.path), a factory module with `encode_images` / `encode_texts` (the offline
LiT teacher, `potstill.teachers.lit:load_lit_teacher`), or only a file of its vectors (teacher.embeddings, a
black-box teacher). The class text features t_c — each class name in every caption template, embedded by the
teacher's text tower, prompt-ensembled — are computed once (`<run>/class_text.pt`), as are the teacher's image
features on the training images (`<run>/teacher_cache/`).

Both signals are zero-shot logits z = s·⟨ℓ2n(image feature), t_c⟩ (`potstill.losses.promptkd.clip_logits`), so
the logit objectives apply unchanged; PromptKD is `forward_kl` with `scale_t2: true` on unlabelled images and a
`potstill.students.promptkd:prompted_vit` student. Gold labels, when the images have them, feed
`trainer.hard_label_weight`. When an objective of kind "vision_language" reads embeddings (VL2V-ADiP, the
large-VLM OOD losses), both signals are `VisionLanguageSignal`s: the logits, the image vectors (the teacher's
cached ones, the student's raw outputs) and the shared class text; logit objectives then read their `logits`.
`vision_language.descriptions` enriches every caption with attribute descriptions of its class.

Metrics on `data.eval`: zero-shot `accuracy` and `agreement` (top-1 equal to the teacher's), and with
`vision_language.retrieval` image→text / text→image R@1 and R@5 over every class caption (`potstill.eval.zero_shot`).
The student is saved as a factory student with the class text features beside it (`class_text.pt`, with the
class names), which is all inference needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.data import image_transforms as tf
from potstill.data.images import NO_LABEL, ImageSet, fingerprint_images, load_image_source
from potstill.data.vision_language import class_captions, class_descriptions, class_names_and_templates
from potstill.errors import UserError
from potstill.eval.zero_shot import class_relevance, prompt_ensemble, retrieval_recall, zero_shot_metrics
from potstill.losses.catalogue import OBJECTIVES
from potstill.losses.promptkd import clip_logits
from potstill.signals import VisionLanguageSignal
from potstill.tasks.base import Task
from potstill.tasks.image_classification import labelled_cross_entropy, state_digest
from potstill.tasks.models import build_student, load_factory_teacher


def _prepare(images: torch.Tensor, transforms: Any) -> torch.Tensor:
    """Raw images → model inputs: [0, 1] pixels, resize, channels, normalise (no augmentation)."""
    x = tf.to_unit(images)
    if transforms.resize is not None:
        x = tf.resize(x, transforms.resize)
    if transforms.channels is not None:
        x = tf.repeat_channels(x, transforms.channels)
    return tf.normalize(x, transforms.mean, transforms.std) if transforms.mean is not None else x


class VisionLanguageTask(Task):
    signal_kind = "logits"
    extra_objective_kinds = ("vision_language",)
    name = "vision_language"
    captures_internals = False
    metric_names = ("accuracy", "agreement", "i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5")

    def check_records(self) -> None:
        data = self.recipe.data
        if data.transforms.augments or (data.student_transforms is not None and data.student_transforms.augments):
            raise UserError("data.transforms: the vision_language task computes the teacher's image features once; "
                            "training augmentation (random_crop_padding, horizontal_flip) is not supported")
        self.train_set = load_image_source(data.train, where="data.train")
        self.eval_set = load_image_source(data.eval, where="data.eval") if data.eval else None

    def setup(self, *, is_main: bool = True, barrier=lambda: None) -> None:
        r = self.recipe
        if not hasattr(self, "train_set"):
            self.check_records()
        vl = r.vision_language
        self.class_names, self.templates = class_names_and_templates(vl.class_names, vl.templates)
        self.descriptions = class_descriptions(vl.descriptions, len(self.class_names))
        self.embedding_file = None
        if r.teacher.embeddings is not None:
            from potstill.teachers.vision_language import read_embedding_file

            self.embedding_file = read_embedding_file(r.teacher.embeddings)
            self._check_embedding_file()
            self.teacher = None
            scale = self.embedding_file.logit_scale
        else:
            self.teacher = self._load_teacher().to(self.device)
            scale = float(getattr(self.teacher, "logit_scale", 100.0))
        self.scale = vl.scale or scale
        self.caption_features, self.class_text = self._class_text(is_main)
        self.student = build_student(r.student, self.teacher or nn.Identity(), seed=r.seed)
        lock = getattr(self.student, "lock", None)
        if callable(lock):  # build_student makes every weight trainable; a PromptKD student keeps its tower locked
            lock()
        self._check_student()
        for where, images in (("data.train", self.train_set), ("data.eval", self.eval_set)):
            if images is not None and int(images.labels.max()) >= len(self.class_names):
                raise UserError(f"{where}: label {int(images.labels.max())} but vision_language.class_names has "
                                f"{len(self.class_names)} classes")
        for i, o in enumerate(r.objectives):
            if getattr(OBJECTIVES[o.name].fn, "needs_labels", False) and not self.train_set.has_labels:
                raise UserError(f"field objectives.{i}.name: {o.name} needs labelled data.train images (the class "
                                f"text of each image's label); data.train has none (drop_labels?)")
        self.train_records = [{"i": i} for i in range(len(self.train_set))]
        self.eval_records = [{"i": i, "eval": True} for i in range(len(self.eval_set))] if self.eval_set else []
        self._teacher_train = self._teacher_train_features(is_main, barrier)
        self._teacher_eval: torch.Tensor | None = None

    # ---- teacher
    def _load_teacher(self) -> nn.Module:
        r = self.recipe
        if r.teacher.path is not None:
            from potstill.teachers.vision_language import load_clip_teacher

            return load_clip_teacher(r.teacher.path)
        teacher = load_factory_teacher(r.teacher)
        if not (hasattr(teacher, "encode_images") and hasattr(teacher, "encode_texts")):
            raise UserError(f"field teacher.factory: {r.teacher.factory} returned a {type(teacher).__name__} without "
                            f"encode_images / encode_texts (a two-tower teacher, e.g. "
                            f"potstill.teachers.lit:load_lit_teacher)")
        return teacher

    def _check_embedding_file(self) -> None:
        file, where = self.embedding_file, f"field teacher.embeddings ({self.recipe.teacher.embeddings})"
        assert file is not None
        if file.image_embeddings.shape[0] != len(self.train_set):
            raise UserError(f"{where}: {file.image_embeddings.shape[0]} image embeddings for {len(self.train_set)} "
                            f"data.train images (row i must be image i)")
        if file.class_embeddings.shape[0] != len(self.class_names):
            raise UserError(f"{where}: {file.class_embeddings.shape[0]} class embeddings for "
                            f"{len(self.class_names)} class names")
        held_out = file.eval_image_embeddings
        if held_out is not None and self.eval_set is not None and held_out.shape[0] != len(self.eval_set):
            raise UserError(f"{where}: {held_out.shape[0]} eval_image_embeddings for {len(self.eval_set)} data.eval "
                            f"images")

    def _class_text(self, is_main: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(every caption's features (C·K, D), the prompt-ensembled class features (C, D)), saved once."""
        if self.embedding_file is not None:
            classes = self.embedding_file.class_embeddings
            return classes, classes
        assert self.teacher is not None
        captions = [c for cls in class_captions(self.class_names, self.templates, self.descriptions) for c in cls]
        with torch.inference_mode():
            flat = self.teacher.encode_texts(captions).float().cpu()
        classes = prompt_ensemble(flat.view(len(self.class_names), -1, flat.shape[-1]))
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / "class_text.pt.tmp"
            torch.save({"class_names": self.class_names, "templates": self.templates,
                        "descriptions": self.descriptions, "features": classes}, tmp)
            tmp.replace(self.run_dir / "class_text.pt")
        return flat, classes

    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's unit image features (float32, CPU) of raw images, batch by batch."""
        assert self.teacher is not None
        bs, out = self.recipe.eval.batch_size, []
        with torch.inference_mode():
            for start in range(0, len(images), bs):
                x = _prepare(images[start:start + bs], self.recipe.data.transforms).to(self.device)
                out.append(self.teacher.encode_images(x).float().cpu())
        return torch.cat(out)

    def _teacher_train_features(self, is_main: bool, barrier: Any) -> torch.Tensor:
        if self.embedding_file is not None:
            return self.embedding_file.image_embeddings
        from potstill.teachers.score_cache import cached_tensor

        r = self.recipe
        manifest = {"format": 1, "teacher": str(r.teacher.path or r.teacher.factory),
                    "teacher_kwargs": json.dumps(r.teacher.kwargs, sort_keys=True, default=str),
                    "teacher_state": state_digest(self.teacher), "images": fingerprint_images(self.train_set),
                    "transforms": r.data.transforms.model_dump_json()}
        return cached_tensor(self.run_dir / "teacher_cache", manifest, "image_features",
                             lambda: self.teacher_features(self.train_set.images), is_main=is_main, barrier=barrier)

    # ---- student
    @property
    def student_transforms(self) -> Any:
        return self.recipe.data.student_transforms or self.recipe.data.transforms

    def _check_student(self) -> None:
        probe = _prepare(self.train_set.images[:1], self.student_transforms).to(self.device)
        try:
            with torch.inference_mode():
                out = self.student.to(self.device)(probe)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise UserError(f"field student: the student does not take images of shape {tuple(probe.shape[1:])} "
                            f"({str(exc).splitlines()[0][:200]}); see data.student_transforms") from None
        width = int(self.class_text.shape[1])
        if out.dim() != 2 or out.shape[1] != width:
            raise UserError(f"field student: the student returned shape {tuple(out.shape)} for one image; expected "
                            f"(1, {width}), the teacher's embedding width (student.kwargs.embed_dim)")

    # ---- batches
    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        images = self.eval_set if records and records[0].get("eval") and self.eval_set is not None else self.train_set
        rows = torch.tensor([rec["i"] for rec in records], dtype=torch.long)
        labels = images.labels[rows]
        batch: dict[str, Any] = {"pixels": _prepare(images.images[rows], self.student_transforms), "index": rows}
        if bool((labels != NO_LABEL).any()):
            batch["labels"] = labels
        return batch

    def count_rows(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    @property
    def reads_vectors(self) -> bool:
        """Whether an objective reads embeddings (kind "vision_language"): the signals are then
        `VisionLanguageSignal`s, else the logits alone."""
        return any(OBJECTIVES[o.name].kind == "vision_language" for o in self.recipe.objectives if o.name in OBJECTIVES)

    def _signal(self, features: torch.Tensor) -> torch.Tensor | VisionLanguageSignal:
        text = self.class_text.to(features.device)
        logits = clip_logits(features, text, scale=self.scale)
        return VisionLanguageSignal(logits, features, text) if self.reads_vectors else logits

    def teacher_signal(self, batch: dict[str, Any]) -> torch.Tensor | VisionLanguageSignal:
        return self._signal(self._teacher_train[batch["index"].cpu()].to(self.device))

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor | VisionLanguageSignal:
        return self._signal(model(batch["pixels"]))

    def adapt_objective(self, name: str, fn: Any) -> Any:
        """Logit objectives read the `logits` of `VisionLanguageSignal`s (when the signals are those)."""
        if not self.reads_vectors or OBJECTIVES[name].kind != "logits":
            return fn
        from potstill.tasks.vision_language_objectives import on_logits

        return on_logits(fn, stateful=OBJECTIVES[name].stateful)

    def hard_label_loss(self, student_signal: Any, batch: dict[str, Any]) -> torch.Tensor:
        if isinstance(student_signal, VisionLanguageSignal):
            student_signal = student_signal.logits
        return labelled_cross_entropy(student_signal, batch)

    # ---- evaluation
    def student_features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        bs, out, was_training = self.recipe.eval.batch_size, [], model.training
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(images), bs):
                out.append(model(_prepare(images[start:start + bs], self.student_transforms).to(self.device))
                           .float().cpu())
        model.train(was_training)
        return torch.cat(out)

    def _eval_teacher(self) -> torch.Tensor | None:
        if self._teacher_eval is None and self.eval_set is not None:
            if self.embedding_file is not None:
                self._teacher_eval = self.embedding_file.eval_image_embeddings
            else:
                self._teacher_eval = self.teacher_features(self.eval_set.images)
        return self._teacher_eval

    def evaluate(self, model: nn.Module, *, role: str = "student") -> dict[str, float]:
        if self.eval_set is None:
            return {}
        teacher = self._eval_teacher()
        if role == "teacher":
            if teacher is None:
                return {}
            features = teacher
        else:
            features = self.student_features(model, self.eval_set.images)
        teacher_preds = None if teacher is None else (teacher @ self.class_text.T).argmax(-1)
        labels = self.eval_set.labels
        metrics = zero_shot_metrics(features, self.class_text, labels if self.eval_set.has_labels else None,
                                    teacher_preds)
        if self.recipe.vision_language.retrieval and self.eval_set.has_labels:
            per_class = self.caption_features.shape[0] // len(self.class_names)
            text_labels = torch.arange(len(self.class_names)).repeat_interleave(per_class)
            keep = labels != NO_LABEL
            metrics.update(retrieval_recall(features[keep], self.caption_features,
                                            class_relevance(labels[keep], text_labels)))
        return metrics

    # ---- output
    def save_student(self, model: nn.Module, path: Path) -> None:
        from potstill.students.save import save_factory_student

        cfg, start_only = self.recipe.student, getattr(model, "start_only_kwargs", ())  # e.g. VL2V's init_from
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in start_only}
        save_factory_student(model, path, factory=cfg.factory, kwargs=kwargs,
                             extra={"image_shape": list(self.train_set.images.shape[1:]),
                                    "transforms": self.student_transforms.model_dump(), "logit_scale": self.scale,
                                    "class_names": self.class_names})
        torch.save({"class_names": self.class_names, "templates": self.templates, "descriptions": self.descriptions,
                    "features": self.class_text},
                   Path(path) / "class_text.pt")


__all__ = ["ImageSet", "VisionLanguageTask"]
