"""Dataset preparation (cleaning, filters, exact and near-duplicate removal, sampling, splits, report),
dataset inspection, and streamed token shards for large text files."""

import json
import tracemalloc

import numpy as np
import pytest

from minillm.data import formats
from minillm.data.builtin import builtin_corpus, generate_stories, generate_word_problems
from minillm.data.formats import DataError
from minillm.data.prepare import (
    MinHashLSH,
    clean_text,
    format_inspection,
    inspect_dataset,
    jaccard,
    lsh_parameters,
    prepare_dataset,
)
from minillm.data.pretrain import (
    DocumentPart,
    TokenShards,
    auto_workers,
    available_cpus,
    iter_document_parts,
    iter_documents,
    splits_exactly,
    tokenize_corpus,
    write_token_shards,
)


def write_jsonl(path, objects):
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def long_text(seed, lang):
    """Three built-in stories, one sentence per line: ~200 (zh) / ~700 (en) characters."""
    text = "\n".join(generate_stories(3, seed=seed, lang=lang))
    return text.replace("。", "。\n").replace(". ", ".\n").strip()


# ------------------------------------------------------------------------------------- cleaning
def test_clean_text_normalises_and_removes_control_characters():
    raw = "Cafe\u0301\x00 说：“你好！”\r\nline two\x07\t  \r\n\r\n\r\n\r\n\ttabbed\x1b[0m end\ufeff  \n\n"
    cleaned = clean_text(raw)
    assert cleaned == "Café 说：“你好！”\nline two\n\n\ttabbed[0m end"
    assert "\u0301" not in cleaned and "é" in cleaned  # decomposed é is composed under NFC
    assert all(c in "\n\t" or c.isprintable() for c in cleaned)
    assert "\r" not in cleaned
    # full-width punctuation survives NFC but NFKC turns it into ASCII (why NFC is the default)
    assert clean_text("你好，世界！（一）") == "你好，世界！（一）"
    assert clean_text("你好，世界！（一）", normalize="NFKC") == "你好,世界!(一)"
    assert clean_text("a\n\nb") == "a\n\nb"  # one blank line is kept


# ------------------------------------------------------------------------------------- de-duplication
def test_lsh_parameters_find_pairs_at_the_threshold():
    bands, rows = lsh_parameters(0.8, 128)
    assert (bands, rows) == (21, 6)
    assert 1 - (1 - 0.8**rows) ** bands >= 0.99


def test_near_duplicates_are_dropped_and_distinct_texts_kept(tmp_path):
    zh, zh2, en, en2 = long_text(1, "zh"), long_text(2, "zh"), long_text(3, "en"), long_text(4, "en")
    zh_edited = zh[:20] + "蓝" + zh[21:60] + "绿" + zh[61:]  # two characters changed
    en_longer = en + "\nThe sun was shining all day long."  # a line added
    en2_shorter = "\n".join(en2.split("\n")[:3] + en2.split("\n")[4:])  # a line removed
    zh2_shorter = "\n".join(zh2.split("\n")[1:])  # the first line removed
    # two built-in word problems of one template but different content (names, numbers, objects)
    problems = [p.text() for p in generate_word_problems(400, seed=3, lang="zh")]
    same_template = [t for t in problems if "平均分给" in t][:2]
    for a, b in [(zh, zh_edited), (en, en_longer), (en2, en2_shorter), (zh2, zh2_shorter)]:
        assert jaccard(a, b) >= 0.8  # really near-duplicates
    assert jaccard(*same_template) < 0.5
    records = [zh, en, zh2, en2, same_template[0], same_template[1],
               zh_edited, en_longer, en2_shorter, zh2_shorter, en, "  " + zh + "\n"]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in records])
    report = prepare_dataset(path, tmp_path / "out")
    kept = [r["text"] for r in read_jsonl(tmp_path / "out" / "train.jsonl")]
    assert kept == [zh, en, zh2, en2, *same_template]
    assert report.read == 12 and report.kept == 6
    assert report.dropped == {"near_duplicate": 4, "duplicate": 2}
    assert report.locations["near_duplicate"] == [(str(path), line) for line in (7, 8, 9, 10)]
    assert report.locations["duplicate"] == [(str(path), 11), (str(path), 12)]  # the cleaned text is hashed
    assert report.examples["duplicate"][0]["detail"] == f"of {path}:2"
    assert report.examples["near_duplicate"][0]["detail"].endswith(f"similar to {path}:1")
    assert report.schemas == {"text": 12}
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert on_disk["dropped"] == report.dropped and on_disk["settings"]["minhash"]["bands"] == 21
    # switched off, only the exact duplicates go
    report = prepare_dataset(path, tmp_path / "out2", near_dup_threshold=None)
    assert report.dropped == {"duplicate": 2} and report.kept == 10
    report = prepare_dataset(path, tmp_path / "out3", near_dup_threshold=None, dedup=False)
    assert report.dropped == {} and report.kept == 12


