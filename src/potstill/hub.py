"""Hugging Face Hub ids in recipe fields: `teacher.path: org/name`, `student.path`, `data.train: org/name`.

A model or data field that names no local file or folder, and is shaped like a Hub id (`name` or `org/name`:
letters, digits, `-`, `_`, `.`; no file suffix for data), is read through the Hugging Face cache, the way
transformers and datasets users expect:

- a model id becomes the folder of its cached snapshot (`huggingface_hub.snapshot_download`: the cache is
  looked at first, without a request; when the id is not there and the Hub can be reached, the PyTorch files of
  the repository are downloaded into the cache). Every loader then reads a plain folder;
- a dataset id is opened with `datasets.load_dataset` (its own cache, online or offline); offline, a dataset
  repository already in the hub cache (`datasets--org--name/snapshots/...`) is read from there.

Offline (`HF_HUB_OFFLINE=1`) or without a network, an id that is not cached is a `UserError` of one line naming
the field, the id and why nothing could be fetched. The caches are where huggingface_hub and datasets keep them
(`HF_HUB_CACHE`, `HF_HOME`, `HF_DATASETS_CACHE`), read when the id is resolved.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from potstill.errors import UserError, one_line

__all__ = ["hub_cache_dir", "is_offline", "load_hub_dataset", "looks_like_hub_id", "model_folder"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# Data file suffixes: `data.train: train.jsonl` is a missing file, never a dataset id.
_DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt", ".arrow")
# Weights in other frameworks' formats are not fetched for a PyTorch model.
_NOT_PYTORCH = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.mlmodel", "onnx/*",
                "openvino/*", "coreml/*", "tf_model*", "flax_model*", "rust_model*"]
_TRUE = {"1", "on", "yes", "true"}


def looks_like_hub_id(value: str, *, dataset: bool = False) -> bool:
    """True when `value` is shaped like a Hub repository id (`name` or `org/name`); for a `dataset` field, a
    value ending in a data-file suffix is a file name, not an id."""
    if not _HUB_ID.fullmatch(value) or ".." in value or value.endswith("."):
        return False
    return not (dataset and value.lower().endswith(_DATA_SUFFIXES))


def is_offline() -> bool:
    """Whether the Hub must not be contacted: `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE` / `HF_DATASETS_OFFLINE`)
    set now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    env = (os.environ.get(name, "").strip().lower()
           for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(v in _TRUE for v in env) or bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The hub cache folder: `HF_HUB_CACHE` as set now, else huggingface_hub's default (from `HF_HOME`)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()


def _why_offline() -> str:
    set_by = next((n for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
                   if os.environ.get(n, "").strip().lower() in _TRUE), "HF_HUB_OFFLINE")
    return f"{set_by}=1 is set, so nothing is downloaded (unset it and run once online to fill the cache)"


def _snapshot(repo_id: str, *, repo_type: str, field: str) -> Path:
    """The cached snapshot folder of `repo_id`, downloading it when it is missing and the Hub is reachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    if is_offline():
        raise UserError(f"{_not_cached(repo_id, repo_type, field)} ({cache}) and {_why_offline()}")
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, cache_dir=cache,
                                      ignore_patterns=_NOT_PYTORCH if repo_type == "model" else None))
    except GatedRepoError:
        reason = "it is gated: accept its licence on huggingface.co and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        reason = "no such repository on the Hub (or it is private: log in with `hf auth login`)"
    except LocalEntryNotFoundError:
        reason = "the Hub cannot be reached (no network?)"
    except (HfHubHTTPError, OSError) as exc:
        reason = f"the download failed ({one_line(str(exc), 300)})"
    raise UserError(f"{_not_cached(repo_id, repo_type, field)} ({cache}) and could not be downloaded: {reason}")


def _not_cached(repo_id: str, repo_type: str, field: str) -> str:
    local = "folder" if repo_type == "model" else "file or folder"
    return (f"field {field}: {repo_id!r} is no local {local}, and the Hugging Face {repo_type} of that id is not in "
            f"the cache")


def model_folder(value: str, *, field: str) -> str:
    """The local folder of a model field: `value` itself when it exists, else the cached snapshot of the Hub id
    `value` (downloaded when online and missing). Anything else is a one-line UserError naming `field`."""
    if Path(value).expanduser().exists():
        return value
    if not looks_like_hub_id(value):
        raise UserError(f"field {field}: model folder not found: {value} (give a local folder saved with "
                        f"save_pretrained, a Hugging Face id such as org/name, or builtin:minilm / builtin:smollm2)")
    return str(_snapshot(value, repo_type="model", field=field))


def load_hub_dataset(repo_id: str, *, split: str | None, field: str) -> Any:
    """`datasets.load_dataset(repo_id, split=split)` through the datasets cache (a `Dataset`, or a `DatasetDict`
    when `split` is None); offline, a repository in the hub cache is read from its snapshot folder."""
    import datasets

    try:
        return datasets.load_dataset(repo_id, split=split)
    except ConnectionError:
        if not is_offline():
            raise UserError(f"{_not_cached(repo_id, 'dataset', field)} and the Hub cannot be reached "
                            f"(no network?)") from None
    except datasets.exceptions.DatasetNotFoundError:
        raise UserError(f"{_not_cached(repo_id, 'dataset', field)}, nor on the Hub (or it is private or gated: "
                        f"log in with `hf auth login`)") from None
    except ValueError as exc:  # an unknown split
        raise UserError(f"field {field}: dataset {repo_id!r}: {one_line(str(exc), 300)}") from None
    folder = _snapshot(repo_id, repo_type="dataset", field=field)
    try:
        return datasets.load_dataset(str(folder), split=split)
    except ValueError as exc:
        raise UserError(f"field {field}: dataset {repo_id!r} ({folder}): {one_line(str(exc), 300)}") from None
