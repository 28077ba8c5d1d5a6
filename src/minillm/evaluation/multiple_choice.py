"""Multiple-choice benchmarks scored by log-likelihood: C-Eval and CMMLU CSV files, or JSONL.

Data:
- CSV in the C-Eval/CMMLU layout, a header row then one question per row: `id?,Question,A,B,C,D,Answer`
  (any further option columns E, F, … and other columns such as `explanation` are allowed; names are
  case-insensitive; an unnamed first column, CMMLU's index, is the id). The subject is the file name without `_val`/`_test`/`_dev`: `computer_network_val.csv`
  → `computer_network`.
- JSONL (or a JSON array): `{"question", "choices": [...] or "A", "B", …, "answer": "B" or 1, "subject"?,
  "id"?}`; an integer answer is a 0-based index. Without `subject`, the file name gives it.
- A directory: every CSV/JSONL/JSON file in it, except dev files (`*_dev.*`).

Few-shot examples are the first k questions of the subject's dev file: given with `dev` (a file, or a
directory of `{subject}_dev.csv` / `{subject}.csv` files; a dev set holding one subject serves every
subject), or found beside the evaluated file: `{subject}_dev.csv` in the same directory, or in a sibling
`dev/` directory as `{subject}_dev.csv` (C-Eval) or `{subject}.csv` (CMMLU).

Methods (lm-evaluation-harness's two ways of scoring a choice):
- `letter`: the prompt lists the question and its lettered options and ends with "答案：" (no space);
  the prediction is the letter whose token is likeliest next. Letters are scored as the tokens the
  tokenizer gives the prompt and letter together (the continuation is what `encode(prompt + "A")` adds to
  `encode(prompt)`), so "：A" splitting as "：" + "A" or a tokenizer merging " A" are both handled; with
  this project's tokenizers a letter after "：" is always one token.
- `option`: the prompt is the question and "答案：" without the option list; each option's text is
  scored as the continuation, log p(option | prompt). Options differ in length, so the prediction
  uses the log-likelihood per character of the option (lm-evaluation-harness's `acc_norm`;
  characters, not tokens, so the number does not depend on the tokenizer); the unnormalised sum is
  reported beside it as `option_raw` (`acc`).

Every prompt starts with the tokenizer's BOS, as generation prompts do. A prompt longer than the
model's context loses its beginning (the oldest few-shot examples first); `truncated` counts them.
"""

from __future__ import annotations

import csv
import io
import logging
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from minillm.data.formats import DataError, iter_json_objects, read_text
from minillm.evaluation.results import EvalResult, markdown_table
from minillm.evaluation.scoring import labelled_logprobs, next_token_logprobs

logger = logging.getLogger("minillm.evaluation")

LETTERS = string.ascii_uppercase
ANSWER_CUE = "答案："
METHODS = ("letter", "option", "both")
SPLIT_SUFFIXES = ("_val", "_test", "_dev")
QUESTION_SUFFIXES = (".csv", ".jsonl", ".json")


@dataclass(frozen=True)
class MultipleChoiceQuestion:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    subject: str
    id: str = ""
    file: str = ""
    line: int = 0  # 1-based line of a CSV/JSONL file, or 0-based item of a JSON array

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


# ---------------------------------------------------------------------------------------- reading
def subject_of(file: Path) -> str:
    """`computer_network_val.csv` → `computer_network`; `agronomy.csv` → `agronomy`."""
    stem = file.stem
    for suffix in SPLIT_SUFFIXES:
        if stem.endswith(suffix):
            return stem[:-len(suffix)]
    return stem


