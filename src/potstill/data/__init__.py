"""Data: records from files, `datasets` folders and built-in datasets; samplers and splits; language-model
records, sampling, on-policy batches and step-by-step views."""

from potstill.data.active import ActiveSelector, informativeness, robust_inclusion_probabilities
from potstill.data.curriculum import Curriculum, model_fitting_difficulty
from potstill.data.ddk import DomainWeightedSampler
from potstill.data.lm_records import LMRecordEncoder, pack, shift_targets, tokenizer_fingerprint
from potstill.data.loaders import (
    BUILTIN_DATASETS,
    BUILTIN_SPLITS,
    SUPPORTED_FORMATS,
    builtin_records,
    fingerprint_records,
    load_records,
    load_source,
)
from potstill.data.on_policy import on_policy_batch
from potstill.data.pruning import kd_weight_for_fraction, prune_indices, pruned_kd_loss
from potstill.data.samplers import length_grouped_order, padding_fraction
from potstill.data.sampling import SamplingSettings, sample_completions
from potstill.data.splits import interpolation_extrapolation_splits
from potstill.data.step_by_step import step_by_step_loss, step_by_step_sum
from potstill.data.tas_balanced import TopicBalancedSampler

__all__ = [
    "ActiveSelector",
    "Curriculum",
    "DomainWeightedSampler",
    "informativeness",
    "kd_weight_for_fraction",
    "model_fitting_difficulty",
    "prune_indices",
    "pruned_kd_loss",
    "robust_inclusion_probabilities",
    "BUILTIN_DATASETS",
    "TopicBalancedSampler",
    "BUILTIN_SPLITS",
    "SUPPORTED_FORMATS",
    "builtin_records",
    "fingerprint_records",
    "interpolation_extrapolation_splits",
    "length_grouped_order",
    "load_records",
    "load_source",
    "padding_fraction",
    "LMRecordEncoder",
    "SamplingSettings",
    "on_policy_batch",
    "pack",
    "sample_completions",
    "shift_targets",
    "step_by_step_loss",
    "step_by_step_sum",
    "tokenizer_fingerprint",
]
