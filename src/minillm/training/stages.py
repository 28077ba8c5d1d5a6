"""The preference stages on the one `Trainer`: DPO (with the reference it needs) and the reward model.
`PreTrainer` and `SFTTrainer` are in trainer.py; the RL stages (PPO, GRPO) are in `minillm.rl`."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from minillm.data.loader import pad_collate
from minillm.data.preference import PreferenceDataset
from minillm.model.heads import MiniGPTRewardModel
from minillm.model.transformer import eval_mode
from minillm.training.objectives import DPOObjective, RewardObjective
from minillm.training.trainer import Trainer, TrainingConfig

__all__ = ["DPOTrainer", "RewardTrainer"]


class DPOTrainer(Trainer):
    """`Trainer` with the DPO objective on a `PreferenceDataset` (see `DPOObjective`).

    The reference is the policy as it starts: a frozen copy (`ref_model`, default a deep copy of
    `model`), or, with `precompute_ref_logps=True`, its log-probabilities computed once over the
    training and validation pairs before the first step, so no second model stays in memory.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, config: TrainingConfig | None = None, *,
                 ref_model: nn.Module | None = None, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, rpo_alpha: float = 0.0, precompute_ref_logps: bool = False,
                 **kwargs: Any) -> None:
        if precompute_ref_logps and ref_model is not None:
            raise ValueError("give either ref_model or precompute_ref_logps=True, not both")
        reference = None if precompute_ref_logps else (ref_model or copy.deepcopy(model))
        super().__init__(model, tokenizer, DPOObjective(reference, beta, loss_type, label_smoothing, rpo_alpha),
                         config, **kwargs)
        if reference is not None:
            reference.to(self.device)
        if precompute_ref_logps:
            for data in (self.train_loader.dataset if self.train_loader is not None else None, self.eval_data):
                if data is not None:
                    self._precompute_reference(data)

    @torch.no_grad()
    def _precompute_reference(self, dataset: Dataset) -> None:
        """Store the starting policy's log-probabilities in every item of `dataset` (a PreferenceDataset)."""
        if not isinstance(dataset, PreferenceDataset):
            raise TypeError("precompute_ref_logps needs a PreferenceDataset (its items get the reference "
                            "log-probabilities)")
        items = dataset.items
        collate = pad_collate(self._pad_id())
        objective: DPOObjective = self.objective  # type: ignore[assignment]
        with eval_mode(self.base_model):
            for start in range(0, len(items), self.config.batch_size):
                chunk = items[start:start + self.config.batch_size]
                batch = self._to_device(collate([{k: v for k, v in item.items() if not k.startswith("ref_")}
                                                 for item in chunk]))
                with self._autocast():
                    chosen, rejected = objective.logps(self.base_model, batch)
                for item, c, r in zip(chunk, chosen.float().cpu(), rejected.float().cpu()):
                    item["ref_chosen_logps"], item["ref_rejected_logps"] = c, r


class RewardTrainer(Trainer):
    """`Trainer` with the Bradley–Terry objective (`RewardObjective`) on a `PreferenceDataset`; the model is
    a `minillm.model.heads.MiniGPTRewardModel`."""

    def __init__(self, model: nn.Module, tokenizer: Any = None, config: TrainingConfig | None = None, *,
                 margin: float = 0.0, center_coefficient: float = 0.0, **kwargs: Any) -> None:
        if not isinstance(model, MiniGPTRewardModel):
            raise TypeError("RewardTrainer needs a reward model (minillm.model.heads.MiniGPTRewardModel, e.g. "
                            "MiniGPTRewardModel.from_base(sft_checkpoint))")
        distributed = kwargs.get("distributed", config.distributed if config is not None else "none")
        if distributed not in ("none", None):
            raise ValueError("reward model training under torchrun (distributed=ddp|fsdp) is not supported yet: "
                             "the reward head runs outside the wrapped forward; train it in one process")
        super().__init__(model, tokenizer, RewardObjective(margin, center_coefficient), config, **kwargs)
