"""Fault suite, data: every bad corpus or dataset is refused with exit status 2 and one line naming the
culprit (the file, its line or byte where there is one, the field or flag), never a traceback and never
silence; nothing half-written is left behind. Also: a huge single-line document is read, trained on and
tokenized in bounded pieces."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from minillm.cli import main
from minillm.data.builtin import builtin_corpus
from minillm.data.formats import DataError
from minillm.data.pretrain import (
    DOCUMENT_SPLIT_CHARS,
    MAX_PART_CHARS,
    TEXT_PART_CHARS,
    TokenShards,
    _batches,
    iter_document_parts,
    iter_documents,
    split_document,
    write_token_shards,
)
from minillm.tokenizer import BPETokenizer
from minillm.tokenizer.bpe_tokenizer import _PIECE_BREAKS, training_pieces

GOOD_TEXT = "\n".join(builtin_corpus(60, seed=11))
GOOD_JSONL = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in builtin_corpus(60, seed=12))
BOM = "\ufeff"
FAST_TRAIN = ["--max-steps", "1", "--max-length", "32", "--batch-size", "2", "--precision", "fp32",
              "model.preset=micro", "tokenizer.vocab_size=300", "training.progress=false"]


def jsonl(*objects) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o, ensure_ascii=False)) + "\n" for o in objects)


@dataclass
class Row:
    id: str
    argv: list[str]  # run in tmp_path, so paths are relative and messages name them as given
    files: dict[str, str | bytes]  # name → content; a name ending in "/" is an (empty) directory
    expect: list[str]  # what the one error line (or, with code 0, the output) must contain
    code: int = 2
    untouched: list[str] = field(default_factory=list)  # files of `files` that must keep their content
    absent: list[str] = field(default_factory=list)  # paths that must not exist afterwards


ROWS = [
    # ---------------------------------------------------------------- corpus reading (tokenizer train)
    Row("tok-malformed-jsonl-line", ["tokenizer", "train", "--data", "a.jsonl", "--out", "tok"],
        {"a.jsonl": jsonl({"text": "ok"}, '{"text": "broken', {"text": "ok"})}, ["a.jsonl:2", "malformed JSON"],
        absent=["tok"]),
    Row("tok-truncated-last-line", ["tokenizer", "train", "--data", "a.jsonl", "--out", "tok"],
        {"a.jsonl": jsonl({"text": "ok"}) + '{"text": "cut off'}, ["a.jsonl:2", "malformed JSON"]),
    Row("tok-json-not-an-object", ["tokenizer", "train", "--data", "a.jsonl", "--out", "tok"],
        {"a.jsonl": jsonl({"text": "ok"}, [1, 2])}, ["a.jsonl:2", "expected an object", "'text'", "list"]),
    Row("tok-missing-text-field", ["tokenizer", "train", "--data", "a.jsonl", "--out", "tok"],
        {"a.jsonl": jsonl({"text": "ok"}, {"content": "x"})}, ["a.jsonl:2", "missing field 'text'", "content"]),
    Row("tok-custom-text-field-missing",
        ["tokenizer", "train", "--data", "a.jsonl", "--text-field", "body", "--out", "tok"],
        {"a.jsonl": jsonl({"text": "x"})}, ["a.jsonl:1", "missing field 'body'"]),
    Row("tok-text-not-a-string", ["tokenizer", "train", "--data", "a.jsonl", "--out", "tok"],
        {"a.jsonl": jsonl({"text": 5})}, ["a.jsonl:1", "field 'text' must be a string", "int"]),
    Row("tok-json-file-not-a-list", ["tokenizer", "train", "--data", "c.json", "--out", "tok"],
        {"c.json": '{"text": "x"}'}, ["c.json", "expected a JSON list", "dict"]),
    Row("tok-json-file-malformed", ["tokenizer", "train", "--data", "c.json", "--out", "tok"],
        {"c.json": '["a",\n "b'}, ["c.json:2", "malformed JSON"]),
    Row("tok-empty-file", ["tokenizer", "train", "--data", "e.txt", "--out", "tok"],
        {"e.txt": ""}, ["e.txt", "empty corpus", "no non-blank document"], absent=["tok"]),
    Row("tok-blank-file", ["tokenizer", "train", "--data", "b.txt", "--out", "tok"],
        {"b.txt": "  \n\t\n\u3000\n"}, ["b.txt", "no non-blank document"]),
    Row("tok-blank-jsonl-texts", ["tokenizer", "train", "--data", "a.jsonl", "--out", "tok"],
        {"a.jsonl": jsonl({"text": "  "}, {"text": ""}, "", {"text": "\n"})}, ["a.jsonl", "no non-blank document"]),
    Row("tok-empty-directory", ["tokenizer", "train", "--data", "d", "--out", "tok"],
        {"d/": ""}, ["d", "contains no text files"]),
    Row("tok-directory-of-unreadable-kinds", ["tokenizer", "train", "--data", "d", "--out", "tok"],
        {"d/image.png": b"\x89PNG\r\n", "d/data.bin": b"\x00\x01"}, ["d", "contains no text files"]),
    Row("tok-directory-of-blank-files", ["tokenizer", "train", "--data", "d", "--out", "tok"],
        {"d/a.txt": "\n", "d/b.jsonl": "\n\n"}, ["d", "no non-blank document"]),
    Row("tok-not-utf8-jsonl", ["tokenizer", "train", "--data", "a.jsonl", "--out", "tok"],
        {"a.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n'}, ["a.jsonl:2", "not UTF-8", "at byte 28"]),
    Row("tok-not-utf8-text", ["tokenizer", "train", "--data", "c.txt", "--out", "tok"],
        {"c.txt": b"good line\nbad \xff here\n"}, ["c.txt:2", "not UTF-8", "at byte 14"]),
    Row("tok-missing-path", ["tokenizer", "train", "--data", "nope.txt", "--out", "tok"],
        {}, ["nope.txt", "no such file or directory"]),
    Row("tok-vocab-size-too-small", ["tokenizer", "train", "--vocab-size", "100", "--out", "tok"],
        {}, ["--vocab-size", "at least 260", "got 100"]),
    Row("tok-vocab-size-negative", ["tokenizer", "train", "--vocab-size", "-5", "--out", "tok"],
        {}, ["--vocab-size", "got -5"]),
    Row("tok-builtin-zero-documents", ["tokenizer", "train", "--num-documents", "0", "--out", "tok"],
        {}, ["--num-documents", "got 0"]),
    Row("tok-out-not-empty", ["tokenizer", "train", "--data", "a.txt", "--vocab-size", "300", "--out", "tok"],
        {"a.txt": GOOD_TEXT, "tok/notes.txt": "mine"}, ["tok", "not empty", "--overwrite"], untouched=["tok/notes.txt"]),
    Row("tok-out-is-a-file", ["tokenizer", "train", "--data", "a.txt", "--vocab-size", "300", "--out", "tok"],
        {"a.txt": GOOD_TEXT, "tok": "a file"}, ["tok", "not a directory"], untouched=["tok"]),
    Row("tok-bom-jsonl-trains", ["tokenizer", "train", "--data", "a.jsonl", "--vocab-size", "300", "--out", "tok"],
        {"a.jsonl": BOM + GOOD_JSONL}, ["saved a", "tok"], code=0),
    Row("tok-bom-text-trains", ["tokenizer", "train", "--data", "a.txt", "--vocab-size", "300", "--out", "tok"],
        {"a.txt": BOM + GOOD_TEXT}, ["saved a"], code=0),
    Row("tok-eval-empty-corpus", ["tokenizer", "eval", "--data", "b.txt", "--tokenizer", "none"],
        {"b.txt": " \n"}, ["b.txt", "no non-blank document"]),
    Row("tok-eval-zero-documents", ["tokenizer", "eval", "--data", "a.txt", "--tokenizer", "none",
                                    "--max-documents", "0"], {"a.txt": GOOD_TEXT}, ["--max-documents", "got 0"]),
    # ---------------------------------------------------------------- data inspect
    Row("inspect-every-record-bad", ["data", "inspect", "a.jsonl"],
        {"a.jsonl": "{bad\n\n{worse\n[1\n"}, ["a.jsonl", "no valid record", "3 bad", "a.jsonl:1", "malformed JSON"]),
    Row("inspect-empty-jsonl", ["data", "inspect", "e.jsonl"], {"e.jsonl": ""}, ["e.jsonl", "no records"]),
    Row("inspect-empty-text", ["data", "inspect", "e.txt"], {"e.txt": ""}, ["e.txt", "empty text file"]),
    Row("inspect-blank-text", ["data", "inspect", "b.txt"], {"b.txt": " \n \n"}, ["b.txt", "empty text file"]),
    Row("inspect-missing-path", ["data", "inspect", "nope.jsonl"], {}, ["nope.jsonl", "no such file"]),
    Row("inspect-empty-directory", ["data", "inspect", "d"], {"d/": ""}, ["d", "contains no text files"]),
    Row("inspect-not-utf8-only-record", ["data", "inspect", "a.jsonl"],
        {"a.jsonl": b'{"text": "\xff"}\n'}, ["a.jsonl:1", "not UTF-8", "1 bad"]),
    Row("inspect-conversation-bad-role", ["data", "inspect", "a.jsonl"],
        {"a.jsonl": jsonl({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]})},
        ["a.jsonl:1", "unknown role 'wizard'", "messages[0]"]),
    Row("inspect-bom-text-works", ["data", "inspect", "a.txt"], {"a.txt": BOM + "一二三\n"}, ["records: 1", "total 4"],
        code=0),
    # ---------------------------------------------------------------- data prepare
    Row("prepare-malformed-line", ["data", "prepare", "a.jsonl", "--out", "out"],
        {"a.jsonl": jsonl({"text": "ok"}, "{oops", {"text": "fine"})}, ["a.jsonl:2", "malformed JSON"], absent=["out"]),
    Row("prepare-every-record-bad", ["data", "prepare", "a.jsonl", "--out", "out", "--skip-bad"],
        {"a.jsonl": "{bad\n{worse\n"}, ["every record is bad", "2 read", "a.jsonl:1", "nothing written"],
        absent=["out"]),
    Row("prepare-empty-after-filters", ["data", "prepare", "a.jsonl", "--out", "out", "--min-chars", "1000"],
        {"a.jsonl": jsonl({"text": "short one"}, {"text": "short two"})},
        ["a.jsonl", "no record left", "too_short 2", "a.jsonl:1", "nothing written"], absent=["out"]),
    Row("prepare-empty-after-dedup-and-sample", ["data", "prepare", "a.jsonl", "--out", "out", "--sample", "0.2"],
        {"a.jsonl": jsonl({"text": "same text"}, {"text": "same text"})},
        ["no record left", "duplicate 1", "sampled_out 1", "nothing written"], absent=["out"]),
    Row("prepare-empty-input", ["data", "prepare", "e.jsonl", "--out", "out"], {"e.jsonl": ""},
        ["e.jsonl", "no records"], absent=["out"]),
    Row("prepare-empty-input-skip-bad", ["data", "prepare", "e.jsonl", "--out", "out", "--skip-bad"],
        {"e.jsonl": "\n\n"}, ["e.jsonl", "no records to prepare", "nothing written"], absent=["out"]),
    Row("prepare-blank-text-file", ["data", "prepare", "b.txt", "--out", "out"], {"b.txt": "\n \n"},
        ["b.txt", "no record left", "empty 1", "b.txt:1"], absent=["out"]),
    Row("prepare-out-not-empty", ["data", "prepare", "a.jsonl", "--out", "out"],
        {"a.jsonl": jsonl({"text": "fine"}), "out/keep.txt": "mine"}, ["out", "not empty", "--overwrite"],
        untouched=["out/keep.txt"]),
    Row("prepare-out-not-empty-checked-first", ["data", "prepare", "nope.jsonl", "--out", "out"],
        {"out/keep.txt": "mine"}, ["out", "not empty", "--overwrite"], untouched=["out/keep.txt"]),
    Row("prepare-sample-zero", ["data", "prepare", "a.jsonl", "--out", "out", "--sample", "0"],
        {"a.jsonl": jsonl({"text": "fine"})}, ["--sample", "got 0.0"], absent=["out"]),
    Row("prepare-sample-negative", ["data", "prepare", "a.jsonl", "--out", "out", "--sample", "-3"],
        {"a.jsonl": jsonl({"text": "fine"})}, ["--sample", "got -3.0"], absent=["out"]),
    Row("prepare-val-fraction-above-one", ["data", "prepare", "a.jsonl", "--out", "out", "--val-fraction", "1.5"],
        {"a.jsonl": jsonl({"text": "fine"})}, ["--val-fraction", "[0, 1)", "got 1.5"], absent=["out"]),
    Row("prepare-min-chars-negative", ["data", "prepare", "a.jsonl", "--out", "out", "--min-chars", "-1"],
        {"a.jsonl": jsonl({"text": "fine"})}, ["--min-chars", "got -1"], absent=["out"]),
    Row("prepare-missing-input", ["data", "prepare", "nope.jsonl", "--out", "out"], {},
        ["nope.jsonl", "no such file"], absent=["out"]),
    Row("prepare-not-utf8-text", ["data", "prepare", "c.txt", "--out", "out"],
        {"c.txt": b"good line\nbad \xff here\n"}, ["c.txt", "not UTF-8", "at byte 14"], absent=["out"]),
    Row("prepare-conversation-missing-content", ["data", "prepare", "a.jsonl", "--out", "out"],
        {"a.jsonl": jsonl({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]})},
        ["a.jsonl:1", "messages[0]", "content must be a string"]),
    Row("prepare-conversation-bad-role", ["data", "prepare", "a.jsonl", "--out", "out"],
        {"a.jsonl": jsonl({"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]})},
        ["a.jsonl:1", "unknown role 'alien'"]),
    Row("prepare-conversation-without-assistant", ["data", "prepare", "a.jsonl", "--out", "out"],
        {"a.jsonl": jsonl({"messages": [{"role": "user", "content": "hi"}]})}, ["a.jsonl:1", "no assistant turn"]),
    Row("prepare-preference-missing-rejected", ["data", "prepare", "a.jsonl", "--out", "out", "--kind", "preference"],
        {"a.jsonl": jsonl({"prompt": "q", "chosen": "a"})}, ["a.jsonl:1", "missing field 'rejected'"]),
    Row("prepare-preference-missing-chosen-detected", ["data", "prepare", "a.jsonl", "--out", "out"],
        {"a.jsonl": jsonl({"prompt": "q", "rejected": "a"})}, ["a.jsonl:1", "missing field 'chosen'"]),
    Row("prepare-preference-empty-chosen", ["data", "prepare", "a.jsonl", "--out", "out"],
        {"a.jsonl": jsonl({"prompt": "q", "chosen": " ", "rejected": "b"})}, ["a.jsonl:1", "empty content", "'chosen'"]),
    Row("prepare-labelled-label-not-integer", ["data", "prepare", "a.jsonl", "--out", "out"],
        {"a.jsonl": jsonl({"tokens": "a b", "label": "x"})}, ["a.jsonl:1", "label must be an integer", "'x'"]),
    Row("prepare-labelled-label-negative", ["data", "prepare", "a.jsonl", "--out", "out"],
        {"a.jsonl": jsonl({"tokens": ["a", "b"], "label": -2})}, ["a.jsonl:1", "label must be >= 0", "-2"]),
    Row("prepare-mixed-kinds", ["data", "prepare", "a.jsonl", "--out", "out"],
        {"a.jsonl": jsonl({"text": "t"}, {"question": "q", "answer": "a"})}, ["a.jsonl:2", "mixing schemas"]),
    Row("prepare-bom-jsonl-works", ["data", "prepare", "a.jsonl", "--out", "out"],
        {"a.jsonl": BOM + jsonl({"text": "第一条"}, {"text": "second"})}, ["read 2, kept 2"], code=0),
    # ---------------------------------------------------------------- train (the tokenizer is trained on the data)
    Row("train-empty-file", ["train", "--data", "e.txt", "--out-dir", "run", *FAST_TRAIN], {"e.txt": ""},
        ["e.txt", "no non-blank document"], absent=["run/final"]),
    Row("train-blank-jsonl", ["train", "--data", "a.jsonl", "--out-dir", "run", *FAST_TRAIN],
        {"a.jsonl": jsonl({"text": " "}, {"text": "\t"})}, ["a.jsonl", "no non-blank document"]),
    Row("train-empty-directory", ["train", "--data", "d", "--out-dir", "run", *FAST_TRAIN], {"d/": ""},
        ["d", "contains no text files"]),
    Row("train-missing-data", ["train", "--data", "nope.txt", "--out-dir", "run", *FAST_TRAIN], {},
        ["nope.txt", "no such file or directory"]),
    Row("train-missing-text-field", ["train", "--data", "a.jsonl", "--out-dir", "run", *FAST_TRAIN],
        {"a.jsonl": jsonl({"text": "ok"}, {"body": "x"})}, ["a.jsonl:2", "missing field 'text'"]),
    Row("train-not-utf8", ["train", "--data", "c.txt", "--out-dir", "run", *FAST_TRAIN],
        {"c.txt": b"ok\n\xfe\n"}, ["c.txt:2", "not UTF-8", "at byte 3"]),
]


def _materialise(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8", newline="")


def test_the_table_is_large_and_its_ids_unique():
    assert len(ROWS) >= 30 and len({row.id for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_data_is_refused_in_one_line_naming_the_culprit(row, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _materialise(tmp_path, row.files)
    code = main(row.argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert code == row.code, f"exit {code}, expected {row.code}; stderr: {err}"
    if row.code == 2:
        lines = [line for line in err.splitlines() if line.startswith("minillm ")]
        assert len(lines) == 1, err
        assert lines[0].startswith(f"minillm {' '.join(row.argv[:2 if row.argv[0] in ('data', 'tokenizer') else 1])}: "
                                   "error: ")
        for part in row.expect:
            assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    else:
        for part in row.expect:
            assert part in out, f"{part!r} not in {out!r}"
    for name in row.untouched:
        assert (tmp_path / name).read_text(encoding="utf-8") == row.files[name]
    for name in row.absent:
        assert not (tmp_path / name).exists(), f"{name} was written"


# ------------------------------------------------------------------------------------- library calls
def test_training_a_tokenizer_on_nothing_is_a_data_error():
    for texts in ([], ["", "  \n", "\t"], iter(())):
        with pytest.raises(DataError, match="empty corpus"):
            BPETokenizer(vocab_size=300).train(texts)
    with pytest.raises(DataError, match=r"^corpus\.txt: empty corpus: no non-blank document"):
        BPETokenizer(vocab_size=300).train([" "], source="corpus.txt")
    with pytest.raises(TypeError):
        BPETokenizer(vocab_size=300).train([b"bytes"])


def test_a_bom_is_dropped_from_every_kind_of_corpus_file(tmp_path):
    (tmp_path / "a.txt").write_text(BOM + "正文", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(BOM + jsonl({"text": "x"}, {"text": "y"}), encoding="utf-8")
    (tmp_path / "c.json").write_text(BOM + json.dumps(["z"]), encoding="utf-8")
    assert list(iter_documents(tmp_path)) == ["正文", "x", "y", "z"]
    assert [p.text for p in iter_document_parts(tmp_path / "a.txt")] == ["正文"]


def test_prepare_overwrite_replaces_the_output_and_a_failed_run_keeps_the_old_one(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text(jsonl({"text": "第一条记录"}, {"text": "the second record"}), encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["data", "prepare", str(good), "--out", str(out)]) == 0
    before = (out / "train.jsonl").read_text(encoding="utf-8")
    assert main(["data", "prepare", str(good), "--out", str(out)]) == 2  # refused without --overwrite
    assert main(["data", "prepare", str(bad), "--out", str(out), "--overwrite", "--skip-bad"]) == 2
    assert (out / "train.jsonl").read_text(encoding="utf-8") == before  # the failed run replaced nothing
    (out / "stale.txt").write_text("old", encoding="utf-8")
    assert main(["data", "prepare", str(good), "--out", str(out), "--overwrite", "--min-chars", "6"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "train.jsonl"]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["files"]["train"] == str(out / "train.jsonl") and report["kept"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging directory left
    capsys.readouterr()


def test_tokenizer_train_overwrite(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(GOOD_TEXT, encoding="utf-8")
    out = tmp_path / "tok"
    out.mkdir()
    (out / "old.txt").write_text("old", encoding="utf-8")
    assert main(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--out", str(out)]) == 2
    assert main(["tokenizer", "train", "--data", str(corpus), "--vocab-size", "300", "--out", str(out),
                 "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and len(BPETokenizer.from_pretrained(out)) <= 300
    capsys.readouterr()


# ------------------------------------------------------------------------------------- huge documents
def _single_line(tokenizer, min_chars: int) -> tuple[str, int]:
    """Built-in documents joined into one line, repeated to at least `min_chars` characters; the
    block's ids repeat exactly (so the ids of the whole line are known without encoding it)."""
    docs = [d.replace("\n", " ") for d in builtin_corpus(300, seed=21)]
    docs.sort(key=lambda d: (not d[0].isascii(), d[-1].isdigit()))
    block = " ".join(docs)
    assert tokenizer.encode(block + block) == tokenizer.encode(block) * 2
    return block, min_chars // len(block) + 1


