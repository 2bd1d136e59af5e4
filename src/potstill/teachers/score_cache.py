"""A teacher's outputs computed once per run and cached on disk with a manifest; the ranking teacher's scores.

`cached_tensor` keeps one tensor in a folder of the run (`embeddings.safetensors` + `manifest.json` with the
file's sha256): the main process computes it unless the stored manifest equals the current one and the
checksum holds, and every process then reads the file, so a resumed run reuses it.

The ranking teacher (`TeacherScoreCache`, in `<run>/teacher_cache/`):
- the (Q, 1 + N) scores of each training query's candidates, positive first, computed by the teacher model;
  or, when `ranking.teacher_scores` names score files (`potstill.teachers.score_file.ScoreFile`), looked up
  in them; several files form the heterogeneous ensemble `minmax_ensemble` (each file min–max normalised per
  query over its candidates, then `ensemble_scale` × their mean; Geng et al. 2024);
- a bi-encoder teacher's vectors of the training queries, then of their positives, (2Q, D), for in-batch
  scores (`teacher_cache/in_batch/`).
The manifest (`score_manifest`) names the teacher, its config, the score files, the tokenizer, the data and
the scoring options, so a change of any of them recomputes the cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from potstill.data.loaders import fingerprint_records
from potstill.io import atomic_dir, sha256_file
from potstill.teachers.score_file import ScoreFile

CACHE_FORMAT = 1


def cached_tensor(folder: Path, manifest: dict[str, Any], key: str, compute: Callable[[], torch.Tensor], *,
                  is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> torch.Tensor:
    """A tensor computed once per run and kept in `folder` (`<key>` in embeddings.safetensors + manifest.json
    with its sha256): the main process calls `compute()` unless the stored manifest equals `manifest` and the
    checksum holds; every process then reads the file."""
    from safetensors.torch import load_file, save_file

    folder, data = Path(folder), Path(folder) / "embeddings.safetensors"
    if is_main and not _cache_valid(folder, manifest):
        value = compute()
        with atomic_dir(folder) as tmp:
            save_file({key: value.contiguous()}, str(tmp / data.name))
            (tmp / "manifest.json").write_text(json.dumps({**manifest, "sha256": sha256_file(tmp / data.name)},
                                                          indent=2))
    barrier()
    return load_file(str(data))[key]


def _cache_valid(folder: Path, manifest: dict[str, Any]) -> bool:
    try:
        stored = json.loads((folder / "manifest.json").read_text())
        digest = stored.pop("sha256", None)
        return stored == manifest and digest == sha256_file(folder / "embeddings.safetensors")
    except (OSError, ValueError):
        return False


def load_score_files(paths: str | list[str] | None) -> list[ScoreFile]:
    """The score files of `ranking.teacher_scores` (one path or several), none when unset."""
    if paths is None:
        return []
    return [ScoreFile.load(path) for path in ([paths] if isinstance(paths, str) else paths)]


def score_manifest(*, teacher_path: Any, teacher_type: str, teacher: Any, score_files: list[ScoreFile],
                   ensemble_scale: float, tokenizer: Any, records: list[dict], max_length: int, pooling: str,
                   similarity: str) -> dict[str, Any]:
    """What the cached ranking teacher scores depend on (`teacher` is the model, or None with score files)."""
    config = teacher.config.to_json_string() if teacher is not None else ""
    return {"format": CACHE_FORMAT, "teacher": str(teacher_path), "teacher_type": teacher_type,
            "teacher_config": hashlib.sha256(config.encode()).hexdigest(),
            "teacher_scores": [f.sha256 for f in score_files], "ensemble_scale": ensemble_scale,
            "tokenizer": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "data": fingerprint_records(records), "rows": len(records),
            "max_length": max_length, "pooling": pooling, "similarity": similarity}


class TeacherScoreCache:
    """The ranking teacher's cached candidate scores and in-batch vectors in `folder` (`<run>/teacher_cache`),
    under `manifest`; with `score_files`, the candidate scores come from them instead."""

    def __init__(self, folder: Path, manifest: dict[str, Any], score_files: list[ScoreFile], *,
                 ensemble_scale: float = 1.0) -> None:
        self.folder, self.manifest = Path(folder), manifest
        self.score_files, self.ensemble_scale = score_files, ensemble_scale

    def candidate_scores(self, records: list[dict], compute: Callable[[], torch.Tensor], *, is_main: bool = True,
                         barrier: Callable[[], None] = lambda: None) -> torch.Tensor:
        """(Q, 1 + N) teacher scores of the records' candidates: from the score files, else `compute()` once."""
        if self.score_files:
            return self.file_scores(records)
        return cached_tensor(self.folder, self.manifest, "scores", compute, is_main=is_main, barrier=barrier)

    def in_batch_vectors(self, compute: Callable[[], torch.Tensor], *, is_main: bool = True,
                         barrier: Callable[[], None] = lambda: None) -> torch.Tensor:
        """A bi-encoder teacher's (2Q, D) vectors of the training queries, then of their positives."""
        return cached_tensor(self.folder / "in_batch", self.manifest, "vectors", compute, is_main=is_main,
                             barrier=barrier)

    def covers(self, records: list[dict]) -> bool:
        """Whether the score files hold every (query, candidate) pair of `records` (False without files)."""
        return bool(self.score_files) and all(f.has_pair(rec["query"], p) for f in self.score_files
                                              for rec in records for p in (rec["positive"], *rec["negatives"]))

    def file_scores(self, records: list[dict]) -> torch.Tensor:
        """(B, 1 + N) teacher scores from the score file, or from several: the heterogeneous ensemble
        `minmax_ensemble` (each file min–max normalised per query over its candidates, then
        ensemble_scale × their mean)."""
        scores = [f.scores_for_records(records) for f in self.score_files]
        if len(scores) == 1:
            return scores[0]
        from potstill.teachers.ensemble import minmax_ensemble

        return minmax_ensemble(scores, scale=self.ensemble_scale)
