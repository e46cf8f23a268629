"""Three chart domains whose answer styles clash, built from the shared chart data (LLaVA-MoLE's
data conflict, made on purpose):

- `terse`: a chart question, answered with the bare value ("189.32");
- `verbose`: the same kind of question, answered with a sentence that repeats it
  ('The answer to the question "..." is 189.32.');
- `table`: chart-to-table, a long structured answer.

Only the instruction's last line tells terse from verbose, so one dense LoRA must serve three
output distributions from near-identical inputs.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from experiments import common
from experiments.evaluation import read_split
from vlmoe.data import ConversationSample
from vlmoe.eval import relaxed_accuracy

DOMAINS = ("terse", "verbose", "table")
VERBOSE_SUFFIX = "Answer in a full sentence."
_SENTENCE = re.compile(r'^The answer to the question ".*" is (.+)\.$', re.DOTALL)


def domain_file(work: str | Path, split: str, domain: str) -> Path:
    return Path(work) / "mole" / "data" / f"{split}_{domain}.jsonl"


def verbose_answer(question: str, answer: str) -> str:
    """The verbose domain's reply.

    >>> verbose_answer("What is the sum of A?", "12")
    'The answer to the question "What is the sum of A?" is 12.'
    """
    return f'The answer to the question "{question}" is {answer}.'


def sentence_value(text: str) -> str | None:
    """The value of a verbose reply, or None when the reply does not follow the sentence form.

    >>> sentence_value('The answer to the question "What is the sum of A?" is 12.')
    '12'
    """
    match = _SENTENCE.match(text.strip())
    return match.group(1) if match else None


def _first_question(sample: ConversationSample, style: str) -> ConversationSample:
    question = sample.messages[0]["content"].replace("<image>", "").strip().split("\n")[0]
    answer = sample.messages[1]["content"]
    if style == "terse":
        messages = sample.messages[:2]
    else:
        messages = [
            {"role": "user", "content": f"<image>\n{question}\n{VERBOSE_SUFFIX}"},
            {"role": "assistant", "content": verbose_answer(question, answer)},
        ]
    return replace(sample, id=f"{sample.id}-{style}", messages=messages, domain=style, task=f"mole_{style}")


def build_domains(work: str) -> None:
    """Write each domain's train and held-out files. Even-numbered training charts go to terse,
    odd ones to verbose, so the two QA domains never share a chart."""
    for split in ("train", "heldout"):
        qa = read_split(common.data_file(work, split, "chart_qa"))
        tables = read_split(common.data_file(work, split, "chart_to_table"))
        if split == "train":
            terse, verbose = qa[0::2], qa[1::2]
        else:
            terse = verbose = qa  # held out: both styles asked about the same charts
        samples = {
            "terse": [_first_question(s, "terse") for s in terse],
            "verbose": [_first_question(s, "verbose") for s in verbose],
            "table": [replace(s, domain="table") for s in tables],
        }
        for domain, chosen in samples.items():
            common.write_llava(chosen, domain_file(work, split, domain))


def verbose_scores(predictions: list[str], samples: list[ConversationSample]) -> dict[str, float]:
    """Value accuracy (relaxed, of the sentence's value) and the share of replies in sentence form."""
    n = max(len(samples), 1)
    values = [sentence_value(p) for p in predictions]
    wanted = [sentence_value(s.messages[1]["content"]) for s in samples]
    correct = sum(v is not None and relaxed_accuracy(v, w or "") for v, w in zip(values, wanted, strict=True))
    return {"verbose_value_accuracy": correct / n, "verbose_format": sum(v is not None for v in values) / n}
