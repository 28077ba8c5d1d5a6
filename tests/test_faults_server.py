"""Fault suite, `minillm serve`: every bad request gets the exact status and an OpenAI-style error naming the
culprit (the field, the model, the key, the route); slow, stalled and vanishing clients are cut off or let
go without a traceback, and the server keeps answering; bad flags are refused in one line before anything
is loaded. One server (a tiny random model, an API key, an alias, a 1 s request timeout) serves the module."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

import minillm.serving
from minillm.cli import main
from minillm.serving import ServerLimits, background_server, create_app, default_model_id

MODEL = "tiny-chat"
ALIAS = "tiny-alias"
KEY = "s3cret"
TIMEOUT_S = 1.0
LIMITS = ServerLimits(max_tokens_limit=16, max_messages=8, max_input_chars=2000, max_choices=4,
                      max_request_bytes=20_000, request_timeout=TIMEOUT_S)
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
DROP = object()  # a field left out of the body


@pytest.fixture(scope="module")
def server(chat_model, tokenizer) -> Iterator[str]:
    app = create_app(chat_model, tokenizer, model_name=MODEL, aliases=[ALIAS], api_key=KEY, limits=LIMITS)
    with background_server(app) as url:
        yield url


def edited(body: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    body = {**body, **changes}
    return {key: value for key, value in body.items() if value is not DROP}


def chat(**changes: Any) -> dict[str, Any]:
    return edited({"model": MODEL, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 2}, changes)


def completion(**changes: Any) -> dict[str, Any]:
    return edited({"model": MODEL, "prompt": "春天", "max_tokens": 2}, changes)


class Row(NamedTuple):
    id: str
    method: str
    path: str
    body: dict[str, Any] | bytes | None
    status: int
    fragment: str  # in the error's message; for a 200, the model id the response must carry
    headers: dict[str, str | None] = {}
    code: str | None = None  # the error's code, when it has one


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = {"role": "user", "content": "hi"}
ROWS = [
    # the body as a whole
    Row("malformed-json", "POST", CHAT, b'{"model": "tiny-chat", "messages": [', 400, "not valid JSON"),
    Row("json-array", "POST", CHAT, b"[1, 2]", 400, "must be a JSON object, got an array"),
    Row("json-string", "POST", CHAT, b'"hello"', 400, "must be a JSON object, got a string"),
    Row("json-number", "POST", COMPLETIONS, b"42", 400, "must be a JSON object, got a number"),
    Row("empty-body", "POST", CHAT, b"", 400, "the request body is empty"),
    Row("not-utf8", "POST", CHAT, b'{"model": "\xff\xfe"}', 400, "not UTF-8"),
    Row("body-over-limit", "POST", CHAT, chat(junk="y" * 25_000), 400, "limit of 20000 bytes"),
    Row("text-plain-content-type-accepted", "POST", CHAT, chat(), 200, MODEL, {"Content-Type": "text/plain"}),
    # messages
    Row("messages-missing", "POST", CHAT, chat(messages=DROP), 400, "messages is required"),
    Row("messages-not-a-list", "POST", CHAT, chat(messages="hi"), 400, "messages: Input should be a valid list"),
    Row("messages-empty", "POST", CHAT, chat(messages=[]), 400, "messages is empty"),
    Row("message-not-an-object", "POST", CHAT, chat(messages=["hi"]), 400, "messages[0]: Input should be a valid"),
    Row("message-without-role", "POST", CHAT, chat(messages=[{"content": "hi"}]), 400,
        "messages[0].role is required"),
    Row("message-role-unknown", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400,
        "messages[0].role: Input should be"),
    Row("message-without-content", "POST", CHAT, chat(messages=[{"role": "user"}]), 400,
        "messages[0].content is missing"),
    Row("message-content-number", "POST", CHAT, chat(messages=[USER, {"role": "user", "content": 5}]), 400,
        "messages[1].content must be a string or a list of text parts, got a number"),
    Row("message-content-image-part", "POST", CHAT,
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
        "messages[0].content[0] is not a text part"),
    Row("message-content-empty", "POST", CHAT, chat(messages=[{"role": "user", "content": ""}]), 400,
        "messages[0].content is empty"),
    Row("messages-too-many", "POST", CHAT, chat(messages=[USER] * 9), 400, "more than this server's limit of 8"),
    Row("messages-too-long", "POST", CHAT, chat(messages=[{"role": "user", "content": "x" * 2001}]), 400,
        "the messages hold 2001 characters"),
    Row("prompt-beyond-context", "POST", CHAT, chat(messages=[{"role": "user", "content": "小明有3个苹果。" * 100}]),
        400, "the model's context is 128 tokens"),
    # sampling fields
    Row("max-tokens-negative", "POST", CHAT, chat(max_tokens=-1), 400, "max_tokens must be at least 1, got -1"),
    Row("max-tokens-zero", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens must be at least 1, got 0"),
    Row("max-tokens-over-limit", "POST", CHAT, chat(max_tokens=17), 400,
        "max_tokens is 17, more than this server's limit of 16"),
    Row("max-tokens-string", "POST", CHAT, chat(max_tokens="lots"), 400, "max_tokens: Input should be a valid integer"),
    Row("max-tokens-fraction", "POST", CHAT, chat(max_tokens=1.5), 400, "max_tokens: Input should be a valid integer"),
    Row("max-completion-tokens-over-limit", "POST", CHAT, chat(max_completion_tokens=100), 400,
        "max_completion_tokens is 100"),
    Row("temperature-negative", "POST", CHAT, chat(temperature=-0.5), 400,
        "temperature must be between 0 and 2, got -0.5"),
    Row("temperature-string", "POST", CHAT, chat(temperature="hot"), 400,
        "temperature: Input should be a valid number"),
    Row("top-p-above-one", "POST", CHAT, chat(top_p=1.5), 400, "top_p must be between 0 and 1, got 1.5"),
    Row("top-k-negative", "POST", CHAT, chat(top_k=-1), 400, "top_k must be at least 0"),
    Row("presence-penalty-out-of-range", "POST", CHAT, chat(presence_penalty=3), 400,
        "presence_penalty must be between -2 and 2"),
    Row("n-too-large", "POST", CHAT, chat(n=5), 400, "n=5 asks for 5 completions, more than this server's limit of 4"),
    Row("n-zero", "POST", CHAT, chat(n=0), 400, "n must be at least 1, got 0"),
    Row("stop-number", "POST", CHAT, chat(stop=5), 400, "stop must be a string or a list of strings, got a number"),
    Row("stop-too-many", "POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop holds 5 sequences"),
    Row("stream-not-bool", "POST", CHAT, chat(stream="maybe"), 400, "stream: Input should be a valid boolean"),
    Row("stream-options-not-object", "POST", CHAT, chat(stream=True, stream_options=5), 400, "stream_options"),
    Row("seed-string", "POST", CHAT, chat(seed="abc"), 400, "seed: Input should be a valid integer"),
    Row("logprobs-unsupported", "POST", CHAT, chat(logprobs=True), 400, "logprobs are not supported"),
    Row("tools-unsupported", "POST", CHAT, chat(tools=[{"type": "function"}]), 400, "tools are not supported"),
    # the model
    Row("chat-unknown-model", "POST", CHAT, chat(model="gpt-4o"), 404,
        "The model `gpt-4o` does not exist or you do not have access to it.", code="model_not_found"),
    Row("chat-model-not-a-string", "POST", CHAT, chat(model=5), 400, "model: Input should be a valid string"),
    Row("chat-alias-accepted", "POST", CHAT, chat(model=ALIAS), 200, MODEL),
    Row("chat-model-omitted", "POST", CHAT, chat(model=DROP), 200, MODEL),
    Row("completions-unknown-model", "POST", COMPLETIONS, completion(model="runs/sft/final"), 404,
        "The model `runs/sft/final` does not exist", code="model_not_found"),
    Row("completions-alias-accepted", "POST", COMPLETIONS, completion(model=ALIAS), 200, MODEL),
    Row("models-unknown-id", "GET", "/v1/models/gpt-4o", None, 404, "The model `gpt-4o` does not exist",
        code="model_not_found"),
    Row("models-alias-id", "GET", f"/v1/models/{ALIAS}", None, 200, MODEL),
    # completions' prompt
    Row("prompt-missing", "POST", COMPLETIONS, completion(prompt=DROP), 400, "prompt is required"),
    Row("prompt-number", "POST", COMPLETIONS, completion(prompt=5), 400,
        "prompt must be a string, a list of strings or a list of token ids, got a number"),
    Row("prompt-empty-list", "POST", COMPLETIONS, completion(prompt=[]), 400, "prompt is an empty list"),
    Row("prompt-mixed-list", "POST", COMPLETIONS, completion(prompt=["a", 5]), 400,
        "prompt[1] must be a string or a non-empty list of token ids"),
    Row("prompt-token-outside-vocabulary", "POST", COMPLETIONS, completion(prompt=[1, 99999]), 400,
        "the token id 99999, outside the vocabulary"),
    Row("echo-unsupported", "POST", COMPLETIONS, completion(echo=True), 400, "echo is not supported"),
    # the API key
    Row("api-key-missing", "POST", CHAT, chat(), 401, "missing or incorrect API key", {"Authorization": None},
        code="invalid_api_key"),
    Row("api-key-wrong", "POST", CHAT, chat(), 401, "missing or incorrect API key", {"Authorization": "Bearer nope"},
        code="invalid_api_key"),
    Row("api-key-wrong-scheme", "GET", "/v1/models", None, 401, "Authorization: Bearer KEY",
        {"Authorization": f"Basic {KEY}"}, code="invalid_api_key"),
    # routes and methods
    Row("unknown-path", "GET", "/v1/engines", None, 404, "GET /v1/engines: Not Found"),
    Row("unknown-path-post", "POST", "/v2/chat/completions", chat(), 404, "POST /v2/chat/completions: Not Found"),
    Row("get-on-chat", "GET", CHAT, None, 405, "GET /v1/chat/completions: Method Not Allowed"),
    Row("delete-on-models", "DELETE", "/v1/models", None, 405, "DELETE /v1/models: Method Not Allowed"),
    Row("post-on-health", "POST", "/health", b"{}", 405, "POST /health: Method Not Allowed"),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_fault(server, row):
    headers = {k: v for k, v in {**AUTH, **row.headers}.items() if v is not None}
    content = row.body if isinstance(row.body, bytes) or row.body is None else json.dumps(row.body).encode()
    response = httpx.request(row.method, server + row.path, content=content, headers=headers, timeout=30)
    assert response.status_code == row.status, response.text
    if row.status == 200:
        reply = response.json()
        assert reply.get("model", reply.get("id")) == row.fragment
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert row.fragment in error["message"]
    assert error["code"] == row.code


def test_the_suite_is_large_enough():
    assert len(ROWS) >= 35 and len({row.id for row in ROWS}) == len(ROWS)


# ---------------------------------------------------------------------------------------- slow clients
def connect(server: str) -> socket.socket:
    host, port = server.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_until_closed(sock: socket.socket, limit_s: float = 10.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, data = time.monotonic(), b""
    sock.settimeout(limit_s)
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def error_of(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def post_head(length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled-body", "trickled-body"])
def test_a_slow_body_gets_408_and_the_connection_closes(server, trickle):
    sock = connect(server)
    started = time.monotonic()
    sock.sendall(post_head(1000) + b'{"messages": ')
    if trickle:  # a byte every 0.1 s: no pause is long, the whole body would take 100 s
        sock.settimeout(0.1)
        while time.monotonic() - started < 5:
            try:
                sock.sendall(b" ")
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the answer is there
            except TimeoutError:
                continue
            except OSError:
                break
    raw, _ = read_until_closed(sock)
    elapsed = time.monotonic() - started
    sock.close()
    status, error = error_of(raw)
    assert status == 408 and error["code"] == "request_timeout"
    assert "did not arrive within 1 s" in error["message"] and "--request-timeout" in error["message"]
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + 3, elapsed


def test_a_partial_head_gets_408_and_the_connection_closes(server):
    sock = connect(server)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    raw, elapsed = read_until_closed(sock)
    sock.close()
    status, error = error_of(raw)
    assert status == 408 and error["code"] == "request_timeout" and "request head" in error["message"]
    assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + 3, elapsed


def test_silent_and_idle_connections_are_closed(server):
    silent = connect(server)  # connects, sends nothing
    raw, elapsed = read_until_closed(silent)
    silent.close()
    assert raw == b"" and elapsed < TIMEOUT_S + 3

    idle = connect(server)  # one request, then keeps the connection open without another
    idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    raw, elapsed = read_until_closed(idle)
    idle.close()
    assert raw.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in raw
    assert elapsed < TIMEOUT_S + 3


# ---------------------------------------------------------------------------------------- clients that leave
class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_logs() -> Iterator[list[logging.LogRecord]]:
    """What the server logs: uvicorn's loggers (which do not propagate to the root), asyncio's and ours."""
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "asyncio", "minillm.serving")]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
    logging.getLogger("minillm.serving").setLevel(logging.DEBUG)
    try:
        yield handler.records
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)


def wait_until_idle(server: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = httpx.get(f"{server}/health").json()
        if stats["running"] == 0 and stats["queued"] == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"the server is still busy after {timeout} s: {stats}")


def assert_quiet_and_healthy(server: str, records: list[logging.LogRecord]) -> None:
    wait_until_idle(server)
    loud = [f"{r.name} {r.levelname}: {r.getMessage()}" for r in records
            if r.levelno >= logging.WARNING or r.exc_info or "Traceback" in r.getMessage()]
    assert loud == []
    assert len([r for r in records if "disconnected" in r.getMessage()]) <= 1  # one short line at most
    reply = httpx.post(f"{server}{CHAT}", json=chat(), headers=AUTH, timeout=30)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2


def test_a_client_that_leaves_mid_upload_is_let_go_quietly(server, server_logs):
    sock = connect(server)
    sock.sendall(post_head(100_000) + b'{"messages": [{"role": "us')
    time.sleep(0.2)
    sock.close()
    deadline = time.monotonic() + 5
    while not server_logs and time.monotonic() < deadline:
        time.sleep(0.02)  # until the server notices (and says something about it)
    assert_quiet_and_healthy(server, server_logs)
    assert [r.getMessage() for r in server_logs if "disconnected" in r.getMessage()] == [
        "POST /v1/chat/completions: the client disconnected before sending its whole request"]


def test_a_client_that_leaves_mid_stream_is_let_go_quietly(server, chat_model, server_logs):
    body = json.dumps(chat(max_tokens=16, stream=True)).encode()
    handle = chat_model.register_forward_pre_hook(lambda module, args: time.sleep(0.05))  # 16 tokens: 0.8 s
    try:
        sock = connect(server)
        sock.sendall(post_head(len(body)) + body)
        received = b""
        while b"data: {" not in received:
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200 ")
        sock.close()
        assert_quiet_and_healthy(server, server_logs)
    finally:
        handle.remove()
    assert b"[DONE]" not in received  # it really left before the end


# ---------------------------------------------------------------------------------------- the model id
@pytest.mark.parametrize("path, expected", [
    ("runs/sft_tiny/final", "sft_tiny-final"),
    ("/abs/path/runs/x/step_40", "x-step_40"),
    ("/abs/path/runs/x/best/", "x-best"),
    ("runs/pretrain_tiny", "pretrain_tiny"),
    ("models/my-model", "my-model"),
    ("runs/sft_tiny/final/../best", "sft_tiny-best"),
])
def test_the_default_model_id_has_no_machine_path(path, expected):
    assert default_model_id(path) == expected


def test_the_served_id_comes_from_the_path_and_aliases_are_accepted(tmp_path, monkeypatch, capsys, chat_model,
                                                                    tokenizer):
    checkpoint = tmp_path / "runs" / "sft_tiny" / "final"
    chat_model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    seen: dict[str, Any] = {}

    def serve_briefly(app, host: str, port: int) -> None:  # instead of serving until interrupted
        with background_server(app) as url:
            seen["models"] = httpx.get(f"{url}/v1/models").text
            for name in seen["names"]:
                reply = httpx.post(f"{url}{CHAT}", json=chat(model=name), timeout=30)
                seen[name] = (reply.status_code, reply.json().get("model", reply.json().get("error", {}).get("code")))

    monkeypatch.setattr(minillm.serving, "run_server", serve_briefly)
    monkeypatch.delenv("MINILLM_API_KEY", raising=False)
    seen["names"] = ["sft_tiny-final", str(checkpoint)]
    assert main(["serve", str(checkpoint), "--device", "cpu", "--max-tokens-limit", "16"]) == 0
    assert json.loads(seen["models"])["data"][0]["id"] == "sft_tiny-final"
    assert str(tmp_path) not in seen["models"]
    assert seen["sft_tiny-final"] == (200, "sft_tiny-final")
    assert seen[str(checkpoint)] == (404, "model_not_found")
    assert "serving 'sft_tiny-final' on cpu" in capsys.readouterr().err

    seen["names"] = ["main", "alt", "other"]
    assert main(["serve", str(checkpoint), "--device", "cpu", "--max-tokens-limit", "16",
                 "--model-name", "main", "--model-name", "alt"]) == 0
    assert [m["id"] for m in json.loads(seen["models"])["data"]] == ["main"]
    assert seen["main"] == seen["alt"] == (200, "main")
    assert seen["other"] == (404, "model_not_found")
    assert "serving 'main' (also as 'alt') on cpu" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the command's flags
CLI_ROWS = [
    ("port-zero", ["--port", "0"], "--port must be between 1 and 65535, got 0"),
    ("port-too-large", ["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
    ("port-not-a-number", ["--port", "http"], "argument --port: invalid int value: 'http'"),
    ("max-tokens-limit-zero", ["--max-tokens-limit", "0"], "--max-tokens-limit must be at least 1, got 0"),
    ("max-concurrent-zero", ["--max-concurrent", "0"], "--max-concurrent must be at least 1, got 0"),
    ("request-timeout-zero", ["--request-timeout", "0"], "--request-timeout must be a positive number of seconds, got 0"),
    ("request-timeout-negative", ["--request-timeout", "-1"], "--request-timeout must be a positive number of seconds, "
                                                              "got -1"),
    ("request-timeout-nan", ["--request-timeout", "nan"], "--request-timeout must be a positive number of seconds, "
                                                          "got nan"),
    ("request-timeout-infinite", ["--request-timeout", "inf"], "--request-timeout must be a positive number of "
                                                               "seconds, got inf"),
    ("request-timeout-not-a-number", ["--request-timeout", "abc"], "argument --request-timeout: invalid float value"),
    ("api-key-empty", ["--api-key", ""], "--api-key is empty"),
    ("model-name-empty", ["--model-name", ""], "--model-name is empty"),
    ("alias-blank", ["--model-name", "main", "--model-name", " "], "--model-name is empty"),
]


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's own errors
        return int(exit.code or 0)


def refuse_to_serve(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("a server was started")


@pytest.mark.parametrize("flags, fragment", [row[1:] for row in CLI_ROWS], ids=[row[0] for row in CLI_ROWS])
def test_bad_serve_flags_are_refused_in_one_line(tmp_path, monkeypatch, capsys, flags, fragment):
    monkeypatch.setattr(minillm.serving, "run_server", refuse_to_serve)
    monkeypatch.delenv("MINILLM_API_KEY", raising=False)
    assert run_cli(["serve", str(tmp_path), *flags]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minillm serve: error: "), captured.err
    assert fragment in lines[0]
    assert captured.out == ""


def test_a_missing_checkpoint_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(minillm.serving, "run_server", refuse_to_serve)
    missing = Path(tmp_path) / "runs" / "nothing" / "final"
    assert run_cli(["serve", str(missing)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minillm serve: error: ")
    assert str(missing) in lines[0] and "not a checkpoint directory" in lines[0]