def test_a_huge_document_is_tokenized_in_bounded_pieces_with_the_same_ids(tmp_path, tokenizer):
    block, repeats = _single_line(tokenizer, 2_000_000)
    text = block * repeats
    pieces = [t for batch in _batches([text], 512, 1 << 18, split_chars=1 << 14, protect=tokenizer.special_tokens)
              for t in batch.texts]
    assert len(pieces) > 200 and "".join(pieces) == text
    assert max(len(p) for p in pieces) <= TEXT_PART_CHARS
    # one 2M-character JSONL record, a short document before and after it: one EOS per document
    path = tmp_path / "docs.jsonl"
    path.write_text(jsonl({"text": "开头"}, {"text": text}, {"text": "end"}), encoding="utf-8")
    info = write_token_shards(iter_documents(path), tokenizer, tmp_path / "s", workers=0, split_chars=1 << 14)
    eos = tokenizer.eos_token_id
    expected = (tokenizer.encode("开头") + [eos] + tokenizer.encode(block) * repeats + [eos]
                + tokenizer.encode("end") + [eos])
    assert info.num_documents == 3
    assert np.array_equal(TokenShards(tmp_path / "s").slice(0, info.num_tokens), np.asarray(expected))


def test_documents_below_the_limit_are_encoded_whole_as_before(tokenizer):
    docs = builtin_corpus(500, seed=22) + ["x" * (DOCUMENT_SPLIT_CHARS - 1)]
    unsplit = list(_batches(docs, 64, 1 << 16))
    split = list(_batches(docs, 64, 1 << 16, split_chars=DOCUMENT_SPLIT_CHARS, protect=tokenizer.special_tokens))
    assert [(b.texts, b.ends, b.documents) for b in split] == [(b.texts, b.ends, b.documents) for b in unsplit]


