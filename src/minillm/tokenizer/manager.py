"""Cached tokenizer training (`TokenizerManager`) and side-by-side tokenizer comparison
(`evaluate_tokenizers`, `format_tokenizer_table`, behind `minillm tokenizer eval`)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from minillm.io import atomic_write_json, fsync_dir
from minillm.tokenizer.bpe_tokenizer import (
    PRETOKENIZE_PATTERN,
    SPECIAL_TOKENS,
    TRAIN_MAX_TEXT_CHARS,
    TRAIN_MAX_TOTAL_CHARS,
    TRAIN_PIECE_CHARS,
    BPETokenizer,
)

logger = logging.getLogger("minillm.tokenizer")

# Bump when the cache layout or the meaning of a key changes: old entries are then simply not found.
CACHE_FORMAT_VERSION = 1
INFO_FILE = "cache_info.json"


# ---------------------------------------------------------------------------------------- caching
def _hash_texts(texts: Sequence[str]) -> dict[str, Any]:
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))  # length-prefixed: ["ab", "c"] != ["a", "bc"]
        digest.update(data)
    return {"kind": "texts", "count": len(texts), "sha256": digest.hexdigest()}


class TokenizerManager:
    """Trains `BPETokenizer`s once and keeps them under `cache_dir/<key>/`, where the key is the sha256
    of the corpus fingerprint and every training setting.

    The corpus is a list of texts, fingerprinted by their content, or any iterable of texts with a
    `fingerprint` that stands for it (`minillm.data.corpus.corpus_fingerprint(path)` for a corpus file
    or directory, whose texts are then only read on a cache miss). The settings in the key: vocab_size,
    special tokens, min_frequency, the pre-tokenizer regex, the training sample limits and built-in
    special tokens of `BPETokenizer` (so that changing them in code retrains) and the `tokenizers`
    version. A tokenizer is trained into a temporary directory that is renamed into place, so a crash
    never leaves a half-written cache entry.
    """

    def __init__(self, cache_dir: str | Path):
        self.cache_dir = Path(cache_dir)

    def _key_material(self, corpus: Iterable[str], vocab_size: int, special_tokens: list[str] | None,
                      min_frequency: int, fingerprint: dict[str, Any] | None
                      ) -> tuple[dict[str, Any], Iterable[str]]:
        if isinstance(corpus, (str, Path)):
            raise TypeError("the corpus must be an iterable of texts (wrap a single text in a list); for a corpus "
                            "path pass iter_documents(path) with fingerprint=corpus_fingerprint(path) "
                            "(minillm.data.corpus)")
        if fingerprint is None:
            corpus = list(corpus)
            if not all(isinstance(t, str) for t in corpus):
                raise TypeError("the corpus must be an iterable of strings")
            fingerprint = _hash_texts(corpus)
        settings = {
            "vocab_size": vocab_size,
            "special_tokens": list(special_tokens or []),
            "min_frequency": min_frequency,
            "builtin_special_tokens": list(SPECIAL_TOKENS),
            "pretokenize_pattern": PRETOKENIZE_PATTERN,
            "max_text_chars": TRAIN_MAX_TEXT_CHARS,
            "max_total_chars": TRAIN_MAX_TOTAL_CHARS,
            "piece_chars": TRAIN_PIECE_CHARS,
            "tokenizers_version": tokenizers.__version__,
            "cache_format": CACHE_FORMAT_VERSION,
        }
        return {"corpus": fingerprint, "settings": settings}, corpus

    @staticmethod
    def _digest(material: dict[str, Any]) -> str:
        canonical = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def cache_key(self, corpus: Iterable[str], vocab_size: int, *, special_tokens: list[str] | None = None,
                  min_frequency: int = 2, fingerprint: dict[str, Any] | None = None) -> str:
        """The cache key `get_or_train` would use (reads the texts to fingerprint them unless `fingerprint`)."""
        material, _ = self._key_material(corpus, vocab_size, special_tokens, min_frequency, fingerprint)
        return self._digest(material)

    def get_or_train(self, corpus: Iterable[str], vocab_size: int, *, special_tokens: list[str] | None = None,
                     min_frequency: int = 2, fingerprint: dict[str, Any] | None = None,
                     source: str = "") -> BPETokenizer:
        """The tokenizer trained on the texts `corpus` with these settings: loaded from the cache when it is
        there, trained (and cached) otherwise. With `fingerprint`, `corpus` is read only on a miss. A
        corpus without a non-blank text raises `DataError`, naming `source` (e.g. the corpus path)."""
        material, texts = self._key_material(corpus, vocab_size, special_tokens, min_frequency, fingerprint)
        key = self._digest(material)
        final = self.cache_dir / key
        if (final / "tokenizer.json").is_file():
            logger.info("tokenizer cache hit: %s", final)
            return BPETokenizer.from_pretrained(final)

        logger.info("tokenizer cache miss: training a %d-token tokenizer into %s", vocab_size, final)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=self.cache_dir))
        try:
            tokenizer = BPETokenizer(vocab_size=vocab_size, special_tokens=special_tokens,
                                     min_frequency=min_frequency)
            tokenizer.train(texts, source=source)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / INFO_FILE, {"key": key, **material})
            fsync_dir(tmp)
            if final.exists() and not (final / "tokenizer.json").is_file():
                shutil.rmtree(final)  # not written by us (entries only appear complete); replace it
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "tokenizer.json").is_file():
                    raise
                # Another process cached the same tokenizer meanwhile: keep its copy.
                shutil.rmtree(tmp, ignore_errors=True)
            fsync_dir(self.cache_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return BPETokenizer.from_pretrained(final)


# ---------------------------------------------------------------------------------------- evaluation
def _adapter(tokenizer: Any) -> tuple[Callable[[list[str]], list[list[int]]], Callable[[list[int]], str], int]:
    """(encode a batch without BOS/EOS, decode, vocabulary size) for a BPETokenizer, a tiktoken.Encoding,
    a transformers tokenizer or anything with encode/decode."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.encode_batch, tokenizer.decode, tokenizer.vocab_size
    if hasattr(tokenizer, "encode_ordinary") and hasattr(tokenizer, "n_vocab"):  # tiktoken.Encoding
        return (lambda texts: tokenizer.encode_batch(texts, allowed_special="all"),
                tokenizer.decode, tokenizer.n_vocab)
    if hasattr(tokenizer, "all_special_ids"):  # transformers

        def encode_hf(texts: list[str]) -> list[list[int]]:
            return [tokenizer.encode(t, add_special_tokens=False) for t in texts]

        def decode_hf(ids: list[int]) -> str:
            return tokenizer.decode(ids, clean_up_tokenization_spaces=False)

        return encode_hf, decode_hf, len(tokenizer)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    return (lambda texts: [tokenizer.encode(t) for t in texts]), tokenizer.decode, size


