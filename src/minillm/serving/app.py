"""An OpenAI-compatible HTTP API for a `MiniGPT`, and a chat page, as a FastAPI app.

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not),
GET /v1/models, GET /health, and GET / (the chat page). Responses have the shapes of OpenAI's, so the
official `openai` client and the tools built on it work unchanged; errors are OpenAI's
`{"error": {...}}` objects, with 400 (not FastAPI's 422) for every invalid request, 404
`model_not_found` for a model the server does not serve, and 408 for a client too slow to send its
request (`ServerLimits.request_timeout`).

All generation runs on one worker thread (see `worker.py`), one request at a time in arrival order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, closing, contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send
from torch import nn

from minillm.inference.generator import GenerationChunk, TextGenerator
from minillm.serving.protocol import (
    APIError,
    ChatCompletionBody,
    CompletionBody,
    ServerLimits,
    chat_messages,
    check_prompt_length,
    choice_count,
    completion_prompts,
    generation_configs,
    parse_body,
    requested_max_tokens,
    validation_error,
)
from minillm.serving.worker import GenerationWorker, Job, ServerBusy

logger = logging.getLogger("minillm.serving")

# One streamed item: (choice index, the chunk generated for that choice).
Item = tuple[int, GenerationChunk]
# Turns one item into the `choices` entries of the stream's chunks (none, one, or several).
ChoiceFormatter = Callable[[int, GenerationChunk, bool], list[dict[str, Any]]]


def create_app(model: nn.Module, tokenizer: Any, *, model_name: str = "minillm", aliases: Sequence[str] = (),
               api_key: str | None = None, limits: ServerLimits | None = None) -> FastAPI:
    """The server's ASGI app for `model` and `tokenizer`; serve it with `run_server` or `background_server`
    (they also apply `limits.request_timeout` to connections that send nothing or only part of a head).

    `model_name` is the id /v1/models lists and responses carry. A request's `model` must be that id or one
    of `aliases` (or be left out), else it gets OpenAI's 404 `model_not_found`; responses to a request
    that names an alias carry `model_name` too, as OpenAI's carry the model an alias stands for. With
    `api_key`, every /v1/ request needs `Authorization: Bearer <api_key>`. `limits` bounds what a request
    may ask for and how long it may take to arrive (`ServerLimits()` by default).
    """
    names = [model_name, *aliases]
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a model name must be a non-empty string, got {name!r}")
    service = _Service(model, tokenizer, names, limits or ServerLimits())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.worker.close()

    app = FastAPI(title="Mini-LLM", description="An OpenAI-compatible API for a Mini-LLM model.",
                  lifespan=lifespan)
    app.state.service = service
    _add_error_handlers(app)

    async def require_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError("missing or incorrect API key: send the header 'Authorization: Bearer KEY' with the "
                           "key this server was started with (--api-key)", status=401, code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
    v1.add_api_route("/models", service.list_models, methods=["GET"])
    v1.add_api_route("/models/{model_id:path}", service.get_model, methods=["GET"])
    v1.add_api_route("/chat/completions", service.chat_completions, methods=["POST"])
    v1.add_api_route("/completions", service.completions, methods=["POST"])
    app.include_router(v1)
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/", service.chat_page, methods=["GET"], response_class=HTMLResponse)
    return app


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `app` until interrupted. Open streams get a few seconds to finish when stopping."""
    import uvicorn

    uvicorn.run(app, **_server_options(app, host, port, log_level))


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                      log_level: str = "warning") -> Iterator[str]:
    """Serve `app` with uvicorn on a background thread for the duration of a `with` block, yielding its
    base URL ("http://127.0.0.1:PORT"). Port 0 takes a free port. For notebooks and tests."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, **_server_options(app, host, port, log_level)))
    thread = threading.Thread(target=server.run, name="minillm-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(30)


KEEP_ALIVE_S = 5.0  # how long an idle connection stays open after a response (at most the request timeout)
# The last part of a checkpoint path that names a checkpoint of a run rather than the run.
_CHECKPOINT_NAME = re.compile(r"(final|best|latest|last|(step|checkpoint|epoch)[-_]?\d+)(\.old)?", re.IGNORECASE)


def default_model_id(checkpoint: str | Path) -> str:
    """A readable model id for a checkpoint directory, without the machine's paths: the run and checkpoint
    names for a run's checkpoint (`runs/sft_tiny/final` → "sft_tiny-final", `/x/runs/a/step_40` →
    "a-step_40"), else the directory's name."""
    parts = Path(os.path.abspath(checkpoint)).parts[1:]  # without the root (or drive), and no '..' left
    if not parts:
        return "minillm"
    if len(parts) >= 2 and _CHECKPOINT_NAME.fullmatch(parts[-1]):
        return f"{parts[-2]}-{parts[-1]}"
    return parts[-1]


