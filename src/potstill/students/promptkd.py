"""PromptKD's student: a frozen ViT image tower with learnable deep visual prompts and a projector.

Li et al. 2024, "PromptKD: Unsupervised Prompt Distillation for Vision-Language Models". The student's image
tower stays frozen; the only trainable parts are
- deep visual prompts (VPT-deep): `prompts` learnable tokens inserted after the CLS token at each of the first
  `depth` transformer layers (each layer gets its own tokens, replacing the previous layer's prompt outputs);
- a projector P (two linear layers with a ReLU) from the tower's width to the teacher's embedding width.

The student's image feature is P(CLS output of the final layer norm); `potstill.losses.promptkd` turns it into
zero-shot logits against the teacher's stored class text features and distils with T²·KL. Defaults as in the
paper's ViT-B/16 student: 4 prompt tokens, depth = every layer here (the paper uses 9 of 12), projector hidden
width = the teacher's embedding width.

The tower is a Hugging Face ViT (`ViTModel`, a `*ForImageClassification` or the encoder of a `ViTMAE*`, e.g.
`potstill.examples.digits_vit:mae_teacher`): anything with `.embeddings` (patch_embeddings, cls_token,
position_embeddings), `.layers` (or `.encoder.layer`) and a final `.layernorm`. MAE's random masking is never used.

`ProbeStudent` is the equal-budget baseline: the same frozen tower's CLS feature through a projector alone,
its hidden width chosen so that it trains as many parameters as a given PromptKD student.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from potstill.errors import UserError


def vit_encoder(tower: nn.Module) -> nn.Module:
    """The ViT encoder inside `tower` (`.vit` of a classifier or MAE, else the model itself), checked."""
    encoder = getattr(tower, "vit", tower)
    embeddings = getattr(encoder, "embeddings", None)
    needed = ("patch_embeddings", "cls_token", "position_embeddings")
    if embeddings is None or not all(hasattr(embeddings, n) for n in needed) or vit_blocks(encoder) is None \
            or not hasattr(encoder, "layernorm"):
        raise UserError(f"field student.kwargs.tower: PromptKD needs a Hugging Face ViT image tower (embeddings with "
                        f"patch_embeddings, cls_token and position_embeddings, transformer blocks, layernorm); got "
                        f"{type(tower).__name__}")
    return encoder


def vit_blocks(encoder: nn.Module) -> nn.ModuleList | None:
    """The transformer blocks of a ViT encoder: `.layers` (transformers ≥ 5) or `.encoder.layer`."""
    blocks = getattr(encoder, "layers", None)
    if blocks is None:
        blocks = getattr(getattr(encoder, "encoder", None), "layer", None)
    return blocks if isinstance(blocks, nn.ModuleList) else None


def freeze_tower(encoder: nn.Module) -> nn.Module:
    """No gradients and eval mode for every tower weight (the tower is locked)."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder.eval()


def projector(width: int, hidden: int, out: int) -> nn.Sequential:
    """Linear(width → hidden), ReLU, Linear(hidden → out)."""
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out))


