"""Teachers: where the signals come from. A live teacher is frozen, in eval mode, and runs under
`torch.inference_mode`."""

from potstill.teachers.live import call_factory, freeze, load_callable, teacher_outputs

_LAZY = {
    **{name: "potstill.teachers.endpoint" for name in ("EndpointTeacher", "Completion", "EndpointError",
                                                        "TokenLogprob")},
    "ResponseCache": "potstill.teachers.response_cache",
    "TopKCache": "potstill.teachers.cache",
    "TopKCacheWriter": "potstill.teachers.cache_writer",
}

__all__ = ["call_factory", "freeze", "load_callable", "teacher_outputs", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
