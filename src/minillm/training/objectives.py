"""Training objectives: what the one `Trainer` optimises, one class per stage.

An objective turns a batch into a summed loss and the number of items it was summed over. The
trainer divides by the item count of the whole optimizer step (all micro-batches), so gradient
accumulation gives exactly the update of one large batch, and padding never dilutes the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from minillm.model.transformer import causal_lm_loss


@dataclass
class ObjectiveOutput:
    loss_sum: torch.Tensor  # summed over the batch's items; the trainer normalises
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # per-batch sums, averaged the same way


class Objective(Protocol):
    name: str

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """How many items (tokens, pairs, …) the batch's loss is a sum over."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        """Forward the batch and return the summed loss."""


class LanguageModelingObjective:
    """Next-token cross-entropy over the positions whose label is not -100 (pretraining and SFT).

    For mixture-of-experts models the load-balancing loss is added with the config's
    `router_aux_loss_coef`, weighted per token like the cross-entropy.
    """

    name = "lm"

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
