"""Mini-LLM checkpoints to and from native Hugging Face model directories.

`MiniGPT` keeps Llama's parameter names and RoPE convention, so exporting is choosing the transformers
family whose code computes the same function as the config, writing that family's `config.json`, and
saving the weights under the same names — no translation of tensors. The family follows from the
config:

- `llama`: RMSNorm, RoPE, SwiGLU, no QK-norm, biases on all four attention projections or none;
- `qwen2`: as Llama but with biases on q/k/v and none on o;
- `qwen3`: as Llama plus a per-head RMSNorm on q and k (QK-norm), biases on all four or none;
- `qwen3_moe`: Qwen3 with a mixture of experts in every layer (softmax router, top-k, no shared expert);
- `mixtral`: Llama with such a mixture of experts (no QK-norm, no biases, top-k weights renormalised);
  its expert tensors are renamed (`block_sparse_moe.experts.E.w1|w3|w2` for gate|up|down).
- `gpt2`: LayerNorm, learned positions, GELU (tanh) MLP, biases everywhere, full multi-head attention;
  its fused `c_attn` and the transposed `Conv1D` weights are the one translation of tensors.

A config no family can express is refused with every field that blocks it. The export needs no
transformers: `config.json` is written from the config, and the weights as safetensors, sharded with a
`model.safetensors.index.json` when they exceed `max_shard_size`. LoRA adapters are merged first; the
tokenizer (with its chat template) and a `generation_config.json` whose stop tokens include the chat
template's end-of-turn token are written beside them.

    from minillm.export.hf import export_hf
    export_hf("runs/sft_tiny/final", "out/hf")      # AutoModelForCausalLM.from_pretrained("out/hf")

The other way, `MiniGPT.from_pretrained` reads directories of all six families (`config_from_hf`,
`read_hf_weights`: safetensors or PyTorch weights loaded with `weights_only=True`, sharded or not);
what our model cannot compute exactly (scaled RoPE, sliding windows, another activation, router
noise) is refused by field.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from minillm.checkpoint_files import (
    MissingCheckpointFileError,
    json_kind,
    load_torch_file,
    read_json_object,
    require_file,
)
from minillm.errors import CheckpointError, MiniLLMError
from minillm.io import atomic_write_json, check_output_dir, staged_directory
from minillm.model.config import MiniGPTConfig
from minillm.model.transformer import MiniGPT, read_safetensors

__all__ = ["DTYPES", "FAMILIES", "IMPORTABLE", "ExportError", "UnsupportedCheckpointError", "config_from_hf", "export_hf",
           "from_gpt2_state", "hf_config", "hf_family", "hf_weights_file", "read_hf_weights", "to_gpt2_state"]

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gpt2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM", "gpt2": "GPT2LMHeadModel"}


class ExportError(MiniLLMError, ValueError):
    """A model that cannot be exported as asked; the message names the field and the reason."""


class UnsupportedCheckpointError(ExportError, CheckpointError):
    """A Hugging Face model directory whose config.json describes a model `MiniGPT` cannot compute exactly
    (or no model at all); the message names the file and the field."""


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


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for suffix, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[:-len(suffix)]) * factor)
    return int(text)


def load_for_export(checkpoint: str | Path | MiniGPT, tokenizer: Any = None) -> tuple[MiniGPT, Any]:
    """The model to export (LoRA merged, on a copy) and its tokenizer (the checkpoint's when not given)."""
    if isinstance(checkpoint, MiniGPT):
        model = checkpoint
    else:
        model = MiniGPT.from_pretrained(checkpoint)
        if tokenizer is None and (Path(checkpoint) / "tokenizer.json").is_file():
            from minillm.tokenizer import BPETokenizer

            tokenizer = BPETokenizer.from_pretrained(checkpoint)
    if getattr(model, "lora_config", None) is not None:
        from minillm.model.lora import merge_lora

        model = merge_lora(copy.deepcopy(model))
    return model, tokenizer


def export_hf(checkpoint: str | Path | MiniGPT, out_dir: str | Path, tokenizer: Any = None,
              dtype: str = "auto", family: str | None = None, max_shard_size: int | str = "2GB",
              overwrite: bool = False) -> Path:
    """Write `checkpoint` (a model directory, or a `MiniGPT`) to `out_dir` as a native Hugging Face model
    directory; `dtype` is `auto` (the checkpoint's), `float32`, `bfloat16` or `float16`. The directory is
    assembled under a temporary name and renamed into place; a non-empty `out_dir` is refused
    (`OutputExistsError`) unless `overwrite`."""
    out_dir = check_output_dir(out_dir, overwrite)
    model, tokenizer = load_for_export(checkpoint, tokenizer)
    if dtype == "auto":
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} is not supported; choose auto, {', '.join(DTYPES)}")
    config = hf_config(model.config, family, dtype)
    state = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it to the embedding
    if config["model_type"] == "gpt2":
        state = to_gpt2_state(state)
    elif config["model_type"] == "mixtral":
        state = to_mixtral_state(state)
    with staged_directory(out_dir, overwrite) as tmp:
        shards = _shards(state, _parse_size(max_shard_size))
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            atomic_write_json(tmp / "model.safetensors.index.json",
                              {"metadata": {"total_size": total}, "weight_map": weight_map})
        atomic_write_json(tmp / "config.json", config)
        generation = {"bos_token_id": config["bos_token_id"], "pad_token_id": config["pad_token_id"],
                      "eos_token_id": config["eos_token_id"]}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            stops = [t for t in (getattr(tokenizer, "im_end_id", None), tokenizer.eos_token_id) if t is not None]
            generation.update(eos_token_id=stops if len(stops) > 1 else (stops or [None])[0],
                              pad_token_id=tokenizer.pad_token_id)
        atomic_write_json(tmp / "generation_config.json", generation)
    return out_dir


