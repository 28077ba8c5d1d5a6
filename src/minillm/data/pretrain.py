"""Pretraining data: documents → flat token shards on disk → packed fixed-length windows.

A corpus is tokenized once into `shard_NNNNN.bin` files of uint16 (or uint32 for vocabularies over
65,536) with a `meta.json` beside them, and read back with `numpy.memmap`: a corpus larger than memory
trains as fast as a small one, and a second run over the same corpus skips tokenization.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from minillm.data.formats import DataError
from minillm.io import atomic_write_json, fsync_dir

logger = logging.getLogger("minillm.data")

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".jsonl", ".json")
META_FILE = "meta.json"
SHARD_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------- reading
def find_corpus_files(path: str | Path) -> list[Path]:
    """The text and JSON(L) files of a corpus: the file itself, or every such file under a directory."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES)
    if not files:
        raise DataError(f"{path}: directory contains no text files "
                        f"({', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)})")
    return files


def iter_documents(path: str | Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a corpus: a text file is one document; JSONL gives one per line
    (`{"text": ...}`); a JSON file holds a list of strings or of `{"text": ...}` objects."""
    for file in find_corpus_files(path):
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            yield from _iter_jsonl(file, text_field)
        elif suffix == ".json":
            yield from _iter_json(file, text_field)
        else:
            yield _read_text(file)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _text_of(record: Any, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with a {text_field!r} field, got {type(record).__name__}")
    if text_field not in record:
        raise DataError(f"{where}: missing field {text_field!r} (fields: {', '.join(map(str, record)) or 'none'})")
    value = record[text_field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} must be a string, got {type(value).__name__}")
    return value


def _iter_jsonl(file: Path, text_field: str) -> Iterator[str]:
    with open(file, encoding="utf-8", errors="strict") as f:
        line_no = 0
        try:
            for line_no, line in enumerate(f, start=1):  # noqa: B007 (line_no is used in the error below)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
                yield _text_of(record, text_field, f"{file}:{line_no}")
        except UnicodeDecodeError as e:
            raise DataError(f"{file}:{line_no + 1}: not UTF-8 ({e.reason})") from None


def _iter_json(file: Path, text_field: str) -> Iterator[str]:
    try:
        data = json.loads(_read_text(file))
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON list of documents, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield _text_of(record, text_field, f"{file}: item {i}")


# ---------------------------------------------------------------------------------------- writing
@dataclass
class ShardInfo:
    directory: Path
    num_tokens: int
    num_documents: int
    dtype: str


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_token_shards(
    documents: Iterable[str],
    tokenizer: Any,
    out_dir: str | Path,
    shard_tokens: int = 2**24,
    batch_documents: int = 512,
    source: str = "",
) -> ShardInfo:
    """Tokenize `documents` (each followed by the EOS token) into shards under `out_dir`.

    The shards are written into a temporary sibling directory that is renamed into place at the end,
    so an interrupted run never leaves a half-written dataset behind. Raises `DataError` when the
    corpus has no text at all.
    """
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    dtype = token_dtype(len(tokenizer))
    eos = tokenizer.eos_token_id
    shards: list[dict[str, Any]] = []
    buffer: list[np.ndarray] = []
    buffered = num_tokens = num_documents = 0

    def flush(limit: int) -> None:
        """Write shards of exactly `limit` tokens while the buffer holds that many; `limit=0` writes the rest."""
        nonlocal buffer, buffered
        tokens = np.concatenate(buffer).astype(dtype, copy=False)
        while tokens.size and tokens.size >= limit:
            size = limit or tokens.size
            name = f"shard_{len(shards):05d}.bin"
            with open(tmp_dir / name, "wb") as f:
                f.write(tokens[:size].tobytes())
                f.flush()
                os.fsync(f.fileno())
            shards.append({"file": name, "num_tokens": int(size)})
            tokens = tokens[size:]
        buffer, buffered = [tokens], int(tokens.size)

    try:
        for batch in _batched(documents, batch_documents):
            batch = [doc for doc in batch if doc.strip()]
            if not batch:
                continue
            for ids in tokenizer.encode_batch(batch):
                buffer.append(np.asarray(ids + [eos], dtype=np.int64))
                buffered += len(ids) + 1
                num_tokens += len(ids) + 1
                num_documents += 1
            if buffered >= shard_tokens:
                flush(shard_tokens)
        if buffered:
            flush(0)
        if num_documents == 0:
            raise DataError(f"corpus {source or '(given documents)'} is empty: no non-blank document")
        atomic_write_json(tmp_dir / META_FILE, {
            "format_version": SHARD_FORMAT_VERSION, "dtype": dtype.name, "num_tokens": num_tokens,
            "num_documents": num_documents, "vocab_size": len(tokenizer), "eos_token_id": eos,
            "tokenizer_fingerprint": tokenizer.fingerprint(), "source": source, "shards": shards,
        })
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
        fsync_dir(out_dir.parent)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote %d tokens from %d documents to %s", num_tokens, num_documents, out_dir)
    return ShardInfo(out_dir, num_tokens, num_documents, dtype.name)


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------- reading shards
class TokenShards:
    """All tokens of a shard directory as one flat, read-only sequence backed by `numpy.memmap`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise DataError(f"{self.directory}: no {META_FILE}; not a token shard directory")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(self.meta["dtype"])
        self._arrays: list[np.ndarray] = []
        for shard in self.meta["shards"]:
            path = self.directory / shard["file"]
            expected = shard["num_tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise DataError(f"{path}: missing or truncated shard (expected {expected} bytes)")
            self._arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        self._offsets = np.cumsum([0] + [a.size for a in self._arrays])

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer_fingerprint"]

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def slice(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) as int64, across shard boundaries when needed."""
        parts = []
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while start < end and shard < len(self._arrays):
            local = start - self._offsets[shard]
            take = min(end, self._offsets[shard + 1]) - start
            parts.append(self._arrays[shard][local:local + take])
            start += take
            shard += 1
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


def tokenize_corpus(source: str | Path, tokenizer: Any, out_dir: str | Path, text_field: str = "text") -> TokenShards:
    """Shards for a corpus path, reusing `out_dir` when it already holds this corpus and tokenizer."""
    out_dir = Path(out_dir)
    source = Path(source)
    stamp = _source_stamp(source)
    if (out_dir / META_FILE).is_file():
        shards = TokenShards(out_dir)
        if shards.fingerprint == tokenizer.fingerprint() and shards.meta.get("source_stamp") == stamp:
            logger.info("reusing token shards in %s", out_dir)
            return shards
    write_token_shards(iter_documents(source, text_field), tokenizer, out_dir, source=str(source))
    meta = json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
    atomic_write_json(out_dir / META_FILE, {**meta, "source_stamp": stamp})
    return TokenShards(out_dir)


def _source_stamp(source: Path) -> list[list[Any]]:
    """Names, sizes and modification times of the corpus files: enough to notice that they changed."""
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in find_corpus_files(source)]


# ---------------------------------------------------------------------------------------- datasets
TokenSource = Sequence[str] | np.ndarray | TokenShards | str | Path


class LanguageModelingDataset(Dataset):
    """Packed fixed-length windows over a token stream, for next-token prediction.

    `data` is a list of texts (tokenized here, each followed by EOS), an array of token ids, a
    `TokenShards`, or a shard directory. Consecutive windows overlap by one token, so every
    next-token pair of the stream is trained exactly once. A final partial window is padded and its
    padding is excluded from the loss (label -100). `start`/`end` select a token range (a split).
    """

    def __init__(self, data: TokenSource, tokenizer: Any = None, max_length: int = 256,
                 start: int = 0, end: int | None = None) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.max_length = max_length
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        if isinstance(data, (str, Path)):
            data = TokenShards(data)
        if isinstance(data, (TokenShards, np.ndarray)):
            self.tokens = data
        else:
            if tokenizer is None:
                raise ValueError("a tokenizer is needed to build a LanguageModelingDataset from texts")
            texts = [t for t in data if t.strip()]
            if not texts:
                raise DataError("LanguageModelingDataset: no non-blank text given")
            ids: list[int] = []
            for doc in tokenizer.encode_batch(texts):
                ids.extend(doc)
                ids.append(tokenizer.eos_token_id)
            self.tokens = np.asarray(ids, dtype=np.int64)
        self.start = start
        self.end = len(self.tokens) if end is None else end
        span = self.end - self.start
        if span < 2:
            raise DataError(f"LanguageModelingDataset: {span} tokens are too few for even one window")
        stride = max_length - 1
        self.num_windows = max(1, -(-(span - 1) // stride))  # ceil((span - 1) / stride)
        self.stride = stride

    def __len__(self) -> int:
        return self.num_windows

    def _window(self, index: int) -> np.ndarray:
        begin = self.start + index * self.stride
        end = min(begin + self.max_length, self.end)
        if isinstance(self.tokens, TokenShards):
            return self.tokens.slice(begin, end)
        return np.asarray(self.tokens[begin:end], dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_windows:
            raise IndexError(index)
        window = torch.from_numpy(self._window(index))
        n = window.numel()
        input_ids = torch.full((self.max_length,), self.pad_id, dtype=torch.long)
        labels = torch.full((self.max_length,), -100, dtype=torch.long)
        input_ids[:n] = window
        labels[:n] = window
        return {"input_ids": input_ids, "labels": labels}

    def num_tokens(self) -> int:
        return self.end - self.start


def split_train_val(data: TokenShards | np.ndarray, max_length: int, val_fraction: float,
                    tokenizer: Any = None) -> tuple[LanguageModelingDataset, LanguageModelingDataset | None]:
    """Hold out the last `val_fraction` of the token stream (at least one window) for validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    total = len(data)
    if val_fraction == 0.0:
        return LanguageModelingDataset(data, tokenizer, max_length), None
    val_tokens = max(int(total * val_fraction), max_length)
    if total - val_tokens < max_length:
        raise DataError(f"corpus of {total} tokens is too small to hold out {val_tokens} validation tokens "
                        f"and still train on windows of {max_length}")
    cut = total - val_tokens
    return (LanguageModelingDataset(data, tokenizer, max_length, end=cut),
            LanguageModelingDataset(data, tokenizer, max_length, start=cut))


class PretrainDataLoader:
    """Batches of windows in a seeded order that is a function of (seed, epoch) alone.

    Because the order does not depend on any global RNG, a resumed run can continue from
    (`epoch`, `batch_index`) and see exactly the batches the uninterrupted run would have seen.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.batch_index = 0

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.dataset))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self._order()
        while self.batch_index < len(self):
            indices = order[self.batch_index * self.batch_size:(self.batch_index + 1) * self.batch_size]
            self.batch_index += 1
            items = [self.dataset[int(i)] for i in indices]
            yield {key: torch.stack([item[key] for item in items]) for key in items[0]}
        self.epoch += 1
        self.batch_index = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_index, self.seed = state["epoch"], state["batch_index"], state["seed"]
