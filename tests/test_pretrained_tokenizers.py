"""tiktoken conversion (id parity with tiktoken itself, transformers loading, the offline error),
load_tokenizer, TokenizerManager caching and evaluate_tokenizers.

No network: the parity tests build a tiktoken.Encoding locally from ranks of a small trained BPE.
"""

import os
import random

import pytest

tiktoken = pytest.importorskip("tiktoken")

from tokenizers import Regex, pre_tokenizers  # noqa: E402

from minillm.data.corpus import corpus_fingerprint  # noqa: E402
from minillm.data.pretrain import iter_documents  # noqa: E402
from minillm.tokenizer import BPETokenizer  # noqa: E402
from minillm.tokenizer.manager import (  # noqa: E402
    INFO_FILE,
    TokenizerManager,
    evaluate_tokenizers,
    format_tokenizer_table,
)
from minillm.tokenizer.pretrained import (  # noqa: E402
    TokenizerLoadError,
    bytes_to_unicode,
    from_tiktoken_encoding,
    load_tiktoken,
    load_tokenizer,
    translate_tiktoken_pattern,
)

# The split patterns of tiktoken_ext/openai_public.py (gpt2/r50k, cl100k_base, o200k_base).
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

ZH = ["我们", "今天", "学习", "语言", "模型", "训练", "数据", "小明", "苹果", "北京", "天气", "很好", "问题", "答案"]
EN = ["the", "model", "learns", "language", "from", "data", "small", "The", "Hello", "world", "it's", "we'll"]
PARITY_TEXTS = [
    "",
    " ",
    "Hello world! The model learns language from data.",
    "我们今天学习语言模型。小明买了3个苹果，还剩多少？",
    "中英混合 mixed text: 北京 weather is 很好 today!",
    "digits 1 12 123 1234 12345 3.14159 2024-06-01 １２３",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇨🇳🇺🇸 keycap 1️⃣",
    "whitespace   runs\t\ttabs \n\n\n  trailing   ",
    "  \n  \n",
    "ends with spaces   ",
    "CRLF\r\nlines\r\n\r\nand\rcarriage",
    "ideographic\u3000space, nbsp\u00a0here, zero\u200bwidth",
    "contractions: it's we'LL THEY'RE I'd you've 'quoted' 'ſ ſ",
    "<|endoftext|>",
    "doc one<|endoftext|>doc two <|endoftext|> three",
    "<|fim_prefix|>def f():<|endofprompt|>  <|endoftext|>\n",
    "broken specials: <|endoftext <|endoftext| <| endoftext|> <|unused 3|>",
    "rare CJK 𠀀𪚥 combining e\u0301 a\u0300 RTL עברית العربية 日本語のテキスト 한국어",
    "NUL\x00 controls \x01\x07\x1b[31m\x7f",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa " + "ab" * 30 + " " + "哈" * 40,
    "price: $3.14, 100%! (a+b)*c=d; x<y>z // path/to/file.py",
]
RANDOM_POOL = list("我们今天学习语言模型。，！？abcXYZ ' 's 've 'LL 0123456789 \n\n\r\t\u3000\xa0😀👍🏽🇨🇳\u200d$%&()-_.,") + [
    "<|endoftext|>", "<|fim_prefix|>", "   ", "aaaa", "abab", "12345", " the", "'s", "ſ",
]


def training_corpus(seed: int = 0, lines: int = 600) -> list[str]:
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        zh = "".join(rng.choices(ZH, k=rng.randint(3, 8))) + rng.choice("。？！")
        en = " ".join(rng.choices(EN, k=rng.randint(3, 8))) + "."
        corpus.append(f"{zh} {en} {rng.randint(0, 99999)}\n\n  {rng.choice(['😀', '👍🏽', ''])}")
    return corpus


@pytest.fixture(scope="module")
def local_ranks() -> dict[bytes, int]:
    """tiktoken-style mergeable ranks: the tokens of a small trained BPE in creation order (all 256
    bytes first), plus multi-digit and whitespace tokens so that the digit and space rules matter."""
    trained = BPETokenizer(vocab_size=1200)
    trained.train(training_corpus())
    char_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    specials = set(trained.special_tokens)
    ordered = sorted((i, t) for t, i in trained.get_vocab().items() if t not in specials)
    ranks: dict[bytes, int] = {}
    for _, token in ordered:
        ranks[bytes(char_to_byte[c] for c in token)] = len(ranks)
    for extra in [b"12", b"123", b"20", b"2024", b"00", b"000", b"  ", b"   ", b"\n\n", b" \n", b"aa", b"aaaa",
                  b"ab", b"abab"]:
        ranks.setdefault(extra, len(ranks))
    assert len({r for r in ranks.values()}) == len(ranks) and all(bytes([b]) in ranks for b in range(256))
    return ranks


