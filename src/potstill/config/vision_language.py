"""The recipe of `task: vision_language`: a CLIP-style teacher, an image student scored against the teacher's
class text, and the class names / caption templates of zero-shot classification.

The teacher is a Hugging Face `CLIPModel` / `SiglipModel` (teacher.path), a factory returning a two-tower module
(e.g. the offline LiT teacher, `potstill.teachers.lit:load_lit_teacher`), or only its vectors
(teacher.embeddings, a black-box teacher). The student is a factory image tower that returns vectors in the
teacher's space (e.g. PromptKD's `potstill.students.promptkd:prompted_vit`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool

from potstill.config.common import NoTopKCache, RecipeBase, Strict, StudentConfig, TeacherConfig
from potstill.config.images import ImageData, ImageEvalConfig, TransformsConfig
from potstill.config.paths import RelPath


class VisionLanguageConfig(Strict):
    """Zero-shot classification: each class's captions (templates filled with its name) embedded by the
    teacher's text tower once, prompt-ensembled (potstill.eval.zero_shot)."""

    class_names: list[str] | str = Field("builtin:digits", description="the class names in label order, or "
                                         "builtin:digits / builtin:fashion (with their default templates)")
    templates: list[str] | None = Field(None, description="caption templates with one {} for the class name, e.g. "
                                        "'a photo of the digit {}.'; default: the builtin's, else 'a photo of a {}.'")
    descriptions: list[list[str]] | str | None = Field(None, description="enriched label text (large-VLM OOD "
                                                      "distillation): builtin:digits / builtin:fashion or, per "
                                                      "class, a list of attribute descriptions (equally many); each "
                                                      "caption becomes '<template>, <description>.'")
    scale: float | None = Field(None, gt=0, description="logit scale s of z = s·⟨image, t_c⟩; default: the "
                                "teacher's (CLIP's exp(logit_scale)), 100 for a file of embeddings")
    retrieval: StrictBool = Field(True, description="also report image→text and text→image R@1 / R@5 on data.eval, "
                                  "with every caption of every class as the texts (relevant: the same class)")


class VisionLanguageTeacherConfig(NoTopKCache, TeacherConfig):
    """A CLIP-style teacher: teacher.path (CLIPModel / SiglipModel), teacher.factory (a module with
    encode_images / encode_texts), or teacher.embeddings alone (a black-box teacher)."""

    embeddings: RelPath | None = Field(None, description="an .npz of the teacher's vectors "
                                       "(potstill.teachers.vision_language.read_embedding_file): image_embeddings "
                                       "(row i = data.train image i), class_embeddings (one per class name), "
                                       "optional eval_image_embeddings (data.eval) and logit_scale")


class VisionLanguageStudentConfig(StudentConfig):
    init: Literal["factory"] = Field("factory", description="the student is a factory image tower returning "
                                     "vectors of the teacher's width (e.g. potstill.students.promptkd:prompted_vit)")


class VisionLanguageData(ImageData):
    """Images (as for image_classification), and optionally other transforms for the student."""

    student_transforms: TransformsConfig | None = Field(None, description="the student's transforms when its input "
                                                        "differs from the teacher's (default: data.transforms)")


class VisionLanguageRecipe(RecipeBase):
    """task: vision_language: an image student distilled on a CLIP-style teacher's zero-shot logits (PromptKD)."""

    task: Literal["vision_language"]
    teacher: VisionLanguageTeacherConfig = Field(default_factory=VisionLanguageTeacherConfig,
                                                 description="the teacher")
    student: VisionLanguageStudentConfig = Field(description="how the student is built")
    data: VisionLanguageData
    vision_language: VisionLanguageConfig = Field(default_factory=VisionLanguageConfig,
                                                  description="class names, caption templates, logit scale")
    eval: ImageEvalConfig = Field(default_factory=ImageEvalConfig)

    def check(self) -> None:
        self.check_loss()
        if not self.has_teacher_model() and self.teacher.embeddings is None:
            raise ValueError("give teacher.path (CLIPModel / SiglipModel), teacher.factory, or teacher.embeddings")
        if self.teacher.embeddings is not None and self.has_teacher_model():
            raise ValueError("teacher.embeddings is a black-box teacher: give it without teacher.path / factory")
        if self.student.factory is None:
            raise ValueError("student.factory: the vision_language student is a factory image tower")
        if self.data.prune is not None:
            raise ValueError("data.prune is not read by the vision_language task; keep a share of the images "
                             "with data.train.fraction")
        if self.data.ssld is not None:
            raise ValueError("data.ssld is for task image_classification")