def _server_options(app: FastAPI, host: str, port: int, log_level: str) -> dict[str, Any]:
    """uvicorn's settings for `app`: open streams get a few seconds to finish when stopping, idle keep-alive
    connections close after a few seconds, and a connection must send each request's head within the app's
    request timeout (see `_head_timeout_protocol`)."""
    service = getattr(app.state, "service", None)
    timeout = service.limits.request_timeout if isinstance(service, _Service) else ServerLimits().request_timeout
    return {"host": host, "port": port, "log_level": log_level, "timeout_graceful_shutdown": 5,
            "timeout_keep_alive": min(KEEP_ALIVE_S, timeout), "http": _head_timeout_protocol(timeout)}


class _Service:
    """The endpoints' logic, over one `TextGenerator` and the worker thread that runs it."""

    def __init__(self, model: nn.Module, tokenizer: Any, names: list[str], limits: ServerLimits) -> None:
        # A server lives long: on a GPU the compiled decode step (CUDA graphs) pays for its compile within a
        # few replies; on a CPU the gain is smaller and a compile would stall the one worker for seconds, so
        # the "auto" rule decides there.
        on_gpu = next(model.parameters()).device.type == "cuda"
        self.generator = TextGenerator(model, tokenizer, fast_decode=True if on_gpu else "auto")
        self.tokenizer = tokenizer
        self.model_name = names[0]
        self.model_names = frozenset(names)  # the id and its aliases
        self.limits = limits
        self.context = int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        self.worker = GenerationWorker(limits.max_concurrent)
        self.created = int(time.time())
        self.page = files("minillm.serving").joinpath("static/index.html").read_text(encoding="utf-8")

    # ------------------------------------------------------------------ small endpoints
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, **self.worker.stats()}

    async def chat_page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "minillm"}

    async def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    async def get_model(self, model_id: str) -> dict[str, Any]:
        self._check_model(model_id)
        return self._model_card()

    def _check_model(self, requested: str | None) -> None:
        """A request may leave `model` out (there is one model) or name it or one of its aliases."""
        if requested is not None and requested not in self.model_names:
            raise APIError(f"The model `{requested}` does not exist or you do not have access to it.",
                           status=404, param="model", code="model_not_found")

    # ------------------------------------------------------------------ completions
    async def chat_completions(self, request: Request) -> Any:
        body = parse_body(await self._read_body(request), ChatCompletionBody)
        self._check_model(body.model)
        messages = chat_messages(body, self.limits)
        n = choice_count(body, 1, self.limits)
        max_tokens = requested_max_tokens(body, self.limits)
        configs = generation_configs(body, n)
        try:
            prompt_ids = await run_in_threadpool(self.generator.chat_prompt_ids, messages)
        except Exception as e:  # noqa: BLE001 - a custom chat template may refuse a conversation
            raise APIError(f"the chat template cannot render these messages: {e}", param="messages") from None
        room = check_prompt_length(len(prompt_ids), self.context, "messages")
        configs = [dataclasses.replace(c, max_new_tokens=min(max_tokens, room)) for c in configs]
        generator = self.generator

        def produce() -> Iterator[Item]:
            for index, config in enumerate(configs):
                with closing(generator.chat_stream(messages, config)) as chunks:
                    for chunk in chunks:
                        yield index, chunk

        job = self._submit(produce)
        head = self._head("chatcmpl", "chat.completion.chunk" if body.stream else "chat.completion")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EventStream(_events(job, head, _chat_choices, len(prompt_ids), include_usage))
        texts, reasons, completion_tokens = await _collect(job, request, n)
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": reason} for i, (text, reason) in enumerate(zip(texts, reasons))]
        return {**head, "choices": choices, "usage": _usage(len(prompt_ids), completion_tokens)}

    async def completions(self, request: Request) -> Any:
        body = parse_body(await self._read_body(request), CompletionBody)
        self._check_model(body.model)
        prompts = completion_prompts(body, self.vocab_size, self.limits)
        n = choice_count(body, len(prompts), self.limits)
        max_tokens = requested_max_tokens(body, self.limits)
        configs = generation_configs(body, n)
        # Text prompts start with BOS, as in training and as `TextGenerator.generate` does.
        rows = [self.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else p for p in prompts]
        for i, ids in enumerate(rows):
            check_prompt_length(len(ids), self.context, "prompt" if len(rows) == 1 else f"prompt[{i}]")
        generator = self.generator

        def produce() -> Iterator[Item]:
            for p, ids in enumerate(rows):
                room = self.context - len(ids)
                for c, config in enumerate(configs):
                    config = dataclasses.replace(config, max_new_tokens=min(max_tokens, room))
                    with closing(generator.stream(ids, config)) as chunks:
                        for chunk in chunks:
                            yield p * n + c, chunk

        job = self._submit(produce)
        head = self._head("cmpl", "text_completion")
        prompt_tokens = sum(map(len, rows))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EventStream(_events(job, head, _completion_choices, prompt_tokens, include_usage))
        texts, reasons, completion_tokens = await _collect(job, request, n * len(rows))
        choices = [{"text": text, "index": i, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(texts, reasons))]
        return {**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    # ------------------------------------------------------------------ helpers
    async def _read_body(self, request: Request) -> bytes:
        """The raw body, refused as soon as it grows past the limit (before it is all in memory), or when
        it takes longer than the request timeout to arrive, all of it (a trickle is cut too)."""
        limit = self.limits.max_request_bytes

        async def read() -> bytes:
            body = bytearray()
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise APIError(f"the request body is larger than this server's limit of {limit} bytes")
            return bytes(body)

        timeout = self.limits.request_timeout
        try:
            return await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:
            raise APIError(f"the request body did not arrive within {timeout:g} s (the server's request "
                           "timeout, --request-timeout)", status=408, code="request_timeout") from None

    def _submit(self, produce: Callable[[], Iterator[Item]]) -> Job[Item]:
        try:
            return self.worker.submit(produce)
        except ServerBusy as e:
            raise APIError(str(e), status=503, type="server_error", code="server_busy") from None

    def _head(self, prefix: str, kind: str) -> dict[str, Any]:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": self.model_name, "system_fingerprint": None}


# ---------------------------------------------------------------------------------------- responses
def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chat_choices(index: int, chunk: GenerationChunk, first: bool) -> list[dict[str, Any]]:
    """OpenAI's chat stream: a choice's first delta carries the role, then come content deltas, and an
    empty delta carries the finish reason."""

    def choice(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    entries = []
    if first:
        entries.append(choice({"role": "assistant", "content": ""}))
    if chunk.text:
        entries.append(choice({"content": chunk.text}))
    if chunk.finish_reason:
        entries.append(choice({}, chunk.finish_reason))
    return entries


def _completion_choices(index: int, chunk: GenerationChunk, first: bool) -> list[dict[str, Any]]:
    if not chunk.text and not chunk.finish_reason:
        return []  # a character's bytes are still incomplete: nothing to show yet
    return [{"text": chunk.text, "index": index, "logprobs": None, "finish_reason": chunk.finish_reason}]


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _generation_error(error: Exception) -> APIError:
    """An exception from the generator as an APIError: ValueErrors are about the request's settings."""
    if isinstance(error, ValueError):
        return APIError(str(error))
    return APIError(f"generation failed: {type(error).__name__}: {error}", status=500, type="server_error")


async def _events(job: Job[Item], head: dict[str, Any], format_choices: ChoiceFormatter, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    """A job's chunks as server-sent events, ending with `data: [DONE]`; with `include_usage` every
    chunk carries `"usage": null` and a last chunk with no choices carries the counts, as OpenAI does."""
    completion_tokens, started = 0, set()
    extra = {"usage": None} if include_usage else {}
    try:
        async for index, chunk in job.results():
            completion_tokens += len(chunk.token_ids)
            for choice in format_choices(index, chunk, index not in started):
                yield _sse({**head, "choices": [choice], **extra})
            started.add(index)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield "data: [DONE]\n\n"
    except Exception as error:  # noqa: BLE001 - the status line is sent: report in the stream, as OpenAI does
        yield _sse(_generation_error(error).body())
    finally:
        job.cancel()


async def _collect(job: Job[Item], request: Request, choices: int) -> tuple[list[str], list[str | None], int]:
    """(texts, finish reasons, completion tokens) of a whole job. If the client disconnects while it
    waits, the job is cancelled so that the model moves on to the next request."""

    async def cancel_on_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    texts: list[list[str]] = [[] for _ in range(choices)]
    reasons: list[str | None] = [None] * choices
    completion_tokens = 0
    watcher = asyncio.create_task(cancel_on_disconnect())
    try:
        async for index, chunk in job.results():
            texts[index].append(chunk.text)
            completion_tokens += len(chunk.token_ids)
            reasons[index] = chunk.finish_reason or reasons[index]
    except Exception as error:  # noqa: BLE001
        raise _generation_error(error) from error
    finally:
        watcher.cancel()
        job.cancel()
    return ["".join(parts) for parts in texts], reasons, completion_tokens


class _EventStream(StreamingResponse):
    """A `text/event-stream` response that stops its job the moment the client goes away.

    The response listens for the client's disconnect while it streams (whatever ASGI version the
    server speaks), and on any exit closes its event iterator, whose cleanup cancels the job: a client
    that leaves, even one still waiting in line, frees its place at once.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tasks:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # servers speaking ASGI 2.4 raise when the client is gone
                        pass
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tasks.cancel_scope.cancel()
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


# ---------------------------------------------------------------------------------------- errors
def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's `{"error": {"message", "type", "param", "code"}}` body."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        if error.status == 408:  # the rest of a late body may still be coming: close, don't wait for it
            headers = {"Connection": "close"}
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, error: ClientDisconnect) -> Response:
        # Nobody is left to answer: nothing to report but a line for debugging.
        logger.debug("%s %s: the client disconnected before sending its whole request", request.method,
                     request.url.path)
        return Response(status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI answers 422 by default; OpenAI's API (and its clients) expect 400.
        return JSONResponse(validation_error(list(error.errors())).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}"
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        body = APIError(message, status=error.status_code, type=kind).body()
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))


# ---------------------------------------------------------------------------------------- connections
def _head_timeout_protocol(timeout: float) -> Any:
    """uvicorn's h11 HTTP protocol, plus a deadline on request heads, which uvicorn lacks: it closes an
    idle connection only once it has answered a request on it, and waits forever for a connection that
    sends nothing or only part of a head. Here a connection must send a whole request head within
    `timeout` seconds of opening, or of the end of its previous response; else it gets a 408 (when part
    of a head came) and is closed. The body's own deadline is the app's (`_Service._read_body`)."""
    try:
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:  # another uvicorn layout: its own protocol, without the head deadline
        return "auto"

    body = json.dumps(APIError(f"the request head did not arrive within {timeout:g} s (the server's request "
                               "timeout, --request-timeout)", status=408, code="request_timeout").body()).encode()
    late_head = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))

    class HeadTimeoutProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_started = False

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._head_started = self._head_timer is not None
            super().data_received(data)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle or self.transport.get_protocol() is not self:
                self._disarm_head_timer()  # a request (or a protocol upgrade) began

        def on_response_complete(self) -> None:
            self._arm_head_timer()  # before the next pipelined request, if any, starts (and disarms it)
            super().on_response_complete()

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            self._head_started = False
            self._head_timer = self.loop.call_later(timeout, self._head_too_late)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_late(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self._head_started and self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE:
                self.transport.write(late_head)
            logger.debug("closed a connection that sent no whole request head within %g s", timeout)
            self.transport.close()

    return HeadTimeoutProtocol
