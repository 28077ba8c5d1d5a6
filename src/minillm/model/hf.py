"""`MiniGPT` as a Hugging Face `LlamaForCausalLM`: the same weights under transformers' own code.

Our parameter names already follow Llama's, so the conversion is a config translation plus a plain
`load_state_dict`. The value lies in the translation being exact or refused: every architectural
choice of `MiniGPTConfig` either has a Llama counterpart that computes the same function
(RMSNorm, rotate-half RoPE with the same θ, SwiGLU, GQA, tied or untied embeddings, biases on all
four attention projections, MLP biases), or `to_llama_config` raises a `ValueError` naming the field,
so a converted model never silently differs from ours.

transformers is a dev dependency only, hence the imports inside the functions.

    from minillm.model.hf import to_transformers
    hf_model = to_transformers(model)          # LlamaForCausalLM, fp32, eval mode
    hf_model.save_pretrained("out/llama")      # loads with AutoModelForCausalLM
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from minillm.model.config import MiniGPTConfig

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

    from minillm.model.transformer import MiniGPT


def _unsupported(config: MiniGPTConfig) -> list[str]:
    """Why Llama cannot express `config`, one 'field=value: reason' line per blocking field."""
    problems = []
    if config.norm_type != "rmsnorm":
        problems.append(f"norm_type={config.norm_type!r}: Llama uses RMSNorm only")
    if config.position_embedding != "rope":
        problems.append(f"position_embedding={config.position_embedding!r}: Llama has RoPE only, "
                        "no learned position embeddings")
    if config.mlp_type != "swiglu":
        problems.append(f"mlp_type={config.mlp_type!r}: Llama's MLP is SwiGLU only")
    if config.num_experts > 0:
        problems.append(f"num_experts={config.num_experts}: Llama has no mixture-of-experts layers")
    if config.qk_norm:
        problems.append("qk_norm=True: Llama has no per-head q/k RMSNorm (that is Qwen3's)")
    if config.qkv_bias != config.out_bias:
        problems.append(f"qkv_bias={config.qkv_bias}, out_bias={config.out_bias}: Llama's attention_bias "
                        "puts a bias on q, k, v and o alike, so both must be equal")
    if config.hidden_size % config.num_attention_heads != 0:
        problems.append(f"hidden_size={config.hidden_size} with num_attention_heads="
                        f"{config.num_attention_heads}: transformers' LlamaConfig requires hidden_size to be "
                        "divisible by num_attention_heads, even with an explicit head_dim")
    return problems


def to_llama_config(config: MiniGPTConfig) -> LlamaConfig:
    """The `transformers.LlamaConfig` of a model that computes exactly what `MiniGPT(config)` computes.

    Raises `ValueError` listing every field Llama cannot express (LayerNorm, learned positions, GELU,
    MoE, QK-norm, biases on q/k/v but not o or the reverse, head_dim with an indivisible hidden size).
    `dropout` is not carried over: it only acts in training, and Llama has no residual dropout to
    match ours; the exported model is for inference and fine-tuning elsewhere.
    """
    problems = _unsupported(config)
    if problems:
        raise ValueError("this MiniGPTConfig cannot be expressed as a Llama model:\n  " + "\n  ".join(problems))

    import transformers

    # transformers 5 takes RoPE settings as `rope_parameters`; 4.x as `rope_theta`. Our RoPE is the
    # default (unscaled) kind: inv_freq = θ^(-2i/D), applied with rotate_half, as Llama's.
    if int(transformers.__version__.split(".")[0]) >= 5:
        rope = {"rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_theta)}}
    else:
        rope = {"rope_theta": float(config.rope_theta)}
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.attention_head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.norm_eps,
        attention_bias=config.qkv_bias,  # == out_bias, checked above
        mlp_bias=config.mlp_bias,
        attention_dropout=0.0,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        **rope,
    )


def to_transformers(model: MiniGPT) -> LlamaForCausalLM:
    """A `transformers.LlamaForCausalLM` holding a copy of `model`'s weights, in fp32 and eval mode, on
    `model`'s device. Raises `ValueError` for configs Llama cannot express (see `to_llama_config`) and
    for a model carrying unmerged LoRA adapters (merge them first: `minillm.model.lora.merge_lora`)."""
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model carries LoRA adapters: merge_lora() it before converting to transformers")
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(to_llama_config(model.config)).float()
    # Strict: any name or shape mismatch is an error rather than a silently random weight. Our tied
    # LM head appears in the state dict as lm_head.weight too, and loads into Llama's tied head.
    llama.load_state_dict(model.state_dict(), strict=True)
    device = next(model.parameters()).device
    return llama.to(device).eval()


__all__ = ["to_llama_config", "to_transformers"]
