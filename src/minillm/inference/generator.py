"""Text generation for `MiniGPT`: greedy, sampled and beam-search decoding over a preallocated KV cache,
whole or streamed.

One prefill forward fills the cache with the prompt and computes logits for its last position only;
then each step feeds one token per row. Prompts of different lengths are left-padded, so every row's
next token lands in the same column, and the attention mask (one column longer per step) keeps the
padding out of attention and out of the position ids: each row decodes exactly as it would alone.

Fast decode path: the eager loop above has a new key length every step, so it cannot be compiled well.
The fast path keeps the keys and values in a `StaticKVCache` of fixed capacity, fills it with an eager
prefill, and then runs one compiled one-token step whose shapes never change (the new token is written at
a position given as a tensor; attention covers the whole buffer through a mask). The logits processors,
sampling, stop rules and streaming stay outside the compiled step and are shared with the eager loop.
See `TextGenerator` for when it is used.

Streaming (`stream`, `chat_stream`) yields a `GenerationChunk` per token. Text is decoded incrementally
and released only up to the last complete UTF-8 character (a Chinese character is often two or three
byte-level tokens), and text that could be the start of a stop string is held back until it is known
not to be one, so the chunks always join to exactly the non-streamed text.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from minillm.model.layers import KVCache, StaticKVCache
from minillm.model.transformer import MiniGPT, eval_mode

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
    min_p: float = 0.0  # drop tokens whose probability is below min_p × the top token's; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per earlier occurrence in the output
    num_beams: int = 1  # > 1: beam search (deterministic; do_sample is ignored)
    length_penalty: float = 1.0  # beam scores are log-prob sums / generated_length ** length_penalty
    early_stopping: bool = False  # beam search: stop as soon as num_beams hypotheses are finished
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
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (as in OpenAI's API), got {getattr(self, name)}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")

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


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Min-p sampling: keep the tokens whose probability is at least `min_p` times the most likely one's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


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


@dataclass
class GenerationChunk:
    """One step of a streamed generation."""

    text: str  # new text since the previous chunk; "" while a character's bytes are incomplete
    token_ids: list[int]  # the token generated in this step (a stop token is not included)
    finish_reason: str | None = None  # on the last chunk: "stop" (stop token or string) or "length"


class _IncrementalDetokenizer:
    """Decodes a growing list of ids piece by piece. Only text ending in a complete character is released:
    the last decoded window is kept, and a new piece is the difference once it no longer ends in U+FFFD
    (the replacement character a partial UTF-8 sequence decodes to)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window starts here (at a token that began a character)
        self.read_offset = 0  # text of ids[prefix_offset:read_offset] has been released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        released = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(released) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(released):]
        return ""

    def flush(self) -> str:
        """Whatever is still pending at the end (an incomplete character decodes as U+FFFD, as it does
        in the non-streamed text)."""
        released = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(released):]


class _StopStringFilter:
    """Releases streamed text, holding back any tail that could be the start of a stop string."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stop_strings = [s for s in stop_strings if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string was hit: then the text ends before it)."""
        self.pending += text
        if not self.stop_strings:
            out, self.pending = self.pending, ""
            return out, False
        cuts = [i for i in (self.pending.find(s) for s in self.stop_strings) if i >= 0]
        if cuts:
            out, self.pending = self.pending[:min(cuts)], ""
            return out, True
        hold = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


FastDecode = bool | Literal["auto"]
# Prior estimates for the "auto" policy until this process has measured its own (see `FastDecodePolicy`).
# On a shared 2-core CPU, compiling the one-token step of the tiny and micro presets took 4-11 s with a warm
# inductor cache and 10-37 s with a cold one, and the compiled step decoded 1.4-1.8x faster than the eager
# loop. On a GPU the eager loop is bound by kernel launches, which CUDA graphs remove; its prior is a guess
# of the same order, replaced by the first measured compile.
COMPILE_SECONDS_PRIOR = {"cpu": 30.0, "cuda": 30.0}
SPEEDUP_PRIOR = {"cpu": 1.5, "cuda": 4.0}
MIN_CACHE_CAPACITY = 128  # static caches come in powers of two from here up to the model's context


