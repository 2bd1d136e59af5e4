"""CLIP-style teachers for `task: vision_language`: two towers that embed images and texts in one space.

Every teacher here is an `nn.Module` with
- `encode_images(pixels) -> (N, D)` and `encode_texts(texts) -> (M, D)`, both L2-normalised, and
- `logit_scale`: the factor s of zero-shot logits s·⟨image, text⟩ (CLIP's exp(logit_scale)).

Kinds:
- `ClipTowers`: a Hugging Face `CLIPModel` or `SiglipModel` (a folder or hub id, `load_clip_teacher`), with its
  tokenizer; images arrive already resized / normalised by the task's transforms;
- `TextTower`: a plain transformer encoder with mean pooling (the MiniLM sentence encoder), the text half of the
  LiT teacher (`potstill.teachers.lit`);
- `EmbeddingFile`: a black-box teacher known only by its embeddings (`read_embedding_file`): an `.npz` with
  `image_embeddings` (N, D) aligned with the training images, `class_embeddings` (C, D) (already
  prompt-ensembled), optional `eval_image_embeddings` and `logit_scale`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from potstill.encoder_inputs import encoder_inputs_on
from potstill.errors import UserError


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _tensor_output(out: Any) -> torch.Tensor:
    """transformers ≥ 5 returns model outputs from get_*_features; the projected vector is the pooler output."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


class ClipTowers(nn.Module):
    """A Hugging Face CLIPModel / SiglipModel and its tokenizer as a two-tower teacher."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_length: int = 64) -> None:
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        scale = getattr(model, "logit_scale", None)
        self.logit_scale = float(scale.exp()) if scale is not None else 100.0

    @property
    def embed_dim(self) -> int:
        config = self.model.config
        return int(getattr(config, "projection_dim", None) or config.text_config.hidden_size)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return _unit(_tensor_output(self.model.get_image_features(pixel_values=pixels)))

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        padding = "max_length" if "siglip" in type(self.model).__name__.lower() else True
        enc = self.tokenizer(texts, padding=padding, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        return _unit(_tensor_output(self.model.get_text_features(**inputs)))


def load_clip_teacher(path: str, *, field: str = "teacher.path") -> ClipTowers:
    """A CLIPModel / SiglipModel folder or hub id with its tokenizer, frozen in eval mode."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"field {field}: cannot read a model config at {path} ({str(exc).splitlines()[0]})") from None
    if not (hasattr(config, "text_config") and hasattr(config, "vision_config")):
        raise UserError(f"field {field}: {path} is a {config.model_type} model; the vision_language task needs a "
                        f"two-tower model (CLIPModel, SiglipModel) with text_config and vision_config")
    model = AutoModel.from_pretrained(path).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"field {field}: {path} has no tokenizer ({str(exc).splitlines()[0]})") from None
    return ClipTowers(model, tokenizer)


class TextTower(nn.Module):
    """A transformer encoder with mean pooling over real tokens, L2-normalised (e.g. all-MiniLM-L6-v2)."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_length: int = 64) -> None:
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        enc = encoder_inputs_on(enc, device)
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return _unit((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))


def load_text_tower(path: str | Path, *, field: str = "teacher.kwargs.text_tower") -> TextTower:
    """A frozen `TextTower` from a transformers encoder folder (`builtin:minilm`: the offline all-MiniLM-L6-v2)."""
    from transformers import AutoModel, AutoTokenizer

    if str(path) == "builtin:minilm":
        from potstill.assets import minilm_path

        path = minilm_path()
    if not Path(path).is_dir():
        raise UserError(f"field {field}: folder not found: {path} (a transformers text encoder, or builtin:minilm)")
    model = AutoModel.from_pretrained(path).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TextTower(model, AutoTokenizer.from_pretrained(path))


@dataclass(frozen=True)
class EmbeddingFile:
    """A black-box teacher's vectors: training-image embeddings (row i = training image i), class text
    embeddings, optional held-out image embeddings; all L2-normalised on reading."""

    image_embeddings: torch.Tensor
    class_embeddings: torch.Tensor
    eval_image_embeddings: torch.Tensor | None = None
    logit_scale: float = 100.0


def read_embedding_file(path: str | Path, *, field: str = "teacher.embeddings") -> EmbeddingFile:
    """An `EmbeddingFile` from an .npz (arrays image_embeddings, class_embeddings, optional eval_image_embeddings
    and a scalar logit_scale); a one-line UserError naming the field for anything else."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"field {field}: file not found: {file}")
    try:
        arrays = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"field {field}: {file} is not a readable .npz file ({exc})") from None
    missing = [k for k in ("image_embeddings", "class_embeddings") if k not in arrays.files]
    if missing:
        raise UserError(f"field {field}: {file} lacks the array {missing[0]} (has {', '.join(arrays.files) or 'none'})")

    def matrix(name: str) -> torch.Tensor:
        value = torch.as_tensor(np.asarray(arrays[name], dtype=np.float32))
        if value.dim() != 2 or value.shape[0] == 0:
            raise UserError(f"field {field}: {file}: {name} must be a non-empty 2-D array, got shape "
                            f"{tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()):
            raise UserError(f"field {field}: {file}: {name} has NaN or infinite values")
        return _unit(value)

    images, classes = matrix("image_embeddings"), matrix("class_embeddings")
    held_out = matrix("eval_image_embeddings") if "eval_image_embeddings" in arrays.files else None
    for name, value in (("image_embeddings", images), ("eval_image_embeddings", held_out)):
        if value is not None and value.shape[1] != classes.shape[1]:
            raise UserError(f"field {field}: {file}: {name} are {value.shape[1]}-dim but class_embeddings "
                            f"{classes.shape[1]}-dim")
    scale = float(arrays["logit_scale"]) if "logit_scale" in arrays.files else 100.0
    return EmbeddingFile(images, classes, held_out, scale)


def write_embedding_file(path: str | Path, image_embeddings: torch.Tensor, class_embeddings: torch.Tensor, *,
                         eval_image_embeddings: torch.Tensor | None = None, logit_scale: float = 100.0) -> Path:
    """Write the .npz `read_embedding_file` reads (e.g. vectors fetched once from an API)."""
    arrays = {"image_embeddings": image_embeddings.float().numpy(),
              "class_embeddings": class_embeddings.float().numpy(), "logit_scale": np.float32(logit_scale)}
    if eval_image_embeddings is not None:
        arrays["eval_image_embeddings"] = eval_image_embeddings.float().numpy()
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(file)
    return file
