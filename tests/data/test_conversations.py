"""Reading LLaVA conversations: every source kind, and every kind of bad sample reported."""

from __future__ import annotations

import contextlib
import io
import json

import datasets
import pytest
from PIL import Image
from rich.console import Console

from vlmoe.console import sharing
from vlmoe.data import conversations
from vlmoe.data.conversations import BAD_SAMPLE_KINDS, BadSampleError, read_conversations


def _turns(*texts: str) -> list[dict[str, str]]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


@pytest.fixture
def image_dir(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "blue.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path


GOOD = [
    {"id": "text", "conversations": _turns("What is 2+2?", "4")},
    {"id": "multi", "image": "red.png", "conversations": _turns("<image>\nColour?", "Red.", "Sure?", "Yes.")},
    {
        "id": "two",
        "images": ["red.png", "blue.png"],
        "conversations": _turns("<image> vs <image>: same?", "No."),
    },
]


def test_jsonl_json_and_datasets_give_the_same_samples(image_dir):
    (image_dir / "a.jsonl").write_text("\n".join(json.dumps(s) for s in GOOD) + "\n")
    (image_dir / "a.json").write_text(json.dumps(GOOD, indent=2))
    from_jsonl, report = read_conversations(image_dir / "a.jsonl")
    from_json, _ = read_conversations(image_dir / "a.json")
    rows = [{"id": s["id"], "images": s.get("images", [s["image"]] if "image" in s else []),
             "conversations": s["conversations"]} for s in GOOD]  # fmt: skip
    dataset = datasets.Dataset.from_list(rows)
    from_dataset, _ = read_conversations(dataset, image_root=image_dir)
    dataset.save_to_disk(str(image_dir / "saved"))
    from_disk, _ = read_conversations(image_dir / "saved", image_root=image_dir)
    assert report.total == report.loaded == 3 and report.bad == []
    for samples in (from_jsonl, from_json, from_dataset, from_disk):
        assert [s.id for s in samples] == ["text", "multi", "two"]
        assert [len(s.images) for s in samples] == [0, 1, 2]
        assert [len(s.messages) for s in samples] == [2, 4, 2]
        assert samples[1].images[0] == image_dir / "red.png"
        assert samples[1].messages[2] == {"role": "user", "content": "Sure?"}
        assert samples[2].instruction == "vs : same?"
    assert [s.line for s in from_jsonl] == [1, 2, 3]
    object_starts = [
        i + 1 for i, line in enumerate((image_dir / "a.json").read_text().splitlines()) if line == "  {"
    ]
    assert [s.line for s in from_json] == object_starts == [2, 15, 37]


BAD = {
    "no_conversations": {"id": "b1", "conversations": []},
    "bad_role": {
        "id": "b2",
        "conversations": [{"from": "user", "value": "hi"}, {"from": "gpt", "value": "yo"}],
    },
    "bad_alternation": {"id": "b3", "conversations": _turns("a", "b", "c")},
    "empty_turn": {"id": "b4", "image": "red.png", "conversations": _turns("<image>", "ok")},
    "image_count_mismatch": {"id": "b5", "image": "red.png", "conversations": _turns("No placeholder", "ok")},
    "image_in_reply": {
        "id": "b10",
        "image": "red.png",
        "conversations": _turns("Describe.", "<image>\nBlack."),
    },
    "missing_image": {"id": "b6", "image": "gone.png", "conversations": _turns("<image>\nq", "a")},
    "corrupt_image": {"id": "b7", "image": "broken.png", "conversations": _turns("<image>\nq", "a")},
    "bad_image_field": {"id": "b8", "image": 5, "conversations": _turns("<image>\nq", "a")},
    "bad_cluster_id": {"id": "b9", "cluster_id": "seven", "conversations": _turns("q", "a")},
}


def test_every_bad_kind_is_skipped_counted_and_reported_with_file_and_line(image_dir):
    lines = [json.dumps(GOOD[0]), "{not json", *(json.dumps(s) for s in BAD.values()), json.dumps(GOOD[1])]
    path = image_dir / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="2 of 13 samples loaded; 11 skipped"):
        samples, report = read_conversations(path, on_error="skip")
    assert [s.id for s in samples] == ["text", "multi"]
    assert report.total == 13 and report.loaded == 2
    assert report.counts() == {kind: 1 for kind in BAD_SAMPLE_KINDS}
    assert [(b.line, b.kind) for b in report.bad] == [(2, "invalid_json")] + [
        (3 + i, kind) for i, kind in enumerate(BAD)
    ]
    assert all(b.source == str(path) for b in report.bad)
    assert f"{path}:9: sample 'b6': missing_image" in report.summary()


