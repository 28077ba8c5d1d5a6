"""Mini-LLM: train small language models from scratch, Chinese first."""

from minillm.inference.generator import GenerationConfig, TextGenerator
from minillm.model.config import MiniGPTConfig
from minillm.model.transformer import MiniGPT
from minillm.tokenizer.bpe_tokenizer import BPETokenizer

__version__ = "0.1.0"
__all__ = ["BPETokenizer", "GenerationConfig", "MiniGPT", "MiniGPTConfig", "TextGenerator", "__version__"]
