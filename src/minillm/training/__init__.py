"""Training: one `Trainer`, an objective per stage, checkpoints, schedules and logging."""

from minillm.training.memory import MemoryConfig, MemoryMonitor
from minillm.training.objectives import LanguageModelingObjective, Objective, ObjectiveOutput
from minillm.training.trainer import (
           DPOTrainer,
           PreTrainer,
           SFTTrainer,
           Trainer,
           TrainingConfig,
           resolve_precision,
)

__all__ = ["DPOTrainer", "MemoryConfig", "MemoryMonitor", "SFTTrainer", "LanguageModelingObjective", "Objective", "ObjectiveOutput", "PreTrainer", "Trainer",
           "TrainingConfig", "resolve_precision"]
