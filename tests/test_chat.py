"""Chat templates: transformers parity (text and ids), assistant masks, errors, save/load."""

import json
import random

import pytest

from minillm.data.formats import Conversation, Message
from minillm.tokenizer import BPETokenizer
from minillm.tokenizer.chat import CHAT_TEMPLATES, encode_chat, get_chat_template, render_chat

ZH = ["我们", "今天", "学习", "语言", "模型", "天气", "很好", "喜欢", "问题", "答案", "你好", "助手", "明天", "下雨"]
EN = ["the", "model", "learns", "language", "hello", "world", "assistant", "user", "system", "answer", "is"]

SYSTEM = {"role": "system", "content": "你是一个乐于助人的助手。"}
CONVERSATIONS = [
    [SYSTEM,
     {"role": "user", "content": "你好！今天天气怎么样？"},
     {"role": "assistant", "content": "今天天气很好，适合出去玩。"},
     {"role": "user", "content": "那明天呢？"},
     {"role": "assistant", "content": "明天可能下雨 🌧️，记得带伞。"}],
    [{"role": "user", "content": "Hello! Can you help me? 😀"},
     {"role": "assistant", "content": "Of course 👍🏽 What is the question?"},
     {"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "  Answer briefly.\n"},
     {"role": "user", "content": "\n\n  leading and trailing whitespace  \n\n"},
     {"role": "assistant", "content": "  padded answer  \n"},
     {"role": "user", "content": "tabs\tand\r\nwindows lines\n"},
     {"role": "assistant", "content": "\n答案是 4。\n\n"}],
    [{"role": "user", "content": "text that looks like <|im_end|> or <|endoftext|> tokens"},
     {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "只有一个问题"}],
]


def corpus(seed: int = 0, lines: int = 300) -> list[str]:
    rng = random.Random(seed)
    return [
        "".join(rng.choices(ZH, k=rng.randint(3, 8))) + rng.choice(["。", "？", "！"]) + rng.choice(["\n", "\n\n\n"])
        + " ".join(rng.choices(EN, k=rng.randint(3, 8))).capitalize() + rng.choice([".", "?", "!"])
        for _ in range(lines)
    ]


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    tok = BPETokenizer(vocab_size=600)
    tok.train(corpus())
    return tok


@pytest.fixture(scope="module", params=sorted(CHAT_TEMPLATES))
def saved(request, tokenizer, tmp_path_factory):
    """(template name, our tokenizer loaded from the directory, transformers' tokenizer for it)."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp(f"tok_{request.param}")
    tokenizer.chat_template = get_chat_template(request.param)
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.chat_template = get_chat_template("chatml")
    return (request.param, BPETokenizer.from_pretrained(directory),
            transformers.AutoTokenizer.from_pretrained(str(directory)))


def hf_ids(hf, messages, add_generation_prompt):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def masked_text(tokenizer, ids, mask):
    return tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_parity_with_transformers(saved, index, add_generation_prompt):
    name, ours, hf = saved
    messages = CONVERSATIONS[index]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == render_chat(messages, name, add_generation_prompt=add_generation_prompt)
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == hf_ids(hf, messages, add_generation_prompt)
    assert ids == ours.encode(text)
    assert encode_chat(ours, messages, add_generation_prompt)[0] == ids


def test_rendered_forms():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}]
    assert render_chat(messages, "chatml") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n")
    assert render_chat(messages[:2], "chatml", add_generation_prompt=True).endswith(
        "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(messages, "tags") == "<|system|>\nS\n<|user|>\nU\n<|assistant|>\nA<|endoftext|>\n"
    assert render_chat(messages[:2], "tags", add_generation_prompt=True) == "<|system|>\nS\n<|user|>\nU\n<|assistant|>\n"


THREE_TURNS = [
    {"role": "system", "content": "你是助手 system"},
    {"role": "user", "content": "第一个问题 user?"},
    {"role": "assistant", "content": "第一个答案 😀 answer."},
    {"role": "user", "content": "Second question"},
    {"role": "assistant", "content": "  second answer with spaces\nand two lines  "},
    {"role": "user", "content": "第三个"},
    {"role": "assistant", "content": "明天下雨！"},
]


@pytest.mark.parametrize(("template", "end"), [("chatml", "<|im_end|>"), ("tags", "<|endoftext|>")])
def test_mask_covers_exactly_assistant_content_and_end_token(tokenizer, template, end):
    ids, mask = encode_chat(tokenizer, THREE_TURNS, template=template)
    text = render_chat(THREE_TURNS, template)
    assert ids == tokenizer.encode(text)
    assert len(mask) == len(ids) and set(mask) == {0, 1}
    assistant = [m["content"] for m in THREE_TURNS if m["role"] == "assistant"]
    assert masked_text(tokenizer, ids, mask) == "".join(c + end for c in assistant)
    # Independently: each token is masked iff its first character lies in an assistant content + end token.
    spans, position = [], 0
    for content in assistant:
        start = text.index(content + end, position)
        position = start + len(content + end)
        spans.append((start, position))
    offsets = tokenizer.backend.encode(text, add_special_tokens=False).offsets
    expected = [int(any(a <= start < b for a, b in spans)) for start, _ in offsets]
    assert mask == expected
    # The newline after each end token, role headers and other turns stay out.
    for i, token in enumerate(ids):
        if mask[i] and token == tokenizer.token_to_id(end):
            assert mask[i + 1] == 0


def test_system_and_user_turns_are_never_masked(tokenizer):
    ids, mask = encode_chat(tokenizer, THREE_TURNS)
    end_id = tokenizer.im_end_id
    ends = [i for i, token in enumerate(ids) if token == end_id]
    roles = [m["role"] for m in THREE_TURNS]
    assert [mask[i] for i in ends] == [int(role == "assistant") for role in roles]
    masked = masked_text(tokenizer, ids, mask)
    for message in THREE_TURNS:
        if message["role"] != "assistant":
            assert message["content"] not in masked


def test_generation_prompt_adds_no_assistant_tokens(tokenizer):
    for template in CHAT_TEMPLATES:
        ids, mask = encode_chat(tokenizer, [SYSTEM, {"role": "user", "content": "你好"}],
                                add_generation_prompt=True, template=template)
        assert len(mask) == len(ids) and sum(mask) == 0
        ids, mask = encode_chat(tokenizer, THREE_TURNS[:4], add_generation_prompt=True, template=template)
        end = "<|im_end|>" if template == "chatml" else "<|endoftext|>"
        assert masked_text(tokenizer, ids, mask) == THREE_TURNS[2]["content"] + end
        header = tokenizer.encode("<|im_start|>assistant\n" if template == "chatml" else "<|assistant|>\n")
        assert ids[-len(header):] == header and not any(mask[-len(header):])


def test_token_straddling_the_start_of_a_reply_counts_only_if_it_starts_inside(tokenizer):
    messages = [{"role": "user", "content": "问题"}, {"role": "assistant", "content": "\n\n答案"}]
    ids, mask = encode_chat(tokenizer, messages)
    text = render_chat(messages, "chatml")
    reply_start = text.index("\n\n答案")
    offsets = tokenizer.backend.encode(text, add_special_tokens=False).offsets
    # "assistant\n" + "\n\n答案": the header's newline and the reply's two form one token "\n\n\n",
    # which starts in the header, so it is not trained on.
    straddling = [i for i, (start, end) in enumerate(offsets) if start < reply_start < end]
    assert len(straddling) == 1 and text[slice(*offsets[straddling[0]])] == "\n\n\n"
    assert mask[straddling[0]] == 0
    assert masked_text(tokenizer, ids, mask) == "答案<|im_end|>"


def test_message_objects_conversations_and_dicts_agree(tokenizer):
    messages = [Message(m["role"], m["content"]) for m in THREE_TURNS]
    expected = encode_chat(tokenizer, THREE_TURNS)
    assert encode_chat(tokenizer, messages) == expected
    assert encode_chat(tokenizer, Conversation(tuple(messages))) == expected
    assert tokenizer.apply_chat_template(Conversation(tuple(messages))) == expected[0]


def test_empty_assistant_reply_still_learns_to_stop(tokenizer):
    ids, mask = encode_chat(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}])
    assert masked_text(tokenizer, ids, mask) == "<|im_end|>"


@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
def test_unknown_role_raises(tokenizer, template):
    messages = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]
    with pytest.raises(ValueError, match="Unknown role 'tool'"):
        render_chat(messages, template)
    with pytest.raises(ValueError, match="Unknown role 'tool'"):
        encode_chat(tokenizer, messages, template=template)


def test_transformers_raises_on_unknown_role_too(saved):
    _, _, hf = saved
    with pytest.raises(Exception, match="Unknown role 'tool'"):
        hf.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


def test_template_names_and_literals():
    assert get_chat_template("chatml") == CHAT_TEMPLATES["chatml"]
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert get_chat_template(literal) == literal
    assert render_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], literal) == "xy"
    with pytest.raises(ValueError, match="chatml.*tags"):
        get_chat_template("llama-9")
    with pytest.raises(ValueError, match="chatml.*tags"):
        render_chat([{"role": "user", "content": "x"}], "llama-9")


def test_new_tokenizer_has_chatml_and_save_load_keeps_the_template(tokenizer, tmp_path):
    assert BPETokenizer().chat_template == CHAT_TEMPLATES["chatml"]
    tokenizer.save_pretrained(tmp_path / "chatml")
    assert BPETokenizer.from_pretrained(tmp_path / "chatml").chat_template == CHAT_TEMPLATES["chatml"]
    tags = BPETokenizer.from_pretrained(tmp_path / "chatml")
    tags.chat_template = get_chat_template("tags")
    tags.save_pretrained(tmp_path / "tags")
    config = json.loads((tmp_path / "tags" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATES["tags"]
    loaded = BPETokenizer.from_pretrained(tmp_path / "tags")
    assert loaded.chat_template == CHAT_TEMPLATES["tags"]
    assert loaded.apply_chat_template(THREE_TURNS) == tokenizer.apply_chat_template(THREE_TURNS, chat_template="tags")


def test_tokenizer_without_template_says_so(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    del config["chat_template"]
    config_path.write_text(json.dumps(config), encoding="utf-8")
    loaded = BPETokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        loaded.apply_chat_template(THREE_TURNS)
    assert loaded.apply_chat_template(THREE_TURNS, chat_template="chatml") == tokenizer.apply_chat_template(THREE_TURNS)


GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
)


def test_generation_blocks_give_transformers_assistant_masks(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    out = hf.apply_chat_template(THREE_TURNS, chat_template=GENERATION_TEMPLATE, tokenize=True,
                                 return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encode_chat(tokenizer, THREE_TURNS, template=GENERATION_TEMPLATE)
    assert ids == list(out["input_ids"])
    assert mask == list(out["assistant_masks"])
    assert ids == encode_chat(tokenizer, THREE_TURNS)[0]  # the same text as chatml
    assert mask == encode_chat(tokenizer, THREE_TURNS)[1]


def test_template_that_alters_assistant_content_is_refused_for_masks(tokenizer):
    trimming = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | trim + '\\n' }}{% endfor %}"
    assert render_chat(THREE_TURNS, trimming).startswith("system: 你是助手 system\n")
    with pytest.raises(ValueError, match="generation"):
        encode_chat(tokenizer, THREE_TURNS, template=trimming)