def make_encoding(ranks: dict[bytes, int], pattern: str = CL100K_PATTERN, name: str = "local") -> "tiktoken.Encoding":
    n = len(ranks)
    # Like cl100k_base: the special tokens leave unused ids between them (n + 2 .. n + 4).
    special = {"<|endoftext|>": n, "<|fim_prefix|>": n + 1, "<|endofprompt|>": n + 5}
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)


@pytest.fixture(scope="module")
def local_encoding(local_ranks):
    return make_encoding(local_ranks)


@pytest.fixture(scope="module")
def converted(local_encoding) -> BPETokenizer:
    return from_tiktoken_encoding(local_encoding)


def random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(RANDOM_POOL, k=rng.randint(0, 50))) for _ in range(count)]


# ---------------------------------------------------------------------------------------- conversion
def test_pattern_translation_keeps_tiktoken_semantics():
    translated = translate_tiktoken_pattern(CL100K_PATTERN)
    # Oniguruma (Ruby syntax) reads `{1,3}+` as "repeat", not possessive, and `$` as end of line.
    assert r"(?>\p{N}{1,3})" in translated and r"\s++\z" in translated and "$" not in translated
    split = pre_tokenizers.Split(Regex(translated), behavior="isolated")
    assert [piece for piece, _ in split.pre_tokenize_str("1234567")] == ["123", "456", "7"]
    assert translate_tiktoken_pattern(r"[$^\]]+(x)$") == r"[$^\]]+(x)\z"
    assert translate_tiktoken_pattern(r"(ab){2}+c{1,}+d{3}") == r"(?>(ab){2})(?>c{1,})d{3}"


@pytest.mark.parametrize("pattern", [CL100K_PATTERN, R50K_PATTERN, O200K_PATTERN], ids=["cl100k", "r50k", "o200k"])
def test_converted_encoding_matches_tiktoken_ids(local_ranks, pattern):
    encoding = make_encoding(local_ranks, pattern)
    tokenizer = from_tiktoken_encoding(encoding)
    assert tokenizer.vocab_size == encoding.n_vocab == len(local_ranks) + 6
    texts = PARITY_TEXTS + training_corpus(seed=1, lines=100) + random_texts(seed=2, count=1500)
    expected = [encoding.encode(t, allowed_special="all") for t in texts]
    assert tokenizer.encode_batch(texts) == expected
    for text, ids in zip(texts[:200], expected[:200]):
        assert tokenizer.encode(text) == ids
        assert tokenizer.decode(ids) == text
    assert any(len(ids) < len(text.encode()) for text, ids in zip(texts, expected))  # merges were applied


def test_converted_special_tokens_and_roles(converted, local_encoding):
    n = len(local_encoding._mergeable_ranks)
    assert converted.eos_token_id == converted.pad_token_id == converted.bos_token_id == n
    assert converted.token_to_id("<|endofprompt|>") == n + 5
    assert converted.special_token_ids == {n, n + 1, n + 5}
    assert converted.encode("hi", add_special_tokens=True) == [n, *local_encoding.encode("hi")]
    assert converted.decode(converted.encode("a<|endoftext|>b"), skip_special_tokens=True) == "ab"
    # The filler ids between specials exist but no text can produce them.
    assert converted.convert_ids_to_tokens(n + 3) == "<|unused " + str(n + 3) + "|>"
    assert n + 3 not in converted.encode("<|unused " + str(n + 3) + "|>")


def test_converted_tokenizer_saves_and_loads_in_transformers(converted, local_encoding, tmp_path):
    transformers = pytest.importorskip("transformers")
    converted.save_pretrained(tmp_path)
    reloaded = BPETokenizer.from_pretrained(tmp_path)
    assert reloaded.fingerprint() == converted.fingerprint()
    assert reloaded.eos_token_id == reloaded.pad_token_id == converted.eos_token_id
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == local_encoding.n_vocab
    assert hf.eos_token_id == hf.pad_token_id == converted.eos_token_id
    for text in PARITY_TEXTS + random_texts(seed=3, count=100):
        ids = local_encoding.encode(text, allowed_special="all")
        assert hf.encode(text, add_special_tokens=False) == ids
        assert reloaded.encode(text) == ids
    assert hf.encode("hi") == converted.encode("hi", add_special_tokens=True)