@dataclass
class FastDecodePolicy:
    """When `fast_decode="auto"` switches a shape (batch size, cache capacity) to the compiled path.

    Compiling costs seconds to a minute once; each compiled step then saves a fraction of an eager one.
    The rule is the ski-rental one: decode eagerly, and compile as soon as the eager time already spent on
    that shape, had it been spent on the fast path, would have saved as much as the compile costs (time ×
    (1 − 1/speedup) ≥ compile seconds). A one-off generation never pays for a compile; a long-lived chat,
    server or RL loop pays once, after it has shown that it will decode a lot, and never loses more than
    about twice the best choice made in hindsight. The compile cost and the speedup start from per-device
    priors and are replaced by this process's own measurements as soon as it has some.
    """

    compile_seconds: dict[str, float] = field(default_factory=lambda: dict(COMPILE_SECONDS_PRIOR))
    speedup: dict[str, float] = field(default_factory=lambda: dict(SPEEDUP_PRIOR))

    def should_compile(self, eager_seconds: float, device_type: str) -> bool:
        compile_s = self.compile_seconds.get(device_type, COMPILE_SECONDS_PRIOR["cpu"])
        speedup = max(self.speedup.get(device_type, SPEEDUP_PRIOR["cpu"]), 1.0 + 1e-6)
        return eager_seconds * (1.0 - 1.0 / speedup) >= compile_s


@dataclass
class FastDecodeStats:
    """What the fast path did in one `TextGenerator` (read by tests and `minillm bench`)."""

    compiles: int = 0  # one-token steps compiled (one per batch size and cache capacity)
    compile_seconds: float = 0.0  # total time the compiling first calls took
    fast_generations: int = 0
    eager_generations: int = 0
    eager_seconds: dict[tuple, float] = field(default_factory=dict)  # eager decode time per shape key
    eager_steps: dict[tuple, int] = field(default_factory=dict)


