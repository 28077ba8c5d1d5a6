"""Training: one `Trainer`, an objective per stage, checkpoints, schedules and logging."""

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
from minillm.training.trainer import (
    DPOTrainer,
    PreTrainer,
    RewardTrainer,
    SFTTrainer,
    Trainer,
    TrainingConfig,
    resolve_precision,
)

__all__ = ["DPOObjective", "DPOTrainer", "GRPOObjective", "GRPOTrainer", "LanguageModelingObjective", "MemoryConfig",
           "MemoryMonitor", "Objective", "ObjectiveOutput", "PPOObjective", "PPOTrainer", "PreTrainer", "RLHFPipeline",
           "RewardObjective", "RewardTrainer", "SFTTrainer", "Trainer", "TrainingConfig", "resolve_precision"]

_RL = {"PPOTrainer": "minillm.rl.ppo", "GRPOTrainer": "minillm.rl.grpo", "RLHFPipeline": "minillm.rl.pipeline"}


def __getattr__(name: str):
    """The RL trainers live in `minillm.rl` (which builds on this package); imported here on first use."""
    if name in _RL:
        import importlib

        return getattr(importlib.import_module(_RL[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