def test_text_without_any_safe_cut_is_still_cut_into_bounded_parts(tmp_path):
    rng = np.random.default_rng(0)
    text = rng.integers(0x4E00, 0x9FA6, 30_000).astype(np.uint32).tobytes().decode("utf-32-le")  # no space at all
    parts = list(split_document(text, True, ("<|endoftext|>",), part_chars=1000, max_part_chars=4000))
    assert "".join(p.text for p in parts) == text and max(len(p.text) for p in parts) <= 4000
    assert [p.end for p in parts] == [False] * (len(parts) - 1) + [True]
    path = tmp_path / "cjk.txt"
    path.write_text(text, encoding="utf-8")
    from minillm.data.pretrain import _iter_text_parts

    parts = list(_iter_text_parts(path, chunk_chars=2000, part_chars=1000, max_part_chars=4000))
    assert "".join(p.text for p in parts) == text and max(len(p.text) for p in parts) <= 4000 + 2 * 1000
    assert len(parts) > 5 and MAX_PART_CHARS > TEXT_PART_CHARS


def test_tokenizer_training_reads_bounded_pieces_of_a_huge_text(tokenizer):
    block, repeats = _single_line(tokenizer, 2_000_000)
    text = block * repeats
    pieces = list(training_pieces(text, 4096))
    assert "".join(pieces) == text and max(len(p) for p in pieces) <= 4096
    assert all(p[0] in _PIECE_BREAKS for p in pieces[1:])  # each cut before a space or a punctuation mark
    # only the first max_text_chars characters are read: the same merges as training on those alone
    capped, prefix = BPETokenizer(vocab_size=400), BPETokenizer(vocab_size=400)
    capped.train([text, "短文"], max_text_chars=50_000)
    prefix.train([text[:50_000], "短文"])
    assert capped.get_vocab() == prefix.get_vocab()
    total, first = BPETokenizer(vocab_size=400), BPETokenizer(vocab_size=400)
    total.train([text, "短文"], max_total_chars=50_000)  # the cap is reached inside the first text
    first.train([text[:50_000]])
    assert total.get_vocab() == first.get_vocab()


