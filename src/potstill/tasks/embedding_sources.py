"""Sentence encoders as frozen sources of vectors: one encoder over a list of texts, and DistillWeighted's
weighted sources (`teacher.sources` of an embedding recipe) as one target matrix.

Each source is read with its own tokenizer and pooled as the recipe says; its vectors are made unit length, scaled
by √w_s and set side by side by `potstill.teachers.ensemble.weighted_concatenation`, so the embedding task's
`embedding_mse` through one learned projection is Σ_s w_s times each source's squared error through a head of its
own (Borup, Phoo & Hariharan 2023).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from potstill.encoder_inputs import encoder_inputs


def encoder_embeddings(path: str, texts: list[str], *, pooling: str, max_length: int, batch_size: int = 64,
                       field: str = "teacher.path", progress: Callable[[int], Any] | None = None) -> torch.Tensor:
    """Sentence embeddings (n, d), float32 on the CPU, of `texts` from the frozen encoder at `path` (a folder,
    `builtin:<name>` or a Hugging Face id), pooled by `pooling` ("mean" or "cls"), truncated to `max_length`."""
    from transformers import AutoModel

    from potstill.students.encode import encode_texts, pool
    from potstill.tasks.models import load_hf_teacher

    model, tokenizer = load_hf_teacher(path, AutoModel, field=field)

    def embed(chunk: list[str]) -> torch.Tensor:
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return pool(model(**encoder_inputs(batch)).last_hidden_state, batch["attention_mask"], pooling)

    return encode_texts(model, texts, embed, batch_size=batch_size, progress=progress)


def weighted_source_vectors(sources: Sequence[Any], texts: list[str], *, pooling: str, max_length: int,
                            batch_size: int) -> torch.Tensor:
    """DistillWeighted's target: every `teacher.sources` entry (path, weight) over `texts`, combined by
    `weighted_concatenation`; a progress bar per source."""
    from potstill.teachers.ensemble import weighted_concatenation
    from potstill.ui import task_progress

    vectors = []
    for i, source in enumerate(sources):
        with task_progress(f"source {i + 1}/{len(sources)} ({source.path}) embeddings", len(texts)) as advance:
            vectors.append(encoder_embeddings(str(source.path), texts, pooling=pooling, max_length=max_length,
                                              batch_size=batch_size, field=f"teacher.sources.{i}.path",
                                              progress=advance))
    return weighted_concatenation(vectors, [source.weight for source in sources])


def source_widths(sources: Sequence[Any]) -> list[int]:
    """The width of each `teacher.sources` encoder's pooled vectors (its config's hidden size; no weights read)."""
    from transformers import AutoConfig

    from potstill.students.loading import resolve_model_path

    return [int(AutoConfig.from_pretrained(resolve_model_path(str(source.path), field=f"teacher.sources.{i}.path"))
                .hidden_size) for i, source in enumerate(sources)]
