"""Dataset preparation: clean, filter, de-duplicate, sample and split a corpus into canonical JSONL.

`prepare_dataset` streams the records of its inputs (a text file is one document; `.jsonl`/`.json`
files go through `minillm.data.formats`, so every schema it knows is accepted) and, for each record:

1. cleans the text (each message's content for conversations and preferences): Unicode normalisation
   (NFC by default; NFKC on request, which also turns full-width Chinese punctuation "，。！" into
   ASCII ",.!" and is therefore not the default), \\r\\n → \\n, removal of control characters other than
   \\n and \\t (and of BOMs and lone surrogates), trailing whitespace stripped from every line, three or
   more line breaks in a row collapsed to one blank line, leading/trailing whitespace stripped;
2. filters by length in characters (`min_chars`, `max_chars`);
3. drops exact duplicates (a hash of the cleaned text: the joined message contents for conversations
   and preferences, the tokens and label for labelled sequences);
4. drops near-duplicates with MinHash + LSH (`MinHashLSH`): a record is dropped when its estimated
   Jaccard similarity (over character 5-gram shingles, lower-cased, whitespace collapsed) to a record
   already kept reaches `near_dup_threshold`. Not applied to labelled sequences, where two examples a
   few tokens apart are legitimately different;
5. samples (a fraction or a count, seeded) and splits off a validation set (seeded).

The survivors go to `out_dir/train.jsonl` (and `val.jsonl`) in one canonical schema per kind —
`{"text"}`, `{"messages": [...]}`, `{"prompt": [...], "chosen", "rejected"}`, `{"tokens", "label"}` —
with `out_dir/report.json` (`PrepareReport`): what was read, kept and dropped for which reason, with
the first locations of each. All of it is written into a temporary sibling of `out_dir` that takes its
place only when complete, so a killed run never leaves half a dataset, and a non-empty `out_dir` is
refused unless `overwrite`. Text is streamed (to a temporary file between the filtering pass and the
sampling/writing pass); only the de-duplication state grows with the corpus: per kept record a 16-byte hash with its location, a 512-byte MinHash signature and one
16-byte LSH bucket entry per band (about 1 KB in all).

`inspect_dataset` summarises a text file, JSONL/JSON file, directory or token shard directory:
records per kind and schema, length statistics in characters (and tokens), and a length histogram.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minillm.data import formats
from minillm.data.formats import Conversation, DataError, LabelledSequence, PreferencePair
from minillm.data.pretrain import (
    DOCUMENT_SPLIT_CHARS,
    JSON_SUFFIXES,
    META_FILE,
    TEXT_CHUNK_CHARS,
    TEXT_SUFFIXES,
    TokenShards,
    find_corpus_files,
    iter_document_parts,
    split_document,
    splits_exactly,
)
from minillm.io import atomic_write, atomic_write_json, check_output_dir, staged_directory

logger = logging.getLogger("minillm.data")

REASONS = ("malformed", "empty", "too_short", "too_long", "duplicate", "near_duplicate", "sampled_out")
NORMALIZATIONS = ("NFC", "NFKC", "NFD", "NFKD")
MAX_EXAMPLES = 5
TEXT_FILE_SCHEMA = "plain_text"


# ---------------------------------------------------------------------------------------- cleaning
# C0/C1 control characters except \t and \n (\r is turned into \n before), BOMs, lone surrogates.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff\ud800-\udfff]")
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str, normalize: str | None = "NFC") -> str:
    """Normalise Unicode (`normalize`: "NFC", "NFKC", … or None), turn \\r\\n and \\r into \\n, drop
    control characters other than \\n and \\t, strip every line's end, collapse 3+ line breaks into one
    blank line, and strip the whole text."""
    if normalize:
        text = unicodedata.normalize(normalize, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


# ---------------------------------------------------------------------------------------- MinHash + LSH
_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A strong 64-bit mixer (splitmix64's finaliser), elementwise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(text: str, n: int = 5) -> np.ndarray:
    """The distinct 64-bit hashes of the character n-grams of `text` (lower-cased, whitespace runs made
    one space): character shingles suit Chinese, which has no spaces between words."""
    text = " ".join(text.lower().split())
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    if codes.size == 0:
        return np.empty(0, dtype=np.uint64)
    m = max(1, codes.size - n + 1)
    h = np.full(m, np.uint64(min(n, codes.size)))  # the length, so that a short text is not a prefix's hash
    for k in range(min(n, codes.size)):
        h = h * np.uint64(0x100000001B3) + codes[k:k + m]  # polynomial hash of the window, mod 2^64
    return np.unique(_splitmix64(h))


def lsh_parameters(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows) for LSH over `num_perm` MinHash values: the most rows per band (fewest false
    candidates) such that a pair whose Jaccard similarity equals `threshold` still shares at least one
    band with probability >= `recall`. Candidates are then checked on the whole signature."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


class _BucketIndex:
    """A compact multimap from 64-bit keys to record numbers (the LSH buckets): sorted numpy arrays
    (12-16 bytes an entry, against ~100 for a dict) plus a dict of recent entries that is merged into
    them whenever it holds an eighth as many (amortised linear)."""

    def __init__(self) -> None:
        self._keys = np.empty(0, dtype=np.uint64)
        self._values = np.empty(0, dtype=np.int64)
        self._recent: dict[int, list[int]] = {}
        self._recent_count = 0

    def get(self, keys: np.ndarray) -> set[int]:
        found: set[int] = set()
        if self._keys.size:
            lows = np.searchsorted(self._keys, keys, side="left").tolist()
            highs = np.searchsorted(self._keys, keys, side="right").tolist()
            for low, high in zip(lows, highs):
                if high > low:
                    found.update(self._values[low:high].tolist())
        for key in keys.tolist():
            found.update(self._recent.get(key, ()))
        return found

    def add(self, keys: np.ndarray, value: int) -> None:
        for key in keys.tolist():
            self._recent.setdefault(key, []).append(value)
        self._recent_count += len(keys)
        if self._recent_count >= max(4096, self._keys.size // 8):
            self._merge()

    def _merge(self) -> None:
        keys = np.fromiter((k for k, vs in self._recent.items() for _ in vs), dtype=np.uint64,
                           count=self._recent_count)
        values = np.fromiter((v for vs in self._recent.values() for v in vs), dtype=np.int64,
                             count=self._recent_count)
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
        at = np.searchsorted(self._keys, keys, side="right")
        self._keys = np.insert(self._keys, at, keys)
        self._values = np.insert(self._values, at, values)
        self._recent.clear()
        self._recent_count = 0

    def __len__(self) -> int:
        return int(self._keys.size) + self._recent_count


class MinHashLSH:
    """Streaming near-duplicate detection: MinHash signatures + banded LSH over the records kept so far.

    Each of `num_perm` hash functions is a random affine map x → a·x + b (mod 2^64, `a` odd, hence a
    permutation of the 64-bit shingle hashes); the signature keeps the top 32 bits of the minimum of
    each. LSH splits the signature into `bands` bands of `rows` values (`lsh_parameters`); records
    sharing a band are candidates, and a candidate counts as a near-duplicate when the fraction of equal
    signature values (the estimated Jaccard similarity) reaches `threshold`. The hash functions come from
    a fixed seed, so the result does not depend on anything but the texts and their order.

    Memory per indexed record: the signature (4 bytes × num_perm) and one bucket entry per band
    (16 bytes; `_BucketIndex`), about 0.9 KB with the defaults.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.num_perm = num_perm
        self.ngram = ngram
        rng = np.random.default_rng(seed)
        self._a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self._b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64)
        self.bands, self.rows = lsh_parameters(threshold, num_perm)
        # a different odd multiplier for every value of every band: band keys never collide across bands
        self._band_mix = rng.integers(0, 2**64, size=(self.bands, self.rows), dtype=np.uint64) | np.uint64(1)
        self._buckets = _BucketIndex()
        self._signatures = np.empty((256, num_perm), dtype=np.uint32)
        self.size = 0

    def signature(self, text: str) -> np.ndarray:
        shingles = shingle_hashes(text, self.ngram)
        mins = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, shingles.size, 4096):  # bounded temporary: num_perm × 4096 values
            block = shingles[start:start + 4096]
            values = self._a[:, None] * block[None, :] + self._b[:, None]
            mins = np.minimum(mins, values.min(axis=1))
        return (mins >> np.uint64(32)).astype(np.uint32)

    def _band_keys(self, signature: np.ndarray) -> np.ndarray:
        bands = signature[: self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
        return (bands * self._band_mix).sum(axis=1, dtype=np.uint64)

    def query(self, signature: np.ndarray) -> tuple[int, float] | None:
        """(index, estimated Jaccard) of the most similar indexed record at or above the threshold."""
        candidates = self._buckets.get(self._band_keys(signature))
        if not candidates:
            return None
        index = np.fromiter(candidates, dtype=np.int64, count=len(candidates))
        similarity = (self._signatures[index] == signature).mean(axis=1)
        best = int(np.argmax(similarity))
        if similarity[best] >= self.threshold:
            return int(index[best]), float(similarity[best])
        return None

    def add(self, signature: np.ndarray) -> int:
        """Index a record; returns its number (0, 1, …)."""
        if self.size == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.empty_like(self._signatures)])
        self._signatures[self.size] = signature
        self._buckets.add(self._band_keys(signature), self.size)
        self.size += 1
        return self.size - 1

    def similarity(self, a: str, b: str) -> float:
        """Estimated Jaccard similarity of two texts (for inspection and tests)."""
        return float((self.signature(a) == self.signature(b)).mean())


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of the character n-gram shingle sets of two texts."""
    x, y = shingle_hashes(a, n), shingle_hashes(b, n)
    union = np.union1d(x, y).size
    return np.intersect1d(x, y).size / union if union else 1.0


# ---------------------------------------------------------------------------------------- records
def _content(record: Any) -> str:
    """The text a record is measured, hashed and shingled by."""
    if isinstance(record, str):
        return record
    if isinstance(record, Conversation):
        return "\n".join(m.content for m in record.messages)
    if isinstance(record, PreferencePair):
        return "\n".join([*(m.content for m in record.prompt), record.chosen, record.rejected])
    if isinstance(record, LabelledSequence):
        return " ".join(record.tokens)
    if isinstance(record, formats.PromptRecord):
        return "\n".join(m.content for m in record.prompt)
    raise TypeError(f"unknown record type {type(record).__name__}")


def _messages(messages: Iterable[formats.Message], normalize: str | None) -> list[dict[str, str]] | None:
    cleaned = [{"role": m.role, "content": clean_text(m.content, normalize)} for m in messages]
    return None if any(not m["content"] for m in cleaned) else cleaned


def _clean_record(record: Any, normalize: str | None) -> tuple[dict[str, Any], str, str] | None:
    """(canonical JSON object, content, exact-duplicate key) of a cleaned record; None if cleaning
    left a text or a message empty."""
    if isinstance(record, str):
        text = clean_text(record, normalize)
        return ({"text": text}, text, text) if text else None
    if isinstance(record, Conversation):
        messages = _messages(record.messages, normalize)
        if messages is None:
            return None
        content = "\n".join(m["content"] for m in messages)
        return {"messages": messages}, content, content
    if isinstance(record, PreferencePair):
        prompt = _messages(record.prompt, normalize)
        chosen, rejected = clean_text(record.chosen, normalize), clean_text(record.rejected, normalize)
        if prompt is None or not chosen or not rejected:
            return None
        content = "\n".join([*(m["content"] for m in prompt), chosen, rejected])
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, content, content
    if isinstance(record, LabelledSequence):
        tokens = clean_text(" ".join(record.tokens), normalize).split()
        if not tokens:
            return None
        content = " ".join(tokens)
        return {"tokens": content, "label": record.label}, content, f"{content}\x00{record.label}"
    raise TypeError(f"unknown record type {type(record).__name__}")


def _kind_of(record: Any) -> str:
    if isinstance(record, str):
        return "text"
    if isinstance(record, Conversation):
        return "conversation"
    if isinstance(record, PreferencePair):
        return "preference"
    if isinstance(record, formats.PromptRecord):
        return "prompt"
    return "labelled"


@dataclass
class _Item:
    """One record read, or one bad record: `record is None` and `reason` says why."""

    file: Path
    line: int
    record: Any = None
    schema: str = ""
    reason: str = ""


def _iter_json_file(file: Path, kind: str | None, skip_bad: bool, allow_prompts: bool = False) -> Iterator[_Item]:
    """The records of one JSON(L) file through `formats`, interleaved with its bad records (skip_bad)."""
    # The LoadResult passed to `iter_records` reports each record's schema and the bad records skipped.
    result = formats.LoadResult([], kind or "", {}, file)
    counts: dict[str, int] = {}
    reported = 0
    try:
        for line, record in formats.iter_records(file, kind, skip_bad, result=result):
            for bad in result.skipped[reported:]:
                yield _Item(file, bad.line, reason=bad.reason)
            reported = len(result.skipped)
            schema = next((s for s, n in result.schemas.items() if n != counts.get(s, 0)), "")
            counts = dict(result.schemas)
            if isinstance(record, formats.PromptRecord) and not allow_prompts:  # prepare has no output for them
                hint = formats._missing_hint({"prompt": None, **record.columns}, None)
                reason = (f"a prompt record (schema {schema!r}){hint}; data prepare takes text, conversation, "
                          "preference and labelled records")
                if not skip_bad:
                    raise DataError(f"{file}:{line}: {reason}")
                yield _Item(file, line, reason=reason)
                continue
            yield _Item(file, line, record, schema)
    except DataError:
        # A file without a single good record is an error for `formats`; here, with skip_bad, its bad
        # records are counted like any others (and an empty file adds nothing).
        if not skip_bad or result.schemas:
            raise
        if not result.skipped:
            logger.warning("%s: no records", file)
    for bad in result.skipped[reported:]:
        yield _Item(file, bad.line, reason=bad.reason)


def _iter_items(files: Sequence[Path], kind: str | None, skip_bad: bool, per_file_kind: bool = False,
                allow_prompts: bool = False) -> Iterator[_Item]:
    """Every record of `files`; the first valid record fixes the kind unless `kind` is given (or, with
    `per_file_kind`, for each file separately). RL prompt records are bad records unless `allow_prompts`."""
    for file in files:
        if per_file_kind:
            kind = None
        if file.suffix.lower() in JSON_SUFFIXES:
            for item in _iter_json_file(file, kind, skip_bad, allow_prompts):
                if kind is None and item.record is not None:
                    kind = _kind_of(item.record)
                yield item
            continue
        try:
            text = formats.read_text(file)
        except formats.NotUTF8Error as e:
            item = _Item(file, e.line, reason=e.reason)
        else:
            if kind not in (None, "text"):
                item = _Item(file, 1, reason=f"a text file is a text document, but the data are {kind} records")
            else:
                kind = "text"
                item = _Item(file, 1, text, TEXT_FILE_SCHEMA)
        if item.record is None and not skip_bad:
            raise DataError(f"{file}:{item.line}: {item.reason}")
        yield item


def _input_files(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    files: list[Path] = []
    for path in inputs:
        found = find_corpus_files(path)
        for file in found:
            if file.suffix.lower() not in TEXT_SUFFIXES + JSON_SUFFIXES:
                raise DataError(f"{file}: unknown kind of file; expected {', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)}")
        files += found
    if not files:
        raise DataError("no input files given")
    return files


# ---------------------------------------------------------------------------------------- report
@dataclass
class PrepareReport:
    """What `prepare_dataset` read, kept and dropped (per reason, with the first locations)."""

    inputs: list[str]
    out_dir: str
    kind: str | None = None
    read: int = 0
    kept: int = 0
    train: int = 0
    val: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    # reason → up to MAX_EXAMPLES {"file", "line", "detail"}, in reading order
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    schemas: dict[str, int] = field(default_factory=dict)  # schema name → records read
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def locations(self) -> dict[str, list[tuple[str, int]]]:
        """reason → the first (file, line) locations of the records dropped for it."""
        return {reason: [(e["file"], e["line"]) for e in examples] for reason, examples in self.examples.items()}

    def drop(self, reason: str, file: Path | str, line: int, detail: str = "") -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append({"file": str(file), "line": line, "detail": detail})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A readable multi-line summary."""
        lines = [f"prepared {self.kind or 'no'} data from {len(self.inputs)} input(s) into {self.out_dir}",
                 f"  read {self.read}, kept {self.kept} (train {self.train}, val {self.val})"]
        if self.schemas:
            lines.append("  schemas: " + ", ".join(f"{name} {n}" for name, n in self.schemas.items()))
        total = max(self.read, 1)
        for reason in sorted(self.dropped, key=lambda r: REASONS.index(r) if r in REASONS else len(REASONS)):
            lines.append(f"  dropped {reason}: {self.dropped[reason]} ({100 * self.dropped[reason] / total:.1f}%)")
            for e in self.examples.get(reason, []):
                lines.append(f"    {e['file']}:{e['line']}" + (f"  {e['detail']}" if e["detail"] else ""))
            if self.dropped[reason] > len(self.examples.get(reason, [])):
                lines.append("    …")
        if not self.dropped:
            lines.append("  nothing dropped")
        for name, path in self.files.items():
            lines.append(f"  {name}: {path}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------- prepare
class PrepareOptionError(DataError):
    """A `prepare_dataset` option out of range; `option` is the parameter's name, which the message
    starts with (the CLI puts its flag in its place)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option} {message}")
        self.option = option
        self.detail = message


def _check_options(normalize: str | None, min_chars: int, max_chars: int | None, near_dup_threshold: float | None,
                   sample: float | int | None, val_fraction: float) -> None:
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise PrepareOptionError("normalize", f"must be one of {', '.join(NORMALIZATIONS)} or None, got {normalize!r}")
    if min_chars < 0:
        raise PrepareOptionError("min_chars", f"must be >= 0, got {min_chars}")
    if max_chars is not None and max_chars < max(min_chars, 1):
        raise PrepareOptionError("max_chars", f"must be >= min_chars ({min_chars}) and >= 1, got {max_chars}")
    if near_dup_threshold is not None and not 0.0 < near_dup_threshold <= 1.0:
        raise PrepareOptionError("near_dup_threshold", f"must be in (0, 1] or None, got {near_dup_threshold}")
    if sample is not None:
        if isinstance(sample, bool) or not isinstance(sample, (int, float)):
            raise PrepareOptionError("sample", f"must be a fraction in (0, 1], a count >= 1, or None; got {sample!r}")
        if isinstance(sample, float) and not 0.0 < sample <= 1.0:
            raise PrepareOptionError("sample", f"must be a fraction in (0, 1] or a count >= 1, got {sample}")
        if isinstance(sample, int) and sample < 1:
            raise PrepareOptionError("sample", f"must be a fraction in (0, 1] or a count >= 1, got {sample}")
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareOptionError("val_fraction", f"must be in [0, 1), got {val_fraction}")


def prepare_dataset(
    inputs: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    *,
    kind: str | None = None,
    normalize: str | None = "NFC",
    min_chars: int = 1,
    max_chars: int | None = None,
    dedup: bool = True,
    near_dup_threshold: float | None = 0.8,
    sample: float | int | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> PrepareReport:
    """Clean, filter, de-duplicate, sample and split `inputs` (files or directories) into
    `out_dir/train.jsonl` (+ `val.jsonl` when `val_fraction` > 0) and `out_dir/report.json`.

    `kind`: "text", "conversation", "preference", "labelled" or None (from the first valid record);
    every record must be of that one kind. `min_chars`/`max_chars` bound the cleaned length in
    characters. `dedup` drops exact duplicates; `near_dup_threshold` (None: off) drops records whose
    estimated Jaccard similarity to a kept one reaches it. `sample`: a fraction in (0, 1] (a float) or a
    number of records (an int) drawn with `seed` from the survivors, in their original order;
    `val_fraction` of those go to `val.jsonl` (at least one when there are two or more). A bad record
    raises `DataError` naming file and line, or with `skip_bad` is counted as "malformed".

    A non-empty `out_dir` is refused (`OutputExistsError`) before any input is read, unless
    `overwrite`, which replaces it. The outputs are written into a temporary sibling directory that
    takes `out_dir`'s place only when they are complete (`staged_directory`), so a failed or killed
    run leaves nothing half-written. When no record is left to write (empty inputs, every record
    bad, or all filtered out) a `DataError` says why and nothing is written.
    """
    _check_options(normalize, min_chars, max_chars, near_dup_threshold, sample, val_fraction)
    if kind is not None and kind not in formats.KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(formats.KINDS)} or None")
    out_dir = check_output_dir(out_dir, overwrite)
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    files = _input_files(inputs)
    lsh = MinHashLSH(near_dup_threshold) if near_dup_threshold is not None else None
    report = PrepareReport(
        inputs=[str(p) for p in inputs], out_dir=str(out_dir),
        settings={"normalize": normalize, "min_chars": min_chars, "max_chars": max_chars, "dedup": dedup,
                  "near_dup_threshold": near_dup_threshold, "sample": sample, "val_fraction": val_fraction,
                  "seed": seed, "skip_bad": skip_bad},
    )
    if lsh is not None:
        report.settings["minhash"] = {"num_perm": lsh.num_perm, "bands": lsh.bands, "rows": lsh.rows,
                                      "ngram": lsh.ngram}
    sources = {str(f): i for i, f in enumerate(files)}
    names = list(sources)
    seen: dict[bytes, tuple[int, int]] = {}  # exact-duplicate key → (file index, line) of the kept record
    kept_at: list[tuple[int, int]] = []  # LSH index → (file index, line)

    with staged_directory(out_dir, overwrite) as stage:
        fd, survivors_path = tempfile.mkstemp(prefix=".prepare-", suffix=".tmp", dir=stage)
        try:
            survivors = 0
            with os.fdopen(fd, "w", encoding="utf-8") as survivors_file:
                for item in _iter_items(files, kind, skip_bad):
                    report.read += 1
                    if item.record is None:
                        report.drop("malformed", item.file, item.line, item.reason)
                        continue
                    report.kind = report.kind or _kind_of(item.record)
                    report.schemas[item.schema] = report.schemas.get(item.schema, 0) + 1
                    cleaned = _clean_record(item.record, normalize)
                    if cleaned is None:
                        report.drop("empty", item.file, item.line, "nothing left after cleaning")
                        continue
                    obj, content, key = cleaned
                    if len(content) < min_chars:
                        report.drop("too_short", item.file, item.line, f"{len(content)} < {min_chars} characters")
                        continue
                    if max_chars is not None and len(content) > max_chars:
                        report.drop("too_long", item.file, item.line, f"{len(content)} > {max_chars} characters")
                        continue
                    source = sources[str(item.file)]
                    if dedup:
                        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
                        if digest in seen:
                            first = seen[digest]
                            report.drop("duplicate", item.file, item.line, f"of {names[first[0]]}:{first[1]}")
                            continue
                        seen[digest] = (source, item.line)
                    if lsh is not None and not isinstance(item.record, LabelledSequence):
                        signature = lsh.signature(content)
                        match = lsh.query(signature)
                        if match is not None:
                            first = kept_at[match[0]]
                            report.drop("near_duplicate", item.file, item.line,
                                        f"~{match[1]:.2f} similar to {names[first[0]]}:{first[1]}")
                            continue
                        lsh.add(signature)
                        kept_at.append((source, item.line))
                    survivors_file.write(f"{source}\t{item.line}\t{json.dumps(obj, ensure_ascii=False)}\n")
                    survivors += 1
            if report.read and not report.schemas:
                first = report.examples["malformed"][0]
                raise DataError(f"every record is bad ({report.read} read; first: {first['file']}:{first['line']}: "
                                f"{first['detail']}); nothing written")
            _write_outputs(Path(survivors_path), survivors, stage, report, names, sample, val_fraction, seed)
        finally:
            if os.path.exists(survivors_path):
                os.unlink(survivors_path)
        report.files = {name: str(out_dir / Path(path).name) for name, path in report.files.items()}
        atomic_write_json(stage / "report.json", report.to_dict())
    logger.info("%s", report.format())
    return report


def _nothing_left(report: PrepareReport) -> DataError:
    """Why a preparation has no record to write, in one line."""
    inputs = ", ".join(report.inputs)
    if report.read == 0:
        return DataError(f"{inputs}: no records to prepare (empty input); nothing written")
    drops = []
    for reason in sorted(report.dropped, key=lambda r: REASONS.index(r) if r in REASONS else len(REASONS)):
        first = report.examples.get(reason, [])
        where = f" (first: {first[0]['file']}:{first[0]['line']})" if first else ""
        drops.append(f"{reason} {report.dropped[reason]}{where}")
    return DataError(f"{inputs}: no record left to write of {report.read} read (dropped: {', '.join(drops)}); "
                     "nothing written")


def _write_outputs(survivors_path: Path, survivors: int, out_dir: Path, report: PrepareReport, names: list[str],
                   sample: float | int | None, val_fraction: float, seed: int) -> None:
    """Draw the sample and the validation split from the survivors, then write train/val JSONL; a
    `DataError` (`_nothing_left`) when no record would be written."""
    rng = np.random.default_rng(seed)
    if sample is None:
        chosen = np.ones(survivors, dtype=bool)
    else:
        count = min(survivors, sample if isinstance(sample, int) else int(round(sample * survivors)))
        chosen = np.zeros(survivors, dtype=bool)
        chosen[rng.choice(survivors, size=count, replace=False)] = True
    kept = int(chosen.sum())
    n_val = 0
    if val_fraction > 0 and kept >= 2:
        n_val = min(max(int(round(kept * val_fraction)), 1), kept - 1)
    in_val = np.zeros(survivors, dtype=bool)
    in_val[np.flatnonzero(chosen)[rng.choice(kept, size=n_val, replace=False)]] = True

    def lines() -> Iterator[tuple[int, str, str, str]]:
        with open(survivors_path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                source, line_no, payload = line.split("\t", 2)
                yield i, names[int(source)], line_no, payload

    for i, name, line_no, _ in lines():
        if not chosen[i]:
            report.drop("sampled_out", name, int(line_no))
    if kept == 0:
        raise _nothing_left(report)

    def write(split_val: bool) -> Any:
        def writer(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as out:
                for i, _, _, payload in lines():
                    if chosen[i] and in_val[i] == split_val:
                        out.write(payload)
        return writer

    atomic_write(out_dir / "train.jsonl", write(False))
    report.files["train"] = str(out_dir / "train.jsonl")
    if val_fraction > 0:
        atomic_write(out_dir / "val.jsonl", write(True))
        report.files["val"] = str(out_dir / "val.jsonl")
    report.files["report"] = str(out_dir / "report.json")
    report.kept, report.val = kept, n_val
    report.train = kept - n_val


# ---------------------------------------------------------------------------------------- inspect
def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"total": 0, "mean": 0.0, "median": 0.0, "p95": 0.0, "min": 0, "max": 0}
    return {"total": int(values.sum()), "mean": float(values.mean()), "median": float(np.median(values)),
            "p95": float(np.percentile(values, 95)), "min": int(values.min()), "max": int(values.max())}


def _histogram(values: np.ndarray, bins: int, unit: str) -> dict[str, Any]:
    if values.size == 0:
        return {"unit": unit, "edges": [], "counts": []}
    lo, hi = int(values.min()), int(values.max())
    # few distinct lengths: one bin per length rather than bins narrower than 1
    edges_or_bins = np.append(np.arange(lo, hi + 1), hi + 0.5) if hi - lo + 1 <= bins else max(1, bins)
    counts, edges = np.histogram(values, bins=edges_or_bins)
    return {"unit": unit, "edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _inspect_shards(path: Path, bins: int) -> dict[str, Any]:
    shards = TokenShards(path)
    meta = shards.meta
    eos = meta.get("eos_token_id")
    lengths: list[np.ndarray] = []
    carry = 0  # tokens of a document continued from the previous shard
    if eos is not None:
        for array in shards._arrays:
            for start in range(0, array.size, 1 << 24):
                block = array[start:start + (1 << 24)]
                ends = np.flatnonzero(block == eos)
                if ends.size:
                    sizes = np.diff(np.concatenate([[-1], ends])) - 1  # tokens before each EOS
                    sizes[0] += carry
                    lengths.append(sizes + 1)  # with the EOS
                    carry = block.size - 1 - int(ends[-1])
                else:
                    carry += block.size
    per_doc = np.concatenate(lengths) if lengths else np.empty(0, dtype=np.int64)
    return {
        "path": str(path), "type": "token_shards", "dtype": meta["dtype"], "tokens": int(meta["num_tokens"]),
        "documents": int(meta["num_documents"]), "records": int(meta["num_documents"]),
        "vocab_size": meta.get("vocab_size"), "num_shards": len(meta["shards"]),
        "bytes": int(sum(s["num_tokens"] for s in meta["shards"]) * np.dtype(meta["dtype"]).itemsize),
        "source": meta.get("source", ""), "segments": int(per_doc.size),
        "tokens_per_document": _stats(per_doc), "histogram": _histogram(per_doc, bins, "tokens"),
    }


def inspect_dataset(path: str | Path, tokenizer: Any = None, bins: int = 10) -> dict[str, Any]:
    """Statistics of a dataset: a text file, a JSONL/JSON file, a directory of them, or a token shard
    directory (its `meta.json`: tokens, documents, dtype; and tokens per EOS-delimited document).

    For records: counts per kind and per schema, bad records, length in characters (and in tokens when
    `tokenizer` is given; for conversations and preferences, of the joined message contents, without a
    chat template) as total/mean/median/p95/min/max, and a histogram of the character lengths whose
    counts sum to the number of records. `format_inspection` renders the result. A dataset without a
    single valid record (an empty file, a blank text file, every record bad) raises `DataError` naming
    the first bad record's file and line and how many were bad."""
    path = Path(path)
    if path.is_dir() and (path / META_FILE).is_file():
        return _inspect_shards(path, bins)
    files = _input_files(path)
    kinds: Counter[str] = Counter()
    schemas: Counter[str] = Counter()
    bad: list[str] = []
    chars: list[int] = []
    tokens: list[int] = []
    pending: list[str] = []  # record contents waiting to be tokenized, in order
    split_exactly = tokenizer is not None and splits_exactly(tokenizer)
    protect = list(getattr(tokenizer, "special_tokens", ()) or ())

    def encode_pending() -> None:
        tokens.extend(len(ids) for ids in tokenizer.encode_batch(pending))
        pending.clear()

    for file in files:
        if file.suffix.lower() in TEXT_SUFFIXES:
            try:
                chars_in_file, tokens_in_file, blank = _measure_text_file(file, tokenizer)
            except DataError as e:
                bad.append(str(e))
                continue
            if blank:
                bad.append(f"{file}: empty text file (no non-blank character)")
                continue
            kinds["text"] += 1
            schemas[TEXT_FILE_SCHEMA] += 1
            chars.append(chars_in_file)
            if tokenizer is not None:
                encode_pending()  # keep the token counts in record order
                tokens.append(tokens_in_file)
            continue
        try:
            for item in _iter_items([file], None, skip_bad=True, per_file_kind=True, allow_prompts=True):
                if item.record is None:
                    bad.append(f"{item.file}:{item.line}: {item.reason}")
                    continue
                kinds[_kind_of(item.record)] += 1
                schemas[item.schema] += 1
                content = _content(item.record)
                chars.append(len(content))
                if tokenizer is not None and len(content) > DOCUMENT_SPLIT_CHARS and split_exactly:
                    encode_pending()  # a huge record: counted part by part (the same count, bounded memory)
                    parts = [part.text for part in split_document(content, True, protect)]
                    tokens.append(sum(len(ids) for i in range(0, len(parts), 64)
                                      for ids in tokenizer.encode_batch(parts[i:i + 64])))
                elif tokenizer is not None:
                    pending.append(content)
                    if len(pending) >= 256:
                        encode_pending()
        except DataError as e:  # e.g. a file in which every record is bad
            bad.append(str(e))
    if tokenizer is not None and pending:
        encode_pending()
    if not chars:  # nothing to summarise: say why, naming the file (and line) at fault
        if bad:
            raise DataError(f"{path}: no valid record; {len(bad)} bad (first: {bad[0]})")
        raise DataError(f"{path}: no records (empty)")
    char_array = np.asarray(chars, dtype=np.int64)
    result: dict[str, Any] = {
        "path": str(path), "type": "records", "files": len(files), "records": len(chars),
        "kinds": dict(kinds), "schemas": dict(schemas), "bad_records": len(bad), "bad_examples": bad[:MAX_EXAMPLES],
        "chars": _stats(char_array), "histogram": _histogram(char_array, bins, "characters"),
    }
    if tokenizer is not None:
        result["tokens"] = _stats(np.asarray(tokens, dtype=np.int64))
    return result


def _measure_text_file(file: Path, tokenizer: Any) -> tuple[int, int, bool]:
    """Characters and tokens of a text file, streamed in parts (a text file may be huge), and whether
    it is blank (empty or only whitespace)."""
    exact = tokenizer is None or splits_exactly(tokenizer)
    protect = list(getattr(tokenizer, "special_tokens", ()) or ())
    parts = iter_document_parts(file, chunk_chars=TEXT_CHUNK_CHARS if exact else None, protect=protect)
    num_chars = num_tokens = 0
    blank = True
    batch: list[str] = []
    for part in parts:
        num_chars += len(part.text)
        blank = blank and (not part.text or part.text.isspace())
        if tokenizer is not None:
            batch.append(part.text)
            if len(batch) >= 64 or part.end:
                num_tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
                batch = []
    return num_chars, num_tokens, blank


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:,.1f}"


