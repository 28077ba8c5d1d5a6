"""Text generation for `MiniGPT`: greedy and sampled decoding over a preallocated KV cache.

One prefill forward fills the cache with the prompt and computes logits for its last position only;
then each step feeds one token per row. Prompts of different lengths are left-padded, so every row's
next token lands in the same column, and the attention mask (one column longer per step) keeps the
padding out of attention and out of the position ids: each row decodes exactly as it would alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from minillm.model.layers import KVCache

logger = logging.getLogger("minillm.inference")

Prompt = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]
# Called after every step with the tokens generated so far, (B, n); returns (B,) bool: rows to stop.
StopCriterion = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class GenerationConfig:
    """How tokens are chosen and when generation stops; names and meanings follow Hugging Face's."""

    max_new_tokens: int = 128
    max_length: int | None = None  # total length including the prompt; wins over max_new_tokens when set
    do_sample: bool = True
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    stop_token_ids: list[int] | None = None  # None = the tokenizer's (else the model's) eos; [] = none
    stop_strings: list[str] | None = None  # text prompts only; the text is cut before the string
    seed: int | None = None  # a private generator: reproducible, and the global RNG is left alone
    use_cache: bool = True  # False re-runs the whole sequence every step (the reference path)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be positive (or None), got {self.max_length}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as in transformers: seen tokens' positive logits are divided by `penalty` and their
    negative logits multiplied, so a penalty > 1 lowers them whatever their sign. `seen` is a (B, V)
    bool mask rather than the token history, so that left padding is never penalised."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's k largest logits (ties with the k-th survive too); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches `top_p`.

    A token survives while the mass ranked above it is still below `top_p`, so the most likely token
    always survives and the set never overshoots by more than one token.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while generating; the caller's train/eval mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class TextGenerator:
    """Generates with a `MiniGPT` (or any model with its forward); text in and out with a tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: Any = None,
                 device: str | torch.device | None = None) -> None:
        self.model = model if device is None else model.to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    # ------------------------------------------------------------------ public API
    def generate(self, prompt: Prompt, config: GenerationConfig | None = None,
                 **overrides: Any) -> str | list[str] | list[int] | list[list[int]]:
        """The continuation of `prompt`, in the prompt's form: text → text, ids → new ids, batch → list.

        Id outputs end with the stop token when one was hit (as in transformers); text never shows it.
        """
        config = _with_overrides(config, overrides)
        if isinstance(prompt, str):
            return self._generate_text([prompt], config)[0]
        if len(prompt) == 0:
            raise ValueError("generate() got an empty list of prompts")
        if all(isinstance(p, str) for p in prompt):
            return self._generate_text(list(prompt), config)
        if config.stop_strings:
            raise ValueError("stop_strings need text prompts (they match decoded text); got token ids")
        if isinstance(prompt[0], (list, tuple)):
            return self._generate_ids([list(p) for p in prompt], config)
        return self._generate_ids([list(prompt)], config)[0]

    def sample_generate(self, input_ids: torch.Tensor, config: GenerationConfig | None = None,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """transformers-style: (B, prompt + new) ids, prompt included; rows that stopped early are padded.

        `attention_mask` (1 = token, 0 = padding) is needed only for left-padded batches.
        """
        config = config or GenerationConfig()
        if config.stop_strings:
            raise ValueError("stop_strings need text prompts; use generate() with a str")
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self._decode(input_ids.to(self.device), mask, config)

    # ------------------------------------------------------------------ prompts in, results out
    def _generate_text(self, prompts: list[str], config: GenerationConfig) -> list[str]:
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer: TextGenerator(model, tokenizer)")
        # Documents start with the tokenizer's special prefix (BOS) in training, so prompts do too.
        rows = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
        stop_strings = config.stop_strings or []

        def stop_string_hit(new_tokens: torch.Tensor) -> torch.Tensor:
            texts = [tokenizer.decode(r, skip_special_tokens=True) for r in new_tokens.tolist()]
            return torch.tensor([any(s in t for s in stop_strings) for t in texts], device=new_tokens.device)

        stop_ids = set(self._stop_ids(config))
        texts = []
        for new_ids in self._generate_ids(rows, config, stop_string_hit if stop_strings else None):
            if new_ids and new_ids[-1] in stop_ids:
                new_ids = new_ids[:-1]
            text = tokenizer.decode(new_ids, skip_special_tokens=True)
            cuts = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
            texts.append(text[:min(cuts)] if cuts else text)
        return texts

    def _generate_ids(self, rows: list[list[int]], config: GenerationConfig,
                      stop_criterion: StopCriterion | None = None) -> list[list[int]]:
        """New ids per row, cut after the row's first stop token; rows are left-padded into one batch."""
        if any(len(r) == 0 for r in rows):
            raise ValueError("a prompt encodes to no tokens; give at least one token")
        width, pad = max(map(len, rows)), self._pad_id()
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        output = self._decode(input_ids, mask, config, stop_criterion)
        stop_ids = set(self._stop_ids(config))
        results = []
        for new_ids in output[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(new_ids) if t in stop_ids), len(new_ids))
            results.append(new_ids[:end])
        return results

    # ------------------------------------------------------------------ the decoding loop
    @torch.inference_mode()
    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: GenerationConfig,
                stop_criterion: StopCriterion | None = None) -> torch.Tensor:
        batch, prompt_len = input_ids.shape
        max_new = self._budget(prompt_len, config)
        if max_new == 0:
            return input_ids
        total, pad = prompt_len + max_new, self._pad_id()
        tokens = input_ids.new_full((batch, total), pad)  # (B, total), filled column by column
        tokens[:, :prompt_len] = input_ids
        # Without padding the model's causal kernel needs no mask (and no per-step check of one).
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            grown = torch.ones(batch, max_new, dtype=torch.long, device=self.device)
            mask = torch.cat([attention_mask.long(), grown], dim=1)
        # The last token is never fed back, so the cache holds at most total - 1 positions.
        cache = KVCache(self.model.config.num_hidden_layers, total - 1) if config.use_cache else None
        seen = None
        if config.repetition_penalty != 1.0:
            counts = torch.zeros(batch, self.model.config.vocab_size, dtype=torch.long, device=self.device)
            real = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
            seen = counts.scatter_add_(1, input_ids, real) > 0  # (B, V)
        generator = None
        if config.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(config.seed)
        stop_ids = torch.tensor(self._stop_ids(config), dtype=torch.long, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)

        with _eval_mode(self.model):
            for pos in range(prompt_len, total):
                logits = self._next_logits(tokens, mask, pos, cache)
                next_tokens = self._pick(self._process_logits(logits, seen, config), config, generator)
                next_tokens = next_tokens.masked_fill(finished, pad)
                tokens[:, pos] = next_tokens
                if seen is not None:
                    seen.scatter_(1, next_tokens[:, None], True)
                finished |= torch.isin(next_tokens, stop_ids)
                if stop_criterion is not None:
                    finished |= stop_criterion(tokens[:, prompt_len:pos + 1])
                if bool(finished.all()):  # the one host sync per step
                    return tokens[:, :pos + 1]
        return tokens

    def _next_logits(self, tokens: torch.Tensor, mask: torch.Tensor | None, pos: int,
                     cache: KVCache | None) -> torch.Tensor:
        """fp32 logits (B, V) for the token at `pos`: a forward over what the cache lacks (the prompt at
        prefill, then the last token), or over the whole sequence when there is no cache."""
        start = cache.seq_len if cache is not None else 0
        out = self.model(tokens[:, start:pos], attention_mask=None if mask is None else mask[:, :pos],
                         past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)
        return out.logits[:, -1].float()

    @staticmethod
    def _process_logits(logits: torch.Tensor, seen: torch.Tensor | None,
                        config: GenerationConfig) -> torch.Tensor:
        """The logits-processor chain, in transformers' order: penalty, temperature, top-k, top-p."""
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
        if config.greedy:
            return logits
        return top_p_filter(top_k_filter(logits / config.temperature, config.top_k), config.top_p)

    @staticmethod
    def _pick(logits: torch.Tensor, config: GenerationConfig,
              generator: torch.Generator | None) -> torch.Tensor:
        if config.greedy:
            return logits.argmax(dim=-1)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)

    # ------------------------------------------------------------------ lengths and special ids
    def _budget(self, prompt_len: int, config: GenerationConfig) -> int:
        """New tokens to generate: from max_length or max_new_tokens, clamped to the model's context."""
        context = self.model.config.max_position_embeddings
        if prompt_len > context:
            raise ValueError(f"the prompt has {prompt_len} tokens, more than the model's context of "
                             f"{context} (max_position_embeddings); shorten it")
        if config.max_length is not None:
            max_new = config.max_length - prompt_len
            if max_new < 0:
                logger.warning("max_length=%d is shorter than the prompt (%d tokens); nothing is generated",
                               config.max_length, prompt_len)
                max_new = 0
        else:
            max_new = config.max_new_tokens
        if prompt_len + max_new > context:
            logger.warning("prompt (%d tokens) + %d new tokens exceed the model's context of %d; generating "
                           "at most %d new tokens", prompt_len, max_new, context, context - prompt_len)
            max_new = context - prompt_len
        return max_new

    def _eos_id(self) -> int | None:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return eos if eos is not None else self.model.config.eos_token_id

    def _stop_ids(self, config: GenerationConfig) -> list[int]:
        if config.stop_token_ids is not None:
            return list(config.stop_token_ids)
        eos = self._eos_id()
        return [] if eos is None else [eos]

    def _pad_id(self) -> int:
        for candidate in (getattr(self.tokenizer, "pad_token_id", None), self.model.config.pad_token_id,
                          self._eos_id()):
            if candidate is not None:
                return candidate
        return 0


def _with_overrides(config: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
    """`config` (or the defaults) with `overrides` applied, validated again."""
    known = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(config or GenerationConfig(), **overrides)