def _one_token_logits(model: nn.Module, token: torch.Tensor, cache_position: torch.Tensor,
                      attention_mask: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """The compiled decode step: fp32 logits (B, V) of one new token (B, 1) written at `cache_position`."""
    out = model(token, attention_mask=attention_mask, past_key_values=cache, cache_position=cache_position,
                logits_to_keep=1)
    return out.logits[:, -1].float()


class _StaticDecoder:
    """The fast path for one (batch, capacity) shape: its static cache and input buffers, reused by every
    generation of that shape, and the compiled step (compiled on its first call)."""

    def __init__(self, model: MiniGPT, batch: int, capacity: int, device: torch.device,
                 step: Callable[..., torch.Tensor]) -> None:
        config = model.config
        self.model, self.step, self.device = model, step, device
        self.cache = StaticKVCache(config.num_hidden_layers, batch, config.num_key_value_heads, capacity,
                                   config.attention_head_dim, device=device)  # the keys' dtype (see update)
        self.mask = torch.ones(batch, capacity, dtype=torch.long, device=device)  # 0 = left padding
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.compiled = False
        self.busy = False  # a generation in progress owns the cache (an interleaved second one goes eager)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Fill the cache with the prompt (eagerly: prompt lengths vary); fp32 logits (B, V) of its last token."""
        prompt_len = input_ids.shape[1]
        self.mask.fill_(1)
        if attention_mask is not None:
            self.mask[:, :prompt_len] = attention_mask
        positions = torch.arange(prompt_len, device=self.device)
        out = self.model(input_ids, attention_mask=self.mask, past_key_values=self.cache, cache_position=positions,
                         logits_to_keep=1)
        return out.logits[:, -1].float()

    def next_logits(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """fp32 logits (B, V) after feeding `token` (B,) at cache slot `position`."""
        self.token.copy_(token[:, None])
        self.position.fill_(position)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed
        return self.step(self.model, self.token, self.position, self.mask, self.cache)


class TextGenerator:
    """Generates with a `MiniGPT` (or any model with its forward); text in and out with a tokenizer.

    `fast_decode` chooses the decode loop for greedy and sampled generation with a KV cache:

    - `False`: the eager loop over a growing cache (every option, any model);
    - `True`: the compiled fixed-shape step over a `StaticKVCache` wherever it applies, compiling on the
      first generation of each (batch size, cache capacity) shape (capacities are powers of two from 128
      up to the model's context, so a session compiles a handful of shapes at most, and reuses them);
    - `"auto"` (default): eager until this generator has decoded enough on a shape for the compile to pay
      for itself (`FastDecodePolicy`), then the fast path. A one-off `minillm generate` stays eager.

    The fast path supports sampling (seeded too), every logits processor and penalty, stop tokens and stop
    strings, streaming and left-padded batches; it gives the eager path's greedy tokens (the compiled step
    may round the last bits of a logit differently, so a near-tie could in principle differ). It falls back
    to the eager loop for beam search, `use_cache=False`, MoE models (data-dependent expert routing), models
    other than `MiniGPT`, and a generation that starts while another one on the same shape is in progress.
    On CUDA the step runs as a CUDA graph (`mode="reduce-overhead"`); on a CPU, inductor's C++ wrapper calls
    the kernels (`cpp_wrapper`, less Python per step). `compile_options` replace the keyword arguments
    (backend, mode, options) given to `torch.compile`, e.g. `{"backend": "aot_eager"}` to trace without
    compiling kernels; a generator given them does not teach the shared "auto" policy its compile time.
    `policy` replaces that shared policy.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, device: str | torch.device | None = None,
                 fast_decode: FastDecode = "auto", policy: FastDecodePolicy | None = None,
                 compile_options: dict[str, Any] | None = None) -> None:
        if fast_decode not in (True, False, "auto"):
            raise ValueError(f"fast_decode must be True, False or 'auto', got {fast_decode!r}")
        self.model = model if device is None else model.to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.fast_decode = fast_decode
        self.policy = policy or _SHARED_POLICY
        self.fast_stats = FastDecodeStats()
        self._decoders: dict[tuple, _StaticDecoder] = {}
        self.compile_options = compile_options
        self._compiled_step: Callable[..., torch.Tensor] | None = None
        self._fast_failed = False

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

    def stream(self, prompt: str | Sequence[int], config: GenerationConfig | None = None,
               **overrides: Any) -> Iterator[GenerationChunk]:
        """Generate for one prompt token by token: a `GenerationChunk` per step, the last one carrying the
        finish reason. The texts join to what `generate` returns for the same prompt and config (seeded
        sampling included). Closing the iterator stops decoding at once."""
        config = _with_overrides(config, overrides)
        if config.num_beams > 1:
            raise ValueError("beam search cannot stream (the best beam is known only at the end); use generate()")
        if self.tokenizer is None:
            raise ValueError("streaming decodes text and needs a tokenizer: TextGenerator(model, tokenizer)")
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt encodes to no tokens; give at least one token")
        return self._stream_ids(ids, config)

    def chat_prompt_ids(self, messages: Sequence[Any]) -> list[int]:
        """The prompt for a conversation: the tokenizer's chat template with the assistant turn opened."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer: TextGenerator(model, tokenizer)")
        return list(self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True))

    def chat_stop_ids(self) -> list[int]:
        """Where an assistant turn ends: the template's end-of-turn token, and end of text."""
        ids = [getattr(self.tokenizer, "im_end_id", None), self._eos_id()]
        return list(dict.fromkeys(t for t in ids if t is not None))

    def chat_stream(self, messages: Sequence[Any], config: GenerationConfig | None = None,
                    **overrides: Any) -> Iterator[GenerationChunk]:
        """Stream the assistant's reply to `messages` (role/content dicts or `Message`s)."""
        config = _with_overrides(config, overrides)
        if config.stop_token_ids is None:
            config = dataclasses.replace(config, stop_token_ids=self.chat_stop_ids())
        return self.stream(self.chat_prompt_ids(messages), config)

    def chat(self, messages: Sequence[Any], config: GenerationConfig | None = None, **overrides: Any) -> str:
        """The assistant's whole reply to `messages`."""
        return "".join(chunk.text for chunk in self.chat_stream(messages, config, **overrides))

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

    def _stream_ids(self, ids: list[int], config: GenerationConfig) -> Iterator[GenerationChunk]:
        stop_ids = set(self._stop_ids(config))
        detokenizer = _IncrementalDetokenizer(self.tokenizer)
        text_filter = _StopStringFilter(config.stop_strings or [])
        steps = self._decode_steps(torch.tensor([ids], device=self.device), None, config)
        try:
            for tokens in steps:
                token = int(tokens[0, -1])
                if token in stop_ids:
                    yield GenerationChunk(text_filter.push(detokenizer.flush())[0] + text_filter.flush(), [], "stop")
                    return
                text, hit = text_filter.push(detokenizer.add(token))
                if hit:
                    yield GenerationChunk(text, [token], "stop")
                    return
                yield GenerationChunk(text, [token])
            text, hit = text_filter.push(detokenizer.flush())
            yield GenerationChunk(text if hit else text + text_filter.flush(), [], "stop" if hit else "length")
        finally:
            steps.close()

    # ------------------------------------------------------------------ the decoding loop
    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: GenerationConfig,
                stop_criterion: StopCriterion | None = None) -> torch.Tensor:
        """(B, prompt + new) ids: the whole decoding loop (beam search when `config.num_beams > 1`)."""
        if config.num_beams > 1:
            return self._beam_search(input_ids, attention_mask, config)
        result = input_ids
        for step in self._decode_steps(input_ids, attention_mask, config, stop_criterion):
            result = step
        return result

    @torch.inference_mode()
    def _decode_steps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      config: GenerationConfig, stop_criterion: StopCriterion | None = None
                      ) -> Iterator[torch.Tensor]:
        """Decode step by step, yielding the ids so far (B, prompt + n) after each new column; rows that
        hit a stop token are padded from then on, and the loop ends when every row has stopped."""
        batch, prompt_len = input_ids.shape
        max_new = self._budget(prompt_len, config)
        if max_new == 0:
            return
        total, pad = prompt_len + max_new, self._pad_id()
        tokens = input_ids.new_full((batch, total), pad)  # (B, total), filled column by column
        tokens[:, :prompt_len] = input_ids
        mask = _generation_mask(attention_mask, max_new)
        # The last token is never fed back, so the cache holds at most total - 1 positions.
        shape = (batch, self._capacity(total - 1))
        fast = self._static_decoder(shape, config)
        cache = KVCache(self.model.config.num_hidden_layers, total - 1) if config.use_cache and fast is None else None
        seen = None
        if config.repetition_penalty != 1.0:
            counts = torch.zeros(batch, self.model.config.vocab_size, dtype=torch.long, device=self.device)
            real = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
            seen = counts.scatter_add_(1, input_ids, real) > 0  # (B, V)
        counts = None  # occurrences of each token in the output, for presence/frequency penalties
        if config.presence_penalty or config.frequency_penalty:
            counts = torch.zeros(batch, self.model.config.vocab_size, device=self.device)
        generator = None
        if config.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(config.seed)
        stop_ids = torch.tensor(self._stop_ids(config), dtype=torch.long, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)

        decode_seconds, decode_steps = 0.0, 0  # after the prefill, not counting the consumer of the yields
        if fast is not None:
            fast.busy = True
        try:
            with eval_mode(self.model):
                for pos in range(prompt_len, total):
                    started = time.perf_counter()
                    timed = pos > prompt_len and (fast is None or fast.compiled)  # not the prefill, not a compile
                    if fast is None:
                        logits = self._next_logits(tokens, mask, pos, cache)
                    elif pos == prompt_len:
                        logits = fast.prefill(input_ids, attention_mask)
                    else:
                        logits = self._fast_logits(fast, tokens[:, pos - 1], pos - 1)
                    next_tokens = self._pick(self._process_logits(logits, seen, config, counts), config, generator)
                    next_tokens = next_tokens.masked_fill(finished, pad)
                    tokens[:, pos] = next_tokens
                    if seen is not None:
                        seen.scatter_(1, next_tokens[:, None], True)
                    if counts is not None:
                        counts.scatter_add_(1, next_tokens[:, None], (~finished).float()[:, None])
                    finished |= torch.isin(next_tokens, stop_ids)
                    if stop_criterion is not None:
                        finished |= stop_criterion(tokens[:, prompt_len:pos + 1])
                    done = bool(finished.all())  # the one host sync per step
                    if timed:
                        decode_seconds += time.perf_counter() - started
                        decode_steps += 1
                    yield tokens[:, :pos + 1]
                    if done:
                        return
        finally:
            self._record(shape, fast, decode_seconds, decode_steps, config.use_cache)

    # ------------------------------------------------------------------ the fast path
    def _capacity(self, positions: int) -> int:
        """The static cache size for `positions` cached positions: the next power of two (at least
        MIN_CACHE_CAPACITY), at most the model's context."""
        context = self.model.config.max_position_embeddings
        return min(context, max(MIN_CACHE_CAPACITY, 1 << max(positions - 1, 0).bit_length()))

    def _static_decoder(self, shape: tuple[int, int], config: GenerationConfig) -> _StaticDecoder | None:
        """The fast path's decoder for a generation of `shape` (batch, capacity), or None for the eager loop."""
        if (self.fast_decode is False or self._fast_failed or not config.use_cache or config.num_beams > 1
                or not isinstance(self.model, MiniGPT) or self.model.config.is_moe):
            return None
        # one cache per autocast state: generating under autocast (RL rollouts of a bf16 run) gives keys and
        # values of other dtypes than the weights' (the cache takes them at its first write)
        dtype = next(self.model.parameters()).dtype
        if torch.is_autocast_enabled(self.device.type):
            dtype = torch.get_autocast_dtype(self.device.type)
        key = (*shape, dtype)
        decoder = self._decoders.get(key)
        if decoder is None:
            eager_seconds = self.fast_stats.eager_seconds.get(shape, 0.0)
            if self.fast_decode == "auto" and not self.policy.should_compile(eager_seconds, self.device.type):
                return None
            if self._compiled_step is None:
                options = self.compile_options
                if options is None:  # CUDA graphs on a GPU; on a CPU a C++ wrapper (~15% less per step)
                    options = ({"mode": "reduce-overhead"} if self.device.type == "cuda"
                               else {"options": {"cpp_wrapper": True}})
                self._compiled_step = torch.compile(_one_token_logits, fullgraph=True, dynamic=False, **options)
            decoder = self._decoders[key] = _StaticDecoder(self.model, *shape, self.device, self._compiled_step)
        return None if decoder.busy else decoder

    def _fast_logits(self, decoder: _StaticDecoder, token: torch.Tensor, position: int) -> torch.Tensor:
        """The compiled step's logits; its first call compiles (timed, and it falls back to running the same
        step eagerly if compiling fails, e.g. without a C++ compiler)."""
        if decoder.compiled:
            return decoder.next_logits(token, position)
        started = time.perf_counter()
        try:
            logits = decoder.next_logits(token, position)
        except Exception as error:  # noqa: BLE001 - any compiler failure: decode on, eagerly
            logger.warning("compiling the fast decode step failed (%s: %s); decoding eagerly from now on",
                           type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            self._fast_failed = True
            decoder.step = _one_token_logits
            logits = decoder.next_logits(token, position)
        seconds = time.perf_counter() - started
        decoder.compiled = True
        if not self._fast_failed:
            self.fast_stats.compiles += 1
            self.fast_stats.compile_seconds += seconds
            if self.compile_options is None:  # what the "auto" policy would pay (not a test backend's price)
                self.policy.compile_seconds[self.device.type] = seconds
            logger.info("compiled the fast decode step for batch %d, cache %d in %.1f s",
                        *decoder.mask.shape, seconds)
        return logits

    def _record(self, shape: tuple[int, int], fast: _StaticDecoder | None, decode_seconds: float,
                decode_steps: int, cached: bool) -> None:
        """Count a finished (or abandoned) generation; eager decode time feeds the "auto" policy, and a
        fast generation on a shape also timed eagerly updates the policy's speedup estimate."""
        stats = self.fast_stats
        if fast is None:
            stats.eager_generations += 1
            if cached and decode_steps:
                stats.eager_seconds[shape] = stats.eager_seconds.get(shape, 0.0) + decode_seconds
                stats.eager_steps[shape] = stats.eager_steps.get(shape, 0) + decode_steps
            return
        fast.busy = False
        stats.fast_generations += 1
        eager_steps = stats.eager_steps.get(shape, 0)
        if eager_steps and decode_steps and self.compile_options is None:
            eager_step_s = stats.eager_seconds[shape] / eager_steps
            fast_step_s = decode_seconds / decode_steps
            self.policy.speedup[self.device.type] = eager_step_s / max(fast_step_s, 1e-9)

    @torch.inference_mode()
    def _beam_search(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     config: GenerationConfig) -> torch.Tensor:
        """Beam search with transformers' rules, so both pick the same sequence from the same logits.

        Each step scores every (beam, token) continuation by its summed log-probability and keeps the
        2·num_beams best (enough that num_beams stay alive when some end). A continuation that ends with
        a stop token, or reaches the length budget, becomes a finished hypothesis scored by
        sum / generated_length ** length_penalty, if it ranks among the first num_beams; the rest keep
        running. A prompt is done when num_beams hypotheses are finished and `early_stopping` is set, or
        (otherwise) when the best running beam, scored at its current length, cannot beat the worst
        finished one. Returns (B, prompt + n) ids of the best hypothesis per prompt, padded."""
        batch, prompt_len = input_ids.shape
        max_new = self._budget(prompt_len, config)
        if max_new == 0:
            return input_ids
        beams, pad, device = config.num_beams, self._pad_id(), self.device
        total = prompt_len + max_new
        stop_ids = torch.tensor(self._stop_ids(config), dtype=torch.long, device=device)
        keep = max(2, 1 + len(stop_ids)) * beams
        first_beams = torch.arange(keep, device=device) < beams  # candidates that may finish this step
        # every prompt is repeated once per beam; only beam 0 starts alive so the first step does not
        # pick the same continuation num_beams times
        running = input_ids.new_full((batch, beams, total), pad)
        running[:, :, :prompt_len] = input_ids[:, None]
        running_scores = torch.zeros(batch, beams, device=device)
        running_scores[:, 1:] = -1e9
        finished = running.clone()
        finished_scores = torch.full((batch, beams), -1e9, device=device)
        finished_lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
        is_done = torch.zeros(batch, beams, dtype=torch.bool, device=device)
        improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
        mask = _generation_mask(attention_mask, max_new)
        if mask is not None:
            mask = mask.repeat_interleave(beams, dim=0)
        cache = KVCache(self.model.config.num_hidden_layers, total - 1)
        vocab = self.model.config.vocab_size
        rows = torch.arange(batch, device=device)[:, None]

        with eval_mode(self.model):
            for pos in range(prompt_len, total):
                flat = running.view(batch * beams, total)
                logits = self._next_logits(flat, mask, pos, cache)  # (B·beams, V)
                log_probs = logits.log_softmax(dim=-1)
                if config.repetition_penalty != 1.0:  # on log-probs, as transformers does in beam search
                    real = torch.ones_like(flat[:, :pos]) if mask is None else mask[:, :pos]
                    seen = torch.zeros(flat.shape[0], vocab, dtype=torch.long, device=device)
                    seen = seen.scatter_add_(1, flat[:, :pos], real.long()) > 0  # padding is never penalised
                    log_probs = apply_repetition_penalty(log_probs, seen, config.repetition_penalty)
                scores = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, -1)
                top_scores, top_index = scores.topk(keep, dim=-1)
                parent, token = top_index // vocab, top_index % vocab
                candidates = running[rows, parent]  # (B, keep, total)
                candidates[:, :, pos] = token
                ends = torch.isin(token, stop_ids) if len(stop_ids) else torch.zeros_like(token, dtype=torch.bool)
                if pos == total - 1:
                    ends = torch.ones_like(ends)  # the length budget ends every candidate
                # the best num_beams candidates that go on become the running beams
                alive_scores = top_scores + ends.float() * -1e9
                alive = alive_scores.topk(beams, dim=-1).indices
                running = candidates[rows, alive]
                running_scores = alive_scores[rows, alive]
                cache.reorder((rows * beams + parent[rows, alive]).view(-1))
                # candidates that end (among the first num_beams) join the finished hypotheses
                generated = pos + 1 - prompt_len
                end_scores = top_scores / generated ** config.length_penalty
                full = is_done.all(dim=-1, keepdim=True) & config.early_stopping
                end_scores = end_scores + (full | ~improvable).float() * -1e9
                newly = ends & first_beams[None, :]
                end_scores = end_scores + (~newly).float() * -1e9
                merged_scores = torch.cat([finished_scores, end_scores], dim=1)
                best = merged_scores.topk(beams, dim=-1).indices
                finished = torch.cat([finished, candidates], dim=1)[rows, best]
                finished_scores = merged_scores[rows, best]
                lengths = torch.full_like(token, generated)
                finished_lengths = torch.cat([finished_lengths, lengths], dim=1)[rows, best]
                is_done = torch.cat([is_done, newly], dim=1)[rows, best]
                # can a running beam still beat the worst finished hypothesis?
                best_running = running_scores[:, :1] / generated ** config.length_penalty
                worst_finished = torch.where(is_done, finished_scores.min(dim=1, keepdim=True).values,
                                             torch.full_like(finished_scores, -1e9))
                improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
                all_full = bool(is_done.all()) and config.early_stopping
                if not bool(improvable.any()) or all_full:
                    break
        best_lengths = finished_lengths[:, 0]
        out = finished[:, 0, :prompt_len + int(best_lengths.max())].clone()
        columns = torch.arange(out.shape[1], device=device)[None, :]
        return out.masked_fill(columns >= prompt_len + best_lengths[:, None], pad)

    def _next_logits(self, tokens: torch.Tensor, mask: torch.Tensor | None, pos: int,
                     cache: KVCache | None) -> torch.Tensor:
        """fp32 logits (B, V) for the token at `pos`: a forward over what the cache lacks (the prompt at
        prefill, then the last token), or over the whole sequence when there is no cache."""
        start = cache.seq_len if cache is not None else 0
        out = self.model(tokens[:, start:pos], attention_mask=None if mask is None else mask[:, :pos],
                         past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)
        return out.logits[:, -1].float()

    @staticmethod
    def _process_logits(logits: torch.Tensor, seen: torch.Tensor | None, config: GenerationConfig,
                        counts: torch.Tensor | None = None) -> torch.Tensor:
        """The logits-processor chain, in transformers' order (repetition penalty, temperature, top-k,
        top-p, min-p), with OpenAI's presence/frequency penalties first."""
        if counts is not None:
            logits = logits - config.frequency_penalty * counts - config.presence_penalty * (counts > 0).float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
        if config.greedy:
            return logits
        logits = top_p_filter(top_k_filter(logits / config.temperature, config.top_k), config.top_p)
        return min_p_filter(logits, config.min_p)

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


_SHARED_POLICY = FastDecodePolicy()  # one per process: what compiling costs here is learnt once


def _generation_mask(attention_mask: torch.Tensor | None, max_new: int) -> torch.Tensor | None:
    """The prompt's mask extended by `max_new` generated columns, or None without padding: then the
    model's causal kernel needs no mask (and no per-step check of one)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    grown = attention_mask.new_ones(attention_mask.shape[0], max_new, dtype=torch.long)
    return torch.cat([attention_mask.long(), grown], dim=1)


def _with_overrides(config: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
    """`config` (or the defaults) with `overrides` applied, validated again."""
    known = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown generation option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(config or GenerationConfig(), **overrides)