class _FrozenTower(nn.Module):
    """A frozen ViT encoder that stays in eval mode when the student is put in training mode."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = freeze_tower(vit_encoder(tower))
        config = self.tower.config
        self.width = int(config.hidden_size)
        self.blocks = vit_blocks(self.tower)
        self.num_layers = len(self.blocks)

    def lock(self) -> _FrozenTower:
        """Freeze the tower again (after a builder that switched every parameter to requires_grad)."""
        freeze_tower(self.tower)
        return self

    def train(self, mode: bool = True) -> _FrozenTower:
        super().train(mode)
        self.tower.eval()
        return self

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLS + patch tokens with position embeddings (no masking), (N, 1 + patches, width)."""
        emb = self.tower.embeddings
        patches = emb.patch_embeddings(pixels.to(emb.cls_token.dtype))
        position = emb.position_embeddings
        cls = (emb.cls_token + position[:, :1]).expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches + position[:, 1:]], dim=1)

    def layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        out = self.blocks[index](hidden)
        return out[0] if isinstance(out, tuple) else out

    def cls_feature(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tower.layernorm(hidden)[:, 0]


class PromptedViT(_FrozenTower):
    """PromptKD's student: frozen ViT + deep visual prompts + projector; `forward(pixels)` → (N, embed_dim)."""

    def __init__(self, tower: nn.Module, embed_dim: int, *, prompts: int = 4, depth: int | None = None,
                 projector_hidden: int | None = None, seed: int = 0) -> None:
        super().__init__(tower)
        depth = self.num_layers if depth is None else depth
        if not 1 <= depth <= self.num_layers:
            raise UserError(f"field student.kwargs.depth: prompts go into layers 1..{self.num_layers} of the tower, "
                            f"got depth {depth}")
        if prompts < 1 or embed_dim < 1:
            raise UserError("field student.kwargs: prompts and embed_dim must be ≥ 1")
        generator = torch.Generator().manual_seed(seed)
        # VPT's initialisation: uniform in ±sqrt(6 / (patch area·channels + width))
        patch = self.tower.config.patch_size
        bound = (6.0 / (self.tower.config.num_channels * patch * patch + self.width)) ** 0.5
        self.prompts = nn.Parameter((torch.rand(depth, prompts, self.width, generator=generator) * 2 - 1) * bound)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.projector = projector(self.width, projector_hidden or embed_dim, embed_dim)
        torch.random.set_rng_state(state)
        self.num_prompts, self.depth = prompts, depth

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.tokens(pixels)
        n = hidden.shape[0]
        for i in range(self.num_layers):
            if i < self.depth:
                rest = hidden[:, 1 + (self.num_prompts if i > 0 else 0):]
                hidden = torch.cat([hidden[:, :1], self.prompts[i].expand(n, -1, -1), rest], dim=1)
            hidden = self.layer(i, hidden)
        return self.projector(self.cls_feature(hidden))


class ProbeStudent(_FrozenTower):
    """The equal-budget baseline: the frozen tower's CLS feature → projector (no prompts); `hidden` = 0 makes
    the projector one linear map (a plain linear probe)."""

    def __init__(self, tower: nn.Module, embed_dim: int, *, hidden: int, seed: int = 0) -> None:
        super().__init__(tower)
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.projector = projector(self.width, hidden, embed_dim) if hidden > 0 else nn.Linear(self.width, embed_dim)
        torch.random.set_rng_state(state)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.tokens(pixels)
        for i in range(self.num_layers):
            hidden = self.layer(i, hidden)
        return self.projector(self.cls_feature(hidden))


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def probe_hidden_for(budget: int, width: int, embed_dim: int) -> int:
    """The projector hidden width w whose Linear(width→w) + Linear(w→embed_dim) has about `budget` parameters:
    w·(width + 1 + embed_dim) + embed_dim ≈ budget."""
    return max(1, round((budget - embed_dim) / (width + 1 + embed_dim)))


def _tower(tower: str | nn.Module, tower_kwargs: dict[str, Any] | None) -> nn.Module:
    if isinstance(tower, nn.Module):
        return tower
    from potstill.teachers import call_factory

    return call_factory(tower, dict(tower_kwargs or {}), field="student.kwargs.tower")


def prompted_vit(tower: str | nn.Module = "potstill.examples.digits_vit_classifier:digits_vit_classifier",
                 tower_kwargs: dict[str, Any] | None = None, embed_dim: int = 384, prompts: int = 4,
                 depth: int | None = None, projector_hidden: int | None = None, seed: int = 0) -> PromptedViT:
    """A PromptKD student (factory for `student.factory`): `tower` is a ViT module or a `module:callable` that
    builds one (with `tower_kwargs`); `embed_dim` is the teacher's embedding width."""
    return PromptedViT(_tower(tower, tower_kwargs), embed_dim, prompts=prompts, depth=depth,
                       projector_hidden=projector_hidden, seed=seed)


def probe_student(tower: str | nn.Module = "potstill.examples.digits_vit_classifier:digits_vit_classifier",
                  tower_kwargs: dict[str, Any] | None = None, embed_dim: int = 384, hidden: int | None = None,
                  budget: int | None = None, seed: int = 0) -> ProbeStudent:
    """The equal-budget probe: `hidden` given, or sized to train about `budget` parameters."""
    module = _tower(tower, tower_kwargs)
    if hidden is None:
        if budget is None:
            raise UserError("field student.kwargs: give the probe's hidden width or a parameter budget")
        hidden = probe_hidden_for(budget, int(vit_encoder(module).config.hidden_size), embed_dim)
    return ProbeStudent(module, embed_dim, hidden=hidden, seed=seed)


__all__ = ["PromptedViT", "ProbeStudent", "probe_hidden_for", "probe_student", "prompted_vit",
           "trainable_parameters", "vit_encoder"]