def test_what_the_threshold_does_with_template_sharing_word_problems():
    """Built-in problems that share a template but not their content stay apart (Jaccard far below 0.8);
    only problems that differ in nothing but a person's name are near-duplicates at 0.8."""
    lsh = MinHashLSH(0.8)
    a = "罗阳每天买7条金鱼，连续买了8天，一共买了多少条金鱼？\n8 × 7 = 56。答案：56"
    name_only = "吴敏每天买7条金鱼，连续买了8天，一共买了多少条金鱼？\n8 × 7 = 56。答案：56"
    other_numbers = "小红每天买3个苹果，连续买了5天，一共买了多少个苹果？\n5 × 3 = 15。答案：15"
    assert jaccard(a, name_only) >= 0.8 and lsh.similarity(a, name_only) >= 0.8
    assert jaccard(a, other_numbers) < 0.3 and lsh.similarity(a, other_numbers) < 0.5
    docs = builtin_corpus(2000, seed=1)
    kept = 0
    index = MinHashLSH(0.8)
    for doc in dict.fromkeys(docs):
        signature = index.signature(doc)
        if index.query(signature) is None:
            index.add(signature)
            kept += 1
    assert kept >= 0.98 * len(set(docs))  # the built-in corpus is almost all distinct


# ------------------------------------------------------------------------------------- filters, sampling, splits
def test_length_filters_and_empty_records(tmp_path):
    texts = ["短", "a" * 10, "b" * 50, "c" * 200, " \x00\x07 ", "中" * 120]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    report = prepare_dataset(path, tmp_path / "out", min_chars=10, max_chars=150)
    assert [r["text"] for r in read_jsonl(tmp_path / "out" / "train.jsonl")] == ["a" * 10, "b" * 50, "中" * 120]
    assert report.dropped == {"too_short": 1, "too_long": 1, "empty": 1}
    assert report.locations == {"too_short": [(str(path), 1)], "too_long": [(str(path), 4)],
                                "empty": [(str(path), 5)]}
    assert report.read == sum(report.dropped.values()) + report.kept


def test_sampling_is_seeded_and_the_validation_split_has_the_right_size(tmp_path):
    docs = list(dict.fromkeys(builtin_corpus(300, seed=2)))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs])
    options = {"near_dup_threshold": None}

    def run(name, **kwargs):
        report = prepare_dataset(path, tmp_path / name, **options, **kwargs)
        train = [r["text"] for r in read_jsonl(tmp_path / name / "train.jsonl")]
        val_file = tmp_path / name / "val.jsonl"
        val = [r["text"] for r in read_jsonl(val_file)] if val_file.exists() else []
        return report, train, val

    report, a, _ = run("a", sample=0.5, seed=7)
    _, b, _ = run("b", sample=0.5, seed=7)
    _, c, _ = run("c", sample=0.5, seed=8)
    assert a == b and a != c
    assert len(a) == round(0.5 * len(docs)) and report.dropped["sampled_out"] == len(docs) - len(a)
    assert a == [d for d in docs if d in set(a)]  # original order is kept
    report, a, _ = run("d", sample=40, seed=1)
    assert len(a) == 40 and report.kept == 40
    report, train, val = run("e", val_fraction=0.1, seed=3)
    assert len(val) == round(0.1 * len(docs)) and len(train) + len(val) == len(docs)
    assert not set(train) & set(val) and report.val == len(val) and report.train == len(train)
    _, train2, val2 = run("f", val_fraction=0.1, seed=3)
    assert (train2, val2) == (train, val)
    report, train, val = run("g", sample=30, val_fraction=0.2, seed=3)
    assert (len(train), len(val)) == (24, 6)
    with pytest.raises(ValueError, match="fraction"):
        prepare_dataset(path, tmp_path / "x", sample=1.5)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_dataset(path, tmp_path / "x", val_fraction=1.0)


