"""Sequence-level knowledge distillation (Kim & Rush, 2016, "Sequence-Level Knowledge Distillation").

Instead of matching the teacher's per-token distributions on the reference text, the student is trained on
the teacher's own output: each training prompt is completed by the teacher (`generation.seq_kd`;
`generation.max_new_tokens`, temperature, top-k, top-p) and the completion replaces the reference, so the
student imitates the sequences the teacher would produce (the paper's beam-search output approximates the
teacher's mode; sampling at temperature 0 is greedy).

The completions are generated once, before training:

- by the live teacher model (`live_completions`), 8 prompts at a time, each batch seeded by its position;
- or by a text-only teacher behind an OpenAI-compatible endpoint (`endpoint_completions`, through
  `EndpointTeacher.complete_many`; every request carries the recipe's seed and is kept in the response cache).

They are stored as `seq_kd_completions.json` inside the top-k teacher cache (written by `potstill cache`) or
in the run folder, under a key (sha256 of the prompts, the sampling settings, the seed and the teacher), and
reused on resume while the key matches; a cache whose completions do not match is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from potstill.data.sampling import SamplingSettings, sample_completions, sampling_settings
from potstill.errors import UserError
from potstill.io import atomic_write_json

SEQ_KD_FILE = "seq_kd_completions.json"


def teacher_label(teacher_cfg: Any) -> str:
    """The teacher the completions come from, as stored with them: `model at base_url`, path or factory."""
    endpoint = teacher_cfg.endpoint
    if endpoint is not None:
        return f"{endpoint.model} at {endpoint.base_url}"
    return teacher_cfg.path or teacher_cfg.factory


def seq_kd_key(prompts: list[list[int]], settings: SamplingSettings, seed: int, teacher: str) -> str:
    """sha256 of what the completions depend on."""
    return hashlib.sha256(json.dumps({"prompts": prompts, "settings": asdict(settings), "seed": seed,
                                      "teacher": teacher}, sort_keys=True).encode()).hexdigest()


def live_completions(teacher: nn.Module, prompts: list[list[int]], settings: SamplingSettings, *, pad_id: int,
                     eos_id: int | None, seed: int) -> list[list[int]]:
    """Seq-KD with the live teacher model: sampled 8 prompts at a time, each batch seeded by its position."""
    from potstill.ui import task_progress

    completions, batch = [], 8
    with task_progress("teacher completions (seq-KD)", len(prompts)) as advance:
        for first in range(0, len(prompts), batch):
            completions += sample_completions(teacher, prompts[first:first + batch], settings=settings,
                                              pad_token_id=pad_id, eos_token_id=eos_id,
                                              seed=seed * 1_000_003 + first)
            advance(len(prompts[first:first + batch]))
    return completions


def endpoint_completions(endpoint_cfg: Any, prompts: list[list[int]], settings: SamplingSettings, *, tokenizer: Any,
                         seed: int, run_dir: Path) -> list[list[int]]:
    """Black-box seq-KD: each prompt (decoded, without the BOS the server's tokenizer adds again) goes to the
    endpoint's /completions route; the text that comes back is tokenized (+ EOS when the teacher stopped on
    its own). Every request carries `seed`, so a re-run asks the same requests, which the response cache
    (`teacher.endpoint.cache`, else `endpoint_cache.sqlite` in the run folder) answers."""
    from potstill.teachers.endpoint import EndpointTeacher
    from potstill.ui import task_progress

    cfg = endpoint_cfg
    bos = tokenizer.bos_token_id
    texts = [tokenizer.decode(p[1:] if p and p[0] == bos else p) for p in prompts]
    cache = Path(cfg.cache) if cfg.cache else run_dir / "endpoint_cache.sqlite"
    run_dir.mkdir(parents=True, exist_ok=True)
    teacher = EndpointTeacher(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, cache=cache,
                              concurrency=cfg.concurrency, timeout=cfg.timeout, max_retries=cfg.max_retries,
                              requests_per_second=cfg.requests_per_second)
    with teacher, task_progress("teacher completions (endpoint seq-KD)", len(texts)) as advance:
        results = teacher.complete_many(texts, max_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                        top_p=settings.top_p, seed=seed, on_done=lambda _i, _r: advance(1))
    failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
    if failed:
        raise UserError(f"teacher.endpoint: {len(failed)} of {len(texts)} prompts failed after retries (first: "
                        f"record {failed[0] + 1}: {results[failed[0]]}); run again: answered prompts come from "
                        f"the response cache {cache}")
    answers = [r for r in results if not isinstance(r, Exception)]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [list(tokenizer(r.text, add_special_tokens=False)["input_ids"]) + (eos if r.finish_reason == "stop" else [])
            for r in answers]


def recipe_completions(recipe: Any, prompts: list[list[int]], *, teacher: nn.Module | None, tokenizer: Any,
                       pad_id: int, cache: Any, run_dir: Path, capture: bool, is_main: bool = True,
                       barrier: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """`seq_kd_completions` for a recipe: its `generation` settings and seed, from `teacher.endpoint` when set,
    else the live `teacher`; kept in `cache`, else in `run_dir` (none while `potstill cache` is `capture`-ing:
    the cache it writes keeps them)."""
    settings = sampling_settings(recipe.generation)

    def generate() -> list[list[int]]:
        if recipe.teacher.endpoint is not None:
            return endpoint_completions(recipe.teacher.endpoint, prompts, settings, tokenizer=tokenizer,
                                        seed=recipe.seed, run_dir=run_dir)
        return live_completions(teacher, prompts, settings, pad_id=pad_id, eos_id=tokenizer.eos_token_id,
                                seed=recipe.seed)

    return seq_kd_completions(prompts, settings, seed=recipe.seed, teacher=teacher_label(recipe.teacher),
                              generate=generate, cache=cache, run_dir=None if capture else run_dir,
                              is_main=is_main, barrier=barrier)


def seq_kd_completions(prompts: list[list[int]], settings: SamplingSettings, *, seed: int, teacher: str,
                       generate: Callable[[], list[list[int]]], cache: Any = None, run_dir: Path | None = None,
                       is_main: bool = True, barrier: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """The stored completions file ({key, teacher, settings, completions}) for `prompts`.

    With `cache` (a `TopKCache`) it must hold them under the matching key. Otherwise they are read from
    `run_dir` when the key matches, else the main process calls `generate()` and writes them there (not with
    `run_dir=None`: `potstill cache` stores them in the cache it writes); other processes then read them.
    """
    key = seq_kd_key(prompts, settings, seed, teacher)
    if cache is not None:
        raw = cache.read_file(SEQ_KD_FILE)
        stored = json.loads(raw) if raw is not None else None
        if stored is None or stored.get("key") != key:
            raise UserError(f"teacher.cache {cache.path}: " + (
                "holds no seq-KD completions" if stored is None else
                "its seq-KD completions were generated for other prompts, teacher or generation settings")
                + "; rebuild it with `potstill cache` and this recipe (generation.seq_kd: true)")
        return stored
    path = None if run_dir is None else run_dir / SEQ_KD_FILE
    stored = json.loads(path.read_text()) if path is not None and path.exists() else None
    if stored is None or stored.get("key") != key:
        if is_main:
            stored = {"key": key, "teacher": teacher, "settings": asdict(settings), "completions": generate()}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(path, stored)
        barrier()
        if not is_main:
            if path is None:
                raise ValueError("seq_kd_completions: several processes need a run_dir to share the completions")
            stored = json.loads(path.read_text())
    return stored