def _answer(value: Any, num_choices: int) -> int:
    """An answer letter ("B", any case) or a 0-based index → index; a `DataError` reason otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < num_choices:
            return value
        raise DataError(f"answer index {value} is out of range for {num_choices} options")
    if isinstance(value, str):
        letter = value.strip().upper()
        if len(letter) == 1 and letter in LETTERS[:num_choices]:
            return LETTERS.index(letter)
    raise DataError(f"answer must be one of the letters {', '.join(LETTERS[:num_choices])} "
                    f"(or a 0-based index in JSON), got {value!r}")


def _choice_texts(values: Sequence[Any]) -> tuple[str, ...]:
    for letter, value in zip(LETTERS, values):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"option {letter} is empty" if isinstance(value, str) else
                            f"option {letter} must be a string, got {type(value).__name__}")
    return tuple(value.strip() for value in values)


def _consecutive_letters(names: Any, letters: str) -> list[str]:
    """The option names present in `names`: A, B, C, … up to the first one missing."""
    present = []
    for letter in letters:
        if letter not in names:
            break
        present.append(letter)
    return present


def _read_csv(file: Path) -> list[MultipleChoiceQuestion]:
    text = read_text(file)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise DataError(f"{file}: empty file (expected a header row id?,Question,A,B,C,D,Answer)")
    columns = {name.strip().lower(): i for i, name in enumerate(header)}
    for required in ("question", "answer"):
        if required not in columns:
            raise DataError(f"{file}:1: missing column {required!r} (columns: {', '.join(header)}); expected "
                            "id?,Question,A,B,C,D,Answer" + (" — C-Eval's test split has no answers; evaluate "
                                                             "its val split" if required == "answer" else ""))
    letters = _consecutive_letters(columns, LETTERS.lower())
    if len(letters) < 2:
        raise DataError(f"{file}:1: need option columns A, B, … (at least two); columns: {', '.join(header)}")
    # CMMLU's first column, an index, has no name
    id_column = columns.get("id", 0 if not header[0].strip() else None)
    questions, end = [], reader.line_num
    for row in reader:
        start, end = end + 1, reader.line_num  # a quoted cell may span lines; report the row's first
        if not any(cell.strip() for cell in row):
            continue
        try:
            if len(row) != len(header):
                raise DataError(f"expected {len(header)} fields ({', '.join(header)}), got {len(row)}")
            question = row[columns["question"]].strip()
            if not question:
                raise DataError("empty question")
            choices = _choice_texts([row[columns[letter]] for letter in letters])
            answer = _answer(row[columns["answer"]], len(choices))
        except DataError as e:
            raise DataError(f"{file}:{start}: {e}") from None
        questions.append(MultipleChoiceQuestion(question, choices, answer, subject_of(file),
                                                row[id_column].strip() if id_column is not None else "",
                                                str(file), start))
    return questions


def _from_object(obj: Any, default_subject: str) -> tuple[str, tuple[str, ...], int, str, str]:
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError("missing or empty field 'question'" if not question else
                        f"field 'question' must be a string, got {type(question).__name__}")
    if "choices" in obj:
        if not isinstance(obj["choices"], list) or len(obj["choices"]) < 2:
            raise DataError("field 'choices' must be a list of at least two options")
        values = obj["choices"]
    else:
        values = [obj[letter] for letter in _consecutive_letters(obj, LETTERS)]
        if len(values) < 2:
            raise DataError(f"need options as 'choices': [...] or as fields A, B, …; fields: {', '.join(obj)}")
    if "answer" not in obj:
        raise DataError("missing field 'answer'")
    choices = _choice_texts(values)
    subject = obj.get("subject", default_subject)
    if not isinstance(subject, str) or not subject.strip():
        raise DataError(f"field 'subject' must be a non-empty string, got {subject!r}")
    return question.strip(), choices, _answer(obj["answer"], len(choices)), subject.strip(), str(obj.get("id", ""))


def _read_json(file: Path) -> list[MultipleChoiceQuestion]:
    questions = []
    for line, where, obj in iter_json_objects(file):
        try:
            question, choices, answer, subject, qid = _from_object(obj, subject_of(file))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        questions.append(MultipleChoiceQuestion(question, choices, answer, subject, qid, str(file), line))
    return questions


def _question_files(path: Path, include_dev: bool) -> list[Path]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in QUESTION_SUFFIXES
                   and (include_dev or not p.stem.endswith("_dev")))
    if not files:
        raise DataError(f"{path}: directory contains no {', '.join(QUESTION_SUFFIXES)} question files")
    return files


def load_multiple_choice(path: str | Path, include_dev: bool = False) -> list[MultipleChoiceQuestion]:
    """The questions of a CSV/JSONL/JSON file or a directory of them (see the module docstring); in a
    directory, dev files (`*_dev.*`) are left out unless `include_dev`."""
    questions = []
    for file in _question_files(Path(path), include_dev):
        read = _read_csv if file.suffix.lower() == ".csv" else _read_json
        found = read(file)
        if not found:
            raise DataError(f"{file}: no questions")
        questions += found
    return questions


# ---------------------------------------------------------------------------------------- few-shot
def _dev_candidates(file: Path, subject: str) -> list[Path]:
    dev_dir = file.parent.parent / "dev"
    return [file.with_name(f"{subject}_dev{file.suffix}"), dev_dir / f"{subject}_dev{file.suffix}",
            dev_dir / f"{subject}{file.suffix}"]


def _few_shot_examples(questions: Sequence[MultipleChoiceQuestion], k: int,
                       dev: str | Path | None) -> dict[str, list[MultipleChoiceQuestion]]:
    """The first `k` dev questions of each subject in `questions`."""
    subjects = dict.fromkeys(q.subject for q in questions)
    if k == 0:
        return {s: [] for s in subjects}
    pool: dict[str, list[MultipleChoiceQuestion]] = defaultdict(list)
    if dev is not None:
        for q in load_multiple_choice(dev, include_dev=True):
            pool[q.subject].append(q)
        if len(pool) == 1:  # one dev set serves every subject
            pool = defaultdict(list, {s: next(iter(pool.values())) for s in subjects})
        missing = [s for s in subjects if s not in pool]
        if missing:
            raise DataError(f"{dev}: no dev questions for subject {missing[0]!r} (dev subjects: {', '.join(pool)})")
    else:
        first_file = {}
        for q in questions:
            first_file.setdefault(q.subject, q.file)
        for subject, file in first_file.items():
            candidates = _dev_candidates(Path(file), subject) if file else []
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                looked = ", ".join(map(str, candidates)) or "nowhere (the questions came from no file)"
                raise DataError(f"{k}-shot evaluation needs dev questions for subject {subject!r}; looked in "
                                f"{looked}; give a dev file or directory (dev=..., --dev)")
            pool[subject] = load_multiple_choice(found)
    shots = {}
    for subject in subjects:
        if len(pool[subject]) < k:
            logger.warning("subject %r has %d dev questions, fewer than few_shot=%d; using all of them",
                           subject, len(pool[subject]), k)
        shots[subject] = pool[subject][:k]
    return shots


# ---------------------------------------------------------------------------------------- prompts
def format_question(question: MultipleChoiceQuestion, method: str, with_answer: bool = False) -> str:
    """One question as the model sees it: for `letter`, the question, its lettered options and
    "答案：" (then the letter, for a few-shot example); for `option`, the question and "答案："
    (then the option's text)."""
    if method == "letter":
        options = "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, question.choices))
        text = f"{question.question}\n{options}{ANSWER_CUE}"
        return text + question.answer_letter if with_answer else text
    if method == "option":
        text = f"{question.question}\n{ANSWER_CUE}"
        return text + question.choices[question.answer] if with_answer else text
    raise ValueError(f"method must be 'letter' or 'option', got {method!r}")


def build_prompt(question: MultipleChoiceQuestion, shots: Sequence[MultipleChoiceQuestion], method: str) -> str:
    """The CMMLU instruction line, the answered few-shot examples, then the question to answer."""
    header = f"以下是关于{question.subject.replace('_', ' ')}的单项选择题，请直接给出正确答案的选项。\n\n"
    examples = "".join(format_question(shot, method, with_answer=True) + "\n\n" for shot in shots)
    return header + examples + format_question(question, method)


# ---------------------------------------------------------------------------------------- scoring
def score_continuations(model: nn.Module, tokenizer: Any, requests: Sequence[tuple[str, str]],
                        batch_size: int = 8) -> tuple[list[float], int]:
    """log p(continuation | context) summed over the continuation's tokens, for each `(context,
    continuation)` pair, and how many contexts had to lose their start to fit the model's context.

    The continuation's tokens are those `encode(context + continuation)` adds after `encode(context)`
    (as lm-evaluation-harness), or, where the two encodings disagree at the boundary, the continuation
    encoded alone. Single-token continuations of one context share one forward pass.
    """
    window = model.config.max_position_embeddings
    encoded: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        if text not in encoded:
            encoded[text] = list(tokenizer.encode(text, add_special_tokens=True))
        return encoded[text]

    pairs = []
    for context, continuation in requests:
        context_ids, whole = encode(context), list(tokenizer.encode(context + continuation, add_special_tokens=True))
        if whole[:len(context_ids)] == context_ids and len(whole) > len(context_ids):
            continuation_ids = whole[len(context_ids):]
        else:
            continuation_ids = list(tokenizer.encode(continuation))
        if not continuation_ids or len(continuation_ids) >= window:
            raise ValueError(f"the continuation {continuation[:40]!r} has {len(continuation_ids)} tokens; it needs "
                             f"between 1 and {window - 1} (the model's context)")
        pairs.append((context_ids, continuation_ids))

    # a single-token continuation is read off the context's own forward pass, so only the context must fit
    truncated = len({tuple(c) for c, t in pairs if (len(c) if len(t) == 1 else len(c) + len(t)) > window})
    scores: list[float] = [0.0] * len(pairs)
    requests_of: dict[tuple[int, ...], list[int]] = {}  # context → its single-token requests
    for i, (context_ids, continuation_ids) in enumerate(pairs):
        if len(continuation_ids) == 1:
            requests_of.setdefault(tuple(context_ids[-window:]), []).append(i)
    contexts = list(requests_of)
    candidates = [[pairs[i][1][0] for i in requests_of[context]] for context in contexts]
    for context, logps in zip(contexts, next_token_logprobs(model, contexts, candidates, batch_size)):
        for i, logp in zip(requests_of[context], logps.tolist()):
            scores[i] = logp
    multi = [i for i, (_, t) in enumerate(pairs) if len(t) > 1]
    rows = []
    for i in multi:
        context_ids, continuation_ids = pairs[i]
        ids = (context_ids + continuation_ids)[-window:]
        rows.append((ids, [-100] * (len(ids) - len(continuation_ids)) + continuation_ids))
    for i, (logps, _) in zip(multi, labelled_logprobs(model, rows, batch_size)):
        scores[i] = float(logps.double().sum())
    return scores, truncated


@dataclass
class MultipleChoiceResult(EvalResult):
    task: ClassVar[str] = "multiple_choice"
    methods: list[str]  # "letter", "option" (per-character normalised), "option_raw"
    n: int
    correct: dict[str, int]  # per method
    accuracy: dict[str, float]  # per method, micro: over all questions
    macro_accuracy: dict[str, float]  # per method, the mean of the subjects' accuracies
    subjects: dict[str, dict[str, Any]]  # subject → {"n", "correct": {method: c}, "accuracy": {method: a}}
    few_shot: int
    truncated: int  # prompts that lost their beginning to fit the model's context
    predictions: list[dict[str, Any]]  # per question: id, subject, source, answer, predicted, scores
    source: str = ""

    def summary(self) -> dict[str, Any]:
        numbers: dict[str, Any] = {}
        for method in self.methods:
            numbers[f"accuracy_{method}"] = self.accuracy[method]
            numbers[f"macro_accuracy_{method}"] = self.macro_accuracy[method]
        return {**numbers, "n": self.n, "subjects": len(self.subjects), "few_shot": self.few_shot,
                "truncated_prompts": self.truncated}

    def details(self) -> str:
        rows = [[subject, s["n"], *(s["accuracy"][m] for m in self.methods)] for subject, s in self.subjects.items()]
        rows.append(["(micro) all", self.n, *(self.accuracy[m] for m in self.methods)])
        rows.append(["(macro) mean", len(self.subjects), *(self.macro_accuracy[m] for m in self.methods)])
        return markdown_table(["subject", "n", *self.methods], rows)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def evaluate_multiple_choice(model: nn.Module, tokenizer: Any,
                             data: str | Path | Sequence[MultipleChoiceQuestion], few_shot: int = 0,
                             dev: str | Path | None = None, method: str = "both",
                             batch_size: int = 8) -> MultipleChoiceResult:
    """Accuracy of `model` on multiple-choice questions (a file, a directory or a list; see the module
    docstring), per subject and overall, with `few_shot` answered dev examples before each question.

    `method`: "letter", "option" or "both". Overall accuracy is the micro average (correct / questions);
    `macro_accuracy` is the mean over subjects, as C-Eval and CMMLU report.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if few_shot < 0:
        raise ValueError(f"few_shot must be >= 0, got {few_shot}")
    questions = load_multiple_choice(data) if isinstance(data, (str, Path)) else list(data)
    if not questions:
        raise DataError("no multiple-choice questions given")
    shots = _few_shot_examples(questions, few_shot, dev)
    scoring = ["letter", "option"] if method == "both" else [method]

    scores: dict[str, list[list[float]]] = {}
    truncated = 0
    if "letter" in scoring:
        requests = [(build_prompt(q, shots[q.subject], "letter"), LETTERS[i])
                    for q in questions for i in range(len(q.choices))]
        flat, cut = score_continuations(model, tokenizer, requests, batch_size)
        scores["letter"] = _per_question(flat, questions)
        truncated += cut
    if "option" in scoring:
        requests = [(build_prompt(q, shots[q.subject], "option"), choice) for q in questions for choice in q.choices]
        flat, cut = score_continuations(model, tokenizer, requests, batch_size)
        scores["option_raw"] = _per_question(flat, questions)
        scores["option"] = [[s / len(c) for s, c in zip(row, q.choices)]
                            for row, q in zip(scores["option_raw"], questions)]
        truncated += cut
    if truncated:
        logger.warning("%d prompt(s) were longer than the model's context (%d tokens) and lost their beginning",
                       truncated, model.config.max_position_embeddings)
    methods = [m for m in ("letter", "option", "option_raw") if m in scores]
    return _result(questions, scores, methods, few_shot, truncated,
                   str(data) if isinstance(data, (str, Path)) else f"{len(questions)} questions")


def _per_question(flat: list[float], questions: Sequence[MultipleChoiceQuestion]) -> list[list[float]]:
    rows, start = [], 0
    for q in questions:
        rows.append(flat[start:start + len(q.choices)])
        start += len(q.choices)
    return rows


def _result(questions: Sequence[MultipleChoiceQuestion], scores: dict[str, list[list[float]]], methods: list[str],
            few_shot: int, truncated: int, source: str) -> MultipleChoiceResult:
    subjects: dict[str, dict[str, Any]] = {}
    predictions = []
    for index, q in enumerate(questions):
        subject = subjects.setdefault(q.subject, {"n": 0, "correct": dict.fromkeys(methods, 0)})
        subject["n"] += 1
        predicted = {m: _argmax(scores[m][index]) for m in methods}
        for m in methods:
            subject["correct"][m] += predicted[m] == q.answer
        predictions.append({
            "id": q.id, "subject": q.subject, "source": f"{q.file}:{q.line}" if q.file else "",
            "answer": q.answer_letter, "predicted": {m: LETTERS[p] for m, p in predicted.items()},
            "scores": {m: [round(s, 4) for s in scores[m][index]] for m in methods}})
    for subject in subjects.values():
        subject["accuracy"] = {m: subject["correct"][m] / subject["n"] for m in methods}
    n = len(questions)
    correct = {m: sum(s["correct"][m] for s in subjects.values()) for m in methods}
    return MultipleChoiceResult(
        methods=methods, n=n, correct=correct, accuracy={m: correct[m] / n for m in methods},
        macro_accuracy={m: sum(s["accuracy"][m] for s in subjects.values()) / len(subjects) for m in methods},
        subjects=subjects, few_shot=few_shot, truncated=truncated, predictions=predictions, source=source)