@pytest.mark.parametrize("kind", list(BAD))
def test_fail_policy_raises_at_the_bad_sample_with_its_place_and_the_fix(image_dir, kind):
    path = image_dir / "one.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps(BAD[kind]) + "\n")
    with pytest.raises(BadSampleError, match=f"one.jsonl:2: sample '{BAD[kind]['id']}': {kind}") as error:
        read_conversations(path)
    assert 'on_error="skip"' in str(error.value)
    assert error.value.bad.kind == kind


def test_datasets_rows_report_row_numbers(image_dir):
    rows = [{"id": "ok", "images": [], "conversations": _turns("q", "a")},
            {"id": "bad", "images": ["gone.png"], "conversations": _turns("<image>q", "a")}]  # fmt: skip
    with pytest.warns(UserWarning):
        samples, report = read_conversations(
            datasets.Dataset.from_list(rows), image_root=image_dir, on_error="skip"
        )
    assert [s.id for s in samples] == ["ok"]
    assert [(b.source, b.line, b.kind) for b in report.bad] == [("<Dataset>", 2, "missing_image")]


def test_pil_images_from_a_datasets_image_column_are_kept():
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "images": datasets.Sequence(datasets.Image()),
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
        }
    )
    rows = [{"id": "p", "images": [Image.new("RGB", (4, 4))], "conversations": _turns("<image> q", "a")}]
    samples, _ = read_conversations(datasets.Dataset.from_list(rows, features=features))
    assert isinstance(samples[0].images[0], Image.Image)


def test_unreadable_sources_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        read_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "broken.json").write_text(json.dumps([GOOD[0]]).rstrip("]") + ",\n{oops}]")
    with pytest.raises(ValueError, match=r"broken\.json:2: invalid JSON"):
        read_conversations(tmp_path / "broken.json")
    with pytest.raises(ValueError, match='on_error must be "fail" or "skip"'):
        read_conversations(tmp_path / "broken.json", on_error="ignore")


def test_a_file_that_is_not_utf8_or_a_folder_that_is_no_dataset_names_itself_and_the_fix(tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD[0]).replace("2+2", "\u00e9").encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl: not UTF-8 text .*; save the file as UTF-8"):
        read_conversations(tmp_path / "latin1.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileNotFoundError, match=r"folder: a folder but not a datasets\.save_to_disk"):
        read_conversations(tmp_path / "folder")


def test_a_turn_value_that_is_not_a_string_is_named_with_its_type(image_dir):
    path = image_dir / "list.jsonl"
    turns = [{"from": "human", "value": ["Describe", "it"]}, {"from": "gpt", "value": "ok"}]
    path.write_text(json.dumps({"id": "l1", "conversations": turns}) + "\n")
    with pytest.raises(BadSampleError, match=r"list.jsonl:1: sample 'l1': empty_turn: turn 0 \(human\): "
                       r'"value" must be a string, got list'):  # fmt: skip
        read_conversations(path, check_images=False)


def test_a_truncated_jpeg_is_a_corrupt_image(tmp_path):
    # PIL's verify() checks nothing in a JPEG; a cut-off one would only fail in the collator, mid-training.
    Image.effect_noise((64, 64), 64).convert("RGB").save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    path = tmp_path / "photos.jsonl"
    samples = [{"id": name, "image": f"{name}.jpg", "conversations": _turns("<image>\nq", "a")}
               for name in ("whole", "cut")]  # fmt: skip
    path.write_text("\n".join(json.dumps(sample) for sample in samples) + "\n")
    expected = r"photos\.jsonl:2: sample 'cut': corrupt_image: image .*cut\.jpg cannot be decoded"
    with pytest.raises(BadSampleError, match=expected + r" \(OSError: image file is truncated"):
        read_conversations(path)


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ('[{"id": "a"},\n', 2, r"the list is not closed with '\]' \(is the file cut off\?\)"),
        ('[{"id": "a"}\n{"id": "b"}]', 2, r"expected ',' or '\]' after a sample"),
        ('[{"id": "a"}]\n{"id": "b"}', 1, r"text after the list's closing '\]'"),
    ],
)
def test_a_cut_off_json_list_or_one_missing_a_comma_is_invalid_json(tmp_path, text, line, problem):
    path = tmp_path / "cut.json"
    path.write_text(text.replace('{"id": "a"}', json.dumps(GOOD[0])))
    with pytest.raises(ValueError, match=rf"cut\.json:{line}: invalid JSON \({problem}\); fix the file"):
        read_conversations(path, on_error="skip")