def format_inspection(d: dict[str, Any], width: int = 40) -> str:
    """A readable summary of `inspect_dataset`'s result, with an ASCII length histogram."""
    lines = [f"dataset: {d['path']}"]

    def stats_line(name: str, s: dict[str, float]) -> str:
        return (f"{name}: total {_number(s['total'])}  mean {_number(s['mean'])}  median {_number(s['median'])}  "
                f"p95 {_number(s['p95'])}  max {_number(s['max'])}")

    if d["type"] == "token_shards":
        lines.append(f"token shards: {d['tokens']:,} tokens ({d['dtype']}, vocabulary {d['vocab_size']}), "
                     f"{d['documents']:,} documents in {d['num_shards']} shard(s), {d['bytes'] / 1e6:.1f} MB")
        if d["segments"]:
            lines.append(stats_line("tokens per document", d["tokens_per_document"]))
    else:
        kinds = ", ".join(f"{k} {n:,}" for k, n in d["kinds"].items()) or "none"
        schemas = ", ".join(f"{k} {n:,}" for k, n in d["schemas"].items()) or "none"
        lines.append(f"records: {d['records']:,} in {d['files']} file(s) ({kinds}; schemas: {schemas})")
        if d["bad_records"]:
            lines.append(f"bad records: {d['bad_records']}")
            lines += [f"  {example}" for example in d["bad_examples"]]
        lines.append(stats_line("characters", d["chars"]))
        if "tokens" in d:
            lines.append(stats_line("tokens", d["tokens"]))
    histogram = d.get("histogram") or {}
    counts, edges = histogram.get("counts") or [], histogram.get("edges") or []
    if counts:
        lines.append(f"length histogram ({histogram['unit']}):")
        peak = max(counts)
        # lengths are whole numbers: bin i holds ceil(edge i) .. ceil(edge i+1) - 1 (the last one up to its edge)
        lows = [math.ceil(e) for e in edges[:-1]]
        highs = [math.ceil(e) - 1 for e in edges[1:-1]] + [math.floor(edges[-1])]
        labels = [f"{lo:,} - {hi:,}" if hi > lo else f"{lo:,}" if hi == lo else "-" for lo, hi in zip(lows, highs)]
        pad = max(len(label) for label in labels)
        for label, count in zip(labels, counts):
            bar = "#" * (round(width * count / peak) if peak else 0)
            lines.append(f"  {label:>{pad}} | {bar} {count:,}")
    return "\n".join(lines)
