"""Training: one `Trainer`, an objective per stage, checkpoints, schedules and logging.

The RL trainers (`PPOTrainer`, `GRPOTrainer`) are in `minillm.rl`, which builds on this package; the RLHF
pipeline is `minillm.recipes.RLHFPipeline`."""

from minillm.training.memory import MemoryConfig, MemoryMonitor
from minillm.training.objectives import (
    DPOObjective,
    GRPOObjective,
    LanguageModelingObjective,
    Objective,
    ObjectiveOutput,
    PPOObjective,
    RewardObjective,
)
from minillm.training.precision import resolve_precision
from minillm.training.signals import TrainingInterrupted
from minillm.training.stages import DPOTrainer, RewardTrainer
from minillm.training.state import ResumeError
from minillm.training.trainer import PreTrainer, SFTTrainer, Trainer, TrainingConfig

__all__ = ["DPOObjective", "DPOTrainer", "GRPOObjective", "LanguageModelingObjective", "MemoryConfig", "MemoryMonitor",
           "Objective", "ObjectiveOutput", "PPOObjective", "PreTrainer", "ResumeError", "RewardObjective",
           "RewardTrainer", "SFTTrainer", "Trainer", "TrainingConfig", "TrainingInterrupted", "resolve_precision"]
