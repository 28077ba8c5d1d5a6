"""Reinforcement learning on the one `Trainer`: rollouts, rewards, PPO and GRPO (the RLHF
pipeline, SFT → reward model → PPO, is `minillm.recipes.RLHFPipeline`)."""

from minillm.rl.grpo import GRPOTrainer, group_advantages
from minillm.rl.ppo import PPOTrainer
from minillm.rl.reward import RewardModelScorer, answer_reward, resolve_reward_function
from minillm.rl.rollout import RLTrainer, RolloutConfig

__all__ = ["GRPOTrainer", "PPOTrainer", "RLTrainer", "RewardModelScorer", "RolloutConfig", "answer_reward",
           "group_advantages", "resolve_reward_function"]

