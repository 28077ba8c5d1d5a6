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
