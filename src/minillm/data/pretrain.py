"""Pretraining data: documents → flat token shards on disk → packed fixed-length windows.

A corpus is tokenized once into `shard_NNNNN.bin` files of uint16 (or uint32 for vocabularies over
65,536) with a `meta.json` beside them, and read back with `numpy.memmap`: a corpus larger than memory
trains as fast as a small one, and a second run over the same corpus skips tokenization.

Tokenizing is streamed, so memory stays flat however large the corpus is: JSONL is read line by line,
a large text file `TEXT_CHUNK_CHARS` characters at a time and cut into parts of about `TEXT_PART_CHARS`
characters where the tokenizer's pre-tokenizer always splits (so the ids equal those of the whole
file; EOS follows only the end of a document), a document longer than `DOCUMENT_SPLIT_CHARS` (one huge
JSONL record) is cut the same way, batches of parts are encoded while the previous batch is written, and tokens go straight into the current shard file. All cores are used: by worker
processes for a large corpus (`auto_workers`), else by the Rust encoder's own threads.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from minillm.data.formats import DataError, is_json_array, iter_json_objects, not_utf8_error, read_text
from minillm.data.loader import BatchLoader, stack_collate
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


def iter_documents(path: str | Path, text_field: str = "text", max_chars: int | None = None) -> Iterator[str]:
    """Yield the documents of a corpus: a text file is one document; JSONL gives one per line
    (`{"text": ...}`); a JSON file holds a list of strings or of `{"text": ...}` objects. Files are read
    by `formats.read_text` and `formats.iter_json_objects`, so a UTF-8 byte order mark at the start of a
    file is dropped and a `.jsonl` file may also hold a JSON array or one pretty-printed object.

    `max_chars`: yield only the first `max_chars` characters of each document (a text file is then
    read no further than that), for samples such as the texts a tokenizer is trained on."""
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be at least 1 or None, got {max_chars}")
    for file in find_corpus_files(path):
        if file.suffix.lower() not in JSON_SUFFIXES:
            yield read_text(file, max_chars)
            continue
        for document in _iter_json_documents(file, text_field):
            yield document if max_chars is None or len(document) <= max_chars else document[:max_chars]


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


def _iter_json_documents(file: Path, text_field: str) -> Iterator[str]:
    """The documents of a JSON(L) file, read by `iter_json_objects` (so JSONL, a JSON array and one
    pretty-printed object are read as everywhere else); a `.json` corpus file must hold a list."""
    if file.suffix.lower() == ".json" and not is_json_array(file):
        first = next(iter_json_objects(file), None)
        found = "an empty file" if first is None else type(first[2]).__name__
        raise DataError(f"{file}: expected a JSON list of documents, got {found}")
    for _, where, record in iter_json_objects(file):
        text = _text_of(record, text_field, where)
        del record
        yield text
        del text


# ---------------------------------------------------------------------------------------- streaming parts
# Characters per read of a text file (64-192 KiB of UTF-8): reading costs several times this in
# transient Python strings (decoding, joining), and larger reads were not measurably faster.
TEXT_CHUNK_CHARS = 1 << 16
# Characters per part handed to the encoder: the Rust encoder is fastest on texts of a few thousand
# characters (about 5.8 MB/s per core at 4-16K characters against 3.6 MB/s for a 1M-character text).
TEXT_PART_CHARS = 1 << 13
# A document longer than this many characters (a huge JSONL record, a long line) is cut into parts
# of about `TEXT_PART_CHARS` while it is tokenized, at the same safe positions as a text file, so
# that the encoder never holds a whole huge document (its memory is many times the text's); shorter
# documents are encoded whole, as they always were.
DOCUMENT_SPLIT_CHARS = 1 << 16
# The longest part: text with no safe cut in this many characters (only unusual text: e.g. 256K
# Chinese characters without a single punctuation mark or space) is cut anyway, where no special
# token spans the cut. The ids then differ from those of the whole text only around that cut.
MAX_PART_CHARS = 1 << 18


class DocumentPart(NamedTuple):
    """A piece of a document. `write_token_shards` puts EOS after a part with `end=True` only, so a
    document too large to hold in memory can be tokenized part by part."""

    text: str
    end: bool


# A cut between two characters is safe when every regex pre-tokenizer of the GPT-2 family (this
# framework's own pattern, GPT-2, cl100k, o200k) starts a new piece there and nothing before the cut
# looks past it: then tokenizing the parts one by one gives exactly the ids of the whole text.
# 1. after a line break that follows a non-space character, before a letter or digit ("…。⏎第二段");
# 2. after a letter or digit, before whitespace ("word| next"), or before a non-ASCII punctuation mark
#    or symbol ("中文|，"). Rule 1 is preferred; rule 2 only serves text without usable line breaks.
_AFTER_ALNUM = re.compile(r"[^\W_](?=[^\x00-\x7f\w])|[^\W_](?=\s)")


def _is_cut(text: str, i: int, protect: Sequence[str]) -> bool:
    """No protected string (a special token) spans position `i`."""
    for token in protect:
        n = len(token)
        if n > 1 and text.find(token, max(0, i - n + 1), i + n - 1) != -1:
            return False
    return True


def _last_safe_cut(text: str, lo: int, hi: int, protect: Sequence[str] = ()) -> int:
    """The largest safe cut position in [lo, hi] (see the rules above), or -1."""
    lo, hi = max(lo, 2), min(hi, len(text) - 1)
    if lo > hi:
        return -1
    pos = text.rfind("\n", lo - 1, hi)
    while pos != -1:
        i = pos + 1
        if text[i].isalnum() and not text[pos - 1].isspace() and _is_cut(text, i, protect):
            return i
        pos = text.rfind("\n", lo - 1, pos)
    for span in (256, 8192, len(text)):  # rule 2, searched backwards from `hi` in growing windows
        start = max(lo - 1, hi - span)
        for i in reversed([m.end() for m in _AFTER_ALNUM.finditer(text, start, hi + 1)]):
            if (text[i].isspace() or unicodedata.category(text[i])[0] in "PS") and _is_cut(text, i, protect):
                return i
        if start == lo - 1:
            break
    return -1


def _forced_cut(text: str, i: int, protect: Sequence[str] = ()) -> int:
    """A cut at or just before `i` that splits no special token (for text without a safe cut)."""
    for j in range(i, max(i - 64, 1), -1):
        if _is_cut(text, j, protect):
            return j
    return i


def split_document(text: str, end: bool = True, protect: Sequence[str] = (), part_chars: int = TEXT_PART_CHARS,
                   max_part_chars: int = MAX_PART_CHARS) -> Iterator[DocumentPart]:
    """`text` (a document, or a part of one ending it when `end`) as `DocumentPart`s of about
    `part_chars` characters, cut at safe positions (see `_last_safe_cut`), so that tokenizing the parts
    one by one gives the ids of the whole text; only the last part keeps `end`. Where no safe cut is
    found within `max_part_chars`, the text is cut there anyway (`MAX_PART_CHARS`)."""
    start = 0
    while len(text) - start > part_chars:
        cut = _last_safe_cut(text, start + part_chars // 2, start + part_chars, protect)
        if cut == -1:  # unusual text: the last safe cut within the longest part
            cut = _last_safe_cut(text, start + 1, start + max_part_chars, protect)
        if cut == -1:
            if len(text) - start <= max_part_chars:
                break
            cut = _forced_cut(text, start + max_part_chars, protect)
        yield DocumentPart(text[start:cut], False)
        start = cut
    yield DocumentPart(text[start:] if start else text, end)


def _iter_text_parts(file: Path, chunk_chars: int = TEXT_CHUNK_CHARS, protect: Sequence[str] = (),
                     part_chars: int = TEXT_PART_CHARS, max_part_chars: int = MAX_PART_CHARS) -> Iterator[DocumentPart]:
    """A text file, read `chunk_chars` characters at a time, as parts of about `part_chars`
    characters cut at safe positions (a part grows past that only where no safe cut is near, and
    never much past `max_part_chars`); one document, so only the last part has `end=True`."""
    margin = max([len(t) for t in protect] + [1])  # never cut closer than this to the text read so far
    held: list[str] = []  # text without a safe cut in it, waiting for one (only in unusual text)
    held_chars = 0
    text = ""  # the rest of the text read: cuts are searched here
    try:
        with open(file, encoding="utf-8-sig") as f:
            while block := f.read(chunk_chars):
                text += block
                start = 0
                while len(text) - margin - start > part_chars:
                    cut = _last_safe_cut(text, start + part_chars // 2, start + part_chars, protect)
                    if cut == -1:
                        cut = _last_safe_cut(text, start + 1, len(text) - margin, protect)
                    if cut == -1:
                        if held_chars + len(text) - start < max_part_chars:
                            break
                        cut = _forced_cut(text, len(text) - margin - 1, protect)  # no safe cut for too long
                    yield DocumentPart("".join(held) + text[start:cut], False)
                    held, held_chars, start = [], 0, cut
                text = text[start:]
                if len(text) > 2 * part_chars + margin:  # no cut anywhere: hold all but the tail
                    held.append(text[:-margin - 1])
                    held_chars += len(held[-1])
                    text = text[-margin - 1:]
    except UnicodeDecodeError:
        raise not_utf8_error(file) from None
    yield DocumentPart("".join(held) + text, True)


_PROBE = ("Hello world\n第一段：小明有3个苹果。\nThe answer is 12345, isn't it?  \n"
          "  indented line\n\nAfter a blank line 你好，世界！\nx\tTab\n数字123。再来\n"
          "<|endoftext|>\nNext document\n\n\nend of it")


def splits_exactly(tokenizer: Any) -> bool:
    """Whether tokenizing a text in the parts `_iter_text_parts` cuts gives the ids of the whole text.

    True for regex pre-tokenizers of the GPT-2 family (every `BPETokenizer`); False e.g. for a
    SentencePiece-style tokenizer that marks the start of every text, which then reads a text file whole.
    """
    protect = list(getattr(tokenizer, "special_tokens", ()) or ())
    cuts = [i for i in range(2, len(_PROBE)) if _last_safe_cut(_PROBE, i, i, protect) == i]
    bounds = [0, *cuts, len(_PROBE)]
    parts = [_PROBE[a:b] for a, b in zip(bounds, bounds[1:])]
    try:
        whole, *pieces = tokenizer.encode_batch([_PROBE, *parts])
    except Exception:  # a tokenizer that cannot encode the probe is not trusted to split
        return False
    return [int(t) for t in whole] == [int(t) for p in pieces for t in p]


def iter_document_parts(path: str | Path, text_field: str = "text", chunk_chars: int | None = TEXT_CHUNK_CHARS,
                        protect: Sequence[str] = (), part_chars: int = TEXT_PART_CHARS) -> Iterator[DocumentPart]:
    """The documents of a corpus (as `iter_documents`) as `DocumentPart`s: a JSON(L) document is one
    part; a text file is read `chunk_chars` characters at a time (None: whole) and cut into parts of
    about `part_chars` characters at positions where tokenizing the parts one by one gives the ids of
    the whole text (see `splits_exactly`). `protect`: strings a cut must never fall inside (the
    tokenizer's special tokens)."""
    for file in find_corpus_files(path):
        if file.suffix.lower() in JSON_SUFFIXES:
            documents: Iterable[str] = _iter_json_documents(file, text_field)
        elif chunk_chars is None:
            documents = [read_text(file)]
        else:
            yield from _iter_text_parts(file, chunk_chars, protect, part_chars)
            continue
        for document in documents:
            yield DocumentPart(document, True)


# ---------------------------------------------------------------------------------------- writing
@dataclass
class ShardInfo:
    directory: Path
    num_tokens: int
    num_documents: int
    dtype: str


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class _Batch(NamedTuple):
    texts: list[str]
    ends: list[bool]  # EOS after texts[i]
    documents: int  # documents that end in this batch


def _split_long(documents: Iterable[str | DocumentPart], split_chars: int | None, protect: Sequence[str],
                can_split: Callable[[], bool] | None = None) -> Iterator[tuple[str, bool]]:
    """`(text, end)` for every document or part; one longer than `split_chars` characters comes as the
    parts `split_document` cuts it into (None: never cut), if `can_split()` (asked once, at the first
    such document; None: yes)."""
    allowed: bool | None = None if can_split is not None else True
    for item in documents:
        text, end = (item, True) if isinstance(item, str) else item
        if split_chars is None or len(text) <= split_chars:
            yield text, end
            continue
        if allowed is None:
            allowed = bool(can_split())
        if not allowed:
            yield text, end
            continue
        del item
        parts = split_document(text, end, protect)
        del text  # held by `parts` until its last part
        yield from parts


def _batches(documents: Iterable[str | DocumentPart], max_parts: int, max_chars: int,
             split_chars: int | None = None, protect: Sequence[str] = (),
             can_split: Callable[[], bool] | None = None) -> Iterator[_Batch]:
    """Group documents (whole strings or `DocumentPart`s) into batches of at most `max_parts` parts or
    about `max_chars` characters. A document that is blank from start to end is dropped. A document
    or part longer than `split_chars` characters is cut into parts first (`split_document`; None: never),
    which gives the same ids for a tokenizer that `splits_exactly` (`can_split`: asked before the first
    cut; None: cut)."""
    texts: list[str] = []
    ends: list[bool] = []
    chars = done = 0
    held: list[str] = []  # the blank leading parts of the current document: dropped if it stays blank
    started = False  # the current document has a non-blank part
    for text, end in _split_long(documents, split_chars, protect, can_split):
        if not started and not text.strip():
            held = [] if end else [*held, text]
            continue
        for part in held:
            texts.append(part)
            ends.append(False)
            chars += len(part)
        held = []
        texts.append(text)
        ends.append(end)
        chars += len(text)
        started = not end
        done += end
        if len(texts) >= max_parts or chars >= max_chars:
            yield _Batch(texts, ends, done)
            texts, ends, chars, done = [], [], 0, 0
    if started:  # the iterable stopped inside a document: end it
        texts.append("")
        ends.append(True)
        done += 1
    if texts:
        yield _Batch(texts, ends, done)


def _rust_backend(tokenizer: Any) -> Tokenizer | None:
    """The `tokenizers.Tokenizer` behind a `BPETokenizer`, or None for other tokenizers."""
    try:
        backend = tokenizer.backend
    except (AttributeError, RuntimeError):
        return None
    return backend if isinstance(backend, Tokenizer) else None


def _encode_batch(tokenizer: Any, dtype: np.dtype, eos: int, texts: list[str], ends: list[bool],
                  release: bool = False) -> list[np.ndarray]:
    """The token ids of a batch as arrays, EOS after every part that ends a document. `release`
    empties `texts` once encoded, so that the text is not held while the ids are converted."""
    backend = _rust_backend(tokenizer)
    if backend is not None:
        # Straight from the Rust encodings, one Python list at a time (the same ids as encode_batch).
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        encodings = encode(texts, add_special_tokens=False)
        id_lists: Iterable[Sequence[int]] = (e.ids for e in encodings)
    else:
        id_lists = tokenizer.encode_batch(texts)
    if release:
        texts.clear()
    eos_array = np.array([eos], dtype=dtype)
    pieces = []
    for ids, end in zip(id_lists, ends):
        pieces.append(np.asarray(ids, dtype=dtype))
        if end:
            pieces.append(eos_array)
    return pieces


_WORKER_STATE: tuple[Any, np.dtype, int] | None = None


def _init_worker(tokenizer: Any, dtype: np.dtype, eos: int) -> None:
    global _WORKER_STATE
    # One thread per worker process: the processes are the parallelism (and a Rust thread pool
    # inherited through fork would deadlock).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_STATE = (tokenizer, dtype, eos)


def _encode_in_worker(texts: list[str], ends: list[bool]) -> list[np.ndarray]:
    assert _WORKER_STATE is not None
    pieces = _encode_batch(*_WORKER_STATE, texts, ends)
    return [np.concatenate(pieces)] if pieces else []  # one array pickles much faster than many


AUTO_WORKERS_MIN_BYTES = 8 << 20  # below this much text, worker processes cost more than they save


def available_cpus() -> int:
    """CPUs this process may use, capped by RAYON_NUM_THREADS when that is set. (TOKENIZERS_PARALLELISM=
    false, often set only to silence the fork warning, switches off the Rust threads, not the workers.)"""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    limit = os.environ.get("RAYON_NUM_THREADS", "").strip()
    if limit.isdigit() and int(limit) > 0:
        cpus = min(cpus, int(limit))
    return max(1, cpus)


def auto_workers(num_bytes: int | None) -> int:
    """The `workers` that `write_token_shards` uses when given None: one process per available CPU
    for a corpus of at least `AUTO_WORKERS_MIN_BYTES` on a machine with two or more, else 0.

    Measured on 2 cores (benchmarks/shard_throughput.py): worker processes keep both cores busy and
    tokenize ~8 MB/s of JSONL or text, against ~5.5 (JSONL) to ~8 (text) MB/s for the Rust encoder's
    own threads, whose serial Python share (JSON parsing, id conversion) leaves a core partly idle."""
    cpus = available_cpus()
    return cpus if cpus > 1 and num_bytes is not None and num_bytes >= AUTO_WORKERS_MIN_BYTES else 0


class _ShardWriter:
    """Writes a token stream into files of exactly `shard_tokens` tokens (the last one shorter)."""

    def __init__(self, directory: Path, shard_tokens: int) -> None:
        self.directory = directory
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: Any = None
        self._name = ""
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._file is None:
                self._name = f"shard_{len(self.shards):05d}.bin"
                self._file = open(self.directory / self._name, "wb")  # closed in _close / abort
                self._count = 0
            take = min(tokens.size, self.shard_tokens - self._count)
            self._file.write(memoryview(np.ascontiguousarray(tokens[:take])).cast("B"))
            self._count += take
            tokens = tokens[take:]
            if self._count == self.shard_tokens:
                self._close()

    def _close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards.append({"file": self._name, "num_tokens": int(self._count)})

    def finish(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _executor(workers: int, tokenizer: Any, dtype: np.dtype, eos: int) -> Executor:
    if workers <= 0:
        # One background thread: the Rust encoder (which releases the GIL and spreads a batch over
        # its own threads) works on batch k while this thread reads batch k+1 and writes batch k-1.
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="minillm-encode")
    # fork starts at once and shares the tokenizer; elsewhere (macOS, Windows) spawn pickles it.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                               initargs=(tokenizer, dtype, eos))


def _corpus_chars(documents: Iterable[str | DocumentPart]) -> int | None:
    """Characters of an in-memory list of documents; None for a stream (not known in advance)."""
    if not isinstance(documents, (list, tuple)):
        return None
    return sum(len(d if isinstance(d, str) else d.text) for d in documents)


def write_token_shards(
    documents: Iterable[str | DocumentPart],
    tokenizer: Any,
    out_dir: str | Path,
    shard_tokens: int = 2**24,
    batch_documents: int = 512,
    source: str = "",
    *,
    workers: int | None = None,
    batch_chars: int | None = None,
    split_chars: int | None = DOCUMENT_SPLIT_CHARS,
) -> ShardInfo:
    """Tokenize `documents` (each followed by the EOS token) into shards under `out_dir`.

    A document is a string, or a run of `DocumentPart`s whose last one has `end=True` (EOS follows
    only that one): `iter_document_parts` streams a huge text file that way. Documents are encoded in
    batches of at most `batch_documents` parts or about `batch_chars` characters (default: 2^18 in
    this process, 2^17 per worker); tokens go straight into the current shard file, so memory does not
    grow with the corpus. `workers=0` encodes in this process (the Rust encoder spreads a batch over
    RAYON_NUM_THREADS threads, by default one per core) overlapped with reading and writing;
    `workers=N` encodes batches in N processes (one thread each), which keeps more of the cores busy
    and also parallelises tokenizers that are not Rust-backed; None picks with `auto_workers` (for a
    stream, whose size is unknown: 0). The ids are the same either way.

    A document or part longer than `split_chars` characters (None: no limit) is cut into parts of
    about `TEXT_PART_CHARS` while it is tokenized (`split_document`), so that memory stays bounded
    however long a single document is; the parts of a document are encoded one after the other with
    one EOS at its end, which gives the ids of the whole document for a tokenizer that
    `splits_exactly` (for any other tokenizer documents are never cut).

    The shards are written into a temporary sibling directory that is renamed into place at the end,
    so an interrupted run never leaves a half-written dataset behind. Raises `DataError` when the
    corpus has no text at all.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be at least 1, got {shard_tokens}")
    if workers is None:
        workers = auto_workers(_corpus_chars(documents))
    if batch_chars is None:
        batch_chars = 1 << 17 if workers > 0 else 1 << 18
    protect = list(getattr(tokenizer, "special_tokens", ()) or ())
    out_dir = Path(out_dir)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    dtype = token_dtype(len(tokenizer))
    eos = tokenizer.eos_token_id
    writer = _ShardWriter(tmp_dir, shard_tokens)
    num_tokens = num_documents = 0
    in_flight: deque[tuple[Future, int]] = deque()
    max_in_flight = max(2, 2 * workers)
    executor = _executor(workers, tokenizer, dtype, eos)

    def collect() -> None:
        nonlocal num_tokens, num_documents
        future, documents_done = in_flight.popleft()
        for tokens in future.result():
            writer.write(tokens)
            num_tokens += int(tokens.size)
        num_documents += documents_done

    try:
        for batch in _batches(documents, max(1, batch_documents), max(1, batch_chars), split_chars, protect,
                              lambda: splits_exactly(tokenizer)):
            if workers <= 0:
                future = executor.submit(_encode_batch, tokenizer, dtype, eos, batch.texts, batch.ends, True)
            else:
                future = executor.submit(_encode_in_worker, batch.texts, batch.ends)
            in_flight.append((future, batch.documents))
            del batch
            while len(in_flight) >= max_in_flight or (in_flight and in_flight[0][0].done()):
                collect()
        while in_flight:
            collect()
        shards = writer.finish()
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
        for future, _ in in_flight:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
        writer.abort()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote %d tokens from %d documents to %s (%s)", num_tokens, num_documents, out_dir,
                f"{workers} worker processes" if workers > 0 else "in-process")
    return ShardInfo(out_dir, num_tokens, num_documents, dtype.name)


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


def tokenize_corpus(source: str | Path, tokenizer: Any, out_dir: str | Path, text_field: str = "text",
                    *, workers: int | None = None) -> TokenShards:
    """Shards for a corpus path, reusing `out_dir` when it already holds this corpus and tokenizer.

    Text files are streamed in parts (`iter_document_parts`) when `splits_exactly(tokenizer)`, else read
    whole. `workers` as in `write_token_shards`; None: `auto_workers` for the corpus files' size."""
    out_dir = Path(out_dir)
    source = Path(source)
    stamp = source_stamp(source)
    shards = reusable_shards(out_dir, tokenizer, stamp)
    if shards is not None:
        return shards
    chunk_chars: int | None = TEXT_CHUNK_CHARS
    if not splits_exactly(tokenizer):
        logger.warning("this tokenizer gives different ids for a text cut into parts: text files are read whole")
        chunk_chars = None
    if workers is None:
        workers = auto_workers(sum(size for _, size, _ in stamp))
    protect = list(getattr(tokenizer, "special_tokens", ()) or ())
    parts = iter_document_parts(source, text_field, chunk_chars=chunk_chars, protect=protect)
    write_token_shards(parts, tokenizer, out_dir, source=str(source), workers=workers)
    return stamp_shards(out_dir, stamp)


def source_stamp(source: str | Path) -> list[list[Any]]:
    """Names, sizes and modification times of the corpus files: enough to notice that they changed."""
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in find_corpus_files(source)]


