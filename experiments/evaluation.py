"""Scoring the arms on held-out charts: generated answers and teacher-forced loss.

Metrics (each over the first `n` held-out charts of a task; only a sample's first question is asked):
- chart QA: ChartQA relaxed accuracy (`vlmoe.eval.relaxed_accuracy`: numbers within 5%, else
  exact after normalisation).
- chart-to-table: **cell accuracy** = reference cells matched at the same (row, column) by the
  generated table (relaxed accuracy per cell, header row included) / the larger of the two
  tables' cell counts, so missing and extra cells both cost; and **table exact match** (every
  cell matched and the same shape).
- chart type and other short answers: exact match (`vlmoe.eval.exact_match`).
- held-out loss: mean token cross-entropy of the reference answers, teacher-forced.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmoe.data import ConversationCollator, ConversationSample, read_conversations, split_model_inputs
from vlmoe.eval import GenerationSettings, chat_prompt, exact_match, generate, relaxed_accuracy
from vlmoe.moe import routing_inputs


def table_cells(text: str) -> list[list[str]]:
    """The cells of a markdown table, row by row; the `| --- |` separator row is skipped.

    >>> table_cells("| a | b |\\n| --- | --- |\\n| x | 1.5 |")
    [['a', 'b'], ['x', '1.5']]
    """
    rows = []
    for line in text.strip().splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if all(set(cell) <= set("-: ") for cell in cells):
            continue
        rows.append(cells)
    return rows


def table_scores(prediction: str, reference: str) -> tuple[float, bool]:
    """(cell accuracy, exact match) of a generated markdown table against the reference.

    >>> table_scores("| a | b |\\n| x | 1.52 |", "| a | b |\\n| --- | --- |\\n| x | 1.5 |")
    (1.0, True)
    >>> table_scores("| a | b |", "| a | b |\\n| x | 1 |")
    (0.5, False)
    """
    predicted, wanted = table_cells(prediction), table_cells(reference)
    matched = sum(
        relaxed_accuracy(predicted[r][c], cell)
        for r, row in enumerate(wanted)
        for c, cell in enumerate(row)
        if r < len(predicted) and c < len(predicted[r])
    )
    size = max(sum(map(len, predicted)), sum(map(len, wanted)), 1)
    same_shape = [len(row) for row in predicted] == [len(row) for row in wanted]
    return matched / size, bool(same_shape and matched == sum(map(len, wanted)))


def read_split(path: str | Path, n: int | None = None) -> list[ConversationSample]:
    samples, _ = read_conversations(path)
    return samples[:n]


def answer(
    model: Any,
    processor: Any,
    samples: Sequence[ConversationSample],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers to each sample's first question (its images attached).

    Samples with a MoCLE cluster id are answered in batches of one cluster, inside
    `routing_inputs(cluster_ids=...)`: `vlmoe.eval.generate` itself passes no cluster ids.
    """
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    groups: dict[int | None, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(sample.cluster_id, []).append(i)
    answers: list[str] = [""] * len(samples)
    device = next(model.parameters()).device
    for cluster, indices in groups.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            prompts, images = [], []
            for i in chunk:
                question = samples[i].messages[0]["content"].replace("<image>", "").strip()
                prompts.append(chat_prompt(processor, question, len(samples[i].images)))
                images.append([Image.open(path).convert("RGB") for path in samples[i].images])
            ids = None if cluster is None else torch.full((len(chunk),), cluster, device=device)
            with torch.no_grad(), routing_inputs(model, cluster_ids=ids):
                texts = generate(model, processor, prompts, images, settings, progress=False)
            for i, text in zip(chunk, texts, strict=True):
                answers[i] = text.strip()
    return answers


def score(task: str, predictions: Sequence[str], samples: Sequence[ConversationSample]) -> dict[str, float]:
    """The task's metrics (see the module docstring) of `predictions` for `samples`."""
    references = [s.messages[1]["content"] for s in samples]
    n = max(len(references), 1)
    if task == "chart_to_table":
        pairs = [table_scores(p, r) for p, r in zip(predictions, references, strict=True)]
        return {
            "table_cell_accuracy": sum(cell for cell, _ in pairs) / n,
            "table_exact_match": sum(exact for _, exact in pairs) / n,
        }
    metric = relaxed_accuracy if task == "chart_qa" else exact_match
    name = "relaxed_accuracy" if task == "chart_qa" else f"{task}_exact_match"
    return {name: sum(metric(p, r) for p, r in zip(predictions, references, strict=True)) / n}


def score_heldout(
    model: Any, processor: Any, heldout: dict[str, list[ConversationSample]], scale: Any, tasks: Sequence[str]
) -> dict[str, float]:
    """Generate and score the first `scale.eval_samples` held-out samples of each task."""
    budget = {"chart_to_table": scale.table_tokens}
    metrics: dict[str, float] = {}
    for task in tasks:
        samples = heldout[task][: scale.eval_samples]
        metrics.update(score(task, answer(model, processor, samples, budget.get(task, 12)), samples))
    return metrics


def heldout_loss(
    model: Any,
    processor: Any,
    samples: Sequence[ConversationSample],
    max_length: int | None,
    batch_size: int = 32,
) -> float:
    """Mean token cross-entropy of the reference answers (teacher-forced, routing inputs set)."""
    collator = ConversationCollator(processor, max_length=max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = collator(list(samples[start : start + batch_size]))
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            inputs, tags = split_model_inputs(batch)
            cluster_ids = tags.get("cluster_ids")
            if cluster_ids is not None and bool((cluster_ids < 0).any()):
                cluster_ids = None
            with routing_inputs(model, attention_mask=inputs.get("attention_mask"), cluster_ids=cluster_ids):
                output = model(**inputs)
            count = int((inputs["labels"][:, 1:] != -100).sum())
            total += float(output.loss) * count
            tokens += count
    model.train(was_training)
    return total / max(tokens, 1)
