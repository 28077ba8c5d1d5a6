"""The one normaliser: every supported schema → the same internal records; bad input → file:line errors."""

import json
import logging
import re

import pytest

from minillm.data.formats import (
    Conversation,
    DataError,
    LabelledSequence,
    Message,
    NotUTF8Error,
    PreferencePair,
    detect_schema,
    iter_json_objects,
    iter_records,
    load_records,
    load_word_vocab,
    read_text,
    to_conversation,
    to_preference,
)

SYS, Q1, A1, Q2, A2 = "你是一个乐于助人的助手。", "你好", "你好！有什么可以帮你？", "1+1等于几？", "等于2。"
FULL = Conversation((Message("system", SYS), Message("user", Q1), Message("assistant", A1),
                     Message("user", Q2), Message("assistant", A2)))
SINGLE = Conversation((Message("user", Q1), Message("assistant", A1)))


def role_msgs(*pairs, role="role", content="content"):
    return [{role: r, content: c} for r, c in pairs]


FULL_PAIRS = (("system", SYS), ("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2))
SG = {"system": "system", "user": "human", "assistant": "gpt"}

# schema name → (record, expected conversation)
CONVERSATIONS = {
    "messages": ({"messages": role_msgs(*FULL_PAIRS)}, FULL),
    "messages aliases": ({"messages": role_msgs(("system", SYS), ("human", Q1), ("gpt", A1), ("user", Q2),
                                                ("model", A2))}, FULL),
    "minimind": ({"conversations": role_msgs(*FULL_PAIRS)}, FULL),
    "sharegpt": ({"conversations": role_msgs(*((SG[r], c) for r, c in FULL_PAIRS), role="from", content="value")},
                 FULL),
    "sharegpt top-level system": ({"system": SYS, "conversations": role_msgs(
        ("human", Q1), ("gpt", A1), ("user", Q2), ("assistant", A2), role="from", content="value")}, FULL),
    "alpaca": ({"instruction": Q2, "input": "", "output": A2, "system": SYS, "history": [[Q1, A1]]}, FULL),
    "qa": ({"question": Q1, "answer": A1}, SINGLE),
    "prompt_completion": ({"prompt": Q1, "completion": A1}, SINGLE),
    "prompt_completion conversational": ({"prompt": role_msgs(*FULL_PAIRS[:4]),
                                          "completion": role_msgs(FULL_PAIRS[4])}, FULL),
}

P_SYS, P_Q, CHOSEN, REJECTED = "你是一名医生。", "感冒了怎么办？", "多休息，多喝水。", "不用管它。"
PAIR = PreferencePair((Message("system", P_SYS), Message("user", P_Q)), CHOSEN, REJECTED)
PAIR_NO_SYS = PreferencePair((Message("user", P_Q),), CHOSEN, REJECTED)
PROMPT = role_msgs(("system", P_SYS), ("user", P_Q))

PREFERENCES = {
    "trl strings": ({"prompt": P_Q, "chosen": CHOSEN, "rejected": REJECTED}, PAIR_NO_SYS),
    "trl message lists": ({"prompt": PROMPT, "chosen": role_msgs(("assistant", CHOSEN)),
                           "rejected": role_msgs(("assistant", REJECTED))}, PAIR),
    "trl full conversations": ({"prompt": PROMPT, "chosen": PROMPT + role_msgs(("assistant", CHOSEN)),
                                "rejected": PROMPT + role_msgs(("assistant", REJECTED))}, PAIR),
    "trl_implicit (minimind dpo)": ({"chosen": PROMPT + role_msgs(("assistant", CHOSEN)),
                                     "rejected": PROMPT + role_msgs(("assistant", REJECTED))}, PAIR),
    "sharegpt_pref MedicalGPT": ({"conversations": [{"from": "system", "value": P_SYS},
                                                    {"from": "human", "value": P_Q}],
                                  "chosen": CHOSEN, "rejected": REJECTED}, PAIR),
    "sharegpt_pref LLaMA-Factory": ({"conversations": [{"from": "human", "value": P_Q}],
                                     "chosen": {"from": "gpt", "value": CHOSEN},
                                     "rejected": {"from": "gpt", "value": REJECTED}}, PAIR_NO_SYS),
    "sharegpt_pref LLaMA-Factory system": ({"system": P_SYS, "conversations": [{"from": "human", "value": P_Q}],
                                            "chosen": {"from": "gpt", "value": CHOSEN},
                                            "rejected": {"from": "gpt", "value": REJECTED}}, PAIR),
}


def write_jsonl(path, records, lines=None):
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in records) if lines is None else "\n".join(lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def write(tmp_path, records, layout, name="data"):
    if layout == "array":
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
        return path
    return write_jsonl(tmp_path / f"{name}.jsonl", records)


def schema_name(case):
    return case.split()[0]


@pytest.mark.parametrize("layout", ["jsonl", "array"])
@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_conversation_schemas_normalise_identically(tmp_path, case, layout, caplog):
    record, expected = CONVERSATIONS[case]
    with caplog.at_level(logging.INFO, logger="minillm.data"):
        result = load_records(write(tmp_path, [record, record], layout))
    assert result.kind == "conversation"
    assert result.schemas == {schema_name(case): 2}
    assert result.records == [expected, expected] and not result.skipped
    assert schema_name(case) in caplog.text
    assert detect_schema(record) == ("conversation", schema_name(case))
    assert to_conversation(record) == expected


@pytest.mark.parametrize("layout", ["jsonl", "array"])
@pytest.mark.parametrize("case", list(PREFERENCES))
def test_preference_schemas_normalise_identically(tmp_path, case, layout):
    record, expected = PREFERENCES[case]
    result = load_records(write(tmp_path, [record], layout), kind="preference")
    assert (result.kind, result.schemas, result.records) == ("preference", {schema_name(case): 1}, [expected])
    assert to_preference(record) == expected


def test_labelled_and_text(tmp_path):
    tokens = "<IMG> <Z_001> <Z_002> </IMG> <CLS> <CLS_3> <EOS>"
    path = write_jsonl(tmp_path / "l.jsonl", [{"tokens": tokens, "label": 3},
                                              {"tokens": tokens.split(), "label": " 3"}])
    result = load_records(path)
    assert result.kind == "labelled" and result.schemas == {"labelled": 2}
    assert result.records == [LabelledSequence(tuple(tokens.split()), 3)] * 2
    text = load_records(write_jsonl(tmp_path / "t.jsonl", [{"text": "一段文字", "id": 1}]), kind="text")
    assert (text.kind, text.records) == ("text", ["一段文字"])


def test_json_file_holding_jsonl_and_directory(tmp_path):
    record, expected = CONVERSATIONS["qa"]
    write_jsonl(tmp_path / "b.json", [record])  # JSONL content in a .json file
    write(tmp_path, [record, record], "array", name="a")
    (tmp_path / "notes.txt").write_text("ignored")
    assert load_records(tmp_path / "b.json").records == [expected]
    assert [line for line, _ in iter_records(tmp_path)] == [0, 1, 1]  # a.json items 0, 1; b.json line 1
    assert load_records(tmp_path).schemas == {"qa": 3}


def test_same_kind_schemas_mix(tmp_path):
    records = [CONVERSATIONS["sharegpt"][0], CONVERSATIONS["alpaca"][0], CONVERSATIONS["sharegpt"][0]]
    result = load_records(write_jsonl(tmp_path / "mix.jsonl", records))
    assert result.schemas == {"sharegpt": 2, "alpaca": 1} and result.records == [FULL] * 3


def test_mixing_kinds_fails_with_file_line(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [CONVERSATIONS["messages"][0], PREFERENCES["trl strings"][0]])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: mixing schemas: a preference record "
                                        r"\(schema 'trl'\) in conversation data"):
        load_records(path)
    with pytest.raises(DataError, match=r"sft.jsonl:1: expected preference records, got a conversation"):
        load_records(path, kind="preference")


def test_malformed_json_names_the_line(tmp_path):
    good = json.dumps(CONVERSATIONS["qa"][0], ensure_ascii=False)
    path = write_jsonl(tmp_path / "bad.jsonl", None, lines=[good, "", '{"question": "x", "answer"', good])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: malformed JSON"):
        load_records(path)
    arr = tmp_path / "bad.json"
    arr.write_text('[\n{"question": "q", "answer": "a"},\n{"question": }\n]')
    with pytest.raises(DataError, match=r"bad.json:3: malformed JSON"):
        load_records(arr)


def test_skip_bad_counts_and_all_bad_still_raises(tmp_path):
    good = json.dumps(CONVERSATIONS["qa"][0], ensure_ascii=False)
    lines = [good, "not json", good, '{"question": "q", "answer": ""}', '{"foo": 1}', good]
    result = load_records(write_jsonl(tmp_path / "some.jsonl", None, lines=lines), skip_bad=True)
    assert len(result.records) == 3 and result.schemas == {"qa": 3}
    assert [(b.line, b.reason.split(" (")[0]) for b in result.skipped] == [
        (2, "malformed JSON"), (4, "empty content in field 'answer'"), (5, "record matches no known conversation schema")]
    assert str(result.skipped[0]).startswith(f"{tmp_path / 'some.jsonl'}:2: malformed JSON")
    bad = tmp_path / "all_bad.json"
    bad.write_text(json.dumps([{"foo": 1}, {"question": "", "answer": "a"}]))
    with pytest.raises(DataError, match=r"every record is bad \(2 skipped; first: .*all_bad.json: item 0: "):
        load_records(bad, skip_bad=True)


def test_no_schema_lists_fields_and_expected(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"query": "q", "response": "r"}])
    with pytest.raises(DataError, match=r"x.jsonl:1: record matches no known schema \(fields: query, response\); "
                                        r"expected one of: sharegpt_pref .*alpaca .*text"):
        load_records(path)


