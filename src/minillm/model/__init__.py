"""The model: `MiniGPTConfig` (what to build) and `MiniGPT` (the transformer)."""

from minillm.model.config import PRESETS, ConfigError, MiniGPTConfig, get_tiny_config
from minillm.model.layers import KVCache
from minillm.model.transformer import CausalLMOutput, MiniGPT

__all__ = ["PRESETS", "CausalLMOutput", "ConfigError", "KVCache", "MiniGPT", "MiniGPTConfig", "get_tiny_config"]
