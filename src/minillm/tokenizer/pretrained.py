"""Ready-made tokenizers: OpenAI tiktoken encodings (`gpt2`, `cl100k_base`, ...) and saved Hugging Face
`tokenizer.json` files, all returned as a `BPETokenizer` so the rest of the framework sees one class.

A tiktoken encoding is *converted* into an ordinary Hugging Face byte-level BPE (`tokenizers` library):

* vocabulary: every mergeable token's bytes, written in the GPT-2 byte-to-unicode alphabet that the
  `ByteLevel` pre-tokenizer produces, with its tiktoken rank as id;
* merges: tiktoken has none, only ranks, and merges the adjacent pair whose concatenation has the
  lowest rank. Every split `token = left + right` with both halves in the vocabulary becomes a merge,
  ordered by the rank of `token`, so the Rust BPE merges in the same order;
* `ignore_merges`: like tiktoken, a pre-tokenized piece that is itself a token is emitted whole;
* pre-tokenizer: the encoding's split regex, translated to the Oniguruma dialect that `tokenizers`
  runs (see `translate_tiktoken_pattern`), then `ByteLevel` without its own regex;
* special tokens (`<|endoftext|>`, ...) keep their tiktoken ids; ids that tiktoken leaves unused
  (cl100k_base has none at 100256 and 100261-100275) are filled with placeholder tokens that no
  text can produce, so that every id keeps its meaning and the vocabulary size equals tiktoken's
  `n_vocab`.

The result encodes every text to the ids of `tiktoken.get_encoding(name).encode(text,
allowed_special="all")`, saves as a normal `tokenizer.json` that `transformers.AutoTokenizer` loads,
and carries `<|endoftext|>` as EOS, BOS and PAD (these encodings have no other document or padding
token; GPT-2 itself uses <|endoftext|> for all three). As with every `BPETokenizer`,
`encode(text, add_special_tokens=True)` prepends the BOS.

Known differences: decoding a filler id gives its placeholder text (tiktoken raises KeyError); and in
theory, when one piece holds two equal-rank candidate pairs that are different splits of the same
token, tiktoken merges the leftmost while the Rust BPE merges the split listed first (the same
limitation as transformers' TikTokenConverter; not observed in fuzzing).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from minillm.errors import CheckpointError, MiniLLMError
from minillm.tokenizer.bpe_tokenizer import EOS_TOKEN, UNLIMITED_LENGTH, BPETokenizer

logger = logging.getLogger("minillm.tokenizer")

# The encodings `load_tokenizer` documents; `load_tiktoken` takes any name tiktoken knows.
TIKTOKEN_ENCODINGS: tuple[str, ...] = ("gpt2", "cl100k_base")

_OPENAI = "https://openaipublic.blob.core.windows.net"
# The files tiktoken downloads on first use (tiktoken_ext/openai_public.py), for the offline error message.
TIKTOKEN_FILES: dict[str, tuple[str, ...]] = {
    "gpt2": (f"{_OPENAI}/gpt-2/encodings/main/vocab.bpe", f"{_OPENAI}/gpt-2/encodings/main/encoder.json"),
    "r50k_base": (f"{_OPENAI}/encodings/r50k_base.tiktoken",),
    "p50k_base": (f"{_OPENAI}/encodings/p50k_base.tiktoken",),
    "p50k_edit": (f"{_OPENAI}/encodings/p50k_base.tiktoken",),
    "cl100k_base": (f"{_OPENAI}/encodings/cl100k_base.tiktoken",),
    "o200k_base": (f"{_OPENAI}/encodings/o200k_base.tiktoken",),
    "o200k_harmony": (f"{_OPENAI}/encodings/o200k_base.tiktoken",),
}


class TokenizerLoadError(MiniLLMError, RuntimeError):
    """A tokenizer could not be loaded: unknown name, missing file, or an encoding not available offline."""


# ---------------------------------------------------------------------------------------- conversion
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-to-character table that the `ByteLevel` pre-tokenizer and decoder use: printable
    Latin-1 bytes stand for themselves, the other 68 bytes for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


_QUANTIFIER = re.compile(r"\{\d+(?:,\d*)?\}")


def _escape_end(pattern: str, i: int) -> int:
    """End of the escape sequence starting at pattern[i] == '\\'."""
    if i + 1 >= len(pattern):
        return len(pattern)
    kind = pattern[i + 1]
    j = i + 2
    if kind in "pPxuU" and j < len(pattern) and pattern[j] == "{":
        return pattern.index("}", j) + 1
    if kind in "pP":
        return min(j + 1, len(pattern))  # \pL
    hex_digits = {"x": 2, "u": 4, "U": 8}.get(kind, 0)
    return min(j + hex_digits, len(pattern))


def _class_end(pattern: str, i: int) -> int:
    """End of the (possibly nested) character class starting at pattern[i] == '['."""
    j = i + 1
    if j < len(pattern) and pattern[j] == "^":
        j += 1
    if j < len(pattern) and pattern[j] == "]":  # a ']' right at the start is literal
        j += 1
    while j < len(pattern):
        c = pattern[j]
        if c == "\\":
            j = _escape_end(pattern, j)
        elif c == "[":
            j = _class_end(pattern, j)
        elif c == "]":
            return j + 1
        else:
            j += 1
    raise ValueError(f"unterminated character class in regex {pattern!r}")


def translate_tiktoken_pattern(pattern: str) -> str:
    """Rewrite a tiktoken split regex (Rust `fancy-regex` syntax) for Oniguruma, which `tokenizers` runs.

    Two constructs mean something else in Oniguruma's default (Ruby) syntax:
    * `x{1,3}+` is possessive in fancy-regex but "one or more of x{1,3}" in Ruby syntax (cl100k's
      `\\p{N}{1,3}+` would glue any run of digits together); it becomes the atomic group `(?>x{1,3})`.
      (`?+`, `*+`, `++` are possessive in both.)
    * `$` and `^` match only at the end/start of the text in fancy-regex (no multi-line flag), but at
      every line end/start in Ruby syntax; they become `\\z` and `\\A`.
    """
    out: list[str] = []  # pieces of the translated pattern
    groups: list[int] = []  # index in `out` where each open group starts
    last_atom: int | None = None  # index in `out` where the atom a quantifier applies to starts
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            j = _escape_end(pattern, i)
            last_atom = len(out)
            out.append(pattern[i:j])
            i = j
        elif c == "[":
            j = _class_end(pattern, i)
            last_atom = len(out)
            out.append(pattern[i:j])
            i = j
        elif c == "(":
            groups.append(len(out))
            out.append(c)
            last_atom = None
            i += 1
        elif c == ")":
            out.append(c)
            last_atom = groups.pop() if groups else None
            i += 1
        elif c == "{" and (m := _QUANTIFIER.match(pattern, i)):
            j = m.end()
            if j < len(pattern) and pattern[j] == "+" and last_atom is not None:
                out[last_atom:] = ["(?>" + "".join(out[last_atom:]) + m.group(0) + ")"]
                j += 1
            else:
                out.append(m.group(0))
            i = j
        elif c in "$^":
            out.append(r"\z" if c == "$" else r"\A")
            last_atom = None
            i += 1
        elif c in "?*+|":
            out.append(c)
            if c == "|":
                last_atom = None
            i += 1
        else:
            last_atom = len(out)
            out.append(c)
            i += 1
    return "".join(out)


def _unused_token(token_id: int) -> str:
    # The space makes it unreachable: the ByteLevel pre-tokenizer writes a space as "Ġ", so no text
    # ever becomes this string, and it is not an added token either.
    return f"<|unused {token_id}|>"


def tiktoken_to_backend(
    mergeable_ranks: Mapping[bytes, int], pattern: str, special_tokens: Mapping[str, int],
    bos_token: str | None = EOS_TOKEN,
) -> Tokenizer:
    """Build the `tokenizers.Tokenizer` equivalent to a tiktoken encoding (see the module docstring)."""
    byte_char = bytes_to_unicode()

    def as_unicode(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    missing_bytes = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
    if missing_bytes:
        raise ValueError(f"the encoding lacks {len(missing_bytes)} of the 256 single-byte tokens "
                         f"(e.g. {bytes(missing_bytes[:5])!r}); a byte-level BPE needs them all")
    vocab: dict[str, int] = {as_unicode(token): rank for token, rank in mergeable_ranks.items()}
    for name, token_id in special_tokens.items():
        if name in vocab:
            raise ValueError(f"special token {name!r} is also an ordinary token of the encoding")
        vocab[name] = token_id
    by_id: dict[int, str] = {}
    for token, token_id in vocab.items():
        if token_id in by_id:
            raise ValueError(f"tokens {by_id[token_id]!r} and {token!r} share id {token_id}")
        by_id[token_id] = token
    for token_id in range(max(by_id) + 1):
        if token_id not in by_id:
            vocab[_unused_token(token_id)] = token_id

    # tiktoken merges the adjacent pair (left, right) whose concatenation has the lowest rank; here each
    # such split of a token is a merge, ordered by the token's rank (then by the halves' ranks, so the
    # order is deterministic when one token has several splits).
    splits: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in mergeable_ranks.items():
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            left_rank, right_rank = mergeable_ranks.get(left), mergeable_ranks.get(right)
            if left_rank is not None and right_rank is not None:
                splits.append((rank, left_rank, right_rank, left, right))
    splits.sort(key=lambda s: s[:3])
    merges = [(as_unicode(left), as_unicode(right)) for *_, left, right in splits]

    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(translate_tiktoken_pattern(pattern)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    # Already in the model's vocabulary, so they keep their ids; as added tokens they are matched in
    # the raw text first, like tiktoken's allowed_special="all".
    backend.add_special_tokens([AddedToken(name, special=True, normalized=False)
                                for name, _ in sorted(special_tokens.items(), key=lambda kv: kv[1])])
    if bos_token is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token}:1 $B:1",
            special_tokens=[(bos_token, special_tokens[bos_token])],
        )
    return backend


def from_tiktoken_encoding(encoding: Any) -> BPETokenizer:
    """Convert a `tiktoken.Encoding` (any: a built-in one or one built by hand) into a `BPETokenizer`
    whose `encode(text)` equals `encoding.encode(text, allowed_special="all")`.

    EOS, BOS and PAD are all `<|endoftext|>`; the encoding must have it as a special token.
    """
    ranks = getattr(encoding, "_mergeable_ranks", None)
    special = getattr(encoding, "_special_tokens", None)
    pattern = getattr(encoding, "_pat_str", None)
    if ranks is None or special is None or pattern is None:
        raise TypeError(f"expected a tiktoken.Encoding, got {type(encoding).__name__}")
    if EOS_TOKEN not in special:
        raise ValueError(f"tiktoken encoding {encoding.name!r} has no {EOS_TOKEN} special token "
                         f"(its special tokens: {sorted(special)})")
    backend = tiktoken_to_backend(ranks, pattern, special, bos_token=EOS_TOKEN)
    tokenizer = BPETokenizer()
    tokenizer.special_tokens = [name for name, _ in sorted(special.items(), key=lambda kv: kv[1])]
    tokenizer.eos_token = tokenizer.bos_token = tokenizer.pad_token = EOS_TOKEN
    tokenizer.chat_template = None
    tokenizer.model_max_length = UNLIMITED_LENGTH
    tokenizer.target_vocab_size = backend.get_vocab_size(with_added_tokens=True)
    tokenizer._backend = backend
    logger.info("converted tiktoken encoding %r (%d tokens)", encoding.name, tokenizer.vocab_size)
    return tokenizer


# ---------------------------------------------------------------------------------------- loading
def _import_tiktoken() -> Any:
    try:
        import tiktoken
    except ImportError:
        raise TokenizerLoadError("tiktoken encodings need the tiktoken package: pip install tiktoken") from None
    return tiktoken


def _tiktoken_cache_dir() -> str | None:
    """Where tiktoken looks for downloaded files (mirrors tiktoken.load.read_file_cached); None: no cache."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return os.environ[variable] or None
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _offline_error(name: str, error: BaseException) -> TokenizerLoadError:
    cache_dir = _tiktoken_cache_dir()
    files = TIKTOKEN_FILES.get(name, ())
    if cache_dir is None:
        where = "caching is disabled (TIKTOKEN_CACHE_DIR is empty), so its files must be downloaded"
    else:
        cached = {url: os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()) for url in files}
        missing = [url for url, path in cached.items() if not os.path.exists(path)]
        if missing:
            where = "its file " + " and ".join(f"{url} is not in the tiktoken cache (expected at {cached[url]})"
                                               for url in missing)
        elif cached:
            where = f"its cached files {', '.join(cached.values())} are unusable (corrupted or unreadable)"
        else:
            where = f"its files are not in the tiktoken cache {cache_dir}"
    return TokenizerLoadError(
        f"tiktoken encoding {name!r} is not available offline: {where}, and downloading it failed "
        f"({type(error).__name__}: {error}). tiktoken downloads an encoding's file from the internet the "
        f"first time it is used and then caches it. To use it without internet: run "
        f"`python -c \"import tiktoken; tiktoken.get_encoding('{name}')\"` once on a machine that is online "
        f"with TIKTOKEN_CACHE_DIR set to some directory, copy that directory here and set TIKTOKEN_CACHE_DIR "
        f"to it (a file must be stored under the sha1 hex digest of its URL, as named above); or run once "
        f"here while online."
    )


