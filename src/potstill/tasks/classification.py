"""Classification: teacher and student map an input to class logits.

Inputs are text (`text`, optional `text_pair`) for Hugging Face sequence classifiers, or a numeric
`features` vector for any `torch.nn.Module` that returns logits. Gold `label`s are optional for training
(pure distillation) and used for the hard-label loss and for accuracy / macro-F1.
Metrics: accuracy, macro-F1, teacher–student top-1 agreement; size and throughput (samples/s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.data.record_checks import check_class_labels, check_feature_vectors, check_label_range
from potstill.encoder_inputs import encoder_inputs
from potstill.errors import UserError
from potstill.eval import classification_metrics
from potstill.tasks.base import Task
from potstill.tasks.models import build_student, load_factory_teacher, load_hf_teacher


def name_labels(model: nn.Module, label_ids: dict[Any, int]) -> None:
    """Write the data's class names into a Hugging Face model's config (id2label / label2id), so that the exported
    student answers them in `pipeline("text-classification")` instead of LABEL_0, LABEL_1, ..."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "id2label"):
        return
    id2label = {i: f"LABEL_{i}" for i in range(int(config.num_labels))}
    id2label.update({i: str(name) for name, i in label_ids.items() if i < len(id2label)})
    config.id2label = id2label
    config.label2id = {name: i for i, name in id2label.items()}


