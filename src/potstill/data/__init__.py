"""Data loading: records from files, `datasets` folders and built-in datasets."""

from potstill.data.loaders import (
    BUILTIN_DATASETS,
    BUILTIN_SPLITS,
    SUPPORTED_FORMATS,
    builtin_records,
    fingerprint_records,
    load_records,
    load_source,
)
from potstill.data.samplers import length_grouped_order, padding_fraction

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_SPLITS",
    "SUPPORTED_FORMATS",
    "builtin_records",
    "fingerprint_records",
    "length_grouped_order",
    "load_records",
    "load_source",
    "padding_fraction",
]