def test_a_utf8_file_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    (tmp_path / "bom.json").write_text(json.dumps([GOOD[0]]), encoding="utf-8-sig")
    (tmp_path / "bom.jsonl").write_text(json.dumps(GOOD[0]) + "\n", encoding="utf-8-sig")
    for name in ("bom.json", "bom.jsonl"):
        samples, report = read_conversations(tmp_path / name)
        assert [s.id for s in samples] == ["text"] and report.loaded == 1


def _console(terminal: bool) -> Console:
    """A console kept in a string, a terminal or not."""
    return Console(file=io.StringIO(), force_terminal=terminal, width=120, color_system=None)


def test_the_image_checks_show_a_bar_over_every_image_on_a_terminal_only(image_dir, monkeypatch):
    path = image_dir / "a.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in GOOD) + "\n")
    totals, advances = [], []
    real = conversations._image_check_progress

    @contextlib.contextmanager
    def counted(total):
        totals.append(total)
        with real(total) as advance:
            yield lambda k: (advances.append(k), advance(k))

    monkeypatch.setattr(conversations, "_image_check_progress", counted)
    with sharing(_console(terminal=True)) as console:
        samples, _ = read_conversations(path)
    assert [s.id for s in samples] == ["text", "multi", "two"]
    assert samples[2].images == [image_dir / "red.png", image_dir / "blue.png"]
    # 0 + 1 + 2 images, advanced per sample; the (transient) bar drew its full count.
    assert totals == [3] and advances == [0, 1, 2]
    drawn = console.file.getvalue()
    assert "vlmoe: checking images" in drawn and "3/3" in drawn
    with sharing(_console(terminal=False)) as console:  # a log file or a test's captured stderr
        samples, _ = read_conversations(path)
    assert len(samples) == 3 and console.file.getvalue() == ""
    read_conversations(path, check_images=False)
    assert totals == [3, 3]  # no image check, no bar


def test_a_malformed_sample_fails_before_the_images_of_earlier_samples_are_decoded(image_dir):
    # The text of every sample is checked first: on LLaVA-665k a bad turn at the end of the file
    # fails in seconds, not after ~18 minutes of image decodes. Skipped samples keep file order.
    lines = [json.dumps(BAD["corrupt_image"]), json.dumps(GOOD[1]), json.dumps(BAD["bad_role"])]
    path = image_dir / "late.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadSampleError, match="late.jsonl:3: sample 'b2': bad_role"):
        read_conversations(path)
    with pytest.warns(UserWarning, match="1 of 3 samples loaded"):
        samples, report = read_conversations(path, on_error="skip")
    assert [s.id for s in samples] == ["multi"]
    assert [(b.line, b.kind) for b in report.bad] == [(1, "corrupt_image"), (3, "bad_role")]


def test_a_jsonl_line_is_one_sample_whatever_unicode_line_breaks_its_strings_hold(tmp_path):
    # U+2028 and U+0085 (scraped text) are legal unescaped in JSON strings, and
    # json.dumps(..., ensure_ascii=False) writes them as they are; only "\n" ends a JSONL line.
    text = "Para one\u2028para two\x85three"
    rows = [{"id": "a", "conversations": _turns(text, "ok")}, {"id": "b", "conversations": _turns("q", "a")}]
    path = tmp_path / "unicode.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n", encoding="utf-8")
    samples, report = read_conversations(path)
    assert [(s.id, s.line) for s in samples] == [("a", 1), ("b", 2)] and report.bad == []
    assert samples[0].messages[0]["content"] == text


@pytest.mark.parametrize(
    ("sample", "kind", "message"),
    [
        (
            {"id": "m", "messages": _turns("q", "a")},
            "no_conversations",
            """no "conversations" key (the sample has 'id', 'messages'); put its turns there""",
        ),
        (
            {
                "id": "o",
                "conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            },
            "bad_role",
            """turn 0 has no "from" key (it has 'role', 'content'); LLaVA turns are {"from": """,
        ),
        (
            {"id": "t", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "text": "a"}]},
            "empty_turn",
            """turn 1 (gpt) has no "value" key (it has 'from', 'text'); put its text there""",
        ),
    ],
)
def test_a_sample_in_another_format_names_the_keys_it_has_and_the_ones_it_needs(
    tmp_path, sample, kind, message
):
    # These were "turn 1 (gpt) has no text" and '"from" is None': true of the LLaVA keys, but no
    # hint that the text is there under another key.
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps(sample) + "\n")
    with pytest.raises(BadSampleError) as error:
        read_conversations(path)
    assert error.value.bad.kind == kind and error.value.bad.line == 2
    assert str(error.value).startswith(f"{path}:2: sample {sample['id']!r}: {kind}: {message}")
