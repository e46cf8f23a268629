import json

import pytest
import torch
from model_helpers import logits, perturb
from safetensors.torch import load_file, save_file

import vlmoe
from vlmoe.models import read_record, tiny
from vlmoe.models.checkpoint import load_pretrained_vlm

CLUSTERS = torch.tensor([1, 3])


def surgered(model):
    vlmoe.install_moe_connector(model, init="upcycle")
    vlmoe.upcycle_ffn(model, layers=[0], load_balance_coef=0.02)
    vlmoe.add_mole(model, layers=[1], num_experts=4, rank=4, router="cluster", num_clusters=4, universal=True)
    perturb(model)
    return model


def test_round_trip_is_bit_identical(family, tiny_model, tmp_path):
    model, _, batch = tiny_model
    surgered(model)
    path = vlmoe.save(model, tmp_path / "model")
    again = vlmoe.load(path)
    assert type(again) is type(model)
    assert read_record(again) == read_record(model)
    assert torch.equal(logits(again, batch, CLUSTERS), logits(model, batch, CLUSTERS))
    assert json.loads((path / "config.json").read_text())["vlmoe"]["steps"][1]["kind"] == "upcycle_ffn"


def test_dense_model_round_trips_too(tmp_path):
    model, _ = tiny("idefics3")
    again = vlmoe.load(vlmoe.save(model, tmp_path / "dense"))
    assert read_record(again) is None
    state = again.state_dict()
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())


def test_save_overwrites_atomically_and_leaves_no_temp_dirs(tmp_path):
    model, _ = tiny("llava")
    vlmoe.save(model, tmp_path / "m")
    vlmoe.upcycle_ffn(model)
    vlmoe.save(model, tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert read_record(vlmoe.load(tmp_path / "m")).kinds() == ["upcycle_ffn"]


@pytest.fixture
def saved(tmp_path):
    model = vlmoe.upcycle_ffn(tiny("llava")[0], num_experts=4)
    return vlmoe.save(model, tmp_path / "m")


def _edit_weights(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


def test_missing_tensor_is_named(saved):
    _edit_weights(saved, lambda state: state.pop("model.language_model.layers.1.mlp.router.gate.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model\.language_model\.layers\.1\.mlp\.router"):
        vlmoe.load(saved)


def test_unexpected_tensor_is_named(saved):
    _edit_weights(saved, lambda state: state.update(extra=torch.zeros(1)))
    with pytest.raises(ValueError, match=r"unexpected tensors \['extra'\]"):
        vlmoe.load(saved)


def test_different_layout_in_config_names_the_mismatched_tensor(saved):
    config = json.loads((saved / "config.json").read_text())
    config["vlmoe"]["steps"][0]["num_experts"] = 8
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"tensor 'model\.language_model\.layers\.0\.mlp\.experts\.down_proj' has shape"
    ):
        vlmoe.load(saved)


def test_malformed_record_and_missing_files_are_clear(saved, tmp_path):
    config = json.loads((saved / "config.json").read_text())
    config["vlmoe"]["version"] = 99
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="record version 99"):
        vlmoe.load(saved)
    config["vlmoe"]["version"] = 1
    config["vlmoe"]["steps"][0]["num_experts"] = "four"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"config\.json 'vlmoe': step 0 \(upcycle_ffn\)\.num_experts is 'four'; expected an"
    ):
        vlmoe.load(saved)
    config["vlmoe"]["steps"][0]["num_experts"] = 0  # the right type, a value no surgery takes
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"config\.json 'vlmoe': the recorded surgery does not replay .* vlmoe\.save"
    ):
        vlmoe.load(saved)
    with pytest.raises(FileNotFoundError, match="not a vlmoe model directory"):
        vlmoe.load(tmp_path / "nowhere")


