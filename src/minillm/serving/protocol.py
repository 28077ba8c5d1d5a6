"""The request side of the OpenAI-compatible API: body models, checks, and generation settings.

Request bodies are parsed here rather than by FastAPI's body injection so that every way a body can be
wrong (too large, not JSON, not an object, a field of the wrong type, a value out of range) ends in the
same OpenAI-style 400 error whose message names the field, whichever FastAPI version is installed.
Fields whose JSON type varies (`content`, `stop`, `prompt`) are checked by hand for the same reason:
pydantic's messages for union types list every alternative and are hard to read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from minillm.inference.generator import GenerationConfig

MAX_STOP_SEQUENCES = 4  # as in OpenAI's API
MAX_STOP_CHARS = 200
# torch.Generator.manual_seed takes 64-bit seeds; a request's seed is folded into that range
SEED_RANGE = 2**63


class APIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one request may ask for, so that no single client can hold the model for long or
    exhaust memory. `max_tokens_limit`, `max_concurrent` and `request_timeout` are the command's
    --max-tokens-limit, --max-concurrent and --request-timeout."""

    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for (and the default)
    max_concurrent: int = 32  # requests admitted at once, generating or waiting; more get 503
    max_messages: int = 256  # messages in one chat request
    max_input_chars: int = 100_000  # characters (or prompt token ids) in one request, all together
    max_choices: int = 16  # completions per request: n × the number of prompts
    max_request_bytes: int = 2_000_000  # the raw request body
    # Seconds a client has to send a request: its head (from connecting, or from the end of its previous
    # response) and then its whole body; a slower one gets 408 and is disconnected.
    request_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_tokens_limit", "max_concurrent", "max_messages", "max_input_chars", "max_choices",
                     "max_request_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServerLimits.{name} must be a positive integer, got {value!r}")
        timeout = self.request_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"ServerLimits.request_timeout must be a positive number of seconds, got {timeout!r}")


# ---------------------------------------------------------------------------------------- body models
class StreamOptions(BaseModel):
    include_usage: bool | None = None


