"""Evaluation: how well a model does what each stage taught it.

Every `evaluate_*` function returns a result dataclass with `to_dict()` (JSON) and `format()` (a
Markdown table); `format_results` and `save_results` print and save several at once.
"""

from minillm.evaluation.classification import ClassificationResult, evaluate_classification
from minillm.evaluation.multiple_choice import (
    MultipleChoiceQuestion,
    MultipleChoiceResult,
    build_prompt,
    evaluate_multiple_choice,
    load_multiple_choice,
)
from minillm.evaluation.perplexity import PerplexityResult, evaluate_perplexity
from minillm.evaluation.references import ReferenceResult, bleu, evaluate_references, rouge, rouge_scores
from minillm.evaluation.results import EvalResult, format_results, save_results
from minillm.evaluation.word_problems import (
    GeneratedAnswerResult,
    evaluate_word_problems,
    word_problem_accuracy,
)

__all__ = ["ClassificationResult", "EvalResult", "GeneratedAnswerResult", "MultipleChoiceQuestion",
           "MultipleChoiceResult", "PerplexityResult", "ReferenceResult", "bleu", "build_prompt",
           "evaluate_classification", "evaluate_multiple_choice", "evaluate_perplexity", "evaluate_references",
           "evaluate_word_problems", "format_results", "load_multiple_choice", "rouge", "rouge_scores",
           "save_results", "word_problem_accuracy"]