def test_a_damaged_config_or_weights_file_is_named_with_the_fix(saved):
    config_text = (saved / "config.json").read_text()
    (saved / "config.json").write_text(config_text[:40])  # cut short, as by a failed copy
    with pytest.raises(ValueError, match=r"m/config\.json is not valid JSON \(line .*\); copy or save"):
        vlmoe.load(saved)
    (saved / "config.json").write_text(config_text.replace('"model_type": "llava"', '"model_type": "llavva"'))
    with pytest.raises(ValueError, match=r"m/config\.json: model_type 'llavva' is not one transformers"):
        vlmoe.load(saved)
    (saved / "config.json").write_text(config_text)
    (saved / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"m/model\.safetensors is not a readable safetensors file .* copy"):
        vlmoe.load(saved)


@pytest.mark.parametrize(
    ("architectures", "message"),
    [
        (
            ["Qwen2VLForConditionalGeneration"],
            r"'architectures' names Qwen2VLForConditionalGeneration, a model of Qwen2VLConfig, but "
            r"model_type 'llava' is a LlavaConfig: the file mixes two models\. Restore 'architectures'",
        ),
        (["AutoConfig"], r"'architectures' is \['AutoConfig'\]; expected one transformers model class"),
    ],
)
def test_architectures_that_do_not_fit_the_config_are_named(saved, architectures, message):
    config = json.loads((saved / "config.json").read_text())
    config["architectures"] = architectures
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{saved}/config\.json: {message}"):
        vlmoe.load(saved)


def test_load_pretrained_vlm_names_a_model_type_that_is_no_vlm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'bert' is not a vision-language model"):
        load_pretrained_vlm(tmp_path)


def test_tied_embeddings_stay_tied_and_identical(tmp_path):
    from transformers import LlavaForConditionalGeneration

    config = tiny("llava")[0].config
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = vlmoe.upcycle_ffn(LlavaForConditionalGeneration(config).eval())
    again = vlmoe.load(vlmoe.save(model, tmp_path / "tied"))
    assert again.lm_head.weight is again.model.language_model.embed_tokens.weight
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_processor_saved_beside_the_model(tmp_path):
    from transformers import AutoProcessor

    model, processor = tiny("llava")
    path = vlmoe.save(vlmoe.upcycle_ffn(model), tmp_path / "m", processor=processor)
    reloaded = AutoProcessor.from_pretrained(path)
    assert reloaded.tokenizer("a chart").input_ids == processor.tokenizer("a chart").input_ids
    assert read_record(vlmoe.load(path)).kinds() == ["upcycle_ffn"]


def test_a_record_written_before_the_newer_step_fields_still_loads(tmp_path):
    import json

    import vlmoe

    model = vlmoe.upcycle_ffn(vlmoe.models.tiny("llava")[0], num_experts=4, top_k=2)
    path = vlmoe.save(model, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    for step in config["vlmoe"]["steps"]:
        del step["min_capacity"], step["load_balance_first_choice"]  # the fields a later vlmoe added
    (path / "config.json").write_text(json.dumps(config))
    router = vlmoe.load(path).model.language_model.layers[0].mlp.router.config
    assert (router.min_capacity, router.load_balance_first_choice) == (0, False)


def test_save_refuses_to_replace_a_folder_of_other_files_or_a_file_and_deletes_nothing(tmp_path):
    model, _ = tiny("llava")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match=r"holds other files \(thesis\.tex\) and no config\.json"):
        vlmoe.save(model, mine)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        vlmoe.save(model, notes)
    with pytest.raises(ValueError, match="holds other files"):
        vlmoe.export_hf(vlmoe.upcycle_ffn(tiny("llava")[0], num_experts=2), mine)
    assert (mine / "thesis.tex").read_text() == "years of work" and notes.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]  # no temp dirs left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert vlmoe.save(model, empty) == empty and (empty / "config.json").exists()
    assert vlmoe.save(model, empty) == empty  # a model folder saved before is replaced


