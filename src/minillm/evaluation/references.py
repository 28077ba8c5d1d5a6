"""Generation against references: greedy answers to prompts, scored with BLEU and ROUGE.

Data: JSONL (or a JSON array, or a directory of them) of `{"prompt": text or [messages], "reference":
text}` or `{"prompt", "references": [text, …]}`, with an optional top-level `"system"`; read with the
project's record loader, so a bad line is reported as `file:line`.

Metrics:
- BLEU: sacrebleu's corpus BLEU (0-100) over all examples, with sacrebleu's "zh" tokenizer when the
  references contain CJK text and "13a" (its default, for English) otherwise; any sacrebleu tokenizer
  can be chosen instead. Case-sensitive, as sacrebleu. The signature is reported with the score.
- ROUGE-1, ROUGE-2 and ROUGE-L F1 (0-1), per example against its best-matching reference, averaged over
  examples. Tokens are single characters for CJK scripts and lowercased runs of letters and digits
  otherwise — on English this is exactly the `rouge-score` package's tokenizer (without stemming),
  which has no notion of Chinese and would drop it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from minillm.data.formats import DataError, Message, iter_records
from minillm.evaluation.results import EvalResult, markdown_table, one_line
from minillm.extras import require
from minillm.inference.generator import GenerationConfig, TextGenerator

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002fa1f"
_CJK_RE = re.compile(f"[{_CJK}]")
_ROUGE_TOKEN_RE = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[^\W_])+")

Prompt = str | Sequence[Message] | Sequence[dict[str, str]]


# ---------------------------------------------------------------------------------------- metrics
def rouge_tokens(text: str) -> list[str]:
    """ROUGE's tokens: each CJK character alone, and lowercased runs of letters and digits."""
    return _ROUGE_TOKEN_RE.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: int, predicted: int, reference: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 (n-gram overlap, clipped counts) and ROUGE-L (longest common subsequence) F1."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    scores = {}
    for n in (1, 2):
        p, r = _ngrams(pred, n), _ngrams(ref, n)
        scores[f"rouge{n}"] = _f1(sum((p & r).values()), sum(p.values()), sum(r.values()))
    scores["rougeL"] = _f1(_lcs_length(pred, ref), len(pred), len(ref))
    return scores


def _best_rouge(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """Per metric, the best score over the references (rouge-score's `score_multi`)."""
    each = [rouge_scores(prediction, reference) for reference in references]
    return {key: max(s[key] for s in each) for key in each[0]}


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean over examples of each example's best ROUGE-1/2/L F1 against its references."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need one list of references per prediction, got {len(predictions)} predictions "
                         f"and {len(references)} reference lists")
    per_example = [_best_rouge(p, refs) for p, refs in zip(predictions, references)]
    return {key: sum(s[key] for s in per_example) / len(per_example) for key in per_example[0]}


def bleu_tokenizer(references: Sequence[Sequence[str]], tokenize: str = "auto") -> str:
    """sacrebleu's tokenizer name: "zh" when any reference has CJK text, else "13a", unless given."""
    if tokenize != "auto":
        return tokenize
    return "zh" if any(_CJK_RE.search(r) for refs in references for r in refs) else "13a"


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], tokenize: str = "auto") -> tuple[float, str]:
    """sacrebleu's corpus BLEU (0-100) and its signature; each prediction may have several references."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need one list of references per prediction, got {len(predictions)} predictions "
                         f"and {len(references)} reference lists")
    metrics = require("sacrebleu.metrics", "eval", "BLEU")  # imported only when scoring
    metric = metrics.BLEU(tokenize=bleu_tokenizer(references, tokenize))
    # sacrebleu takes reference streams (the k-th reference of every example); None fills the shorter lists.
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(max(map(len, references)))]
    return metric.corpus_score(list(predictions), streams).score, str(metric.get_signature())


# ---------------------------------------------------------------------------------------- data
def _references(columns: dict[str, Any]) -> list[str]:
    if "references" in columns:
        value = columns["references"]
        if not isinstance(value, list) or not value or not all(isinstance(r, str) and r.strip() for r in value):
            raise DataError("field 'references' must be a non-empty list of non-empty strings")
        return value
    value = columns.get("reference")
    if not isinstance(value, str) or not value.strip():
        raise DataError("need a non-empty string field 'reference' (or a list 'references')")
    return [value]


@dataclass(frozen=True)
class ReferenceExample:
    prompt: Prompt
    references: list[str]
    where: str = ""  # file:line, for error messages


def load_references(path: str | Path) -> list[ReferenceExample]:
    """The prompts and references of every record of a JSONL/JSON file or a directory of them."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".json"))
    examples = []
    for file in files:
        for line, record in iter_records(file, kind="prompt"):
            try:
                examples.append(ReferenceExample(record.prompt, _references(record.columns), f"{file}:{line}"))
            except DataError as e:
                raise DataError(f"{file}:{line}: {e}") from None
    if not examples:
        raise DataError(f"{path}: no prompt/reference records")
    return examples


