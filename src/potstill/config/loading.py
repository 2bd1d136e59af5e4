"""Reading, overriding, validating and saving recipes; comparing two saved recipes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from potstill.config.common import RecipeBase
from potstill.config.continual import ContinualRecipe
from potstill.config.messages import format_validation_error, model_at
from potstill.config.paths import RECIPE_DIR
from potstill.config.recipe import RECIPE_ADAPTER, RECIPE_OF_TASK, AnyRecipe
from potstill.errors import UserError

# Fields a resumed run may change: where it is written, how it is evaluated, logged and checkpointed.
RESUMABLE_CHANGES = ("name", "output_dir", "eval", "trainer.log_every", "trainer.save_every", "trainer.keep_last",
                     "trainer.num_threads", "trainer.fused_lm_head", "trainer.report_to")


def override_path(key: str) -> tuple[str | int, ...]:
    """The field path of an override key: dotted, list items by index (`objectives.0.weight` or
    `objectives[0].weight`)."""
    key = re.sub(r"\[\s*(\d+)\s*\]", r".\1", key.strip())
    return tuple(int(p) if p.isdigit() else p for p in key.split(".") if p != "")


def _merge(old: Any, new: Any) -> Any:
    """`new` merged into `old`: mappings key by key (recursively), anything else replaced."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merge(old.get(k), v) for k, v in new.items()}}
    return new


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b=c` overrides: values parsed as YAML; list items addressed by index (`a.0.b` or `a[0].b`); a
    mapping value is merged into the mapping already there (`--set student.kwargs={hidden: 32}` keeps the other
    kwargs), so `a={x: 1}` and `a.x=1` mean the same; `a=null` clears a field."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trainer.max_steps=200")
        key, value = item.split("=", 1)
        parts = override_path(key)
        if not parts:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trainer.max_steps=200")
        node: Any = raw
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not isinstance(part, int) or part >= len(node):
                    raise UserError(f"--set {key}: {'.'.join(map(str, parts[:i])) or 'recipe'} is a list of "
                                    f"{len(node)} items; {part!r} is not a valid index")
            elif not isinstance(node, dict):
                raise UserError(f"--set {key}: {'.'.join(map(str, parts[:i]))} is not a mapping")
            elif isinstance(part, int):
                part = str(part)  # a mapping key that looks like a number
            if last:
                try:
                    parsed = yaml.safe_load(value)
                except yaml.YAMLError as exc:
                    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                    raise UserError(f"--set {key}: the value {value!r} is not valid YAML ({problem}); quote a "
                                    f"string, e.g. --set '{key}=\"...\"'") from None
                current = node[part] if isinstance(node, list) else node.get(part)
                node[part] = _merge(current, parsed)
            else:
                if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
    return raw


def overridden_fields(overrides: list[str]) -> dict[tuple[str | int, ...], str]:
    """Field path → the `--set` item that gave it (the last one wins), for error messages."""
    return {override_path(item.split("=", 1)[0]): item for item in overrides if "=" in item}


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> AnyRecipe:
    """Read, override and validate a recipe; relative paths in it are relative to its folder (see
    potstill.config.paths). Every problem becomes a `UserError`."""
    path = Path(path)
    raw, root = _read_yaml(path)
    raw = apply_overrides(raw, overrides or [])
    return validate_recipe(raw, source=str(path), root=root, recipe_dir=path.resolve().parent,
                           overridden=overridden_fields(overrides or []))


def validate_recipe(raw: dict, *, source: str = "recipe", root: yaml.Node | None = None,
                    recipe_dir: Path | None = None,
                    overridden: dict[tuple[str | int, ...], str] | None = None) -> AnyRecipe:
    """The recipe `raw` describes; with `recipe_dir`, its relative paths are resolved against that folder. A
    problem in a field that `overridden` (path → `--set` item) gave is blamed on that `--set`, not on the file."""
    try:
        return RECIPE_ADAPTER.validate_python(raw, context={RECIPE_DIR: recipe_dir})
    except ValidationError as err:
        raise UserError(format_validation_error(err, source, root, overridden=overridden)) from None


def _read_yaml(path: Path) -> tuple[dict, yaml.Node | None]:
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    return _parse_yaml(read_utf8(path), str(path))


def read_utf8(path: Path) -> str:
    """The text of `path`; a file that is not UTF-8 is a UserError naming the file and the first bad byte's offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save the "
                        f"file as UTF-8") from None


def _parse_yaml(text: str, source: str) -> tuple[dict, yaml.Node | None]:
    """The recipe mapping of `text` and its YAML node tree (for line numbers); errors name `source`."""
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{where}: not valid YAML ({problem})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a recipe must be a YAML mapping (key: value lines), got {type(raw).__name__}")
    _refuse_duplicate_keys(root, source)
    return raw, root


def _refuse_duplicate_keys(node: yaml.Node | None, source: str) -> None:
    """A key given twice in one mapping is an error (YAML loaders keep the last one silently)."""
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                line = key.start_mark.line + 1
                if isinstance(key, yaml.ScalarNode) and key.value in first:
                    raise UserError(f"{source}, line {line}: duplicate key {key.value!r} (first given at line "
                                    f"{first[key.value]}); give each key once")
                if isinstance(key, yaml.ScalarNode):
                    first[key.value] = line
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def dump_recipe(recipe: RecipeBase | ContinualRecipe) -> str:
    """The recipe as YAML: `name`, `task` and the fields that were set (given, overridden or assigned), not every
    default. Paths are as resolved at load time (absolute when they were relative to the recipe), so the text
    loads back, from any folder, into an equal recipe."""
    explicit = _set_fields(recipe, recipe.model_dump(mode="json"))
    ordered = {"name": recipe.name, "task": recipe.task}
    return yaml.safe_dump({**ordered, **explicit}, sort_keys=False)


def _set_fields(model: BaseModel, dumped: dict) -> dict:
    """The part of `dumped` (the JSON dump of `model`) that was set: a section counts when it was given or any of
    its fields was set since (an assignment to a default section)."""
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value, given = getattr(model, name), name in model.model_fields_set
        if isinstance(value, BaseModel):
            inner = _set_fields(value, dumped[name])
            if given or inner:
                out[name] = inner
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            items = [_set_fields(v, d) for v, d in zip(value, dumped[name], strict=True)]
            if given or any(items):
                out[name] = items
        elif given:
            out[name] = dumped[name]
    return out


def load_saved_recipe(path: str | Path) -> AnyRecipe:
    """A run folder's recipe.yaml, also one saved before recipes were per task (which holds every field of every
    task: those of other tasks are dropped when they hold their default)."""
    path = Path(path)
    raw, root = _read_yaml(path)
    return validate_recipe(without_foreign_defaults(raw), source=str(path), root=root, recipe_dir=path.parent)


def without_foreign_defaults(raw: dict) -> dict:
    """`raw` without the keys its task's recipe lacks whose value is another task's default for that key."""
    model = RECIPE_OF_TASK.get(raw.get("task"))  # type: ignore[arg-type]
    return _drop_foreign(raw, model, ()) if model is not None else raw


def _drop_foreign(raw: dict, recipe: Any, loc: tuple) -> dict:
    fields = getattr(model_at(recipe, loc), "model_fields", {})
    out = {}
    for key, value in raw.items():
        if key not in fields and _default_elsewhere((*loc, key), value):
            continue
        section = key in fields and isinstance(value, dict) and model_at(recipe, (*loc, key)) is not None
        out[key] = _drop_foreign(value, recipe, (*loc, key)) if section else value
    return out


def _default_elsewhere(loc: tuple, value: Any) -> bool:
    """Whether some task's recipe has the field at `loc` with default `value`."""
    for recipe in RECIPE_OF_TASK.values():
        parent = model_at(recipe, loc[:-1])
        field = getattr(parent, "model_fields", {}).get(loc[-1])
        if field is not None and not field.is_required():
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            if default == value or (isinstance(default, tuple) and list(default) == value):
                return True
    return False


def recipe_changes(old_yaml: str, new_yaml: str) -> list[str]:
    """Dotted names of the fields whose values differ between two saved recipes (defaults filled in), leaving out
    the ones a resumed run may change (RESUMABLE_CHANGES). The old text may come from an older potstill."""
    old = _validated(old_yaml, "the run's recipe.yaml")
    new = _validated(new_yaml, "the recipe")
    if old.task != new.task:
        return ["task"]
    changed = _differences(old.model_dump(mode="json"), new.model_dump(mode="json"), ())
    return [name for name in changed
            if not any(name == skip or name.startswith(skip + ".") for skip in RESUMABLE_CHANGES)]


def _validated(text: str, source: str) -> AnyRecipe:
    raw, root = _parse_yaml(text, source)
    return validate_recipe(without_foreign_defaults(raw), source=source, root=root)


def _differences(old: Any, new: Any, loc: tuple) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [*old, *(k for k in new if k not in old)]
        return [name for k in keys for name in _differences(old.get(k), new.get(k), (*loc, k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [name for i, (a, b) in enumerate(zip(old, new, strict=True)) for name in _differences(a, b, (*loc, i))]
    return [] if old == new else [".".join(str(p) for p in loc)]