QA, LAB, PREF = CONVERSATIONS["qa"][0], {"tokens": "<A>", "label": 0}, PREFERENCES["trl strings"][0]


@pytest.mark.parametrize(("good", "bad", "reason"), [
    (QA, {"messages": role_msgs(("user", "q"), ("tool", "x"), ("assistant", "a"))},
     r"messages\[1\]: unknown role 'tool'"),
    (QA, {"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "a"}]},
     r"conversations\[0\]: empty content"),
    (QA, {"instruction": "q", "output": ""}, r"empty content in field 'output'"),
    (QA, {"messages": role_msgs(("system", "s"), ("user", "q"))}, r"conversation has no assistant turn"),
    (LAB, {"tokens": "<IMG> </IMG>", "label": 2.5}, r"label must be an integer"),
    (LAB, {"tokens": "<IMG> </IMG>", "label": "three"}, r"label must be an integer"),
    (LAB, {"tokens": "<IMG> </IMG>", "label": True}, r"label must be an integer"),
    (LAB, {"tokens": "", "label": 1}, r"empty content in field 'tokens'"),
    (PREF, {"chosen": role_msgs(("user", "q"), ("assistant", "a")),
            "rejected": role_msgs(("user", "p"), ("assistant", "b"))}, r"'chosen' and 'rejected' must share"),
    (PREF, {"prompt": "q", "chosen": role_msgs(("user", "q")), "rejected": "b"},
     r"field 'chosen' must hold one assistant reply"),
    (PREF, {"prompt": role_msgs(("user", "q"), ("assistant", "a")), "chosen": "c", "rejected": "b"},
     r"the preference prompt must end with a user turn"),
])
def test_bad_records_name_the_line(tmp_path, good, bad, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: {reason}"):
        load_records(path)


def test_helpers_reject_other_kinds():
    with pytest.raises(DataError, match="expected a conversation record, got a preference record"):
        to_conversation(PREFERENCES["trl strings"][0])
    with pytest.raises(DataError, match="no known preference schema"):
        to_preference({"foo": 1})
    assert detect_schema({"foo": 1}) is None and detect_schema([1]) is None


def test_load_word_vocab(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"<PAD>": 0, "<IMG>": 1, "<Z_001>": 2}))
    (tmp_path / "l.json").write_text(json.dumps(["<PAD>", "<IMG>", "<Z_001>"]))
    assert load_word_vocab(tmp_path / "d.json") == load_word_vocab(tmp_path / "l.json") == {
        "<PAD>": 0, "<IMG>": 1, "<Z_001>": 2}