def test_malformed_lines_are_reported_with_their_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "第一条记录"}\n{"text": "second record"}\n{"text": "broken\n{"txt": "x"}\n'
                    '{"text": "第五条"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        prepare_dataset(path, tmp_path / "out")
    assert not (tmp_path / "out" / "train.jsonl").exists()
    report = prepare_dataset(path, tmp_path / "out", skip_bad=True)
    assert report.dropped == {"malformed": 2} and report.kept == 3 and report.read == 5
    assert report.locations["malformed"] == [(str(path), 3), (str(path), 4)]
    assert "malformed JSON" in report.examples["malformed"][0]["detail"]
    text = report.format()
    assert "dropped malformed: 2" in text and f"{path}:3" in text and "kept 3" in text


def test_conversations_and_preferences_are_cleaned_deduplicated_and_canonical(tmp_path):
    story = long_text(5, "zh")
    convs = [
        {"conversations": [{"from": "human", "value": "讲个故事\r\n"}, {"from": "gpt", "value": story}]},
        {"messages": [{"role": "user", "content": "讲个故事"}, {"role": "assistant", "content": story + "\n\n"}]},
        {"instruction": "讲个故事", "output": story[:-3] + "完。"},  # near-duplicate
        {"question": "1+1=?", "answer": "2\x00"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\x01 \x02"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", convs)
    report = prepare_dataset(path, tmp_path / "chat")
    out = read_jsonl(tmp_path / "chat" / "train.jsonl")
    assert out == [{"messages": [{"role": "user", "content": "讲个故事"}, {"role": "assistant", "content": story}]},
                   {"messages": [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}]}]
    assert report.kind == "conversation"
    assert report.dropped == {"duplicate": 1, "near_duplicate": 1, "empty": 1}
    assert report.schemas == {"sharegpt": 1, "messages": 2, "alpaca": 1, "qa": 1}
    assert formats.load_records(tmp_path / "chat" / "train.jsonl").schemas == {"messages": 2}

    prefs = [{"prompt": "你好吗？", "chosen": "我很好，谢谢！", "rejected": "不好。"},
             {"chosen": [{"role": "user", "content": "你好吗？"}, {"role": "assistant", "content": "我很好，谢谢！"}],
              "rejected": [{"role": "user", "content": "你好吗？"}, {"role": "assistant", "content": "不好。"}]},
             {"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    path = write_jsonl(tmp_path / "pref.jsonl", prefs)
    report = prepare_dataset(path, tmp_path / "pref", near_dup_threshold=None)
    out = read_jsonl(tmp_path / "pref" / "train.jsonl")
    assert out[0] == {"prompt": [{"role": "user", "content": "你好吗？"}], "chosen": "我很好，谢谢！", "rejected": "不好。"}
    assert report.dropped == {"duplicate": 1} and len(out) == 2
    assert formats.load_records(tmp_path / "pref" / "train.jsonl").kind == "preference"

    labelled = [{"tokens": "<IMG> <Z_001> <Z_002> </IMG>", "label": 3},
                {"tokens": ["<IMG>", "<Z_001>", "<Z_002>", "</IMG>"], "label": 3},
                {"tokens": "<IMG> <Z_001> <Z_003> </IMG>", "label": 3}]
    path = write_jsonl(tmp_path / "lab.jsonl", labelled)
    report = prepare_dataset(path, tmp_path / "lab", near_dup_threshold=0.5)
    assert read_jsonl(tmp_path / "lab" / "train.jsonl") == [labelled[0], labelled[2]]
    assert report.dropped == {"duplicate": 1}  # no near-duplicate removal for labelled sequences


def test_text_files_and_mixed_kinds(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("第一篇文章。\r\n\r\n\r\n\r\n第二段。", encoding="utf-8")
    (tmp_path / "docs" / "b.md").write_text("# Title\n\nSome *markdown* text.", encoding="utf-8")
    write_jsonl(tmp_path / "docs" / "c.jsonl", [{"text": "json text"}])
    report = prepare_dataset(tmp_path / "docs", tmp_path / "out")
    assert [r["text"] for r in read_jsonl(tmp_path / "out" / "train.jsonl")] == [
        "第一篇文章。\n\n第二段。", "# Title\n\nSome *markdown* text.", "json text"]
    assert report.schemas == {"plain_text": 2, "text": 1}
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="a text file"):
        prepare_dataset([chat, tmp_path / "docs" / "a.txt"], tmp_path / "out2")
    report = prepare_dataset([chat, tmp_path / "docs"], tmp_path / "out2", skip_bad=True)
    assert report.kind == "conversation" and report.kept == 1 and report.dropped == {"malformed": 3}


# ------------------------------------------------------------------------------------- inspection
def test_inspect_dataset_on_jsonl_text_and_shards(tmp_path, tokenizer):
    docs = builtin_corpus(200, seed=4)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in docs] + [{"question": "q", "answer": "a"}])
    info = inspect_dataset(path, tokenizer=tokenizer, bins=8)
    assert info["records"] == 200 and info["kinds"] == {"text": 200} and info["bad_records"] == 1
    assert sum(info["histogram"]["counts"]) == 200 and len(info["histogram"]["counts"]) == 8
    lengths = [len(t) for t in docs]
    assert info["chars"]["total"] == sum(lengths) and info["chars"]["max"] == max(lengths)
    assert info["chars"]["median"] == float(np.median(lengths))
    assert info["tokens"]["total"] == sum(len(ids) for ids in tokenizer.encode_batch(docs))
    text = format_inspection(info)
    assert "records: 200" in text and "#" in text and "tokens: total" in text

    (tmp_path / "t.txt").write_text("一二三四五\n六七八九十", encoding="utf-8")
    info = inspect_dataset(tmp_path / "t.txt")
    assert info["records"] == 1 and info["schemas"] == {"plain_text": 1} and info["chars"]["total"] == 11
    assert sum(info["histogram"]["counts"]) == 1
    (tmp_path / "texts").mkdir()
    long = "\n".join(docs)  # streamed in parts; the token count is that of the whole text
    (tmp_path / "texts" / "long.txt").write_text(long, encoding="utf-8")
    (tmp_path / "texts" / "short.md").write_text("短文", encoding="utf-8")
    info = inspect_dataset(tmp_path / "texts", tokenizer=tokenizer)
    assert info["records"] == 2 and info["chars"]["total"] == len(long) + 2
    assert info["tokens"]["total"] == len(tokenizer.encode(long)) + len(tokenizer.encode("短文"))

    write_token_shards(docs, tokenizer, tmp_path / "shards", shard_tokens=5000)
    info = inspect_dataset(tmp_path / "shards", bins=5)
    shards = TokenShards(tmp_path / "shards")
    assert info["type"] == "token_shards" and info["dtype"] == "uint16"
    assert info["tokens"] == len(shards) and info["documents"] == 200 and info["num_shards"] > 1
    assert sum(info["histogram"]["counts"]) == 200 and info["tokens_per_document"]["total"] == len(shards)
    assert "200 documents" in format_inspection(info)


# ------------------------------------------------------------------------------------- streamed shards
def test_a_huge_single_line_text_file_is_streamed_into_the_same_ids(tmp_path, tokenizer):
    """20 MB in one line (no line break at all, the hard case for a reader that cuts at line ends),
    tokenized in this process (workers=0) so that tracemalloc sees all of the work."""
    docs = [d.replace("\n", " ") for d in builtin_corpus(1500, seed=5)]
    docs.sort(key=lambda d: (not d[0].isascii(), d[-1].isdigit()))  # starts in English, ends with a digit
    block = " ".join(docs)
    assert tokenizer.encode(block + block) == tokenizer.encode(block) * 2  # so the whole file is block ids × n
    repeats = 20_000_000 // len(block.encode("utf-8")) + 1
    path = tmp_path / "one_line.txt"
    path.write_text(block * repeats, encoding="utf-8")
    size = path.stat().st_size
    assert size >= 20_000_000 and b"\n" not in path.read_bytes()[:1_000_000]
    tracemalloc.start()
    try:
        shards = tokenize_corpus(path, tokenizer, tmp_path / "shards", workers=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    expected = np.asarray(tokenizer.encode(block) * repeats + [tokenizer.eos_token_id])
    assert shards.meta["num_documents"] == 1
    assert np.array_equal(shards.slice(0, len(shards)), expected)
    assert peak < size / 5, f"peak traced memory {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"


@pytest.mark.parametrize("layout", ["lines", "one_line", "crlf_and_blank_lines", "special_tokens"])
def test_text_parts_give_the_ids_of_the_whole_text(tmp_path, tokenizer, layout):
    docs = builtin_corpus(400, seed=6)
    text = {"lines": "\n".join(docs), "one_line": "".join(d.replace("\n", "") for d in docs),
            "crlf_and_blank_lines": "\r\n \r\n\r\n".join(d + "  " for d in docs),
            "special_tokens": "<|endoftext|>\n".join(docs)}[layout]
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8", newline="")
    parts = list(iter_document_parts(path, chunk_chars=1000, protect=tokenizer.special_tokens, part_chars=300))
    whole = iter_documents(path).__next__()
    assert len(parts) > 20 and [p.end for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.text for p in parts) == whole
    assert [t for ids in tokenizer.encode_batch([p.text for p in parts]) for t in ids] == tokenizer.encode(whole)


class StartMarkingTokenizer:
    """A stand-in that, like SentencePiece, marks the start of every text it encodes."""

    eos_token_id = 0
    special_tokens = ()

    def __len__(self):
        return 300

    def encode_batch(self, texts):
        return [[1] + [min(ord(c), 299) for c in t] for t in texts]

    def fingerprint(self):
        return "start-marking"


def test_tokenizers_that_cannot_be_cut_read_text_files_whole(tmp_path, tokenizer):
    assert splits_exactly(tokenizer)
    marking = StartMarkingTokenizer()
    assert not splits_exactly(marking)
    path = tmp_path / "t.txt"
    path.write_text("\n".join(builtin_corpus(2000, seed=7)), encoding="utf-8")
    shards = tokenize_corpus(path, marking, tmp_path / "s")
    whole = path.read_text(encoding="utf-8")
    assert shards.slice(0, len(shards)).tolist() == marking.encode_batch([whole])[0] + [0]


def test_worker_processes_are_used_for_large_corpora_only():
    cpus = available_cpus()
    assert auto_workers(None) == 0 and auto_workers(1 << 20) == 0
    assert auto_workers(1 << 30) == (cpus if cpus > 1 else 0)


def test_parts_blank_documents_and_worker_processes(tmp_path, tokenizer):
    docs = builtin_corpus(300, seed=8)
    items = [DocumentPart("  \n", False), DocumentPart(docs[0][:10], False), DocumentPart(docs[0][10:], True),
             "   ", DocumentPart(" ", False), DocumentPart("\n", True), *docs[1:], DocumentPart("last", False)]
    streams = {}
    for workers in (0, 2):
        info = write_token_shards(items, tokenizer, tmp_path / f"w{workers}", shard_tokens=3000, batch_documents=7,
                                  workers=workers)
        assert info.num_documents == 301  # blank documents dropped; the unfinished last one is ended
        streams[workers] = TokenShards(tmp_path / f"w{workers}").slice(0, info.num_tokens).tolist()
    eos = tokenizer.eos_token_id
    # a blank part before a document's text is kept (it is part of the document); blank documents are not
    expected = (tokenizer.encode("  \n") + tokenizer.encode(docs[0][:10]) + tokenizer.encode(docs[0][10:]) + [eos]
                + [t for d in docs[1:] for t in tokenizer.encode(d) + [eos]] + tokenizer.encode("last") + [eos])
    assert streams[0] == expected and streams[2] == expected
    with pytest.raises(DataError, match="empty"):
        write_token_shards([DocumentPart(" ", False), DocumentPart("", True), "\n"], tokenizer, tmp_path / "e")
    assert not (tmp_path / "e").exists()
