"""`MiniGPT`: a decoder-only transformer whose parts are chosen by `MiniGPTConfig`.

Parameter names follow the Hugging Face Llama layout (`model.embed_tokens`, `model.layers.N.self_attn.
q_proj`, `mlp.gate_proj`, `input_layernorm`, `model.norm`, `lm_head`); a checkpoint is written as the
transformers family computing the same function (`minillm.model.hf`): AutoModelForCausalLM loads it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from minillm.checkpoint_files import (
    CONFIG_FILE,
    MissingCheckpointFileError,
    check_directory,
    config_file,
    read_json_object,
)
from minillm.errors import CheckpointError
from minillm.io import atomic_write, atomic_write_json
from minillm.model import hf as hf_format
from minillm.model.config import RETIRED_FIELDS, ConfigError, MiniGPTConfig
from minillm.model.layers import DecoderLayer, KVCache, RotaryEmbedding, StaticKVCache, make_norm
from minillm.model.weights import read_checkpoint_weights

WEIGHTS_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_TYPE = hf_format.OWN_MODEL_TYPE  # config.json of a config no transformers family expresses
_HF_ONLY_KEYS = ("architectures", "model_type", "torch_dtype", "dtype", "transformers_version")


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, V), or (B, logits_to_keep, V)
    loss: torch.Tensor | None = None  # mean cross-entropy over labels != -100
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss, mean over layers; None for dense models
    past_key_values: KVCache | StaticKVCache | None = None
    hidden_states: torch.Tensor | None = None  # (B, T, C): the final norm's output (for value/reward heads)


class MiniGPTModel(nn.Module):
    """Embeddings, the decoder layers and the final norm (the `model.` prefix of the weights)."""

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                if config.position_embedding == "learned" else None)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.rotary = (RotaryEmbedding(config.attention_head_dim, config.max_position_embeddings, config.rope_theta)
                       if config.position_embedding == "rope" else None)


class MiniGPT(nn.Module):
    architecture = "MiniGPT"  # written to config.json's "architectures"

    def __init__(self, config: MiniGPTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.name_or_path: str | None = None  # the directory it was loaded from (a LoRA adapter's base)
        self.gradient_checkpointing = False  # see gradient_checkpointing_enable
        self.model = MiniGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)
        # GPT-2 / nanoGPT: scale the projections that write into the residual stream by 1/sqrt(2·layers),
        # so the residual's variance does not grow with depth.
        residual_std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        labels: torch.Tensor | None = None,  # (B, T), -100 = ignored; shifted inside, as in transformers
        attention_mask: torch.Tensor | None = None,  # (B, past + T), 1 = real token, 0 = padding
        past_key_values: KVCache | StaticKVCache | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,  # (B, T); default: derived from attention_mask or past
        logits_to_keep: int = 0,  # > 0: only the last n positions get logits (generation)
        cache_position: torch.Tensor | None = None,  # (T,) slots of a StaticKVCache the new tokens fill
    ) -> CausalLMOutput:
        b, t = input_ids.shape
        cache = past_key_values
        if isinstance(cache, StaticKVCache):
            if labels is not None:
                raise ValueError("labels are for training; a StaticKVCache is for decoding")
            return self._forward_static(input_ids, attention_mask, cache, position_ids, logits_to_keep,
                                        cache_position)
        if use_cache and cache is None:
            cache = KVCache(self.config.num_hidden_layers)
        past = cache.seq_len if cache is not None else 0
        if past + t > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + t} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if attention_mask is not None:
            if attention_mask.shape != (b, past + t):
                raise ValueError(f"attention_mask must have shape (batch, past + new tokens) = {(b, past + t)}, "
                                 f"got {tuple(attention_mask.shape)}")
            if position_ids is None:  # left padding: count positions from each row's first real token
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            if not torch.compiler.is_exporting() and bool(attention_mask.all()):  # (export: no data-dependent branch)
                attention_mask = None  # the fast causal kernel applies
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device).unsqueeze(0).expand(b, t)

        mask = None
        if attention_mask is not None or (past > 0 and t > 1):
            query_pos = torch.arange(past, past + t, device=input_ids.device)
            mask = self._attention_mask(attention_mask, query_pos, past + t)
        x, aux_loss = self._decoder(input_ids, position_ids, mask, cache)
        logits = self.lm_head(x if logits_to_keep <= 0 else x[:, -logits_to_keep:])  # (B, T, V)

        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss,
                              past_key_values=cache if use_cache else None, hidden_states=x)

    def _forward_static(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: StaticKVCache,
                        position_ids: torch.Tensor | None, logits_to_keep: int,
                        cache_position: torch.Tensor | None) -> CausalLMOutput:
        """The forward over a `StaticKVCache`: the new tokens fill slots `cache_position` and attend over the
        whole buffer through a mask, so nothing here depends on how full the cache is (a one-token step
        compiles to one graph). `attention_mask` (B, S_max) marks padding slots with 0 (None: no padding)."""
        b, t = input_ids.shape
        capacity = cache.capacity
        if cache_position is None:
            raise ValueError("a StaticKVCache needs cache_position, the (T,) slots the new tokens fill")
        if capacity > self.config.max_position_embeddings:
            raise ValueError(f"a static cache of {capacity} positions exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if attention_mask is not None and attention_mask.shape != (b, capacity):
            raise ValueError(f"with a StaticKVCache attention_mask covers the cache, shape (batch, capacity) = "
                             f"{(b, capacity)}, got {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is None:
                position_ids = cache_position.unsqueeze(0).expand(b, t)
            else:  # left padding: count positions from each row's first real token
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, cache_position]
        mask = self._attention_mask(attention_mask, cache_position, capacity)  # (B|1, 1, T, S_max)
        x, aux_loss = self._decoder(input_ids, position_ids, mask, cache, cache_position)
        logits = self.lm_head(x if logits_to_keep <= 0 else x[:, -logits_to_keep:])  # (B, T, V)
        return CausalLMOutput(logits=logits, aux_loss=aux_loss, past_key_values=cache, hidden_states=x)

    def _decoder(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                 cache: KVCache | StaticKVCache | None, cache_position: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings, the decoder layers and the final norm: (B, T, C) hidden states, and the mean MoE
        aux loss (None for dense models)."""
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if self.model.embed_positions is not None:
            x = x + self.model.embed_positions(position_ids)
        if self.training and self.config.dropout > 0:
            x = self.model.dropout(x)
        rope = self.model.rotary(position_ids, x.dtype) if self.model.rotary is not None else None

        aux_losses = []
        use_checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            if use_checkpointing:
                x, aux = checkpoint(layer, x, rope, mask, None, use_reentrant=False)
            else:
                x, aux = layer(x, rope, mask, cache, cache_position)
            if aux is not None:
                aux_losses.append(aux)
        aux_loss = torch.stack(aux_losses).mean() if aux_losses else None  # MoE: the mean over layers
        return self.model.norm(x), aux_loss

    @staticmethod
    def _attention_mask(attention_mask: torch.Tensor | None, query_pos: torch.Tensor, s: int) -> torch.Tensor:
        """A (B|1, 1, T, S) boolean mask: the query at key position `query_pos[i]` sees keys up to its own,
        and (with `attention_mask`, (B, S), 0 = padding) no padding."""
        query_pos = query_pos[:, None]
        key_pos = torch.arange(s, device=query_pos.device)[None, :]
        mask = (key_pos <= query_pos)[None, None]  # causal: (1, 1, T, S)
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, :]
            # A padding query would see no key at all (SDPA then returns NaN); let it see itself.
            mask = mask | (key_pos == query_pos)[None, None]
        return mask

    # ------------------------------------------------------------------ sizes
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied LM head counts once)."""
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and "embed_" in name):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        return self.config.flops_per_token(seq_len, training)

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        """Recompute each layer in backward instead of keeping its activations (a training switch, not
        part of the architecture: it is not saved with the model)."""
        self.gradient_checkpointing = enabled

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path, generation_config: dict[str, Any] | None = None,
                        weights: bool = True) -> None:
        """Write `config.json`, `model.safetensors` and `generation_config.json` into `directory`
        (`weights=False`: the two JSON files only, e.g. beside a LoRA adapter), as the transformers family
        computing what this model computes: its config plus our settings under "minillm", its tensor
        names and layout (or `model_type: minillm`, with a warning: see `minillm.model.hf.saved_config`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dtype = str(next(self.parameters()).dtype).removeprefix("torch.")
        config = hf_format.saved_config(self, directory, dtype)
        if weights:
            if getattr(self, "lora_config", None) is not None:
                raise ValueError("this model carries LoRA adapters: save them with minillm.model.lora.save_lora, "
                                 "or merge_lora() it first to save a plain model")
            state = {k: v.detach().contiguous().cpu() for k, v in self._weights_to_save().items()}
            state = hf_format.to_family_state(state, self.config, config["model_type"])  # (no tied LM head)
            atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        atomic_write_json(directory / CONFIG_FILE, config)
        generation = {"bos_token_id": self.config.bos_token_id, "eos_token_id": self.config.eos_token_id,
                      "pad_token_id": self.config.pad_token_id, **(generation_config or {})}
        atomic_write_json(directory / GENERATION_CONFIG_FILE, generation)

    def _weights_to_save(self) -> dict[str, torch.Tensor]:
        """The tensors `save_pretrained` writes to model.safetensors (a subclass may keep some apart)."""
        return self.state_dict()

    def load_weights(self, directory: str | Path, allow_missing: tuple[str, ...] = ()) -> None:
        """Load `model.safetensors` from `directory` into this model, in place; every tensor must match
        (a tied LM head is stored once, as the embedding) but those named in `allow_missing` (a new head
        on a pretrained body keeps its initialisation). Any family's names and layout (GPT-2's fused and
        transposed projections, Mixtral's experts) come back as exactly the tensors that were saved, and
        sharded or PyTorch weights are read too. A missing, unreadable or mismatching file is a
        `CheckpointError` naming it (and the tensors)."""
        directory = check_directory(directory)
        device = next(self.parameters()).device
        state, source = read_checkpoint_weights(directory, device=str(device))
        own = self.state_dict()
        expected = set(own)
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
            expected.discard("lm_head.weight")
        missing = sorted(expected - set(state) - set(allow_missing))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            problems = [f"{kind} {len(names)} tensor(s): {_some(names)}"
                        for kind, names in (("missing", missing), ("unexpected", unexpected)) if names]
            raise CheckpointError(f"{source}: does not match {CONFIG_FILE}: {'; '.join(problems)}")
        wrong = [name for name in sorted(state) if tuple(state[name].shape) != tuple(own[name].shape)]
        if wrong:
            name = wrong[0]
            more = f" (and {len(wrong) - 1} more tensor(s): {_some(wrong[1:])})" if len(wrong) > 1 else ""
            raise CheckpointError(f"{source}: tensor {name} has shape {_shape(state[name])}, but {CONFIG_FILE} "
                                  f"implies {_shape(own[name])}{more}")
        self.load_state_dict(state, strict=False)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> MiniGPT:
        """The model of a checkpoint of ours (any `save_pretrained` wrote, or a LoRA adapter with its base)
        or of a Hugging Face directory of a family `minillm.model.hf` reads."""
        directory = check_directory(directory)
        if not (directory / WEIGHTS_FILE).is_file() and (directory / "adapter_config.json").is_file():
            return cls._from_adapter(directory, device, dtype)
        model = cls(load_config(directory))
        model.load_weights(directory)
        model.name_or_path = str(directory.resolve())
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return model

    @classmethod
    def _from_adapter(cls, directory: Path, device: str | torch.device | None,
                      dtype: torch.dtype | None) -> MiniGPT:
        """A LoRA checkpoint (adapter only): its base model with the adapter merged in."""
        from minillm.model.lora import load_lora, merge_lora

        adapter_path = directory / "adapter_config.json"
        base = read_json_object(adapter_path).get("base_model_name_or_path")
        if not isinstance(base, str) or not base or not (Path(base) / CONFIG_FILE).is_file():
            raise MissingCheckpointFileError(f"{adapter_path}: the directory holds a LoRA adapter only and its base "
                                             f"model (base_model_name_or_path={base!r}) is not a model directory")
        model = merge_lora(load_lora(cls.from_pretrained(base), directory))
        model.name_or_path = str(directory.resolve())
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device) if device is not None else model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no dropout) for a block; the module's own train/eval mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _some(names: list[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def _shape(tensor: torch.Tensor) -> str:
    return "(" + ", ".join(str(n) for n in tensor.shape) + ")"


