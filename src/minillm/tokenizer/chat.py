"""Chat templates and assistant-token masks.

A chat template is a Jinja string, stored verbatim as `chat_template` in tokenizer_config.json, so that
`transformers.AutoTokenizer.from_pretrained(dir).apply_chat_template(...)` renders exactly what
`render_chat` renders here: both compile it the same way (sandboxed, `trim_blocks`, `lstrip_blocks`,
`raise_exception`, an HTML-safe-free `tojson`, `{% generation %}` blocks).

Two built-in templates, both for the roles system, user and assistant (any other role raises):

- "chatml" (the default)::

      <|im_start|>system\\n{content}<|im_end|>\\n
      <|im_start|>user\\n{content}<|im_end|>\\n
      <|im_start|>assistant\\n{content}<|im_end|>\\n
      generation prompt: <|im_start|>assistant\\n

- "tags" (Zephyr-like, with plain-text role tags; an assistant turn ends with the EOS token so that
  generation stops there, and every turn is followed by one "\\n")::

      <|system|>\\n{content}\\n
      <|user|>\\n{content}\\n
      <|assistant|>\\n{content}<|endoftext|>\\n
      generation prompt: <|assistant|>\\n

Neither adds a default system prompt or a BOS token; content is inserted unchanged (no trimming).

`encode_chat` returns the ids of the rendered chat (the whole string tokenized at once, so they equal
transformers' ids) and a 0/1 mask that is 1 on exactly the tokens of each assistant message's content
and of the end-of-turn token right after it (`<|im_end|>` or the EOS token; the "\\n" after it is not
part of the turn the model learns to produce: it learns to stop at the end token).
"""

from __future__ import annotations

import json
import re
import secrets
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from minillm.data.formats import Conversation, Message
    from minillm.tokenizer.bpe_tokenizer import BPETokenizer

    ChatMessages = Conversation | Iterable[Message | Mapping[str, Any]]

CHATML_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {%- if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "        {{- raise_exception(\"Unknown role '\" ~ message['role'] ~ \"': "
    "the chatml template supports system, user and assistant\") }}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

TAGS_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {%- if message['role'] == 'system' %}\n"
    "        {{- '<|system|>\\n' + message['content'] + '\\n' }}\n"
    "    {%- elif message['role'] == 'user' %}\n"
    "        {{- '<|user|>\\n' + message['content'] + '\\n' }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- '<|assistant|>\\n' + message['content'] + '<|endoftext|>' + '\\n' }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Unknown role '\" ~ message['role'] ~ \"': "
    "the tags template supports system, user and assistant\") }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|assistant|>\\n' }}\n"
    "{%- endif %}\n"
)

CHAT_TEMPLATES: dict[str, str] = {"chatml": CHATML_TEMPLATE, "tags": TAGS_TEMPLATE}
DEFAULT_CHAT_TEMPLATE = "chatml"

# Tokens that close an assistant turn; the one directly after the content is trained on with it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Render-context variable that makes `{% generation %}` blocks wrap their output in two markers.
_GENERATION_MARKERS = "_minillm_generation_markers"


def get_chat_template(name_or_template: str) -> str:
    """A built-in template by name ("chatml", "tags"), or a literal Jinja template passed through."""
    if name_or_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name_or_template]
    if "{{" in name_or_template or "{%" in name_or_template:
        return name_or_template
    raise ValueError(
        f"unknown chat template {name_or_template!r}: use one of {', '.join(CHAT_TEMPLATES)} "
        "or pass a Jinja template string"
    )


class _GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' marker for assistant-produced text. It
    renders its body unchanged; while masks are computed it also wraps the body in two markers."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_block"), [], [], body).set_lineno(lineno)

    @jinja2.pass_context
    def _render_block(self, context: jinja2.runtime.Context, caller: jinja2.runtime.Macro) -> str:
        text = caller()
        markers = context.get(_GENERATION_MARKERS)
        return text if markers is None else markers[0] + text + markers[1]


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates need the plain JSON transformers emits.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlocks, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"invalid chat template (line {e.lineno}): {e.message}") from e


def _as_dicts(messages: ChatMessages) -> list[dict[str, Any]]:
    """`Message`s, a `Conversation` or role/content dicts → plain dicts (keys set to None dropped, as
    transformers does)."""
    items = getattr(messages, "messages", messages)
    if isinstance(items, (str, Mapping)):
        raise TypeError("messages must be a list of messages (or a Conversation), not a single message or string")
    dicts = []
    for message in items:
        if isinstance(message, Mapping):
            fields = dict(message)
        elif hasattr(message, "role") and hasattr(message, "content"):
            fields = {"role": message.role, "content": message.content}
        else:
            raise TypeError(f"a chat message must be a Message or a dict with role and content, got {message!r}")
        if "role" not in fields:
            raise ValueError(f"chat message without a role: {message!r}")
        dicts.append({k: v for k, v in fields.items() if v is not None})
    if not dicts:
        raise ValueError("cannot render an empty conversation: give at least one message")
    return dicts


