"""Pretraining data: reading corpora, token shards, packed windows, splits and the loader."""

import json

import numpy as np
import pytest
import torch

from minillm.data.pretrain import (
    DataError,
    LanguageModelingDataset,
    PretrainDataLoader,
    TokenShards,
    iter_documents,
    reusable_shards,
    source_stamp,
    split_train_val,
    stamp_shards,
    tokenize_corpus,
    write_token_shards,
)
from minillm.tokenizer import BPETokenizer


def test_shards_hold_every_document_followed_by_eos(tmp_path, corpus, tokenizer):
    docs = corpus[:200]
    info = write_token_shards(docs, tokenizer, tmp_path / "shards", shard_tokens=1000)
    shards = TokenShards(tmp_path / "shards")
    expected = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.eos_token_id]]
    assert len(shards.meta["shards"]) > 3  # several files, read back as one stream
    assert shards.meta["dtype"] == "uint16" and info.dtype == "uint16"
    assert shards.slice(0, len(shards)).tolist() == expected
    assert shards.slice(990, 1010).tolist() == expected[990:1010]  # across a shard boundary
    assert shards.fingerprint == tokenizer.fingerprint()
    assert info.num_documents == 200


class BigVocabTokenizer:
    """A stand-in with a vocabulary too large for uint16."""

    eos_token_id = 70_000

    def __len__(self):
        return 70_001

    def encode_batch(self, texts):
        return [[ord(c) + 66_000 for c in t] for t in texts]

    def fingerprint(self):
        return "big"


def test_large_vocabularies_use_uint32(tmp_path):
    write_token_shards(["ab", "c"], BigVocabTokenizer(), tmp_path / "s")
    shards = TokenShards(tmp_path / "s")
    assert shards.meta["dtype"] == "uint32"
    assert shards.slice(0, 5).tolist() == [66_097, 66_098, 70_000, 66_099, 70_000]


def test_truncated_shard_is_detected(tmp_path, corpus, tokenizer):
    write_token_shards(corpus[:50], tokenizer, tmp_path / "s")
    shard = tmp_path / "s" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        TokenShards(tmp_path / "s")


def test_windows_train_every_next_token_pair_exactly_once(tokenizer):
    tokens = np.arange(1000) % 500
    dataset = LanguageModelingDataset(tokens, tokenizer, max_length=64)
    pairs = []
    for i in range(len(dataset)):
        item = dataset[i]
        ids, labels = item["input_ids"], item["labels"]
        pairs += [(int(ids[t]), int(labels[t + 1])) for t in range(63) if labels[t + 1] != -100]
    assert pairs == [(int(tokens[t]), int(tokens[t + 1])) for t in range(999)]
    last = dataset[len(dataset) - 1]
    assert (last["labels"] == -100).any()  # the partial window is padded and the padding is not trained
    assert last["input_ids"][last["labels"] == -100].eq(tokenizer.pad_token_id).all()


def test_dataset_from_texts_packs_documents_with_eos(tokenizer):
    texts = ["你好，Mini-LLM!", "Transformer 架构演示", "小模型也能训练"]
    dataset = LanguageModelingDataset(texts, tokenizer, max_length=16)
    stream = [t for text in texts for t in tokenizer.encode(text) + [tokenizer.eos_token_id]]
    windows = [dataset[i]["input_ids"][dataset[i]["labels"] != -100].tolist() for i in range(len(dataset))]
    assert len(windows) > 1
    assert windows[0] + [t for w in windows[1:] for t in w[1:]] == stream  # consecutive windows share one token


def test_train_val_split_is_disjoint_and_covers_the_stream(tokenizer):
    tokens = np.arange(10_000) % 300
    train, val = split_train_val(tokens, max_length=32, val_fraction=0.1, tokenizer=tokenizer)
    assert train.end == val.start == 9000
    assert train.num_tokens() + val.num_tokens() == 10_000
    with pytest.raises(DataError, match="too small"):
        split_train_val(np.arange(40), max_length=32, val_fraction=0.1)


