"""The processor `vlmoe import` writes next to the model: image-token expansion, chat template, and
continued training with a recipe whose base is the imported directory."""

import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from typer.testing import CliRunner

import vlmoe
from tests.interop.moe_llava_checkpoints import IMAGE_TOKEN, write_moe_llava, write_vision_tower
from tests.interop.test_llava_mole import ALPHA, _trained_parts
from tests.interop.test_llava_mole import folders as mole_folders  # noqa: F401 (a fixture)
from tests.interop.tiny_tokenizers import write_gpt2_style, write_vicuna_tokenizer
from vlmoe.cli import app
from vlmoe.interop import import_llava_mole, import_moe_llava
from vlmoe.interop.processor import read_tokenizer

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CONVERSATION = [
    {"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image"}]},
    {"role": "assistant", "content": "A bar chart."},
    {"role": "user", "content": "Its highest value?"},
]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, mole_folders):  # noqa: F811
    """{"moe-llava": DST, "llava-mole": DST}, each written by `vlmoe import`."""
    root = tmp_path_factory.mktemp("imported")
    write_moe_llava(root / "phi", "phi")
    tower = write_vision_tower(root / "clip")
    torch.save({"state_dict": _trained_parts()}, root / "llava_mole.pt")
    commands = {
        "moe-llava": ["moe-llava", str(root / "phi"), str(root / "moe-llava"), "--vision-tower", str(tower)],
        "llava-mole": [
            "llava-mole",
            str(root / "llava_mole.pt"),
            str(root / "llava-mole"),
            "--base-llm",
            str(mole_folders / "vicuna"),
            "--vision-tower",
            str(mole_folders / "clip"),
            "--lora-alpha",
            str(ALPHA),
            "--routing",
            "sparse",
        ],
    }
    for command in commands.values():
        result = CliRunner().invoke(app, ["import", *command])
        assert result.exit_code == 0, result.output
    return {name: root / name for name in commands}


@pytest.mark.parametrize("source", ["moe-llava", "llava-mole"])
def test_image_tokens_match_the_vision_features_and_are_filled_with_them(imported, source):
    model, processor = vlmoe.load(imported[source]), AutoProcessor.from_pretrained(imported[source])
    config = model.config
    prompt = processor.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True)
    inputs = processor(text=prompt, images=Image.new("RGB", (40, 24), "red"), return_tensors="pt")
    image_positions = inputs["input_ids"][0] == config.image_token_id
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output[0]  # [image tokens, hidden]
        embeds = model(**inputs, output_hidden_states=True).hidden_states[0][0]  # what the LM reads
    assert int(image_positions.sum()) == features.shape[0] == config.image_seq_length == 16
    torch.testing.assert_close(embeds[image_positions], features)
    if source == "llava-mole":  # the run of image tokens sits between the learned start/end vectors
        where = image_positions.nonzero().flatten()
        ids = inputs["input_ids"][0]
        assert ids[where[0] - 1] == config.im_start_token_id and ids[where[-1] + 1] == config.im_end_token_id


def test_the_chat_templates_render_their_prompt_strings(imported):
    moe_llava = AutoProcessor.from_pretrained(imported["moe-llava"])
    mole = AutoProcessor.from_pretrained(imported["llava-mole"])
    # MoE-LLaVA's conv_phi (get_prompt): image moved first, sep " ", sep2 "<|endoftext|>", "ASSISTANT:".
    assert moe_llava.apply_chat_template(CONVERSATION, add_generation_prompt=True) == (
        f"{SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A bar chart.<|endoftext|>USER: Its highest value? "
        "ASSISTANT:"
    )
    # LLaVA-MoLE's build_chat_input: "<image>\n" replaced by the wrapped image, sep2 "</s> ", "ASSISTANT: ".
    assert mole.apply_chat_template(CONVERSATION, add_generation_prompt=True) == (
        f"{SYSTEM} USER: <im_start><image><im_end>What is it? ASSISTANT: A bar chart.</s> USER: Its highest "
        "value? ASSISTANT: "
    )
    system = [{"role": "system", "content": "Be brief."}, CONVERSATION[2]]
    assert moe_llava.apply_chat_template(system) == "Be brief. USER: Its highest value? "