def test_a_model_cast_to_bf16_is_rebuilt_in_bf16_on_load(tmp_path):
    # .to(dtype) leaves the config's dtype behind; save records the model's own, so load builds
    # the model in bf16 instead of an fp32 copy the size of the model first.
    import transformers

    from vlmoe.models import checkpoint

    model, _ = tiny("llava")
    model.to(torch.bfloat16)
    path = vlmoe.save(model, tmp_path / "bf16")
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    built = checkpoint._base_model(transformers.AutoConfig.from_pretrained(path), path)
    assert {p.dtype for p in built.parameters()} == {torch.bfloat16}
    again = vlmoe.load(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_save_in_place_over_the_loaded_folder_is_safe_and_keeps_the_new_weights(tmp_path, monkeypatch):
    path = vlmoe.save(vlmoe.upcycle_ffn(tiny("llava")[0]), tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    model = vlmoe.load("m")  # a relative path: load records it resolved
    monkeypatch.chdir(path)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # load copied the tensors: the folder can go
    assert vlmoe.save(model, path) == path
    again = vlmoe.load(path).state_dict()
    assert all(torch.equal(tensor, again[name]) for name, tensor in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left


def test_save_in_place_refuses_to_drop_the_processor_and_leaves_the_folder(tmp_path):
    model, processor = tiny("llava")
    path = vlmoe.save(vlmoe.upcycle_ffn(model), tmp_path / "m", processor=processor)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(
        ValueError,
        match=rf"{path} is the folder the model was loaded from, .* deleting chat_template\.jinja, "
        r"processor_config\.json, tokenizer\.json and 1 more, .*processor=AutoProcessor\.from_pretrained",
    ):
        vlmoe.save(vlmoe.load(path), path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    vlmoe.save(vlmoe.load(path), path, processor=processor)  # with it, nothing is lost
    assert sorted(p.name for p in path.iterdir()) == sorted(before)


def test_save_refuses_a_model_built_without_its_recorded_surgery_and_keeps_the_folder(tmp_path):
    from transformers import AutoModelForImageTextToText

    path = vlmoe.save(vlmoe.upcycle_ffn(tiny("llava")[0]), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    # Dense MLPs with random weights where the experts were, and the record of the surgery.
    stock = AutoModelForImageTextToText.from_pretrained(path)
    for target in (path, tmp_path / "copy"):
        with pytest.raises(
            ValueError,
            match=r"records surgery \['upcycle_ffn'\] but its modules show \[\].*vlmoe\.load\(path\)",
        ):
            vlmoe.save(stock, target)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert read_record(vlmoe.load(path)).kinds() == ["upcycle_ffn"]


def test_save_refuses_a_folder_holding_the_loaded_folder_and_deletes_nothing(tmp_path):
    runs = tmp_path / "runs"
    path = vlmoe.save(vlmoe.upcycle_ffn(tiny("llava")[0]), runs / "model")
    (runs / "config.json").write_text("{}")  # a model folder saved before: check_replaceable passes it
    (runs / "notes.txt").write_text("mine")
    model = vlmoe.load(path)
    with pytest.raises(ValueError) as error:
        vlmoe.save(model, runs)
    assert str(error.value) == (
        f"{runs} holds {path}, the folder the model was loaded from: saving there replaces the whole "
        f"folder {runs}, deleting config.json, model, notes.txt (the model's source among them); pass "
        f"another folder, one that does not hold {path}"
    )
    assert sorted(p.name for p in runs.iterdir()) == ["config.json", "model", "notes.txt"]
    assert read_record(vlmoe.load(path)).kinds() == ["upcycle_ffn"]


def test_save_into_a_folder_inside_the_loaded_folder_keeps_the_source(tmp_path):
    path = vlmoe.save(vlmoe.upcycle_ffn(tiny("llava")[0]), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    inner = vlmoe.save(vlmoe.load(path), path / "copy")
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in path.iterdir()) == sorted([*before, "copy"])  # no temp dirs left
    assert read_record(vlmoe.load(inner)).kinds() == read_record(vlmoe.load(path)).kinds() == ["upcycle_ffn"]
