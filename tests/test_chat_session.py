"""`minillm chat`: the terminal conversation loop, its commands and history trimming."""

import io

import pytest
import torch

from minillm.cli import main
from minillm.inference.chat import ChatSession, run_chat
from minillm.inference.generator import GenerationConfig, TextGenerator
from minillm.model import MiniGPT, MiniGPTConfig

GREEDY = GenerationConfig(max_new_tokens=12, do_sample=False)


def make_generator(tokenizer, context: int = 256) -> TextGenerator:
    torch.manual_seed(0)
    model = MiniGPT(MiniGPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=context))
    return TextGenerator(model.eval(), tokenizer)


def scripted(lines):
    feed = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return read


def test_chat_loop_streams_replies_and_handles_commands(tokenizer):
    generator = make_generator(tokenizer)
    session = ChatSession(generator, system="简短回答。", config=GREEDY)
    out = io.StringIO()
    run_chat(session, scripted(["你好", "/system Be brief.", "hello", "/reset", "/help", "/bogus", "/exit", "x"]), out)
    text = out.getvalue()
    # the first reply is what the model says to [system, user] alone
    first = generator.chat([{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "你好"}], GREEDY)
    assert f"assistant> {first}\n" in text
    # /system replaced the prompt and cleared the history: the second reply sees only the new system prompt
    second = generator.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
                            GREEDY)
    assert f"assistant> {second}\n" in text
    assert "(conversation cleared)" in text and "/system TEXT" in text and "unknown command /bogus" in text
    assert session.system == "Be brief." and session.turns == []  # /reset kept the system prompt
    assert text.count("assistant> ") == 2  # nothing after /exit


def test_multi_turn_history_is_sent_back(tokenizer):
    generator = make_generator(tokenizer)
    session = ChatSession(generator, config=GREEDY)
    first = "".join(session.reply("第一句"))
    second = "".join(session.reply("第二句"))
    expected = generator.chat([{"role": "user", "content": "第一句"}, {"role": "assistant", "content": first},
                               {"role": "user", "content": "第二句"}], GREEDY)
    assert second == expected and len(session.turns) == 4


def test_a_long_conversation_is_trimmed_to_the_context_instead_of_failing(tokenizer):
    generator = make_generator(tokenizer, context=96)
    session = ChatSession(generator, system="sys", config=GenerationConfig(max_new_tokens=16, do_sample=False))
    for i in range(12):
        "".join(session.reply(f"turn {i}: 请讲一个关于小猫的故事"))
        assert len(generator.chat_prompt_ids(session.messages())) <= 96
    assert session.trimmed > 0 and session.messages()[0] == {"role": "system", "content": "sys"}
    assert session.turns[-2]["content"].startswith("turn 11")


def test_a_message_longer_than_the_context_is_refused_and_the_chat_goes_on(tokenizer):
    generator = make_generator(tokenizer, context=64)
    session = ChatSession(generator, config=GREEDY)
    out = io.StringIO()
    run_chat(session, scripted(["很长的消息" * 60, "短", "/exit"]), out)
    assert "the message is too long" in out.getvalue() and "context is 64" in out.getvalue()
    assert [t["role"] for t in session.turns] == ["user", "assistant"] and session.turns[0]["content"] == "短"


def test_minillm_chat_command(tokenizer, tmp_path, monkeypatch, capsys):
    generator = make_generator(tokenizer)
    generator.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setattr("builtins.input", scripted(["你好", "/exit"]))
    assert main(["chat", str(tmp_path), "--temperature", "0", "--max-new-tokens", "12", "--system", "简短回答。"]) == 0
    first = generator.chat([{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "你好"}], GREEDY)
    assert f"assistant> {first}\n" in capsys.readouterr().out


@pytest.mark.parametrize("line", ["/exit"])
def test_exit_leaves_without_a_reply(tokenizer, line):
    out = io.StringIO()
    run_chat(ChatSession(make_generator(tokenizer), config=GREEDY), scripted([line, "hello"]), out)
    assert "assistant>" not in out.getvalue()
