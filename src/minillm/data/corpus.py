"""A corpus path as what tokenizer training needs: a sample of its documents and a fingerprint of its
files (for `TokenizerManager`'s cache key), both bounded however large the files are."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from minillm.data.pretrain import find_corpus_files, iter_documents
from minillm.errors import DataError
from minillm.tokenizer.bpe_tokenizer import TRAIN_MAX_TEXT_CHARS, TRAIN_MAX_TOTAL_CHARS

__all__ = ["CONTENT_HASH_MAX_BYTES", "corpus_fingerprint", "sample_documents"]

# Files up to this size are fingerprinted by their content; larger ones by name, size and mtime.
CONTENT_HASH_MAX_BYTES = 16 << 20


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sample_documents(path: str | Path, text_field: str = "text", max_documents: int | None = None,
                     max_text_chars: int = TRAIN_MAX_TEXT_CHARS,
                     max_total_chars: int = TRAIN_MAX_TOTAL_CHARS) -> list[str]:
    """The texts a tokenizer is trained on from a corpus path: its first `max_documents` non-blank
    documents (None: all), each cut to its first `max_text_chars` characters (a huge text file is read
    no further), until `max_total_chars` characters are collected. Raises `DataError` naming the
    corpus when it holds no non-blank document."""
    sample: list[str] = []
    total = 0
    for text in iter_documents(path, text_field, max_chars=max_text_chars):
        if not text or text.isspace():
            continue
        sample.append(text[: max_total_chars - total])
        total += len(sample[-1])
        if total >= max_total_chars or (max_documents is not None and len(sample) >= max_documents):
            break
    if not sample:
        raise DataError(f"{path}: empty corpus: no non-blank document to train a tokenizer on")
    return sample


def corpus_fingerprint(path: str | Path, text_field: str = "text") -> dict[str, Any]:
    """What identifies the corpus at `path` for a cache key: each file's name and size, with its sha256
    up to `CONTENT_HASH_MAX_BYTES` (larger files: their mtime instead), and the JSONL text field."""
    path = Path(path)
    files = find_corpus_files(path)
    entries = []
    for file in files:
        stat = file.stat()
        name = file.name if path.is_file() else file.relative_to(path).as_posix()
        if stat.st_size <= CONTENT_HASH_MAX_BYTES:
            entries.append({"name": name, "size": stat.st_size, "sha256": _file_digest(file)})
        else:
            entries.append({"name": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"kind": "path", "files": entries, "text_field": text_field}


