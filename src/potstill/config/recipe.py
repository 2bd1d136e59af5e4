"""`Recipe`: one of the task recipes, chosen by the recipe's `task` key (a pydantic discriminated union)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, TypeAdapter

from potstill.config.common import TASKS, RecipeBase
from potstill.config.generative import CausalLMRecipe, Seq2SeqRecipe
from potstill.config.graph import GraphRecipe
from potstill.config.images import ImageClassificationRecipe
from potstill.config.tasks import (
    ClassificationRecipe,
    EmbeddingRecipe,
    MaskedLMRecipe,
    RankingRecipe,
    VisionRecipe,
)
from potstill.config.vision_language import VisionLanguageRecipe

Recipe = Annotated[
    ClassificationRecipe | EmbeddingRecipe | CausalLMRecipe | VisionRecipe | RankingRecipe | Seq2SeqRecipe
    | ImageClassificationRecipe | VisionLanguageRecipe | MaskedLMRecipe | GraphRecipe,
    Field(discriminator="task"),
]
"""A whole run. See recipes/*.yaml for examples and `potstill run --help`."""

RECIPE_OF_TASK: dict[str, type[RecipeBase]] = {
    "classification": ClassificationRecipe, "embedding": EmbeddingRecipe, "causal_lm": CausalLMRecipe,
    "vision": VisionRecipe, "ranking": RankingRecipe, "seq2seq": Seq2SeqRecipe,
    "image_classification": ImageClassificationRecipe, "vision_language": VisionLanguageRecipe,
    "masked_lm": MaskedLMRecipe, "graph": GraphRecipe,
}
assert tuple(RECIPE_OF_TASK) == TASKS

RECIPE_ADAPTER: TypeAdapter[Recipe] = TypeAdapter(Recipe)
