"""Rollouts for on-policy RL, and `RLTrainer`, the `Trainer` that PPO and GRPO share.

RL is the one training loop with another source of batches. `RolloutSource` is the trainer's training
data: when its buffer is empty it takes the next `prompts_per_rollout` prompts (a seeded, resumable
order), samples `samples_per_prompt` replies each with the current policy through `TextGenerator` (KV
cache, `generation_batch_size` sequences at a time), scores them with the reward functions, and runs
the policy (and the reference, and for PPO the values) over prompt + reply once without gradients.
The stage then turns rewards into per-token advantages (`RLTrainer._advantages`). The buffer is cut into
micro-batches, `epochs` passes in a seeded order; the trainer's optimizer step takes
`grad_accum_steps` of them, so one rollout of N replies gives epochs × N / (batch_size ×
grad_accum_steps) optimizer steps. The buffer lives on the CPU and is part of the checkpoint, so a run
resumed mid-rollout continues with the very same samples.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from minillm.data.builtin import RLPrompt
from minillm.data.formats import DataError, PromptRecord, to_prompt
from minillm.data.loader import BatchLoader, pad_collate
from minillm.inference.generator import GenerationConfig, TextGenerator
from minillm.model.transformer import eval_mode, token_logps
from minillm.rl.reward import RewardFunction, compute_rewards, resolve_reward_function
from minillm.tokenizer.chat import encode_chat
from minillm.training.trainer import Trainer, TrainingConfig

__all__ = ["RLTrainer", "RolloutConfig", "RolloutSource", "as_prompt_records"]


@dataclass
class RolloutConfig:
    """How replies are sampled and reused."""

    prompts_per_rollout: int = 8
    samples_per_prompt: int = 1  # GRPO's group size G (>= 2); PPO usually 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    epochs: int = 1  # passes over each rollout (PPO epochs; GRPO's μ iterations)
    generation_batch_size: int = 0  # sequences sampled at once; 0: the whole rollout (validation: ≥ 64 at once)
    max_prompt_length: int = 0  # prompts keep their last tokens up to this; 0: context − max_new_tokens

    def __post_init__(self) -> None:
        for name in ("prompts_per_rollout", "samples_per_prompt", "max_new_tokens", "epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("generation_batch_size", "max_prompt_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive (RL samples), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def sequences(self) -> int:
        return self.prompts_per_rollout * self.samples_per_prompt


def as_prompt_records(prompts: Sequence[Any], what: str = "prompts") -> list[PromptRecord]:
    """`PromptRecord`s from records, the built-in `RLPrompt`s (their `answer` becomes a column), or dicts
    in the prompt schema (`{"prompt": text or [messages], …}`)."""
    records = []
    for i, item in enumerate(prompts):
        if isinstance(item, PromptRecord):
            records.append(item)
        elif isinstance(item, RLPrompt):
            records.append(PromptRecord(tuple(item.messages), {"answer": item.answer}))
        else:
            try:
                records.append(to_prompt(item))
            except DataError as e:
                raise DataError(f"{what}[{i}]: {e}") from None
    if not records:
        raise ValueError(f"no {what} given")
    return records


class RolloutSource:
    """The training data of an `RLTrainer`: micro-batches cut from rollouts of the current policy."""

    def __init__(self, trainer: RLTrainer, prompts: list[PromptRecord]) -> None:
        self.trainer = trainer
        self.dataset = prompts
        cfg, tc = trainer.rollout, trainer.config
        self.prompt_loader = BatchLoader(prompts, cfg.prompts_per_rollout, collate=list, shuffle=True,
                                         seed=tc.seed, drop_last=True)
        if len(self.prompt_loader) == 0:
            raise ValueError(f"{len(prompts)} prompts are fewer than prompts_per_rollout={cfg.prompts_per_rollout}")
        self.per_epoch = cfg.sequences // tc.batch_size
        self.micro_batches = cfg.epochs * self.per_epoch  # per rollout
        self.rollout_index = 0  # rollouts made so far
        self.cursor = 0  # micro-batches of the buffered rollout already handed out
        self.buffer: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.prompt_loader) * self.micro_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over the prompts (the trainer starts another when it needs more)."""
        prompt_batches = iter(self.prompt_loader)
        while True:
            if self.buffer is None:
                records = next(prompt_batches, None)
                if records is None:
                    return
                self.buffer = self.trainer._make_rollout(records, self.rollout_index)
                self.buffer["rollout_index"] = torch.tensor(self.rollout_index)
                self.rollout_index += 1
                self.cursor = 0
            batch = self._micro_batch(self.cursor)
            self.cursor += 1
            if self.cursor == self.micro_batches:
                self.buffer = None
            yield batch

    def _micro_batch(self, cursor: int) -> dict[str, torch.Tensor]:
        buffer = self.buffer
        epoch, within = divmod(cursor, self.per_epoch)
        seed = self.trainer.config.seed * 1_000_003 + int(buffer["rollout_index"]) * 101 + epoch
        order = torch.randperm(buffer["input_ids"].shape[0], generator=torch.Generator().manual_seed(seed))
        size = self.trainer.config.batch_size
        rows = order[within * size:(within + 1) * size]
        width = int(buffer["attention_mask"][rows].sum(1).max())
        batch = {}
        for key, value in buffer.items():
            if key == "rollout_index":
                continue
            value = value[rows]
            batch[key] = value[:, :width] if value.shape[1] == buffer["input_ids"].shape[1] else value[:, :width - 1]
        return batch

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompt_loader.state_dict(), "rollout_index": self.rollout_index,
                "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompt_loader.load_state_dict(state["prompts"])
        self.rollout_index, self.cursor = state["rollout_index"], state["cursor"]

    def tensor_state(self) -> dict[str, torch.Tensor] | None:
        """The buffered rollout (saved beside the JSON state, as tensors)."""
        return None if self.buffer is None else {k: v.cpu() for k, v in self.buffer.items()}

    def load_tensor_state(self, state: dict[str, torch.Tensor] | None) -> None:
        self.buffer = state


