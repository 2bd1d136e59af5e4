"""What a task hands to the objectives: the typed signals of a batch.

A teacher's or a student's signal for one batch is one of:
- a `Tensor`: logits `[..., C]` (classification, causal_lm, seq2seq) or pooled embeddings `[B, D]`;
- `Signals`: that main signal plus the internals (hidden states, q/k/v, router logits) that objectives on
  internals read;
- `RankingScores`: the ranking task's candidate and in-batch score matrices;
- `potstill.losses.fused.LMHeadInputs`: a student's lm_head inputs (`trainer.fused_lm_head`);
- `potstill.losses.sparse.TopKTeacher`: a cached teacher's top-k log-probs;
- `SpanLogits`: one side's logits per aligned span when teacher and student tokenizers differ (uld, gold,
  first_token_kl);
- `VisionLanguageSignal`: the vision_language task's zero-shot logits with the image vectors and class text
  they come from, for objectives that compare embeddings (VL2V-ADiP, the large-VLM OOD losses);
- `GraphSignal`: the graph task's node logits with the node vectors (and, the teacher's, its codebook) that
  VQGraph's code loss compares.

`Signal` names that union, for type hints. This module knows only torch at run time (the two loss-side
classes are named for the type checker only), so that every part (tasks, teachers, students, the loop) can
import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias, Union

from torch import Tensor

if TYPE_CHECKING:
    from potstill.losses.fused import LMHeadInputs
    from potstill.losses.sparse import TopKTeacher


@dataclass
class Signals:
    """A task's signal plus the internals the objectives asked for."""

    main: Any
    token_mask: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    qkv: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    # a mixture-of-experts student's router logits, one [B·T, E] per MoE layer (objective moe_router_aux)
    router_logits: tuple[Tensor, ...] | None = None


@dataclass
class RankingScores:
    """The ranking task's signal: each query's candidate scores and, when asked for, its in-batch scores.

    `candidates` (B, 1 + N), the positive first; `in_batch` (B, B), query i against the positive of batch
    item j (diagonal: its own positive); `in_batch_mask` (B, B), True where passage j is not relevant to
    query i (the pair counts). A splade student also gives its term weights, `query_terms` (B, V; None
    when inference-free) and `passage_terms` (B·(1 + N), V), for the `sparse_flops` regulariser.
    """

    candidates: Tensor
    in_batch: Tensor | None = None
    in_batch_mask: Tensor | None = None
    query_terms: Tensor | None = None
    passage_terms: Tensor | None = None


@dataclass
class SpanLogits:
    """Cross-tokenizer signal (`potstill.tasks.cross_tokenizer`): one side's logits at the first position of each
    aligned span, `logits` `[N, V]` (its own vocabulary), and `log_scale` `[N]`, the summed log-probabilities
    of the span's later tokens (0 for a one-token span). The teacher's also carries `matched_ids` `(M, 2)`,
    the (teacher id, student id) pairs of tokens both vocabularies share (GOLD's hybrid loss); read from a
    top-k cache, its `logits` are a `TopKTeacher` `[N, k]` (the first token's normalised log-probs) and `vocab`
    is its vocabulary size. The student's also carries its `token_logits` `[B, T, V]`, for the hard-label loss.
    `first_token_of` `[V_t]` (teacher's side, when an objective asks for it): each teacher id → the student
    token its text starts with (`first_token_kl`)."""

    logits: Tensor | TopKTeacher
    log_scale: Tensor
    matched_ids: Tensor | None = None
    token_logits: Tensor | None = None
    vocab: int | None = None
    first_token_of: Tensor | None = None


@dataclass
class VisionLanguageSignal:
    """One side of a vision_language batch when an objective reads embeddings (kind "vision_language").

    `logits` (B, C): zero-shot logits s·⟨ℓ2n(image), t_c⟩, what logit objectives read; `image` (B, D): the image
    vectors (the teacher's are unit length, the student's are its raw outputs); `class_text` (C, D): the unit
    class text features t_c both sides share."""

    logits: Tensor
    image: Tensor
    class_text: Tensor


@dataclass
class GraphSignal:
    """One side of a `graph` task batch of nodes (objective kind "graph").

    `logits` (B, C): the class logits, what logit objectives read; `hidden` (B, d): the node vectors, the
    teacher's pre-quantisation embedding h or the student MLP's last hidden layer z; `codebook` (M, d): the
    teacher's codewords (None on the student's side). A student that returns logits only has `hidden` None."""

    logits: Tensor
    hidden: Tensor | None
    codebook: Tensor | None = None


#: What `Task.teacher_signal` / `Task.student_signal` return for one batch.
Signal: TypeAlias = Union[Tensor, Signals, RankingScores, SpanLogits, VisionLanguageSignal, GraphSignal,  # noqa: UP007
                          "LMHeadInputs", "TopKTeacher"]
