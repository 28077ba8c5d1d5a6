"""An OpenAI-compatible HTTP API for a `MiniGPT`, and a chat page, as a FastAPI app.

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not),
GET /v1/models, GET /health, and GET / (the chat page). Responses have the shapes of OpenAI's, so the
official `openai` client and the tools built on it work unchanged; errors are OpenAI's
`{"error": {...}}` objects, with 400 (not FastAPI's 422) for every invalid request.

All generation runs on one worker thread (see `worker.py`), one request at a time in arrival order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from importlib.resources import files
from typing import Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
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

# One streamed item: (choice index, the chunk generated for that choice).
Item = tuple[int, GenerationChunk]
# Turns one item into the `choices` entries of the stream's chunks (none, one, or several).
ChoiceFormatter = Callable[[int, GenerationChunk, bool], list[dict[str, Any]]]


def create_app(model: nn.Module, tokenizer: Any, *, model_name: str = "minillm", api_key: str | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    """The server's ASGI app for `model` and `tokenizer`; serve it with uvicorn (see `run_server`).

    `model_name` is the id /v1/models lists and responses carry (requests may name any model: there is
    only one). With `api_key`, every /v1/ request needs `Authorization: Bearer <api_key>`. `limits`
    bounds what a request may ask for (`ServerLimits()` by default).
    """
    service = _Service(model, tokenizer, model_name, limits or ServerLimits())

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

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                      log_level: str = "warning") -> Iterator[str]:
    """Serve `app` with uvicorn on a background thread for the duration of a `with` block, yielding its
    base URL ("http://127.0.0.1:PORT"). Port 0 takes a free port. For notebooks and tests."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
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


class _Service:
    """The endpoints' logic, over one `TextGenerator` and the worker thread that runs it."""

    def __init__(self, model: nn.Module, tokenizer: Any, model_name: str, limits: ServerLimits) -> None:
        # A server lives long: on a GPU the compiled decode step (CUDA graphs) pays for its compile within a
        # few replies; on a CPU the gain is smaller and a compile would stall the one worker for seconds, so
        # the "auto" rule decides there.
        on_gpu = next(model.parameters()).device.type == "cuda"
        self.generator = TextGenerator(model, tokenizer, fast_decode=True if on_gpu else "auto")
        self.tokenizer = tokenizer
        self.model_name = model_name
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
        if model_id != self.model_name:
            raise APIError(f"the model {model_id!r} does not exist; this server serves {self.model_name!r}",
                           status=404, param="model", code="model_not_found")
        return self._model_card()

    # ------------------------------------------------------------------ completions
    async def chat_completions(self, request: Request) -> Any:
        body = parse_body(await self._read_body(request), ChatCompletionBody)
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
        """The raw body, refused as soon as it grows past the limit (before it is all in memory)."""
        limit = self.limits.max_request_bytes
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise APIError(f"the request body is larger than this server's limit of {limit} bytes")
        return bytes(body)

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
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

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
