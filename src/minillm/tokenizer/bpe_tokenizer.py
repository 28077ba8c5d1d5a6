"""Byte-level BPE tokenizer for mixed Chinese/English text, built on the Rust `tokenizers` library.

Byte-level means every string maps to ids and back unchanged (emoji, rare CJK, control characters),
with no `<unk>`. The saved directory is an ordinary Hugging Face tokenizer directory, so
`transformers.AutoTokenizer.from_pretrained(dir)` gives the same ids.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from minillm.checkpoint_files import check_directory, json_kind, read_json_object, read_text, require_file
from minillm.errors import CheckpointError, DataError
from minillm.io import atomic_write_json, atomic_write_text
from minillm.tokenizer.chat import CHAT_TEMPLATES, DEFAULT_CHAT_TEMPLATE, render_chat_for

logger = logging.getLogger("minillm.tokenizer")

EOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)

BYTE_ALPHABET_SIZE = 256
# What transformers writes when a tokenizer has no length limit of its own.
UNLIMITED_LENGTH = int(1e30)

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}"
# Qwen2/GPT-4 style, changed for Chinese: runs of CJK characters form their own pieces (so merges learn
# common words and never glue them to Latin letters or punctuation), every digit is its own piece (the
# built-in arithmetic data needs single-digit tokens), and a word takes at most one leading ASCII
# space/punctuation so that "，" and "。" stay separate tokens.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    rf"|[{_CJK}]+"
    rf"|[\x00-\x7F&&[^\r\n\p{{L}}\p{{N}}]]?[\p{{L}}\p{{M}}&&[^{_CJK}]]+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


def _adapted_vocab_size(requested: int, num_special_tokens: int) -> int:
    """Byte-level BPE cannot go below 256 byte symbols plus the specials; round up with a margin."""
    minimum = BYTE_ALPHABET_SIZE + num_special_tokens
    if requested >= minimum:
        return requested
    adapted = math.ceil(minimum / 64) * 64
    logger.warning(
        "vocab_size=%d is too small for byte-level BPE (it needs %d byte symbols + %d special tokens); "
        "using vocab_size=%d instead",
        requested, BYTE_ALPHABET_SIZE, num_special_tokens, adapted,
    )
    return adapted


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores a token as a string, as {"content": ...}, or as null."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _has_text(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return any(chunk.strip() for chunk in iter(lambda: f.read(1 << 20), ""))


# Training memory grows with the distinct words the trainer sees: about 100-150 bytes per character of
# text in which nearly every word is new, far less for ordinary text. So `train` reads at most the
# first TRAIN_MAX_TEXT_CHARS characters of one text and TRAIN_MAX_TOTAL_CHARS in all (a sample this
# size is plenty for the merges of a small vocabulary), and hands them to the trainer in pieces of at
# most TRAIN_PIECE_CHARS characters: the pre-tokenizer's bookkeeping costs many bytes per byte of the
# string it is given, so one 50 MB line alone would take gigabytes.
TRAIN_MAX_TEXT_CHARS = 1 << 21
TRAIN_MAX_TOTAL_CHARS = 1 << 24
TRAIN_PIECE_CHARS = 1 << 13
# Where a piece may end: before whitespace or a punctuation mark (the pre-tokenizer starts a new word
# there anyway, so the pieces give nearly the same word counts as the whole text).
_PIECE_BREAKS = " \n\t\u3000，。、！？；：,.!?;:"


def _is_blank(text: str) -> bool:
    return not text or text.isspace()  # no stripped copy of a huge text


def training_pieces(text: str, piece_chars: int = TRAIN_PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `piece_chars` characters, each cut before the last
    whitespace or punctuation mark in the second half of its span (or, in text without one, at the
    limit); joined they give `text` back."""
    start = 0
    while len(text) - start > piece_chars:
        hi = start + piece_chars
        cut = max(text.rfind(c, start + piece_chars // 2, hi) for c in _PIECE_BREAKS)
        if cut <= start:
            cut = hi
        yield text[start:cut]
        start = cut
    yield text[start:] if start else text


class BPETokenizer:
    """Byte-level BPE with the special tokens `<|endoftext|>` (0), `<|im_start|>` (1), `<|im_end|>` (2),
    `<|pad|>` (3). Extra `special_tokens` are added after these four, which are always kept so that the
    ids the rest of the framework relies on never move.
    """

    def __init__(self, vocab_size: int = 6400, special_tokens: list[str] | None = None, min_frequency: int = 2):
        self.special_tokens: list[str] = list(dict.fromkeys([*SPECIAL_TOKENS, *(special_tokens or [])]))
        self.target_vocab_size = _adapted_vocab_size(vocab_size, len(self.special_tokens))
        self.min_frequency = min_frequency
        self.bos_token: str | None = EOS_TOKEN  # GPT-2 style: one token marks both document ends
        self.eos_token: str | None = EOS_TOKEN
        self.pad_token: str | None = PAD_TOKEN
        # Every new tokenizer carries a template, so every saved one does; loading keeps the file's own.
        self.chat_template: str | None = CHAT_TEMPLATES[DEFAULT_CHAT_TEMPLATE]
        self.model_max_length: int = UNLIMITED_LENGTH
        self._backend: Tokenizer | None = None

    # ----------------------------------------------------------------------------------- training

    def _new_backend(self) -> tuple[Tokenizer, trainers.BpeTrainer]:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        # No normalizer: any normalization would break decode(encode(s)) == s.
        trainer = trainers.BpeTrainer(
            vocab_size=self.target_vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in self.special_tokens],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            # Off a terminal the Rust progress bar only prints stray blank lines into logs.
            show_progress=sys.stdout.isatty(),
        )
        return backend, trainer

    def _finish_training(self, backend: Tokenizer) -> None:
        # The BOS comes from the post-processor (not from Python code) so that transformers, which
        # runs the same tokenizer.json, adds it under exactly the same conditions.
        bos_id = backend.token_to_id(self.bos_token)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{self.bos_token} $A",
            pair=f"{self.bos_token} $A {self.bos_token}:1 $B:1",
            special_tokens=[(self.bos_token, bos_id)],
        )
        self._backend = backend
        logger.info("trained byte-level BPE with %d tokens", self.vocab_size)

    def train(self, texts: Iterable[str], *, source: str = "", max_text_chars: int | None = TRAIN_MAX_TEXT_CHARS,
              max_total_chars: int | None = TRAIN_MAX_TOTAL_CHARS) -> None:
        """Train on an iterable of strings (streamed: a generator over a large corpus is fine).

        Memory stays bounded however the corpus is laid out: only the first `max_text_chars` characters
        of a text and the first `max_total_chars` characters in all are read (None: no limit), and they
        reach the trainer in pieces of at most `TRAIN_PIECE_CHARS` characters (`training_pieces`); texts
        shorter than that reach it whole. Blank texts are skipped; with none left, a `DataError`
        (a ValueError) is raised, naming `source` (e.g. the corpus path) when given."""
        if isinstance(texts, str):
            raise TypeError("train() expects an iterable of texts; wrap a single text in a list")
        for name, limit in (("max_text_chars", max_text_chars), ("max_total_chars", max_total_chars)):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be at least 1 or None, got {limit}")
        seen = {"texts": 0, "chars": 0, "cut": 0}

        def pieces() -> Iterator[str]:
            for text in texts:
                if not isinstance(text, str):
                    raise TypeError(f"train() expects texts (str), got {type(text).__name__}")
                if _is_blank(text):
                    continue
                limit = max_text_chars if max_text_chars is not None else len(text)
                if max_total_chars is not None:
                    limit = min(limit, max_total_chars - seen["chars"])
                if len(text) > limit:
                    text = text[:limit]
                    seen["cut"] += 1
                seen["texts"] += 1
                seen["chars"] += len(text)
                yield from training_pieces(text)
                del text
                if max_total_chars is not None and seen["chars"] >= max_total_chars:
                    logger.info("tokenizer training stops at %d characters (max_total_chars)", max_total_chars)
                    return

        stream = pieces()
        first = next(stream, None)
        if first is None:
            where = f"{source}: empty corpus" if source else "cannot train a tokenizer on an empty corpus"
            raise DataError(f"{where}: no non-blank document to train a tokenizer on")
        backend, trainer = self._new_backend()
        backend.train_from_iterator(itertools.chain([first], stream), trainer=trainer)
        if seen["cut"]:
            logger.info("tokenizer trained on %d texts, %d characters (%d cut short: max_text_chars=%s, "
                        "max_total_chars=%s)", seen["texts"], seen["chars"], seen["cut"], max_text_chars,
                        max_total_chars)
        self._finish_training(backend)

    def train_from_files(self, paths: Sequence[str | Path]) -> None:
        """Train on UTF-8 text files, read by the Rust library (faster than reading them in Python)."""
        paths = [Path(p) for p in paths]
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"training file not found: {path}")
        if not any(_has_text(p) for p in paths):
            raise ValueError(f"cannot train a tokenizer on an empty corpus: no text in {[str(p) for p in paths]}")
        backend, trainer = self._new_backend()
        backend.train([str(p) for p in paths], trainer=trainer)
        self._finish_training(backend)

    # ----------------------------------------------------------------------------------- encoding

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`; raises until the tokenizer is trained or loaded."""
        if self._backend is None:
            raise RuntimeError("the tokenizer is not trained yet: call train() or BPETokenizer.from_pretrained()")
        return self._backend

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text to ids; special-token strings in the text become their ids. BOS is prepended on request."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts at once in parallel Rust threads (much faster than a Python loop)."""
        # encode_batch_fast skips computing character offsets, which nothing here uses.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Ids (a list, or a 1-D torch tensor / numpy array) back to text."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if any(isinstance(i, (list, tuple)) for i in ids):
            raise ValueError("decode() expects a 1-D sequence of ids; decode each row of a batch separately")
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = False, tokenize: bool = True,
                            chat_template: str | None = None) -> list[int] | str:
        """Render a conversation (`Message`s, a `Conversation` or role/content dicts) with the chat
        template (`chat_template`: a name such as "chatml" or "tags", or a Jinja string; default: this
        tokenizer's) and return its ids, or the text when `tokenize=False`, as transformers does.
        For training masks use `minillm.tokenizer.chat.encode_chat`."""
        text = render_chat_for(self, messages, add_generation_prompt, chat_template)
        return self.encode(text) if tokenize else text

    # ----------------------------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        """Size of the trained vocabulary, special tokens included (the target size until trained)."""
        if self._backend is None:
            return self.target_vocab_size
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self.token_to_id(tokens)
        return [self.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def _id_or_none(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_or_none(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_or_none(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_or_none(self.pad_token)

    @property
    def im_start_id(self) -> int | None:
        return self.token_to_id(IM_START_TOKEN)

    @property
    def im_end_id(self) -> int | None:
        return self.token_to_id(IM_END_TOKEN)

    @property
    def special_token_ids(self) -> set[int]:
        return {i for i in (self.token_to_id(t) for t in self.special_tokens) if i is not None}

    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer.json: token shards carry it so that data tokenized with a
        different tokenizer is refused instead of silently training on wrong ids."""
        canonical = json.dumps(json.loads(self.backend.to_str()), sort_keys=True, ensure_ascii=False,
                               separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # ----------------------------------------------------------------------------------- save / load

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (a Hugging Face
        tokenizer directory that `AutoTokenizer.from_pretrained` loads with identical ids)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        roles = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        extra = [t for t in self.special_tokens if t not in roles.values()]
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **roles,
            "unk_token": None,
            "additional_special_tokens": extra,
            "model_max_length": self.model_max_length,
            # Informational: loaders with a tokenizer.json (transformers) take BOS from its post-processor.
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        special_map = {k: v for k, v in roles.items() if v is not None} | {"additional_special_tokens": extra}
        atomic_write_text(directory / "tokenizer.json", self.backend.to_str(pretty=True))
        atomic_write_json(directory / "tokenizer_config.json", config)
        atomic_write_json(directory / "special_tokens_map.json", special_map)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> BPETokenizer:
        """Load a directory written by `save_pretrained`, or any Hugging Face directory with a
        tokenizer.json (special-token roles are read from its tokenizer_config.json when present).
        A missing or malformed file is a `CheckpointError` naming it."""
        directory = check_directory(directory, "tokenizer directory")
        config_path = directory / "tokenizer_config.json"
        config = read_json_object(config_path) if config_path.exists() else {}
        _check_tokenizer_config(config, config_path)
        template_path = directory / "chat_template.jinja"
        if template_path.exists():
            config.setdefault("chat_template", read_text(template_path))
        return cls._load(directory / "tokenizer.json", config)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """Load a bare tokenizer.json file."""
        return cls._load(Path(path), {})

    @classmethod
    def _load(cls, path: Path, config: dict[str, Any]) -> BPETokenizer:
        require_file(path)
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust loader raises a bare Exception for any malformed file
            detail = " ".join(str(e).split()) or type(e).__name__
            raise CheckpointError(f"{path}: not a valid tokenizer.json file ({detail})") from e
        tokenizer = cls()
        added = sorted(backend.get_added_tokens_decoder().items())
        tokenizer.special_tokens = [token.content for _, token in added if token.special]
        vocab = backend.get_vocab(with_added_tokens=True)

        def role(key: str, default: str | None) -> str | None:
            if key in config:
                return _token_content(config[key])
            return default if default in vocab else None

        tokenizer.eos_token = role("eos_token", EOS_TOKEN)
        # Without their own BOS/PAD tokens, models of this kind use the EOS token for both.
        tokenizer.bos_token = role("bos_token", EOS_TOKEN) or tokenizer.eos_token
        tokenizer.pad_token = role("pad_token", PAD_TOKEN) or tokenizer.eos_token
        tokenizer.chat_template = config.get("chat_template")
        tokenizer.model_max_length = config.get("model_max_length", UNLIMITED_LENGTH)
        tokenizer.target_vocab_size = backend.get_vocab_size(with_added_tokens=True)
        tokenizer._backend = backend
        return tokenizer


def _check_tokenizer_config(config: dict[str, Any], path: Path) -> None:
    """`CheckpointError` naming the first field of tokenizer_config.json whose value cannot be used."""
    for key in ("bos_token", "eos_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if key in config and value is not None and not isinstance(value, str):
            raise CheckpointError(f"{path}: {key} must be a token string, {{\"content\": ...}} or null, "
                                  f"got {config[key]!r}")
    length = config.get("model_max_length")
    if "model_max_length" in config and (isinstance(length, bool) or not isinstance(length, (int, float))):
        raise CheckpointError(f"{path}: model_max_length must be a number, got {length!r}")
    template = config.get("chat_template")
    if isinstance(template, list):  # transformers' named templates: [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
        config["chat_template"] = template
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{path}: chat_template must be a Jinja string (or a list of named templates), "
                              f"got {json_kind(template)}")
