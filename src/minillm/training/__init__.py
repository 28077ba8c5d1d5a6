"""Training: one `Trainer`, an objective per stage, checkpoints, schedules and logging."""

from minillm.training.objectives import LanguageModelingObjective, Objective, ObjectiveOutput
from minillm.training.trainer import PreTrainer, Trainer, TrainingConfig, resolve_precision

__all__ = ["LanguageModelingObjective", "Objective", "ObjectiveOutput", "PreTrainer", "Trainer",
           "TrainingConfig", "resolve_precision"]
