"""Evaluation: how well a model does what each stage taught it."""

from minillm.evaluation.word_problems import word_problem_accuracy

__all__ = ["word_problem_accuracy"]