def load_tiktoken(name: str) -> BPETokenizer:
    """A tiktoken encoding by name ("gpt2", "cl100k_base", ...) as a `BPETokenizer` with identical ids.

    Raises `TokenizerLoadError` (a RuntimeError) when the encoding's file is neither cached nor downloadable.
    """
    tiktoken = _import_tiktoken()
    names = tiktoken.list_encoding_names()
    if name not in names:
        raise TokenizerLoadError(f"unknown tiktoken encoding {name!r}; known: {', '.join(sorted(names))}")
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as e:  # requests' network errors, a cache miss with no network, a hash mismatch, ...
        raise _offline_error(name, e) from e
    return from_tiktoken_encoding(encoding)


def load_tokenizer(spec: str | Path) -> BPETokenizer:
    """Load a tokenizer from any of the accepted forms:

    * a directory containing tokenizer.json (saved by `BPETokenizer.save_pretrained`, or any Hugging Face
      tokenizer directory) -> `BPETokenizer.from_pretrained`;
    * a path to a tokenizer.json file -> `BPETokenizer.from_file`;
    * a tiktoken encoding name, "gpt2" or "cl100k_base" (other tiktoken names work too) -> `load_tiktoken`.

    A path that exists wins over a tiktoken name of the same spelling.
    """
    path = Path(spec).expanduser()
    problem = f"{str(spec)!r} is neither an existing path nor a tiktoken encoding name"
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return BPETokenizer.from_pretrained(path)
        problem = f"directory {str(path)!r} has no tokenizer.json"
    elif path.is_file():
        try:
            return BPETokenizer.from_file(path)
        except CheckpointError as e:  # names the file and what is wrong with it
            raise TokenizerLoadError(str(e)) from e
    if isinstance(spec, str):
        try:
            tiktoken_names = _import_tiktoken().list_encoding_names()
        except TokenizerLoadError:
            tiktoken_names = list(TIKTOKEN_ENCODINGS)
        if spec in tiktoken_names:
            return load_tiktoken(spec)
    raise TokenizerLoadError(
        f"cannot load tokenizer {str(spec)!r}: {problem}. Accepted forms: a tiktoken encoding name "
        f"({', '.join(repr(n) for n in TIKTOKEN_ENCODINGS)}); a directory containing tokenizer.json "
        f"(e.g. saved by `minillm tokenizer train --out DIR`); or the path of a tokenizer.json file."
    )
