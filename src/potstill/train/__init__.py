"""The Distiller loop, its callbacks and objectives, and the glue from a recipe to a run."""

from potstill.train.distiller import Distiller, TrainingDiverged
from potstill.train.objective import Objective
from potstill.train.run import build_objectives, run_recipe

__all__ = ["Distiller", "Objective", "TrainingDiverged", "build_objectives", "run_recipe"]
