"""Generation: `TextGenerator` (greedy and sampled decoding with a KV cache) and `GenerationConfig`."""

from minillm.inference.generator import GenerationConfig, TextGenerator

__all__ = ["GenerationConfig", "TextGenerator"]
