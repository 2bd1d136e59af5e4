"""The top-k teacher cache format: the on-disk store of a teacher's top-k log-probs per token,
written once and read by record index in training.

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

This module holds the format (names, id encoding, bytes per token, the top-k reduction); the writer is
`potstill.teachers.cache_writer.TopKCacheWriter`, the reader `potstill.teachers.cache.TopKCache`.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

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


def encode_ids(ids: np.ndarray, high_bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """int64 ids `[n, k]` as (uint16 low bits, bit-packed high bits or None)."""
    low = (ids & 0xFFFF).astype(np.uint16)
    if high_bits == 0:
        return low, None
    n, k = ids.shape
    bits = ((ids >> 16)[..., None] >> np.arange(high_bits)) & 1
    return low, np.packbits(bits.astype(np.uint8).reshape(n, k * high_bits), axis=-1, bitorder="little")


def decode_ids(low: np.ndarray, high: np.ndarray | None, high_bits: int) -> np.ndarray:
    """The int64 ids that `encode_ids` stored as `low` and `high`."""
    ids = low.astype(np.int64)
    if high_bits == 0:
        return ids
    n, k = low.shape
    bits = np.unpackbits(high, axis=-1, count=k * high_bits, bitorder="little").reshape(n, k, high_bits)
    return ids | ((bits.astype(np.int64) << np.arange(high_bits)).sum(-1) << 16)


def is_int(value: object) -> bool:
    """An integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def top_k_of_dense(rows: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, ...]:
    """Sorted top-k ids / log-probs and the exact log tail of `[n, V]` logits (or log-probs) / temperature."""
    logp = torch.log_softmax(rows.float() / temperature, -1)
    logprobs, ids = logp.topk(k, -1, sorted=True)
    if k == logp.shape[-1]:
        tail = torch.full(logp.shape[:-1], -math.inf, device=logp.device)
    else:
        tail = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
    return ids, logprobs, tail


def top_k_of_dense_rows(logits: torch.Tensor, k: int, temperature: float, *,
                        chunk_bytes: int = 1 << 28) -> tuple[torch.Tensor, ...]:
    """`top_k_of_dense` of `[..., V]` logits (a whole batch), as many token rows at a time as keep each float32
    copy under `chunk_bytes`: bounded on an accelerator at any batch and vocabulary size, and on CPU large
    enough blocks that the allocator returns them to the system (row-sized blocks interleaved with the small
    arrays a cache writer keeps fragmented the heap: RSS grew ~300 MB per SmolLM2 batch)."""
    flat = logits.reshape(-1, logits.shape[-1])
    step = max(1, chunk_bytes // (4 * flat.shape[-1]))
    parts = [top_k_of_dense(flat[i:i + step], k, temperature) for i in range(0, flat.shape[0], step)]
    ids, logprobs, tail = (torch.cat(part) for part in zip(*parts, strict=True))
    rows = logits.shape[:-1]
    return ids.view(*rows, k), logprobs.view(*rows, k), tail.view(rows)
