"""Accuracy on the built-in arithmetic word problems, scored by the built-in answer checker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from minillm.data.builtin import WordProblem, check_answer, heldout_word_problems
from minillm.evaluation.results import EvalResult, markdown_table, one_line
from minillm.inference.generator import GenerationConfig, TextGenerator


def word_problem_accuracy(generator: TextGenerator, problems: Sequence[WordProblem] | int = 100,
                          chat: bool = True, max_new_tokens: int = 48) -> tuple[float, list[str]]:
    """Greedy answers to `problems` (or that many held-out ones) and the fraction the checker accepts.

    `chat=True` asks each question as a user turn through the tokenizer's chat template (what SFT
    teaches); `chat=False` gives the question as plain text followed by a newline, the layout of the
    pretraining corpus. Returns the accuracy and the answers.
    """
    if isinstance(problems, int):
        problems = heldout_word_problems(problems)
    tokenizer = generator.tokenizer
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p.question}],
                                                 add_generation_prompt=True) for p in problems]
        stops = [t for t in (tokenizer.im_end_id, tokenizer.eos_token_id) if t is not None]
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, stop_token_ids=stops)
        answers = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generator.generate(prompts, config)]
    else:
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, stop_strings=["\n\n"])
        answers = generator.generate([p.question + "\n" for p in problems], config)
    accuracy = sum(check_answer(p, a) for p, a in zip(problems, answers)) / len(problems)
    return accuracy, answers


@dataclass
class GeneratedAnswerResult(EvalResult):
    task: ClassVar[str] = "word_problems"
    accuracy: float
    n: int
    correct: int
    chat: bool  # asked through the chat template (else as plain text)
    examples: list[dict[str, Any]]  # per problem: question, expected, response, correct
    source: str = "built-in held-out word problems"

    def summary(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n, "correct": self.correct,
                "prompt_format": "chat" if self.chat else "plain"}

    def details(self) -> str:
        rows = [[one_line(e["question"], 40), e["expected"], one_line(e["response"], 50), "yes" if e["correct"] else "no"]
                for e in self.examples[:5]]
        return markdown_table(["question (first 5)", "expected", "response", "correct"], rows)


def evaluate_word_problems(generator: TextGenerator, problems: Sequence[WordProblem] | int = 100,
                           chat: bool = True, max_new_tokens: int = 48) -> GeneratedAnswerResult:
    """`word_problem_accuracy` as a result with every question, expected answer and response."""
    if isinstance(problems, int):
        problems = heldout_word_problems(problems)
    if not problems:
        raise ValueError("no word problems to evaluate (give at least one)")
    accuracy, answers = word_problem_accuracy(generator, problems, chat, max_new_tokens)
    examples = [{"question": p.question, "expected": p.answer, "response": a, "correct": check_answer(p, a)}
                for p, a in zip(problems, answers)]
    return GeneratedAnswerResult(accuracy=accuracy, n=len(examples), correct=sum(e["correct"] for e in examples),
                                 chat=chat, examples=examples)
