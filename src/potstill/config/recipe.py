"""`Recipe`: one of the task recipes, chosen by the recipe's `task` key (a pydantic discriminated union).

`Recipe` is a distillation recipe (a teacher, a student, objectives: `RecipeBase`'s subclasses); `AnyRecipe` adds
`task: continual` (`potstill.config.continual`), which `potstill run` hands to its own driver. Loading a recipe
gives `AnyRecipe`; commands that need a teacher and a student refuse the rest (`distillation_recipe`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, TypeAdapter

from potstill.config.common import TASKS
from potstill.config.continual import ContinualRecipe
from potstill.config.generative import CausalLMRecipe, Seq2SeqRecipe
from potstill.config.graph import GraphRecipe
from potstill.config.images import ImageClassificationRecipe
from potstill.config.judge import JudgeRecipe
from potstill.config.segmentation import SegmentationRecipe
from potstill.config.tasks import (
    ClassificationRecipe,
    EmbeddingRecipe,
    MaskedLMRecipe,
    RankingRecipe,
    VisionRecipe,
)
from potstill.config.vision_language import VisionLanguageRecipe
from potstill.errors import UserError

DistillationRecipes = (
    ClassificationRecipe | EmbeddingRecipe | CausalLMRecipe | VisionRecipe | RankingRecipe | Seq2SeqRecipe
    | ImageClassificationRecipe | VisionLanguageRecipe | MaskedLMRecipe | SegmentationRecipe | GraphRecipe
    | JudgeRecipe
)

Recipe = Annotated[DistillationRecipes, Field(discriminator="task")]
"""A whole distillation run. See recipes/*.yaml for examples and `potstill run --help`."""

AnyRecipe = Annotated[DistillationRecipes | ContinualRecipe, Field(discriminator="task")]
"""Any recipe `potstill run` takes: a distillation `Recipe` or a continual-learning stream."""

RECIPE_OF_TASK: dict[str, type[BaseModel]] = {
    "classification": ClassificationRecipe, "embedding": EmbeddingRecipe, "causal_lm": CausalLMRecipe,
    "vision": VisionRecipe, "ranking": RankingRecipe, "seq2seq": Seq2SeqRecipe,
    "image_classification": ImageClassificationRecipe, "vision_language": VisionLanguageRecipe,
    "masked_lm": MaskedLMRecipe, "segmentation": SegmentationRecipe, "graph": GraphRecipe,
    "judge": JudgeRecipe, "continual": ContinualRecipe,
}
assert tuple(RECIPE_OF_TASK) == TASKS

RECIPE_ADAPTER: TypeAdapter[AnyRecipe] = TypeAdapter(AnyRecipe)


def distillation_recipe(recipe: AnyRecipe, command: str, where: str = "recipe") -> Recipe:
    """`recipe` when it describes a teacher → student run; a `task: continual` recipe is a one-line error for
    `command`, which needs one (`where`: the recipe file, for the message)."""
    if isinstance(recipe, ContinualRecipe):
        raise UserError(f"{where}: field task: {command} needs a distillation recipe (a teacher and a student); a "
                        f"task: continual run is trained and scored by `potstill run` alone (summary.json)")
    return recipe
