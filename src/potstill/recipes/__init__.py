"""The recipes shipped with potstill: the YAML files of this folder (and the data some of them read).

`potstill demo` runs `demo`; the others are examples to copy (`recipes/` at the repository root is a link here).
"""

from __future__ import annotations

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