class ClassificationTask(Task):
    export_kind = "logits"
    signal_kind = "logits"
    name = "classification"
    metric_names = ("accuracy", "macro_f1", "agreement")

    def check_records(self) -> None:
        r = self.recipe
        self.hf = r.teacher.path is not None
        inputs = ("text",) if self.hf else ("features",)
        self.train_records = self.load(r.data.train, required=inputs)
        self.eval_records = self.load(r.data.eval, required=inputs) if r.data.eval else []
        self._groups = [(f"data.train ({r.data.train.path})", self.train_records)]
        if r.data.eval is not None:
            self._groups.append((f"data.eval ({r.data.eval.path})", self.eval_records))
        self._width = None if self.hf else check_feature_vectors(self._groups)
        self._label_kind = check_class_labels(self._groups)

    def setup(self, *, is_main: bool = True, barrier=lambda: None) -> None:
        r = self.recipe
        if not hasattr(self, "_groups"):  # the records first: a bad data file is refused before any model loads
            self.check_records()
        groups, width, label_kind = self._groups, self._width, self._label_kind
        if self.hf:
            from transformers import AutoModelForSequenceClassification

            self.teacher, self.tokenizer = load_hf_teacher(r.teacher.path, AutoModelForSequenceClassification)
        else:
            self.teacher, self.tokenizer = load_factory_teacher(r.teacher), None
        self.teacher.to(self.device)
        self.student = build_student(r.student, self.teacher, seed=r.seed, field_prefix="student")
        num_classes = self._num_classes(width)
        if label_kind == "ids":
            check_label_range(groups, num_classes)
        self.label_ids = self._label_vocabulary(self.train_records + self.eval_records, label_kind, num_classes)
        if label_kind == "names" and self.label_ids:
            name_labels(self.student, self.label_ids)
        self._eval_cache: dict[str, Any] | None = None

    def _num_classes(self, width: int | None) -> int:
        """The teacher's class count; a factory teacher and student are run once on a zero vector of the records'
        feature length, so a length or class count they do not take is refused before training."""
        if width is None:
            classes = int(self.teacher.config.num_labels)
            student_classes = int(getattr(self.student.config, "num_labels", classes))
            if student_classes != classes:
                raise UserError(f"field student.config.num_labels: the student has {student_classes} classes, the "
                                f"teacher ({self.recipe.teacher.path}) {classes}; the student learns the teacher's "
                                f"classes, so give a teacher fine-tuned on {student_classes} classes")
            return classes
        probe = {"features": torch.zeros(1, width, device=self.device)}
        widths = {}
        for role, model, field in (("teacher", self.teacher, "teacher.factory"),
                                   ("student", self.student, "student.factory")):
            try:
                with torch.inference_mode():
                    out = self._forward(model.to(self.device), probe)
            except (RuntimeError, ValueError, TypeError) as exc:
                raise UserError(f"field {field}: the {role} does not take the data's feature vectors of length "
                                f"{width} ({str(exc).splitlines()[0][:200]})") from None
            if out.dim() != 2 or out.shape[0] != 1:
                raise UserError(f"field {field}: the {role} returned shape {tuple(out.shape)} for one feature "
                                f"vector; expected logits of shape (1, classes)")
            widths[role] = int(out.shape[-1])
        if widths["student"] != widths["teacher"]:
            raise UserError(f"field student.kwargs: the student gives {widths['student']} logits per record, the "
                            f"teacher {widths['teacher']}; they must have the same classes")
        return widths["teacher"]

    # ---- labels
    def _label_vocabulary(self, records: list[dict], kind: str | None, num_classes: int) -> dict[Any, int] | None:
        """Label value -> class id. Ids stay themselves. Names are the teacher config's label2id when it has real
        names; otherwise (a factory teacher, or a config with LABEL_i names) they are numbered in sorted order
        (locale-free string order), with a warning, since nothing tells which teacher class a name means."""
        labels = {rec["label"] for rec in records if rec.get("label") is not None}
        if not labels:
            return None
        config_map = getattr(getattr(self.teacher, "config", None), "label2id", None) or {}
        if config_map and not all(str(k).startswith("LABEL_") for k in config_map):
            unknown = sorted(str(x) for x in labels if x not in config_map)
            if unknown:
                raise UserError(f"data: labels {unknown[:5]} are not among the teacher's labels "
                                f"{sorted(config_map)}")
            return dict(config_map)
        if kind == "ids":
            return {x: int(float(x)) for x in labels}
        names = sorted(labels, key=str)
        if len(names) > num_classes:
            raise UserError(f"data: {len(names)} class names ({', '.join(map(str, names[:5]))}, ...) but the teacher "
                            f"has {num_classes} classes; give a teacher (teacher.path) fine-tuned on these "
                            f"{len(names)} classes")
        from potstill.ui import console

        shown = ", ".join(f"{name}={i}" for i, name in enumerate(names[:10])) + (", ..." if len(names) > 10 else "")
        console.print(f"warning: data: the labels are class names and the teacher gives none; they are numbered in "
                      f"sorted order ({shown}); if the teacher's classes are in another order, give the labels as "
                      f"class ids", highlight=False, markup=False)
        return {x: i for i, x in enumerate(names)}

    def _label_tensor(self, records: list[dict]) -> torch.Tensor | None:
        if self.label_ids is None:
            return None
        return torch.tensor([self.label_ids[rec["label"]] if rec.get("label") is not None else -100
                             for rec in records], dtype=torch.long)

    # ---- batches
    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        if self.hf:
            texts = [rec["text"] for rec in records]
            pairs = [rec["text_pair"] for rec in records] if "text_pair" in records[0] else None
            batch: dict[str, Any] = dict(self.tokenizer(texts, pairs, padding=True, truncation=True,
                                                        max_length=self.recipe.data.max_length,
                                                        return_tensors="pt"))
        else:
            batch = {"features": torch.tensor([rec["features"] for rec in records], dtype=torch.float32)}
        labels = self._label_tensor(records)
        if labels is not None:
            batch["labels"] = labels
        batch["index"] = torch.tensor(indices)
        return batch

    def count_rows(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    def _forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        if self.hf:
            inputs = encoder_inputs(batch)
            return model(**inputs).logits
        out = model(batch["features"])
        return out.logits if hasattr(out, "logits") else out

    def teacher_signal(self, batch: dict[str, Any]) -> Any:
        from potstill.teachers import teacher_outputs

        return teacher_outputs(self.with_internals, "teacher", self._forward, self.teacher, batch)

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        return self.with_internals("student", self._forward, model, batch)

    def hard_label_loss(self, student_signal: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        if "labels" not in batch:
            raise UserError("trainer.hard_label_weight > 0 needs a 'label' column in data.train")
        return nn.functional.cross_entropy(student_signal.float(), batch["labels"], reduction="sum",
                                           ignore_index=-100)

    # ---- evaluation
    def _logits(self, model: nn.Module, records: list[dict]) -> torch.Tensor:
        bs = self.recipe.eval.batch_size
        was_training = model.training
        model.eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(records), bs):
                batch = self.to_device(self.collate(records[i:i + bs], list(range(i, i + len(records[i:i + bs])))))
                out.append(self._forward(model, batch).float().cpu())
        model.train(was_training)
        return torch.cat(out)

    def eval_loss(self, model: nn.Module, indices: list[int]) -> float:
        records = [self.eval_records[i] for i in indices]
        labels = self._label_tensor(records)
        if labels is None or (labels == -100).any():
            raise UserError("data.domains: the classification task measures each domain's cross-entropy on gold "
                            "labels: every data.eval record needs a label")
        return float(nn.functional.cross_entropy(self._logits(model, records), labels))

    def evaluate(self, model: nn.Module, *, role: str = "student") -> dict[str, float]:
        if not self.eval_records:
            return {}
        if self._eval_cache is None:
            self._eval_cache = {"teacher": self._logits(self.teacher, self.eval_records),
                                "labels": self._label_tensor(self.eval_records)}
        logits = self._eval_cache["teacher"] if role == "teacher" else self._logits(model, self.eval_records)
        labels = self._eval_cache["labels"]
        if labels is not None and (labels == -100).any():
            keep = labels != -100
            metrics = classification_metrics(logits[keep], labels=labels[keep])
            metrics["agreement"] = classification_metrics(logits, teacher_logits=self._eval_cache["teacher"])[
                "agreement"]
            return metrics
        return classification_metrics(logits, labels=labels, teacher_logits=self._eval_cache["teacher"])

    def measure(self, student: nn.Module) -> dict[str, dict[str, float]]:
        records = (self.eval_records or self.train_records)[:512]

        def runner(model: nn.Module):
            def run(chunk: list[dict]) -> Any:
                return self._forward(model, self.to_device(self.collate(chunk, list(range(len(chunk))))))

            return run

        return self.compare_speed(student, records, runner, unit="samples_per_s",
                                  batch_size=self.recipe.eval.batch_size)

    # ---- output
    def export_output(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self._forward(model, batch)

    def save_student(self, model: nn.Module, path: Path) -> None:
        if hasattr(model, "save_pretrained"):
            from potstill.students import save_hf_student

            save_hf_student(model, self.tokenizer, path)
            return
        from potstill.students.save import save_factory_student

        save_factory_student(model, path, factory=self.recipe.student.factory, kwargs=self.recipe.student.kwargs,
                             extra={"labels": {str(k): v for k, v in (self.label_ids or {}).items()}})
