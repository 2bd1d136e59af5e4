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

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_SPLITS",
    "SUPPORTED_FORMATS",
    "builtin_records",
    "fingerprint_records",
    "load_records",
    "load_source",
]
