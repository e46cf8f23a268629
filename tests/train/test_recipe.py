"""Recipe validation: every built-in recipe loads at every scale; bad files name the key and file."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from vlmoe.cli import app
from vlmoe.train.recipe import RecipeError, builtin_recipes, load_recipe, recipe_path

MINIMAL = {
    "name": "mini",
    "base": {"family": "llava"},
    "output_dir": "runs/mini",
    "stages": [
        {
            "name": "align",
            "data": {"sources": [{"name": "chart", "charts": {"n": 4}}]},
            "trainable": ["connector"],
        }
    ],
}


def _write(tmp_path, recipe):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _scales(name):
    return [None, *yaml.safe_load(recipe_path(name).read_text()).get("scales", {})]


@pytest.mark.parametrize("name", builtin_recipes())
def test_every_builtin_recipe_validates_at_every_scale(name):
    for scale in _scales(name):
        recipe = load_recipe(name, scale=scale)
        assert recipe.name == name and recipe.stages
        for stage in recipe.stages:
            assert stage.trainable and stage.data.sources


def test_builtins_are_the_papers_and_the_demo():
    assert builtin_recipes() == ["chartmoe", "demo", "llava-mole", "mocle", "moe-llava"]


def test_moe_llava_follows_the_paper():
    recipe = load_recipe("moe-llava")
    assert [s.trainable for s in recipe.stages] == [["connector"], ["connector", "lm"], ["experts", "router"]]
    upcycle = recipe.stages[2].surgery[0].upcycle
    assert (upcycle.num_experts, upcycle.top_k, upcycle.layers, upcycle.load_balance_coef) == (
        4,
        2,
        "every_other",
        0.01,
    )


def test_chartmoe_builds_its_connector_from_the_aligned_projectors():
    recipe = load_recipe("chartmoe")
    aligns = recipe.stages[:3]
    assert [s.start for s in aligns] == ["base"] * 3 and all(s.trainable == ["connector"] for s in aligns)
    assert [s.data.sources[0].charts.tasks for s in aligns] == [
        ["chart_to_table"],
        ["chart_to_json"],
        ["chart_to_code"],
    ]
    connector = recipe.stage("sft").surgery[0].connector
    assert connector.init == "aligned" and connector.top_k == 2 and connector.load_balance_coef == 0.0
    assert connector.projectors == ["base", "align_table", "align_json", "align_code"]
    assert recipe.stage("sft").surgery[1].mole.rank == 64
    assert recipe.stages[-1].data.sources[0].charts.tasks == ["chart_qa", "chart_qa_pot"]


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    bad = {**MINIMAL, "stages": [{**MINIMAL["stages"][0], "learning_rat": {"default": 1e-3}}]}
    path = _write(tmp_path, bad)
    with pytest.raises(RecipeError, match=r"recipe\.yaml: unknown key 'stages\[0\]\.learning_rat'") as error:
        load_recipe(path)
    assert str(path) in str(error.value) and "learning_rate" in str(error.value)  # the valid keys


def test_wrong_type_names_the_key_and_the_file(tmp_path):
    bad = {**MINIMAL, "stages": [{**MINIMAL["stages"][0], "batch_size": "eight"}]}
    path = _write(tmp_path, bad)
    with pytest.raises(RecipeError, match=r"recipe\.yaml: stages\[0\]\.batch_size: expected an integer"):
        load_recipe(path)


def test_nested_wrong_type_and_bad_choice(tmp_path):
    stage = {**MINIMAL["stages"][0], "precision": "fp8"}
    with pytest.raises(
        RecipeError, match=r"stages\[0\]\.precision: must be one of \['fp32', 'bf16', 'fp16'\]"
    ):
        load_recipe(_write(tmp_path, {**MINIMAL, "stages": [stage]}))
    stage = {**MINIMAL["stages"][0], "data": {"sources": [{"name": "c", "charts": {"n": "many"}}]}}
    with pytest.raises(RecipeError, match=r"stages\[0\]\.data\.sources\[0\]\.charts\.n: expected an integer"):
        load_recipe(_write(tmp_path, {**MINIMAL, "stages": [stage]}))


def test_cross_checks_parts_starts_and_projectors(tmp_path):
    stage = {**MINIMAL["stages"][0], "trainable": ["conector"]}
    with pytest.raises(RecipeError, match="unknown part 'conector'"):
        load_recipe(_write(tmp_path, {**MINIMAL, "stages": [stage]}))
    stage = {**MINIMAL["stages"][0], "start": "later"}
    with pytest.raises(RecipeError, match="start 'later'"):
        load_recipe(_write(tmp_path, {**MINIMAL, "stages": [stage]}))
    surgery = [{"connector": {"init": "aligned", "projectors": ["base", "nope"]}}]
    stage = {**MINIMAL["stages"][0], "surgery": surgery}
    with pytest.raises(RecipeError, match="'nope' is not 'base', an earlier stage or a saved model"):
        load_recipe(_write(tmp_path, {**MINIMAL, "stages": [stage]}))
    stage = {**MINIMAL["stages"][0], "surgery": [{"upcycle": {}, "mole": {}}]}
    with pytest.raises(RecipeError, match="exactly one of upcycle, mole, mocle, connector"):
        load_recipe(_write(tmp_path, {**MINIMAL, "stages": [stage]}))


def test_scale_merges_and_unknown_scale_fails(tmp_path):
    recipe = {**MINIMAL, "scales": {"tiny": {"stage": {"max_steps": 3}, "charts": {"n": 2}}}}
    path = _write(tmp_path, recipe)
    loaded = load_recipe(path, scale="tiny")
    assert loaded.stages[0].max_steps == 3 and loaded.stages[0].data.sources[0].charts.n == 2
    with pytest.raises(RecipeError, match="no scale 'huge'"):
        load_recipe(path, scale="huge")


@pytest.mark.parametrize(
    ("scales", "message"),
    [
        (["tiny"], "scales: expected a mapping of scale names to overrides, got ['tiny']"),
        ({"tiny": None}, "scales.tiny: expected a mapping of overrides, got None"),
        ({"tiny": {"stage": [1]}}, "scales.tiny.stage: expected a mapping, got [1]"),
        ({"tiny": {"charts": "small"}}, "scales.tiny.charts: expected a mapping, got 'small'"),
        ({"tiny": {"stages": ["align"]}}, "scales.tiny.stages: expected a mapping of stage names"),
        ({"tiny": {"stages": {"align": 3}}}, "scales.tiny.stages.align: expected a mapping, got 3"),
        ({"tiny": {"stage": {"batch_sze": 2}}}, "unknown key 'scales.tiny.stage.batch_sze'; scales.tiny"),
        (
            {"tiny": {"stages": {"align": {"data": {"max_lenght": 9}}}}},
            "unknown key 'scales.tiny.stages.align.data.max_lenght'; scales.tiny.stages.align.data takes",
        ),
        ({"tiny": {"charts": {"count": 2}}}, "unknown key 'scales.tiny.charts.count'; scales.tiny.charts"),
    ],
)
def test_a_malformed_scale_names_its_own_key_in_the_file(tmp_path, scales, message):
    path = _write(tmp_path, {**MINIMAL, "scales": scales})
    with pytest.raises(RecipeError) as error:
        load_recipe(path, scale="tiny")
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_float_fields_accept_yaml_exponents(tmp_path):
    stage = {**MINIMAL["stages"][0], "learning_rate": {"default": "1e-3"}}
    assert load_recipe(_write(tmp_path, {**MINIMAL, "stages": [stage]})).stages[0].learning_rate == {
        "default": 1e-3
    }


def test_cli_reports_a_bad_recipe_in_one_line_before_any_work(tmp_path):
    bad = {**MINIMAL, "output_dir": str(tmp_path / "run"), "stages": [{**MINIMAL["stages"][0], "epoch": 1}]}
    result = CliRunner().invoke(app, ["train", str(_write(tmp_path, bad))])
    assert result.exit_code == 1
    assert "unknown key 'stages[0].epoch'" in result.output and "recipe.yaml" in result.output
    assert not (tmp_path / "run").exists()  # nothing was started


def _stage(**changes):
    return {**MINIMAL, "stages": [{**MINIMAL["stages"][0], **changes}]}


@pytest.mark.parametrize(
    ("changes", "field", "allowed"),
    [
        ({"max_steps": -3}, "max_steps is -3", "at least 1, or -1 to train `epochs` epochs"),
        ({"max_steps": 0}, "max_steps is 0", "at least 1, or -1"),
        ({"batch_size": 0}, "batch_size is 0", "at least 1"),
        ({"gradient_accumulation": -1}, "gradient_accumulation is -1", "at least 1"),
        ({"epochs": 0}, "epochs is 0.0", "more than 0"),
        ({"logging_steps": 0}, "logging_steps is 0", "at least 1"),
        ({"save_steps": -5}, "save_steps is -5", "at least 1"),
        ({"save_total_limit": 0}, "save_total_limit is 0", "at least 1 (the checkpoints kept)"),
        ({"aux_loss_scale": -0.5}, "aux_loss_scale is -0.5", "0 or more"),
        ({"learning_rate": {"default": -1e-3}}, "learning_rate.default is -0.001", "more than 0"),
        ({"learning_rate": {"default": 1e-3, "router": 0}}, "learning_rate.router is 0.0", "more than 0"),
        ({"optimizer": {"betas": [0.9]}}, "optimizer.betas is [0.9]", "two numbers in [0, 1)"),
        ({"optimizer": {"weight_decay": -0.1}}, "optimizer.weight_decay is -0.1", "0 or more"),
        ({"schedule": {"warmup_ratio": 1.5}}, "schedule.warmup_ratio is 1.5", "in [0, 1)"),
        (
            {"data": {"sources": [{"name": "c", "charts": {"n": 4, "held_out": -1}}]}},
            "data.sources[0].charts.held_out is -1",
            "0 or more",
        ),
        (
            {"data": {"sources": [{"name": "c", "charts": {"n": 4, "size_px": 32}}]}},
            "data.sources[0].charts.size_px is 32",
            "from 64 to 4096 pixels",
        ),
        (
            {"data": {"sources": [{"name": "c", "charts": {"n": 4, "size_px": 5000}}]}},
            "data.sources[0].charts.size_px is 5000",
            "from 64 to 4096 pixels",
        ),
        (
            {"data": {"sources": [{"name": "c", "charts": {"n": 4}, "weight": 0}]}},
            "data.sources[0].weight is 0.0",
            "more than 0",
        ),
        (
            {"data": {"sources": [{"name": "c", "charts": {"n": 4}}], "num_samples": 0}},
            "data.num_samples is 0",
            "at least 1",
        ),
    ],
)
def test_numbers_out_of_range_name_the_file_the_stage_and_the_field(tmp_path, changes, field, allowed):
    path = _write(tmp_path, _stage(**changes))
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value).startswith(f"{path}: stages[0] (align).{field}; it must be {allowed}")


def _surgery(kind, **values):
    return {"surgery": [{kind: values}]}


@pytest.mark.parametrize(
    ("changes", "field", "allowed"),
    [
        (_surgery("upcycle", num_experts=0), "upcycle.num_experts is 0", "at least 1"),
        (_surgery("upcycle", top_k=0), "upcycle.top_k is 0", "at least 1"),
        (_surgery("upcycle", load_balance_coef=-0.1), "upcycle.load_balance_coef is -0.1", "0 or more"),
        (_surgery("upcycle", z_loss_coef=-1), "upcycle.z_loss_coef is -1.0", "0 or more"),
        (_surgery("upcycle", capacity_factor=0), "upcycle.capacity_factor is 0.0", "more than 0, or null"),
        (
            _surgery("upcycle", layers="every_second"),
            "upcycle.layers is 'every_second'",
            "'all', 'every_other' or a non-empty list of layer indices (0 or more)",
        ),
        (_surgery("upcycle", layers=[0, -1]), "upcycle.layers is [0, -1]", "'all', 'every_other' or a"),
        (_surgery("upcycle", layers=[]), "upcycle.layers is []", "'all', 'every_other' or a non-empty"),
        (_surgery("mole", num_experts=-1), "mole.num_experts is -1", "0 (plain LoRA) or more"),
        (_surgery("mole", rank=0), "mole.rank is 0", "at least 1"),
        (_surgery("mole", alpha=0), "mole.alpha is 0.0", "more than 0"),
        (_surgery("mole", top_k=0), "mole.top_k is 0", "at least 1"),
        (_surgery("mole", dropout=1), "mole.dropout is 1.0", "in [0, 1)"),
        (_surgery("mole", load_balance_coef=-1), "mole.load_balance_coef is -1.0", "0 or more"),
        (_surgery("mole", layers="odd"), "mole.layers is 'odd'", "'all', 'every_other' or a"),
        (_surgery("mocle", num_experts=0), "mocle.num_experts is 0", "at least 1"),
        (_surgery("mocle", rank=0), "mocle.rank is 0", "at least 1"),
        (_surgery("mocle", alpha=-8), "mocle.alpha is -8.0", "more than 0"),
        (_surgery("mocle", num_clusters=0), "mocle.num_clusters is 0", "at least 1"),
        (_surgery("mocle", temperature=0), "mocle.temperature is 0.0", "more than 0"),
        (_surgery("mocle", layers=[-2]), "mocle.layers is [-2]", "'all', 'every_other' or a"),
        (_surgery("connector", num_experts=0), "connector.num_experts is 0", "at least 1"),
        (_surgery("connector", top_k=0), "connector.top_k is 0", "at least 1"),
        (_surgery("connector", load_balance_coef=-1), "connector.load_balance_coef is -1.0", "0 or more"),
        (_surgery("connector", z_loss_coef=-1), "connector.z_loss_coef is -1.0", "0 or more"),
    ],
)
def test_surgery_numbers_out_of_range_name_the_file_the_stage_and_the_field(
    tmp_path, changes, field, allowed
):
    path = _write(tmp_path, _stage(**changes))
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value).startswith(f"{path}: stages[0] (align).surgery[0].{field}; it must be {allowed}")


@pytest.mark.parametrize(
    ("surgery", "message"),
    [
        ({"upcycle": {"num_experts": 4, "top_k": 5}}, "upcycle.top_k is 5 but num_experts is 4"),
        ({"mole": {"num_experts": 2, "top_k": 3}}, "mole.top_k is 3 but num_experts is 2"),
        ({"connector": {"num_experts": 2, "top_k": 3}}, "connector.top_k is 3 but num_experts is 2"),
        (
            {"connector": {"init": "aligned", "projectors": ["base"], "top_k": 2}},
            "connector.top_k is 2 but the number of projectors is 1; top_k must be from 1 to the number of",
        ),
        (
            {"connector": {"init": "aligned"}},
            "connector: projectors are for init aligned, and init aligned needs them (one per expert",
        ),
        (
            {"connector": {"projectors": ["base"]}},
            "connector: projectors are for init aligned, and init aligned needs them (one per expert, "
            "e.g. [base, align_table]); got init 'upcycle' and projectors ['base']",
        ),
    ],
)
def test_top_k_is_at_most_the_experts_the_surgery_builds(tmp_path, surgery, message):
    path = _write(tmp_path, _stage(surgery=[surgery]))
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value).startswith(f"{path}: stages[0] (align).surgery[0].{message}")


def test_plain_lora_and_an_aligned_connector_take_top_k_from_what_they_build(tmp_path):
    aligned = {"init": "aligned", "projectors": ["base", "base"], "num_experts": 1, "top_k": 2}
    surgery = [{"connector": aligned}, {"mole": {"num_experts": 0, "top_k": 1}}]
    stage = load_recipe(_write(tmp_path, _stage(surgery=surgery))).stages[0]
    assert stage.surgery[0].connector.top_k == 2 and stage.surgery[1].mole.num_experts == 0


def _mocle_stages(router_clusters, data_clusters, later_cluster=None):
    data = {"sources": [{"name": "chart", "charts": {"n": 4}}]}
    first = {**MINIMAL["stages"][0], "name": "mocle", "trainable": ["lora", "router"]}
    first["surgery"] = [{"mocle": {"num_clusters": router_clusters}}]
    first["data"] = {**data, **({"cluster": {"num_clusters": data_clusters}} if data_clusters else {})}
    later = {**first, "name": "more", "surgery": []}
    later["data"] = {**data, **({"cluster": {"num_clusters": later_cluster}} if later_cluster else {})}
    return {**MINIMAL, "stages": [first, later]}


def test_mocle_router_takes_every_cluster_id_of_the_data(tmp_path):
    path = _write(tmp_path, _mocle_stages(router_clusters=4, data_clusters=8, later_cluster=4))
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value) == (
        f"{path}: stages[0] (mocle).data.cluster.num_clusters is 8 but the MoCLE router has 4 clusters "
        "(mocle.num_clusters): the cluster ids would run past its table; make them equal"
    )


def test_a_stage_starting_from_a_mocle_model_checks_its_clusters_against_that_router(tmp_path):
    path = _write(tmp_path, _mocle_stages(router_clusters=4, data_clusters=4, later_cluster=8))
    with pytest.raises(RecipeError, match=r"stages\[1\] \(more\).data.cluster.num_clusters is 8 but"):
        load_recipe(path)
    # Fewer data clusters than the router's table leaves rows unused, which is no error.
    recipe = load_recipe(_write(tmp_path, _mocle_stages(router_clusters=8, data_clusters=4, later_cluster=2)))
    assert [stage.data.cluster.num_clusters for stage in recipe.stages] == [4, 2]
    recipe = _mocle_stages(router_clusters=4, data_clusters=4, later_cluster=8)
    recipe["stages"][1]["start"] = "base"  # a fresh base model: no cluster router
    assert load_recipe(_write(tmp_path, recipe)).stages[1].data.cluster.num_clusters == 8
    # Without data.cluster the cluster ids come with the samples (a path source's "cluster_id").
    recipe = load_recipe(_write(tmp_path, _mocle_stages(router_clusters=4, data_clusters=None)))
    assert recipe.stages[0].data.cluster is None


def test_numbers_at_the_edge_of_their_range_are_accepted(tmp_path):
    changes = {"max_steps": -1, "batch_size": 1, "epochs": 0.5, "schedule": {"warmup_ratio": 0.0}}
    stage = load_recipe(_write(tmp_path, _stage(**changes))).stages[0]
    assert (stage.max_steps, stage.batch_size, stage.epochs) == (-1, 1, 0.5)
    assert load_recipe(_write(tmp_path, _stage(max_steps=1))).stages[0].max_steps == 1


def test_held_out_must_leave_charts_to_train_on_after_the_scale(tmp_path):
    charts = {"n": 2000, "tasks": ["chart_to_table"], "held_out": 100}
    recipe = {
        **_stage(data={"sources": [{"name": "chart", "charts": charts}]}),
        "scales": {"tiny": {"charts": {"n": 20}}, "ok": {"charts": {"n": 20, "held_out": 4}}},
    }
    path = _write(tmp_path, recipe)
    assert load_recipe(path).stages[0].data.sources[0].charts.held_out == 100  # fine unscaled
    with pytest.raises(RecipeError) as error:
        load_recipe(path, scale="tiny")
    message = str(error.value)
    assert message.startswith(f"{path}: stages[0] (align).data.sources[0] (chart).charts: held_out is 100")
    assert "but n is 20 after --scale tiny" in message and "lower held_out or raise n" in message
    assert "scales.tiny.charts can set both, e.g. {n: 20, held_out: 4}" in message
    assert load_recipe(path, scale="ok").stages[0].data.sources[0].charts.held_out == 4
    with pytest.raises(RecipeError, match="held_out is 4 but n is 4: every chart would be held out"):
        load_recipe(
            _write(tmp_path, _stage(data={"sources": [{"name": "c", "charts": {"n": 4, "held_out": 4}}]}))
        )


def test_unknown_chart_task_or_type_is_refused_before_any_chart_is_drawn(tmp_path):
    charts = {"n": 4, "tasks": ["chart_qa", "chart_qaa"]}
    bad = {
        **_stage(data={"sources": [{"name": "chart", "charts": charts}]}),
        "output_dir": str(tmp_path / "run"),
    }
    path = _write(tmp_path, bad)
    with pytest.raises(RecipeError) as error:
        load_recipe(path)
    assert str(error.value) == (
        f"{path}: stages[0] (align).data.sources[0] (chart).charts.tasks: unknown name(s) ['chart_qaa']; "
        "the valid names are chart_to_table, chart_to_json, chart_to_code, chart_qa, chart_qa_pot, chart_type"
    )
    result = CliRunner().invoke(app, ["train", str(path), "--device", "cpu"])
    assert result.exit_code == 1 and "chart_qaa" in result.output
    assert not (tmp_path / "run").exists()  # no chart was generated
    charts = {"n": 4, "chart_types": ["bar", "pi"]}
    with pytest.raises(
        RecipeError, match=r"charts\.chart_types: unknown name\(s\) \['pi'\]; the valid names are bar"
    ):
        load_recipe(_write(tmp_path, _stage(data={"sources": [{"name": "chart", "charts": charts}]})))


def test_on_error_is_fail_or_skip_and_only_for_path_sources(tmp_path):
    source = {"name": "chat", "path": "chat.json", "on_error": "skip"}
    assert (
        load_recipe(_write(tmp_path, _stage(data={"sources": [source]}))).stages[0].data.sources[0].on_error
        == "skip"
    )
    with pytest.raises(
        RecipeError, match=r"sources\[0\]\.on_error: must be one of \['fail', 'skip'\], got 'raise'"
    ):
        load_recipe(_write(tmp_path, _stage(data={"sources": [{**source, "on_error": "raise"}]})))
    charts = {"name": "c", "charts": {"n": 4}, "on_error": "skip"}
    with pytest.raises(RecipeError, match=r"sources\[0\] \(c\)\.on_error: applies to path sources"):
        load_recipe(_write(tmp_path, _stage(data={"sources": [charts]})))


def test_a_runs_recipe_json_loads_as_the_recipe_it_was_started_with(tmp_path):
    from vlmoe.train.stages import _check_run_directory

    recipe = load_recipe("chartmoe", scale="tiny", output_dir=tmp_path / "run")
    _check_run_directory(recipe, tmp_path / "run", resume=False)
    again = load_recipe(tmp_path / "run" / "recipe.json")
    assert again.source == str(tmp_path / "run" / "recipe.json")
    again.source = recipe.source
    assert again == recipe
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(RecipeError, match=r"broken\.json: not valid JSON"):
        load_recipe(tmp_path / "broken.json")


def test_a_recipe_that_is_not_valid_yaml_is_one_line_naming_the_file_line_and_column(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: mini\nstages: [{name: a}\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(broken)
    assert str(error.value) == (
        f"{broken}: not valid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence from line 2, column 9); fix the file there"
    )
    result = CliRunner().invoke(app, ["train", str(broken)])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output


def test_a_recipe_that_is_not_text_names_the_file(tmp_path):
    image = tmp_path / "chart.yaml"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(
        RecipeError, match=r"chart\.yaml: not a UTF-8 text file \(byte 0x89 at 0\); pass a YAML"
    ):
        load_recipe(image)


def test_cli_resumes_from_a_runs_recipe_json(tmp_path):
    stage = {**MINIMAL["stages"][0], "max_steps": 1, "batch_size": 2, "report_to": []}
    path = _write(tmp_path, {**MINIMAL, "output_dir": str(tmp_path / "run"), "stages": [stage]})
    assert CliRunner().invoke(app, ["train", str(path), "--device", "cpu"]).exit_code == 0
    result = CliRunner().invoke(
        app, ["train", str(tmp_path / "run" / "recipe.json"), "--resume", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert f"align: {tmp_path / 'run' / 'align' / 'final'} (done earlier)" in result.output


def test_weights_on_some_sources_only_or_infinite_are_refused(tmp_path):
    sources = [{"name": "a", "path": "a.json", "weight": 2}, {"name": "b", "path": "b.json"}]
    with pytest.raises(
        RecipeError, match=r"data\.sources: \['b'\] have no weight while others do; give every"
    ):
        load_recipe(_write(tmp_path, _stage(data={"sources": sources})))
    sources[1]["weight"] = float("inf")
    with pytest.raises(RecipeError, match=r"sources\[1\]\.weight is inf; it must be more than 0 and finite"):
        load_recipe(_write(tmp_path, _stage(data={"sources": sources})))
    sources[1]["weight"] = 1
    assert [
        s.weight
        for s in load_recipe(_write(tmp_path, _stage(data={"sources": sources}))).stages[0].data.sources
    ] == [2, 1]