class _SamplingRequest(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored, as OpenAI-compatible servers do."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Any = None  # a string or a list of strings; checked by `_stop_strings`
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None  # not supported: refused when set, rather than silently left out
    user: str | None = None
    # Extensions that vLLM and llama.cpp's servers accept too (the openai client sends them via extra_body).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None


class ChatMessageBody(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any = None  # a string or a list of {"type": "text", "text": ...} parts
    name: str | None = None


class ChatCompletionBody(_SamplingRequest):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    tools: Any = None


class CompletionBody(_SamplingRequest):
    prompt: Any = None  # a string, a list of strings, a list of token ids, or a list of those
    echo: bool | None = None
    suffix: str | None = None


Body = TypeVar("Body", bound=BaseModel)


def parse_body(raw: bytes, model: type[Body]) -> Body:
    """The request body as `model`, or an APIError saying what is wrong with it."""
    if not raw.strip():
        raise APIError("the request body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as e:
        raise APIError(f"the request body is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(f"the request body must be a JSON object, got {_json_type(data)}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None


def validation_error(errors: list[Any]) -> APIError:
    """pydantic's (or FastAPI's) validation errors as one APIError naming the first offending field."""
    described = []
    for error in errors:
        location = [part for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
        param = field_path(location)
        if error.get("type") == "missing":
            described.append((param, f"{param or 'a field'} is required"))
            continue
        got = ""
        if "input" in error:
            shown = repr(error["input"])
            got = f" (got {shown[:80] + '...' if len(shown) > 80 else shown})"
        described.append((param, f"{param or 'the request'}: {error.get('msg', 'invalid value')}{got}"))
    if not described:
        return APIError("the request is invalid")
    message = "; ".join(text for _, text in described[:3])
    if len(described) > 3:
        message += f" (and {len(described) - 3} more problems)"
    return APIError(message, param=described[0][0])


def field_path(location: list[Any] | tuple[Any, ...]) -> str | None:
    """("messages", 0, "role") → "messages[0].role", the way OpenAI names nested parameters."""
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


# ---------------------------------------------------------------------------------------- checks
def chat_messages(body: ChatCompletionBody, limits: ServerLimits) -> list[dict[str, str]]:
    """The conversation as role/content dicts for the chat template, after every check on it."""
    if body.tools:
        raise APIError("tools are not supported by this server", param="tools")
    if not body.messages:
        raise APIError("messages is empty; send at least one message", param="messages")
    if len(body.messages) > limits.max_messages:
        raise APIError(f"messages holds {len(body.messages)} messages, more than this server's limit of "
                       f"{limits.max_messages}", param="messages")
    messages, chars = [], 0
    for i, message in enumerate(body.messages):
        content = _message_text(message.content, f"messages[{i}].content")
        chars += len(content)
        # "developer" is OpenAI's newer name for the system role
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": content})
    if chars > limits.max_input_chars:
        raise APIError(f"the messages hold {chars} characters, more than this server's limit of "
                       f"{limits.max_input_chars}", param="messages")
    return messages


def _message_text(content: Any, param: str) -> str:
    """A message's text: a string, or the text parts of a content list joined by newlines."""
    if content is None:
        raise APIError(f"{param} is missing; every message needs text content", param=param)
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _json_type(part)
                raise APIError(f"{param}[{j}] is not a text part ({{\"type\": \"text\", \"text\": ...}}), "
                               f"got {kind!r}: only text content is supported", param=f"{param}[{j}]")
            texts.append(part["text"])
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise APIError(f"{param} must be a string or a list of text parts, got {_json_type(content)}",
                       param=param)
    if not content:
        raise APIError(f"{param} is empty; every message needs text content", param=param)
    return content


def completion_prompts(body: CompletionBody, vocab_size: int, limits: ServerLimits) -> list[str | list[int]]:
    """The prompts of a completion request: texts, or token-id lists used as they are."""
    prompt = body.prompt
    if prompt is None:
        raise APIError("prompt is required", param="prompt")
    if body.echo:
        raise APIError("echo is not supported by this server", param="echo")
    if body.suffix:
        raise APIError("suffix is not supported by this server", param="suffix")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_token(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list):
        prompts = prompt
    else:
        raise APIError(f"prompt must be a string, a list of strings or a list of token ids, got "
                       f"{_json_type(prompt)}", param="prompt")
    if not prompts:
        raise APIError("prompt is an empty list; send at least one prompt", param="prompt")
    size = 0
    for i, item in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            size += len(item)
            continue
        if not isinstance(item, list) or not item or not all(_is_token(t) for t in item):
            raise APIError(f"{param} must be a string or a non-empty list of token ids", param=param)
        bad = next((t for t in item if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(f"{param} holds the token id {bad}, outside the vocabulary [0, {vocab_size})",
                           param=param)
        size += len(item)
    if size > limits.max_input_chars:
        raise APIError(f"the prompts hold {size} characters (or token ids), more than this server's limit "
                       f"of {limits.max_input_chars}", param="prompt")
    return prompts


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def choice_count(body: _SamplingRequest, prompts: int, limits: ServerLimits) -> int:
    """`n`, checked, and within the per-request limit once multiplied by the number of prompts."""
    n = 1 if body.n is None else body.n
    if n < 1:
        raise APIError(f"n must be at least 1, got {n}", param="n")
    if n * prompts > limits.max_choices:
        what = f"n={n}" if prompts == 1 else f"n={n} for each of {prompts} prompts"
        raise APIError(f"{what} asks for {n * prompts} completions, more than this server's limit of "
                       f"{limits.max_choices} per request", param="n")
    return n


def requested_max_tokens(body: _SamplingRequest, limits: ServerLimits) -> int:
    """The most tokens the reply may have: the request's max_tokens (or max_completion_tokens), checked,
    or the server's limit when it sets none. The model's context may cut it shorter."""
    value, param = body.max_tokens, "max_tokens"
    if isinstance(body, ChatCompletionBody) and body.max_completion_tokens is not None:
        value, param = body.max_completion_tokens, "max_completion_tokens"
    if value is None:
        return limits.max_tokens_limit
    if value < 1:
        raise APIError(f"{param} must be at least 1, got {value}", param=param)
    if value > limits.max_tokens_limit:
        raise APIError(f"{param} is {value}, more than this server's limit of {limits.max_tokens_limit} "
                       "(--max-tokens-limit)", param=param)
    return value


def check_prompt_length(prompt_tokens: int, context: int, param: str) -> int:
    """The room left for the reply in the model's context; a prompt that leaves none is an error."""
    if prompt_tokens >= context:
        raise APIError(f"the prompt is {prompt_tokens} tokens long, but the model's context is {context} "
                       "tokens (max_position_embeddings), which leaves no room for a reply; shorten the "
                       f"{param}", param=param)
    return context - prompt_tokens


def generation_configs(body: _SamplingRequest, choices: int) -> list[GenerationConfig]:
    """One `GenerationConfig` per choice, without a length (set `max_new_tokens` once the prompt's length
    is known). With a seed, choice i uses seed + i: the choices differ from each other and the whole
    response is reproducible."""
    if body.logprobs:
        raise APIError("logprobs are not supported by this server", param="logprobs")
    temperature = _in_range(body.temperature, "temperature", 1.0, 0.0, 2.0)
    top_p = _in_range(body.top_p, "top_p", 1.0, 0.0, 1.0)
    min_p = _in_range(body.min_p, "min_p", 0.0, 0.0, 1.0)
    presence = _in_range(body.presence_penalty, "presence_penalty", 0.0, -2.0, 2.0)
    frequency = _in_range(body.frequency_penalty, "frequency_penalty", 0.0, -2.0, 2.0)
    repetition = _in_range(body.repetition_penalty, "repetition_penalty", 1.0, 0.01, 10.0)
    top_k = 0 if body.top_k is None else body.top_k
    if top_k < 0:
        raise APIError(f"top_k must be at least 0 (0 = off), got {top_k}", param="top_k")
    seed = body.seed
    if seed is not None and not -SEED_RANGE <= seed < SEED_RANGE:
        raise APIError(f"seed must fit in 64 bits (between -2**63 and 2**63 - 1), got {seed}", param="seed")
    # top_p = 0 keeps only the most likely token: greedy decoding, as temperature 0 is.
    greedy = temperature == 0.0 or top_p == 0.0
    base = GenerationConfig(do_sample=not greedy,
                            temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                            top_k=top_k, min_p=min_p, repetition_penalty=repetition, presence_penalty=presence,
                            frequency_penalty=frequency, stop_strings=stop_strings(body.stop) or None)
    configs = []
    for i in range(choices):
        choice_seed = None if seed is None else (seed + i) % SEED_RANGE
        configs.append(dataclasses.replace(base, seed=choice_seed))
    return configs


def _in_range(value: float | None, param: str, default: float, low: float, high: float) -> float:
    if value is None:
        return default
    if not low <= value <= high:
        raise APIError(f"{param} must be between {low:g} and {high:g}, got {value:g}", param=param)
    return float(value)


def stop_strings(stop: Any) -> list[str]:
    """OpenAI's `stop`: null, a string, or a list of up to 4 strings."""
    if stop is None:
        return []
    values = [stop] if isinstance(stop, str) else stop
    if not isinstance(values, list) or not all(isinstance(s, str) for s in values):
        raise APIError(f"stop must be a string or a list of strings, got {_json_type(stop)}", param="stop")
    if len(values) > MAX_STOP_SEQUENCES:
        raise APIError(f"stop holds {len(values)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                       param="stop")
    for s in values:
        if not s:
            raise APIError("stop holds an empty string; every stop sequence needs at least one character",
                           param="stop")
        if len(s) > MAX_STOP_CHARS:
            raise APIError(f"a stop sequence is {len(s)} characters long; at most {MAX_STOP_CHARS} are allowed",
                           param="stop")
    return values
