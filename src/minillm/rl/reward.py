"""Rewards for RL: plain Python callables, the built-in answer checker, and a trained reward model.

A reward function is called once per rollout, as TRL calls its reward functions:

    reward(prompts, completions, **columns) -> list[float]

`prompts` are the prompt conversations (lists of `{"role", "content"}`), `completions` the sampled
replies as text, and `columns` every other field of the prompt records, one list entry per completion
(e.g. `answer` for the built-in word problems). Return one float per completion; `None` counts as 0.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from minillm.data.builtin import check_answer
from minillm.data.formats import Message
from minillm.data.loader import pad_collate
from minillm.model.transformer import eval_mode
from minillm.tokenizer.chat import encode_chat

RewardFunction = Callable[..., Sequence[float | None]]

__all__ = ["BUILTIN_REWARDS", "RewardFunction", "RewardModelScorer", "answer_reward", "compute_rewards",
           "resolve_reward_function"]


def answer_reward(prompts: Sequence[Any], completions: Sequence[str], answer: Sequence[Any],
                  **_: Any) -> list[float]:
    """The built-in answer checker: 1.0 when the completion's final number equals `answer`, else 0.0."""
    return [float(check_answer(int(a), c)) for a, c in zip(answer, completions)]


BUILTIN_REWARDS: dict[str, RewardFunction] = {"answer": answer_reward}


def resolve_reward_function(spec: str | RewardFunction) -> RewardFunction:
    """A reward function from a callable, a built-in name (`answer`) or `package.module:function`."""
    if callable(spec):
        return spec
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, sep, attr = str(spec).partition(":")
    if not sep:
        raise ValueError(f"reward function {spec!r}: give a built-in name ({', '.join(BUILTIN_REWARDS)}) "
                         "or 'package.module:function'")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward function {spec!r} cannot be imported: {e}") from None
    if not callable(function):
        raise ValueError(f"reward function {spec!r} is not callable")
    return function


class RewardModelScorer:
    """A trained `MiniGPTRewardModel` as a reward function: each prompt + completion is rendered with the
    chat template, exactly as the reward model's training pairs were, and scored at its last token."""

    __name__ = "reward_model"

    def __init__(self, model: nn.Module, tokenizer: Any, batch_size: int = 16, max_length: int | None = None,
                 autocast: Callable[[], Any] | None = None) -> None:
        if not hasattr(model, "rewards"):
            raise TypeError("RewardModelScorer needs a reward model (minillm.model.heads.MiniGPTRewardModel)")
        self.model = model.requires_grad_(False).eval()
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.max_length = max_length or model.config.max_position_embeddings
        self.autocast = autocast

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Sequence[dict[str, str]]], completions: Sequence[str],
                 **_: Any) -> list[float]:
        device = next(self.model.parameters()).device
        rows = []
        for prompt, completion in zip(prompts, completions):
            messages = [Message(m["role"], m["content"]) for m in prompt] + [Message("assistant", completion)]
            rows.append(encode_chat(self.tokenizer, messages)[0][-self.max_length:])
        scores: list[float] = []
        collate = pad_collate(self.tokenizer.pad_token_id or 0)
        with eval_mode(self.model):
            for start in range(0, len(rows), self.batch_size):
                batch = collate([{"input_ids": torch.tensor(r)} for r in rows[start:start + self.batch_size]])
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                with self.autocast() if self.autocast is not None else torch.autocast(device.type, enabled=False):
                    scores.extend(self.model.rewards(ids, attention_mask=mask).float().tolist())
        return scores


def compute_rewards(functions: Sequence[RewardFunction], weights: Sequence[float],
                    prompts: list[list[dict[str, str]]], completions: list[str],
                    columns: dict[str, list[Any]]) -> tuple[torch.Tensor, dict[str, float]]:
    """(N,) weighted sum of every function's rewards, and each function's mean (for the logs).
    A function returning the wrong number of values, or NaN, is an error that names it."""
    total = torch.zeros(len(completions), dtype=torch.float64)
    means = {}
    for function, weight in zip(functions, weights):
        name = getattr(function, "__name__", type(function).__name__)
        values = function(prompts, completions, **columns)
        values = [0.0 if v is None else float(v) for v in values]
        if len(values) != len(completions):
            raise ValueError(f"reward function {name} returned {len(values)} values for {len(completions)} "
                             "completions")
        if any(math.isnan(v) or math.isinf(v) for v in values):
            raise ValueError(f"reward function {name} returned NaN or inf")
        tensor = torch.tensor(values, dtype=torch.float64)
        total += weight * tensor
        means[f"rewards/{name}"] = float(tensor.mean())
    return total.float(), means
