"""Training objectives: what the one `Trainer` optimises, one class per stage.

An objective turns a batch into a summed loss and the number of items it was summed over. The
trainer divides by the item count of the whole optimizer step (all micro-batches), so gradient
accumulation gives exactly the update of one large batch, and padding never dilutes the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from minillm.model.transformer import causal_lm_loss, token_logps


@dataclass
class ObjectiveOutput:
    loss_sum: torch.Tensor  # summed over the batch's items; the trainer normalises
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # per-batch sums, averaged the same way


class Objective:
    """What a stage optimises. A subclass sets `name`, implements `count` and `__call__`, and overrides
    the class attributes below where its stage differs from the default."""

    name: str = ""
    reports_perplexity = False  # the loss is a mean token cross-entropy: validation adds exp(loss), `val_ppl`

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """How many items (tokens, pairs, …) the batch's loss is a sum over."""
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """Forward the batch and return the summed loss."""
        raise NotImplementedError


class LanguageModelingObjective(Objective):
    """Next-token cross-entropy over the positions whose label is not -100 (pretraining and SFT).

    For mixture-of-experts models the load-balancing loss is added with the config's
    `router_aux_loss_coef`, weighted per token like the cross-entropy.
    """

    name = "lm"
    reports_perplexity = True

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        ce_sum = causal_lm_loss(out.logits, batch["labels"], reduction="sum")
        metrics = {"ce_loss": ce_sum.detach()}
        loss_sum = ce_sum
        if out.aux_loss is not None:
            tokens = (batch["labels"][:, 1:] != -100).sum()
            aux_sum = out.aux_loss * tokens
            loss_sum = loss_sum + model.config.router_aux_loss_coef * aux_sum
            metrics["aux_loss"] = aux_sum.detach()
        return ObjectiveOutput(loss_sum=loss_sum, metrics=metrics)


# ---------------------------------------------------------------------------------------- preferences
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def stack_pairs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of preference pairs as one batch of sequences, the chosen rows first, then the rejected
    ones, right-padded to one width: (input_ids, labels, attention_mask), so one forward scores both."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(key: str, fill: int) -> torch.Tensor:
        halves = [batch[f"{side}_{key}"] for side in ("chosen", "rejected")]
        return torch.cat([F.pad(t, (0, width - t.shape[1]), value=fill) for t in halves])

    return both("input_ids", 0), both("labels", -100), both("attention_mask", 0)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Per sequence, the summed (or, with `average`, mean) log-probability of the labelled tokens:
    position t's logits score labels[t + 1]; -100 labels are skipped. Computed in fp32."""
    logps, mask = token_logps(logits, labels)
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards β·(log π − log π_ref) of the chosen and rejected replies.

    With h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)):
    - sigmoid (Rafailov et al. 2023), with label smoothing ε (cDPO: the label is wrong with probability
      ε): −(1 − ε)·log σ(β·h) − ε·log σ(−β·h); log 2 when the policy is the reference;
    - ipo (Azar et al. 2023): (h − 1/(2β))², on per-token average log-probabilities (as TRL);
    - hinge (SLiC): max(0, 1 − β·h).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; allowed: {', '.join(DPO_LOSS_TYPES)}")
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


