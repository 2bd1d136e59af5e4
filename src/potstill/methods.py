"""The catalogue of implemented papers, listed by `potstill methods` and written into README.md.

Each `MethodInfo` names one paper's part as built here: what kind of part it is (an objective, a sampler, a
teacher, ...), the module and attribute that implement it, the recipe or benchmark script that shows it, and
the docs/results.md section that measures it (None where no packaged recipe / measured result exists yet).
The objective catalogue (`potstill.losses.catalogue.OBJECTIVES`) holds the formulas and defaults of the losses;
this one says where every paper lives.

    python -m potstill.methods --write-readme     # regenerate README.md's method and objective tables
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("objective", "sampler", "teacher", "student builder", "loop hook", "data generator", "index", "evaluation")


@dataclass(frozen=True)
class MethodInfo:
    """One paper's part: `paper` is authors + title, `module`/`attribute` the code, `recipe` a repository path
    (a packaged recipe, else a benchmarks/ script), `results` an anchor `docs/results.md#<heading slug>`."""

    name: str
    paper: str
    year: int
    kind: str
    module: str
    attribute: str
    recipe: str | None = None
    results: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")

    @property
    def target(self) -> str:
        return f"{self.module}.{self.attribute}"

    def load(self) -> Any:
        """The implementing object (imports its module)."""
        return getattr(importlib.import_module(self.module), self.attribute)


_RESULTS = "docs/results.md#"
_REPRESENTATION = _RESULTS + "representation-distillation-of-all-minilm-l6-v2-benchmarksrepresentation_studypy"
_DMAE = _RESULTS + "dmae-vs-mae-only-on-the-digits-benchmarksdmae_studypy"
_DISTILL_VQ = _RESULTS + "distill-vq-vs-faiss-ivfpq-at-equal-code-size-benchmarksdistill_vqpy"
_SMOLLM2 = _RESULTS + "smollm2-135m-instruct--7-layer-slice-recipessmollm2-sliceyaml"
_RANKING = _RESULTS + "retrieval-distillation-on-chatterbot-benchmarksranking_studypy"
_GENERAL = _RESULTS + ("general-embedding-suite-potstill-vs-sentence-transformers-and-model2vec-"
                       "benchmarksembedding_peerspy")
_RESTTEST = _RESULTS + "interpolation-vs-extrapolation-resttest-style-split-methods-b-25"
_DATA = _RESULTS + "data-strategies-on-toy-tasks-benchmarksdata_strategiespy"
_STEP_BY_STEP = _RESULTS + "distilling-step-by-step-on-arithmetic-word-problems-benchmarksstep_by_steppy"
_ENDPOINT = _RESULTS + "a-text-only-teacher-behind-a-flaky-endpoint-benchmarksendpoint_generatepy"
_CROSS_TOKENIZER = _RESULTS + ("cross-tokenizer-distillation-smollm2--a-student-with-its-own-bpe-uld--gold-vs-sft-"
                               "issue-21-1-benchmarkscross_tokenizerpy")
_VQGRAPH = _RESULTS + "vqgraph-gnn-to-mlp-on-the-drosophila-connectome-and-mutag-benchmarksvqgraphpy"
_PREFERENCE = _RESULTS + ("preference-distillation-dpo-with-the-teacher-as-reference-vs-plain-mimic-"
                          "benchmarksclaim_dpo_teacher_refpy")
_BIALIGN = _RESULTS + "bialign-on-toy-in-context-label-inference-issue-21-5-benchmarksbialignpy"
_MOE = _RESULTS + "a-sparse-mixture-of-experts-student-of-smollm2-with-the-router-auxiliary-loss-recipessmollm2-moeyaml"
_GUIDANCE = _RESULTS + ("teacher-needs-guidance-the-per-step-alpha-of-iterated-self-distillation-"
                        "benchmarksclaim_teacher_guidancepy")
_LLAVA_MOD = 'Shu et al., "LLaVA-MoD: Making LLaVA Tiny via MoE Knowledge Distillation"'
_PRUNED = _RESULTS + "pruned-init-vs-layer-drop-init-at-equal-size-issue-19-benchmarkspruned_vs_layerdroppy"
_IMAGE_KD = _RESULTS + "image-kd-and-ssld-on-mnist-5k-issue-20-benchmarksimage_kdpy"
_KD_LOW_LABEL = _RESULTS + "kd-at-10--of-the-labels-logit-standardisation-issue-20-benchmarkskd_low_labelpy"
_PRD = _RESULTS + ("prd-vs-fine-tuning-and-lwf-on-class-incremental-split-mnist-no-replay-issue-20-"
                 "benchmarksprd_continualpy")
_PRD_PAPER = ('Asadi et al., "Prototype-Sample Relation Distillation: Towards Replay-Free Continual '
              'Learning"')
_MI_ALPHA = _RESULTS + "mi-alpha-on-correlated-gaussians-issue-19-benchmarksmi_alpha_gaussianspy"
_ZOO = _RESULTS + "distillnearest-and-distillweighted-teachers-from-a-zoo-issue-19-benchmarksdistill_nearestpy"
_PROMPTKD = _RESULTS + "promptkd-on-mnist-5k-with-an-offline-lit-teacher-issue-20-benchmarkspromptkdpy"
_VL2V = _RESULTS + ("vl2v-adip-and-large-vlm-ood-distillation-on-rotated-and-thickened-digits-issue-20-"
                   "benchmarksvl2v_adippy")
_VL2V_PAPER = ('Addepalli et al., "Leveraging Vision-Language Models for Improving Domain Generalization in Image '
               'Classification" (VL2V-ADiP)')
_VLM_OOD_PAPER = 'Li et al., "Distilling Large Vision-Language Model with Out-of-Distribution Generalizability"'
_BORUP = 'Borup, Phoo & Hariharan, "Distilling from Similar Tasks for Transfer Learning on a Budget"'
_PROGRAMS = _RESULTS + ("program-distillation-verified-teacher-programs-vs-answer-only-sft-issue-21-item-7-"
                        "benchmarksprogram_distillationpy")
_PAD = 'Jie & Lu, "Leveraging Training Data in Few-Shot Prompting for Numerical Reasoning"'
_SEARCH = _RESULTS + ("student-search-proxies-and-advice-on-the-minilm-demo-issue-19-benchmarkssearch_proxiespy-"
                      "potstill-search")
_SWIFTKV = _RESULTS + "swiftkv-on-smollm2-135m-prefill-cost-vs-agreement-issue-21-10-benchmarksswiftkvpy"
_UNIVERSAL_NER = _RESULTS + ("universalner-targeted-distillation-of-a-scripted-ner-teacher-issue-21-8-"
                             "benchmarksuniversal_nerpy")
_LAD = _RESULTS + "lad-label-assisted-distillation-on-synthetic-shapes-issue-20-5-benchmarkslad_segmentationpy"
_LAD_PAPER = ('Qiu et al., "Make a Strong Teacher with Label Assistance: A Novel Knowledge Distillation Approach for '
              'Semantic Segmentation"')

_FURTHER_PRETRAINING = _RESULTS + ("self-distillation-for-further-pre-training-mlm-then-mlm--cls-matching-issue-21-11-"
                                   "benchmarksfurther_pretraining_sdpy")
_SELF_J = _RESULTS + "self-j-a-self-trained-judge-on-smollm2-135m-issue-21-6-benchmarksself_judgepy"
_SELF_J_PAPER = 'Ye & Ng, "Self-Judge: Selective Instruction Following with Alignment Self-Evaluation"'
_RECIPES = "src/potstill/recipes/"
_CYCLEALIGN = _RESULTS + ("cyclealign-black-box-ranking-agreement-distilled-into-a-white-box-policy-issue-21-4-"
                          "benchmarkscyclealignpy")
_CYCLEALIGN_PAPER = ('Hong et al., "CycleAlign: Iterative Distillation from Black-box LLM to White-box Models for '
                     'Better Human Alignment"')
_DCD = _RESULTS + "dcd-on-digit-style-captions-teacher-mined-vs-random-negatives-issue-20-benchmarksdcdpy"
_DCD_PAPER = 'Rao et al., "Dynamic Contrastive Distillation for Image-Text Retrieval"'
_MGSR = 'Liu et al., "Multi-Granularity Semantic Revision for Large Language Model Distillation"'
_MGSR_RESULTS = _RESULTS + "mgsr-vs-plain-on-policy-gkd-at-equal-time-benchmarksmgsrpy"
_SUPERNET = _RESULTS + ("autodistils-weight-sharing-supernet-ranks-its-subnets-without-retraining-issue-19-"
                        "benchmarksautodistil_supernetpy")
_SUPERNET_SEARCH = _RESULTS + "potstill-search-with-proxy-supernet-on-all-minilm-l6-v2-issue-19-5-dec"
_HINTON = 'Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network"'
_GKD = 'Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"'
_TINYBERT = 'Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding"'
_DISTILBERT = 'Sanh et al., "DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter"'
_MARGIN_MSE = ('Hofstätter et al., "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge '
               'Distillation"')
_TAS_B = ('Hofstätter et al., "Efficiently Teaching an Effective Dense Retriever with Balanced Topic Aware '
          'Sampling"')
_SPLADE = 'Formal, Piwowarski & Clinchant, "SPLADE: Sparse Lexical and Expansion Model for First Stage Ranking"'
_INFERENCE_FREE = 'Geng et al., "Towards Competitive Search Relevance For Inference-Free Learned Sparse Retrievers"'
_LOSSES = "potstill.losses."

METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo("KD (soft targets)", _HINTON, 2015, "objective", _LOSSES + "divergences", "forward_kl",
                   _RECIPES + "digits.yaml", _SMOLLM2),
        MethodInfo("MiniLLM reverse KL", 'Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models"',
                   2024, "objective", _LOSSES + "divergences", "reverse_kl", "benchmarks/loss_memory.py"),
        MethodInfo("GKD generalized JSD", _GKD, 2024, "objective", _LOSSES + "divergences", "generalized_jsd",
                   "benchmarks/llm_step.py"),
        MethodInfo("GKD on-policy samples", _GKD, 2024, "loop hook", "potstill.data.on_policy",
                   "on_policy_batch", "benchmarks/llm_step.py"),
        MethodInfo("MGSR sequence correction and re-generation (SCRG)", _MGSR, 2024, "loop hook",
                   "potstill.data.mgsr_scrg", "correct_and_regenerate", _RECIPES + "smollm2-mgsr.yaml", _MGSR_RESULTS),
        MethodInfo("MGSR distribution-adaptive clipped KL (DAC-KL)", _MGSR, 2024, "objective",
                   _LOSSES + "mgsr_dac_kl", "DACKL", _RECIPES + "smollm2-mgsr.yaml", _MGSR_RESULTS),
        MethodInfo("MGSR span-level probability correlation", _MGSR, 2024, "objective", _LOSSES + "mgsr_span",
                   "span_correlation", _RECIPES + "smollm2-mgsr.yaml", _MGSR_RESULTS),
        MethodInfo("DistiLLM skew KL",
                   'Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models"', 2024,
                   "objective", _LOSSES + "divergences", "skew_kl"),
        MethodInfo("Total variation distance",
                   'Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation"', 2023,
                   "objective", _LOSSES + "divergences", "tvd"),
        MethodInfo("TAID", 'Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient '
                   'Knowledge Transfer in Language Models"', 2025, "objective", _LOSSES + "taid", "TAID"),
        MethodInfo("SinKD", 'Cui et al., "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation"', 2024,
                   "objective", _LOSSES + "sinkhorn", "sinkhorn"),
        MethodInfo("ULD (cross-tokenizer)", 'Boizard et al., "Towards Cross-Tokenizer Distillation: the Universal '
                   'Logit Distillation Loss for LLMs"', 2024, "objective", _LOSSES + "uld", "uld",
                   _RECIPES + "smollm2-cross-tokenizer.yaml", _CROSS_TOKENIZER),
        MethodInfo("GOLD hybrid (cross-tokenizer)", 'Hugging Face TRL, "GOLD: General On-policy Logit Distillation" '
                   '(software)', 2025, "objective", _LOSSES + "uld", "gold", "benchmarks/cross_tokenizer.py",
                   _CROSS_TOKENIZER),
        MethodInfo("Sequence-level KD", 'Kim & Rush, "Sequence-Level Knowledge Distillation"', 2016, "teacher",
                   "potstill.teachers.seq_kd", "seq_kd_completions", "benchmarks/llm_step.py"),
        MethodInfo("Black-box synthetic data", 'Shirgaonkar et al., "Knowledge Distillation Using Frontier '
                   'Open-source LLMs: Generalizability and the Role of Synthetic Data"', 2024, "data generator",
                   "potstill.generate", "generate_dataset", "benchmarks/endpoint_generate.py", _ENDPOINT),
        MethodInfo("Distilling step-by-step", 'Hsieh et al., "Distilling Step-by-Step! Outperforming Larger Language '
                   'Models with Less Training Data and Smaller Model Sizes"', 2023, "data generator",
                   "potstill.data.step_by_step", "step_by_step_rows", _RECIPES + "step-by-step.yaml", _STEP_BY_STEP),
        MethodInfo("DistilBERT layer-drop student", _DISTILBERT, 2019, "student builder", "potstill.students.build",
                   "layers_from_teacher", _RECIPES + "demo.yaml", _REPRESENTATION),
        MethodInfo("DistilBERT cosine loss", _DISTILBERT, 2019, "objective", _LOSSES + "intermediate",
                   "HiddenCosine"),
        MethodInfo("TinyBERT hidden-state MSE", _TINYBERT, 2020, "objective", _LOSSES + "intermediate", "HiddenMSE",
                   "benchmarks/representation_study.py", _REPRESENTATION),
        MethodInfo("TinyBERT attention MSE", _TINYBERT, 2020, "objective", _LOSSES + "intermediate", "AttentionMSE"),
        MethodInfo("MiniLM", 'Wang et al., "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression '
                   'of Pre-Trained Transformers"', 2020, "objective", _LOSSES + "minilm", "MiniLMAttention"),
        MethodInfo("MiniLMv2", 'Wang et al., "MiniLMv2: Multi-Head Self-Attention Relation Distillation for '
                   'Compressing Pretrained Transformers"', 2021, "objective", _LOSSES + "minilm", "MiniLMRelations",
                   "benchmarks/representation_study.py", _REPRESENTATION),
        MethodInfo("SquareHead", 'Kurtic et al., "Sparse Finetuning for Inference Acceleration of Large Language '
                   'Models"', 2023, "objective", _LOSSES + "intermediate", "SquareHead"),
        MethodInfo("Embedding MSE", 'Reimers & Gurevych, "Making Monolingual Sentence Embeddings Multilingual using '
                   'Knowledge Distillation"', 2020, "objective", _LOSSES + "embedding", "embedding_mse",
                   _RECIPES + "demo.yaml", _REPRESENTATION),
        MethodInfo("SEED (in-batch similarity KL)", 'Fang et al., "SEED: Self-supervised Distillation for Visual '
                   'Representation"', 2021, "objective", _LOSSES + "embedding", "embedding_similarity_kl",
                   "benchmarks/embedding_peers.py", _GENERAL),
        MethodInfo("Static-embedding student (model2vec)", 'Tulkens & van Dongen, "Model2Vec: Fast State-of-the-Art '
                   'Static Embeddings" (software)', 2024, "student builder", "potstill.students.static",
                   "StaticStudent", _RECIPES + "minilm-static.yaml", _GENERAL),
        MethodInfo("DMAE", 'Bai et al., "Masked Autoencoders Enable Efficient Knowledge Distillers"', 2023,
                   "objective", _LOSSES + "intermediate", "DMAEAlign", _RECIPES + "digits-dmae.yaml", _DMAE),
        MethodInfo("KD on images (MNIST CNN → small CNN)", _HINTON, 2015, "objective", _LOSSES + "divergences",
                   "forward_kl", "benchmarks/image_kd.py", _IMAGE_KD),
        MethodInfo("Logit standardisation (z-scored KD)", 'Sun et al., "Logit Standardization in Knowledge '
                   'Distillation"', 2024, "objective", _LOSSES + "logit_standardization", "logit_std_kd",
                   _RECIPES + "mnist-kd.yaml", _KD_LOW_LABEL),
        MethodInfo("SSLD", 'Cui et al., "Beyond Self-Supervision: A Simple Yet Effective Network Distillation '
                   'Alternative to Improve Backbones"', 2021, "sampler", "potstill.data.ssld", "ssld_select",
                   _RECIPES + "mnist-ssld.yaml", _IMAGE_KD),
        MethodInfo("Margin-MSE", _MARGIN_MSE, 2020, "objective", _LOSSES + "ranking", "margin_mse",
                   _RECIPES + "chatterbot-rank.yaml", _RANKING),
        MethodInfo("RocketQAv2 listwise KL", 'Ren et al., "RocketQAv2: A Joint Training Method for Dense Passage '
                   'Retrieval and Passage Re-ranking"', 2021, "objective", _LOSSES + "ranking", "listwise_kl",
                   _RECIPES + "chatterbot-rank.yaml", _RANKING),
        MethodInfo("TAS-B in-batch Margin-MSE", _TAS_B, 2021, "objective", _LOSSES + "ranking",
                   "in_batch_margin_mse", _RECIPES + "chatterbot-tasb.yaml", _RANKING),
        MethodInfo("TAS-Balanced batches", _TAS_B, 2021, "sampler", "potstill.data.tas_balanced",
                   "TopicBalancedSampler", _RECIPES + "chatterbot-tasb.yaml", _RANKING),
        MethodInfo("SPLADE student", _SPLADE, 2021, "student builder", "potstill.students.splade", "SpladeEncoder",
                   "benchmarks/ranking_study.py", _RANKING),
        MethodInfo("FLOPS regulariser", 'Paria et al., "Minimizing FLOPs to Learn Efficient Sparse Representations"',
                   2020, "objective", _LOSSES + "ranking", "flops", "benchmarks/ranking_study.py", _RANKING),
        MethodInfo("Inference-free sparse queries", _INFERENCE_FREE, 2024, "student builder",
                   "potstill.students.splade_inference_free", "InferenceFreeQuery", "benchmarks/ranking_study.py",
                   _RANKING),
        MethodInfo("IDF-aware FLOPS", _INFERENCE_FREE, 2024, "objective", _LOSSES + "ranking", "idf_flops",
                   "benchmarks/ranking_study.py", _RANKING),
        MethodInfo("Min-max ensemble teacher", _INFERENCE_FREE, 2024, "teacher", "potstill.teachers.ensemble",
                   "minmax_ensemble"),
        MethodInfo("Distill-VQ", 'Xiao et al., "Distill-VQ: Learning Retrieval Oriented Vector Quantization By '
                   'Distilling Knowledge from Dense Embeddings"', 2022, "index", "potstill.index.distill_vq",
                   "distill_vq", "benchmarks/distill_vq.py", _DISTILL_VQ),
        MethodInfo("VQGraph", 'Yang et al., "VQGraph: Rethinking Graph Representation Space for Bridging GNNs and '
                   'MLPs"', 2024, "objective", _LOSSES + "vqgraph", "soft_code_kl",
                   _RECIPES + "connectome-vqgraph.yaml", _VQGRAPH),
        MethodInfo("VQGraph teacher (codebook GNN)", 'Yang et al., "VQGraph: Rethinking Graph Representation Space '
                   'for Bridging GNNs and MLPs"', 2024, "teacher", "potstill.teachers.vqgraph", "VQGraphTeacher",
                   _RECIPES + "connectome-vqgraph.yaml", _VQGRAPH),
        MethodInfo("GLNN", 'Zhang et al., "Graph-less Neural Networks: Teaching Old MLPs New Tricks via '
                   'Distillation"', 2022, "objective", _LOSSES + "vqgraph", "soft_label_loss",
                   _RECIPES + "connectome-vqgraph.yaml", _VQGRAPH),
        MethodInfo("DDK", 'Liu et al., "DDK: Distilling Domain Knowledge for Efficient Large Language Models"', 2024,
                   "sampler", "potstill.data.ddk", "DomainWeightedSampler", "benchmarks/data_strategies.py", _DATA),
        MethodInfo("Robust Active Distillation", 'Baykal et al., "Robust Active Distillation"', 2023, "sampler",
                   "potstill.data.active", "ActiveSelector", "benchmarks/data_strategies.py", _DATA),
        MethodInfo("Data pruning with KD", 'Ben-Baruch et al., "Distilling the Knowledge in Data Pruning"', 2024,
                   "sampler", "potstill.data.pruning", "prune_indices", "benchmarks/data_strategies.py", _DATA),
        MethodInfo("TAPIR curriculum", 'Yue et al., "Distilling Instruction-following Abilities of Large Language '
                   'Models with Task-aware Curriculum Planning"', 2024, "sampler", "potstill.data.curriculum",
                   "Curriculum"),
        MethodInfo("PGKD", 'Di Palo et al., "Performance-Guided LLM Knowledge Distillation for Efficient Text '
                   'Classification at Scale"', 2024, "data generator", "potstill.data.pgkd", "PGKDLoop"),
        MethodInfo("Teacher-hacking monitor", 'Tiapkin et al., "On Teacher Hacking in Language Model Distillation"',
                   2025, "evaluation", "potstill.eval.teacher_hacking", "TeacherHackingMonitor"),
        MethodInfo("LLaVA-MoD preference distillation (DPO, teacher as reference)", _LLAVA_MOD, 2024, "objective",
                   _LOSSES + "preference", "dpo_teacher_ref", _RECIPES + "smollm2-moe-dpo.yaml", _PREFERENCE),
        MethodInfo("BiAlign input-preference alignment for in-context learning", 'Qin et al., "Improving '
                   'In-context Learning via Bidirectional Alignment"', 2023, "objective", _LOSSES + "bialign",
                   "bialign", _RECIPES + "bialign-toy.yaml", _BIALIGN),
        MethodInfo("LLaVA-MoD sparse MoE student (router auxiliary loss)", _LLAVA_MOD, 2024, "objective",
                   _LOSSES + "moe", "RouterLoadBalance", _RECIPES + "smollm2-moe.yaml", _MOE),
        MethodInfo("Self-distillation with ground-truth mixing (α*)", 'Borup & Andersen, "Even your Teacher Needs '
                   'Guidance: Ground-Truth Targets Dampen Regularization Imposed by Self-Distillation"', 2021,
                   "loop hook", "potstill.train.self_distillation", "self_distill",
                   "benchmarks/claim_teacher_guidance.py", _GUIDANCE),
        MethodInfo("WiSE-FT weight interpolation with the student's init", 'Wortsman et al., "Robust fine-tuning '
                   'of zero-shot models"', 2022, "loop hook", "potstill.train.wise_ft", "WiSEFT",
                   _RECIPES + "demo.yaml", _GENERAL),
        MethodInfo("SWA / SWAD and EMA weight averaging along training", 'Izmailov et al., "Averaging Weights '
                   'Leads to Wider Optima and Better Generalization"', 2018, "loop hook",
                   "potstill.train.weight_average", "WeightAverage", _RECIPES + "minilm-general.yaml",
                   _RESULTS + "a-general-student-in-30-minutes-recipesminilm-generalyaml-6-dec"),
        MethodInfo("Model soups (uniform average of fine-tuned students)", 'Wortsman et al., "Model soups: averaging '
                   'weights of multiple fine-tuned models improves accuracy without increasing inference time"', 2022,
                   "student builder", "potstill.students.soup", "uniform_soup", "benchmarks/universal_ner.py",
                   _UNIVERSAL_NER),
        MethodInfo("Interpolation / extrapolation splits", 'Zhan et al., "Evaluating Interpolation and '
                   'Extrapolation Performance of Neural Retrieval Models"', 2022, "evaluation", "potstill.data.splits",
                   "interpolation_extrapolation_splits", "benchmarks/ranking_study.py", _RESTTEST),
        MethodInfo("MiniMA prune-then-distil (structured pruning init)", 'Zhang et al., "Towards the Law of Capacity '
                   'Gap in Distilling Language Models"', 2023, "student builder", "potstill.students.pruning",
                   "prune_from_teacher", _RECIPES + "minilm-pruned.yaml", _PRUNED),
        MethodInfo("DisWOT", 'Dong et al., "DisWOT: Student Architecture Search for Distillation WithOut Training"',
                   2023, "evaluation", "potstill.eval.diswot", "diswot_score", "benchmarks/pruned_vs_layerdrop.py",
                   _PRUNED),
        MethodInfo("Distiller MI-alpha", 'He et al., "Distiller: A Systematic Study of Model Distillation Methods in '
                   'Natural Language Processing"', 2021, "objective", _LOSSES + "mi_alpha", "MIAlpha",
                   "benchmarks/mi_alpha_gaussians.py", _MI_ALPHA),
        MethodInfo("DistillNearest", _BORUP, 2023, "teacher", "potstill.teachers.zoo", "nearest",
                   "benchmarks/distill_nearest.py", _ZOO),
        MethodInfo("DistillWeighted", _BORUP, 2023, "objective", _LOSSES + "multi_teacher",
                   "weighted_multi_teacher_kl", "benchmarks/distill_nearest.py", _ZOO),
        MethodInfo("DistillWeighted for sentence encoders (teacher.sources)", _BORUP, 2023, "teacher",
                   "potstill.teachers.ensemble", "weighted_concatenation", "benchmarks/distill_nearest.py", _ZOO),
        MethodInfo("Program distillation (execution-verified teacher programs)", _PAD, 2023, "data generator",
                   "potstill.program_distillation", "generate_programs", _RECIPES + "program-distillation.yaml",
                   _PROGRAMS),
        MethodInfo("Dynamic program exemplars (retrieved verified programs)", _PAD, 2023, "data generator",
                   "potstill.data.program_exemplars", "ExemplarIndex", "benchmarks/program_distillation.py",
                   _PROGRAMS),
        MethodInfo("AutoDistil-style student search (potstill search)", 'Xu et al., "AutoDistil: Few-shot '
                   'Task-agnostic Neural Architecture Search for Distilling Large Language Models"', 2022,
                   "student builder", "potstill.search.study", "run_search", "benchmarks/search_proxies.py", _SEARCH),
        MethodInfo("AutoDistil supernet as a search proxy (potstill search, proxy: supernet)", 'Xu et al., '
                   '"AutoDistil: Few-shot Task-agnostic Neural Architecture Search for Distilling Large Language '
                   'Models"', 2022, "evaluation", "potstill.search.supernet_proxy", "SupernetProxy",
                   _RECIPES + "spaces/minilm-supernet.yaml", _SUPERNET_SEARCH),
        MethodInfo("AutoDistil weight-sharing supernet (elastic depth, width, FFN)", 'Xu et al., "AutoDistil: '
                   'Few-shot Task-agnostic Neural Architecture Search for Distilling Large Language Models"', 2022,
                   "student builder", "potstill.students.supernet", "ElasticBert", "benchmarks/autodistil_supernet.py",
                   _SUPERNET),
        MethodInfo("AutoDistiller recommender", 'He et al., "Distiller: A Systematic Study of Model Distillation '
                   'Methods in Natural Language Processing"', 2021, "evaluation", "potstill.search.recommender",
                   "Recommender", "benchmarks/search_proxies.py", _SEARCH),
        MethodInfo("Capacity-gap advisor (potstill advise)", 'Zhang et al., "Towards the Law of Capacity Gap in '
                   'Distilling Language Models"', 2023, "student builder", "potstill.search.advise", "advise_text",
                   "benchmarks/search_proxies.py", _SEARCH),
        MethodInfo("Self-J judge loss (reference-guided → reference-free self-distillation)", _SELF_J_PAPER, 2024,
                   "objective", _LOSSES + "self_judge", "self_judge", _RECIPES + "smollm2-self-judge.yaml", _SELF_J),
        MethodInfo("Self-J labels (reference-guided self-evaluation recalibrated by cosine to the gold)",
                   _SELF_J_PAPER, 2024, "data generator", "potstill.data.self_judge", "build_records",
                   _RECIPES + "smollm2-self-judge.yaml", _SELF_J),
        MethodInfo("Self-J judge (score head on a causal LM; best-of-n, abstention)", _SELF_J_PAPER, 2024,
                   "student builder", "potstill.students.self_judge", "SelfJudge",
                   _RECIPES + "smollm2-self-judge.yaml", _SELF_J),
        MethodInfo("SwiftKV (SingleInputKV, AcrossKV) with knowledge-preserving self-distillation",
                   'Qiao et al., "SwiftKV: Fast Prefill-Optimized Inference with Knowledge-Preserving Model '
                   'Transformation"', 2024, "student builder", "potstill.students.swiftkv", "SwiftKVForCausalLM",
                   _RECIPES + "smollm2-swiftkv.yaml", _SWIFTKV),
        MethodInfo("UniversalNER targeted distillation (per-type conversations, negative types)",
                   'Zhou et al., "UniversalNER: Targeted Distillation from Large Language Models for Open Named '
                   'Entity Recognition"', 2024, "data generator", "potstill.data.universal_ner",
                   "universal_ner_conversations", _RECIPES + "smollm2-universal-ner.yaml", _UNIVERSAL_NER),
        MethodInfo("Entity-level NER F1 (strict)", 'Zhou et al., "UniversalNER: Targeted Distillation from Large '
                   'Language Models for Open Named Entity Recognition"', 2024, "evaluation", "potstill.eval.ner",
                   "entity_f1", "benchmarks/universal_ner.py", _UNIVERSAL_NER),
        MethodInfo("PRD (prototype-sample relation distillation)", _PRD_PAPER, 2023, "objective", _LOSSES + "prd",
                   "prd_relation_kl", _RECIPES + "split-mnist-prd.yaml", _PRD),
        MethodInfo("PRD continual-learning stream (SupCon + prototypes, no replay; fine-tuning and LwF baselines)",
                   _PRD_PAPER, 2023, "loop hook", "potstill.train.prd_stream", "train_stream",
                   _RECIPES + "split-mnist-prd.yaml", _PRD),
        MethodInfo("PromptKD (deep visual prompts + projector on a frozen ViT)", 'Li et al., "PromptKD: '
                   'Unsupervised Prompt Distillation for Vision-Language Models"', 2024, "student builder",
                   "potstill.students.promptkd", "prompted_vit", _RECIPES + "mnist-promptkd.yaml", _PROMPTKD),
        MethodInfo("VL2V-ADiP (align W to the teacher's image + class-text vectors, then distil the backbone)",
                   _VL2V_PAPER, 2024, "objective", _LOSSES + "vl2v_adip", "vl2v_adip",
                   _RECIPES + "mnist-vl2v-align.yaml", _VL2V),
        MethodInfo("VL2V-ADiP student (pretrained backbone + projection, stages align / distil)", _VL2V_PAPER, 2024,
                   "student builder", "potstill.students.vl2v_adip", "vl2v_student",
                   _RECIPES + "mnist-vl2v-distil.yaml", _VL2V),
        MethodInfo("Large-VLM OOD distillation: visual-space imitation (MSE, contrastive)", _VLM_OOD_PAPER, 2023,
                   "objective", _LOSSES + "vlm_ood", "vlm_ood_visual_contrastive", _RECIPES + "mnist-vlm-ood.yaml",
                   _VL2V),
        MethodInfo("Large-VLM OOD distillation: vision-language coherence over the class texts", _VLM_OOD_PAPER,
                   2023, "objective", _LOSSES + "vlm_ood", "vlm_ood_coherence", _RECIPES + "mnist-vlm-ood.yaml",
                   _VL2V),
        MethodInfo("Enriched label text (attribute descriptions per class, prompt-ensembled)", _VLM_OOD_PAPER, 2023,
                   "data generator", "potstill.data.vision_language", "class_descriptions",
                   _RECIPES + "mnist-vlm-ood.yaml", _VL2V),
        MethodInfo("LiT teacher (locked image and text towers, trained alignment head)", 'Zhai et al., "LiT: '
                   'Zero-Shot Transfer with Locked-image text Tuning"', 2022, "teacher", "potstill.teachers.lit",
                   "build_lit_teacher", _RECIPES + "mnist-promptkd.yaml", _PROMPTKD),
        MethodInfo("Zero-shot classification with prompt ensembling, image-text R@k", 'Radford et al., "Learning '
                   'Transferable Visual Models From Natural Language Supervision" (CLIP)', 2021, "evaluation",
                   "potstill.eval.zero_shot", "prompt_ensemble", "benchmarks/promptkd.py", _PROMPTKD),
        MethodInfo("DCD (entropy-weighted score regression + BCE over the positive and hard negatives)", _DCD_PAPER,
                   2023, "objective", _LOSSES + "dcd", "dcd_loss", _RECIPES + "mnist-dcd.yaml", _DCD),
        MethodInfo("DCD's teacher-mined hard negatives (the teacher's top K of N random texts)", _DCD_PAPER, 2023,
                   "sampler", "potstill.data.hard_negatives", "mine_hard_negatives", "benchmarks/dcd.py", _DCD),
        MethodInfo("Self-distillation for further pre-training (MLM, then MLM + [CLS] matching)",
                   'Lee et al., "Self-Distillation for Further Pre-training of Transformers"', 2023, "objective",
                   _LOSSES + "further_pretraining", "further_pretraining_sd", _RECIPES + "bbc-self-distil.yaml",
                   _FURTHER_PRETRAINING),
        MethodInfo("LAD label-assisted teacher (noised label as input, dual-path consistency)", _LAD_PAPER, 2024,
                   "teacher", "potstill.teachers.lad", "LabelAssistedTeacher", _RECIPES + "shapes-lad.yaml", _LAD),
        MethodInfo("CycleAlign (black-box ranking agreement by LCS, demo pool, cycles; potstill align)",
                   _CYCLEALIGN_PAPER, 2023, "loop hook", "potstill.train.cyclealign_cycles", "run_cyclealign",
                   "benchmarks/cyclealign.py", _CYCLEALIGN),
        MethodInfo("RRHF ranking loss (PRO listwise as an option)", 'Yuan et al., "RRHF: Rank Responses to Align '
                   'Language Models with Human Feedback"', 2023, "objective", _LOSSES + "rrhf", "rrhf_loss",
                   "benchmarks/cyclealign.py", _CYCLEALIGN),
        MethodInfo("LAD teacher and pixel-wise student losses (operators configurable: teacher half unreleased)",
                   _LAD_PAPER, 2024, "objective", _LOSSES + "lad", "lad_teacher_loss", _RECIPES + "shapes-lad.yaml",
                   _LAD),
    )
}


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def methods_table() -> str:
    """README's method table, one row per `METHODS` entry."""
    lines = ["| method | paper | year | kind | code | recipe | results |", "|---|---|---|---|---|---|---|"]
    for m in METHODS.values():
        recipe = f"[{Path(m.recipe).name}]({m.recipe})" if m.recipe else "—"
        results = f"[results]({m.results})" if m.results else "—"
        lines.append(f"| {_cell(m.name)} | {_cell(m.paper)} | {m.year} | {m.kind} | `{m.target}` | {recipe} | "
                     f"{results} |")
    return "\n".join(lines)


