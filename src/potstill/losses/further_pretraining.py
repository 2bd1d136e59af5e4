"""Self-distillation for further pre-training (Lee et al., ICLR 2023, "Self-Distillation for Further
Pre-training of Transformers"; official code seanie12/self-distillation).

Further pre-training a pretrained model θ0 on a small unlabelled target-domain corpus (MLM for text, MAE for
images) tends to overfit it. The paper's remedy has two pre-training stages:

1. φ = further-pretrain(θ0) with MLM / MAE alone; φ is the teacher.
2. θ starts again from θ0 and trains with the masked-modelling loss plus a term that pulls its representation of
   the *unmasked* input towards φ's:

       L(θ) = L_MLM(θ; masked x) + λ · (1/B) Σ_b ‖h_θ(x_b) − sg(h_φ(x_b))‖²

   where h is the final-layer [CLS] vector (after the last layer norm), the squared L2 norm is summed over
   the D dimensions, the batch mean is taken over the B inputs, and sg (stop-gradient) means only θ receives
   gradients.

3. θ is then fine-tuned on the labelled task.

`further_pretraining_sd` is the term of stage 2 (λ is the objective's weight; λ = 1 in the paper's code, which
trains ViT-B MAE for 20k steps with AdamW lr 1.5e-4, β = (0.9, 0.95), weight decay 0.01, batch 64, mask 0.75;
the text variant uses RoBERTa-style MLM: 15 % of tokens, 80 % [MASK] / 10 % random / 10 % kept).
"""

from __future__ import annotations

from torch import Tensor

from ._rows import check_reduction, check_same_shape, reduce_rows, resolve_mask


def further_pretraining_sd(
    student_cls: Tensor,
    teacher_cls: Tensor,
    *,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Per row ‖s − sg(t)‖², summed over the last axis (D); "mean" averages over the counted rows.

    `student_cls`, `teacher_cls`: `[..., D]` final-layer [CLS] vectors of the unmasked inputs (student θ,
    further-pretrained teacher φ). The teacher is detached, so only the student receives gradients. `mask`
    (bool, `shape[:-1]`, True = counted) selects rows; "none" gives the per-row values (0 where masked).
    Computed and returned in float32.
    """
    check_reduction(reduction)
    check_same_shape(student_cls, teacher_cls, "[CLS] vectors")
    row_shape = student_cls.shape[:-1]
    keep = resolve_mask(row_shape, mask, None, student_cls.device)
    s = student_cls.float().reshape(-1, student_cls.shape[-1])
    t = teacher_cls.detach().float().reshape(-1, teacher_cls.shape[-1])
    idx = None
    if keep is not None:
        idx = keep.reshape(-1).nonzero().squeeze(-1)
        s, t = s[idx], t[idx]
    return reduce_rows((s - t).square().sum(-1), idx, row_shape, reduction)
