"""Writing a top-k teacher cache (`TopKCacheWriter`); the layout is in `potstill.teachers.cache_format`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as st_save

from potstill.errors import UserError
from potstill.io import atomic_dir, atomic_write_bytes, atomic_write_json
from potstill.losses.sparse import tail_from_logprobs
from potstill.teachers.cache_format import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST,
    TOP_LEVEL_FIELDS,
    bytes_per_token_for,
    encode_ids,
    id_high_bits,
    is_int,
    top_k_of_dense,
)


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """safetensors' serialisation of `tensors` with `metadata`, made reproducible: the writer keeps the metadata
    in a hash map, so its key order (and with it the file's checksum) changes from call to call. The header is
    written again with the metadata sorted by key and padded with spaces to its former length (a multiple of 8),
    so the tensor offsets stay where they were."""
    data = st_save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" not in header:
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # cannot happen for the same keys and values; keep the writer's bytes then
        return data
    return data[:8] + text.ljust(size) + data[8 + size:]


def check_cache_target(path: Path, overwrite: bool) -> None:
    """Refuse to write a cache to `path` when it holds something else, or a cache and not `overwrite`."""
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"cannot write a top-k cache to {path}: it exists and is not a folder")
    if not any(path.iterdir()):
        return
    try:
        is_cache = json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        is_cache = False
    if not is_cache:
        raise UserError(f"{path} exists and is not a potstill top-k cache; refusing to replace it")
    if not overwrite:
        raise UserError(f"a top-k cache already exists at {path}; pass overwrite=True to replace it")


class TopKCacheWriter:
    """Writes a top-k cache to `out_dir`; use as a context manager, or call `close()` (or `abort()`).

    - `k`: ids kept per token; `temperature`: the teacher logits are divided by it before the log-softmax
      (training must use the same temperature); `vocab_size`: the teacher's real vocabulary (no padding).
    - `meta`: JSON-serialisable facts the reader checks with `expect=`: e.g. "teacher", "teacher_hash",
      "tokenizer_hash", "data_fingerprint", "max_length". Its keys must not be top-level manifest fields.
    - `shard_tokens`: a new shard starts once the current one holds at least this many token rows.
    - `overwrite`: replace an existing cache at `out_dir` (at `close()`, never before). A folder that is not
      a cache is never replaced.

    The cache is built in a temporary folder beside `out_dir` and moved into place by `close()`; if writing
    fails (or `abort()` is called) the temporary folder is removed and `out_dir` is left as it was.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        k: int,
        temperature: float,
        vocab_size: int,
        meta: dict[str, Any],
        shard_tokens: int = 1_000_000,
        overwrite: bool = False,
    ) -> None:
        if not is_int(vocab_size) or vocab_size < 1 or vocab_size > 2**31:
            raise ValueError(f"vocab_size must be an int in [1, 2**31], got {vocab_size!r}")
        if not is_int(k) or not 1 <= k <= vocab_size:
            raise ValueError(f"k must be an int in [1, vocab_size={vocab_size}], got {k!r}")
        if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
        if not is_int(shard_tokens) or shard_tokens < 1:
            raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
        if not isinstance(meta, dict) or not all(isinstance(key, str) for key in meta):
            raise ValueError("meta must be a dict with str keys")
        clash = sorted(set(meta) & set(TOP_LEVEL_FIELDS))
        if clash:
            raise ValueError(f"meta must not use the manifest's own fields {clash}")
        try:
            self._meta = json.loads(json.dumps(meta, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"meta must be JSON-serialisable: {e}") from e
        self.out_dir = Path(out_dir)
        self._check_target(overwrite)
        self.k, self.temperature, self.vocab_size = int(k), float(temperature), int(vocab_size)
        self.shard_tokens = int(shard_tokens)
        self._high_bits = id_high_bits(vocab_size)
        self._records: dict[int, tuple[int, int, int]] = {}  # record -> (shard, offset, length)
        self._shards: list[dict[str, Any]] = []
        self._files: list[dict[str, Any]] = []
        self._buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffer_tokens = 0
        self._buffer_records = 0
        self._num_tokens = 0
        self._ctx = atomic_dir(self.out_dir)
        self._tmp = self._ctx.__enter__()
        self._open = True

    def _check_target(self, overwrite: bool) -> None:
        check_cache_target(self.out_dir, overwrite)

    # --- writing -------------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def num_records(self) -> int:
        return len(self._records)

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token_for(self.k, self.vocab_size)

    def add(self, record_index: int, rows: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        """Append the token rows of record `record_index` (records may come in any order, each once).

        `rows` is either `[n, V]` teacher logits (or log-probs: the log-softmax is shift-invariant), from
        which the top k and the exact tail are taken at the cache temperature; or an already reduced
        `(ids [n, k], logprobs [n, k])` or `(ids, logprobs, tail [n])`, with log-probs of the full
        vocabulary at the cache temperature (the tail is then derived when not given; rows are re-sorted).
        """
        if not self._open:
            raise RuntimeError("this TopKCacheWriter is closed")
        if not is_int(record_index) or record_index < 0:
            raise ValueError(f"record_index must be an int >= 0, got {record_index!r}")
        record_index = int(record_index)
        if record_index in self._records:
            raise ValueError(f"record {record_index} was already added to this cache")
        with torch.no_grad():
            ids, logprobs, tail = self._reduce(record_index, rows)
        n = ids.shape[0]
        ids_np = ids.to(device="cpu", dtype=torch.int64).numpy()
        self._buffer.append((ids_np, logprobs.cpu().half().numpy(), tail.cpu().float().numpy()))
        self._records[record_index] = (len(self._shards), self._buffer_tokens, n)
        self._buffer_tokens += n
        self._buffer_records += 1
        self._num_tokens += n
        if self._buffer_tokens >= self.shard_tokens:
            self._flush()

    def _reduce(self, record: int, rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k, vocab = self.k, self.vocab_size
        if isinstance(rows, torch.Tensor):
            if rows.dim() != 2 or rows.shape[1] != vocab or not rows.is_floating_point():
                raise ValueError(
                    f"record {record}: dense rows must be float [n_tokens, vocab_size={vocab}], "
                    f"got {rows.dtype} {tuple(rows.shape)}"
                )
            ids, logprobs, tail = top_k_of_dense(rows.detach(), k, self.temperature)
        elif isinstance(rows, (tuple, list)) and len(rows) in (2, 3):
            ids, logprobs = rows[0].detach(), rows[1].detach().float()
            if ids.is_floating_point() or ids.dim() != 2 or ids.shape[1] != k or logprobs.shape != ids.shape:
                raise ValueError(
                    f"record {record}: top-k rows must be integer ids and float logprobs of shape "
                    f"[n_tokens, k={k}], got {tuple(ids.shape)} {ids.dtype} and {tuple(logprobs.shape)}"
                )
            ids = ids.long()
            if ids.numel() and bool((ids.min() < 0) | (ids.max() >= vocab)):
                raise ValueError(f"record {record}: ids must be in [0, {vocab})")
            if ids.numel() and bool((ids.sort(-1).values.diff(dim=-1) == 0).any()):
                raise ValueError(f"record {record}: the ids of a token row must be distinct")
            logprobs, order = logprobs.sort(-1, descending=True)
            ids = ids.gather(-1, order)
            if len(rows) == 3:
                tail = rows[2].detach().float()
                if tail.shape != ids.shape[:1]:
                    raise ValueError(f"record {record}: tail must have shape [{ids.shape[0]}], got {tuple(tail.shape)}")
            elif k == vocab:
                tail = torch.full(ids.shape[:1], -math.inf)
            else:
                tail = tail_from_logprobs(logprobs)
        else:
            raise ValueError(
                f"record {record}: rows must be a [n_tokens, V] tensor or an (ids, logprobs[, tail]) tuple, "
                f"got {type(rows).__name__}"
            )
        if bool(torch.isnan(logprobs).any() | torch.isnan(tail).any()):
            raise ValueError(f"record {record}: the teacher's log-probs contain NaN")
        return ids, logprobs, tail

    def _flush(self) -> None:
        if not self._buffer_records:
            return
        k = self.k
        low, high = encode_ids(np.concatenate([b[0] for b in self._buffer]).reshape(-1, k), self._high_bits)
        tensors = {
            "ids": low,
            "logprobs": np.concatenate([b[1] for b in self._buffer]).reshape(-1, k),
            "tail": np.concatenate([b[2] for b in self._buffer]).reshape(-1),
        }
        if high is not None:
            tensors["ids_hi"] = high
        data = safetensors_bytes(tensors, {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        name = f"shard-{len(self._shards):05d}.safetensors"
        atomic_write_bytes(self._tmp / name, data)
        self._shards.append({
            "file": name,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "num_tokens": self._buffer_tokens,
            "num_records": self._buffer_records,
        })
        self._buffer, self._buffer_tokens, self._buffer_records = [], 0, 0

    def add_file(self, name: str, data: bytes) -> None:
        """Store a companion file with the cache (e.g. the teacher's seq-KD completions), checksummed like the
        shards; read it back with `TopKCache.read_file(name)`."""
        if not self._open:
            raise RuntimeError("this TopKCacheWriter is closed")
        if Path(name).name != name or name in (MANIFEST, INDEX_FILE) or name.startswith("shard-"):
            raise ValueError(f"companion file name {name!r} must be a plain file name, not a cache file's")
        atomic_write_bytes(self._tmp / name, data)
        self._files.append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    def close(self) -> dict[str, Any]:
        """Write the last shard, the index and the manifest, move the cache into place; return the manifest."""
        if not self._open:
            raise RuntimeError("this TopKCacheWriter is closed")
        try:
            self._flush()
            records = np.array(sorted(self._records), dtype=np.int64)
            entries = np.array([self._records[r] for r in records.tolist()], dtype=np.int64).reshape(-1, 3)
            index = safetensors_bytes(
                {"record": records, "shard": entries[:, 0].copy(), "offset": entries[:, 1].copy(),
                 "length": entries[:, 2].copy()},
                {"format": FORMAT, "format_version": str(FORMAT_VERSION)},
            )
            atomic_write_bytes(self._tmp / INDEX_FILE, index)
            shard_bytes = sum(s["bytes"] for s in self._shards)
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "k": self.k,
                "temperature": self.temperature,
                "vocab_size": self.vocab_size,
                "id_encoding": {"low": "uint16", "high_bits": self._high_bits, "high": "uint8 bit-packed"},
                "logprob_dtype": "float16",
                "tail_dtype": "float32",
                "num_tokens": self._num_tokens,
                "num_records": len(self._records),
                "bytes_per_token": self.bytes_per_token,
                "file_bytes_per_token": shard_bytes / self._num_tokens if self._num_tokens else None,
                "index": {"file": INDEX_FILE, "bytes": len(index), "sha256": hashlib.sha256(index).hexdigest()},
                "shards": self._shards,
                "files": self._files,
                "meta": self._meta,
            }
            atomic_write_json(self._tmp / MANIFEST, manifest)
        except BaseException as e:
            self._open = False
            self._ctx.__exit__(type(e), e, e.__traceback__)
            raise
        self._open = False
        self._ctx.__exit__(None, None, None)
        return manifest

    def abort(self) -> None:
        """Drop everything written so far; `out_dir` is left as it was."""
        if self._open:
            self._open = False
            with contextlib.suppress(RuntimeError):
                self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> TopKCacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._open:
            self.close()
