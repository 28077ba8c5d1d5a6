"""The OpenAI-compatible server, served in-process on 127.0.0.1: the official `openai` client gets
completions that equal the library's own generation, invalid requests get OpenAI-style 400s, and
concurrent or disconnecting clients never corrupt or stall each other."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest

from minillm.cli import main
from minillm.inference.generator import TextGenerator
from minillm.model.transformer import MiniGPT
from minillm.serving import ServerLimits, background_server, create_app

MODEL = "tiny-chat"
LIMITS = ServerLimits(max_tokens_limit=64, max_messages=8, max_input_chars=2000, max_choices=4,
                      max_request_bytes=50_000)
MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "小明有3个苹果，"}]


@pytest.fixture(scope="module")
def model(chat_model) -> MiniGPT:
    return chat_model


@pytest.fixture(scope="module")
def generator(model, tokenizer) -> TextGenerator:
    return TextGenerator(model, tokenizer)


@pytest.fixture(scope="module")
def server(model, tokenizer) -> Iterator[str]:
    with background_server(create_app(model, tokenizer, model_name=MODEL, limits=LIMITS)) as url:
        yield url


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30)


def reference(generator: TextGenerator, messages, **options) -> tuple[str, int, str | None]:
    """(reply, completion tokens, finish reason) straight from the generator, without the server."""
    chunks = list(generator.chat_stream(messages, **options))
    return "".join(c.text for c in chunks), sum(len(c.token_ids) for c in chunks), chunks[-1].finish_reason


@contextmanager
def slow_model(model: MiniGPT, seconds: float) -> Iterator[None]:
    """Every forward (one per generated token) takes `seconds` longer: long generations take long."""
    handle = model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


def wait_until_idle(url: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = httpx.get(f"{url}/health").json()
        if stats["running"] == 0 and stats["queued"] == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"the server is still busy after {timeout} s: {stats}")


def first_content_then_hold(url: str, body: dict, streaming: threading.Event, release: threading.Event) -> None:
    """A client that reads its stream up to the first piece of text, then (once `release` is set) hangs
    up without reading the rest."""
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        # next() rather than a for loop: leaving a for loop would close the line iterator, and with it
        # the connection, before `release`
        lines = r.iter_lines()
        while not ((line := next(lines)).startswith("data: {")
                   and json.loads(line[6:])["choices"][0]["delta"].get("content")):
            pass
        streaming.set()
        release.wait(30)


# ---------------------------------------------------------------------------------------- the openai client
def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("another-model")


def test_completion_equals_the_generator_and_counts_tokens(client, generator, tokenizer):
    prompt = "春天的一个早晨，"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    chunks = list(generator.stream(prompt, max_new_tokens=12, temperature=0))
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.model == MODEL and abs(response.created - time.time()) < 60
    assert [c.index for c in response.choices] == [0]
    assert response.choices[0].text == "".join(c.text for c in chunks) != ""
    assert response.choices[0].finish_reason == "length"
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=True))
    assert response.usage.completion_tokens == sum(len(c.token_ids) for c in chunks) == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12

    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    events = list(stream)
    assert "".join(c.choices[0].text for c in events if c.choices) == response.choices[0].text
    assert events[-1].usage.model_dump() == response.usage.model_dump()


def test_chat_completion_equals_the_generator_and_counts_tokens(client, generator):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    text, tokens, finish = reference(generator, MESSAGES, max_new_tokens=16, temperature=0)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.model == MODEL
    choice = response.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == text != ""
    assert choice.finish_reason == finish == "length"
    assert response.usage.prompt_tokens == len(generator.chat_prompt_ids(MESSAGES))
    assert response.usage.completion_tokens == tokens == 16
    assert response.usage.total_tokens == response.usage.prompt_tokens + tokens


def test_streamed_chat_joins_to_the_non_streamed_reply(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == full.choices[0].message.content
    assert len(pieces) > 1  # streamed piece by piece, not in one block at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].id.startswith("chatcmpl-")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_wire_format(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all("usage" not in p for p in payloads)  # usage only when stream_options asks for it
    assert payloads[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_n_choices_are_indexed_and_seeded(client, generator):
    options = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=7, n=2)
    response = client.chat.completions.create(**options)
    assert [c.index for c in response.choices] == [0, 1]
    expected = [reference(generator, MESSAGES, max_new_tokens=10, temperature=1.0, seed=7 + i) for i in range(2)]
    assert [c.message.content for c in response.choices] == [text for text, _, _ in expected]
    assert expected[0][0] != expected[1][0]  # each choice samples with its own seed
    assert response.usage.completion_tokens == 20

    streamed = ["", ""]
    for chunk in client.chat.completions.create(**options, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [c.message.content for c in response.choices]


def test_stop_sequences_cut_the_reply(client, generator):
    text, _, _ = reference(generator, MESSAGES, max_new_tokens=16, temperature=0)
    stop = text[4:6]
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
                                              stop=[stop, "never appears ~~~"])
    assert response.choices[0].message.content == text[:text.find(stop)]
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens < 16


LONG_TEXT = "小明有3个苹果，又买了5个梨。" * 100  # within the character limit, far beyond the 128-token context


@pytest.mark.parametrize("path, body, param, fragment", [
    ("chat/completions", b'{"model": "m", "messages": [', None, "not valid JSON"),
    ("chat/completions", b"[1, 2]", None, "must be a JSON object"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "'wizard'"),
    ("chat/completions", {"messages": []}, "messages", "messages is empty"),
    ("chat/completions", {"model": "m"}, "messages", "messages is required"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ("chat/completions", {"messages": [{"role": "user", "content": ""}]}, "messages[0].content", "empty"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 9}, "messages", "limit of 8"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x" * 2001}]}, "messages", "2001 characters"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "junk": "y" * 60_000}, None,
     "limit of 50000 bytes"),
    ("chat/completions", {"messages": [{"role": "user", "content": LONG_TEXT}]}, "messages", "context is 128"),
    ("chat/completions", {"messages": MESSAGES, "max_tokens": -1}, "max_tokens", "at least 1, got -1"),
    ("chat/completions", {"messages": MESSAGES, "max_tokens": 65}, "max_tokens", "--max-tokens-limit"),
    ("chat/completions", {"messages": MESSAGES, "max_tokens": "lots"}, "max_tokens", "valid integer"),
    ("chat/completions", {"messages": MESSAGES, "temperature": 5}, "temperature", "between 0 and 2"),
    ("chat/completions", {"messages": MESSAGES, "n": 5}, "n", "limit of 4"),
    ("chat/completions", {"messages": MESSAGES, "stop": [5]}, "stop", "list of strings"),
    ("completions", {"model": MODEL}, "prompt", "prompt is required"),
    ("completions", {"prompt": [1, 99999]}, "prompt", "outside the vocabulary"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens", "at least 1"),
])
def test_invalid_requests_get_openai_style_400s(server, path, body, param, fragment):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}/v1/{path}", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error == {"message": error["message"], "type": "invalid_request_error", "param": param, "code": None}
    assert fragment in error["message"]


def test_the_client_sees_a_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=-5)
    assert caught.value.status_code == 400
    assert "max_tokens must be at least 1" in caught.value.message


def test_unknown_routes_answer_in_the_same_shape(server):
    response = httpx.get(f"{server}/v1/engines")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_api_key_is_required_on_the_api(model, tokenizer, generator):
    app = create_app(model, tokenizer, model_name=MODEL, api_key="s3cret", limits=LIMITS)
    with background_server(app) as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        assert caught.value.status_code == 401
        assert caught.value.body["code"] == "invalid_api_key"
        assert "--api-key" in caught.value.message
        missing = httpx.get(f"{url}/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"

        right = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        reply = right.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
        assert reply.choices[0].message.content == reference(generator, MESSAGES, max_new_tokens=4,
                                                             temperature=0)[0]
        assert httpx.get(f"{url}/health").status_code == 200  # the page and health checks stay open
        assert httpx.get(f"{url}/").status_code == 200


# ---------------------------------------------------------------------------------------- concurrency
def test_concurrent_streams_each_get_their_own_reply(client, generator):
    conversations = [[{"role": "user", "content": f"问题 {i}: 小明有{i}个苹果，吃了{i % 3}个。"}] for i in range(16)]
    expected = [reference(generator, m, max_new_tokens=12, temperature=0)[0] for m in conversations]
    assert len(set(expected)) > 8  # the prompts really lead to different replies
    replies: dict[int, str] = {}
    start = threading.Barrier(len(conversations))

    def ask(i: int) -> None:
        start.wait()
        stream = client.chat.completions.create(model=MODEL, messages=conversations[i], max_tokens=12,
                                                temperature=0, stream=True)
        replies[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(conversations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [replies.get(i) for i in range(len(conversations))] == expected


def test_disconnected_clients_free_the_model_at_once(server, model, generator):
    asked = [[{"role": "user", "content": f"问题 {i}"}] for i in range(4)]
    expected = [reference(generator, m, max_new_tokens=4, temperature=0)[0] for m in asked]
    long_body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 64, "temperature": 0, "stream": True}
    release = threading.Event()
    replies: dict[int, str] = {}

    def ask(i: int) -> None:
        stream = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0).chat.completions.create(
            model=MODEL, messages=asked[i], max_tokens=4, temperature=0, stream=True)
        replies[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    # 64 tokens at 40 ms each: every request left to run to its end would hold the model for 2.6 s.
    with slow_model(model, 0.04):
        first_streaming = threading.Event()
        leavers = [threading.Thread(target=first_content_then_hold,
                                    args=(server, long_body, first_streaming, release))]
        leavers[0].start()
        assert first_streaming.wait(10)
        # two more leavers wait in line behind the first, then four ordinary clients behind them
        for _ in range(2):
            leavers.append(threading.Thread(target=first_content_then_hold,
                                            args=(server, long_body, threading.Event(), release)))
            leavers[-1].start()
        askers = [threading.Thread(target=ask, args=(i,)) for i in range(len(asked))]
        deadline = time.monotonic() + 10
        while httpx.get(f"{server}/health").json()["queued"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        for thread in askers:
            thread.start()
        while httpx.get(f"{server}/health").json()["queued"] < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx.get(f"{server}/health").json() == {"status": "ok", "model": MODEL, "running": 1, "queued": 6}

        started = time.monotonic()
        release.set()  # every leaver hangs up as soon as it has seen its first piece of text
        for thread in askers:
            thread.join(15)
        elapsed = time.monotonic() - started
        for thread in leavers:
            thread.join(15)
        wait_until_idle(server)
    assert [replies.get(i) for i in range(len(asked))] == expected
    assert elapsed < 2.5, f"the remaining clients took {elapsed:.1f} s: abandoned streams kept generating"


def test_a_client_that_gives_up_on_a_whole_reply_frees_the_model(server, model):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 64, "temperature": 0}
    with slow_model(model, 0.04):  # the whole reply would take 2.6 s
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server}/v1/chat/completions", json=body, timeout=0.5)
        wait_until_idle(server, timeout=1.0)


def test_a_full_server_answers_503_until_a_slot_frees(model, tokenizer):
    app = create_app(model, tokenizer, model_name=MODEL, limits=ServerLimits(max_concurrent=1, max_tokens_limit=64))
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 64, "temperature": 0, "stream": True}
    with background_server(app) as url, slow_model(model, 0.04):
        streaming, release = threading.Event(), threading.Event()
        holder = threading.Thread(target=first_content_then_hold, args=(url, body, streaming, release))
        holder.start()
        assert streaming.wait(10)
        busy = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
        assert busy.status_code == 503
        assert busy.json()["error"]["code"] == "server_busy" and "limit is 1" in busy.json()["error"]["message"]
        release.set()
        holder.join(10)
        wait_until_idle(url, timeout=1.0)  # the holder hung up: its slot is free long before its 64 tokens
        again = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 2


# ---------------------------------------------------------------------------------------- page and command
def test_chat_page_is_self_contained(server):
    response = httpx.get(f"{server}/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    for needle in ('id="system"', 'id="prompt"', 'id="send"', 'id="clear"', "/v1/chat/completions", "getReader"):
        assert needle in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing from the network


def test_serve_command_rejects_bad_flags(capsys, tmp_path):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-tokens-limit", "0"]) == 2
    assert "--max-tokens-limit must be at least 1" in capsys.readouterr().err


def test_serve_command_serves_a_checkpoint(tmp_path, model, tokenizer, generator):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "minillm", "serve", str(tmp_path), "--port", str(port),
                                "--model-name", "from-cli", "--api-key", "k", "--device", "cpu"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(f"{url}/health").json()["model"] == "from-cli":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "minillm serve did not answer within 60 s"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        reply = client.chat.completions.create(model="from-cli", messages=MESSAGES, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == reference(generator, MESSAGES, max_new_tokens=8,
                                                             temperature=0)[0]
    finally:
        process.terminate()
        output = process.communicate(timeout=15)[0]
    assert "serving 'from-cli'" in output