def test_inspect_counts_the_tokens_of_a_huge_record_in_parts(tmp_path, tokenizer):
    from minillm.data.prepare import inspect_dataset

    block, repeats = _single_line(tokenizer, 3 * DOCUMENT_SPLIT_CHARS)
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl({"text": "短文"}, {"text": block * repeats}), encoding="utf-8")
    info = inspect_dataset(path, tokenizer=tokenizer)
    assert info["records"] == 2 and info["chars"]["max"] == len(block) * repeats
    assert info["tokens"]["total"] == len(tokenizer.encode("短文")) + len(tokenizer.encode(block)) * repeats


class _StartMarking:
    """Marks the start of every text it encodes (as SentencePiece does): cutting a text changes its ids."""

    eos_token_id = 0
    special_tokens = ()

    def __len__(self):
        return 300

    def encode_batch(self, texts):
        return [[1] + [min(ord(c), 299) for c in t] for t in texts]

    def fingerprint(self):
        return "start-marking"


def test_long_documents_are_not_cut_for_a_tokenizer_that_cannot_be_cut(tmp_path):
    text = "word " * 5000
    info = write_token_shards([text], _StartMarking(), tmp_path / "s", workers=0, split_chars=1000)
    assert TokenShards(tmp_path / "s").slice(0, info.num_tokens).tolist() == [1] + [min(ord(c), 299) for c in text] + [0]
