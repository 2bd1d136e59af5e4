"""VL2V-ADiP's student: a pretrained vision backbone φ_S and a linear projection W into the teacher's space,
trained in two stages (Addepalli et al. 2024; official code DFC_STAGE1 / DFC_STAGE2).

- stage `align` (stage 1): the backbone is frozen (and kept in eval mode), W learns to map φ_S(x) onto the
  teacher's image and class-text vectors (`potstill.losses.vl2v_adip`);
- stage `distil` (stage 2): W is frozen (loaded with the backbone from the stage-1 student, `init_from`) and
  the backbone trains with the same loss;
- predict: argmax_c ⟨ℓ2n(W φ_S(x)), ê_txt_c⟩, the task's zero-shot classification with the stored class text.
Stage `full` trains both (the large-VLM OOD paper's student, and the logit-KD baseline).

Backbones (a module, or a `module:callable` with `backbone_kwargs`, returning (N, feature_dim) vectors):
`usps_cnn_features` (the ccexam USPS CNN up to its 128-d penultimate layer, pretrained on USPS digits, 16×16 —
another source and style than MNIST, the stand-in for the paper's ImageNet backbone), or a config-built
`potstill.students.cnn:small_cnn` with `num_classes` = the feature width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.errors import UserError

STAGES = ("align", "distil", "full")
USPS_MEAN, USPS_STD = 0.2471, 0.2994


def usps_cnn_features(pretrained: bool = True) -> nn.Module:
    """ccexam's USPS CNN (2 conv + BN blocks, Linear 1024→128, ReLU) for [0, 1] pixels (N, 1, 16, 16) → 128-d."""
    from potstill.assets_image import Normalized, ccexam_net

    net = ccexam_net("USPSNet", "usps.pth", input_size=16, pretrained=pretrained, field="student.kwargs.backbone",
                     what="the USPS CNN")
    body = nn.Sequential(net.features, nn.Flatten(), net.classifier[1], net.classifier[2])
    return Normalized(body, USPS_MEAN, USPS_STD)


class ProjectedBackbone(nn.Module):
    """φ_S then W: `forward(pixels)` → (N, embed_dim) = W φ_S(x) (the task and the loss normalise it)."""

    start_only_kwargs = ("init_from",)  # the saved student rebuilds from its own weights, not the stage-1 folder

    def __init__(self, backbone: nn.Module, feature_dim: int, embed_dim: int, *, stage: str = "align",
                 seed: int = 0) -> None:
        super().__init__()
        if stage not in STAGES:
            raise UserError(f"field student.kwargs.stage: expected one of {', '.join(STAGES)}, got {stage!r}")
        self.backbone, self.stage = backbone, stage
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.projection = nn.Linear(feature_dim, embed_dim)
        torch.random.set_rng_state(state)
        self.lock()

    def lock(self) -> ProjectedBackbone:
        """Train only this stage's part: W in `align`, the backbone in `distil`, both in `full` (after a builder
        that made every weight trainable)."""
        for p in self.backbone.parameters():
            p.requires_grad_(self.stage != "align")
        for p in self.projection.parameters():
            p.requires_grad_(self.stage != "distil")
        return self.train(self.training)

    def train(self, mode: bool = True) -> ProjectedBackbone:
        super().train(mode)
        if self.stage == "align":  # a frozen backbone keeps its batch-norm statistics
            self.backbone.eval()
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(self.backbone(pixels))


def _backbone(backbone: str | nn.Module, kwargs: dict[str, Any] | None) -> nn.Module:
    if isinstance(backbone, nn.Module):
        return backbone
    from potstill.teachers import call_factory

    return call_factory(backbone, dict(kwargs or {}), field="student.kwargs.backbone")


def vl2v_student(backbone: str | nn.Module = "potstill.students.vl2v_adip:usps_cnn_features",
                 backbone_kwargs: dict[str, Any] | None = None, feature_dim: int = 128, embed_dim: int = 384,
                 stage: str = "align", init_from: str | None = None, seed: int = 0) -> ProjectedBackbone:
    """The VL2V-ADiP student (factory for `student.factory`): `embed_dim` is the teacher's width; `init_from`, a
    saved student folder of this factory (the stage-1 run's `<run>/student`), gives the starting weights."""
    model = ProjectedBackbone(_backbone(backbone, backbone_kwargs), feature_dim, embed_dim, stage=stage, seed=seed)
    if init_from is not None:
        folder = Path(init_from)
        if not (folder / "model.safetensors").is_file():
            raise UserError(f"field student.kwargs.init_from: {folder} holds no model.safetensors (expected the "
                            f"stage-1 run's student folder, e.g. runs/mnist-vl2v-align/student)")
        from safetensors.torch import load_file

        try:
            model.load_state_dict(load_file(str(folder / "model.safetensors")))
        except RuntimeError as exc:
            raise UserError(f"field student.kwargs.init_from: {folder} does not fit this student "
                            f"({str(exc).splitlines()[0][:160]})") from None
    return model


__all__ = ["STAGES", "ProjectedBackbone", "usps_cnn_features", "vl2v_student"]
