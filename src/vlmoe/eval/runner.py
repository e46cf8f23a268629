"""`vlmoe eval`: answer a benchmark with a model, write predictions as they come, resume, summarise.

Predictions go to `{out_dir}/predictions.jsonl`, one line per sample, appended after every batch
and flushed, so an interrupted run loses at most one batch; a rerun skips the ids already there.
The summary goes to `{out_dir}/summary.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from vlmoe.atomic import write_atomically
from vlmoe.data.folders import output_folder
from vlmoe.eval.clusters import cluster_assigner
from vlmoe.eval.forced import Where, forced_expert
from vlmoe.eval.generate import GenerationSettings, chat_prompt, generate_batch, progress_bar
from vlmoe.eval.pot import pot_answer
from vlmoe.eval.samples import EvalSample
from vlmoe.eval.tasks import question_text, read_task, score_sample, summarize
from vlmoe.json_diff import json_differences

PREDICTIONS_NAME = "predictions.jsonl"
SUMMARY_NAME = "summary.json"
RUN_NAME = "run.json"  # what produced the predictions; a resume must match it


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation run: which benchmark, where its data is, where results go, how to decode."""

    task: str
    data: Path
    out_dir: Path
    model_name: str = ""  # recorded so a resume cannot mix two models' predictions
    model_dtype: str = ""  # ... or two precisions
    image_dir: Path | None = None
    split: str | None = None  # the reader's default split when None
    limit: int | None = None  # the first N samples only (smoke runs)
    pot: bool = False  # run Python answers in the sandbox and score what they print
    pot_timeout_s: float = 5.0
    # The Python that runs PoT programs; under root one that other users can run (/usr/bin/python3)
    # lets the sandbox drop to a throwaway user id. None: this interpreter.
    pot_interpreter: str | None = None
    force_expert: int | None = None
    force_where: Where = "connector"
    # MoCLE: the centroids the model was trained with, and optionally another sentence encoder.
    clusters: Path | None = None
    embedding_model: Path | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    # The model's plain and universal LoRA merged into its base weights (`vlmoe.merge_lora`,
    # `load_model_for_eval(merge_lora=True)`): recorded, as the merged weights round differently.
    merge_lora: bool = False

    def __post_init__(self) -> None:
        # samples[:limit] with a negative limit would drop the last samples instead of keeping the first.
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        ):
            raise ValueError(
                f"EvalConfig: limit is {self.limit!r}; give a whole number >= 1, or None for every sample"
            )
        if not self.pot_timeout_s > 0:
            raise ValueError(
                f"EvalConfig: pot_timeout_s is {self.pot_timeout_s!r}; give a number of seconds > 0"
            )


def load_model_for_eval(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    merge_lora: bool = False,
) -> tuple[nn.Module, Any]:
    """Model and processor from a local directory; nothing is downloaded.

    A vlmoe model (its config.json carries the surgery record) is rebuilt by `vlmoe.load`; any
    other HF vision-language model by `AutoModelForImageTextToText`. The processor must have been
    saved in the same directory (`vlmoe.save(model, path, processor=...)` or
    `processor.save_pretrained(path)`). The model goes to `device`, cast to `dtype` if given.
    `merge_lora`: fold its plain and universal LoRA into the base weights first (`vlmoe.merge_lora`,
    in float32 before the cast): faster generation, at the merged weights' rounding.

    Example:
        >>> model, processor = load_model_for_eval("runs/chartmoe")  # doctest: +SKIP
    """
    from transformers import AutoProcessor

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a local model directory (no config.json); vlmoe eval loads local copies "
            "only: save one with vlmoe.save(model, path) or model.save_pretrained(path)"
        )
    from vlmoe.models.checkpoint import load_local, read_config
    from vlmoe.models.record import CONFIG_KEY

    # A damaged config.json or a non-VLM model_type is named with its file, not a transformers page.
    model = load_local(path)
    if merge_lora:
        if CONFIG_KEY not in read_config(path):
            raise ValueError(
                f"{path}: --merge-lora needs a vlmoe model with LoRA (vlmoe.add_mole, saved by vlmoe.save); "
                "this config.json has no 'vlmoe' section"
            )
        from vlmoe.models.surgery import merge_lora as merge

        try:
            merge(model)
        except ValueError as error:
            raise ValueError(f"{path}: --merge-lora: {error}") from None
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise FileNotFoundError(
            f"{path}: no usable processor ({error}); save the model's processor next to it with "
            "processor.save_pretrained(path)"
        ) from None
    return model.to(device=device, dtype=dtype).eval(), processor


