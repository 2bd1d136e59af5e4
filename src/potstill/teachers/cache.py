"""On-disk store of a teacher's top-k log-probs per token: written once, read by record index in training.

Layout of a cache folder::

    manifest.json             format, k, temperature, vocab size, encodings, counts, checksums, caller's meta
    index.safetensors         per record: record index, shard, offset, length (sorted by record index)
    shard-00000.safetensors   token rows of whole records, in the order they were added
    shard-00001.safetensors   ...

A record is one sequence of the dataset (identified by its integer index in the dataset); its rows are the
teacher's distributions at the record's token positions: row j is the distribution the teacher produced at
input position j (for a causal LM, the one predicting token j + 1), so it lines up with the student's
`logits[b, j]` for the same input ids. A record always lives in one shard.

Per token a shard holds (k = number of kept ids):

- `ids`: uint16 `[n, k]`, the low 16 bits of the token ids, sorted by descending log-prob;
- `ids_hi`: uint8 `[n, ceil(k·h / 8)]`, only when the vocabulary needs h = bits(V − 1) − 16 > 0 more bits
  per id: those high bits, bit-packed (little-endian bit order, id-major);
- `logprobs`: float16 `[n, k]`, log-softmax of the teacher logits / temperature over the full vocabulary.
  float16 rather than bfloat16: both cover the range that matters (log-probs in [−30, 0] and far below), but
  float16 keeps 11 significant bits to bfloat16's 8, so its rounding error is 8× smaller (≤ 0.008 at
  |ℓ| ≤ 32, vs ≤ 0.0625 for bfloat16; see tests/test_teacher_cache.py);
- `tail`: float32 `[n]`, log of the teacher mass outside the k ids (−inf when k = V), computed exactly from
  the full distribution at write time.

Bytes per token (payload, shard headers aside): 4·k + ceil(k·h / 8) + 4. At k = 64: 260 for V ≤ 65,536
(e.g. 49,152 or 32,000), 268 for 65,536 < V ≤ 131,072 (e.g. Llama-3's 128,256), 276 up to 262,144
(Qwen2.5's 151,936, Gemma's 256,000). Plain int32 ids would cost 388 at k = 64.

Every file is written atomically, the whole folder is built beside the target and moved into place at
`close()`, and the manifest records each file's size and sha256, so a reader refuses a truncated, corrupted
or mismatched cache with a `UserError` instead of training on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from potstill.errors import UserError
from potstill.io import atomic_dir, atomic_write_bytes, atomic_write_json, sha256_file
from potstill.losses.sparse import TopKTeacher, tail_from_logprobs

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "TopKCache",
    "TopKCacheWriter",
    "bytes_per_token_for",
    "id_high_bits",
]

FORMAT = "potstill-topk-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.safetensors"
# Manifest fields that `expect` compares at the top level; every other expected field is looked up in `meta`.
TOP_LEVEL_FIELDS = ("format_version", "k", "temperature", "vocab_size", "num_tokens", "num_records")


def id_high_bits(vocab_size: int) -> int:
    """Bits per id beyond the 16 stored in `ids` (0 when every id fits in uint16)."""
    return max(0, (int(vocab_size) - 1).bit_length() - 16)


def bytes_per_token_for(k: int, vocab_size: int) -> int:
    """Payload bytes per token of a cache with `k` ids per row over a vocabulary of `vocab_size`."""
    return 2 * k + math.ceil(k * id_high_bits(vocab_size) / 8) + 2 * k + 4


def _encode_ids(ids: np.ndarray, high_bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    low = (ids & 0xFFFF).astype(np.uint16)
    if high_bits == 0:
        return low, None
    n, k = ids.shape
    bits = ((ids >> 16)[..., None] >> np.arange(high_bits)) & 1
    return low, np.packbits(bits.astype(np.uint8).reshape(n, k * high_bits), axis=-1, bitorder="little")


def _decode_ids(low: np.ndarray, high: np.ndarray | None, high_bits: int) -> np.ndarray:
    ids = low.astype(np.int64)
    if high_bits == 0:
        return ids
    n, k = low.shape
    bits = np.unpackbits(high, axis=-1, count=k * high_bits, bitorder="little").reshape(n, k, high_bits)
    return ids | ((bits.astype(np.int64) << np.arange(high_bits)).sum(-1) << 16)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _top_k_of_dense(rows: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, ...]:
    """Sorted top-k ids / log-probs and the exact log tail of `[n, V]` logits (or log-probs) / temperature."""
    logp = torch.log_softmax(rows.float() / temperature, -1)
    logprobs, ids = logp.topk(k, -1, sorted=True)
    if k == logp.shape[-1]:
        tail = torch.full(logp.shape[:-1], -math.inf)
    else:
        tail = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
    return ids, logprobs, tail


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
        if not _is_int(vocab_size) or vocab_size < 1 or vocab_size > 2**31:
            raise ValueError(f"vocab_size must be an int in [1, 2**31], got {vocab_size!r}")
        if not _is_int(k) or not 1 <= k <= vocab_size:
            raise ValueError(f"k must be an int in [1, vocab_size={vocab_size}], got {k!r}")
        if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
        if not _is_int(shard_tokens) or shard_tokens < 1:
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
        path = self.out_dir
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
        if not _is_int(record_index) or record_index < 0:
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
            ids, logprobs, tail = _top_k_of_dense(rows.detach(), k, self.temperature)
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
        low, high = _encode_ids(np.concatenate([b[0] for b in self._buffer]).reshape(-1, k), self._high_bits)
        tensors = {
            "ids": low,
            "logprobs": np.concatenate([b[1] for b in self._buffer]).reshape(-1, k),
            "tail": np.concatenate([b[2] for b in self._buffer]).reshape(-1),
        }
        if high is not None:
            tensors["ids_hi"] = high
        data = st_save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
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
            index = st_save(
                {"record": records, "shard": entries[:, 0].copy(), "offset": entries[:, 1].copy(),
                 "length": entries[:, 2].copy()},
                metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)},
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


class TopKCache:
    """A finished top-k cache, opened for reading (shards are memory-mapped and read lazily).

    Opening checks the manifest's format version, that the index and every shard exist with the recorded
    size, and (when `verify`, the default) their sha256; `expect` maps fields to the values this run needs
    ("k", "temperature", "vocab_size" are compared with the manifest's own fields, anything else with its
    `meta`, e.g. "teacher", "tokenizer_hash", "data_fingerprint"). Any problem raises a `UserError` that
    names the cache, the file or the fields at fault.
    """

    def __init__(self, path: str | os.PathLike, *, expect: dict[str, Any] | None = None, verify: bool = True):
        self.path = Path(path)
        self._handles: dict[int, Any] = {}
        self._manifest = self._read_manifest()
        m = self._manifest
        self.k, self.temperature, self.vocab_size = int(m["k"]), float(m["temperature"]), int(m["vocab_size"])
        self._high_bits = int(m["id_encoding"]["high_bits"])
        self._check_file(m["index"], "index", hash_it=True)
        for shard in m["shards"]:
            self._check_file(shard, "shard", hash_it=verify)
        for extra in m.get("files", []):
            self._check_file(extra, "file", hash_it=True)
        if expect:
            self._check_expect(expect)
        self._load_index()

    # --- validation ----------------------------------------------------------------------------------

    def _fail(self, what: str) -> UserError:
        return UserError(f"top-k cache {self.path}: {what}")

    def _read_manifest(self) -> dict[str, Any]:
        if not self.path.is_dir():
            raise UserError(
                f"top-k cache {self.path} does not exist (or is not a folder); build it with `potstill cache`"
            )
        file = self.path / MANIFEST
        if not file.is_file():
            raise self._fail(f"no {MANIFEST}: not a potstill top-k cache, or its writing never finished")
        try:
            m = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise self._fail(f"{MANIFEST} cannot be read as JSON ({e})") from e
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            found = m.get("format") if isinstance(m, dict) else None
            raise self._fail(f"{MANIFEST} is not a {FORMAT} manifest (format={found!r})")
        if m.get("format_version") != FORMAT_VERSION:
            raise self._fail(
                f"format version {m.get('format_version')!r}, but this potstill reads version {FORMAT_VERSION}; "
                "rebuild the cache with this version's `potstill cache`"
            )
        need = ("k", "temperature", "vocab_size", "id_encoding", "num_tokens", "num_records", "index", "shards", "meta")
        missing = [key for key in need if key not in m]
        if missing:
            raise self._fail(f"{MANIFEST} lacks the field(s) {', '.join(missing)}")
        return m

    def _check_file(self, entry: dict[str, Any], kind: str, *, hash_it: bool) -> None:
        if not isinstance(entry, dict) or not {"file", "bytes", "sha256"} <= set(entry):
            raise self._fail(f"{MANIFEST} has a malformed {kind} entry {entry!r}")
        name = str(entry["file"])
        file = self.path / name
        if Path(name).name != name or not file.is_file():
            raise self._fail(f"{kind} {name} is missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            cause = "truncated" if size < entry["bytes"] else "longer than written"
            raise self._fail(
                f"{kind} {name} is {size} bytes but the manifest records {entry['bytes']} ({cause}); "
                "rebuild the cache"
            )
        if hash_it and sha256_file(file) != entry["sha256"]:
            raise self._fail(f"{kind} {name} fails its sha256 checksum (the file is corrupted); rebuild the cache")

    def _lookup(self, field: str) -> Any:
        if field in TOP_LEVEL_FIELDS:
            return self._manifest.get(field, _MISSING)
        return self._manifest["meta"].get(field, _MISSING)

    def read_file(self, name: str) -> bytes | None:
        """A companion file stored with `TopKCacheWriter.add_file` (checksum verified on open), or None."""
        if not any(entry["file"] == name for entry in self._manifest.get("files", [])):
            return None
        return (self.path / name).read_bytes()

    def check_expect(self, expect: dict[str, Any]) -> None:
        """Refuse (UserError) a cache whose manifest differs from `expect`, listing every differing field."""
        self._check_expect(expect)

    def _check_expect(self, expect: dict[str, Any]) -> None:
        diffs = []
        for field in sorted(expect):
            cached, wanted = self._lookup(field), expect[field]
            if cached is _MISSING or cached != wanted:
                shown = "<not recorded>" if cached is _MISSING else repr(cached)
                diffs.append(f"{field}: cached {shown}, expected {wanted!r}")
        if diffs:
            raise self._fail(
                "does not match this run — " + "; ".join(diffs) + ". Rebuild the cache for this teacher, tokenizer "
                "and data, or point the recipe at the matching cache"
            )

    def _load_index(self) -> None:
        raw = st_load((self.path / INDEX_FILE).read_bytes())
        self._record = raw["record"].astype(np.int64)
        self._shard = raw["shard"].astype(np.int64)
        self._offset = raw["offset"].astype(np.int64)
        self._length = raw["length"].astype(np.int64)
        shards = self._manifest["shards"]
        sizes = np.array([s["num_tokens"] for s in shards], dtype=np.int64)
        ok = (
            len(self._record) == self._manifest["num_records"]
            and int(self._length.sum()) == self._manifest["num_tokens"]
            and bool((np.diff(self._record) > 0).all())
            and bool(((self._shard >= 0) & (self._shard < len(shards))).all())
            and bool((self._offset >= 0).all() and (self._length >= 0).all())
        )
        if ok and len(self._record):
            ok = bool((self._offset + self._length <= sizes[self._shard]).all())
        if not ok:
            raise self._fail(f"{INDEX_FILE} disagrees with {MANIFEST}; rebuild the cache")

    # --- reading -------------------------------------------------------------------------------------

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._manifest))

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest["meta"]

    @property
    def num_tokens(self) -> int:
        return int(self._manifest["num_tokens"])

    @property
    def num_records(self) -> int:
        return int(self._manifest["num_records"])

    @property
    def bytes_per_token(self) -> int:
        return int(self._manifest.get("bytes_per_token", bytes_per_token_for(self.k, self.vocab_size)))

    @property
    def records(self) -> list[int]:
        """The record indices held, ascending."""
        return self._record.tolist()

    def __len__(self) -> int:
        return self.num_records

    def __contains__(self, record_index: object) -> bool:
        if not _is_int(record_index):
            return False
        pos = int(np.searchsorted(self._record, record_index))
        return pos < len(self._record) and int(self._record[pos]) == record_index

    def _positions(self, record_indices) -> np.ndarray:
        wanted = np.asarray(
            record_indices.tolist() if isinstance(record_indices, torch.Tensor) else list(record_indices),
            dtype=np.int64,
        ).reshape(-1)
        pos = np.searchsorted(self._record, wanted)
        found = pos < len(self._record)
        found[found] = self._record[pos[found]] == wanted[found]
        if not found.all():
            missing = wanted[~found][:5].tolist()
            raise self._fail(
                f"record(s) {missing} are not in the cache (it holds {self.num_records} records); the cache was "
                "built from other data"
            )
        return pos

    def lengths(self, record_indices: Sequence[int] | torch.Tensor) -> list[int]:
        """The number of cached token rows of each record."""
        return self._length[self._positions(record_indices)].tolist()

    def _handle(self, shard: int):
        if shard not in self._handles:
            name = self._manifest["shards"][shard]["file"]
            self._handles[shard] = safe_open(str(self.path / name), framework="np")
        return self._handles[shard]

    def get(
        self,
        record_indices: Sequence[int] | torch.Tensor,
        *,
        length: int | None = None,
        padding_side: str = "right",
        expect_lengths: Sequence[int] | torch.Tensor | None = None,
        return_mask: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> TopKTeacher | tuple[TopKTeacher, torch.Tensor]:
        """The cached rows of a batch of records as a `TopKTeacher` of shape `[B, T]` (ids `[B, T, k]`).

        Row `[b, j]` is row j of record `record_indices[b]` (padding_side="right") or, with
        padding_side="left", row j − (T − n_b) where n_b = min(record length, T). T is `length` when given
        (longer records are cut to their first T rows) else the longest requested record. Padding rows hold a
        harmless valid distribution: ids 0..k−1 and the k + 1 buckets uniform (log-prob −log(k+1) each), so
        an unmasked padding row gives finite losses; mask them out anyway (e.g. with the batch's labels).
        `expect_lengths` (one int per record, e.g. the batch's non-padding token counts) makes any record
        whose cached length differs a `UserError`. `return_mask=True` also returns the bool `[B, T]` mask of
        cached (non-padding) rows. Log-probs and tail are returned as `dtype`, ids as int64, on the CPU.
        """
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        pos = self._positions(record_indices)
        lens = self._length[pos]
        if expect_lengths is not None:
            wanted = np.asarray(
                expect_lengths.tolist() if isinstance(expect_lengths, torch.Tensor) else list(expect_lengths),
                dtype=np.int64,
            ).reshape(-1)
            if wanted.shape != lens.shape:
                raise ValueError(f"expect_lengths has {wanted.size} entries for {lens.size} records")
            bad = np.nonzero(wanted != lens)[0]
            if bad.size:
                shown = ", ".join(
                    f"record {int(self._record[pos[i]])}: cached {int(lens[i])}, batch {int(wanted[i])}"
                    for i in bad[:5]
                )
                raise self._fail(
                    f"token counts differ from the batch ({shown}); the cache was built with other data, "
                    "tokenizer or truncation"
                )
        if length is not None and (not _is_int(length) or length < 0):
            raise ValueError(f"length must be an int >= 0, got {length!r}")
        width = int(length) if length is not None else int(lens.max(initial=0))
        k, batch = self.k, len(pos)
        ids = np.broadcast_to(np.arange(k, dtype=np.int64), (batch, width, k)).copy()
        pad = -math.log(k + 1)
        logprobs = np.full((batch, width, k), pad, dtype=np.float32)
        tail = np.full((batch, width), pad, dtype=np.float32)
        mask = np.zeros((batch, width), dtype=bool)
        for b, p in enumerate(pos.tolist()):
            n = min(int(self._length[p]), width)
            if n == 0:
                continue
            start = int(self._offset[p])
            f = self._handle(int(self._shard[p]))
            high = f.get_slice("ids_hi")[start : start + n] if self._high_bits else None
            lo = 0 if padding_side == "right" else width - n
            ids[b, lo : lo + n] = _decode_ids(f.get_slice("ids")[start : start + n], high, self._high_bits)
            logprobs[b, lo : lo + n] = f.get_slice("logprobs")[start : start + n]
            tail[b, lo : lo + n] = f.get_slice("tail")[start : start + n]
            mask[b, lo : lo + n] = True
        teacher = TopKTeacher(
            torch.from_numpy(ids), torch.from_numpy(logprobs).to(dtype), torch.from_numpy(tail).to(dtype)
        )
        return (teacher, torch.from_numpy(mask)) if return_mask else teacher

    def verify(self) -> None:
        """Hash every shard and the index again; raise a `UserError` on any mismatch."""
        self._check_file(self._manifest["index"], "index", hash_it=True)
        for shard in self._manifest["shards"]:
            self._check_file(shard, "shard", hash_it=True)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> TopKCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Open shard handles do not pickle (DataLoader workers); each process reopens them lazily.
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


class _Missing:
    def __repr__(self) -> str:
        return "<not recorded>"


_MISSING = _Missing()
