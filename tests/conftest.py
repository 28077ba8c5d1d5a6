import os
import tempfile

import pytest

from minillm.data.builtin import builtin_corpus
from minillm.tokenizer import BPETokenizer

# Trained tokenizers are cached per user; tests keep theirs in a throwaway directory.
os.environ["MINILLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="minillm-test-cache-")


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return builtin_corpus(3000, seed=1)


@pytest.fixture(scope="session")
def tokenizer(corpus) -> BPETokenizer:
    tok = BPETokenizer(vocab_size=512)
    tok.train(corpus)
    return tok


@pytest.fixture(scope="session")
def chat_model(tokenizer):
    """A random two-layer model (context 128) whose special tokens never win the argmax: greedy replies are
    never cut short by an end-of-turn token, so they all have text and run to max_tokens."""
    import torch

    from minillm.model import MiniGPT, MiniGPTConfig

    torch.manual_seed(0)
    config = MiniGPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
                           tie_word_embeddings=False, initializer_range=0.5)
    model = MiniGPT(config).eval()
    with torch.no_grad():
        model.lm_head.weight[sorted(tokenizer.special_token_ids)] = 0
    return model
