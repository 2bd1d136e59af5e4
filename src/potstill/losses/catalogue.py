"""The catalogue of distillation objectives, listed by `potstill objectives`."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from .bialign import bialign
from .dcd import dcd_logits, dcd_loss
from .divergences import (
    forward_kl,
    generalized_jsd,
    js_divergence,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    soft_cross_entropy,
    tvd,
)
from .embedding import embedding_cosine, embedding_mse, embedding_similarity_kl
from .first_token_kl import first_token_kl, first_token_kl_topk
from .further_pretraining import further_pretraining_sd
from .intermediate import AttentionMSE, DMAEAlign, HiddenCosine, HiddenMSE, SquareHead
from .logit_standardization import logit_std_js, logit_std_kd
from .mgsr_dac_kl import DACKL
from .mgsr_span import span_correlation
from .mi_alpha import MIAlpha
from .minilm import MiniLMAttention, MiniLMRelations
from .moe import RouterLoadBalance
from .preference import dpo_teacher_ref
from .ranking import SparseFlops, in_batch_margin_mse, listwise_kl, margin_mse, pointwise_mse
from .self_judge import self_judge
from .sinkhorn import sinkhorn
from .taid import TAID
from .uld import gold, uld
from .uld_topk import gold_topk, uld_topk
from .vl2v_adip import vl2v_adip
from .vlm_ood import vlm_ood_coherence, vlm_ood_label_ce, vlm_ood_visual_contrastive, vlm_ood_visual_mse
from .vqgraph import vqgraph_code_kl

KINDS = ("logits", "preference", "demo_sets", "router", "scores", "embedding", "vision_language", "graph",
         "hidden_states", "attention")
# "router": a mixture-of-experts student's router logits (causal_lm; the teacher's signal is not read).
# "vision_language": the vision_language task's image vectors + shared class text (`VisionLanguageSignal`).
# "graph": the graph task's node vectors + the teacher's codebook (`GraphSignal`).
# "preference": logits of a pair batch (chosen rows, then rejected rows) with the scored token ids as `labels`.
# "demo_sets": logits of B queries × M demonstration-set prompts (query-major), scored token ids as `labels`:
# causal_lm with data.format: icl (`potstill.tasks.causal_lm_icl`; batches from `potstill.data.icl_demos`).
# Not listed: the sparse-retriever regularisers `ranking.flops` / `ranking.idf_flops` take only the student's
# term weights (no teacher signal), which no task feeds an objective yet.
# Kinds read from a model's internals: any task whose models are Hugging Face transformers provides them.
INTERNAL_KINDS = ("hidden_states", "attention")
# Kinds that read the student's signal only: they need no teacher logits (a top-k teacher cache serves them).
STUDENT_ONLY_KINDS = ("router",)
# Logit objectives that compare two vocabularies on aligned spans of text (a cross-tokenizer causal_lm run), each
# with its form against a cached top-k teacher (`teacher.cache`), which the objective switches to.
CROSS_TOKENIZER_OBJECTIVES: dict[str, Callable] = {"uld": uld_topk, "gold": gold_topk,
                                                   "first_token_kl": first_token_kl_topk}


@dataclass(frozen=True)
class ObjectiveInfo:
    """One objective: its function, the task signal it consumes (`kind`), formula, defaults and paper.

    `stateful` is False for a pure loss function, called as `fn(student, teacher, mask=…, reduction=…, **params)`.
    It is True when `fn` is an `nn.Module` class: instantiate it once per run with the params (`fn(**params)`),
    call the instance like a loss (`obj(student, teacher, mask=…, reduction=…)`), checkpoint its `state_dict()`,
    and call its `on_optimizer_step(loss, step, total_steps)` once per optimizer step. `defaults` then lists the
    constructor's keyword arguments.
    """

    name: str
    fn: Callable
    kind: str
    formula: str
    defaults: dict
    paper: str
    notes: str = ""
    stateful: bool = False


# Filled in by the task from the batch, never by a recipe (uld / gold / first_token_kl: merged spans, matched
# vocabulary, first-token map).
_DATA_ARGS = ("mask", "labels", "student_log_scale", "teacher_log_scale", "matched_ids", "first_token_of", "span_ids",
              "target_ids", "num_sets", "teacher_scores")


def _defaults(fn: Callable) -> dict:
    """Keyword-only defaults of a loss function, or of a stateful objective class's constructor."""
    params = inspect.signature(fn).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _DATA_ARGS
    }


