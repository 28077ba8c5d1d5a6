"""Reinforcement learning on the one `Trainer`: rollouts, rewards, PPO, GRPO and the RLHF pipeline."""

from minillm.rl.grpo import GRPOTrainer, group_advantages
from minillm.rl.ppo import PPOTrainer
from minillm.rl.reward import RewardModelScorer, answer_reward, resolve_reward_function
from minillm.rl.rollout import RLTrainer, RolloutConfig

__all__ = ["GRPOTrainer", "PPOTrainer", "RLHFPipeline", "RLTrainer", "RewardModelScorer", "RolloutConfig", "answer_reward",
           "group_advantages", "resolve_reward_function"]


def __getattr__(name: str):
    """`RLHFPipeline` builds on `minillm.training.run`, which imports this package: loaded on first use."""
    if name == "RLHFPipeline":
        from minillm.rl.pipeline import RLHFPipeline

        return RLHFPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
