"""Reading a top-k teacher cache (`TopKCache`): the on-disk store of a teacher's top-k log-probs per token,
written once (`potstill.teachers.cache_writer.TopKCacheWriter`, by `potstill cache`) and read by record index in
training. The folder layout, encodings and checks are described in `potstill.teachers.cache_format`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load as st_load

from potstill.errors import UserError
from potstill.io import sha256_file
from potstill.losses.sparse import TopKTeacher
from potstill.teachers.cache_format import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST,
    TOP_LEVEL_FIELDS,
    bytes_per_token_for,
    decode_ids,
    is_int,
)

__all__ = ["TopKCache"]


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
        self._check_shard_shapes()
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

    def _check_shard_shapes(self) -> None:
        """Every shard's tensors have the manifest's k and token count (read from the headers only)."""
        k, vocab = self.k, self.vocab_size
        if not 1 <= k <= vocab:
            raise self._fail(f"{MANIFEST} records k={k} for a vocabulary of {vocab}; rebuild the cache")
        for i, shard in enumerate(self._manifest["shards"]):
            try:
                f = self._handle(i)
                shapes = {name: list(f.get_slice(name).get_shape()) for name in ("ids", "logprobs", "tail")}
            except Exception as exc:  # safetensors raises its own error type for a damaged header
                raise self._fail(f"shard {shard.get('file')} cannot be read ({exc}); rebuild the cache") from None
            n = shard.get("num_tokens")
            if shapes["ids"] != [n, k] or shapes["logprobs"] != [n, k] or shapes["tail"] != [n]:
                raise self._fail(f"shard {shard['file']} holds ids {shapes['ids']} and log-probs "
                                 f"{shapes['logprobs']}, but {MANIFEST} records k={k} and {n} tokens; rebuild the "
                                 f"cache")

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
        if not is_int(record_index):
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
        if length is not None and (not is_int(length) or length < 0):
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
            ids[b, lo : lo + n] = decode_ids(f.get_slice("ids")[start : start + n], high, self._high_bits)
            found = ids[b, lo : lo + n]
            if found.size and (found.min() < 0 or found.max() >= self.vocab_size):
                raise self._fail(f"record {int(self._record[p])} holds token id {int(found.max())} outside the "
                                 f"vocabulary of {self.vocab_size} (corrupted); rebuild the cache")
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
