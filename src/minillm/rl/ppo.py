"""PPO for language models (Ouyang et al. 2022; the details follow TRL and "The N+ implementation
details of RLHF with PPO"): the reply's reward arrives at its last token, each token pays
`kl_coef` × an estimate of KL(π ‖ π_ref), GAE (γ, λ) turns the per-token rewards and the value head's
values into advantages, which are whitened over the rollout; the loss is
`minillm.training.objectives.PPOObjective` (clipped policy and value losses)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from minillm.model.heads import MiniGPTRewardModel, MiniGPTWithValueHead
from minillm.model.transformer import MiniGPT
from minillm.rl.reward import RewardFunction
from minillm.rl.rollout import RLTrainer, RolloutConfig
from minillm.training.objectives import KL_ESTIMATORS, PPOObjective, gae, kl_estimate, masked_whiten
from minillm.training.trainer import TrainingConfig

__all__ = ["PPOTrainer", "token_rewards"]


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """(B, T − 1) per-token rewards: −kl_coef × KL on every reply token, plus the reply's score on its
    last token."""
    rewards = -kl_coef * kl * mask
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every reply needs at least one token to carry its score")
    last = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(rewards)
    return rewards


class PPOTrainer(RLTrainer):
    """PPO with a value head on the policy (`MiniGPTWithValueHead`; a plain `MiniGPT` gets a new zero
    head) and a frozen copy of the starting policy as the reference. Rewards come from
    `reward_functions`: Python callables, `"answer"`, or a trained reward model through
    `minillm.rl.reward.RewardModelScorer`. `missing_stop_penalty` is added to the score of a reply that
    ran out of tokens before its end-of-turn token."""

    uses_values = True

    def __init__(self, model: nn.Module, tokenizer: Any, config: TrainingConfig | None = None, *,
                 prompts: Sequence[Any], reward_functions: Sequence[str | RewardFunction] = ("answer",),
                 reward_weights: Sequence[float] | None = None, eval_prompts: Sequence[Any] | None = None,
                 rollout: RolloutConfig | None = None, kl_coef: float = 0.05, kl_estimator: str = "k1",
                 gamma: float = 1.0, lam: float = 0.95, whiten_advantages: bool = True,
                 clip_range: float = 0.2, clip_range_value: float = 0.2, vf_coef: float = 0.1,
                 missing_stop_penalty: float = 0.0, ref_model: nn.Module | None = None, **kwargs: Any) -> None:
        if not isinstance(model, MiniGPTWithValueHead):
            if not isinstance(model, MiniGPT) or isinstance(model, MiniGPTRewardModel):
                raise TypeError("PPOTrainer needs a language model (MiniGPT or MiniGPTWithValueHead)")
            if getattr(model, "lora_config", None) is not None:  # set by apply_lora
                raise ValueError("PPO with LoRA is not supported (the value head trains in full); use GRPO")
            with_head = MiniGPTWithValueHead(model.config)
            with_head.load_state_dict(model.state_dict(), strict=False)
            with_head.name_or_path = model.name_or_path
            model = with_head
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={kl_estimator!r} is not supported; allowed: {', '.join(KL_ESTIMATORS)}")
        if kl_coef < 0 or not 0 <= gamma <= 1 or not 0 <= lam <= 1:
            raise ValueError("kl_coef must be >= 0, gamma and lam in [0, 1]")
        self.needs_reference = kl_coef > 0 or ref_model is not None
        self.kl_coef, self.kl_estimator, self.gamma, self.lam = kl_coef, kl_estimator, gamma, lam
        self.whiten_advantages, self.missing_stop_penalty = whiten_advantages, missing_stop_penalty
        super().__init__(model, tokenizer, PPOObjective(clip_range, clip_range_value, vf_coef), config,
                         prompts=prompts, reward_functions=reward_functions, reward_weights=reward_weights,
                         eval_prompts=eval_prompts, rollout=rollout, ref_model=ref_model, **kwargs)

    def _advantages(self, batch: dict[str, torch.Tensor], scores: torch.Tensor, stopped: torch.Tensor,
                    mask: torch.Tensor) -> dict[str, float]:
        scores = scores - self.missing_stop_penalty * (~stopped).float()
        if "ref_logps" in batch:
            kl = kl_estimate(batch["old_logps"], batch["ref_logps"], self.kl_estimator) * mask
        else:
            kl = torch.zeros_like(batch["old_logps"])
        rewards = token_rewards(scores, kl, mask, self.kl_coef)
        advantages, returns = gae(rewards, batch["old_values"], mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        batch["advantages"], batch["returns"] = advantages, returns
        batch.pop("ref_logps", None)  # folded into the rewards; the loss does not need it
        return {"kl": float(kl.sum(1).mean()), "non_score_reward": float((-self.kl_coef * kl).sum(1).mean()),
                "score": float(scores.mean()), "value": float((batch["old_values"] * mask).sum() / mask.sum())}
