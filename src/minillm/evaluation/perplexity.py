"""Perplexity and next-token accuracy of a causal language model on held-out documents.

Documents come from a list of strings or from files:
- a text file (any suffix but .jsonl/.json) is one document, the whole file, as in pretraining
  (`minillm.data.pretrain.iter_documents`);
- a JSONL/JSON file is read with `load_records`, so a bad line is reported as `file:line`: text records
  (`{"text"}`) are documents; conversation records (any schema `load_records` knows) are rendered with
  the tokenizer's chat template and only the assistant tokens are scored, as SFT trains them;
- a directory: every text, JSONL and JSON file under it, by the rules above.

Tokens: a text document is encoded as generation prompts are, `encode(text, add_special_tokens=True)`,
which for this project's tokenizers puts the BOS `<|endoftext|>` first — the token that precedes every
document in the pretraining stream. Every token after the first position is scored, so with a BOS all of
the document's own tokens are; a tokenizer that adds no BOS leaves its first token unscored (there is
nothing to predict it from). No EOS is appended (as lm-evaluation-harness's rolling log-likelihood).

Long documents are scored with a sliding window, as in the Hugging Face perplexity guide: windows of
`max_length` tokens start every `stride` tokens, and each window scores only the tokens the previous one
did not, so every token is scored exactly once, with at least `max_length - stride` tokens of context
(fewer only at the start of a document). Every scored token weighs the same: the loss is the total
negative log-likelihood over the total token count, across windows and documents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from minillm.data.formats import DataError, load_records, read_text
from minillm.data.pretrain import find_corpus_files
from minillm.evaluation.results import EvalResult
from minillm.evaluation.scoring import labelled_logprobs
from minillm.tokenizer.chat import encode_chat

Document = tuple[list[int], list[bool]]  # token ids, and which positions are scored


@dataclass
class PerplexityResult(EvalResult):
    task: ClassVar[str] = "perplexity"
    loss: float  # mean negative log-likelihood per scored token, in nats
    perplexity: float  # exp(loss)
    accuracy: float  # fraction of scored tokens that were the model's argmax prediction
    tokens: int  # scored tokens
    documents: int
    max_length: int
    stride: int
    source: str = ""

    def summary(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "next_token_accuracy": self.accuracy,
                "tokens": self.tokens, "documents": self.documents, "max_length": self.max_length,
                "stride": self.stride}


def _text_document(tokenizer: Any, text: str) -> Document:
    ids = list(tokenizer.encode(text, add_special_tokens=True))
    return ids, [False] + [True] * (len(ids) - 1)


def load_documents(data: str | Path | Sequence[str], tokenizer: Any) -> list[Document]:
    """The documents of `data` (see the module docstring) as token ids with their scored positions.
    Blank documents are left out."""
    if not isinstance(data, (str, Path)):
        return [_text_document(tokenizer, text) for text in data if text.strip()]
    documents = []
    for file in find_corpus_files(data):
        if file.suffix.lower() not in (".jsonl", ".json"):
            text = read_text(file)
            if text.strip():
                documents.append(_text_document(tokenizer, text))
            continue
        loaded = load_records(file)
        if loaded.kind == "text":
            documents += [_text_document(tokenizer, text) for text in loaded.records if text.strip()]
        elif loaded.kind == "conversation":
            for conversation in loaded.records:
                ids, mask = encode_chat(tokenizer, conversation.messages)
                documents.append((ids, [bool(m) for m in mask]))
        else:
            raise DataError(f"{file}: {loaded.kind} records have no text to score; perplexity takes text "
                            '({"text": ...}) or conversation records')
    return documents


def sliding_windows(ids: Sequence[int], scored: Sequence[bool], max_length: int,
                    stride: int) -> list[tuple[list[int], list[int]]]:
    """`(input_ids, labels)` windows over one document: window k covers tokens [k·stride, k·stride +
    max_length) and labels only the scored tokens that earlier windows did not reach (-100 elsewhere)."""
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be in [1, max_length) = [1, {max_length}), got {stride}: a window must "
                         "overlap the previous one by at least one token of context")
    windows = []
    begin, done = 0, 1  # tokens before `done` are scored already (the first one never can be)
    while True:
        end = min(begin + max_length, len(ids))
        labels = [int(ids[t]) if t >= done and scored[t] else -100 for t in range(begin, end)]
        if any(label != -100 for label in labels):
            windows.append((list(ids[begin:end]), labels))
        if end == len(ids):
            return windows
        begin, done = begin + stride, end


def evaluate_perplexity(model: nn.Module, tokenizer: Any, data: str | Path | Sequence[str],
                        max_length: int | None = None, stride: int | None = None,
                        batch_size: int = 8) -> PerplexityResult:
    """Perplexity, mean token loss and next-token accuracy of `model` on `data` (a file, a directory or
    a list of texts; see the module docstring).

    `max_length`: tokens per window (default and maximum: the model's `max_position_embeddings`);
    `stride`: tokens between window starts (default `max_length // 2`); `max_length - stride` is the
    least context a scored token gets once a document is longer than one window.
    """
    context = model.config.max_position_embeddings
    max_length = context if max_length is None else max_length
    if not 2 <= max_length <= context:
        raise ValueError(f"max_length must be in [2, {context}] (the model's max_position_embeddings), "
                         f"got {max_length}")
    stride = max(1, max_length // 2) if stride is None else stride
    documents = load_documents(data, tokenizer)
    rows = [window for ids, scored in documents for window in sliding_windows(ids, scored, max_length, stride)]
    source = str(data) if isinstance(data, (str, Path)) else f"{len(data)} text(s)"
    if not rows:
        raise DataError(f"{source}: no token to score (no non-blank document)")
    nll, tokens, hits = 0.0, 0, 0
    for logps, correct in labelled_logprobs(model, rows, batch_size):
        nll -= float(logps.double().sum())
        tokens += len(logps)
        hits += int(correct.sum())
    loss = nll / tokens
    return PerplexityResult(loss=loss, perplexity=math.exp(loss), accuracy=hits / tokens, tokens=tokens,
                            documents=len(documents), max_length=max_length, stride=stride, source=source)
