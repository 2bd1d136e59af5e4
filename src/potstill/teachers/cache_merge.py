"""A top-k cache written by several processes: each rank writes its own part, the main process joins them.

`potstill cache` launched as N processes (`accelerate launch`, DDP or FSDP2) gives each rank every N-th batch of
the training sequences. Rank r writes a complete cache of its records with `TopKCacheWriter` into its part folder
`.<cache name>.rank-<r>` beside the target (`rank_part_dir`); its shard files hold only rows it computed. When all
ranks are done, `merge_rank_parts` (main process) moves every part's shards into one folder under consecutive names,
joins the indexes (shard numbers offset by the shards before them, records sorted) and writes one manifest, then
moves the folder into place atomically (`potstill.io.atomic_dir`) and removes the parts. The result is an ordinary
cache: `TopKCache` reads it as if one process had written it, and its manifest says how many ranks wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load

from potstill.io import atomic_dir, atomic_write_bytes, atomic_write_json
from potstill.teachers.cache_format import FORMAT, FORMAT_VERSION, INDEX_FILE, MANIFEST
from potstill.teachers.cache_writer import safetensors_bytes

_SAME = ("format", "format_version", "k", "temperature", "vocab_size", "id_encoding", "logprob_dtype", "tail_dtype",
         "bytes_per_token", "meta")


def rank_part_dir(out_dir: str | os.PathLike, rank: int) -> Path:
    """Where rank `rank` writes its part of the cache `out_dir`."""
    out = Path(out_dir)
    return out.with_name(f".{out.name}.rank-{rank}")


def merge_rank_parts(parts: list[Path], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Join the part caches `parts` (in rank order) into the cache `out_dir`, replacing what is there; returns its
    manifest. The parts must agree on k, temperature, vocabulary and meta, and hold disjoint records."""
    manifests = [json.loads((part / MANIFEST).read_text()) for part in parts]
    first = manifests[0]
    for part, manifest in zip(parts[1:], manifests[1:], strict=True):
        differ = [field for field in _SAME if manifest.get(field) != first.get(field)]
        if differ:
            raise ValueError(f"cache part {part} differs from {parts[0]} in {differ}")
    columns: dict[str, list[np.ndarray]] = {"record": [], "shard": [], "offset": [], "length": []}
    shards: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    with atomic_dir(out_dir) as tmp:
        for part, manifest in zip(parts, manifests, strict=True):
            index = st_load((part / INDEX_FILE).read_bytes())
            for name in columns:
                columns[name].append(index[name].astype(np.int64) + (len(shards) if name == "shard" else 0))
            for shard in manifest["shards"]:
                name = f"shard-{len(shards):05d}.safetensors"
                os.replace(part / shard["file"], tmp / name)
                shards.append({**shard, "file": name})
            for extra in manifest.get("files", []):
                os.replace(part / extra["file"], tmp / extra["file"])
                files.append(extra)
        joined = {name: np.concatenate(values) for name, values in columns.items()}
        order = np.argsort(joined["record"], kind="stable")
        joined = {name: np.ascontiguousarray(values[order]) for name, values in joined.items()}
        if len(np.unique(joined["record"])) != len(joined["record"]):
            raise ValueError("cache parts hold the same record twice")
        index_bytes = safetensors_bytes(joined, {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        atomic_write_bytes(tmp / INDEX_FILE, index_bytes)
        num_tokens = sum(int(m["num_tokens"]) for m in manifests)
        shard_bytes = sum(int(s["bytes"]) for s in shards)
        merged = {**first, "num_tokens": num_tokens, "num_records": int(len(joined["record"])),
                  "file_bytes_per_token": shard_bytes / num_tokens if num_tokens else None,
                  "index": {"file": INDEX_FILE, "bytes": len(index_bytes),
                            "sha256": hashlib.sha256(index_bytes).hexdigest()},
                  "shards": shards, "files": files, "ranks": len(parts)}
        atomic_write_json(tmp / MANIFEST, merged)
    for part in parts:
        shutil.rmtree(part, ignore_errors=True)
    return merged
