"""Vision: masked-image-modelling distillation of ViTs, DMAE-style (Bai et al. 2023, "Masked Autoencoders
Enable Efficient Knowledge Distillers", code UCSC-VLAA/DMAE).

The student is a masked autoencoder (Hugging Face `ViTMAEForPreTraining`): each image loses `mask_ratio` of its
patches (the student config's, 0.75 by default), the student reconstructs them (its own MAE loss, weighted by
`trainer.hard_label_weight`), and objectives on internals (`dmae_align`, or any hidden-state objective) align
its features with the teacher's. The teacher is an MAE encoder (a `ViTMAEModel`, or the encoder of a
`ViTMAEForPreTraining`) that sees **the student's visible patches only** (the same masking noise) and runs
**only up to the last block an objective reads** (the forward stops there), so it stays cheap at high mask
ratios. The masking noise of micro-batch g is drawn from (seed, g, process), so a resumed run masks the same
patches.

Records hold an image as `pixels` (a flat list of C·H·W numbers, or nested) or `features` (scikit-learn's
digits); they are reshaped to the student config's (num_channels, image_size, image_size) and divided by the
largest training value (pixels in [0, 1]). `label`s are optional and only used for the linear probe.

Metrics on `data.eval`: `reconstruction_mse` (the MAE loss on masked patches with fixed noise; models with a
decoder) and `probe_accuracy` (logistic regression on standardised mean-pooled encoder features of unmasked
images, as MAE's BatchNorm + linear probe, fit on up to 1,000 training images, scored on the eval images; when
labels exist); `images_per_s` and `params`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.errors import UserError
from potstill.eval import linear_probe_accuracy
from potstill.tasks.base import Task
from potstill.tasks.models import build_student, load_factory_teacher, load_hf_teacher

PROBE_TRAIN = 1000


def encoder_of(model: nn.Module) -> nn.Module:
    """The ViT encoder of an MAE (`.vit` of a `ViTMAEForPreTraining`), or the model itself."""
    return getattr(model, "vit", model)


@contextlib.contextmanager
def unmasked(model: nn.Module):
    """Run an MAE encoder on every patch (mask ratio 0) inside the block."""
    config = encoder_of(model).config
    ratio, config.mask_ratio = config.mask_ratio, 0.0
    try:
        yield
    finally:
        config.mask_ratio = ratio


class VisionTask(Task):
    signal_kind = "pixels"
    name = "vision"
    metric_names = ("reconstruction_mse", "probe_accuracy")

    def setup(self, *, is_main: bool = True, barrier=lambda: None) -> None:
        from transformers import ViTMAEForPreTraining

        r = self.recipe
        if r.teacher.path is not None:
            self.teacher, _ = load_hf_teacher(r.teacher.path, ViTMAEForPreTraining, tokenizer=False)
        else:
            self.teacher = load_factory_teacher(r.teacher)
        self.teacher.to(self.device)
        self.student = build_student(r.student, self.teacher, seed=r.seed, auto_cls=ViTMAEForPreTraining)
        s_cfg = getattr(self.student, "config", None)
        if not hasattr(self.student, "decoder") or getattr(s_cfg, "mask_ratio", None) is None:
            raise UserError(f"field student: the vision task trains a masked autoencoder (ViTMAEForPreTraining); "
                            f"got {type(self.student).__name__}")
        t_cfg = encoder_of(self.teacher).config
        if getattr(t_cfg, "patch_size", None) != s_cfg.patch_size or getattr(t_cfg, "image_size", None) != \
                s_cfg.image_size:
            raise UserError(f"teacher and student must cut images into the same patches: teacher image_size "
                            f"{getattr(t_cfg, 'image_size', '?')} / patch {getattr(t_cfg, 'patch_size', '?')}, "
                            f"student {s_cfg.image_size} / {s_cfg.patch_size}")
        t_cfg.mask_ratio = s_cfg.mask_ratio  # the teacher keeps the student's visible patches (same noise)
        self.shape = (s_cfg.num_channels, s_cfg.image_size, s_cfg.image_size)
        self.patches = (s_cfg.image_size // s_cfg.patch_size) ** 2
        self.visible = int(self.patches * (1 - s_cfg.mask_ratio))
        self.train_records = self._images(r.data.train, "data.train")
        self.eval_records = self._images(r.data.eval, "data.eval") if r.data.eval else []
        top = max(float(rec["pixels"].max()) for rec in self.train_records)
        self.scale = 1.0 / top if top > 0 else 1.0

    def _images(self, source, field: str) -> list[dict]:
        records = self.load(source)
        out, size = [], int(torch.tensor(self.shape).prod())
        for i, rec in enumerate(records):
            value = rec.get("pixels", rec.get("features"))
            if value is None:
                raise UserError(f"{field}, record {i}: a vision record needs `pixels` (or `features`); map another "
                                f"column with columns: {{pixels: your_column}}")
            pixels = torch.as_tensor(value, dtype=torch.float32).flatten()
            if pixels.numel() != size:
                raise UserError(f"{field}, record {i}: {pixels.numel()} pixel values, but the student takes "
                                f"{'×'.join(map(str, self.shape))} = {size}")
            out.append({"pixels": pixels.reshape(self.shape), "label": rec.get("label")})
        return out

    # ---- batches
    def collate(self, records: list[dict], indices: list[int]) -> dict[str, Any]:
        batch: dict[str, Any] = {"pixel_values": torch.stack([r["pixels"] for r in records]) * self.scale,
                                 "index": torch.tensor(indices)}
        if all(r["label"] is not None for r in records):
            batch["labels"] = torch.tensor([int(r["label"]) for r in records])
        return batch

    def _noise(self, n: int, seed: int) -> torch.Tensor:
        return torch.rand(n, self.patches, generator=torch.Generator().manual_seed(seed)).to(self.device)

    def prepare_batch(self, batch: dict[str, Any], student: nn.Module, micro_batch: int) -> dict[str, Any]:
        """The masking noise of this micro-batch, drawn from (seed, micro-batch, process)."""
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = (self.recipe.seed * 1_000_003 + micro_batch) * 1_009 + rank
        return {**batch, "noise": self._noise(len(batch["index"]), seed)}

    def count_rows(self, batch: dict[str, Any]) -> int:
        return int(batch["index"].numel())

    def count_tokens(self, batch: dict[str, Any]) -> int:
        """Tokens the encoders see per image: the visible patches and the CLS token."""
        return int(batch["index"].numel()) * (1 + self.visible)

    # ---- signals
    def internal_needs(self, role: str) -> dict[str, Any] | None:
        needs = super().internal_needs(role)
        if role == "teacher" and needs:
            last = max([*needs.get("hidden_layers", []), *needs.get("qkv", []), 0])
            needs = {**needs, "stop_after": last}  # the teacher runs only as far as an objective reads
        return needs

    @staticmethod
    def _encode(model: nn.Module, batch: dict[str, Any]) -> Any:
        return model(pixel_values=batch["pixel_values"], noise=batch["noise"])

    def teacher_signal(self, batch: dict[str, Any]) -> Any:
        from potstill.teachers import teacher_outputs

        return teacher_outputs(self.with_internals, "teacher", self._encode, encoder_of(self.teacher), batch)

    def student_signal(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        return self.with_internals("student", self._encode, model, batch)

    def hard_label_loss(self, student_signal: Any, batch: dict[str, Any]) -> torch.Tensor:
        """The student's own MAE loss (mean squared error on its masked patches), summed over images."""
        return student_signal.loss.float() * batch["index"].numel()

    # ---- evaluation
    def _batches(self, records: list[dict]):
        bs = self.recipe.eval.batch_size
        for start in range(0, len(records), bs):
            chunk = records[start:start + bs]
            yield start, self.to_device(self.collate(chunk, list(range(start, start + len(chunk)))))

    def features(self, model: nn.Module, records: list[dict]) -> torch.Tensor:
        """Mean-pooled last hidden states of the encoder on unmasked images `[N, D]` (float32, CPU)."""
        encoder, out = encoder_of(model), []
        was_training = encoder.training
        encoder.eval()
        with torch.inference_mode(), unmasked(model):
            for _, batch in self._batches(records):
                hidden = encoder(pixel_values=batch["pixel_values"]).last_hidden_state
                out.append(hidden[:, 1:].mean(1).float().cpu())
        encoder.train(was_training)
        return torch.cat(out)

    def reconstruction(self, model: nn.Module, records: list[dict]) -> float:
        """Mean MAE loss over `records` with fixed masking noise (seed 0)."""
        total, was_training = 0.0, model.training
        model.eval()
        with torch.inference_mode():
            for start, batch in self._batches(records):
                noise = self._noise(len(batch["index"]), 7_919 + start)
                total += float(model(pixel_values=batch["pixel_values"], noise=noise).loss) * len(batch["index"])
        model.train(was_training)
        return total / max(len(records), 1)

    def evaluate(self, model: nn.Module, *, role: str = "student") -> dict[str, float]:
        if not self.eval_records:
            return {}
        metrics: dict[str, float] = {}
        if role == "student" and hasattr(model, "decoder"):
            metrics["reconstruction_mse"] = self.reconstruction(model, self.eval_records)
        train = [r for r in self.train_records if r["label"] is not None][:PROBE_TRAIN]
        test = [r for r in self.eval_records if r["label"] is not None]
        if train and len(test) == len(self.eval_records):
            metrics["probe_accuracy"] = linear_probe_accuracy(
                self.features(model, train), [r["label"] for r in train], self.features(model, test),
                [r["label"] for r in test], seed=self.recipe.seed, standardize=True)
        return metrics

    def measure(self, student: nn.Module) -> dict[str, dict[str, float]]:
        """Parameters and images/s of the two encoders on unmasked images."""
        records = (self.eval_records or self.train_records)[:256]

        def runner(model: nn.Module):
            def run(chunk: list[dict]) -> Any:
                pixels = self.to_device(self.collate(chunk, list(range(len(chunk)))))["pixel_values"]
                with unmasked(model):
                    return encoder_of(model)(pixel_values=pixels)

            return run

        return self.compare_speed(student, records, runner, unit="images_per_s",
                                  batch_size=self.recipe.eval.batch_size)

    # ---- output
    def save_student(self, model: nn.Module, path: Path) -> None:
        """`save_pretrained` (loads with `ViTMAEForPreTraining.from_pretrained`, no potstill)."""
        from potstill.students import save_hf_student

        save_hf_student(model, None, path)