def test_loader_order_is_seeded_and_resumable(tokenizer):
    dataset = LanguageModelingDataset(np.arange(5000) % 300, tokenizer, max_length=16)
    full = PretrainDataLoader(dataset, batch_size=4, seed=3)
    reference = [b["input_ids"] for _, b in zip(range(len(full) + 10), _cycle(full))]
    resumed = PretrainDataLoader(dataset, batch_size=4, seed=3)
    first = [b["input_ids"] for _, b in zip(range(7), _cycle(resumed))]
    state = resumed.state_dict()
    fresh = PretrainDataLoader(dataset, batch_size=4, seed=3)
    fresh.load_state_dict(state)
    rest = [b["input_ids"] for _, b in zip(range(len(full) + 3), _cycle(fresh))]
    assert all(torch.equal(a, b) for a, b in zip(reference, first + rest))
    other = next(iter(PretrainDataLoader(dataset, batch_size=4, seed=4)))["input_ids"]
    assert not torch.equal(other, reference[0])
    # epoch 2 is a different permutation of the same windows
    assert not torch.equal(reference[0], reference[len(full)])


def _cycle(loader):
    while True:
        yield from loader


# ------------------------------------------------------------------------------ reading corpora
def test_iter_documents_reads_text_jsonl_and_json(tmp_path):
    (tmp_path / "a.txt").write_text("第一篇\n文章", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"text": "y", "id": 2}\n', encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps(["z", {"text": "w"}]), encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert list(iter_documents(tmp_path)) == ["第一篇\n文章", "x", "y", "z", "w"]


def test_malformed_jsonl_line_is_reported_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        list(iter_documents(path))
    path.write_text('{"text": "ok"}\n{"content": "no text field"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'text'"):
        list(iter_documents(path))
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'text' must be a string"):
        list(iter_documents(path))


def test_directory_without_text_files_and_empty_corpus_are_refused(tmp_path, tokenizer):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match="contains no text files"):
        list(iter_documents(tmp_path / "d"))
    with pytest.raises(DataError, match="no such file"):
        list(iter_documents(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        tokenize_corpus(tmp_path / "empty.txt", tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written is left behind
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        list(iter_documents(tmp_path / "latin1.txt"))


def test_tokenize_corpus_reuses_shards_until_the_corpus_changes(tmp_path, tokenizer):
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("小明有3个苹果。\n" * 50, encoding="utf-8")
    first = tokenize_corpus(corpus_file, tokenizer, tmp_path / "s")
    meta_mtime = (tmp_path / "s" / "meta.json").stat().st_mtime_ns
    tokenize_corpus(corpus_file, tokenizer, tmp_path / "s")
    assert (tmp_path / "s" / "meta.json").stat().st_mtime_ns == meta_mtime  # reused
    corpus_file.write_text("Tom has 2 apples.\n" * 80, encoding="utf-8")
    second = tokenize_corpus(corpus_file, tokenizer, tmp_path / "s")
    assert len(second) != len(first)


def test_reusable_shards_match_tokenizer_and_source(tmp_path, tokenizer):
    out = tmp_path / "s"
    assert reusable_shards(out, tokenizer, {"builtin": [10, 0, "zh"]}) is None  # nothing there yet
    write_token_shards(["小明有3个苹果。"] * 20, tokenizer, out, source="builtin")
    assert reusable_shards(out, tokenizer, {"builtin": [10, 0, "zh"]}) is None  # written, not stamped
    stamped = stamp_shards(out, {"builtin": [10, 0, "zh"]})
    reused = reusable_shards(out, tokenizer, {"builtin": [10, 0, "zh"]})
    assert reused is not None and len(reused) == len(stamped)
    assert reusable_shards(out, tokenizer, {"builtin": [11, 0, "zh"]}) is None  # another corpus
    other = BPETokenizer(vocab_size=300)
    other.train(["Tom has 2 apples."] * 20)
    assert reusable_shards(out, other, {"builtin": [10, 0, "zh"]}) is None  # another tokenizer
    corpus = tmp_path / "c.txt"
    corpus.write_text("text\n", encoding="utf-8")
    assert source_stamp(corpus) == [[str(corpus), 5, corpus.stat().st_mtime_ns]]
