"""BPETokenizer: lossless round-trip, Chinese compression, special tokens, save/load, transformers parity."""

import json
import logging
import random

import numpy as np
import pytest
import torch

from minillm.tokenizer import SPECIAL_TOKENS, BPETokenizer
from minillm.tokenizer.chat import CHAT_TEMPLATES

CHINESE_WORDS = ["我们", "今天", "学习", "语言", "模型", "训练", "数据", "小明", "苹果", "老师", "学生", "中国",
                 "北京", "天气", "很好", "喜欢", "计算", "问题", "答案", "一共", "多少", "个", "买了", "还剩"]
ENGLISH_WORDS = ["the", "model", "learns", "language", "from", "data", "small", "transformer", "training",
                 "token", "apple", "teacher", "student", "how", "many", "are", "left", "quickly", "world"]
ADVERSARIAL = [
    "",
    " ",
    "   leading and trailing   ",
    "multiple   inner    spaces",
    "tabs\there\t\tand\r\nwindows\r\nlines\n\n\n",
    "NUL\x00byte and controls \x01\x07\x1b[31m\x7f",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇨🇳🇺🇸 keycap 1️⃣",
    "rare CJK 𠀀𪚥𰻞 and 〇㐀",
    "combining e\u0301 a\u0300\u0316 Z\u0351\u0364\u036b",
    "RTL עברית العربية mixed with English",
    "日本語のテキストと한국어",
    "full-width ＡＢＣ１２３！and ideographic space\u3000end",
    "zero width\u200b\u200c\u200d\ufeff joiners",
    "\u00a0nbsp\u2028line sep\u2029para sep\x85nel",
    "you'RE can't I'll 'quoted'",
    "price: $3.14, 100%! (a+b)*c=d; x<y>z",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start without end |> <| endoftext|>",
    "\U0010ffff\U000e0001 private \ue000 noncharacter \ufffe\uffff",
]


def chinese_sentence(rng: random.Random) -> str:
    return "".join(rng.choices(CHINESE_WORDS, k=rng.randint(4, 10))) + rng.choice(["。", "？", "！"])


def make_corpus(seed: int, lines: int = 300) -> list[str]:
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        zh = chinese_sentence(rng)
        en = " ".join(rng.choices(ENGLISH_WORDS, k=rng.randint(3, 8))).capitalize() + "."
        corpus.append(f"{zh} {en} {rng.randint(0, 999)}" if rng.random() < 0.5 else f"{en}\n{zh}")
    return corpus


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    tok = BPETokenizer(vocab_size=1000)
    tok.train(make_corpus(seed=0))
    return tok


def test_vocab_size_is_the_trained_size(tokenizer):
    assert len(tokenizer) == tokenizer.vocab_size == len(tokenizer.get_vocab())
    assert 256 + len(SPECIAL_TOKENS) < tokenizer.vocab_size <= 1000


