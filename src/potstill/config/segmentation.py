"""The recipe of `task: segmentation`: per-pixel class maps, LAD's label-assisted teacher (Qiu et al. 2024).

Data are image + mask pairs: `builtin:shapes` (potstill.data.shapes: squares and discs on a noisy texture,
drawn from `data.shapes.seed`, else the recipe's seed; splits train / test / shifted) or `.npz` files of images
and masks (read by `potstill.data.segmentation`). A teacher that reads labels (LAD's `LabelAssistedTeacher`) is
fed a fresh noised copy N(y) of each batch's mask, drawn as `teacher.label_noise` says.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from potstill.config.common import (
    DataConfig,
    DataSource,
    EvalConfig,
    NoDomains,
    NoTopKCache,
    RecipeBase,
    Strict,
    StudentConfig,
    TeacherConfig,
)
from potstill.config.paths import ModelPath, RelPath


class SegmentationSource(DataSource):
    """Images and their masks: builtin:shapes (a split drawn from the shapes seed) or an .npz file."""

    path: RelPath = Field(description="builtin:shapes, or an .npz with images `x` (or `images`: (N, H, W) or "
                          "(N, C, H, W); uint8 scaled to [0, 1], floats as they are) and masks `y` (or `masks`: "
                          "(N, H, W) integer classes 0..C−1)")
    split: Literal["train", "test", "shifted"] | None = Field(
        None, description="builtin:shapes: which draw (train: the shapes seed, test: seed + 1000, shifted: seed + "
        "2000 with 1.5× the noise and smaller shapes); default train for data.train, test otherwise")
    limit: int | None = Field(None, ge=1, description="builtin:shapes: images drawn (default 800 for train, 300 "
                              "otherwise); .npz: keep the first N")

    @model_validator(mode="after")
    def _no_columns(self) -> SegmentationSource:
        if self.columns:
            raise ValueError("columns: a segmentation source has no columns (an .npz names its arrays x and y)")
        if self.split is not None and self.path != "builtin:shapes":
            raise ValueError(f"split: only builtin:shapes has splits; {self.path} is read whole")
        return self


class ShapesSettings(Strict):
    """How builtin:shapes draws its images (potstill.data.shapes.ShapesConfig; the defaults are its own)."""

    seed: int | None = Field(None, ge=0, description="seed of the draws (null: the recipe's seed, as "
                             "`python -m potstill.teachers.lad --seed` trains its teacher on the same draw)")
    size: int = Field(32, ge=8, description="image side in pixels")
    max_shapes: int = Field(3, ge=1, description="shapes per image, 1 to this")
    min_radius: float = Field(2.5, gt=0, description="smallest shape radius (pixels)")
    max_radius: float = Field(6.5, gt=0, description="largest shape radius, below size/2 − 1")
    contrast: float = Field(0.8, ge=0, description="shape intensity over the background")
    texture: float = Field(0.5, ge=0, description="amplitude of the smooth background texture")
    noise: float = Field(0.5, ge=0, description="per-pixel Gaussian noise σ")

    @model_validator(mode="after")
    def _radii(self) -> ShapesSettings:
        if not self.min_radius <= self.max_radius < self.size / 2 - 1:
            raise ValueError(f"expected min_radius ≤ max_radius < size/2 − 1 ({self.size / 2 - 1:g}), got "
                             f"{self.min_radius:g} and {self.max_radius:g}")
        return self


class SegmentationData(NoDomains, DataConfig):
    """The segmentation task's data: training pairs, a held-out split and an optional shifted held-out split."""

    train: SegmentationSource = Field(description="training images and masks")
    eval: SegmentationSource | None = Field(None, description="held-out images and masks (metrics without prefix)")
    shifted: SegmentationSource | None = Field(None, description="a second, shifted held-out split (metrics "
                                               "prefixed shifted_)")
    shapes: ShapesSettings = Field(default_factory=ShapesSettings, description="builtin:shapes' drawing settings")


class LabelNoiseConfig(Strict):
    """LAD's N(y) (potstill.losses.lad.noise_labels): each pixel, or each block×block region, is replaced with
    probability p by a uniformly drawn class."""

    p: float = Field(0.5, ge=0, le=1, description="share of pixels (regions) re-drawn")
    mode: Literal["pixel", "block"] = Field("pixel", description="re-draw single pixels or square regions")
    block: int = Field(4, ge=1, description="mode block: the regions' side in pixels")


class SegmentationTeacherConfig(NoTopKCache, TeacherConfig):
    """A segmentation teacher from a factory returning (N, C, H, W) logits, e.g.
    potstill.teachers.lad:load_lad_teacher (kwargs {folder: ...}, made by `python -m potstill.teachers.lad`)."""

    label_noise: LabelNoiseConfig = Field(default_factory=LabelNoiseConfig, description="read only when the "
                                          "teacher reads labels (reads_labels, e.g. LAD's LabelAssistedTeacher): "
                                          "the noised mask it is fed with the images, a fresh draw per micro-batch")


class SegmentationStudentConfig(StudentConfig):
    """A segmentation student: a factory (e.g. potstill.teachers.lad:segmentation_net) or a saved one."""

    path: ModelPath | None = Field(None, description="init pretrained: a saved factory student (a run's student/ "
                                   "folder with potstill_student.json)")


class SegmentationEvalConfig(EvalConfig):
    batch_size: int = Field(256, ge=1, description="batch size for evaluation and throughput")


class SegmentationRecipe(RecipeBase):
    """task: segmentation: a per-pixel classifier distilled on its logits, one row per pixel (LAD)."""

    task: Literal["segmentation"]
    teacher: SegmentationTeacherConfig = Field(default_factory=SegmentationTeacherConfig,
                                               description="the teacher model")
    student: SegmentationStudentConfig = Field(description="how the student is built")
    data: SegmentationData
    eval: SegmentationEvalConfig = Field(default_factory=SegmentationEvalConfig)

    def check(self) -> None:
        self.check_loss()
        if self.teacher.factory is None:
            raise ValueError("teacher.factory: the segmentation task takes a factory teacher (e.g. "
                             "potstill.teachers.lad:load_lad_teacher), not teacher.path")
        if self.data.prune is not None:
            raise ValueError("data.prune is not read by the segmentation task; draw fewer images with "
                             "data.train.limit")
        if self.student.init not in ("factory", "pretrained"):
            raise ValueError(f"student.init: the segmentation task builds students with init factory or "
                             f"pretrained (a saved factory student), got {self.student.init!r}")
