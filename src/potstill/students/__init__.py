"""Students: built from a teacher's layers or a shrunk config, and saved to load without potstill."""

from potstill.students.build import count_parameters, from_config, layers_from_teacher, shrink_report
from potstill.students.save import save_hf_student, save_sentence_transformer

__all__ = [
    "count_parameters",
    "from_config",
    "layers_from_teacher",
    "save_hf_student",
    "save_sentence_transformer",
    "shrink_report",
]
