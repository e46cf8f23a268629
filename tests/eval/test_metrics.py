import pytest

from vlmoe.eval.metrics import (
    exact_match,
    multiple_choice_accuracy,
    parse_number,
    parse_option_letter,
    pope_answer,
    pope_metrics,
    relaxed_accuracy,
    textvqa_accuracy,
    vqa_accuracy,
)
from vlmoe.eval.vqa_normalize import normalize_textvqa_answer, normalize_vqa_answer


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("1000", "1000", 1.0),
        ("1,000", "1000", 1.0),  # thousands separator
        ("1049", "1000", 1.0),  # 4.9% off
        ("1051", "1000", 0.0),  # 5.1% off
        ("950", "1000", 1.0),  # exactly 5% off counts
        ("45%", "45", 1.0),  # percent sign on one side
        ("45", "45%", 1.0),
        ("0.45", "45%", 1.0),  # ...read as a fraction too, as Pix2Struct's scorer does
        ("45 percent", "45", 1.0),
        ("$12.5 million", "12.5", 1.0),  # currency and a unit word
        ("12 kg", "12", 1.0),
        ("12 kg", "12 kg", 1.0),
        ("5 million", "5 billion", 0.0),  # two different unit words: not the same quantity
        ("12 kg", "12 lb", 0.0),
        ("12.", "12", 1.0),  # trailing period
        ("-5", "5", 0.0),  # the sign matters (ChartMoE's scorer drops it)
        ("", "0", 0.0),  # empty is wrong (ChartMoE's scorer says right)
        ("0", "0", 1.0),
        ("0.01", "0", 0.0),  # target 0: exact numbers only
        ("Yes.", "yes", 1.0),
        ("  United   States ", "united states", 1.0),
        ("2019 and 2020", "2019", 0.0),  # not a single number: exact match
        ("1,2", "12", 0.0),  # a list, not a thousands separator
        ("Canada", "USA", 0.0),
    ],
)
def test_relaxed_accuracy(prediction, target, expected):
    assert relaxed_accuracy(prediction, target) == expected


def test_parse_number():
    assert parse_number("1,234,567") == (1234567.0, False)
    assert parse_number("-.5%") == (-0.5, True)
    assert parse_number("€3") == (3.0, False)
    assert parse_number("12 kg 5") is None
    assert parse_number("abc") is None
    # The sign may come before the currency ("-$5" is how charts of losses write it), once.
    assert parse_number("-$1,000.5") == parse_number("$-1,000.5") == (-1000.5, False)
    assert parse_number("-$-5") is None
    assert relaxed_accuracy("-$5", "-5") == 1.0 and relaxed_accuracy("-$5", "5") == 0.0


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Yes.", "yes"),
        ("The dog", "dog"),
        ("an apple", "apple"),
        ("two", "2"),
        ("None", "0"),
        ("dont", "don't"),
        ("1,000", "1000"),  # digit comma digit: every punctuation mark is dropped, not spaced
        ("red-white", "red white"),
        ("red - white", "red white"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("hello!", "hello"),
        ("  Tab\tand\nnewline ", "tab and newline"),
    ],
)
def test_vqa_normalisation(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_accuracy_leave_one_out():
    # 10 humans: 2 say "cat". Each of the 8 subsets without a "cat" voter has 2 matches -> 2/3;
    # the 2 subsets without one "cat" voter have 1 match -> 1/3. Mean = (8*2/3 + 2*1/3) / 10 = 0.6.
    answers = ["cat", "cat"] + ["dog"] * 8
    assert vqa_accuracy("cat", answers) == pytest.approx(0.6)
    assert vqa_accuracy("Dog.", answers) == 1.0
    assert vqa_accuracy("bird", answers) == 0.0
    # 3 matches: 7 subsets keep all 3 (1.0), 3 subsets keep 2 (2/3) -> 0.9.
    assert vqa_accuracy("The Cat", ["cat"] * 3 + ["x"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("one", ["1"] * 10) == 1.0
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0


def test_vqa_accuracy_treats_human_answers_as_the_official_script_does():
    # Humans in agreement are compared as stored (VQAv2 stores them normalised already) ...
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0
    # ... humans in disagreement lose their punctuation first, but keep case and articles.
    assert vqa_accuracy("red white", ["red-white"] * 5 + ["red"] * 5) == 1.0
    assert vqa_accuracy("dog", ["a dog"] * 5 + ["cat"] * 5) == 0.0


def test_textvqa_accuracy_normalises_both_sides():
    assert textvqa_accuracy("yes", ["Yes"] * 10) == 1.0
    assert textvqa_accuracy("Coca Cola's", ["coca-cola's"] * 3 + ["coke"] * 7) == pytest.approx(0.9)
    assert textvqa_accuracy("1000", ["1,000"] * 10) == 1.0
    assert normalize_textvqa_answer("What?") == "what"
    with pytest.raises(ValueError, match="at least one"):
        textvqa_accuracy("x", [])


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


def test_pope_parsing_follows_its_evaluator():
    assert pope_answer("Yes, there is a dog in the image.") == "yes"
    assert pope_answer("No") == "no"
    assert pope_answer("There is not a dog.") == "no"
    # Only the first sentence counts, and only whole words: "Nothing" is not "no".
    assert pope_answer("Yes. No dog is small.") == "yes"
    assert pope_answer("Nothing suggests otherwise") == "yes"
    assert pope_answer("no.") == "no"


def test_pope_metrics_hand_counted():
    predictions = ["yes", "yes", "yes", "no", "no", "No, not at all.", "Yes.", "no"]
    labels = ["yes", "yes", "no", "yes", "no", "no", "yes", "no"]
    # TP=3 (0,1,6), FP=1 (2), FN=1 (3), TN=3 (4,5,7)
    metrics = pope_metrics(predictions, labels)
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["precision"] == pytest.approx(3 / 4)
    assert metrics["recall"] == pytest.approx(3 / 4)
    assert metrics["f1"] == pytest.approx(3 / 4)
    assert metrics["yes_ratio"] == pytest.approx(4 / 8)


def test_pope_metrics_degenerate_and_bad_input():
    metrics = pope_metrics(["no", "no"], ["yes", "no"])
    assert metrics["precision"] == 0.0 and metrics["f1"] == 0.0 and metrics["accuracy"] == 0.5
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        pope_metrics(["no", "no"], ["yes"])


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("A", "A"),
        ("B. the magnet", "B"),
        ("(C)", "C"),
        ("C) three", "C"),
        ("The answer is B.", "B"),
        ("the answer is: (A)", "A"),
        ("E", None),  # beyond the 4 choices
        ("I think so", None),
        ("A lot of them", None),  # a word, not an option
        ("", None),
    ],
)
def test_parse_option_letter(text, letter):
    assert parse_option_letter(text, num_choices=4) == letter


def test_multiple_choice_accuracy():
    assert multiple_choice_accuracy("B", 1, 3) == 1.0
    assert multiple_choice_accuracy("B", "b", 3) == 1.0
    assert multiple_choice_accuracy("A", 1, 3) == 0.0


def test_exact_match():
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("42", ["41", " 42 "]) == 1.0
    assert exact_match("1,000", "1000") == 0.0  # exact means exact: use relaxed_accuracy for numbers
