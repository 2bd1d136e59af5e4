"""The recipe of `task: image_classification`: image sources, tensor transforms and SSLD's unlabelled pool.

Image files are not records of text or feature vectors, so this task's data sections take `ImageSource`s
(IDX, `.npz`, image folders, `datasets` folders, `builtin:mnist-5k` / `builtin:fashion-mnist` /
`builtin:opencv-digits`; read by `potstill.data.images`) and a `transforms` section (`potstill.data.image_transforms`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, model_validator

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


class ImageSource(DataSource):
    """Where images come from, and optionally a seeded share of them (stratified by label when labels exist)."""

    path: RelPath = Field(description="an IDX file (.gz ok; labels from `labels`, else the sibling *labels-idx1* "
                          "file), an .npz (arrays x and optional y), an image folder (one subfolder per class), a "
                          "`datasets` folder (columns image, label), or builtin:mnist-5k / builtin:fashion-mnist / "
                          "builtin:opencv-digits (splits train / test)")
    labels: RelPath | None = Field(None, description="IDX labels file for an IDX images file")
    fraction: float | None = Field(None, gt=0, le=1, description="keep this share of the images, per class when "
                                   "labelled (seeded by subset_seed), e.g. 0.1 for the labelled 10 %")
    rest: StrictBool = Field(False, description="with fraction: keep the images the fraction leaves out instead "
                             "(the same subset_seed gives the complement, e.g. the unlabelled 90 %)")
    subset_seed: int = Field(0, ge=0, description="seed of the fraction's draw")
    drop_labels: StrictBool = Field(False, description="forget the labels (an unlabelled pool)")

    @model_validator(mode="after")
    def _rest_needs_fraction(self) -> ImageSource:
        if self.rest and self.fraction is None:
            raise ValueError("rest keeps what `fraction` leaves out: give fraction too")
        return self


class TransformsConfig(Strict):
    """Tensor transforms (potstill.data.image_transforms; torchvision.transforms.v2 is used for resizing when it
    imports). Order: pixels to [0, 1], resize, training augmentation, normalize."""

    resize: int | None = Field(None, ge=1, description="resize images to this square size (bilinear, antialiased)")
    channels: int | None = Field(None, ge=1, description="repeat a 1-channel image to this many channels (e.g. 3 "
                                 "for an RGB model on grey digits)")
    mean: list[float] | None = Field(None, description="per-channel mean subtracted (after scaling to [0, 1])")
    std: list[float] | None = Field(None, description="per-channel std divided by")
    random_crop_padding: int = Field(0, ge=0, description="training: pad by this many zero pixels, crop back at "
                                     "a random offset (0 = off)")
    horizontal_flip: StrictBool = Field(False, description="training: flip each image left-right with "
                                        "probability 0.5 (not for digits)")
    mixup_alpha: float = Field(0.0, ge=0, description="training: blend each image with a random partner of its "
                               "micro-batch, λ ~ Beta(α, α) per image (mixup; 0 = off); the teacher scores the "
                               "blended image, the label loss becomes λ·CE(y) + (1 − λ)·CE(y_partner)")

    @model_validator(mode="after")
    def _mean_with_std(self) -> TransformsConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("transforms.mean and transforms.std go together")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std):
                raise ValueError(f"transforms.mean has {len(self.mean)} values, std {len(self.std)}")
            if any(s <= 0 for s in self.std):
                raise ValueError("transforms.std values must be > 0")
        return self

    @property
    def augments(self) -> bool:
        return self.random_crop_padding > 0 or self.horizontal_flip or self.mixup_alpha > 0


class SSLDConfig(Strict):
    """SSLD's unlabelled pool (Cui et al. 2021): per class (the teacher's top-1), the pool images the teacher is
    most confident on join data.train without labels; exact duplicates of data.eval images are dropped first."""

    pool: ImageSource = Field(description="the unlabelled images (labels, if any, are ignored)")
    per_class: int = Field(ge=1, description="images kept per teacher-predicted class (the paper's top-k per "
                           "class; fewer when a class has fewer)")
    min_confidence: float = Field(0.0, ge=0, lt=1, description="also drop images whose top-1 teacher probability "
                                  "is below this")
    dedupe: StrictBool = Field(True, description="drop pool images that equal a data.eval image byte for byte")


class ImageData(NoDomains, DataConfig):
    """The image_classification task's data."""

    train: ImageSource = Field(description="training images (labels optional: pure distillation)")
    eval: ImageSource | None = Field(None, description="held-out labelled images")
    transforms: TransformsConfig = Field(default_factory=TransformsConfig, description="tensor transforms")
    ssld: SSLDConfig | None = Field(None, description="SSLD: add the teacher's most confident images of an "
                                    "unlabelled pool to data.train (potstill.data.ssld)")


class ImageTeacherConfig(NoTopKCache, TeacherConfig):
    """An image teacher: a Hugging Face image classifier folder (teacher.path) or a factory (`module:callable`,
    e.g. potstill.assets_image:mnist_cnn, or timm:create_model with kwargs when timm is installed)."""

    cache_logits: StrictBool = Field(True, description="compute the teacher's logits on the training images once "
                                     "(<run>/teacher_cache/); off, or with training augmentation, or with "
                                     "objectives on internals, the teacher runs on every batch")


class ImageStudentConfig(StudentConfig):
    """An image student; init pretrained also takes a potstill factory-student folder (a run's student/)."""

    path: ModelPath | None = Field(None, description="init pretrained: a Hugging Face image classifier folder, or "
                                   "a saved factory student (a run's student/ folder with potstill_student.json)")


class ImageEvalConfig(EvalConfig):
    batch_size: int = Field(256, ge=1, description="batch size for evaluation, teacher caching and throughput")


class ImageClassificationRecipe(RecipeBase):
    """task: image_classification: an image classifier distilled on its logits (and internals, for Hugging
    Face models)."""

    task: Literal["image_classification"]
    teacher: ImageTeacherConfig = Field(default_factory=ImageTeacherConfig, description="the teacher model")
    student: ImageStudentConfig = Field(description="how the student is built")
    data: ImageData
    eval: ImageEvalConfig = Field(default_factory=ImageEvalConfig)

    def check(self) -> None:
        self.check_loss()
        self.check_teacher()
        if self.data.prune is not None:
            raise ValueError("data.prune is not read by the image_classification task; keep a share of the images "
                             "with data.train.fraction")
        if self.student.init == "pruned":
            raise ValueError("student.init pruned is for the embedding and causal_lm tasks; image students: "
                             "factory, from_config, layers_from_teacher or pretrained")
