"""The catalogue of distillation objectives, listed by `potstill objectives`."""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from .bialign import bialign
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
from .further_pretraining import further_pretraining_sd
from .intermediate import AttentionMSE, DMAEAlign, HiddenCosine, HiddenMSE, SquareHead
from .mgsr_dac_kl import DACKL
from .mgsr_span import span_correlation
from .mi_alpha import MIAlpha
from .minilm import MiniLMAttention, MiniLMRelations
from .moe import RouterLoadBalance
from .preference import dpo_teacher_ref
from .ranking import SparseFlops, in_batch_margin_mse, listwise_kl, margin_mse, pointwise_mse
from .sinkhorn import sinkhorn
from .taid import TAID
from .uld import gold, uld

KINDS = ("logits", "preference", "demo_sets", "router", "scores", "embedding", "hidden_states", "attention")
# "router": a mixture-of-experts student's router logits (causal_lm; the teacher's signal is not read).
# "preference": logits of a pair batch (chosen rows, then rejected rows) with the scored token ids as `labels`.
# "demo_sets": logits of B queries × M demonstration-set prompts (query-major), scored token ids as `labels`; no
# task feeds it yet (BiAlign: Python API, `potstill.data.icl_demos.DemoSetCollator` builds the batches).
# Not listed: the sparse-retriever regularisers `ranking.flops` / `ranking.idf_flops` take only the student's
# term weights (no teacher signal), which no task feeds an objective yet.
# Kinds read from a model's internals: any task whose models are Hugging Face transformers provides them.
INTERNAL_KINDS = ("hidden_states", "attention")


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


# Filled in by the task from the batch, never by a recipe (uld / gold: merged spans, matched vocabulary).
_DATA_ARGS = ("mask", "labels", "student_log_scale", "teacher_log_scale", "matched_ids", "span_ids", "target_ids")


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
            "teacher and student tokenizers may differ (causal_lm: spans aligned by byte offsets, split tokens merged)",
        ),
        _entry(
            gold,
            "logits",
            "w·JSD_β(p_s^M, p_t^M) + (1−w)·sorted-L1(p_s^U, p_t^U), M = same-string ids, w = |M| / V_t",
            "TRL GOLDTrainer (hybrid ULD); Boizard et al. 2024 (ULD), Agarwal et al. 2024 (GKD)",
            "cross-tokenizer like uld; the task fills matched_ids from the two vocabularies",
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
            "input-preference ranking over M demonstration sets + output KD; batches from icl_demos.DemoSetCollator; "
            "0 rank loss when the student follows the teacher's order with λ gaps",
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


# ---------------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamRule:
    """What one objective parameter accepts: `kind` ("number", "integer", "bool", "text" or "any"), None too when
    `optional`, and for numbers the bound `low` (exclusive when `low_open`) .. `high` (inclusive)."""

    kind: str
    optional: bool = False
    low: float | None = None
    low_open: bool = False
    high: float | None = None

    def expected(self) -> str:
        words = {"number": "a number", "integer": "a whole number", "bool": "true or false", "text": "a string"}
        text = words.get(self.kind, "a value")
        if self.low is not None:
            text += f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            text += f" {'and' if self.low is not None else ''} <= {self.high:g}".replace("  ", " ")
        return text + (" (or null)" if self.optional else "")

    def problem(self, value: object) -> str | None:
        """Why `value` does not fit, or None."""
        if value is None:
            return None if self.optional else f"expected {self.expected()}, got null"
        if self.kind == "bool":
            ok = isinstance(value, bool)
        elif self.kind == "text":
            ok = isinstance(value, str)
        elif self.kind in ("number", "integer"):
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if ok and self.kind == "integer":
                ok = isinstance(value, numbers.Integral)
            number = float(value) if ok else 0.0  # type: ignore[arg-type]
            if ok and self.low is not None:
                ok = number > self.low if self.low_open else number >= self.low
            if ok and self.high is not None:
                ok = number <= self.high
        else:
            ok = True
        return None if ok else f"expected {self.expected()}, got {value!r}"


# Bounds by parameter name (the same meaning in every loss that has the name); types come from the annotations.
_BOUNDS: dict[str, dict] = {
    "temperature": {"low": 0, "low_open": True},
    "teacher_temperature": {"low": 0, "low_open": True},
    "epsilon": {"low": 0, "low_open": True},
    "eps": {"low": 0, "low_open": True},
    "chunk_size": {"low": 1},
    "block_size": {"low": 1},
    "iterations": {"low": 1},
    "relation_heads": {"low": 1},
    "warmup_steps": {"low": 0},
    "alpha": {"low": 0, "high": 1},
    "beta": {"low": 0, "high": 1},
    "matched_weight": {"low": 0, "high": 1},
    "t_start": {"low": 0, "high": 1},
    "t_end": {"low": 0, "high": 1},
}
_KINDS = {"float": "number", "int": "integer", "bool": "bool", "str": "text"}
_NOT_PARAMS = (*_DATA_ARGS, "reduction", "self")


def param_rules(name: str) -> dict[str, ParamRule]:
    """The parameters a recipe may give objective `name` (its `params:`), each with its rule."""
    info = OBJECTIVES[name]
    signature = list(inspect.signature(info.fn).parameters.values())
    rules = {}
    for p in signature:
        if p.name in _NOT_PARAMS or not (info.stateful or p.kind is inspect.Parameter.KEYWORD_ONLY):
            continue
        parts = [t.strip() for t in str(p.annotation).split("|")]
        optional = "None" in parts
        kinds = {_KINDS.get(t, "any") for t in parts if t != "None"}
        kind = kinds.pop() if len(kinds) == 1 else "any"
        rules[p.name] = ParamRule(kind, optional, **(_BOUNDS.get(p.name, {}) if kind in ("number", "integer") else {}))
    return rules


def check_params(name: str, params: dict) -> list[tuple[str, str]]:
    """(parameter, problem) for every parameter of objective `name` that is unknown or out of its rule; for a
    stateful objective also what its constructor refuses (cheap: no model is needed to build one)."""
    if name not in OBJECTIVES:
        return []  # the name's own check reports it
    rules = param_rules(name)
    problems = []
    for key, value in params.items():
        if key not in rules:
            close = difflib.get_close_matches(str(key), sorted(rules), n=1, cutoff=0.6)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            valid = ", ".join(sorted(rules)) or "none"
            problems.append((key, f"{name} has no parameter {key!r}{hint}; valid: {valid}"))
        elif (problem := rules[key].problem(value)) is not None:
            problems.append((key, f"{name}: {problem}"))
    info = OBJECTIVES[name]
    if not problems and info.stateful:
        try:
            info.fn(**params)
        except (TypeError, ValueError) as err:
            problems.append((next(iter(params), ""), f"{name}: {err}"))
    return problems