def _messages(prompt: Prompt) -> list[Message]:
    if isinstance(prompt, str):
        return [Message("user", prompt)]
    return [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in prompt]


def _plain_prompt(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    messages = _messages(prompt)
    if len(messages) != 1 or messages[0].role != "user":
        raise DataError("a plain-text prompt must be one string, not a conversation (with a system turn or "
                        "several turns); evaluate it through the chat template instead")
    return messages[0].content


# ---------------------------------------------------------------------------------------- evaluation
@dataclass
class ReferenceResult(EvalResult):
    task: ClassVar[str] = "references"
    bleu: float  # sacrebleu corpus BLEU, 0-100
    bleu_signature: str
    rouge1: float  # mean F1, 0-1
    rouge2: float
    rougeL: float
    n: int
    chat: bool  # prompts went through the chat template (else as plain text)
    examples: list[dict[str, Any]]  # per example: prompt, references, prediction and its ROUGE scores
    source: str = ""

    def summary(self) -> dict[str, Any]:
        return {"bleu": self.bleu, "rouge1": self.rouge1, "rouge2": self.rouge2, "rougeL": self.rougeL,
                "n": self.n, "prompt_format": "chat" if self.chat else "plain", "bleu_signature": self.bleu_signature}

    def details(self) -> str:
        rows = [[one_line(e["prompt"], 30), one_line(e["prediction"], 40), one_line(e["references"][0], 40)]
                for e in self.examples[:3]]
        return markdown_table(["prompt (first 3)", "prediction", "reference"], rows)


def evaluate_references(generator: TextGenerator,
                        data: str | Path | Sequence[tuple[Prompt, str | Sequence[str]]], chat: bool = True,
                        max_new_tokens: int = 128, tokenize: str = "auto", batch_size: int = 16) -> ReferenceResult:
    """Greedy replies to the prompts of `data` (a file or directory, see the module docstring, or
    `(prompt, reference or references)` pairs), scored with corpus BLEU and ROUGE-1/2/L against the
    references.

    `chat=True` renders each prompt with the tokenizer's chat template and stops at the end of the
    assistant turn (for SFT models); `chat=False` continues the prompt text as it is (for pretrained
    models), stopping at EOS. `tokenize`: sacrebleu's tokenizer, or "auto" (see `bleu_tokenizer`).
    """
    if isinstance(data, (str, Path)):
        examples = load_references(data)
        source = str(data)
    else:
        examples = [ReferenceExample(prompt, [refs] if isinstance(refs, str) else list(refs), f"example {i}")
                    for i, (prompt, refs) in enumerate(data)]
        source = f"{len(examples)} prompts"
    if not examples:
        raise DataError("no prompt/reference pairs given")
    if not chat:  # refuse a conversation before generating anything
        for example in examples:
            try:
                _plain_prompt(example.prompt)
            except DataError as e:
                raise DataError(f"{example.where}: {e}") from None
    # None stops plain continuations at the tokenizer's EOS
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              stop_token_ids=generator.chat_stop_ids() if chat else None)
    predictions = []
    for start in range(0, len(examples), batch_size):
        prompts = [example.prompt for example in examples[start:start + batch_size]]
        if chat:
            prompt_ids = [generator.chat_prompt_ids(_messages(p)) for p in prompts]
            predictions += [generator.tokenizer.decode(ids, skip_special_tokens=True)
                            for ids in generator.generate(prompt_ids, config)]
        else:
            predictions += generator.generate([_plain_prompt(p) for p in prompts], config)
    predictions = [p.strip() for p in predictions]
    bleu_score, signature = bleu(predictions, [example.references for example in examples], tokenize)
    rows = [{"prompt": "\n".join(m.content for m in _messages(example.prompt)), "references": example.references,
             "prediction": prediction, **_best_rouge(prediction, example.references)}
            for example, prediction in zip(examples, predictions)]
    means = {key: sum(row[key] for row in rows) / len(rows) for key in ("rouge1", "rouge2", "rougeL")}
    return ReferenceResult(bleu=bleu_score, bleu_signature=signature, **means, n=len(rows), chat=chat,
                           examples=rows, source=source)