RECIPE = """\
name: continue-{source}
base: {{path: {dst}}}
output_dir: {out}
stages:
  - name: more
    data:
      sources: [{{name: chart, charts: {{n: 4, size_px: 64, questions_per_chart: 1, tasks: [chart_qa]}}}}]
      max_length: 512
    trainable: {trainable}
    learning_rate: {{default: 1.0e-2}}
    batch_size: 2
    max_steps: 2
    save_steps: 2
    logging_steps: 1
    report_to: []
"""


@pytest.mark.slow
@pytest.mark.parametrize("source", ["moe-llava", "llava-mole"])
def test_vlmoe_train_continues_training_the_imported_model(imported, tmp_path, source):
    trainable = "[experts, router]" if source == "moe-llava" else "[experts, router, lora]"
    recipe = tmp_path / "recipe.yaml"
    out = tmp_path / "run"
    recipe.write_text(RECIPE.format(source=source, dst=imported[source], out=out, trainable=trainable))
    result = CliRunner().invoke(app, ["train", str(recipe), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    history = json.loads((out / "more" / "stage_done.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 2 and all(0 < loss < float("inf") for loss in losses)  # supervised tokens kept
    before, after = vlmoe.load(imported[source]).state_dict(), vlmoe.load(out / "more" / "final").state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    routers = {name for name in before if ".router." in name}
    assert routers and routers <= changed  # the routers learned: routing is live
    assert any(".experts." in name for name in changed)
    assert not any("vision_tower" in name or "embed_tokens" in name for name in changed)  # frozen
    if source == "moe-llava":  # its balance loss (coefficient 0.01 from the checkpoint) is logged
        assert any(entry.get("aux_loss", 0) > 0 for entry in history)
    again = AutoProcessor.from_pretrained(out / "more" / "final")
    assert again.chat_template == AutoProcessor.from_pretrained(imported[source]).chat_template


def test_missing_tokenizer_or_preprocessor_config_name_the_file_and_the_fix(tmp_path, mole_folders):  # noqa: F811
    write_moe_llava(tmp_path / "ckpt", "qwen1_5")
    tower = write_vision_tower(tmp_path / "clip")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "ckpt" / name).unlink()
    with pytest.raises(
        FileNotFoundError, match=r"ckpt \(the checkpoint\) has no tokenizer files.*--tokenizer"
    ):
        import_moe_llava(tmp_path / "ckpt", tower)
    model, processor = import_moe_llava(
        tmp_path / "ckpt", tower, tokenizer=write_gpt2_style(tmp_path / "tok")
    )
    assert processor.image_token_id == model.config.image_token_id == IMAGE_TOKEN
    (tower / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"clip/preprocessor_config.json is missing.*copy"):
        import_moe_llava(tmp_path / "ckpt", tower, tokenizer=tmp_path / "tok")

    torch.save({"state_dict": _trained_parts()}, tmp_path / "mole.pt")
    with pytest.raises(FileNotFoundError, match=r"clip/preprocessor_config.json is missing"):
        import_llava_mole(tmp_path / "mole.pt", mole_folders / "vicuna", tower)
    result = CliRunner().invoke(
        app,
        [
            *["import", "llava-mole", str(tmp_path / "mole.pt"), str(tmp_path / "out")],
            *["--base-llm", str(mole_folders / "vicuna"), "--vision-tower", str(mole_folders / "clip")],
            *["--tokenizer", str(tmp_path / "clip")],
        ],
    )
    assert result.exit_code == 1 and "clip (the --tokenizer folder) has no tokenizer files" in result.output


def test_a_folder_without_tokenizer_files_is_named_by_the_option_that_gave_it(tmp_path):
    write_moe_llava(tmp_path / "ckpt", "qwen1_5")
    tower = write_vision_tower(tmp_path / "clip")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "ckpt" / name).unlink()
    args = ["import", "moe-llava", str(tmp_path / "ckpt"), str(tmp_path / "out")]
    args += ["--vision-tower", str(tower)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    checkpoint = tmp_path / "ckpt"
    assert f"vlmoe import moe-llava: {checkpoint} (the checkpoint) has no tokenizer files" in result.output
    result = CliRunner().invoke(app, [*args, "--tokenizer", str(tower)])
    assert result.exit_code == 1
    assert f"vlmoe import moe-llava: {tower} (the --tokenizer folder) has no tokenizer files" in result.output


def test_an_explicit_image_token_id_must_be_a_special_token(tmp_path):
    write_moe_llava(tmp_path / "ckpt", "phi", tokenizer_size=IMAGE_TOKEN + 2)  # adds <|extra_1|>, <|extra_2|>
    tower = write_vision_tower(tmp_path / "clip")
    model, processor = import_moe_llava(tmp_path / "ckpt", tower, image_token_id=IMAGE_TOKEN)
    assert processor.image_token == "<|extra_1|>" and model.config.image_token_id == IMAGE_TOKEN
    assert "USER: <|extra_1|>\n" in processor.apply_chat_template(CONVERSATION[:1])
    with pytest.raises(ValueError, match="image_token_id 7 is not a special token"):
        import_moe_llava(tmp_path / "ckpt", tower, image_token_id=7)


def test_the_conversation_format_can_be_chosen(tmp_path):
    write_moe_llava(tmp_path / "ckpt", "qwen1_5")
    tower = write_vision_tower(tmp_path / "clip")
    _, processor = import_moe_llava(tmp_path / "ckpt", tower, conversation="openchat")
    rendered = processor.apply_chat_template(CONVERSATION[:2])
    assert rendered.endswith("ASSISTANT: A bar chart.<|end_of_turn|>")
    with pytest.raises(ValueError, match=r"unknown conversation format 'vicuna'; known: \['llava-mole'"):
        import_moe_llava(tmp_path / "ckpt", tower, conversation="vicuna")


def test_a_damaged_preprocessor_config_names_the_file(tmp_path):
    write_moe_llava(tmp_path / "ckpt", "qwen1_5")
    tower = write_vision_tower(tmp_path / "clip")
    for text, message in (
        (
            '{"crop_size": 28,',
            r"clip/preprocessor_config.json is not valid JSON \(line 1, column 18: Expecting property name",
        ),
        (
            "[28, 28]",
            r"clip/preprocessor_config.json must hold a JSON object; copy it again from the tower's",
        ),
    ):
        (tower / "preprocessor_config.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            import_moe_llava(tmp_path / "ckpt", tower)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "vocab.json"])
def test_a_damaged_tokenizer_json_file_names_the_file(tmp_path, name):
    folder = write_gpt2_style(tmp_path / "tok")
    fix = "copy it again from the published checkpoint, or pass --tokenizer DIR"
    for text, message in (
        ("", "is not valid JSON (line 1, column 1: Expecting value)"),
        ('{"a": ', "is not valid JSON (line 1, column 7: Expecting value)"),
        ("[]", "must hold a JSON object"),  # transformers: AttributeError; tokenizers: a bare Exception
    ):
        (folder / name).write_text(text)
        with pytest.raises(ValueError) as error:
            read_tokenizer(folder, "the checkpoint")
        assert str(error.value).startswith(f"{folder / name} {message}; {fix}")


def test_a_tokenizer_json_that_is_not_an_object_names_the_file(tmp_path):
    folder = write_vicuna_tokenizer(tmp_path / "tok")
    (folder / "tokenizer.json").write_text("[]")  # transformers: "'str' object cannot be interpreted..."
    with pytest.raises(ValueError, match=r"tok/tokenizer.json must hold a JSON object; copy it again"):
        read_tokenizer(folder, "the checkpoint")
