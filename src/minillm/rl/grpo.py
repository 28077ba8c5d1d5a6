"""GRPO (Shao et al. 2024, DeepSeekMath): G replies per prompt, each reply's advantage its reward
normalised within its group, A_i = (r_i − mean(r)) / (std(r) + ε); no value model. The loss is
`minillm.training.objectives.GRPOObjective` (clipped ratio, optional k3 KL to the reference, token-level
normalisation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from minillm.rl.reward import RewardFunction
from minillm.rl.rollout import RLTrainer, RolloutConfig
from minillm.training.objectives import GRPOObjective, kl_estimate
from minillm.training.trainer import TrainingConfig

__all__ = ["GRPOTrainer", "group_advantages"]


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """Per reply, its reward minus its group's mean, divided by the group's (unbiased) standard deviation
    + `eps` when `scale_rewards` (Dr. GRPO sets it off: the division favours groups with little spread).
    `rewards` holds the G replies of each prompt next to each other."""
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.flatten()


class GRPOTrainer(RLTrainer):
    """GRPO on `prompts` with `reward_functions` (callables, `"answer"` for the built-in checker, or
    `package.module:function`). `beta` = 0 drops the KL term and the reference model with it."""

    def __init__(self, model: nn.Module, tokenizer: Any, config: TrainingConfig | None = None, *,
                 prompts: Sequence[Any], reward_functions: Sequence[str | RewardFunction] = ("answer",),
                 reward_weights: Sequence[float] | None = None, eval_prompts: Sequence[Any] | None = None,
                 rollout: RolloutConfig | None = None, beta: float = 0.04, clip_low: float = 0.2,
                 clip_high: float | None = None, scale_rewards: bool = True, ref_model: nn.Module | None = None,
                 **kwargs: Any) -> None:
        rollout = rollout or RolloutConfig(samples_per_prompt=8)
        if rollout.samples_per_prompt < 2:
            raise ValueError("GRPO compares replies within a group: samples_per_prompt must be >= 2, got "
                             f"{rollout.samples_per_prompt}")
        self.needs_reference = beta > 0 or ref_model is not None  # given one, its KL is logged even at β = 0
        self.scale_rewards = scale_rewards
        super().__init__(model, tokenizer, GRPOObjective(beta, clip_low, clip_high), config, prompts=prompts,
                         reward_functions=reward_functions, reward_weights=reward_weights,
                         eval_prompts=eval_prompts, rollout=rollout, ref_model=ref_model, **kwargs)

    def _advantages(self, batch: dict[str, torch.Tensor], scores: torch.Tensor, stopped: torch.Tensor,
                    mask: torch.Tensor) -> dict[str, float]:
        group = self.rollout.samples_per_prompt
        advantages = group_advantages(scores, group, self.scale_rewards)
        batch["advantages"] = advantages[:, None] * mask
        stats = {"groups_without_signal": float((scores.view(-1, group).std(dim=1) == 0).float().mean())}
        if "ref_logps" in batch:
            kl = kl_estimate(batch["old_logps"], batch["ref_logps"], "k3") * mask
            stats["kl"] = float(kl.sum() / mask.sum().clamp(min=1))
        return stats