# ---------------------------------------------------------------------------------------- import
IMPORTABLE = FAMILIES


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
        initializer_range=data.get("initializer_range", 0.02), bos_token_id=data.get("bos_token_id"),
        eos_token_id=data.get("eos_token_id"), pad_token_id=data.get("pad_token_id"))


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

    def token(name: str) -> int | None:
        value = data.get(name)
        return value[0] if isinstance(value, list) and value else value

    fields: dict[str, Any] = dict(
        vocab_size=data["vocab_size"], hidden_size=data["hidden_size"], intermediate_size=data["intermediate_size"],
        num_hidden_layers=data["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=data.get("num_key_value_heads") or heads,
        head_dim=data.get("head_dim") or data["hidden_size"] // heads,
        max_position_embeddings=data.get("max_position_embeddings", 2048), norm_eps=data.get("rms_norm_eps", 1e-6),
        rope_theta=float(params.get("rope_theta", data.get("rope_theta", 10000.0))),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        initializer_range=data.get("initializer_range", 0.02),
        bos_token_id=token("bos_token_id"), eos_token_id=token("eos_token_id"), pad_token_id=token("pad_token_id"))
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


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def hf_weights_file(directory: str | Path) -> Path:
    """The file `read_hf_weights` reads the weights of `directory` from (or the index of its shards);
    `CheckpointError` when there is none."""
    directory = Path(directory)
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise MissingCheckpointFileError(f"{directory / _WEIGHT_FILES[0]}: missing (nor is there a sharded "
                                     f"{_WEIGHT_FILES[1]} or a PyTorch {_WEIGHT_FILES[2]} in {directory})")


def _index_shards(index_path: Path) -> list[Path]:
    """The shard files a `*.index.json` names, each of which must exist."""
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: \"weight_map\" must be a non-empty object (tensor name -> shard file), "
                              f"got {json_kind(weight_map)}")
    bad = [name for name, shard in weight_map.items() if not isinstance(shard, str) or not shard]
    if bad:
        raise CheckpointError(f"{index_path}: weight_map[{bad[0]!r}] must be a shard file name, "
                              f"got {weight_map[bad[0]]!r}")
    shards = [index_path.parent / shard for shard in sorted(set(weight_map.values()))]
    for shard in shards:
        require_file(shard, f" (a shard listed in {index_path.name})")
    return shards


def _read_torch_weights(path: Path, device: str) -> dict[str, torch.Tensor]:
    """A PyTorch weights file, loaded with `weights_only=True` (no pickled code runs)."""
    state = load_torch_file(path, "PyTorch weights file", map_location=device)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def read_hf_weights(directory: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model directory: `model.safetensors`, sharded safetensors (with
    `model.safetensors.index.json`), or PyTorch `pytorch_model.bin` (sharded or not), the latter loaded
    with `weights_only=True` so no pickled code runs. Rotary `inv_freq` buffers are dropped."""
    directory = Path(directory)
    path = hf_weights_file(directory)
    state: dict[str, torch.Tensor] = {}
    if path.name == "model.safetensors":
        state = read_safetensors(path, device=device)
    elif path.name == "model.safetensors.index.json":
        for shard in _index_shards(path):
            state.update(read_safetensors(shard, device=device))
    elif path.name == "pytorch_model.bin":
        state = _read_torch_weights(path, device)
    else:
        for shard in _index_shards(path):
            state.update(_read_torch_weights(shard, device))
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if any(k.endswith("wte.weight") for k in state):  # GPT-2's layout
        state = from_gpt2_state(state)
    elif any(".block_sparse_moe." in k for k in state):  # Mixtral's
        state = from_mixtral_state(state)
    return state
