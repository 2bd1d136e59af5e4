"""Path fields of a recipe: relative paths mean "next to the recipe file", whatever the working directory.

`RelPath` (a data file, a cache folder, a weights file) and `ModelPath` (a model or tokenizer folder, which may
also be a Hugging Face id) are `str` fields marked with `RecipeRelative`. `load_recipe` validates with the
recipe's folder in the validation context; each marked value is then resolved once, at load time:

- `builtin:<name>` and absolute paths stay as they are;
- a path that exists under the recipe's folder becomes that absolute path;
- else, a path that exists under the working directory becomes that absolute path (a `--set` typed in a shell);
- else a `RelPath` becomes the path under the recipe's folder (a file reported missing there, a cache folder
  created there), a `ModelPath` stays as given (a hub id such as `sentence-transformers/all-MiniLM-L6-v2`), and
  a `DataPath` stays as given when it is shaped like a dataset id (`org/name`, no file suffix; `potstill.hub`).

Validated without a folder (`validate_recipe(raw)`, or an assignment), values are left as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import GetCoreSchemaHandler, ValidationInfo
from pydantic_core import core_schema

from potstill.hub import looks_like_hub_id

# key of the validation context holding the recipe's folder
RECIPE_DIR = "recipe_dir"


def resolve_path(value: str, recipe_dir: Path, *, hub_id: bool = False, dataset_id: bool = False) -> str:
    """`value` resolved against `recipe_dir` by the rules of the module docstring."""
    if value.startswith("builtin:") or Path(value).is_absolute():
        return value
    under_recipe = recipe_dir / value
    if under_recipe.exists():
        return str(under_recipe)
    if Path(value).exists():
        return str(Path(value).resolve())
    if hub_id or (dataset_id and looks_like_hub_id(value, dataset=True)):
        return value
    return str(under_recipe)


@dataclass(frozen=True)
class RecipeRelative:
    """Marks a `str` field as a path relative to the recipe file (see the module docstring)."""

    hub_id: bool = False  # the value may also name a Hugging Face model: leave it as given unless it exists
    dataset_id: bool = False  # the value may name a Hugging Face dataset: as given when shaped like an id

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.with_info_after_validator_function(self._resolve, handler(source))

    def _resolve(self, value: str, info: ValidationInfo) -> str:
        recipe_dir = (info.context or {}).get(RECIPE_DIR)
        return resolve_path(value, Path(recipe_dir), hub_id=self.hub_id,
                                                     dataset_id=self.dataset_id) if recipe_dir is not None else value


RelPath = Annotated[str, RecipeRelative()]
"""A file or folder path, relative to the recipe's folder (or `builtin:<name>`, or absolute)."""

ModelPath = Annotated[str, RecipeRelative(hub_id=True)]
"""A model or tokenizer folder relative to the recipe's folder, or a Hugging Face id, or `builtin:<name>`."""

DataPath = Annotated[str, RecipeRelative(dataset_id=True)]
"""A data file or `datasets` folder relative to the recipe's folder, or a Hugging Face dataset id, or `builtin:`."""
