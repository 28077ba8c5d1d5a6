"""Recipes: a stage run from a YAML config. The typed run-config schema (`config`), running one stage end to
end (`run`: tokenizer, data, model, trainer, checkpoints) and the RLHF pipeline (`rlhf`: SFT → reward model →
PPO). This is the layer the CLI and the quickstart drive; it builds on `training` and `rl`."""

from minillm.recipes.config import RunConfigError, load_run_config
from minillm.recipes.rlhf import RLHFPipeline
from minillm.recipes.run import run_stage, run_training

__all__ = ["RLHFPipeline", "RunConfigError", "load_run_config", "run_stage", "run_training"]
