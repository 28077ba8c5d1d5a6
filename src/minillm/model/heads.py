"""Scalar heads on the transformer: a reward model (one score per sequence) for preference learning.

`MiniGPTRewardModel` is a `MiniGPT` plus `score`, a linear map from the final hidden state to one
number. A sequence's reward is the score at its last real token (right padding is skipped), which has
attended to the whole prompt and reply. It saves and loads like any checkpoint (`config.json` says
`"architectures": ["MiniGPTRewardModel"]`); `from_base` starts one from an SFT checkpoint, whose
weights it takes, with a freshly initialised head.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from minillm.model.config import MiniGPTConfig
from minillm.model.transformer import CONFIG_FILE, MiniGPT, load_config

__all__ = ["MiniGPTRewardModel", "is_reward_checkpoint"]


class MiniGPTRewardModel(MiniGPT):
    """A language model body with a scalar reward head."""

    architecture = "MiniGPTRewardModel"

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        # small, so that untrained rewards start near zero and the first steps are well conditioned
        nn.init.normal_(self.score.weight, std=1.0 / (config.hidden_size + 1))

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) fp32 rewards: the score of each row's last real token (rows are right-padded)."""
        out = self(input_ids, attention_mask=attention_mask, logits_to_keep=1)
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:
            last = attention_mask.long().sum(dim=1) - 1
        hidden = out.hidden_states[torch.arange(input_ids.shape[0], device=input_ids.device), last]
        return self.score(hidden).squeeze(-1).float()

    @classmethod
    def from_base(cls, directory: str | Path, device: str | torch.device | None = None) -> MiniGPTRewardModel:
        """A reward model whose body is the language model in `directory` (e.g. SFT's `final/`) and whose
        head is new; a reward checkpoint is loaded whole."""
        model = cls(load_config(directory))
        model.load_weights(directory, allow_missing=() if is_reward_checkpoint(directory) else ("score.weight",))
        model.name_or_path = str(Path(directory).resolve())
        return model.to(device) if device is not None else model


def is_reward_checkpoint(directory: str | Path) -> bool:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return False
    return MiniGPTRewardModel.architecture in json.loads(path.read_text(encoding="utf-8")).get("architectures", [])
