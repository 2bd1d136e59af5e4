"""`potstill cache`: run a causal-LM teacher once over a recipe's training data and store its top-k log-probs.

The cache is keyed by training-sequence index (the task's `train_records`), so a run that reads it gets the
rows of exactly the sequences in its batch, whatever the shuffling, accumulation or number of processes. Its
manifest records what the rows depend on; a run whose teacher, tokenizer, data, k, temperature or vocabulary
differ is refused (`expected_cache_meta` is what both sides compute), and so is an objective that needs
the teacher's full logits or another temperature (`check_objectives_for_cache`). A cross-tokenizer run (the
task's `cross`) stores one row per aligned span instead of per token (`CrossTokenizer.teacher_topk_spans`).

The task is used through its duck-typed surface only (`train_records`, `collate`, `to_device`, `logits`,
`teacher`, `tokenizer`, `vocab_size`, `recipe`, `seq_kd_file`, `cross`), so this module imports no task.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from potstill.data.lm_records import tokenizer_fingerprint
from potstill.errors import UserError
from potstill.teachers.cache_format import MANIFEST, top_k_of_dense_rows
from potstill.teachers.cache_merge import merge_rank_parts, rank_part_dir
from potstill.teachers.cache_writer import TopKCacheWriter, check_cache_target
from potstill.teachers.seq_kd import SEQ_KD_FILE


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes and bytes), in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sequences_fingerprint(records: list[dict[str, Any]]) -> str:
    """sha256 of the token ids of every training sequence, in order (what the teacher's rows depend on)."""
    h = hashlib.sha256()
    for record in records:
        h.update(torch.tensor(record["input_ids"], dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()


def teacher_name(task: Any) -> str:
    recipe = task.recipe
    return recipe.teacher.path or recipe.teacher.factory or type(task.teacher).__name__


def expected_cache_meta(task: Any) -> dict[str, Any]:
    """The facts a cache must match to feed this task's training run (a cross-tokenizer task's `cross` adds
    the teacher's tokenizer and the aligned spans; its `tokenizer` is then the student's)."""
    meta = {"teacher": teacher_name(task), "teacher_weights_sha256": weights_fingerprint(task.teacher),
            "tokenizer_sha256": tokenizer_fingerprint(task.tokenizer),
            "data_sha256": sequences_fingerprint(task.train_records), "max_length": task.recipe.data.max_length,
            "vocab_size": task.vocab_size, "num_records": len(task.train_records)}
    cross = getattr(task, "cross", None)
    return meta if cross is None else {**meta, **cross.cache_meta(task.train_records)}


def check_objectives_for_cache(objectives: list[Any], cache: Any) -> None:
    """A cache holds top-k log-probs at one temperature: only divergences with a sparse form, at that T, and
    objectives that read the student alone (a mixture-of-experts student's router loss). (A cross-tokenizer
    run checks its span cache itself: `CrossTokenizer.check_cache`.)"""
    from potstill.losses.catalogue import OBJECTIVES, STUDENT_ONLY_KINDS
    from potstill.losses.sparse import sparse_version

    for i, objective in enumerate(objectives):
        if objective.name in OBJECTIVES and OBJECTIVES[objective.name].kind in STUDENT_ONLY_KINDS:
            continue
        if sparse_version(objective.name) is None:
            raise UserError(f"field objectives.{i}.name: {objective.name} needs the teacher's full logits; with "
                            f"teacher.cache use forward_kl, reverse_kl, soft_cross_entropy, generalized_jsd, "
                            f"skew_kl, skew_reverse_kl or tvd (they switch to their top-k forms)")
        t = float(objective.params.get("temperature", 1.0))
        if t != cache.temperature:
            raise UserError(f"field objectives.{i}.params.temperature: {t:g}, but {cache.path} holds the "
                            f"teacher's log-probs at temperature {cache.temperature:g}; use that temperature, or "
                            f"rebuild the cache with `potstill cache --temperature {t:g}`")


def capture_teacher_topk(task: Any, out_dir: str | Path, *, k: int = 64, temperature: float = 1.0,
                         batch_size: int = 8, overwrite: bool = False, on_batch=None, rank: int = 0,
                         world_size: int = 1, barrier=None, meta: dict[str, Any] | None = None,
                         same_forwards: bool = False) -> dict[str, Any]:
    """Write the teacher's top-`k` log-probs at `temperature` for every position of every training sequence.

    `task` is a set-up causal-LM task. `on_batch(done_sequences, total_sequences)` reports progress. Returns
    the manifest, plus "seconds".

    Several processes (`world_size` > 1, every one calling this with its `rank` and a `barrier`): rank r takes
    every `world_size`-th batch and writes its own part, which the main process joins into `out_dir`
    (`potstill.teachers.cache_merge`). `same_forwards`: the teacher is sharded (FSDP2), so every rank runs as
    many forwards as the busiest one (a spare forward's rows are dropped). `meta`: the cache facts, computed
    beforehand when the teacher is sharded (its weights' fingerprint needs the whole tensors).
    """
    import math

    cross = getattr(task, "cross", None)  # cross-tokenizer: one row per aligned span, over the teacher's vocabulary
    vocab = task.vocab_size if cross is None else cross.teacher_vocab
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise UserError(f"--k: expected a whole number from 1 to the vocabulary size {vocab}, got {k!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise UserError(f"--temperature: expected a finite number > 0 (the teacher's logits are divided by it), got "
                        f"{temperature!r}")
    start = time.perf_counter()
    records = task.train_records
    meta = {key: value for key, value in (meta or expected_cache_meta(task)).items()
            if key not in ("vocab_size", "num_records")}
    order = sorted(range(len(records)), key=lambda i: len(records[i]["input_ids"]))  # less padding per batch
    batches = [order[first:first + batch_size] for first in range(0, len(order), batch_size)]
    target = Path(out_dir)
    if world_size > 1:
        check_cache_target(target, overwrite)  # every rank sees the same folder, so all refuse alike
        target, overwrite = rank_part_dir(out_dir, rank), True
        shutil.rmtree(target, ignore_errors=True)  # a part left by an interrupted earlier attempt
    mine = batches[rank::world_size]
    rounds = -(-len(batches) // world_size) if same_forwards else len(mine)
    with TopKCacheWriter(target, k=k, temperature=temperature, vocab_size=vocab, meta=meta,
                         overwrite=overwrite) as writer:
        if getattr(task, "seq_kd_file", None) is not None and rank == 0:  # seq-KD completions live with the cache
            writer.add_file(SEQ_KD_FILE, json.dumps(task.seq_kd_file).encode())
        for j in range(rounds):
            idx = mine[j] if j < len(mine) else batches[0]
            batch = task.to_device(task.collate([records[i] for i in idx], idx))
            with torch.inference_mode():
                if cross is not None:
                    rows = cross.teacher_topk_spans(task.teacher, batch, k, temperature)
                else:
                    ids, logprobs, tail = top_k_of_dense_rows(task.logits(task.teacher, batch), k, temperature)
                    rows = [(ids[row, :n], logprobs[row, :n], tail[row, :n])
                            for row, n in enumerate(len(records[i]["input_ids"]) for i in idx)]
            if j < len(mine):
                for i, (ids_i, logprobs_i, tail_i) in zip(idx, rows, strict=True):
                    writer.add(i, (ids_i.cpu(), logprobs_i.cpu(), tail_i.cpu()))
            if on_batch is not None:
                on_batch(min((j + 1) * batch_size * world_size, len(order)), len(order))
        manifest = writer.close()
    if world_size > 1:
        barrier()
        if rank == 0:
            manifest = merge_rank_parts([rank_part_dir(out_dir, r) for r in range(world_size)], out_dir)
        barrier()
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    return {**manifest, "seconds": time.perf_counter() - start}
