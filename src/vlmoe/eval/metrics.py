"""Per-sample scores exactly as the benchmarks define them: ChartQA, VQAv2/TextVQA, POPE, ScienceQA.

Every function takes one model answer (a string) and the reference(s), and returns a float in
[0, 1] (or, for POPE, the benchmark's dict over a whole list). Averages are the caller's job.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from vlmoe.eval.vqa_normalize import normalize_textvqa_answer, normalize_vqa_answer, process_punctuation

# A number as a chart answer writes it: optional currency, sign, thousands separators, decimals,
# then optional percent sign or one unit word ("12 kg", "$1,000", "45%", "3.5 million"); the sign
# may also come before the currency ("-$5").
_NUMBER = re.compile(
    r"""^(?P<sign>[-+](?=[$€£¥]))?[$€£¥]?\s*
    (?P<number>[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)
    \s*(?P<percent>%|percent\b)?
    \s*(?P<unit>[^\W\d_]+)?$""",
    re.VERBOSE,
)


def _normalize_text(text: str) -> str:
    """Case, surrounding white space and quotes, inner runs of spaces, one trailing period."""
    text = " ".join(str(text).strip().strip("\"'").split()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def parse_number(text: str) -> tuple[float, bool] | None:
    """(value, had_percent_sign) of a numeric answer, or None when it is not a single number.

    Example:
        >>> parse_number("$1,234.5 million."), parse_number("-$5"), parse_number("2019 and 2020")
        ((1234.5, False), (-5.0, False), None)
    """
    match = _NUMBER.match(_normalize_text(text))
    if match is None or (match["sign"] and match["number"][0] in "-+"):
        return None  # "-$-5" is no number
    value = float(match["number"].replace(",", ""))
    return (-value if match["sign"] == "-" else value), match["percent"] is not None


def _unit_word(text: str) -> str | None:
    """The unit word after a number ("kg" of "12 kg"), None when there is none."""
    match = _NUMBER.match(_normalize_text(text))
    return match["unit"] if match else None


def relaxed_accuracy(prediction: str, target: str, max_relative_error: float = 0.05) -> float:
    """ChartQA's relaxed accuracy: numbers within 5% relative error, exact match otherwise.

    This is the standard definition (ChartQA paper, Pix2Struct/MatCha scorer), not ChartMoE's
    lenient scorer, which counts an empty answer as correct and drops minus signs. vlmoe's
    normalisation before comparing: case, white space, one trailing period, thousands separators,
    a currency sign and one trailing unit word are ignored (but two different unit words, as in
    "5 million" and "5 billion", do not match). A percent sign on one side only is read both ways
    ("45%" matches "45" and "0.45"), because ChartQA labels write percentages both ways. A target
    of 0 needs an exact numeric match (relative error is undefined there).

    Example:
        >>> relaxed_accuracy("1,020", "1000"), relaxed_accuracy("45%", "45"), relaxed_accuracy("Yes.", "yes")
        (1.0, 1.0, 1.0)
        >>> relaxed_accuracy("-5", "5"), relaxed_accuracy("", "0")
        (0.0, 0.0)
    """
    predicted, expected = parse_number(prediction), parse_number(target)
    if predicted is None or expected is None:
        return float(_normalize_text(prediction) == _normalize_text(target))
    units = (_unit_word(prediction), _unit_word(target))
    if None not in units and units[0] != units[1]:
        return 0.0  # "5 million" and "5 billion", "12 kg" and "12 lb" are not the same quantity
    (value, value_percent), (reference, reference_percent) = predicted, expected
    candidates = [value]
    if value_percent != reference_percent:
        candidates.append(value / 100 if value_percent else value * 100)
    for candidate in candidates:
        if reference == 0:
            if candidate == 0:
                return 1.0
        elif abs(candidate - reference) / abs(reference) <= max_relative_error:
            return 1.0
    return 0.0


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy as the official `vqaEval.py`: leave-one-out mean of min(#matches / 3, 1).

    The prediction gets the full official normalisation (`normalize_vqa_answer`). The human
    answers are compared as stored, except that when they disagree the official script strips
    their punctuation (`process_punctuation`) first; VQAv2's stored answers are already lower-case
    and normalised, which is why that is enough there. With other than 10 answers the same
    leave-one-out mean is taken over those given.

    Example:
        >>> vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7)   # 7 subsets see 3 matches, 3 see 2
        0.9
        >>> vqa_accuracy("1,000", ["1000"] * 10)
        1.0
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer, got an empty list")
    humans = [answer.replace("\n", " ").replace("\t", " ").strip() for answer in answers]
    if len(set(humans)) > 1:
        humans = [process_punctuation(answer) for answer in humans]
    return _leave_one_out_accuracy(normalize_vqa_answer(prediction), humans)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy as its evaluator (M4C, used by LLaVA): both sides through EvalAI's processor.

    Example:
        >>> textvqa_accuracy("Nokia.", ["nokia"] * 9 + ["nokia phone"])
        1.0
    """
    if not answers:
        raise ValueError("textvqa_accuracy needs at least one human answer, got an empty list")
    humans = [normalize_textvqa_answer(answer) for answer in answers]
    return _leave_one_out_accuracy(normalize_textvqa_answer(prediction), humans)


def _leave_one_out_accuracy(predicted: str, humans: Sequence[str]) -> float:
    matches = [human == predicted for human in humans]
    total = sum(matches)
    # Leaving answer i out removes its own match, if it was one.
    per_subset = [min((total - int(matched)) / 3.0, 1.0) for matched in matches]
    return round(sum(per_subset) / len(per_subset), 10)


def pope_answer(text: str) -> str:
    """POPE's yes/no parsing: first sentence, commas dropped, 'no' if it contains No/no/not, else 'yes'.

    Example:
        >>> pope_answer("No, there is no dog."), pope_answer("Yes."), pope_answer("I do not see one")
        ('no', 'yes', 'no')
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE's accuracy, precision, recall, F1 (positive class 'yes') and yes-ratio, as its evaluator.

    Predictions are parsed with `pope_answer`; labels are 'yes'/'no' (anything else but 'no'
    counts as 'yes', as in POPE). Precision/recall/F1 are 0 where their denominator is 0.

    Example:
        >>> m = pope_metrics(["Yes", "no", "yes.", "No"], ["yes", "no", "no", "yes"])
        >>> m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]
        (0.5, 0.5, 0.5, 0.5)
    """
    if len(predictions) != len(labels):
        raise ValueError(f"pope_metrics: {len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("pope_metrics needs at least one prediction")
    predicted = [pope_answer(text) == "yes" for text in predictions]
    actual = [label.strip().lower() != "no" for label in labels]
    tp = sum(p and a for p, a in zip(predicted, actual, strict=True))
    fp = sum(p and not a for p, a in zip(predicted, actual, strict=True))
    tn = sum(not p and not a for p, a in zip(predicted, actual, strict=True))
    fn = sum(not p and a for p, a in zip(predicted, actual, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(predicted) / len(predicted),
    }


OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ANSWER_IS = re.compile(r"[Tt]he answer is:?\s*\(?([A-Z])\)?(?![A-Za-z])")
_LEADING_OPTION = re.compile(r"^\(?([A-Z])(?:[.):]|$)")


def parse_option_letter(text: str, num_choices: int) -> str | None:
    """The option letter a multiple-choice answer picks, ScienceQA style; None when unparseable.

    Follows LLaVA's ScienceQA scorer ("A", "A. ...", "The answer is A.") and also accepts "(A)",
    "A)" and "A: ...". Letters beyond the question's choices do not count.

    Example:
        >>> parse_option_letter("B. a magnet", 3), parse_option_letter("The answer is (C).", 3)
        ('B', 'C')
        >>> parse_option_letter("D", 3) is None
        True
    """
    text = text.strip()
    valid = OPTION_LETTERS[:num_choices]
    found = _ANSWER_IS.findall(text)
    if len(found) == 1:
        letter = found[0]
    else:
        match = _LEADING_OPTION.match(text)
        letter = match[1] if match else None
    return letter if letter is not None and letter in valid else None


def multiple_choice_accuracy(prediction: str, answer: str | int, num_choices: int) -> float:
    """1.0 when the parsed option letter is the answer (a letter, or a 0-based choice index).

    Example:
        >>> multiple_choice_accuracy("B", 1, 4), multiple_choice_accuracy("The answer is A.", "B", 4)
        (1.0, 0.0)
    """
    expected = OPTION_LETTERS[answer] if isinstance(answer, int) else answer.strip().upper()
    return float(parse_option_letter(prediction, num_choices) == expected)


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the prediction equals any reference after case, white space and trailing-period normalisation.

    Example:
        >>> exact_match("Yes.", "yes"), exact_match("a cat", ["the cat", "cat"])
        (1.0, 0.0)
    """
    references = [answers] if isinstance(answers, str) else list(answers)
    predicted = _normalize_text(prediction)
    return float(any(_normalize_text(reference) == predicted for reference in references))
