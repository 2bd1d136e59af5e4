"""The recipe schema: one YAML file = one distillation run, validated by pydantic.

A recipe is the model of its `task` (`Recipe`, a discriminated union): each task's recipe has only the fields
that task reads, so a field of another task is an unknown key, and the message says which task has it. Every
field is documented in the models; unknown keys get a "did you mean" hint, and every error names the recipe
file, the line and the field path.

- `common`: the sections every task has (data, teacher, student, objectives, trainer, eval) and `RecipeBase`;
- `tasks`: classification, embedding, vision and ranking recipes; `generative`: causal_lm and seq2seq;
    `images`: image_classification (image sources, transforms, SSLD's pool); `graph`: graph (GNN → MLP);
    `judge`: judge (Self-J's score head on a frozen LM);
    `segmentation`: segmentation (image + mask sources, builtin:shapes' settings, LAD's label noise);
    `continual`: `task: continual` (a class-incremental stream with no replay: PRD, LwF, fine-tuning; not a
    teacher → student run);
- `paths`: `RelPath` / `ModelPath` / `DataPath`, path fields resolved against the recipe's folder at load time;
- `loading`: load / validate / dump recipes, `--set` overrides, `recipe_changes`; `messages`: error text.
"""

from __future__ import annotations

from potstill.config.common import (
    DISTILLATION_TASKS,
    TASKS,
    DataConfig,
    DataSource,
    DomainsConfig,
    DomainWeightedData,
    EvalConfig,
    ObjectiveConfig,
    PruneConfig,
    RecipeBase,
    StudentConfig,
    TeacherConfig,
    TrainerConfig,
)
from potstill.config.continual import ContinualRecipe, ContinualSettings
from potstill.config.generative import (
    CausalLMData,
    CausalLMRecipe,
    CausalLMTeacherConfig,
    CausalLMTrainerConfig,
    EndpointConfig,
    GenerationConfig,
    Seq2SeqData,
    Seq2SeqRecipe,
    Seq2SeqTeacherConfig,
    StepByStepConfig,
    TextTeacherConfig,
)
from potstill.config.graph import GraphData, GraphRecipe, GraphSource
from potstill.config.images import (
    ImageClassificationRecipe,
    ImageData,
    ImageSource,
    SSLDConfig,
    TransformsConfig,
)
from potstill.config.judge import JudgeData, JudgeRecipe
from potstill.config.loading import (
    RESUMABLE_CHANGES,
    apply_overrides,
    dump_recipe,
    load_recipe,
    load_saved_recipe,
    recipe_changes,
    validate_recipe,
)
from potstill.config.messages import format_validation_error
from potstill.config.paths import DataPath, ModelPath, RecipeRelative, RelPath
from potstill.config.recipe import RECIPE_OF_TASK, AnyRecipe, Recipe, distillation_recipe
from potstill.config.segmentation import (
    LabelNoiseConfig,
    SegmentationData,
    SegmentationRecipe,
    SegmentationSource,
    ShapesSettings,
)
from potstill.config.tasks import (
    ClassificationRecipe,
    EmbeddingEvalConfig,
    EmbeddingRecipe,
    EmbeddingStudentConfig,
    MaskedLMRecipe,
    MaskingConfig,
    RankingConfig,
    RankingData,
    RankingRecipe,
    VisionRecipe,
)

__all__ = [
    "AnyRecipe", "CausalLMData", "CausalLMRecipe", "CausalLMTeacherConfig", "CausalLMTrainerConfig",
    "ClassificationRecipe", "ContinualRecipe", "ContinualSettings", "DISTILLATION_TASKS", "DataConfig", "DataPath",
    "DataSource", "DomainWeightedData", "DomainsConfig", "EmbeddingEvalConfig", "EmbeddingRecipe",
    "EmbeddingStudentConfig", "EndpointConfig", "EvalConfig", "GenerationConfig", "GraphData", "GraphRecipe",
    "JudgeData", "JudgeRecipe",
    "GraphSource", "ImageClassificationRecipe", "ImageData", "ImageSource", "LabelNoiseConfig", "MaskedLMRecipe",
    "MaskingConfig", "ModelPath", "ObjectiveConfig", "PruneConfig", "RECIPE_OF_TASK", "RESUMABLE_CHANGES",
    "RankingConfig", "RankingData", "RankingRecipe", "Recipe", "RecipeBase", "RecipeRelative", "RelPath",
    "SSLDConfig", "SegmentationData", "SegmentationRecipe", "SegmentationSource", "Seq2SeqData", "Seq2SeqRecipe",
    "Seq2SeqTeacherConfig", "ShapesSettings", "StepByStepConfig", "StudentConfig", "TASKS", "TeacherConfig",
    "TextTeacherConfig", "TrainerConfig", "TransformsConfig", "VisionRecipe", "apply_overrides",
    "distillation_recipe", "dump_recipe", "format_validation_error", "load_recipe", "load_saved_recipe",
    "recipe_changes", "validate_recipe",
]