class RLTrainer(Trainer):
    """The `Trainer` with rollouts as its training data; `PPOTrainer` and `GRPOTrainer` add the objective
    and how rewards become advantages.

    Validation samples greedily on `eval_prompts` and reports `val_reward`, the mean reward (for the
    built-in answer checker: the accuracy); `best/` keeps the policy with the highest.
    """

    needs_reference = True  # keep a frozen copy of the starting policy
    uses_values = False  # the policy has a value head (PPO)

    def __init__(self, model: nn.Module, tokenizer: Any, objective: Any, config: TrainingConfig | None, *,
                 prompts: Sequence[Any], reward_functions: Sequence[str | RewardFunction],
                 reward_weights: Sequence[float] | None = None, eval_prompts: Sequence[Any] | None = None,
                 rollout: RolloutConfig | None = None, ref_model: nn.Module | None = None, **kwargs: Any) -> None:
        distributed = kwargs.get("distributed", config.distributed if config is not None else "none")
        if distributed not in ("none", None):
            raise ValueError(f"{type(self).__name__} under torchrun (distributed={distributed}) is not supported "
                             "yet: rollouts are sampled in one process; run it without --distributed")
        if tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs the tokenizer (prompts are rendered with its chat "
                             "template and replies decoded for the reward functions)")
        self.rollout = rollout or RolloutConfig()
        self.reward_functions = [resolve_reward_function(f) for f in reward_functions]
        if not self.reward_functions:
            raise ValueError("give at least one reward function (e.g. 'answer', or a reward model scorer)")
        self.reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(self.reward_functions)
        if len(self.reward_weights) != len(self.reward_functions):
            raise ValueError(f"{len(self.reward_weights)} reward_weights for {len(self.reward_functions)} reward "
                             "functions")
        objective.temperature = self.rollout.temperature  # the policy optimised is the one sampled from
        super().__init__(model, tokenizer, objective, config, **kwargs)
        train_config = self.config
        minibatch = train_config.batch_size * train_config.grad_accum_steps
        if self.rollout.sequences % minibatch:
            raise ValueError(f"a rollout of prompts_per_rollout × samples_per_prompt = {self.rollout.sequences} "
                             f"replies must split into optimizer steps of batch_size × grad_accum_steps = "
                             f"{minibatch}")
        self.reference = None
        if self.needs_reference:
            self.reference = (ref_model if ref_model is not None else copy.deepcopy(self.base_model))
            self.reference.requires_grad_(False).eval().to(self.device)
        self.train_loader = RolloutSource(self, as_prompt_records(prompts))
        self.eval_data = as_prompt_records(eval_prompts, "eval_prompts") if eval_prompts else None
        self.latest_rollout: dict[str, float] = {}
        # Rollouts decode a fixed batch shape over and over: on a GPU the compiled decode step pays for itself
        # in the first rollouts. Never "auto" here: its switch depends on timings, and a compiled step may round
        # a logit's last bit differently, so the samples (and a resumed run) would depend on the machine's load.
        fast_decode = torch.device(self.device).type == "cuda"
        self._generator = TextGenerator(self.base_model, tokenizer, fast_decode=fast_decode)
        self._stop_ids = self._generator.chat_stop_ids()

    # ------------------------------------------------------------------ prompts and sampling
    def _prompt_ids(self, record: PromptRecord) -> list[int]:
        ids = encode_chat(self.tokenizer, record.prompt, add_generation_prompt=True)[0]
        limit = self.rollout.max_prompt_length or (
            self.base_model.config.max_position_embeddings - self.rollout.max_new_tokens)
        if limit < 1:
            raise ValueError(f"max_new_tokens={self.rollout.max_new_tokens} leaves no room for the prompt in "
                             f"the model's context of {self.base_model.config.max_position_embeddings}")
        return ids[-limit:]

    def _sample(self, rows: list[list[int]], config: GenerationConfig, seed: int | None,
                default_chunk: int | None = None) -> list[list[int]]:
        """Replies (new ids, ending with the stop token when one was sampled), `generation_batch_size` rows
        at a time (unset: `default_chunk`, else all at once)."""
        step = self.rollout.generation_batch_size or default_chunk or len(rows)
        replies: list[list[int]] = []
        for k, start in enumerate(range(0, len(rows), step)):
            chunk_config = replace(config, seed=None if seed is None else seed + k)
            with self._autocast():
                replies += self._generator.generate(rows[start:start + step], chunk_config)
        return replies

    def _generation_config(self, greedy: bool) -> GenerationConfig:
        cfg = self.rollout
        return GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=not greedy,
                                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                stop_token_ids=self._stop_ids)

    def _rewards(self, records: list[PromptRecord], replies: list[list[int]],
                 repeat: int) -> tuple[torch.Tensor, dict[str, float]]:
        completions = [self.tokenizer.decode(r, skip_special_tokens=True) for r in replies]
        prompts = [[m.to_dict() for m in r.prompt] for r in records for _ in range(repeat)]
        names = sorted({k for r in records for k in r.columns})
        columns = {k: [r.columns.get(k) for r in records for _ in range(repeat)] for k in names}
        return compute_rewards(self.reward_functions, self.reward_weights, prompts, completions, columns)

    # ------------------------------------------------------------------ one rollout
    @torch.no_grad()
    def _make_rollout(self, records: list[PromptRecord], index: int) -> dict[str, torch.Tensor]:
        started = time.time()
        group = self.rollout.samples_per_prompt
        rows = [ids for ids in (self._prompt_ids(r) for r in records) for _ in range(group)]
        seed = self.config.seed * 7_919 + index * 1_000
        replies = self._sample(rows, self._generation_config(greedy=False), seed)
        scores, reward_means = self._rewards(records, replies, group)
        stopped = torch.tensor([bool(r) and r[-1] in self._stop_ids for r in replies])
        # prompt + reply as one right-padded row, labelled on the reply only
        batch = pad_collate(self.tokenizer.pad_token_id or 0)(
            [{"input_ids": torch.tensor(p + r), "labels": torch.tensor([-100] * len(p) + r)}
             for p, r in zip(rows, replies)])
        labels = batch["labels"]
        batch["old_logps"], values = self._score(self.base_model, batch, with_values=self.uses_values)
        if values is not None:
            batch["old_values"] = values
        if self.reference is not None:
            batch["ref_logps"], _ = self._score(self.reference, batch, with_values=False)
        mask = labels[:, 1:] != -100
        stats = self._advantages(batch, scores, stopped, mask)
        lengths = mask.sum(1).float()
        self.latest_rollout = {"reward": float(scores.mean()), "reward_std": float(scores.std()) if len(scores) > 1
                               else 0.0, **reward_means, "completion_length": float(lengths.mean()),
                               "stopped": float(stopped.float().mean()), "rollout_s": round(time.time() - started, 2),
                               **stats}
        return batch

    def _score(self, model: nn.Module, batch: dict[str, torch.Tensor],
               with_values: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probabilities (and values) of `model` on the rollout, micro-batch by micro-batch,
        in eval mode and the training precision: the `old_logps` the ratio ρ starts from."""
        logps, values = [], []
        size = self.config.batch_size
        with eval_mode(model):
            for start in range(0, batch["input_ids"].shape[0], size):
                part = {k: v[start:start + size].to(self.device) for k, v in batch.items()}
                with self._autocast():
                    out = model(part["input_ids"], attention_mask=part["attention_mask"])
                logps.append(token_logps(out.logits, part["labels"], self.rollout.temperature)[0].cpu())
                if with_values:
                    values.append((model.value(out.hidden_states)[:, :-1] * (part["labels"][:, 1:] != -100)).cpu())
        return torch.cat(logps), (torch.cat(values) if with_values else None)

    def _advantages(self, batch: dict[str, torch.Tensor], scores: torch.Tensor, stopped: torch.Tensor,
                    mask: torch.Tensor) -> dict[str, float]:
        """Add `advantages` (and what the objective needs) to the rollout; return statistics to log."""
        raise NotImplementedError

    # ------------------------------------------------------------------ logging, validation, saving
    def _extra_log(self) -> dict[str, float]:
        return {f"rollout/{k}": v for k, v in self.latest_rollout.items()}

    def _loader_tensors(self) -> dict[str, torch.Tensor] | None:
        return self.train_loader.tensor_state()

    def _load_loader_tensors(self, tensors: dict[str, torch.Tensor] | None) -> None:
        self.train_loader.load_tensor_state(tensors)

    @torch.no_grad()
    def evaluate(self, dataloader: Any = None, max_batches: int | None = None) -> dict[str, float]:
        """Mean reward of greedy replies to the evaluation prompts (`val_reward`)."""
        records = as_prompt_records(dataloader, "eval_prompts") if dataloader is not None else self.eval_data
        if not records:
            raise ValueError("no evaluation prompts given")
        replies = self._sample([self._prompt_ids(r) for r in records], self._generation_config(greedy=True), None,
                               default_chunk=max(self.rollout.sequences, 64))  # any number of prompts
        scores, means = self._rewards(records, replies, 1)
        return {"val_reward": float(scores.mean()), **{f"val_{k}": v for k, v in means.items()}}

    def _selection_score(self, result: dict[str, float]) -> float:
        return -result["val_reward"]

    def train(self) -> dict[str, float]:
        result = super().train()
        if "best_val_loss" in result:
            result["best_val_reward"] = -result.pop("best_val_loss")
        return result