def evaluate_tokenizers(tokenizers: Mapping[str, Any], texts: Iterable[str]) -> list[dict[str, Any]]:
    """Compare tokenizers on the same texts. One row per tokenizer, in the given order:
    name, vocab_size, texts, characters, bytes (UTF-8), tokens, chars_per_token, bytes_per_token
    (higher = better compression; 0.0 when there are no tokens), roundtrip_ok (texts with
    decode(encode(text)) == text) and roundtrip_rate. BOS/EOS are not added."""
    texts = list(texts)
    if not texts:
        raise ValueError("evaluate_tokenizers needs at least one text")
    characters = sum(len(t) for t in texts)
    num_bytes = sum(len(t.encode("utf-8", errors="surrogatepass")) for t in texts)
    rows = []
    for name, tokenizer in tokenizers.items():
        encode_batch, decode, vocab_size = _adapter(tokenizer)
        encoded = encode_batch(texts)
        tokens = sum(len(ids) for ids in encoded)
        roundtrip_ok = sum(decode(list(ids)) == text for ids, text in zip(encoded, texts))
        rows.append({
            "name": name,
            "vocab_size": int(vocab_size),
            "texts": len(texts),
            "characters": characters,
            "bytes": num_bytes,
            "tokens": tokens,
            "chars_per_token": characters / tokens if tokens else 0.0,
            "bytes_per_token": num_bytes / tokens if tokens else 0.0,
            "roundtrip_ok": roundtrip_ok,
            "roundtrip_rate": roundtrip_ok / len(texts),
        })
    return rows


def _percent(ok: int, total: int) -> str:
    value = 100.0 * ok / total
    if ok < total:  # round down: never print 100.0% for a tokenizer that failed a round trip
        value = min(math.floor(value * 10) / 10, 99.9)
    return f"{value:.1f}%"


def format_tokenizer_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of `evaluate_tokenizers` as an aligned text table (names left, numbers right)."""
    header = ["tokenizer", "vocab", "tokens", "chars/token", "bytes/token", "round-trip"]
    body = [[str(r["name"]), str(r["vocab_size"]), str(r["tokens"]), f"{r['chars_per_token']:.3f}",
             f"{r['bytes_per_token']:.3f}", _percent(r["roundtrip_ok"], r["texts"])] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]).rstrip()

    lines = [render(header), render(["-" * w for w in widths])] + [render(line) for line in body]
    return "\n".join(lines)
