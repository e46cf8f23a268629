"""Evaluation: benchmark metrics, dataset readers, the Program-of-Thought sandbox, batched generation."""

from vlmoe.eval.metrics import (
    exact_match,
    multiple_choice_accuracy,
    parse_option_letter,
    pope_answer,
    pope_metrics,
    relaxed_accuracy,
    vqa_accuracy,
)
from vlmoe.eval.vqa_normalize import normalize_vqa_answer

__all__ = [
    "exact_match",
    "multiple_choice_accuracy",
    "normalize_vqa_answer",
    "parse_option_letter",
    "pope_answer",
    "pope_metrics",
    "relaxed_accuracy",
    "vqa_accuracy",
]
