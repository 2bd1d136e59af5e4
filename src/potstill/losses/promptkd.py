"""PromptKD's objective: a CLIP-style student matches the teacher's zero-shot logits on unlabelled images.

Li et al. 2024, "PromptKD: Unsupervised Prompt Distillation for Vision-Language Models". Both models score an
image against the same class text features t_c (the teacher's, computed once and stored):

    z_T = s·⟨ĝ_T(x), t_c⟩,   z_S = s·⟨ℓ2n(P(g_S(x; prompts))), t_c⟩,
    L   = T²·KL(softmax(z_T/T) ‖ softmax(z_S/T))       (no label term: the images are unlabelled)

with ĝ the L2-normalised image feature, P the student's projector and s the logit scale (CLIP's learned
exp(logit_scale) = 100). Defaults as in the paper: T = 1, s = 100. The KL is `forward_kl` (mean over images,
`scale_t2=True`); the official code divides by the number of logit elements instead, a constant rescale.
"""

from __future__ import annotations

from torch import Tensor

from potstill.losses.divergences import forward_kl


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """`x / ‖x‖₂` along the last axis (float32)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def clip_logits(image_features: Tensor, class_text_features: Tensor, *, scale: float = 100.0) -> Tensor:
    """Zero-shot logits `s·⟨ℓ2n(image), ℓ2n(t_c)⟩`: (N, D) image features × (C, D) class text features → (N, C)."""
    return scale * l2_normalize(image_features) @ l2_normalize(class_text_features).T


def promptkd_loss(student_features: Tensor, teacher_features: Tensor, class_text_features: Tensor, *,
                  scale: float = 100.0, temperature: float = 1.0) -> Tensor:
    """T²·KL(softmax(z_T/T) ‖ softmax(z_S/T)), averaged over the N images; z from `clip_logits` with the shared
    class text features. `student_features` are the projector's outputs (normalised here)."""
    return forward_kl(clip_logits(student_features, class_text_features, scale=scale),
                      clip_logits(teacher_features, class_text_features, scale=scale),
                      temperature=temperature, scale_t2=True)
