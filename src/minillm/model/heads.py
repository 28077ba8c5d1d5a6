"""Scalar heads on the transformer: a reward model (one score per sequence) for preference learning,
and a value head (one value per position) for PPO.

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
from safetensors.torch import load_file, save_file
from torch import nn

from minillm.io import atomic_write
from minillm.model.config import MiniGPTConfig
from minillm.model.transformer import CONFIG_FILE, MiniGPT, load_config

__all__ = ["VALUE_HEAD_FILE", "MiniGPTRewardModel", "MiniGPTWithValueHead", "is_reward_checkpoint"]

VALUE_HEAD_FILE = "value_head.safetensors"


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


class MiniGPTWithValueHead(MiniGPT):
    """A policy for PPO: the language model plus `v_head`, a linear map from each position's final hidden
    state to the value of the reply so far (one forward gives logits and values; no second model).

    The head starts at zero, so the first value-loss gradients do not reach the shared body. It is
    saved apart, in `value_head.safetensors`: `model.safetensors` and `config.json` are a plain `MiniGPT`
    checkpoint, so a PPO checkpoint loads, chats and exports like any other.
    """

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__(config)
        self.v_head = nn.Linear(config.hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def value(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, T) values (fp32 at least) from the forward's `hidden_states`."""
        values = self.v_head(hidden_states).squeeze(-1)
        return values.to(torch.promote_types(values.dtype, torch.float32))

    def _weights_to_save(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("v_head.")}

    def save_pretrained(self, directory: str | Path, generation_config: dict | None = None,
                        weights: bool = True) -> None:
        super().save_pretrained(directory, generation_config, weights)
        if weights:
            head = {k: v.detach().contiguous().cpu() for k, v in self.v_head.state_dict().items()}
            atomic_write(Path(directory) / VALUE_HEAD_FILE, lambda tmp: save_file(head, tmp))

    def load_weights(self, directory: str | Path, allow_missing: tuple[str, ...] = ()) -> None:
        """The policy from `model.safetensors` and, when the directory has one, the value head from
        `value_head.safetensors` (else the head keeps its zero initialisation)."""
        super().load_weights(directory, allow_missing=(*allow_missing, "v_head.weight", "v_head.bias"))
        head_path = Path(directory) / VALUE_HEAD_FILE
        if head_path.is_file():
            self.v_head.load_state_dict(load_file(str(head_path), device=str(self.v_head.weight.device)))

    @classmethod
    def from_policy(cls, directory: str | Path, device: str | torch.device | None = None) -> MiniGPTWithValueHead:
        """The language model in `directory` (e.g. SFT's `final/`) with its value head if it has one."""
        model = cls(load_config(directory))
        model.load_weights(directory)
        model.name_or_path = str(Path(directory).resolve())
        return model.to(device) if device is not None else model
