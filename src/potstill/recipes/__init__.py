"""The recipes shipped with potstill: the YAML files of this folder (and the data some of them read).

`potstill demo` runs `demo`; `potstill run digits` runs a shipped recipe by name; `potstill recipes --copy DEST`
copies them all (with the data some read) into a real folder to edit. This folder is the one source of truth:
`recipes/` at the repository root is only a link here, and `cp -r recipes` would copy the link, not the files.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from potstill.errors import UserError


def packaged_recipes() -> list[str]:
    """Names of the shipped recipes (`demo`, `digits`, ...), sorted."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(__name__).iterdir()
                  if p.name.endswith(".yaml"))


def packaged_recipe(name: str) -> Path:
    """Path of a recipe shipped with potstill (`demo`, `digits`)."""
    path = Path(str(resources.files(__name__) / f"{name}.yaml"))
    if not path.is_file():
        raise UserError(f"no packaged recipe named {name!r}; shipped: {', '.join(packaged_recipes())}")
    return path


def resolve_recipe(argument: str | Path) -> Path:
    """The recipe file a command line names: the path itself when it exists, else a shipped recipe of that bare
    name (`digits`, or `digits.yaml`); a missing file that is not a shipped name is left to the loader's error."""
    path = Path(argument)
    name = path.name.removesuffix(".yaml")
    if path.exists() or len(path.parts) != 1 or name not in packaged_recipes():
        return path
    return packaged_recipe(name)


def copy_recipes(dest: str | Path) -> list[Path]:
    """Copy every shipped recipe and the data folders they read into `dest` (created; existing files are refused,
    so that nothing edited is overwritten); returns the recipe files written."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"--copy: {dest} is a file; give a folder")
    source = resources.files(__name__)
    entries = [p for p in source.iterdir() if p.name.endswith(".yaml") or
               (p.is_dir() and not p.name.startswith(("_", ".")))]
    clashes = [p.name for p in entries if (dest / p.name).exists()]
    if clashes:
        raise UserError(f"--copy: {dest} already holds {', '.join(sorted(clashes))}; give a new or empty folder")
    dest.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        with resources.as_file(entry) as real:
            if real.is_dir():
                shutil.copytree(real, dest / entry.name)
            else:
                shutil.copyfile(real, dest / entry.name)
    return sorted(dest / p.name for p in entries if p.name.endswith(".yaml"))
