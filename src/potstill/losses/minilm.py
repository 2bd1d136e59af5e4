"""MiniLM and MiniLMv2: distilling a transformer's self-attention relations.

MiniLM (Wang et al. 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
Pre-Trained Transformers"), objective `attention_kl`: the student's last layer mimics the teacher's last layer
through two distributions per head and token, the attention softmax(Q·Kᵀ/√d_k) and the value relation
softmax(V·Vᵀ/√d_k), each compared by KL(teacher ‖ student) over the keys and averaged over heads and tokens:
L = L_AT + L_VR. Heads are compared one to one, so the head counts must be equal.

MiniLMv2 (Wang et al. 2021, "MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing
Pretrained Transformers"), objective `minilm_relations`: the concatenated queries, keys and values of one
layer are re-split into A_r relation heads and the q-q, k-k and v-v relations R = x_a·x_aᵀ/√d_r are compared the
same way, summed over the relations. Teacher and student head counts may differ: A_r must divide both widths.

A relation row is one (example, head, query token); padded keys are left out of every softmax and padded
queries do not count (`mask`, the `[B, T]` attention mask). The relations themselves are
`potstill.losses.attention.relation_logits`; layer maps and the `bind` / `needs` protocol are those of
`potstill.losses.intermediate`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import Tensor

from .attention import _check_relations, relation_logits
from .divergences import forward_kl
from .intermediate import ModelShape, _Bound, _per_token, layer_map


def relation_kl(
    student_relations: Tensor,
    teacher_relations: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """KL(softmax(R_t) ‖ softmax(R_s)) over the keys, per (example, head, query) row of `[B, A, T, T]` logits.

    MiniLM's attention-transfer and value-relation losses (Wang et al. 2020) and MiniLMv2's relation loss
    (Wang et al. 2021) are this function on the relations of `relation_logits`. Padded keys (mask False) are
    dropped from both distributions; padded queries do not count. Defaults: reduction="mean" (over heads and
    real tokens).
    """
    keep = _check_relations(student_relations, teacher_relations, mask)
    rows = None
    if keep is not None:
        keys = ~keep[:, None, None, :]
        student_relations = student_relations.float().masked_fill(keys, -math.inf)
        teacher_relations = teacher_relations.float().masked_fill(keys, -math.inf)
        rows = keep[:, None, :].expand(student_relations.shape[:-1])
    return forward_kl(student_relations, teacher_relations, mask=rows, reduction=reduction)


class MiniLMAttention(_Bound):
    """MiniLM (Wang et al. 2020): KL between the teacher's and the student's attention distributions
    softmax(Q·Kᵀ/√d_k) of one layer each, plus the value relation softmax(V·Vᵀ/√d_k), averaged over heads and
    tokens: L = L_AT + L_VR. Needs equal head counts. Defaults: the last layers, value_relation=True."""

    signal = "qkv"

    def __init__(self, *, student_layer: int = -1, teacher_layer: int = -1, value_relation: bool = True) -> None:
        super().__init__([[student_layer, teacher_layer]])
        self.value_relation = bool(value_relation)
        self.heads: int | None = None

    def bind(self, student: ModelShape, teacher: ModelShape) -> None:
        if student.heads != teacher.heads:
            raise ValueError(f"attention_kl compares attention heads one to one and needs equal head counts "
                             f"(student {student.heads}, teacher {teacher.heads}); minilm_relations works with "
                             f"different counts")
        self.pairs = layer_map(self.layers_spec, student.layers, teacher.layers)
        self.heads = student.heads

    def needs(self) -> dict[str, list[int]]:
        (i, j), = self._pairs()
        return {"student": [i], "teacher": [j]}

    def forward(self, student_qkv: Mapping[int, tuple[Tensor, Tensor, Tensor]],
                teacher_qkv: Mapping[int, tuple[Tensor, Tensor, Tensor]], *, mask: Tensor | None = None,
                reduction: str = "mean") -> Tensor:
        (i, j), = self._pairs()
        (qs, ks, vs), (qt, kt, vt) = student_qkv[i], teacher_qkv[j]
        h = self.heads
        assert h is not None  # set by bind
        value = relation_kl(relation_logits(qs, ks, heads=h), relation_logits(qt, kt, heads=h), mask=mask,
                            reduction=reduction)
        if self.value_relation:
            value = value + relation_kl(relation_logits(vs, heads=h), relation_logits(vt, heads=h), mask=mask,
                                        reduction=reduction)
        return _per_token(value, h, reduction)


RELATIONS = {"qq": (0, 0), "kk": (1, 1), "vv": (2, 2)}


class MiniLMRelations(_Bound):
    """MiniLMv2 (Wang et al. 2021): multi-head self-attention relation distillation. For each relation in
    `relations` (q-q, k-k, v-v by default, equally weighted), the concatenated heads of one teacher layer and
    one student layer are re-split into `relation_heads` A_r heads and compared as
    KL(softmax(R_t) ‖ softmax(R_s)), R = x_a·x_aᵀ/√d_r, averaged over relation heads and tokens, summed over
    relations. Head counts may differ: A_r must divide both widths. Defaults: the last layers (the paper
    takes an upper-middle teacher layer for large teachers), relation_heads = the teacher's head count."""

    signal = "qkv"

    def __init__(self, *, student_layer: int = -1, teacher_layer: int = -1, relation_heads: int | None = None,
                 relations: Sequence[str] = ("qq", "kk", "vv")) -> None:
        super().__init__([[student_layer, teacher_layer]])
        unknown = [r for r in relations if r not in RELATIONS]
        if unknown or not relations:
            raise ValueError(f"relations must be a non-empty list of {sorted(RELATIONS)}, got {list(relations)!r}")
        if relation_heads is not None and (isinstance(relation_heads, bool) or not isinstance(relation_heads, int)
                                           or relation_heads < 1):
            raise ValueError(f"relation_heads must be a positive int or null, got {relation_heads!r}")
        self.relations = list(relations)
        self.relation_heads = relation_heads

    def bind(self, student: ModelShape, teacher: ModelShape) -> None:
        self.pairs = layer_map(self.layers_spec, student.layers, teacher.layers)
        heads = self.relation_heads or teacher.heads
        if student.hidden % heads or teacher.hidden % heads:
            raise ValueError(f"relation_heads={heads} must divide both widths (student {student.hidden}, teacher "
                             f"{teacher.hidden}); choose a common divisor")
        self.relation_heads = heads

    needs = MiniLMAttention.needs

    def forward(self, student_qkv: Mapping[int, tuple[Tensor, Tensor, Tensor]],
                teacher_qkv: Mapping[int, tuple[Tensor, Tensor, Tensor]], *, mask: Tensor | None = None,
                reduction: str = "mean") -> Tensor:
        (i, j), = self._pairs()
        s, t, h = student_qkv[i], teacher_qkv[j], self.relation_heads
        assert h is not None  # set by bind
        total: Tensor | None = None
        for name in self.relations:
            a, b = RELATIONS[name]
            value = relation_kl(relation_logits(s[a], s[b], heads=h), relation_logits(t[a], t[b], heads=h),
                                mask=mask, reduction=reduction)
            total = value if total is None else total + value
        assert total is not None  # `relations` is non-empty (checked in __init__)
        return _per_token(total, h, reduction)


__all__ = ["MiniLMAttention", "MiniLMRelations", "relation_kl"]
