"""Training: one `Trainer`, an objective per stage, checkpoints, schedules and logging."""

from minillm.training.memory import MemoryConfig, MemoryMonitor
from minillm.training.objectives import (
    DPOObjective,
    LanguageModelingObjective,
    Objective,
    ObjectiveOutput,
    RewardObjective,
)
from minillm.training.trainer import (
    DPOTrainer,
    PreTrainer,
    RewardTrainer,
    SFTTrainer,
    Trainer,
    TrainingConfig,
    resolve_precision,
)

__all__ = ["DPOObjective", "DPOTrainer", "LanguageModelingObjective", "MemoryConfig", "MemoryMonitor", "Objective",
           "ObjectiveOutput", "PreTrainer", "RewardObjective", "RewardTrainer", "SFTTrainer", "Trainer",
           "TrainingConfig", "resolve_precision"]