def reusable_shards(out_dir: str | Path, tokenizer: Any, stamp: Any) -> TokenShards | None:
    """The token shards in `out_dir` when they can be reused: they were tokenized by this tokenizer (same
    fingerprint) from the corpus `stamp` describes (`source_stamp(path)` for a corpus path, or any
    JSON-ready value naming generated documents), as `stamp_shards` recorded; else None."""
    out_dir = Path(out_dir)
    if not (out_dir / META_FILE).is_file():
        return None
    shards = TokenShards(out_dir)
    if shards.fingerprint != tokenizer.fingerprint() or shards.meta.get("source_stamp") != stamp:
        return None
    logger.info("reusing token shards in %s", out_dir)
    return shards


def stamp_shards(out_dir: str | Path, stamp: Any) -> TokenShards:
    """Record in the `meta.json` of shards just written what they were tokenized from (see
    `reusable_shards`), and open them."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / META_FILE).read_text(encoding="utf-8"))
    atomic_write_json(out_dir / META_FILE, {**meta, "source_stamp": stamp})
    return TokenShards(out_dir)


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


class PretrainDataLoader(BatchLoader):
    """Batches of packed windows in a seeded, resumable order (see `BatchLoader`)."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, batch_size, stack_collate, shuffle=shuffle, seed=seed, drop_last=drop_last)