def objectives_table() -> str:
    """README's objective table, one row per `potstill.losses.catalogue.OBJECTIVES` entry."""
    from potstill.losses.catalogue import OBJECTIVES

    lines = ["| objective | signal | formula | source |", "|---|---|---|---|"]
    for info in OBJECTIVES.values():
        lines.append(f"| `{info.name}` | {info.kind.replace('_', ' ')} | {_cell(info.formula)} | "
                     f"{_cell(info.paper)} |")
    return "\n".join(lines)


def _replace_between(text: str, marker: str, body: str) -> str:
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"README.md: expected one `{start}` followed by one `{end}`")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{body}\n{end}{tail}"


def render_readme(text: str) -> str:
    """`text` (README.md) with its generated tables replaced by what the catalogues give now."""
    text = _replace_between(text, "methods", methods_table())
    return _replace_between(text, "objectives", objectives_table())


def write_readme(path: str | Path = "README.md") -> bool:
    """Regenerate the tables of the README at `path`; True when the file changed."""
    path = Path(path)
    old = path.read_text(encoding="utf-8")
    new = render_readme(old)
    if new != old:
        path.write_text(new, encoding="utf-8")
    return new != old


def methods_command(json_output: bool) -> None:
    """`potstill methods`: the catalogue as a table on stdout, or with `--json` as a JSON list of objects."""
    if json_output:
        rows = [dataclasses.asdict(m) | {"target": m.target} for m in METHODS.values()]
        sys.stdout.write(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for column in ("method", "year", "kind", "code", "recipe", "results", "paper"):
        table.add_column(column, no_wrap=True, overflow="ignore")
    for m in METHODS.values():
        table.add_row(m.name, str(m.year), m.kind, m.target, m.recipe or "—", m.results or "—", m.paper)
    # Wide enough for the longest row: piped output (| grep) is never wrapped or cut at 80 columns.
    Console(file=sys.stdout, width=1000, highlight=False, markup=False, emoji=False).print(table, crop=False)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m potstill.methods", description=__doc__.splitlines()[0])
    parser.add_argument("--write-readme", nargs="?", const="README.md", metavar="PATH",
                        help="regenerate the method and objective tables of README.md (or PATH)")
    parser.add_argument("--json", action="store_true", help="print the catalogue as JSON")
    args = parser.parse_args(argv)
    if args.write_readme:
        changed = write_readme(args.write_readme)
        print(f"{args.write_readme}: {'tables updated' if changed else 'tables already up to date'}")
        return 0
    methods_command(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
