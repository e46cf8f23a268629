"""Each reader on a tiny local copy of its benchmark's published layout, plus the failures users hit."""

import json

import pytest
from benchmark_copies import chartqa, image, llava, pope, scienceqa, textvqa, vqav2, write_json

from vlmoe.eval.readers import read_chartqa, read_llava, read_pope, read_scienceqa, read_textvqa, read_vqav2


def test_chartqa(tmp_path):
    samples = read_chartqa(chartqa(tmp_path))
    assert [s.id for s in samples] == ["human-0", "augmented-0", "augmented-1"]
    assert [s.subset for s in samples] == ["human", "augmented", "augmented"]
    assert samples[1].question == "Min value?" and samples[1].answers == ("1.5",)
    assert samples[1].images == (tmp_path / "test/png/b.png",) and samples[0].task == "chartqa"
    # The split folder itself works too.
    assert len(read_chartqa(tmp_path / "test")) == 3


def test_chartqa_failures_name_file_field_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no test_human\.json or test_augmented\.json") as missing:
        read_chartqa(tmp_path)
    # The expected format names this split's files, with no "{split}" placeholder left in it.
    assert "test/test_human.json and/or test_augmented.json" in str(missing.value)
    assert "{split}" not in str(missing.value)
    with pytest.raises(FileNotFoundError, match=r"val/val_human\.json and/or val_augmented\.json"):
        read_chartqa(tmp_path, split="val")
    write_json(tmp_path / "test/test_human.json", [{"imgname": "a.png", "label": "4"}])
    with pytest.raises(
        ValueError, match=r"test_human.json record 0: missing field 'query'.*fields present: imgname"
    ) as field:
        read_chartqa(tmp_path)
    assert "{split}" not in str(field.value) and "images in test/png/" in str(field.value)
    write_json(tmp_path / "test/test_human.json", [{"imgname": "a.png", "query": "q", "label": "4"}])
    with pytest.raises(FileNotFoundError, match=r"png/a.png does not exist.*--image-dir"):
        read_chartqa(tmp_path)
    (tmp_path / "test/test_human.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_chartqa(tmp_path)


def test_pope_folder_of_categories(tmp_path):
    pope(tmp_path)
    samples = read_pope(tmp_path)
    assert [(s.id, s.subset, s.answers) for s in samples] == [
        ("adversarial-1", "adversarial", ("yes",)),
        ("random-1", "random", ("no",)),
    ]
    assert samples[0].question == "Is there a dog?"


def test_pope_image_dir_and_bad_label(tmp_path):
    image(tmp_path / "coco/x.jpg")
    file = tmp_path / "coco_pope_popular.json"
    file.write_text(json.dumps({"question_id": 7, "image": "x.jpg", "text": "q", "label": "maybe"}))
    with pytest.raises(ValueError, match="label must be 'yes' or 'no'"):
        read_pope(file, image_dir=tmp_path / "coco")
    file.write_text(json.dumps({"question_id": 7, "image": "x.jpg", "text": "q", "label": "no"}))
    with pytest.raises(FileNotFoundError, match=r"x\.jpg does not exist"):
        read_pope(file)
    assert read_pope(file, image_dir=tmp_path / "coco")[0].images == (tmp_path / "coco/x.jpg",)


def test_pope_and_llava_jsonl_errors_name_the_line_of_the_record(tmp_path):
    pope(tmp_path)  # each file: one record on line 1, then a blank line
    file = tmp_path / "coco_pope_random.json"
    unlabelled = {"question_id": 2, "image": "x.jpg", "answer": "no"}
    file.write_text(file.read_text() + json.dumps(unlabelled) + "\n")
    with pytest.raises(ValueError, match=r"coco_pope_random\.json line 3: missing field 'label'"):
        read_pope(file)
    jsonl = tmp_path / "eval.jsonl"
    unanswered = {"id": "x", "conversations": [{"from": "human", "value": "q"}]}
    jsonl.write_text("\n\n" + json.dumps(unanswered) + "\n")
    with pytest.raises(ValueError, match=r"eval\.jsonl line 3: needs a 'human' turn followed by a 'gpt'"):
        read_llava(jsonl)


@pytest.mark.parametrize("name", [None, True, ["a.png"]])
def test_chartqa_and_pope_image_names_that_are_no_string_name_the_record_and_field(tmp_path, name):
    chartqa(tmp_path)
    write_json(tmp_path / "test/test_human.json", [{"imgname": name, "query": "q", "label": "4"}])
    with pytest.raises(ValueError) as error:  # was: TypeError from PosixPath / None
        read_chartqa(tmp_path)
    where = f"ChartQA {tmp_path / 'test/test_human.json'} record 0"
    assert str(error.value).startswith(f"{where}: 'imgname' is {json.dumps(name)}; it must be a string")
    pope(tmp_path)
    line = {"question_id": 1, "image": name, "text": "q", "label": "yes"}
    (tmp_path / "coco_pope_random.json").write_text(json.dumps(line) + "\n")
    with pytest.raises(
        ValueError, match=r"coco_pope_random\.json line 1: 'image' is .*; it must be a string"
    ):
        read_pope(tmp_path)


def test_null_or_object_questions_labels_and_answers_are_refused_not_read_as_none(tmp_path):
    # As text they were "None" / "{...}": a model answering "None" scored right on a null label.
    chartqa(tmp_path)
    write_json(tmp_path / "test/test_human.json", [{"imgname": "a.png", "query": "q", "label": None}])
    with pytest.raises(ValueError, match=r"test_human\.json record 0: 'label' is null; it must be a string"):
        read_chartqa(tmp_path)
    write_json(tmp_path / "test/test_human.json", [{"imgname": "a.png", "query": "q", "label": 45}])
    assert read_chartqa(tmp_path)[0].answers == ("45",)  # a number is its text
    data = json.loads((textvqa(tmp_path) / "TextVQA_0.5.1_val.json").read_text())
    data["data"][0]["answers"][3] = {"answer": "nokia"}
    write_json(tmp_path / "TextVQA_0.5.1_val.json", data)
    with pytest.raises(ValueError, match=r"data\[0\]: answers\[3\] is \{\"answer\": \"nokia\"\}; it must be"):
        read_textvqa(tmp_path)
    record = {"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]}
    file = write_json(tmp_path / "eval.json", [record])
    with pytest.raises(ValueError, match=r"eval\.json record 0: 'value' is null; it must be a string"):
        read_llava(file)


def test_lists_of_the_wrong_json_type_name_the_file_and_field(tmp_path):
    write_json(tmp_path / "TextVQA_0.5.1_val.json", {"data": 5})
    with pytest.raises(ValueError, match=r"TextVQA .*val\.json: 'data' is 5; it must be a list"):
        read_textvqa(tmp_path)  # was: TypeError: 'int' object is not iterable
    vqav2(tmp_path)
    write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": {"image_id": 42}})
    with pytest.raises(
        ValueError, match=r"questions\.json: 'questions' is \{\"image_id\": 42\}; it must be a list"
    ):
        read_vqav2(tmp_path)
    record = {"id": "x", "conversations": 5}
    with pytest.raises(ValueError, match=r"eval\.json record 0: 'conversations' is 5; it must be a list"):
        read_llava(write_json(tmp_path / "eval.json", [record]))
    scienceqa(tmp_path)
    problems = json.loads((tmp_path / "problems.json").read_text())
    problems["1"]["choices"] = "iron"  # was: read as the choices i, r, o, n
    write_json(tmp_path / "problems.json", problems)
    with pytest.raises(ValueError, match=r"problem '1': 'choices' is \"iron\"; it must be a list"):
        read_scienceqa(tmp_path)
    problems["1"] = ["iron"]  # was: AttributeError: 'list' object has no attribute 'get'
    write_json(tmp_path / "problems.json", problems)
    with pytest.raises(ValueError, match=r"problem '1' is \[\"iron\"\]; it must be an object"):
        read_scienceqa(tmp_path)
    write_json(tmp_path / "pid_splits.json", {"test": 1})
    with pytest.raises(ValueError, match=r"pid_splits\.json: 'test' is 1; it must be a list"):
        read_scienceqa(tmp_path)


@pytest.mark.parametrize("image_id", ["COCO_val2014_000000000042.jpg", None, -42])
def test_vqav2_image_id_that_is_no_coco_number_names_the_question(tmp_path, image_id):
    vqav2(tmp_path)
    questions = {"questions": [{"image_id": image_id, "question": "How many?", "question_id": 420}]}
    write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", questions)
    with pytest.raises(ValueError) as error:  # was: "invalid literal for int()" or a TypeError
        read_vqav2(tmp_path)
    assert str(error.value).startswith(
        f"VQAv2 {tmp_path / 'v2_OpenEnded_mscoco_val2014_questions.json'} questions[0]: 'image_id' is "
        f"{json.dumps(image_id)}; it must be the COCO image number (e.g. 42 for COCO_val2014_000000000042"
    )
    questions["questions"][0]["image_id"] = "42"  # a number written as a string is still read
    write_json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", questions)
    assert read_vqav2(tmp_path)[0].images == (tmp_path / "val2014/COCO_val2014_000000000042.jpg",)


def test_scienceqa_keeps_image_questions_of_the_split(tmp_path):
    scienceqa(tmp_path)
    problems = json.loads((tmp_path / "problems.json").read_text())
    (sample,) = read_scienceqa(tmp_path)
    assert sample.id == "1" and sample.answers == ("A",) and sample.choices == ("iron", "wood", "glass")
    assert sample.context == "Look closely." and sample.images == (tmp_path / "test/1/image.png",)
    with pytest.raises(ValueError, match="missing field 'val'"):
        read_scienceqa(tmp_path, split="val")
    problems["1"]["answer"] = 5
    write_json(tmp_path / "problems.json", problems)
    with pytest.raises(ValueError, match=r"answer must be a choice index in \[0, 3\)"):
        read_scienceqa(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"problems\.json does not exist"):
        read_scienceqa(tmp_path / "nowhere")


def test_textvqa(tmp_path):
    textvqa(tmp_path)
    (sample,) = read_textvqa(tmp_path)
    assert sample.id == "34602" and len(sample.answers) == 10 and sample.task == "textvqa"
    write_json(tmp_path / "TextVQA_0.5.1_val.json", {"questions": []})
    with pytest.raises(ValueError, match="missing field 'data'"):
        read_textvqa(tmp_path)


def test_vqav2_joins_questions_and_annotations(tmp_path):
    vqav2(tmp_path)
    (sample,) = read_vqav2(tmp_path)
    assert (sample.id, sample.subset, sample.answers) == ("420", "number", ("2",) * 10)
    with pytest.raises(FileNotFoundError, match=r"matching '\*test2015_questions\.json'.*found none"):
        read_vqav2(tmp_path, split="test2015")


@pytest.mark.parametrize("answers", ["nokia", [], 5])
def test_textvqa_and_vqav2_refuse_answers_that_are_no_list_of_human_answers(tmp_path, answers):
    # Before: a string was scored as its letters, [] failed only when scoring, 5 was a TypeError.
    file = textvqa(tmp_path / "t") / "TextVQA_0.5.1_val.json"
    data = json.loads(file.read_text())
    data["data"][0]["answers"] = answers
    write_json(file, data)
    with pytest.raises(ValueError) as error:
        read_textvqa(file)
    assert str(error.value).startswith(
        f"TextVQA {file} data[0]: 'answers' must be a non-empty list of the human answers, "
        f"got {str(answers)!r}"
    )
    file = vqav2(tmp_path / "v") / "v2_mscoco_val2014_annotations.json"
    data = json.loads(file.read_text())
    data["annotations"][0]["answers"] = answers
    write_json(file, data)
    with pytest.raises(ValueError, match=r"annotations\[0\]: 'answers' must be a non-empty list"):
        read_vqav2(file.parent)


def test_llava_json_and_jsonl(tmp_path):
    file = llava(tmp_path / "imgs")  # an image-and-question record, then a text-only one
    text_only = json.loads(file.read_text())[1]
    samples = read_llava(file, image_dir=tmp_path / "imgs")
    assert samples[0].question == "What is the total?" and samples[0].answers == ("128",)
    assert samples[0].images == (tmp_path / "imgs/c.png",) and samples[1].images == ()
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text(json.dumps(text_only) + "\n")
    assert read_llava(jsonl)[0].id == "t"
    write_json(file, [{"id": "x", "conversations": [{"from": "human", "value": "q"}]}])
    with pytest.raises(ValueError, match="record 0: needs a 'human' turn followed by a 'gpt' turn"):
        read_llava(file)


def test_llava_refuses_an_image_field_that_is_no_file_name_a_folder_and_non_utf8(tmp_path):
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    file = write_json(tmp_path / "eval.json", [{"id": "x", "image": 5, "conversations": turns}])
    with pytest.raises(ValueError, match=r"eval\.json record 0: 'image' must be an image file name"):
        read_llava(file)
    with pytest.raises(FileNotFoundError, match=r"LLaVA: .* is a folder; pass the data file in it"):
        read_llava(tmp_path)
    file.write_bytes('[{"id": "\u00e9"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"eval\.json: not UTF-8 text .*; save the file as UTF-8"):
        read_llava(file)


def test_vqav2_errors_show_the_format_of_the_split_asked_for(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        read_vqav2(tmp_path, split="val2014")
    assert "*_val2014_questions.json" in str(error.value) and "{split}" not in str(error.value)