def run_eval(
    model: nn.Module,
    processor: Any,
    config: EvalConfig,
    progress: bool = True,
    samples: list[EvalSample] | None = None,
) -> dict[str, Any]:
    """Answer every not-yet-answered sample of the benchmark, then score all and write the summary.

    Greedy runs resume exactly; sampled runs are seeded per batch, so a resumed sampled run draws
    a different (still seeded) random stream for the samples it had not reached.

    Example:
        >>> config = EvalConfig(task="chartqa", data=Path("data/ChartQA"), out_dir=Path("runs/eval"))
        >>> summary = run_eval(*load_model_for_eval("runs/chartmoe"), config)  # doctest: +SKIP
    """
    if config.pot and config.pot_interpreter is not None and shutil.which(config.pot_interpreter) is None:
        raise FileNotFoundError(
            f"--pot-interpreter {config.pot_interpreter!r} is not an executable; give the path of a "
            "Python 3 interpreter (e.g. /usr/bin/python3) or leave it out to use this one"
        )
    if samples is None:  # callers that read the data already (to fail before loading a model) pass it
        samples = read_task(config.task, config.data, config.image_dir, config.split)
    samples = samples[: config.limit]
    assigner = cluster_assigner(model, config.clusters, config.embedding_model)  # MoCLE models only
    output_folder(config.out_dir).mkdir(parents=True, exist_ok=True)
    predictions_path = config.out_dir / PREDICTIONS_NAME
    done = read_predictions(predictions_path, config.task)
    _check_same_run(config, answered=bool(done))
    todo = [sample for sample in samples if sample.id not in done]
    settings = config.generation
    batches = [todo[i : i + settings.batch_size] for i in range(0, len(todo), settings.batch_size)]
    with _forcing(model, config), open(predictions_path, "a", encoding="utf-8") as out:
        for batch_index, batch in enumerate(
            progress_bar(batches, f"{config.task}: {len(todo)} to answer", progress)
        ):
            images = [[_open_image(path, sample) for path in sample.images] for sample in batch]
            questions = [question_text(sample, config.pot) for sample in batch]
            prompts = [
                chat_prompt(processor, question, len(sample.images))
                for sample, question in zip(batch, questions, strict=True)
            ]
            # A MoCLE model's instruction is the user turn it is shown, as in training.
            cluster_ids = None if assigner is None else assigner.assign(questions)
            answers = generate_batch(model, processor, prompts, images, settings, batch_index, cluster_ids)
            for row, (sample, answer) in enumerate(zip(batch, answers, strict=True)):
                record = _record(sample, answer, config)
                if cluster_ids is not None:
                    record["cluster_id"] = cluster_ids[row]
                done[sample.id] = record
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
    records = [done[sample.id] for sample in samples]
    summary = summarize(config.task, records)
    summary.update(
        {
            "model": config.model_name,
            "predictions": str(predictions_path),
            "pot": config.pot,
            "force_expert": config.force_expert,
            "force_where": config.force_where if config.force_expert is not None else None,
            "generation": asdict(settings),
        }
    )
    if config.pot:
        programs = [r for r in records if r.get("program_status") is not None]
        summary["programs"] = {"run": len(programs), "ok": sum(r["program_status"] == "ok" for r in programs)}
    _write_atomically(config.out_dir / SUMMARY_NAME, json.dumps(summary, indent=2))
    return summary


def read_predictions(path: Path, task: str) -> dict[str, dict[str, Any]]:
    """{id: record} of a predictions file; a half-written last line (a killed run) is dropped.

    Example:
        >>> done = read_predictions(Path("eval/m/chartqa/predictions.jsonl"), "chartqa")  # doctest: +SKIP
        >>> done["human-0"]["scores"]  # doctest: +SKIP
        {'relaxed_accuracy': 1.0}
    """
    if not path.is_file():
        return {}
    data = path.read_bytes()
    # Cut as bytes: a kill can end the file inside a multi-byte character of the half-written line.
    kept = data[: data.rfind(b"\n") + 1]
    text = kept.decode("utf-8")
    if len(kept) != len(data):
        # So the next append starts on a fresh line; atomically, as a disk filling up or a second
        # interrupt during a plain rewrite would leave the file truncated, every answer lost.
        _write_atomically(path, text)
    records = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(
                f"{path} line {number} is not valid JSON; delete that line to redo its sample"
            ) from None
        if not isinstance(record, dict) or "id" not in record:
            if isinstance(record, dict):
                found = f"fields present: {', '.join(sorted(record)) or 'none'}"
            else:
                found = f"a JSON {type(record).__name__}, not an object"
            raise ValueError(
                f"{path} line {number}: a prediction record needs its sample's 'id' field ({found}); "
                "delete that line to redo its sample"
            )
        if record.get("task") != task:
            raise ValueError(
                f"{path} holds {record.get('task')!r} predictions, not {task!r}; use another --out "
                "folder per task (or per model and setting)"
            )
        records[str(record["id"])] = record
    return records