def test_special_token_ids(tokenizer):
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 0
    assert (tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.pad_token_id) == (1, 2, 3)
    assert tokenizer.special_token_ids == {0, 1, 2, 3}


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_round_trip_adversarial(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_random_unicode(tokenizer):
    rng = random.Random(1234)
    code_points = [rng.randrange(0, 0x110000) for _ in range(5000)]
    text = "".join(chr(c) for c in code_points if not 0xD800 <= c <= 0xDFFF)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chinese_compresses_better_than_bytes(tokenizer):
    rng = random.Random(99)
    chinese = "".join(chinese_sentence(rng) for _ in range(20))
    # A CJK character is 3 UTF-8 bytes; learned merges make most characters, and common words, one token.
    assert len(tokenizer.encode(chinese)) < len(chinese.encode("utf-8")) / 4


def test_every_digit_is_its_own_token(tokenizer):
    ids = tokenizer.encode("12345")
    assert [tokenizer.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("小明买了2024个 apple42")]
    assert pieces[-2:] == ["4", "2"] and "".join(pieces[2:6]) == "2024" and len(pieces[2:6]) == 4


def test_special_tokens_in_text_and_flags(tokenizer):
    ids = tokenizer.encode("<|im_start|>user")
    assert ids[0] == 1 and tokenizer.decode(ids[1:]) == "user"
    plain = tokenizer.encode("Mini-LLM 你好")
    assert tokenizer.encode("Mini-LLM 你好", add_special_tokens=True) == [0, *plain]
    chat = tokenizer.encode("<|im_start|>user\n你好<|im_end|><|endoftext|>", add_special_tokens=True)
    assert tokenizer.decode(chat, skip_special_tokens=True) == "user\n你好"


def test_decode_accepts_tensors_and_arrays(tokenizer):
    ids = tokenizer.encode("模型 learns 42")
    assert tokenizer.decode(torch.tensor(ids)) == tokenizer.decode(np.array(ids)) == "模型 learns 42"
    with pytest.raises(ValueError, match="1-D"):
        tokenizer.decode(torch.tensor([ids]))


def test_encode_batch_matches_encode(tokenizer):
    texts = make_corpus(seed=5, lines=10) + ADVERSARIAL
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode_batch(texts, add_special_tokens=True) == [[0, *tokenizer.encode(t)] for t in texts]


def test_token_conversions(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|pad|>"]) == [2, 3]
    assert tokenizer.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|im_start|>"]
    assert tokenizer.convert_tokens_to_ids("no such token") is None


def test_tiny_vocab_adapts_with_one_warning(caplog):
    texts = ["你好，Mini-LLM!", "Transformer 架构演示", "小模型也能训练"]
    with caplog.at_level(logging.WARNING, logger="minillm.tokenizer"):
        tok = BPETokenizer(vocab_size=256)
    warnings = [r for r in caplog.records if r.name == "minillm.tokenizer" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "too small" in warnings[0].getMessage() and "320" in warnings[0].getMessage()
    tok.train(texts)
    assert 256 + len(SPECIAL_TOKENS) <= len(tok) <= 320
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=True), skip_special_tokens=True) == text


def test_empty_corpus_is_refused(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        BPETokenizer().train([])
    with pytest.raises(ValueError, match="empty corpus"):
        BPETokenizer().train(["", "  \n"])
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty corpus"):
        BPETokenizer().train_from_files([tmp_path / "empty.txt"])


def test_untrained_tokenizer_says_so():
    with pytest.raises(RuntimeError, match="not trained"):
        BPETokenizer().encode("hi")


def test_train_from_files(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(make_corpus(seed=3)), encoding="utf-8")
    tok = BPETokenizer(vocab_size=600)
    tok.train_from_files([path])
    assert tok.token_to_id("<|pad|>") == 3 and len(tok) <= 600
    assert tok.decode(tok.encode("老师 teacher 7")) == "老师 teacher 7"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        tok.train_from_files([tmp_path / "missing.txt"])


def test_save_load_round_trip_and_fingerprint(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["unk_token"] is None
    assert config["chat_template"] == CHAT_TEMPLATES["chatml"]  # every saved tokenizer carries its template

    loaded = BPETokenizer.from_pretrained(tmp_path / "tok")
    texts = make_corpus(seed=7, lines=20) + ADVERSARIAL
    assert loaded.encode_batch(texts) == tokenizer.encode_batch(texts)
    assert (loaded.eos_token_id, loaded.bos_token_id, loaded.pad_token_id) == (0, 0, 3)
    assert loaded.special_token_ids == tokenizer.special_token_ids and len(loaded) == len(tokenizer)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert BPETokenizer.from_file(tmp_path / "tok" / "tokenizer.json").fingerprint() == tokenizer.fingerprint()

    other = BPETokenizer(vocab_size=1000)
    other.train(make_corpus(seed=1))
    assert other.fingerprint() != tokenizer.fingerprint()


def test_missing_directory_or_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        BPETokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        BPETokenizer.from_pretrained(tmp_path)


def test_transformers_auto_tokenizer_parity(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    try:
        tokenizer.save_pretrained(tmp_path)
    finally:
        tokenizer.chat_template = None
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    texts = make_corpus(seed=11, lines=20) + ADVERSARIAL
    for text in texts:
        for add in (False, True):
            ids = tokenizer.encode(text, add_special_tokens=add)
            assert hf(text, add_special_tokens=add)["input_ids"] == ids
            for skip in (False, True):
                assert hf.decode(ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert (hf.eos_token_id, hf.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert hf.chat_template.startswith("{% for m in messages %}")
    assert BPETokenizer.from_pretrained(tmp_path).chat_template == hf.chat_template