def _entry(fn: Callable, kind: str, formula: str, paper: str, notes: str = "", name: str = "") -> ObjectiveInfo:
    stateful = inspect.isclass(fn)
    return ObjectiveInfo(name or fn.__name__, fn, kind, formula, _defaults(fn), paper, notes, stateful)


_HINTON = 'Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"'
_MGSR = 'Liu et al. 2024, "Multi-Granularity Semantic Revision for Large Language Model Distillation" (MGSR)'
_VLM_OOD = 'Li et al. 2023, "Distilling Large Vision-Language Model with Out-of-Distribution Generalizability"'
_DISTILLM = 'Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models"'

OBJECTIVES: dict[str, ObjectiveInfo] = {
    info.name: info
    for info in (
        _entry(
            forward_kl,
            "logits",
            "KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s), p = softmax(z/T)",
            _HINTON,
            "true KL (0 at a perfect match); scale_t2=True gives the usual T²-scaled KD loss",
        ),
        _entry(
            reverse_kl,
            "logits",
            "KL(p_s ‖ p_t) = Σ p_s (log p_s − log p_t)",
            'Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models"',
            "mode-seeking",
        ),
        _entry(
            soft_cross_entropy,
            "logits",
            "H(p_t, p_s) = −Σ p_t log p_s",
            _HINTON,
            'the "KD" loss of TextBrewer / DistiLLM; equals forward_kl + teacher entropy',
        ),
        _entry(
            generalized_jsd,
            "logits",
            "β·KL(p_t ‖ m) + (1−β)·KL(p_s ‖ m), m = β·p_t + (1−β)·p_s",
            'Agarwal et al. 2024, "On-Policy Distillation of Language Models" (GKD)',
            "β = 0 is forward_kl and β = 1 is reverse_kl (TRL's convention)",
        ),
        _entry(
            js_divergence,
            "logits",
            "½·KL(p_t ‖ m) + ½·KL(p_s ‖ m), m = (p_t + p_s)/2",
            'Cui et al. 2021, "Beyond Self-Supervision: A Simple Yet Effective Network Distillation Alternative '
            'to Improve Backbones" (SSLD)',
            "symmetric, ≤ log 2, no label term: trains on unlabelled data; generalized_jsd at β = ½",
        ),
        _entry(
            logit_std_kd,
            "logits",
            "KL(softmax(Z(z_t)/T) ‖ softmax(Z(z_s)/T)), Z(z) = (z − mean z) / (std z + 1e-7) per row",
            'Sun et al. 2024, "Logit Standardization in Knowledge Distillation" (CVPR)',
            "T is a base temperature on unit-scale logits; matches class relations, not the teacher's logit range",
        ),
        _entry(
            logit_std_js,
            "logits",
            "½·KL(p_t ‖ m) + ½·KL(p_s ‖ m), p = softmax(Z(z)/T), m = (p_t + p_s)/2, Z as in logit_std_kd",
            'Sun et al. 2024 (logit standardisation) before Cui et al. 2021\'s JS (SSLD)',
            "no label term: SSLD's loss for a teacher whose raw softmax is one-hot",
        ),
        _entry(skew_kl, "logits", "KL(p_t ‖ α·p_t + (1−α)·p_s)", _DISTILLM, "α = 0 is forward_kl"),
        _entry(skew_reverse_kl, "logits", "KL(p_s ‖ (1−α)·p_t + α·p_s)", _DISTILLM, "α = 0 is reverse_kl"),
        _entry(
            tvd,
            "logits",
            "½ Σ |p_t − p_s|",
            'Wen et al. 2023, "f-Divergence Minimization for Sequence-Level Knowledge Distillation"',
            "bounded in [0, 1]",
        ),
        _entry(
            uld,
            "logits",
            "Σ_k |sort↓(p_s)_k − sort↓(p_t)_k| per aligned span, narrower vocabulary zero-padded",
            'Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss '
            'for LLMs"',
            "teacher and student tokenizers may differ (causal_lm: spans aligned by byte offsets, split tokens "
            "merged); with teacher.cache its top-k form, uld_topk",
        ),
        _entry(
            gold,
            "logits",
            "w·JSD_β(p_s^M, p_t^M) + (1−w)·sorted-L1(p_s^U, p_t^U), M = same-string ids, w = |M| / V_t",
            "TRL GOLDTrainer (hybrid ULD); Boizard et al. 2024 (ULD), Agarwal et al. 2024 (GKD)",
            "cross-tokenizer like uld; the task fills matched_ids from the two vocabularies; with teacher.cache "
            "gold_topk",
        ),
        _entry(
            first_token_kl,
            "logits",
            "KL(q ‖ p_s) per aligned span, q(s) = Σ_{t: π(t) = s} p_t(t), π(t) = the student token t's text starts "
            "with",
            "potstill's own; the prefix mass of Phan et al. 2024, \"Exact Byte-Level Probabilities from Tokenized "
            "Language Models\"",
            "cross-tokenizer like uld; the task fills first_token_of from the two vocabularies; with teacher.cache "
            "first_token_kl_topk",
        ),
        _entry(
            TAID,
            "logits",
            "KL(p_t ‖ p_s), p_t = softmax((1−t)·sg(z_s) + t·z_t), t: t_start → t_end, adaptive",
            'Shing et al. 2025, "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge '
            'Transfer in Language Models" (ICLR)',
            "stateful (t, momentum, prev_loss); t = 1 is forward_kl; the official code uses H(p_t, p_s)",
            name="taid",
        ),
        _entry(
            DACKL,
            "logits",
            "KL(p̃ ‖ q̃), p̃ ∝ w·p_t, q̃ ∝ w·p_s, w = soft band [lo, hi] of log p_t from a learned net g_φ(sorted p_t), "
            "target token kept",
            _MGSR,
            "MGSR's token level; the clipping net trains with the student; a coverage penalty keeps the band wide",
            name="dac_kl",
        ),
        _entry(
            span_correlation,
            "logits",
            "Σ_spans (1/n)·‖Q Qᵀ − P Pᵀ‖²_F, rows of P, Q = teacher / student probabilities of a span's n tokens",
            _MGSR,
            "MGSR's span level: spans of span_length counted tokens, or span_ids (words) when the batch has them",
        ),
        _entry(
            self_judge,
            "logits",
            "CE(z_ref, y) + α·CE(z_free, y) + β·KL(softmax(sg(z_ref)) ‖ softmax(z_free)) at the score token; "
            "score = Σ_k k·p(k) over digits 0–9",
            'Ye & Ng 2024, "Self-Judge: Selective Instruction Following with Alignment Self-Evaluation" (Self-J)',
            "student = reference-free view, teacher = reference-guided view of the same judge; α = 0.3, β = 2 (the "
            "authors' script); labels optional (KL only without them); potstill.students.self_judge trains a head",
        ),
        _entry(
            sinkhorn,
            "logits",
            "Σ_ij Π_ij W_ij, W_ij = ‖p_s,i − p_t,j‖₁ over the batch's rows, Π = Sinkhorn(exp(−W/ε))",
            'Cui et al. 2024, "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation" (LREC-COLING)',
            "batch-wise OT (one problem per micro-batch, or per block_size rows); official weight 1e-3 next to KD",
        ),
        _entry(
            dpo_teacher_ref,
            "preference",
            "−log σ(β[(log π_s(y_w|x) − log π_t(y_w|x)) − (log π_s(y_l|x) − log π_t(y_l|x))]), log π summed over "
            "completion tokens",
            'Shu et al. 2024, "LLaVA-MoD: Making LLaVA Tiny via MoE Knowledge Distillation" (DPO: Rafailov et al. '
            '2023)',
            "DPO with the frozen teacher as reference; needs data.format: preference; loss_type kto_pair (LLaVA-MoD's "
            "scripts); log 2 when student = teacher",
        ),
        _entry(
            bialign,
            "demo_sets",
            "KL(p_t ‖ p_s) on target tokens + μ·Σ_{a<b} max(0, s_π(b) − s_π(a) + (b−a)·λ), "
            "s_j = mean log p(y | D_j, x), π = teacher's order of the M demo sets",
            'Qin et al. 2023, "Improving In-context Learning via Bidirectional Alignment" (BiAlign, arXiv 2312.17055)',
            "input-preference ranking over M demonstration sets + output KD; causal_lm with data.format: icl (M = "
            "data.icl.num_sets); 0 rank loss when the student follows the teacher's order with λ gaps",
        ),
        _entry(
            RouterLoadBalance,
            "router",
            "E · Σ_e f_e · P_e, f_e = share of top-k routing choices to expert e, P_e = mean router probability",
            'Fedus et al. 2021, "Switch Transformers" (load balancing); Shu et al. 2024, "LLaVA-MoD" (KD + CE + '
            'router aux)',
            "the student's routers only (Mixtral / Qwen2-MoE students); k when balanced; LLaVA-MoD weight 0.01",
            name="moe_router_aux",
        ),
        _entry(
            HiddenMSE,
            "hidden_states",
            "mean over layer pairs (i, j) of (1/D) Σ (P·h_s^i − h_t^j)², per real token",
            'Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language Understanding"',
            "layers: uniform | last | [[i, j], ...] (-1 = embeddings); P = learned Linear when widths differ",
            name="hidden_mse",
        ),
        _entry(
            MIAlpha,
            "hidden_states",
            "−I_α per layer pair, I_α = 1 + mean_j[f_jj − log(α m⁺_j + (1−α) q_j)] − mean_{i≠j}[e^{f_ij} / (α m⁻_j + "
            "(1−α) q_j)], f = (P_t h_t)·(P_s h_s)/√d_c over the batch's real tokens",
            'He et al. 2021, "Distiller: A Systematic Study of Model Distillation Methods in Natural Language '
            'Processing" (MI-α); Poole et al. 2019 (interpolated bound)',
            "α = 1: InfoNCE (≤ log K, low variance); α = 0: NWJ (high variance); learned critic and baseline "
            "(critic quadratic adds learned squares); layers as hidden_mse",
            name="mi_alpha",
        ),
        _entry(
            HiddenCosine,
            "hidden_states",
            "mean over layer pairs of 1 − cos(P·h_s^i, h_t^j), per real token",
            'Sanh et al. 2019, "DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter"',
            "layers and projection as hidden_mse",
            name="hidden_cosine",
        ),
        _entry(
            SquareHead,
            "hidden_states",
            "Σ over layer pairs of mean((h_s − h_t)²) / (mean(h_t²) + ε)",
            'Kurtic et al. 2023, "Sparse Finetuning for Inference Acceleration of Large Language Models"',
            "scale-invariant per layer; normalizer: second_moment (code) | variance (paper)",
            name="squarehead",
        ),
        _entry(
            DMAEAlign,
            "hidden_states",
            "mean |ℓ2n(P·h_s^i) − ℓ2n(h_t^j)| per visible token; the teacher runs to block j on the student's patches",
            'Bai et al. 2023, "Masked Autoencoders Enable Efficient Knowledge Distillers" (CVPR)',
            "vision task (with the student's MAE loss as trainer.hard_label_weight); DMAE ViT-B/L: layers [[8, 17]]",
            name="dmae_align",
        ),
        _entry(
            MiniLMAttention,
            "attention",
            "KL(A_t ‖ A_s) + KL(VR_t ‖ VR_s), A = softmax(QKᵀ/√d), VR = softmax(VVᵀ/√d), mean over heads, tokens",
            'Wang et al. 2020, "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of '
            'Pre-Trained Transformers"',
            "one layer each (default: the last); needs equal head counts",
            name="attention_kl",
        ),
        _entry(
            MiniLMRelations,
            "attention",
            "Σ_{qq,kk,vv} KL(softmax(x_t x_tᵀ/√d_r) ‖ softmax(x_s x_sᵀ/√d_r)) over A_r relation heads",
            'Wang et al. 2021, "MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing '
            'Pretrained Transformers"',
            "head counts may differ: relation_heads must divide both widths (default: the teacher's heads)",
            name="minilm_relations",
        ),
        _entry(
            AttentionMSE,
            "attention",
            "Σ over layer pairs of MSE(Q_s K_sᵀ/√d, Q_t K_tᵀ/√d) per head, mean over real keys and tokens",
            'Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language Understanding"',
            "pre-softmax scores; needs equal head counts",
            name="attention_mse",
        ),
        _entry(
            margin_mse,
            "scores",
            "mean over negatives of ((s⁺ − s⁻) − (t⁺ − t⁻))²",
            "Hofstätter et al. 2020, "
            '"Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge Distillation"',
            "negatives (B,) or (B, N)",
        ),
        _entry(
            listwise_kl,
            "scores",
            "KL(softmax(t/T) ‖ softmax(s/T)) over each query's candidates",
            "RocketQAv2 (Ren et al. 2021) / sentence-transformers DistillKLDivLoss",
            "mask (B, N) for candidates or (B,) for queries; T² only with scale_t2",
        ),
        _entry(
            in_batch_margin_mse,
            "scores",
            "mean over j≠i of ((s_ii − s_ij) − (t_ii − t_ij))², s_ij = s(q_i, d_j⁺) over the (B, B) in-batch matrix",
            'Hofstätter et al. 2021, "Efficiently Teaching an Effective Dense Retriever with Balanced Topic Aware '
            'Sampling" (TAS-B)',
            ("needs the (B, B) query × in-batch-positive matrix, not (B, 1 + N) candidate lists; optional (B, B) "
             "negatives: ½ positives + ½ negatives (official code); TAS-B weight 0.75 with margin_mse"),
        ),
        _entry(
            pointwise_mse,
            "scores",
            "mean over candidates of (s − t)²",
            "Hofstätter et al. 2020, "
            '"Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge Distillation"',
            "the pointwise baseline: needs the teacher's score scale; mask (B, N) or (B,)",
        ),
        _entry(
            dcd_loss,
            "scores",
            "α T² Σ_i w_i MSE(t_i/T, s_i/T) + (1−α) Σ_i ê_i BCE(s_i, [1,0..0]), ê_i = e_i/Σ_j e_j, e_i = Σ p log p of "
            "p = softmax(t_i), w = softmax_batch((1−ê)²)",
            'Rao et al. 2023, "Dynamic Contrastive Distillation for Image-Text Retrieval" (DCD)',
            "(B, 1 + K) scores, positive first, K = 7 teacher-mined negatives (potstill.data.hard_negatives); "
            "per-row MSE (the official code's batch MSE makes w inert); dynamic=False: uniform weights",
        ),
        _entry(
            dcd_logits,
            "logits",
            "dcd_loss on [z_y, the K other classes with the highest teacher logits] of (B, C) logits, y the gold label",
            'Rao et al. 2023, "Dynamic Contrastive Distillation for Image-Text Retrieval" (DCD)',
            "vision_language task with labelled images: the classes' captions are the texts; K = negatives (7)",
        ),
        _entry(
            SparseFlops,
            "scores",
            "min(1, step/warmup_steps)² · Σ_j ((1/N) Σ_i w_ij)² over the student's passage (and/or query) term weights",
            'Formal et al. 2021, "SPLADE"; Geng et al. 2024, "Towards Competitive Search Relevance For '
            'Inference-Free Learned Sparse Retrievers" (IDF-aware FLOPS)',
            "ranking task, ranking.student_type: splade; weight = λ; a regulariser, reads no teacher scores",
            name="sparse_flops",
        ),
        _entry(
            embedding_mse,
            "embedding",
            "(1/D) Σ (s − t)²",
            "Reimers & Gurevych 2020, "
            '"Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation"',
            "normalize=True compares unit vectors; different D needs a projection",
        ),
        _entry(
            embedding_cosine,
            "embedding",
            "1 − cos(s, t)",
            "cosine embedding loss as used by DistilBERT (Sanh et al. 2019)",
            "different D needs a projection",
        ),
        _entry(
            embedding_similarity_kl,
            "embedding",
            "Σ_i KL(p_i ‖ q_i), p_i = softmax_j(cos(t_i, t_j)/τ_t), q_i = softmax_j(cos(s_i, s_j)/τ_s) over the batch",
            'Fang et al. 2021, "SEED: Self-supervised Distillation for Visual Representation"',
            ("relational: B × B in-batch similarities, width-free; cross=True (SEED's form) uses cos(s_i, t_j), "
             "equal widths; τ_t defaults to τ_s; exclude_diagonal drops self-similarity"),
        ),
        _entry(
            further_pretraining_sd,
            "embedding",
            "‖h_θ(x) − sg(h_φ(x))‖², summed over D, mean over the batch; h = final-layer [CLS] of the unmasked input",
            'Lee et al. 2023, "Self-Distillation for Further Pre-training of Transformers" (ICLR)',
            ("masked_lm task, stage 2: the teacher φ is θ0 further-pretrained with MLM, the student restarts from "
             "θ0 with MLM (trainer.hard_label_weight) + λ·this; paper λ = 1"),
        ),
        _entry(vl2v_adip, "vision_language", "−λ·cos(p, e_img(x)) − (1−λ)·cos(p, e_txt(y)), p = ℓ2n(W φ_S(x))",
               'Addepalli et al. 2024, "Leveraging Vision-Language Models for Improving Domain Generalization in '
               'Image Classification" (VL2V-ADiP)', "needs labels; stage 1 trains W, stage 2 the backbone"),
        _entry(vlm_ood_visual_mse, "vision_language", "‖ℓ2n(s) − ℓ2n(v)‖², s / v: student / teacher image vectors",
               _VLM_OOD, "L-mse: visual-space imitation"),
        _entry(vlm_ood_visual_contrastive, "vision_language", "½[CE(⟨s_i, v_j⟩/τ, i) + CE(⟨s_j, v_i⟩/τ, i)], batch",
               _VLM_OOD, "L-im-cst: visual-space imitation with in-batch negatives"),
        _entry(vlm_ood_coherence, "vision_language", "KL(softmax(⟨v, t_c⟩/τ) ‖ softmax(⟨s, t_c⟩/τ)), teacher top-k c",
               _VLM_OOD, "L-vlalign: vision–language coherence; rows the teacher misclassifies skipped"),
        _entry(vlm_ood_label_ce, "vision_language", "CE(⟨s, t_c⟩/τ, y)", _VLM_OOD,
               "L-cls: labels against the (enriched) class text; needs labels"),
        _entry(vqgraph_code_kl, "graph", "τ²·KL(r(h_T) ‖ r(z_S)), r_m(v) = softmax_m(−‖v − E_m‖²/τ) over the teacher's "
               "codebook E", 'Yang et al. 2024, "VQGraph: Rethinking Graph Representation Space for Bridging GNNs '
               'and MLPs"', "student hidden width = codebook dim; GLNN's soft labels: forward_kl + "
               "trainer.hard_label_weight"),
    )
}


def get_objective(name: str) -> ObjectiveInfo:
    """The catalogue entry called `name`; KeyError with a did-you-mean hint and the valid names otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(OBJECTIVES), n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise KeyError(f"unknown objective {name!r}{hint}; valid names: {', '.join(OBJECTIVES)}") from None
