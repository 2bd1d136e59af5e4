"""Save students so they load without potstill: a Hugging Face folder or a sentence-transformers one."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from potstill.errors import did_you_mean
from potstill.io import atomic_dir, safetensors_state

POOLING_MODES = ("mean", "cls", "max", "lasttoken")


def _base_model(model: Any) -> Any:
    """The bare encoder of a task model (BertForMaskedLM -> BertModel); the model itself otherwise."""
    base = getattr(model, "base_model", None)
    return base if base is not None else model


def save_factory_student(model: Any, path: str | os.PathLike, *, factory: str | None, kwargs: dict[str, Any],
                         tokenizer: Any = None, extra: dict[str, Any] | None = None) -> Path:
    """Save a plain torch student (made by a `factory`): `model.safetensors`, the tokenizer if any, and
    `potstill_student.json` saying how to rebuild the module. Written atomically."""
    from safetensors.torch import save_file

    from potstill.io import atomic_write_json

    with atomic_dir(path) as tmp:
        save_file(safetensors_state(model.state_dict()), str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "potstill_student.json", {"factory": factory, "kwargs": kwargs, **(extra or {})})
    return Path(path)


def built_with(student: Any) -> tuple[str | None, dict[str, Any]]:
    """(factory, kwargs) that a recipe's factory student (`student` section) is rebuilt with: its own, or for
    `init: pretrained` on a saved factory student the ones saved there (a student trained further keeps them)."""
    if student.init == "pretrained":
        spec = json.loads((Path(student.path) / "potstill_student.json").read_text())
        return spec["factory"], spec.get("kwargs", {})
    return student.factory, student.kwargs


def load_factory_student(path: str | os.PathLike) -> Any:
    """A student written by `save_factory_student`, rebuilt: its factory called with the saved kwargs, then the
    saved weights loaded (strictly). Needs the factory's module importable; an ONNX export (`potstill export`)
    needs nothing of potstill."""
    from safetensors.torch import load_file

    from potstill.errors import UserError
    from potstill.teachers.live import load_callable

    folder = Path(path)
    spec_file = folder / "potstill_student.json"
    if not spec_file.is_file():
        raise UserError(f"{folder}: not a saved factory student (expected potstill_student.json inside)")
    spec = json.loads(spec_file.read_text())
    if not spec.get("factory"):
        raise UserError(f"{spec_file}: names no factory to rebuild the student with")
    model = load_callable(spec["factory"], field=f"{spec_file}: factory")(**spec.get("kwargs", {}))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model


def save_hf_student(model: Any, tokenizer: Any, path: str | os.PathLike) -> Path:
    """`save_pretrained` the model (safetensors) and the tokenizer into `path`, replacing it atomically.

    The folder loads with ``AutoModel*.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``.
    `tokenizer` may be None.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def _st_modules():
    try:  # sentence-transformers >= 5.4 / 6.x
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # older releases
        from sentence_transformers.models import Normalize, Pooling, Transformer
    return Transformer, Pooling, Normalize


def normalizes_embeddings(folder: str | os.PathLike | None) -> bool:
    """Whether a sentence-transformers folder ends its pipeline with a `Normalize` module (unit-length vectors),
    read from its modules.json; False for a plain transformers folder or None."""
    if folder is None:
        return False
    modules = Path(folder) / "modules.json"
    try:
        entries = json.loads(modules.read_text())
    except (OSError, ValueError):
        return False
    return any(str(entry.get("type", "")).endswith("Normalize") for entry in entries if isinstance(entry, dict))


def save_sentence_transformer(
    model: Any,
    tokenizer: Any,
    path: str | os.PathLike,
    *,
    pooling: str = "mean",
    normalize: bool = False,
    max_seq_length: int | None = None,
    query_model: Any = None,
) -> Path:
    """Write a full sentence-transformers folder (Transformer + Pooling (+ Normalize)) to `path` atomically.

    ``SentenceTransformer(str(path))`` loads it without potstill and its embeddings are the `pooling` of the
    encoder's last hidden states ("mean": average over attention-mask tokens; "cls": the first token),
    L2-normalised when `normalize`. A task model (e.g. ``BertForMaskedLM``) is saved as its bare encoder.
    A tokenizer without a pad token gets its EOS token as pad token (in the saved copy only).
    With `query_model` (a bi-encoder with separate towers) the folder holds a `Router`: `encode_query` runs
    `query_model`, `encode_document` (and plain `encode`) runs `model`, each with the same pooling.
    """
    if pooling not in POOLING_MODES:
        raise ValueError(
            f"unknown pooling {pooling!r}{did_you_mean(str(pooling), POOLING_MODES)}; "
            f"choose one of {', '.join(POOLING_MODES)}"
        )
    if tokenizer is None:
        raise ValueError("save_sentence_transformer needs the tokenizer")
    from sentence_transformers import SentenceTransformer

    Transformer, Pooling, Normalize = _st_modules()
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def stack(encoder: Any, staging: str) -> list[Any]:
        encoder = _base_model(encoder)
        encoder.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        transformer = Transformer(staging, max_seq_length=max_seq_length)
        dim = getattr(encoder.config, "hidden_size", None)
        if dim is None:
            dim = transformer.get_embedding_dimension()
        return [transformer, Pooling(dim, pooling_mode=pooling), *([Normalize()] if normalize else [])]

    with tempfile.TemporaryDirectory(prefix=f".{path.name}.hf.", suffix=".tmp", dir=path.parent) as staging:
        modules = stack(model, str(Path(staging) / "document"))
        if query_model is not None:
            try:  # sentence-transformers >= 5.4 / 6.x; Router exists from 5.0
                from sentence_transformers.sentence_transformer.modules import Router
            except ImportError:
                from sentence_transformers.models import Router

            modules = [Router.for_query_document(query_modules=stack(query_model, str(Path(staging) / "query")),
                                                 document_modules=modules)]
        st_model = SentenceTransformer(modules=modules, device="cpu")
        with atomic_dir(path) as tmp:
            st_model.save(str(tmp), create_model_card=False)
    return path