def test_conversion_rejects_encoding_without_endoftext(local_ranks):
    encoding = tiktoken.Encoding(name="no_eos", pat_str=CL100K_PATTERN, mergeable_ranks=local_ranks,
                                 special_tokens={"<|end|>": len(local_ranks)})
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        from_tiktoken_encoding(encoding)


# ---------------------------------------------------------------------------------------- loading
@pytest.fixture
def offline_tiktoken(monkeypatch, tmp_path):
    """tiktoken with an empty cache and no network: every download attempt fails and is recorded."""
    import requests
    import tiktoken.load
    import tiktoken.registry

    attempts: list[str] = []

    def no_network(blobpath: str) -> bytes:
        attempts.append(blobpath)
        raise requests.exceptions.ConnectionError(f"network disabled in tests: {blobpath}")

    cache = tmp_path / "empty-tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    for name in ("cl100k_base", "gpt2"):
        monkeypatch.delitem(tiktoken.registry.ENCODINGS, name, raising=False)
    return attempts


def test_load_tiktoken_offline_gives_clear_error(offline_tiktoken, tmp_path):
    with pytest.raises(RuntimeError) as info:
        load_tiktoken("cl100k_base")
    message = str(info.value)
    assert isinstance(info.value, TokenizerLoadError)
    assert offline_tiktoken == ["https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"]
    for part in ("cl100k_base.tiktoken", "internet", "TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-tiktoken-cache")):
        assert part in message
    with pytest.raises(TokenizerLoadError, match="vocab.bpe"):
        load_tokenizer("gpt2")
    with pytest.raises(TokenizerLoadError, match="unknown tiktoken encoding"):
        load_tiktoken("cl200k_nonexistent")


def test_load_tokenizer_accepted_forms(converted, local_encoding, tmp_path, monkeypatch):
    converted.save_pretrained(tmp_path / "tok")
    text = "我们今天 learn 12345 😀<|endoftext|>"
    expected = local_encoding.encode(text, allowed_special="all")
    assert load_tokenizer(tmp_path / "tok").encode(text) == expected
    assert load_tokenizer(str(tmp_path / "tok")).encode(text) == expected
    from_file = load_tokenizer(tmp_path / "tok" / "tokenizer.json")
    assert from_file.encode(text) == expected and from_file.eos_token_id == converted.eos_token_id

    # A tiktoken name goes through tiktoken.get_encoding (here answering with the local encoding).
    requested = []
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: requested.append(name) or local_encoding)
    for name in ("gpt2", "cl100k_base"):
        assert load_tokenizer(name).encode(text) == expected
    assert requested == ["gpt2", "cl100k_base"]

    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "bad.json").write_text("{not a tokenizer", encoding="utf-8")
    for spec, reason in [("no_such_tokenizer", "neither an existing path"), (tmp_path / "empty_dir", "no tokenizer.json"),
                         (tmp_path / "missing" / "tokenizer.json", "neither an existing path")]:
        with pytest.raises(TokenizerLoadError) as info:
            load_tokenizer(spec)
        assert reason in str(info.value)
        for form in ("'gpt2'", "'cl100k_base'", "directory containing tokenizer.json", "tokenizer.json file"):
            assert form in str(info.value)
    with pytest.raises(TokenizerLoadError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


# ---------------------------------------------------------------------------------------- caching
def _forbid_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again instead of loaded from the cache")

    monkeypatch.setattr(BPETokenizer, "train", fail)
    monkeypatch.setattr(BPETokenizer, "train_from_files", fail)


def test_manager_caches_by_corpus_and_settings(tmp_path, monkeypatch):
    manager = TokenizerManager(tmp_path / "cache")
    texts = training_corpus(seed=4, lines=150)
    first = manager.get_or_train(texts, vocab_size=400)
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert entries == [manager.cache_key(texts, 400)]  # no temporary directory left behind
    assert (tmp_path / "cache" / entries[0] / INFO_FILE).is_file()

    with monkeypatch.context() as patch:
        _forbid_training(patch)
        again = manager.get_or_train(list(texts), vocab_size=400)
        assert again.fingerprint() == first.fingerprint()
        with pytest.raises(AssertionError, match="trained again"):
            manager.get_or_train(texts[:-1] + [texts[-1] + "!"], vocab_size=400)
        with pytest.raises(AssertionError, match="trained again"):
            manager.get_or_train(texts, vocab_size=420)
        with pytest.raises(AssertionError, match="trained again"):
            manager.get_or_train(texts, vocab_size=400, min_frequency=3)
        with pytest.raises(AssertionError, match="trained again"):
            manager.get_or_train(texts, vocab_size=400, special_tokens=["<|tool|>"])
    assert len(list((tmp_path / "cache").iterdir())) == 1  # failed trainings leave nothing behind

    bigger = manager.get_or_train(texts, vocab_size=420)
    assert bigger.vocab_size == 420 != first.vocab_size
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_manager_caches_path_corpora(tmp_path, monkeypatch):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "a.txt").write_text("\n".join(training_corpus(seed=5, lines=80)), encoding="utf-8")
    (corpus_dir / "b.jsonl").write_text('{"text": "你好 world 123"}\n{"text": "再见 moon"}\n', encoding="utf-8")
    manager = TokenizerManager(tmp_path / "cache")

    def get(path):  # a path corpus: read only on a cache miss
        return manager.get_or_train(iter_documents(path), vocab_size=400, fingerprint=corpus_fingerprint(path))

    first = get(corpus_dir)
    old_key = manager.cache_key(iter_documents(corpus_dir), 400, fingerprint=corpus_fingerprint(corpus_dir))
    assert os.listdir(tmp_path / "cache") == [old_key]
    with monkeypatch.context() as patch:
        _forbid_training(patch)
        assert get(str(corpus_dir)).fingerprint() == first.fingerprint()
    (corpus_dir / "b.jsonl").write_text('{"text": "你好 world 124"}\n{"text": "再见 moon"}\n', encoding="utf-8")
    assert manager.cache_key([], 400, fingerprint=corpus_fingerprint(corpus_dir)) != old_key
    get(corpus_dir)
    assert len(list((tmp_path / "cache").iterdir())) == 2