@pytest.mark.parametrize(("text", "reason"), [
    ('{"a": 0, "b": 0}', r"duplicate id 0 \(tokens 'a' and 'b'\)"),
    ('{"a": 0, "a": 1}', r"duplicate token 'a'"),
    ('["a", "b", "a"]', r"duplicate token 'a' at ids \[0, 2\]"),
    ('{"a": "0"}', r"id of token 'a' must be a non-negative integer, got '0'"),
    ('{"a": 1.0}', r"must be a non-negative integer"),
    ('["a", 3]', r"item 1: a token must be a string"),
    ('{"a b": 0}', r"contains whitespace"),
    ('"a"', r"expected a JSON object"),
    ('{"a": 0,', r"vocab.json:1: malformed JSON"),
])
def test_load_word_vocab_errors(tmp_path, text, reason):
    (tmp_path / "vocab.json").write_text(text)
    with pytest.raises(DataError, match=reason):
        load_word_vocab(tmp_path / "vocab.json")
    with pytest.raises(DataError, match="no such vocabulary file"):
        load_word_vocab(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------- the one reader
LAYOUTS = {  # the same two records, or one, as every layout the reader takes
    "jsonl": '{"text": "a"}\n\n{"text": "b"}\n',
    "array": '[\n  {"text": "a"},\n  {"text": "b"}\n]\n',
    "pretty object": '{\n  "text": "a"\n}\n',
}


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("bom", ["", "\ufeff"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_json_records_are_read_alike_whatever_the_layout_suffix_or_bom(tmp_path, layout, bom, suffix):
    from minillm.data.pretrain import iter_documents

    path = tmp_path / f"data{suffix}"
    path.write_text(bom + LAYOUTS[layout], encoding="utf-8")
    objects = [obj for _, _, obj in iter_json_objects(path)]
    assert objects == ([{"text": "a"}] if layout == "pretty object" else [{"text": "a"}, {"text": "b"}])
    assert [r for _, r in iter_records(path)] == [o["text"] for o in objects]
    if suffix == ".jsonl" or layout == "array":  # a .json corpus file holds a list
        assert list(iter_documents(path)) == [o["text"] for o in objects]


def test_json_reader_names_file_line_and_byte(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: not UTF-8 .*at byte 28"):
        list(iter_json_objects(path))
    path.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl:2: malformed JSON"):
        list(iter_json_objects(path))
    path = tmp_path / "b.json"
    path.write_text('[{"text": "ok"},\n {"text": }]', encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.json:2: malformed JSON"):
        list(iter_json_objects(path))


def test_read_text_drops_a_bom_and_names_the_first_bad_byte(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\ufeff正文\n", encoding="utf-8")
    assert read_text(path) == "正文\n" and read_text(path, max_chars=1) == "正"
    path.write_bytes(b"good line\nbad \xff here\n")
    with pytest.raises(NotUTF8Error, match=r"t\.txt:2: not UTF-8 text .*at byte 14") as caught:
        read_text(path)
    assert (caught.value.line, caught.value.file) == (2, path)