def _run_identity(config: EvalConfig) -> dict[str, Any]:
    """Everything that changes the predictions (not `limit`: a smoke run may be extended)."""
    # batch_size stays in: sampling is seeded per batch, and with a capacity factor which tokens
    # an expert drops depends on the other samples in the batch.
    generation = asdict(config.generation)
    return {
        "model": config.model_name,
        "model_dtype": config.model_dtype,
        "task": config.task,
        "data": str(config.data.resolve()),
        "image_dir": None if config.image_dir is None else str(config.image_dir.resolve()),
        "split": config.split,
        "pot": config.pot,
        "pot_timeout_s": config.pot_timeout_s if config.pot else None,
        "force_expert": config.force_expert,
        "force_where": config.force_where if config.force_expert is not None else None,
        "clusters": None if config.clusters is None else str(config.clusters.resolve()),
        "embedding_model": None if config.embedding_model is None else str(config.embedding_model),
        "generation": generation,
        # Only when set, so runs recorded before the option existed still resume.
        **({"merge_lora": True} if config.merge_lora else {}),
    }


def _check_same_run(config: EvalConfig, answered: bool) -> None:
    path = config.out_dir / RUN_NAME
    identity = json.loads(json.dumps(_run_identity(config)))  # tuples as lists, as read back
    # With nothing answered yet there is nothing to mix: a run that failed before its first
    # prediction (a bad --force-expert, an unreadable image) must not pin its settings.
    if not path.is_file() or not answered:
        _write_atomically(path, json.dumps(identity, indent=2))
        return
    recorded = json.loads(path.read_text(encoding="utf-8"))
    if recorded != identity:
        changed = _changed_settings(recorded, identity)
        raise ValueError(
            f"{config.out_dir} holds predictions made with other settings (differs in: {', '.join(changed)}; "
            f"see {path}); resuming would mix them: pass another --out, or delete that folder to start over"
        )


def _changed_settings(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings that differ, as "name before -> now" ("generation.batch_size 8 -> 2"), so the
    message names the option that changed.

    >>> _changed_settings({"pot": False, "generation": {"seed": 0}}, {"pot": True, "generation": {"seed": 1}})
    ['generation.seed 0 -> 1', 'pot False -> True']
    """
    found = sorted(json_differences(recorded, now, into_lists=False), key=lambda difference: difference[0])
    return [f"{name} {before} -> {after}" for name, before, after in found]


def _record(sample: EvalSample, answer: str, config: EvalConfig) -> dict[str, Any]:
    record: dict[str, Any] = {"id": sample.id, "task": sample.task, "subset": sample.subset}
    prediction = answer
    if config.pot:
        ran = pot_answer(answer, timeout_s=config.pot_timeout_s, interpreter=config.pot_interpreter)
        prediction = ran.answer
        if ran.result is not None:
            record.update(program_status=ran.result.status, program_message=ran.result.message)
    record.update(
        question=sample.question,
        raw_answer=answer,
        prediction=prediction,
        answers=list(sample.answers),
        scores=score_sample(sample, prediction),
    )
    return record


def _open_image(path: Path, sample: EvalSample) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(
            f"sample {sample.id!r}: image {path} cannot be read ({error}); "
            "replace the file or remove the sample"
        ) from None


@contextlib.contextmanager
def _forcing(model: nn.Module, config: EvalConfig) -> Iterator[None]:
    if config.force_expert is None:
        yield
        return
    with forced_expert(model, config.force_expert, where=config.force_where):
        yield


def _write_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda temp: temp.write_text(text, encoding="utf-8"))