def _render(messages: list[dict[str, Any]], template: str, add_generation_prompt: bool,
            variables: Mapping[str, Any]) -> str:
    try:
        return _compile(template).render(**variables, messages=messages, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template error: {e.message}") from e


def render_chat(messages: ChatMessages, template: str, add_generation_prompt: bool = False,
                **variables: Any) -> str:
    """Render a conversation with a template (a name or a Jinja string). `variables` are extra template
    variables (transformers passes the tokenizer's `bos_token`, `eos_token`, `pad_token`)."""
    return _render(_as_dicts(messages), get_chat_template(template), add_generation_prompt, variables)


def _template_of(tokenizer: BPETokenizer, template: str | None) -> str:
    if template is not None:
        return get_chat_template(template)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "this tokenizer has no chat template: set tokenizer.chat_template or pass one "
            f"(template= one of {', '.join(CHAT_TEMPLATES)}, or a Jinja string)"
        )
    return tokenizer.chat_template


def _special_token_variables(tokenizer: BPETokenizer) -> dict[str, str]:
    names = ("bos_token", "eos_token", "pad_token")
    return {name: value for name in names if (value := getattr(tokenizer, name, None)) is not None}


def render_chat_for(tokenizer: BPETokenizer, messages: ChatMessages, add_generation_prompt: bool = False,
                    template: str | None = None) -> str:
    """Render with the tokenizer's chat template (or `template`) and its special tokens as template
    variables, as transformers' `apply_chat_template(..., tokenize=False)` does."""
    return _render(_as_dicts(messages), _template_of(tokenizer, template), add_generation_prompt,
                   _special_token_variables(tokenizer))


def _fresh_markers(text: str) -> tuple[str, str]:
    while True:
        tag = secrets.token_hex(8)
        opening, closing = f"\ue000{tag}\ue001", f"\ue001{tag}\ue000"
        if opening not in text and closing not in text:
            return opening, closing


def _remove_markers(marked: str, opening: str, closing: str) -> tuple[str, list[tuple[int, int]]]:
    """Text without the markers, and the character span each opening/closing pair enclosed."""
    pieces, spans, length, start = [], [], 0, None
    for piece in re.split(f"({re.escape(opening)}|{re.escape(closing)})", marked):
        if piece == opening:
            if start is not None:
                raise ValueError("nested assistant spans in the chat template are not supported")
            start = length
        elif piece == closing:
            if start is None:
                raise ValueError("unbalanced assistant spans in the rendered chat")
            spans.append((start, length))
            start = None
        else:
            pieces.append(piece)
            length += len(piece)
    return "".join(pieces), spans


def _assistant_spans(messages: list[dict[str, Any]], template: str, add_generation_prompt: bool,
                     variables: Mapping[str, Any], end_tokens: Iterable[str]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans to train on.

    With `{% generation %}` blocks in the template, the spans are those blocks (transformers' rule).
    Otherwise each assistant content is rendered between two unique markers, and its span is extended
    over an end-of-turn token that directly follows it. Rendering the same plain template twice keeps
    it a normal transformers template; the check below refuses templates that alter the content.
    """
    text = _render(messages, template, add_generation_prompt, variables)
    opening, closing = _fresh_markers(text)
    uses_generation_blocks = bool(_GENERATION_TAG.search(template))
    if uses_generation_blocks:
        marked = _render(messages, template, add_generation_prompt,
                         {**variables, _GENERATION_MARKERS: (opening, closing)})
    else:
        wrapped = []
        for message in messages:
            if message["role"] == "assistant":
                if not isinstance(message.get("content"), str):
                    raise ValueError(f"assistant content must be a string to compute a mask, got {message!r}")
                message = {**message, "content": opening + message["content"] + closing}
            wrapped.append(message)
        marked = _render(wrapped, template, add_generation_prompt, variables)
    unmarked, spans = _remove_markers(marked, opening, closing)
    if unmarked != text:
        raise ValueError(
            "the chat template changes assistant content (e.g. trims it), so its tokens cannot be located; "
            "wrap the assistant output in {% generation %}...{% endgeneration %} in the template"
        )
    if not uses_generation_blocks:
        by_length = sorted(end_tokens, key=len, reverse=True)
        spans = [(start, end + next((len(t) for t in by_length if text.startswith(t, end)), 0))
                 for start, end in spans]
    return text, [(start, end) for start, end in spans if end > start]


def encode_chat(tokenizer: BPETokenizer, messages: ChatMessages, add_generation_prompt: bool = False,
                template: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and a same-length 0/1 assistant mask.

    The ids are `tokenizer.encode(text)` of the whole rendered text, so they equal transformers'
    `apply_chat_template` ids. The mask is 1 on the tokens of every assistant message's content and of
    the end-of-turn token that closes it (`<|im_end|>` or the EOS token), 0 on everything else: role
    headers, system and user turns, the "\\n" after the end token, a generation prompt.

    Tokens are found from character spans through the tokenizer's offsets. A token that straddles a
    span boundary counts as assistant exactly when it *starts* inside the span. With both built-in
    templates the end of a span is always clean (it is a special token), but a content that begins
    with a newline can merge with the "\\n" that ends the role header into one token (e.g. "\\n\\n"):
    that token starts in the header, so it is masked out, and the content's leading newline with it.
    """
    chat_template = _template_of(tokenizer, template)
    end_tokens = [t for t in (*END_OF_TURN_TOKENS, getattr(tokenizer, "eos_token", None))
                  if t is not None and tokenizer.token_to_id(t) is not None]
    text, spans = _assistant_spans(_as_dicts(messages), chat_template, add_generation_prompt,
                                   _special_token_variables(tokenizer), end_tokens)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    starts = [start for start, _ in spans]
    mask = []
    for token_start, _ in encoding.offsets:
        i = bisect_right(starts, token_start) - 1
        mask.append(int(i >= 0 and token_start < spans[i][1]))
    return encoding.ids, mask
