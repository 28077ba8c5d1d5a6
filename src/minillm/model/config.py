"""`MiniGPTConfig`: every architectural choice of `MiniGPT`, validated at construction, plus presets.

Field names follow Hugging Face's Llama/Qwen configs where a counterpart exists, so that a config
reads the same here and in `config.json`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillm.errors import MiniLLMError

NORM_TYPES = ("rmsnorm", "layernorm")
POSITION_TYPES = ("rope", "learned")
MLP_TYPES = ("swiglu", "gelu")


class ConfigError(MiniLLMError, ValueError):
    """An invalid model configuration; the message names the field and the allowed values."""


# Fields older checkpoints' config.json may hold that are no longer part of the architecture: dropped when
# a checkpoint is read. (`gradient_checkpointing` is a training switch: `memory.gradient_checkpointing`.)
RETIRED_FIELDS = ("gradient_checkpointing",)


@dataclass
class MiniGPTConfig:
    vocab_size: int = 6400
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (MHA); 1: MQA
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    intermediate_size: int | None = None  # None: 8/3·hidden (SwiGLU, rounded to 64) or 4·hidden (GELU)
    max_position_embeddings: int = 1024

    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-6
    position_embedding: str = "rope"
    rope_theta: float = 10000.0
    mlp_type: str = "swiglu"
    qk_norm: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2, GPT-2)
    out_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False  # biases in the MLP (GPT-2)
    tie_word_embeddings: bool = True
    dropout: float = 0.0

    # Mixture of experts: num_experts == 0 means a dense MLP in every layer.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None  # None: same as intermediate_size
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.01

    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = None

    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata (e.g. the preset name)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.intermediate_size is None:
            if self.mlp_type == "swiglu":
                self.intermediate_size = _round_up(int(8 * self.hidden_size / 3), 64)
            else:
                self.intermediate_size = 4 * self.hidden_size
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        _check_choice("norm_type", self.norm_type, NORM_TYPES)
        _check_choice("position_embedding", self.position_embedding, POSITION_TYPES)
        _check_choice("mlp_type", self.mlp_type, MLP_TYPES)
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must divide hidden_size={self.hidden_size} "
                "(or set head_dim explicitly)")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
            raise ConfigError(f"head_dim must be a positive integer, got {self.head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads} (1 = MQA, equal = MHA, between = GQA)")
        if self.position_embedding == "rope" and self.attention_head_dim % 2 != 0:
            raise ConfigError(f"head_dim={self.attention_head_dim} must be even for position_embedding='rope'")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        if not isinstance(self.num_experts, int) or self.num_experts < 0:
            raise ConfigError(f"num_experts must be 0 (dense) or a positive integer, got {self.num_experts!r}")
        if self.num_experts > 0:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                    f"num_experts={self.num_experts}")
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
            if self.shared_expert_intermediate_size < 0:
                raise ConfigError("shared_expert_intermediate_size must be >= 0 (0 = no shared expert)")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name}={value} is outside the vocabulary [0, {self.vocab_size})")

    # ------------------------------------------------------------------ derived sizes
    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token (the PaLM appendix-B convention, as nanoGPT uses for MFU).

        A forward pass costs 2 FLOPs per weight of every matrix a token goes through (attention and
        MLP projections, the active experts and the router, the LM head) plus 4·T·(heads·head_dim)
        per layer for the attention scores and the weighted sum over a context of T tokens. Training
        (forward + backward) costs three times the forward pass. Norms and softmax are ignored.
        """
        seq_len = self.max_position_embeddings if seq_len is None else seq_len
        h, hd = self.hidden_size, self.attention_head_dim
        q_dim, kv_dim = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attention_weights = h * q_dim + 2 * h * kv_dim + q_dim * h
        mlp_matrices = 3 if self.mlp_type == "swiglu" else 2
        if self.is_moe:
            mlp_weights = (self.num_experts_per_tok * mlp_matrices * h * self.moe_intermediate_size
                           + h * self.num_experts
                           + mlp_matrices * h * self.shared_expert_intermediate_size)
        else:
            mlp_weights = mlp_matrices * h * self.intermediate_size
        matmul_weights = self.num_hidden_layers * (attention_weights + mlp_weights) + h * self.vocab_size
        forward = 2 * matmul_weights + 4 * self.num_hidden_layers * seq_len * q_dim
        return float(3 * forward if training else forward)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MiniGPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            close = [m for name in unknown for m in difflib.get_close_matches(name, known, n=1)]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown MiniGPTConfig field(s): {', '.join(unknown)}{hint}; "
                              f"known fields: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def check_types(cls, data: dict[str, Any]) -> None:
        """`ConfigError` naming the first known field of `data` (e.g. a parsed config.json) whose value has
        the wrong JSON type (a string for hidden_size, a boolean for rope_theta); unknown fields are left to
        `from_dict`."""
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value, (allowed, description) = data[f.name], _FIELD_TYPES[str(f.type)]
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise ConfigError(f"{f.name} must be {description}, got {value!r}")

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MiniGPTConfig:
        """A named preset (see `PRESETS`) with any field overridden, e.g. `from_preset("tiny", vocab_size=512)`."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
        values = {**PRESETS[name], **overrides}
        values.setdefault("extra", {})
        values["extra"] = {**values["extra"], "preset": name}
        return cls.from_dict(values)


# The JSON value types each annotation of `MiniGPTConfig` accepts (an int is a valid float).
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "int | None": ((int, type(None)), "an integer or null"),
    "float": ((int, float), "a number"),
    "str": ((str,), "a string"),
    "bool": ((bool,), "true or false"),
    "dict[str, Any]": ((dict,), "an object"),
}


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not supported; allowed values: {', '.join(allowed)}")


_GPT2_STYLE = dict(norm_type="layernorm", norm_eps=1e-5, position_embedding="learned", mlp_type="gelu",
                   qkv_bias=True, out_bias=True, mlp_bias=True, tie_word_embeddings=True)

# Sizes are for the default 6400-token vocabulary unless stated; `minillm train` sets vocab_size from
# the tokenizer it uses.
PRESETS: dict[str, dict[str, Any]] = {
    # ~1M parameters: unit tests and the original quickstart.
    "tiny": dict(vocab_size=2048, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=384, max_position_embeddings=512),
    # ~6M: the quickstart model, trains in minutes on a laptop CPU.
    "micro": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=704, max_position_embeddings=512),
    # ~15M
    "mini": dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                 intermediate_size=1024, max_position_embeddings=1024),
    # ~31M
    "small": dict(hidden_size=512, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1408, max_position_embeddings=2048),
    # The minimind-26M shape: 512 wide, 8 layers, GQA 8/2, RoPE θ=1e6.
    "minimind-26m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=1408, max_position_embeddings=2048, rope_theta=1e6),
    # A minimind-style MoE (~95M parameters, ~60M active per token): 4 routed experts, top-2, one shared.
    "minimind-moe": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=1408, max_position_embeddings=2048, rope_theta=1e6,
                         num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=1408),
    # GPT-2 small (124M): LayerNorm, learned positions, GELU, biases, tied embeddings.
    "gpt2": dict(vocab_size=50257, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=1024, bos_token_id=50256, eos_token_id=50256, **_GPT2_STYLE),
    # The GPT-2 architecture at micro size, for quick experiments with GPT-2 tokenizers.
    "gpt-micro": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                      max_position_embeddings=512, **_GPT2_STYLE),
}


def get_tiny_config(**overrides: Any) -> MiniGPTConfig:
    """The `tiny` preset (~1M parameters), as used in tests and the original quickstart."""
    return MiniGPTConfig.from_preset("tiny", **overrides)
