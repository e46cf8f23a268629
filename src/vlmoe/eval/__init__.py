"""Evaluation: benchmark metrics, dataset readers, the Program-of-Thought sandbox, batched generation,
forced-expert ablations, and the `vlmoe eval` runner."""

from vlmoe.eval.forced import forced_expert
from vlmoe.eval.generate import GenerationSettings, chat_prompt, generate, generate_batch
from vlmoe.eval.metrics import (
    exact_match,
    multiple_choice_accuracy,
    parse_option_letter,
    pope_answer,
    pope_metrics,
    relaxed_accuracy,
    textvqa_accuracy,
    vqa_accuracy,
)
from vlmoe.eval.pot import PotAnswer, extract_program, pot_answer
from vlmoe.eval.readers import read_chartqa, read_llava, read_pope, read_scienceqa, read_textvqa, read_vqav2
from vlmoe.eval.runner import EvalConfig, load_model_for_eval, run_eval
from vlmoe.eval.samples import EvalSample
from vlmoe.eval.sandbox import ALLOWED_MODULES, ProgramResult, run_program
from vlmoe.eval.tasks import TASKS, question_text, read_task, score_sample, summarize
from vlmoe.eval.vqa_normalize import normalize_textvqa_answer, normalize_vqa_answer

__all__ = [
    "ALLOWED_MODULES",
    "TASKS",
    "EvalConfig",
    "EvalSample",
    "GenerationSettings",
    "PotAnswer",
    "ProgramResult",
    "chat_prompt",
    "exact_match",
    "extract_program",
    "forced_expert",
    "generate",
    "generate_batch",
    "load_model_for_eval",
    "multiple_choice_accuracy",
    "normalize_textvqa_answer",
    "normalize_vqa_answer",
    "parse_option_letter",
    "pope_answer",
    "pope_metrics",
    "pot_answer",
    "question_text",
    "read_chartqa",
    "read_llava",
    "read_pope",
    "read_scienceqa",
    "read_task",
    "read_textvqa",
    "read_vqav2",
    "relaxed_accuracy",
    "run_eval",
    "run_program",
    "score_sample",
    "summarize",
    "textvqa_accuracy",
    "vqa_accuracy",
]
