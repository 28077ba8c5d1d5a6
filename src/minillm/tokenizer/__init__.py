"""Tokenizers: byte-level BPE trained on your corpus (`BPETokenizer`)."""

from minillm.tokenizer.bpe_tokenizer import SPECIAL_TOKENS, BPETokenizer

__all__ = ["BPETokenizer", "SPECIAL_TOKENS"]
