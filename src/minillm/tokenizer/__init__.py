"""Tokenizers: byte-level BPE trained on your corpus (`BPETokenizer`), tiktoken encodings and Hugging Face
`tokenizer.json` files (`load_tokenizer`), a cache of trained tokenizers, and chat templates."""

from minillm.tokenizer.bpe_tokenizer import SPECIAL_TOKENS, BPETokenizer
from minillm.tokenizer.chat import CHAT_TEMPLATES, encode_chat
from minillm.tokenizer.manager import TokenizerManager
from minillm.tokenizer.pretrained import load_tiktoken, load_tokenizer

__all__ = ["BPETokenizer", "CHAT_TEMPLATES", "SPECIAL_TOKENS", "TokenizerManager", "encode_chat", "load_tiktoken",
           "load_tokenizer"]