class DPOObjective(Objective):
    """Direct preference optimisation on pairs from `PreferenceDataset` (keys `chosen_input_ids`,
    `chosen_labels`, `rejected_…`): the loss is summed over pairs, and the metrics carry the names TRL
    users know (`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`,
    `logps/chosen`, `logps/rejected`).

    The reference log-probabilities come from the batch when it holds `ref_chosen_logps` and
    `ref_rejected_logps` (precomputed once, so no reference model stays in memory), else from
    `reference`, a frozen model run without gradients.

    `rpo_alpha` > 0 adds α × the chosen reply's mean token negative log-likelihood to each pair's loss
    (RPO, Pang et al. 2024, as TRL's `rpo_alpha`): DPO alone may lower the chosen replies' likelihood
    together with the rejected ones'; the NLL term holds it up.
    """

    name = "dpo"

    def __init__(self, reference: nn.Module | None = None, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, rpo_alpha: float = 0.0) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r} is not supported; allowed: {', '.join(DPO_LOSS_TYPES)}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.reference = reference
        if reference is not None:
            reference.requires_grad_(False).eval()
        if rpo_alpha < 0:
            raise ValueError(f"rpo_alpha must be >= 0, got {rpo_alpha}")
        self.beta, self.loss_type, self.label_smoothing, self.rpo_alpha = beta, loss_type, label_smoothing, rpo_alpha

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["chosen_input_ids"].shape[0])

    def logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) log-probabilities of `model`, from one forward over both halves."""
        chosen, rejected, _ = self._forward(model, batch, nll=False)
        return chosen, rejected

    def _forward(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 nll: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Chosen and rejected log-probabilities and, with `nll`, the chosen replies' mean token NLL."""
        ids, labels, mask = stack_pairs(batch)
        n = self.count(batch)
        logits = model(ids, attention_mask=mask).logits
        logps = sequence_logps(logits, labels, average=self.loss_type == "ipo")
        chosen_nll = -sequence_logps(logits[:n], labels[:n], average=True) if nll else None
        return logps[:n], logps[n:], chosen_nll

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.reference is None:
            raise ValueError("DPO needs reference log-probabilities: give a reference model, or precompute "
                             "them into the batches (ref_chosen_logps, ref_rejected_logps)")
        with torch.no_grad():
            return self.logps(self.reference, batch)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        policy_chosen, policy_rejected, chosen_nll = self._forward(model, batch, nll=self.rpo_alpha > 0)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen.to(policy_chosen), ref_rejected.to(policy_chosen),
            self.beta, self.loss_type, self.label_smoothing)
        loss_sum = losses.sum()
        metrics = {}
        if chosen_nll is not None:
            loss_sum = loss_sum + self.rpo_alpha * chosen_nll.sum()
            metrics["nll_loss"] = chosen_nll.detach().sum()
        metrics |= {
            "rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": policy_chosen.detach().sum(), "logps/rejected": policy_rejected.detach().sum(),
        }
        return ObjectiveOutput(loss_sum=loss_sum, metrics=metrics)


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                center_coefficient: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley–Terry loss −log σ(r_w − r_l − m) (m: an optional required margin, as in Llama 2),
    plus center_coefficient · (r_w + r_l)², which keeps rewards centred on zero (Eisenstein et al. 2023)."""
    losses = -F.logsigmoid(chosen - rejected - margin)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


class RewardObjective(Objective):
    """Train a `MiniGPTRewardModel` on preference pairs: chosen and rejected go through one forward, each
    scored at its last real token. A batch may carry a per-pair `margin`. Metrics: `accuracy` (the
    chosen reply scores higher) and `margin` (mean r_w − r_l), plus the mean rewards."""

    name = "reward"

    def __init__(self, margin: float = 0.0, center_coefficient: float = 0.0) -> None:
        if center_coefficient < 0:
            raise ValueError(f"center_coefficient must be >= 0, got {center_coefficient}")
        self.margin, self.center_coefficient = margin, center_coefficient

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["chosen_input_ids"].shape[0])

    def rewards(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, _, mask = stack_pairs(batch)
        scores = model.rewards(ids, attention_mask=mask)
        n = self.count(batch)
        return scores[:n], scores[n:]

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        chosen, rejected = self.rewards(model, batch)
        margin = batch["margin"].to(chosen) if "margin" in batch else self.margin
        losses = reward_loss(chosen, rejected, margin, self.center_coefficient)
        metrics = {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).detach().sum(),
                   "rewards/chosen": chosen.detach().sum(), "rewards/rejected": rejected.detach().sum()}
        return ObjectiveOutput(loss_sum=losses.sum(), metrics=metrics)


# ---------------------------------------------------------------------------------------- reinforcement learning
# RL batches come from `minillm.rl` rollouts: prompt + sampled reply as one right-padded row, `labels`
# -100 everywhere but the reply, and per-token tensors on the (B, T − 1) grid of `token_logps` (position
# t scores token t + 1): `old_logps` (the policy that sampled), `advantages`, and for PPO `returns` and
# `old_values`, for GRPO `ref_logps`. Losses are summed over reply tokens; the trainer divides by the
# reply tokens of the whole optimizer step (token-level normalisation).
KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π (Schulman, "Approximating KL divergence"),
    with log r = log π_ref − log π: k1 = −log r (unbiased, can be negative), k2 = ½ (log r)²,
    k3 = r − 1 − log r (unbiased and never negative; GRPO's)."""
    log_ratio = ref_logps - logps
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.exp(log_ratio) - 1 - log_ratio
    raise ValueError(f"kl estimator {kind!r} is not supported; allowed: {', '.join(KL_ESTIMATORS)}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / std over the masked entries (unbiased variance, as TRL); `shift_mean=False` keeps
    the mean (PPO's advantage whitening subtracts it, reward whitening may not)."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2)
    var = (((x - mean) * mask) ** 2).sum() / (n - 1)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's masked positions:
    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, with V = 0 after the reply's last token.
    Returns (advantages, returns = advantages + values), zero outside the mask."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    length = values.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        clip_low: float = 0.2, clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token: max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)) with
    ρ = π/π_old, and where the clipped term was the larger (the token's gradient is cut)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + (clip_low if clip_high is None else clip_high))
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token: ½·max((V − R)², (V_old + clip(V − V_old, ±ε) − R)²), and
    where the clipped term was the larger."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    # old + (V − old) may differ from V by a rounding step: only a real clip counts
    was_clipped = (clipped > unclipped) & ((values - old_values).abs() > clip)
    return 0.5 * torch.maximum(unclipped, clipped), was_clipped


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the next-token distribution, (B, T − 1), without gradient."""
    with torch.no_grad():
        logp = logits[:, :-1].float().log_softmax(-1)
        return -(logp.exp() * logp).sum(-1)


def _reply_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def _clipped_surrogate(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float, clip_low: float,
                       clip_high: float | None = None):
    """What PPO and GRPO share: one forward, the reply tokens' log-probabilities at the sampling
    temperature, the clipped surrogate per token, and the metrics both report (summed over reply tokens).
    Returns (model output, log-probs, float reply mask, surrogate, log ρ, metrics)."""
    out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    logps, mask = token_logps(out.logits, batch["labels"], temperature)
    pg, clipped = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], clip_low, clip_high)
    m = mask.float()
    log_ratio = (logps - batch["old_logps"]).detach()
    metrics = {"policy_loss": (pg.detach() * m).sum(), "clipfrac": (clipped.float() * m).sum(),
               "entropy": (_entropy(out.logits) * m).sum(), "ratio": (log_ratio.exp() * m).sum()}
    return out, logps, m, pg, log_ratio, metrics


class PPOObjective(Objective):
    """PPO's loss on a rollout minibatch: the clipped policy surrogate plus `vf_coef` × the clipped
    value loss, per reply token. The model is a `minillm.model.heads.MiniGPTWithValueHead`: one forward
    gives the logits and, from the same hidden states, the values. Metrics (token means):
    `policy_loss`, `value_loss`, `clipfrac`, `value_clipfrac`, `approx_kl` (½(log ρ)², as TRL),
    `entropy`, `ratio`."""

    name = "ppo"
    temperature = 1.0  # the sampling temperature: log-probabilities are those of softmax(logits / T)

    def __init__(self, clip_range: float = 0.2, clip_range_value: float = 0.2, vf_coef: float = 0.1) -> None:
        if clip_range <= 0 or clip_range_value <= 0:
            raise ValueError("clip_range and clip_range_value must be positive")
        if vf_coef < 0:
            raise ValueError(f"vf_coef must be >= 0, got {vf_coef}")
        self.clip_range, self.clip_range_value, self.vf_coef = clip_range, clip_range_value, vf_coef

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return _reply_count(batch)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        out, _, m, pg, log_ratio, metrics = _clipped_surrogate(model, batch, self.temperature, self.clip_range)
        # DDP (torch) wraps the model and keeps it in `.module`; the value head is the model's own
        values = getattr(model, "module", model).value(out.hidden_states)[:, :-1]
        vf, vf_clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], self.clip_range_value)
        metrics |= {"value_loss": (vf.detach() * m).sum(), "value_clipfrac": (vf_clipped.float() * m).sum(),
                    "approx_kl": (0.5 * log_ratio ** 2 * m).sum()}
        return ObjectiveOutput(loss_sum=((pg + self.vf_coef * vf) * m).sum(), metrics=metrics)


class GRPOObjective(Objective):
    """GRPO's loss (Shao et al. 2024) on a rollout minibatch: the clipped surrogate with the group-
    normalised advantage of each reply on all its tokens, plus β × the k3 estimate of KL to the
    reference (`ref_logps` in the batch; none when β = 0), summed per reply token — so the trainer's
    division by the step's reply tokens gives the token-level normalisation of DAPO / TRL's
    `loss_type="dapo"` (a long reply is not down-weighted per token). `clip_high` > `clip_low`
    is DAPO's clip-higher. Metrics (token means): `policy_loss`, `kl`, `clipfrac`, `entropy`, `ratio`."""

    name = "grpo"
    temperature = 1.0  # the sampling temperature: log-probabilities are those of softmax(logits / T)

    def __init__(self, beta: float = 0.04, clip_low: float = 0.2, clip_high: float | None = None) -> None:
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if clip_low <= 0 or (clip_high is not None and clip_high <= 0):
            raise ValueError("clip_low and clip_high must be positive")
        self.beta, self.clip_low, self.clip_high = beta, clip_low, clip_high

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return _reply_count(batch)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        _, logps, m, per_token, _, metrics = _clipped_surrogate(model, batch, self.temperature, self.clip_low,
                                                                self.clip_high)
        if self.beta > 0:
            kl = kl_estimate(logps, batch["ref_logps"], "k3")
            per_token = per_token + self.beta * kl
            metrics["kl"] = (kl.detach() * m).sum()
        return ObjectiveOutput(loss_sum=(per_token * m).sum(), metrics=metrics)
