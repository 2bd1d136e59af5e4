"""A live teacher: any `torch.nn.Module`, frozen and run without autograd."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from potstill.errors import UserError, did_you_mean

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def freeze(model: ModuleT) -> ModuleT:
    """Put `model` in eval mode with every parameter's `requires_grad` off."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_outputs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `fn` under `torch.inference_mode` and return its outputs as they are (no copy).

    Inference tensors cannot be saved for backward; potstill's losses never save the teacher's tensors
    themselves (only values derived from them, or constants kept outside autograd), so the teacher's outputs
    feed them directly. A test runs every objective of the catalogue on an inference-mode teacher.
    """
    with torch.inference_mode():
        return fn(*args, **kwargs)


def load_callable(spec: str, *, field: str) -> Callable[..., Any]:
    """Import `'package.module:function'`; errors name the recipe field."""
    if ":" not in spec:
        raise UserError(f"field {field}: expected 'module:function', got {spec!r}")
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"field {field}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"field {field}: module {module_name!r} has no callable {attr!r}")
    return fn


_SIMPLE_TYPES: dict[Any, tuple[type, ...]] = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], *, field: str, spec: str) -> None:
    """`kwargs` against `fn`'s signature: an unknown name (did-you-mean) or a value whose type differs from a
    plain int / float / bool / str annotation is a UserError naming `field` (e.g. student.kwargs)."""
    import inspect
    import typing

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return  # a builtin without a signature: let the call decide
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for key in kwargs:
            if key not in names:
                raise UserError(f"field {field}.{key}: {spec} takes no argument {key!r}{did_you_mean(key, names)}; "
                                f"it takes {', '.join(names) or 'none'}")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: no type check
        hints = {}
    for key, value in kwargs.items():
        allowed = _SIMPLE_TYPES.get(hints.get(key))
        if allowed and (not isinstance(value, allowed) or (bool not in allowed and isinstance(value, bool))):
            raise UserError(f"field {field}.{key}: {spec} expects {hints[key].__name__}, got {value!r}")


def call_factory(spec: str, kwargs: dict[str, Any], *, field: str) -> Any:
    """`spec(**kwargs)` for the recipe field `field` (e.g. teacher.factory, whose kwargs are teacher.kwargs):
    the keyword arguments are checked against the callable's signature first, and a TypeError or ValueError of
    the call is reported as the user's mistake, naming the field."""
    fn = load_callable(spec, field=field)
    kwargs_field = field.rsplit(".", 1)[0] + ".kwargs"
    check_kwargs(fn, kwargs, field=kwargs_field, spec=spec)
    try:
        return fn(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"field {kwargs_field}: {spec}(**{kwargs_field}) failed: {exc}") from None
