"""`MiniGPT` as a transformers model object: the same weights under transformers' own code.

The mapping itself (which family computes what a config computes, its `config.json`, GPT-2's fused and
transposed tensors, and the refusals naming the field) lives in `minillm.export.hf`; this builds the
transformers model in memory from it, for side-by-side comparisons (beam-search parity, the decode
benchmark). transformers is a dev dependency only, hence the imports inside the functions.

    from minillm.model.hf import to_transformers
    hf_model = to_transformers(model)              # LlamaForCausalLM, fp32, eval mode
    hf_model = to_transformers(model, family=None) # whichever family the config maps to
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from minillm.model.config import MiniGPTConfig

if TYPE_CHECKING:
    from transformers import LlamaConfig, PretrainedConfig, PreTrainedModel

    from minillm.model.transformer import MiniGPT

_FILE_ONLY_KEYS = ("model_type", "architectures", "torch_dtype", "dtype")


def to_hf_config(config: MiniGPTConfig, family: str | None = None) -> PretrainedConfig:
    """The transformers config of `family` (default: the one `config` maps to) for a model computing
    exactly what `MiniGPT(config)` computes; `ValueError` naming every field the family cannot express."""
    import transformers

    from minillm.export.hf import hf_config

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

    from minillm.export.hf import to_gpt2_state

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


__all__ = ["to_hf_config", "to_llama_config", "to_transformers"]
