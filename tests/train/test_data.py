"""A stage's samples: a source that yields nothing names the fields that decided it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmoe.data import CHART_TYPES, sample_chart_record
from vlmoe.train.data import stage_samples
from vlmoe.train.recipe import ChartDataConfig, DataConfig, SourceConfig


def test_a_chart_source_with_no_training_chart_names_held_out_and_chart_types(tmp_path):
    first = sample_chart_record(0, 0).chart_type
    other = next(t for t in CHART_TYPES if t != first)  # chart 0, the only training chart, is left out
    charts = ChartDataConfig(n=2, held_out=1, questions_per_chart=0, chart_types=[other])
    with pytest.raises(ValueError) as error:
        stage_samples(DataConfig(sources=[SourceConfig(name="chart", charts=charts)]), tmp_path)
    message = str(error.value)
    assert message.startswith("data source 'chart': no training samples: charts 0..0 of its n=2 train")
    assert f"(held_out=1), and none of them of chart types ['{other}']" in message
    assert "raise n, lower held_out or widen chart_types" in message


def _chat_file(tmp_path, *extra):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.png")
    turns = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    rows = [{"id": "a", "image": "red.png", "task": "colour", "conversations": turns}, *extra]
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    return str(tmp_path / "chat.json")


def test_a_file_source_whose_tasks_match_nothing_lists_the_tasks_it_has(tmp_path):
    _chat_file(tmp_path)
    source = SourceConfig(name="chat", path=str(tmp_path / "chat.json"), tasks=["vqa"])
    with pytest.raises(ValueError) as error:
        stage_samples(DataConfig(sources=[source]), tmp_path)
    assert str(error.value) == (
        f"data source 'chat': no sample of {tmp_path / 'chat.json'} has a task in tasks ['vqa']; "
        "its samples' tasks are ['colour']: fix tasks, or leave it out to keep every sample"
    )


def test_a_bad_sample_names_the_recipe_fix_and_on_error_skip_leaves_it_out(tmp_path):
    path = _chat_file(tmp_path, {"id": "bad", "image": "missing.png", "conversations": []})
    with pytest.raises(ValueError) as error:
        stage_samples(DataConfig(sources=[SourceConfig(name="chat", path=path)]), tmp_path)
    assert str(error.value).startswith(f"{path}:")
    assert "sample 'bad'" in str(error.value) and 'on_error="skip"' not in str(error.value)
    assert str(error.value).endswith(
        "fix the sample, or set on_error: skip on data source 'chat' to leave bad samples out "
        "(they are reported)"
    )
    with pytest.warns(UserWarning, match="1 of 2 samples loaded; 1 skipped"):
        samples = stage_samples(
            DataConfig(sources=[SourceConfig(name="chat", path=path, on_error="skip")]), tmp_path
        )
    assert [s.id for s in samples] == ["a"]


def test_sources_without_weights_give_every_sample_once_and_weights_give_shares(tmp_path):
    charts = ChartDataConfig(n=6, questions_per_chart=0, tasks=["chart_to_table"])
    big = SourceConfig(name="charts", charts=charts)  # 6 samples
    small = SourceConfig(name="chat", path=_chat_file(tmp_path))  # 1 sample
    samples = stage_samples(DataConfig(sources=[big, small]), tmp_path)
    # Equal default weights would have drawn 3.5 of each: the chat sample repeated, charts dropped.
    chart_ids = [s.id for s in samples if s.domain == "charts"]
    assert len(chart_ids) == len(set(chart_ids)) == 6 and all(
        i.endswith("-chart_to_table") for i in chart_ids
    )
    assert [s.id for s in samples if s.domain == "chat"] == ["a"]
    weighted = [
        SourceConfig(name="charts", charts=charts, weight=1),
        SourceConfig(name="chat", path=small.path, weight=1),
    ]
    shares = [s.domain for s in stage_samples(DataConfig(sources=weighted, num_samples=8), tmp_path)]
    assert shares.count("charts") == shares.count("chat") == 4


def test_instructions_differing_only_in_case_are_one_cluster_when_clusters_outnumber_them(tmp_path):
    from vlmoe.data.clustering import load_clusters
    from vlmoe.data.conversations import ConversationSample
    from vlmoe.train.data import with_clusters
    from vlmoe.train.recipe import ClusterConfig

    # MiniLM is uncased: the first two embed alike, so 3 texts are 2 distinct instructions
    texts = ["Describe the chart.", "describe the chart.", "Translate this into French."]
    samples = [
        ConversationSample(
            str(i), [], [{"role": "user", "content": t}, {"role": "assistant", "content": "x"}]
        )
        for i, t in enumerate(texts)
    ]
    clustered = with_clusters(samples, ClusterConfig(num_clusters=4), tmp_path)
    ids = [s.cluster_id for s in clustered]
    assert ids[0] == ids[1] != ids[2] and sorted(set(ids)) == [0, 1]
    assert load_clusters(tmp_path).num_clusters == 2