# ---------------------------------------------------------------------------------------- evaluation
class WordTokenizer:
    """One token per whitespace-separated word; decoding joins with single spaces (lossy)."""

    def __init__(self):
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        for word in text.split():
            if word not in self.words:
                self.words.append(word)
        return [self.words.index(w) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)

    def __len__(self) -> int:
        return 1000


def test_evaluate_tokenizers_hand_checked_numbers():
    # No merges: one token per UTF-8 byte, so every count is known in advance.
    byte_level = tiktoken.Encoding(name="bytes", pat_str=CL100K_PATTERN,
                                   mergeable_ranks={bytes([b]): b for b in range(256)},
                                   special_tokens={"<|endoftext|>": 256})
    texts = ["hello world", "中文", "a  b"]  # 17 characters, 11 + 6 + 4 = 21 UTF-8 bytes, 2 + 1 + 2 = 5 words
    tokenizers = {"bytes": from_tiktoken_encoding(byte_level), "raw-tiktoken": byte_level, "words": WordTokenizer()}
    rows = evaluate_tokenizers(tokenizers, iter(texts))
    assert [r["name"] for r in rows] == ["bytes", "raw-tiktoken", "words"]
    for row in rows[:2]:
        assert row["vocab_size"] == 257
        assert (row["characters"], row["bytes"], row["tokens"]) == (17, 21, 21)
        assert row["bytes_per_token"] == pytest.approx(1.0)
        assert row["chars_per_token"] == pytest.approx(17 / 21)
        assert (row["roundtrip_ok"], row["roundtrip_rate"]) == (3, 1.0)
    words = rows[2]
    assert (words["vocab_size"], words["tokens"]) == (1000, 5)
    assert words["chars_per_token"] == pytest.approx(3.4) and words["bytes_per_token"] == pytest.approx(4.2)
    assert words["roundtrip_ok"] == 2 and words["roundtrip_rate"] == pytest.approx(2 / 3)  # "a  b" -> "a b"

    table = format_tokenizer_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows) and len({len(line) for line in lines}) == 1  # aligned
    for name in tokenizers:
        assert name in table
    assert "100.0%" in lines[2] and "66.6%" in lines[4] and "0.810" in lines[2] and "3.400" in lines[4]
    with pytest.raises(ValueError, match="at least one text"):
        evaluate_tokenizers(tokenizers, [])