def load_config(directory: str | Path) -> MiniGPTConfig:
    """The `MiniGPTConfig` of a model directory: a checkpoint of ours (a native family's config.json with
    our settings under "minillm", restored exactly; or a `model_type: minillm` one), or any Hugging Face
    directory of a family `config_from_hf` reads. `CheckpointError` naming config.json (and the field)
    when it is missing or malformed."""
    path = config_file(directory)
    data = read_json_object(path)
    try:
        if data.get("model_type") != MODEL_TYPE:
            if hf_format.SETTINGS_KEY in data:  # ours, in a transformers family's format
                return hf_format.config_from_checkpoint(data, path)
            return hf_format.config_from_hf(data, path)  # a Hugging Face directory, or refused
        fields = {k: v for k, v in data.items() if k not in _HF_ONLY_KEYS and k not in RETIRED_FIELDS}
        MiniGPTConfig.check_types(fields)
        return MiniGPTConfig.from_dict(fields)
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{path}: required field {e.args[0]!r} is missing") from e
    except (ConfigError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {' '.join(str(e).split())}") from e


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of position t's logits against labels[t + 1], ignoring -100, in fp32 (or fp64).

    `reduction="sum"` gives the summed loss, for callers that average over a larger batch themselves
    (gradient accumulation). A batch with no label gives 0 for the mean rather than NaN.
    """
    # The labels move one step left (the last position gets -100) rather than the logits one step right:
    # slicing (B, T, V) logits would copy all of them, the largest activation of a small model.
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_logits = flat_logits.to(torch.promote_types(flat_logits.dtype, torch.float32))
    labels = labels.to(logits.device)
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    total = F.cross_entropy(flat_logits, shift_labels, ignore_index=-100, reduction="sum")
    if reduction == "sum":
        return total
    return total / (shift_labels != -100).sum().clamp(min=1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the log-probability of the labelled tokens, (B, T − 1) in fp32, and the mask of the
    labelled positions: position t's logits score labels[t + 1]; -100 labels score 0 and are masked.
    With `temperature`, of the distribution softmax(logits / temperature) that RL sampled from."""
    labels = labels[:, 1:]
    mask = labels != -100
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least, fp64 kept
    if temperature != 1.0:
        logits = logits / temperature
    logps = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask
