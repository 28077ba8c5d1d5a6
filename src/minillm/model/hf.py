"""The Hugging Face side of `MiniGPT`: which transformers family computes what a config computes, that
family's `config.json`, the few tensors whose names or layout differ, and reading such a directory's
config back. `minillm.export.hf` writes directories from this mapping; `MiniGPT.from_pretrained` reads
them with it (see `minillm.model.weights` for the weight files).

`MiniGPT` keeps Llama's parameter names and RoPE convention, so the mapping is choosing the family whose
code computes the same function as the config:

- `llama`: RMSNorm, RoPE, SwiGLU, no QK-norm, biases on all four attention projections or none;
- `qwen2`: as Llama but with biases on q/k/v and none on o;
- `qwen3`: as Llama plus a per-head RMSNorm on q and k (QK-norm), biases on all four or none;
- `qwen3_moe`: Qwen3 with a mixture of experts in every layer (softmax router, top-k, no shared expert);
- `mixtral`: Llama with such a mixture of experts (no QK-norm, no biases, top-k weights renormalised);
  its expert tensors are renamed (`block_sparse_moe.experts.E.w1|w3|w2` for gate|up|down).
- `gpt2`: LayerNorm, learned positions, GELU (tanh) MLP, biases everywhere, full multi-head attention;
  its fused `c_attn` and the transposed `Conv1D` weights are the one translation of tensors.

A config no family can express is refused with every field that blocks it; what our model cannot
compute exactly (scaled RoPE, sliding windows, another activation, router noise) is refused by field
when reading. `to_transformers` builds the transformers model in memory, for side-by-side comparisons
(transformers is a dev dependency only, hence the imports inside the functions):

    from minillm.model.hf import to_transformers
    hf_model = to_transformers(model)              # LlamaForCausalLM, fp32, eval mode
    hf_model = to_transformers(model, family=None) # whichever family the config maps to
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from minillm.errors import CheckpointError, ExportError, UnsupportedCheckpointError
from minillm.model.config import RETIRED_FIELDS, ConfigError, MiniGPTConfig

if TYPE_CHECKING:
    from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel

    from minillm.model.transformer import MiniGPT

__all__ = ["DTYPES", "FAMILIES", "IMPORTABLE", "OWN_MODEL_TYPE", "SETTINGS_KEY", "checkpoint_config",
           "config_from_checkpoint", "config_from_hf", "from_gpt2_state", "hf_config", "hf_family", "saved_config",
           "to_family_state", "to_gpt2_state", "to_hf_config", "to_llama_config", "to_transformers"]

logger = logging.getLogger(__name__)

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gpt2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM", "gpt2": "GPT2LMHeadModel"}


_NAMES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "qwen3_moe": "Qwen3-MoE", "mixtral": "Mixtral", "gpt2": "GPT-2"}


def _gpt2_blockers(config: MiniGPTConfig) -> list[str]:
    problems = []
    for field, value, why in (("norm_type", "layernorm", "GPT-2 uses LayerNorm"),
                              ("position_embedding", "learned", "GPT-2 has learned position embeddings"),
                              ("mlp_type", "gelu", "GPT-2's MLP is GELU")):
        if getattr(config, field) != value:
            problems.append(f"{field}={getattr(config, field)!r}: {why}")
    if not (config.qkv_bias and config.out_bias and config.mlp_bias):
        problems.append(f"qkv_bias={config.qkv_bias}, out_bias={config.out_bias}, mlp_bias={config.mlp_bias}: "
                        "GPT-2 has biases on every projection")
    if config.num_key_value_heads != config.num_attention_heads:
        problems.append(f"num_key_value_heads={config.num_key_value_heads}: GPT-2 has full multi-head attention "
                        f"(num_attention_heads={config.num_attention_heads})")
    if config.attention_head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"head_dim={config.head_dim}: GPT-2's heads split hidden_size evenly")
    if config.qk_norm:
        problems.append("qk_norm=True: GPT-2 has no q/k norm")
    if config.num_experts > 0:
        problems.append(f"num_experts={config.num_experts}: GPT-2 has no mixture-of-experts layers")
    return problems


def _blockers(config: MiniGPTConfig, family: str) -> list[str]:
    """Why `family` cannot express `config`: one 'field=value: reason' line per blocking field."""
    if family == "gpt2":
        return _gpt2_blockers(config)
    name = _NAMES[family]
    problems = []
    if config.norm_type != "rmsnorm":
        problems.append(f"norm_type={config.norm_type!r}: {name} uses RMSNorm only (LayerNorm is GPT-2's)")
    if config.position_embedding != "rope":
        problems.append(f"position_embedding={config.position_embedding!r}: {name} has RoPE only")
    if config.mlp_type != "swiglu":
        problems.append(f"mlp_type={config.mlp_type!r}: {name}'s MLP is SwiGLU only")
    if config.num_experts > 0 and family not in ("qwen3_moe", "mixtral"):
        problems.append(f"num_experts={config.num_experts}: {name} has no mixture-of-experts layers (they map to "
                        "Qwen3-MoE with qk_norm, Mixtral without)")
    if family == "mixtral":
        if config.num_experts == 0:
            problems.append("num_experts=0: Mixtral needs mixture-of-experts layers")
        if config.qk_norm:
            problems.append("qk_norm=True: Mixtral has no q/k norm (that is Qwen3-MoE)")
        if config.qkv_bias or config.out_bias:
            problems.append(f"qkv_bias={config.qkv_bias}, out_bias={config.out_bias}: Mixtral's attention has no biases")
        if not config.norm_topk_prob:
            problems.append("norm_topk_prob=False: Mixtral always renormalises the top-k router weights")
        if config.shared_expert_intermediate_size:
            problems.append(f"shared_expert_intermediate_size={config.shared_expert_intermediate_size}: Mixtral has "
                            "no shared expert")
    if family == "qwen3_moe":
        if config.num_experts == 0:
            problems.append("num_experts=0: Qwen3-MoE needs mixture-of-experts layers")
        if not config.qk_norm:
            problems.append("qk_norm=False: Qwen3-MoE always normalises q and k per head")
        if config.shared_expert_intermediate_size:
            problems.append(f"shared_expert_intermediate_size={config.shared_expert_intermediate_size}: Qwen3-MoE "
                            "has no shared expert")
    if config.mlp_bias and family != "llama":
        problems.append(f"mlp_bias=True: {name}'s MLP has no biases")
    if family == "llama" and config.qk_norm:
        problems.append("qk_norm=True: Llama has no per-head q/k RMSNorm (that is Qwen3's)")
    if family == "qwen2":
        if config.qk_norm:
            problems.append("qk_norm=True: Qwen2 has no per-head q/k RMSNorm (that is Qwen3's)")
        if not config.qkv_bias or config.out_bias:
            problems.append(f"qkv_bias={config.qkv_bias}, out_bias={config.out_bias}: Qwen2 always has biases "
                            "on q, k, v and never on o")
    if family in ("llama", "qwen3", "qwen3_moe", "mixtral") and config.qkv_bias != config.out_bias:
        problems.append(f"qkv_bias={config.qkv_bias}, out_bias={config.out_bias}: {name}'s attention_bias puts "
                        "a bias on q, k, v and o alike, so both must be equal (q/k/v only is Qwen2's)")
    if config.hidden_size % config.num_attention_heads != 0 and family not in ("qwen3", "qwen3_moe", "mixtral"):
        problems.append(f"hidden_size={config.hidden_size} with num_attention_heads={config.num_attention_heads}: "
                        f"{name} requires hidden_size divisible by num_attention_heads")
    return problems


def hf_family(config: MiniGPTConfig) -> str:
    """The transformers family that computes what `MiniGPT(config)` computes (see the module docstring);
    `ExportError` listing the blocking fields when there is none."""
    if config.norm_type == "layernorm" or config.position_embedding == "learned" or config.mlp_type == "gelu":
        preferred = "gpt2"
    else:
        preferred = "qwen3" if config.qk_norm else ("qwen2" if config.qkv_bias and not config.out_bias else "llama")
        if config.num_experts > 0:
            preferred = "qwen3_moe" if config.qk_norm else "mixtral"
    problems = _blockers(config, preferred)
    if problems:
        raise ExportError(f"this model has no native Hugging Face counterpart (closest: {_NAMES[preferred]}, "
                          f"model_type {preferred}):\n  "
                          + "\n  ".join(problems))
    return preferred


def hf_config(config: MiniGPTConfig, family: str | None = None, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` of `family` (default: `hf_family(config)`) for a model equal to `MiniGPT(config)`."""
    family = family or hf_family(config)
    if family not in FAMILIES:
        raise ExportError(f"family={family!r} is not supported; supported: {', '.join(FAMILIES)}")
    problems = _blockers(config, family)
    if problems:
        raise ExportError(f"this model cannot be expressed as a {_NAMES[family]} model:\n  " + "\n  ".join(problems))
    if family == "gpt2":
        return _gpt2_config(config, dtype)
    rope = {"rope_type": "default", "rope_theta": float(config.rope_theta)}
    data: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[family]], "model_type": family,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.attention_head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings, "initializer_range": config.initializer_range,
        "rms_norm_eps": config.norm_eps, "rope_theta": float(config.rope_theta), "rope_parameters": rope,
        "rope_scaling": None, "attention_dropout": 0.0, "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id, "use_cache": True, "torch_dtype": dtype, "dtype": dtype,
    }
    if family == "llama":
        data.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias, pretraining_tp=1)
    elif family == "mixtral":
        data.update(num_local_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                    intermediate_size=config.moe_intermediate_size, router_aux_loss_coef=config.router_aux_loss_coef,
                    router_jitter_noise=0.0, sliding_window=None, output_router_logits=False)
    else:
        data.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers,
                    layer_types=["full_attention"] * config.num_hidden_layers)
        if family in ("qwen3", "qwen3_moe"):
            data["attention_bias"] = config.qkv_bias
        if family == "qwen3_moe":
            data.update(num_experts=config.num_experts, num_local_experts=config.num_experts,  # (transformers 5's name)
                        num_experts_per_tok=config.num_experts_per_tok,
                        moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
                        decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=config.router_aux_loss_coef,
                        output_router_logits=False)
    return data


def _gpt2_config(config: MiniGPTConfig, dtype: str) -> dict[str, Any]:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_embd": config.hidden_size, "n_layer": config.num_hidden_layers, "n_head": config.num_attention_heads,
            "n_inner": config.intermediate_size, "n_positions": config.max_position_embeddings,
            "activation_function": "gelu_new", "layer_norm_epsilon": config.norm_eps,
            "initializer_range": config.initializer_range, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": config.tie_word_embeddings, "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id, "use_cache": True,
            "torch_dtype": dtype, "dtype": dtype}


_GPT2_RENAMES = (("model.embed_tokens.", "transformer.wte."), ("model.embed_positions.", "transformer.wpe."),
                 ("model.norm.", "transformer.ln_f."), ("model.layers.", "transformer.h."),
                 (".input_layernorm.", ".ln_1."), (".post_attention_layernorm.", ".ln_2."),
                 (".self_attn.o_proj.", ".attn.c_proj."), (".mlp.up_proj.", ".mlp.c_fc."),
                 (".mlp.down_proj.", ".mlp.c_proj."))


def to_gpt2_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under GPT-2's names: q, k, v fused into `c_attn`, and every projection transposed
    (GPT-2's `Conv1D` stores (in, out) where `nn.Linear` stores (out, in))."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        if ".self_attn.q_proj." in name:
            parts = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            fused = torch.cat(parts, dim=0)
            name, tensor = name.replace(".self_attn.q_proj.", ".attn.c_attn."), fused
        for ours, theirs in _GPT2_RENAMES:
            name = name.replace(ours, theirs)
        if name.endswith(".weight") and any(k in name for k in (".c_attn.", ".c_proj.", ".c_fc.")):
            tensor = tensor.t()
        out[name] = tensor.contiguous()
    return out


def from_gpt2_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2's tensors under our names (the inverse of `to_gpt2_state`); the causal-mask buffers of old
    checkpoints are dropped and a missing `transformer.` prefix is allowed."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if name.endswith(".weight") and any(k in name for k in (".c_attn.", ".c_proj.", ".c_fc.")):
            tensor = tensor.t()
        for ours, theirs in _GPT2_RENAMES:
            name = name.replace(theirs, ours)
        if ".attn.c_attn." in name:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[name.replace(".attn.c_attn.", f".self_attn.{part}.")] = chunk.contiguous()
            continue
        out[name] = tensor.contiguous()
    return out


_MIXTRAL_RENAMES = ((".mlp.gate.", ".block_sparse_moe.gate."), (".gate_proj.", ".w1."), (".up_proj.", ".w3."),
                    (".down_proj.", ".w2."), (".mlp.experts.", ".block_sparse_moe.experts."))


def to_mixtral_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MoE tensors under Mixtral's names (attention and norms keep theirs)."""
    out = {}
    for name, tensor in state.items():
        if ".mlp." in name:
            for ours, theirs in _MIXTRAL_RENAMES:
                name = name.replace(ours, theirs)
        out[name] = tensor
    return out


def from_mixtral_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        if ".block_sparse_moe." in name:
            for ours, theirs in reversed(_MIXTRAL_RENAMES):
                name = name.replace(theirs, ours)
        out[name] = tensor
    return out


def to_family_state(state: dict[str, torch.Tensor], config: MiniGPTConfig, family: str) -> dict[str, torch.Tensor]:
    """Our tensors as `family`'s `model.safetensors` holds them (`family` "minillm": our own layout): a
    tied LM head left out (safetensors refuses shared tensors; it is tied again on loading), GPT-2's and
    Mixtral's names and layouts. Only renames, splits and transposes: reading them back gives the very
    same tensors."""
    state = dict(state)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if family == "gpt2":
        return to_gpt2_state(state)
    if family == "mixtral":
        return to_mixtral_state(state)
    return state


# ---------------------------------------------------------------------------------------- checkpoints
# The key of a native config.json that keeps our own settings beside the family's (transformers keeps an
# unknown key as a plain attribute and ignores it): what the family cannot state (dropout, the preset
# name in `extra`, a head_dim left to its default) comes back exactly.
SETTINGS_KEY = "minillm"


def checkpoint_config(config: MiniGPTConfig, family: str | None = None, dtype: str = "float32") -> dict[str, Any]:
    """The `config.json` of a native checkpoint: `hf_config` plus our settings under `SETTINGS_KEY`."""
    return {**hf_config(config, family, dtype), SETTINGS_KEY: config.to_dict()}


OWN_MODEL_TYPE = "minillm"  # the model_type of a checkpoint no family expresses: only Mini-LLM reads it


def saved_config(model: MiniGPT, directory: str | Path, dtype: str) -> dict[str, Any]:
    """The config.json `model.save_pretrained(directory)` writes: `checkpoint_config` of the family computing
    what the model computes, else `model_type: minillm` with our fields, for a config no family expresses
    (logged as a warning naming the fields, once per model and reason: a run saves the same model at
    every checkpoint) and for a model with a head of its own (a reward model: no transformers class)."""
    own = {"architectures": [model.architecture], "model_type": OWN_MODEL_TYPE, "torch_dtype": dtype,
           **model.config.to_dict()}
    if model.architecture != "MiniGPT":
        return own
    try:
        return checkpoint_config(model.config, dtype=dtype)
    except ExportError as e:
        first, *fields = str(e).splitlines()
        reason = " ".join([first, "; ".join(line.strip() for line in fields)]).strip()
        if getattr(model, "_not_native_reason", None) != reason:
            model._not_native_reason = reason
            logger.warning("%s: saved with model_type %r, which transformers cannot load (Mini-LLM can): %s",
                           directory, OWN_MODEL_TYPE, reason)
        return own


# Our fields that `config_from_hf` reads from the family's fields: when config.json's family fields and
# its `SETTINGS_KEY` settings disagree on one (the family fields were edited, or a transformers tool
# resized the vocabulary), the family's value is the one transformers computes with, so it wins.
_FAMILY_DEFINED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                   "max_position_embeddings", "norm_type", "norm_eps", "position_embedding", "rope_theta", "mlp_type",
                   "qk_norm", "qkv_bias", "out_bias", "mlp_bias", "tie_word_embeddings", "num_experts",
                   "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "bos_token_id", "eos_token_id",
                   "pad_token_id")
_MOE_FIELDS = ("num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob")


def config_from_checkpoint(data: dict[str, Any], source: str | Path = "config.json") -> MiniGPTConfig:
    """The `MiniGPTConfig` of a native checkpoint's `config.json` data (family fields plus our settings
    under `SETTINGS_KEY`): our settings, exactly, wherever the family fields agree with them. The family
    fields are read (and refused) as `config_from_hf` reads them, and win where they differ; a field of
    ours written beside them (`norm_type`, `dropout`, ...) is taken as an edit and wins too. A misspelt
    field of ours is an error, as in a `minillm` config.json."""
    settings = data[SETTINGS_KEY]
    if not isinstance(settings, dict):
        raise CheckpointError(f"{source}: {SETTINGS_KEY!r} must be an object of Mini-LLM settings, "
                              f"got {type(settings).__name__}")
    family_view = config_from_hf(data, source)
    fields = {k: v for k, v in settings.items() if k not in RETIRED_FIELDS}
    MiniGPTConfig.check_types(fields)
    restored = MiniGPTConfig.from_dict(fields)
    unstated = (() if family_view.num_experts else _MOE_FIELDS) + (
        () if family_view.position_embedding == "rope" else ("rope_theta",))  # defaults: nothing to compare
    for name in _FAMILY_DEFINED:
        if name not in unstated and getattr(family_view, name) != getattr(restored, name):
            fields[name] = getattr(family_view, name)
    if family_view.attention_head_dim != restored.attention_head_dim:
        fields["head_dim"] = family_view.attention_head_dim
    if not family_view.num_experts and family_view.intermediate_size != restored.intermediate_size:
        fields["intermediate_size"] = family_view.intermediate_size  # (an MoE family's is the experts' size)
    ours = {f.name for f in dataclasses.fields(MiniGPTConfig)}
    try:
        family_keys = set(hf_config(family_view, data["model_type"]))
    except ExportError:
        family_keys = set(data)
    for key, value in data.items():
        if key in ours and key not in family_keys:
            fields[key] = value
        elif key not in ours and key not in family_keys and key != SETTINGS_KEY:
            close = difflib.get_close_matches(key, ours, n=1, cutoff=0.85)
            if close:
                raise ConfigError(f"unknown MiniGPTConfig field {key} (did you mean {close[0]}?)")
    MiniGPTConfig.check_types(fields)
    config = MiniGPTConfig.from_dict(fields)
    problems = _blockers(config, data["model_type"])
    if problems:
        raise CheckpointError(f"{source}: its Mini-LLM settings are not a {_NAMES[data['model_type']]} model: "
                              + "; ".join(problems))
    return config


# ---------------------------------------------------------------------------------------- reading
IMPORTABLE = FAMILIES


def _special_tokens(data: dict[str, Any], vocab_size: Any, source: str | Path) -> dict[str, int | None]:
    """bos/eos/pad_token_id of a family's config (the first of a list), each set to None, with a warning,
    when it lies outside the vocabulary: transformers accepts such a config (GPT-2's 50256 kept on a
    smaller vocabulary), and the id could never be produced or looked up anyway."""
    tokens: dict[str, int | None] = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = data.get(name)
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, list):
            value = None
        if (isinstance(value, int) and not isinstance(value, bool) and isinstance(vocab_size, int)
                and not 0 <= value < vocab_size):
            logger.warning("%s: %s=%d is outside the vocabulary [0, %d): read as None (no such token)",
                           source, name, value, vocab_size)
            value = None
        tokens[name] = value
    return tokens


def _gpt2_from_hf(data: dict[str, Any], source: str | Path) -> MiniGPTConfig:
    def refuse(field: str, why: str) -> None:
        raise UnsupportedCheckpointError(f"{source}: {field}={data.get(field)!r}: {why}")

    if data.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        refuse("activation_function", "only GPT-2's tanh GELU (gelu_new) is supported")
    if data.get("scale_attn_by_inverse_layer_idx") or data.get("reorder_and_upcast_attn"):
        refuse("scale_attn_by_inverse_layer_idx", "only GPT-2's standard attention scaling is supported")
    if data.get("scale_attn_weights", True) is False:
        refuse("scale_attn_weights", "unscaled attention is not supported")
    hidden = data["n_embd"]
    return MiniGPTConfig(
        vocab_size=data["vocab_size"], hidden_size=hidden, num_hidden_layers=data["n_layer"],
        num_attention_heads=data["n_head"], num_key_value_heads=data["n_head"],
        intermediate_size=data.get("n_inner") or 4 * hidden, max_position_embeddings=data.get("n_positions", 1024),
        norm_type="layernorm", position_embedding="learned", mlp_type="gelu", qkv_bias=True, out_bias=True,
        mlp_bias=True, norm_eps=data.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", True)),
        initializer_range=data.get("initializer_range", 0.02), **_special_tokens(data, data["vocab_size"], source))


# The families' size fields (name, smallest value) and other numeric fields, checked before any arithmetic.
_HF_SIZES = (("vocab_size", 1), ("hidden_size", 1), ("intermediate_size", 1), ("num_hidden_layers", 1),
             ("num_attention_heads", 1), ("num_key_value_heads", 1), ("head_dim", 1), ("max_position_embeddings", 1),
             ("moe_intermediate_size", 1), ("num_experts", 0), ("num_local_experts", 0), ("num_experts_per_tok", 1),
             ("n_embd", 1), ("n_layer", 1), ("n_head", 1), ("n_inner", 1), ("n_positions", 1))

_HF_NUMBERS = ("rope_theta", "rms_norm_eps", "layer_norm_epsilon", "initializer_range", "router_aux_loss_coef")


def _check_hf_numbers(data: dict[str, Any], source: str | Path) -> None:
    for field, smallest in _HF_SIZES:
        value = data.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < smallest):
            kind = "a positive integer" if smallest else "a non-negative integer"
            raise CheckpointError(f"{source}: {field} must be {kind}, got {value!r}")
    for field in _HF_NUMBERS:
        value = data.get(field)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise CheckpointError(f"{source}: {field} must be a number, got {value!r}")


def config_from_hf(data: dict[str, Any], source: str | Path = "config.json") -> MiniGPTConfig:
    """The `MiniGPTConfig` computing what the transformers model of `config.json` data computes."""
    model_type = data.get("model_type")
    if model_type not in IMPORTABLE:
        raise UnsupportedCheckpointError(f"{source}: model_type={model_type!r} cannot be read; supported: "
                                         f"{', '.join(IMPORTABLE)} (and Mini-LLM's own checkpoints)")
    _check_hf_numbers(data, source)

    if model_type == "gpt2":
        return _gpt2_from_hf(data, source)

    def refuse(field: str, why: str) -> None:
        raise UnsupportedCheckpointError(f"{source}: {field}={data.get(field)!r}: {why}")

    if data.get("hidden_act", "silu") not in ("silu", "swish"):
        refuse("hidden_act", "only SiLU (SwiGLU) MLPs are supported")
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or "default"
    if rope_type != "default":
        refuse("rope_scaling" if scaling else "rope_parameters",
               f"RoPE type {rope_type!r} is not supported (only unscaled RoPE)")
    if data.get("use_sliding_window"):
        refuse("use_sliding_window", "sliding-window attention is not supported")
    if data.get("pretraining_tp", 1) != 1:
        refuse("pretraining_tp", "only pretraining_tp=1 is supported")
    if data.get("attention_dropout", 0.0):
        refuse("attention_dropout", "attention dropout is not supported")
    heads = data["num_attention_heads"]
    fields: dict[str, Any] = dict(
        vocab_size=data["vocab_size"], hidden_size=data["hidden_size"], intermediate_size=data["intermediate_size"],
        num_hidden_layers=data["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=data.get("num_key_value_heads") or heads,
        head_dim=data.get("head_dim") or data["hidden_size"] // heads,
        max_position_embeddings=data.get("max_position_embeddings", 2048), norm_eps=data.get("rms_norm_eps", 1e-6),
        rope_theta=float(params.get("rope_theta", data.get("rope_theta", 10000.0))),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        initializer_range=data.get("initializer_range", 0.02), **_special_tokens(data, data["vocab_size"], source))
    if model_type == "mixtral":
        window = data.get("sliding_window")
        if window is not None and window < data.get("max_position_embeddings", 2048):
            refuse("sliding_window", "sliding-window attention is not supported")
        if data.get("router_jitter_noise"):
            refuse("router_jitter_noise", "router noise is not supported")
        experts = data.get("num_local_experts") or data.get("num_experts")
        fields.update(num_experts=experts, num_experts_per_tok=data.get("num_experts_per_tok", 2),
                      moe_intermediate_size=data["intermediate_size"], norm_topk_prob=True,
                      router_aux_loss_coef=data.get("router_aux_loss_coef", 0.02))
    if model_type == "qwen3_moe":
        if data.get("mlp_only_layers") or data.get("decoder_sparse_step", 1) != 1:
            refuse("mlp_only_layers" if data.get("mlp_only_layers") else "decoder_sparse_step",
                   "every layer must be a mixture-of-experts layer")
        fields.update(num_experts=data.get("num_experts") or data["num_local_experts"], num_experts_per_tok=data.get("num_experts_per_tok", 2),
                      moe_intermediate_size=data.get("moe_intermediate_size") or data["intermediate_size"],
                      norm_topk_prob=bool(data.get("norm_topk_prob", False)),
                      router_aux_loss_coef=data.get("router_aux_loss_coef", 0.001))
    if model_type == "llama":
        bias = bool(data.get("attention_bias", False))
        fields.update(qkv_bias=bias, out_bias=bias, mlp_bias=bool(data.get("mlp_bias", False)))
    elif model_type == "mixtral":
        pass
    elif model_type == "qwen2":
        fields.update(qkv_bias=True, out_bias=False)
    else:
        bias = bool(data.get("attention_bias", False))
        fields.update(qk_norm=True, qkv_bias=bias, out_bias=bias)
    return MiniGPTConfig(**fields)


# ---------------------------------------------------------------------------------------- transformers objects
_FILE_ONLY_KEYS = ("model_type", "architectures", "torch_dtype", "dtype")


def to_hf_config(config: MiniGPTConfig, family: str | None = None) -> PretrainedConfig:
    """The transformers config of `family` (default: the one `config` maps to) for a model computing
    exactly what `MiniGPT(config)` computes; `ValueError` naming every field the family cannot express."""
    import transformers

    data = hf_config(config, family)
    return transformers.AutoConfig.for_model(data["model_type"],
                                             **{k: v for k, v in data.items() if k not in _FILE_ONLY_KEYS})


def to_llama_config(config: MiniGPTConfig) -> LlamaConfig:
    """`to_hf_config(config, "llama")`. `dropout` is not carried over: it only acts in training."""
    return to_hf_config(config, "llama")


def to_transformers(model: MiniGPT, family: str | None = "llama") -> PreTrainedModel:
    """A transformers model of `family` (`None`: the config's own) holding a copy of `model`'s weights,
    in fp32 and eval mode, on `model`'s device. Raises `ValueError` for a config the family cannot express
    and for a model carrying unmerged LoRA adapters (merge them first: `minillm.model.lora.merge_lora`)."""
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model carries LoRA adapters: merge_lora() it before converting to transformers")
    from transformers import AutoModelForCausalLM

    config = to_hf_config(model.config, family)
    hf = AutoModelForCausalLM.from_config(config).float()
    state: dict[str, Any] = dict(model.state_dict())
    if config.model_type == "gpt2":
        state = to_gpt2_state(state)
    # Strict: any name or shape mismatch is an error rather than a silently random weight. Our tied
    # LM head appears in the state dict as lm_head.weight too, and loads into the tied head.
    hf.load_state_dict(state, strict=True)
    device = next(model.parameters()).device
    return hf.to(device).eval()


