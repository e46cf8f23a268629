import logging

import torch
from transformers import AutoProcessor
from typer.testing import CliRunner

import vlmoe
from tests.interop.moe_llava_checkpoints import write_moe_llava, write_vision_tower
from tests.interop.tiny_tokenizers import write_gpt2_style
from vlmoe.cli import app
from vlmoe.interop import import_moe_llava


def test_vlmoe_import_moe_llava_writes_a_model_vlmoe_load_reads(tmp_path):
    write_moe_llava(tmp_path / "ckpt", "stablelm")
    tower = write_vision_tower(tmp_path / "clip")
    tokenizer = write_gpt2_style(tmp_path / "tokenizer")  # instead of the checkpoint's arcade100k.tiktoken
    runner = CliRunner()
    base = [
        "import",
        "moe-llava",
        str(tmp_path / "ckpt"),
        str(tmp_path / "out"),
        "--tokenizer",
        str(tokenizer),
    ]
    result = runner.invoke(app, base)
    assert result.exit_code == 1 and "--vision-tower" in result.output
    result = runner.invoke(app, [*base, "--vision-tower", str(tower)])
    assert result.exit_code == 0, result.output
    loaded = vlmoe.load(tmp_path / "out")
    direct, processor = import_moe_llava(tmp_path / "ckpt", tower, tokenizer=tokenizer)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, direct(input_ids=ids).logits)
    saved = AutoProcessor.from_pretrained(tmp_path / "out")
    assert saved.chat_template == processor.chat_template and "<|endoftext|>" in saved.chat_template
    assert saved.image_token_id == loaded.config.image_token_id
    result = runner.invoke(app, ["export", str(tmp_path / "out"), str(tmp_path / "exported")])
    assert result.exit_code == 1 and "'stablelm', for which transformers has no standard MoE" in result.output


def test_vlmoe_import_llava_mole_explains_missing_parts(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "import",
            "llava-mole",
            str(tmp_path / "x.pt"),
            str(tmp_path / "out"),
            "--base-llm",
            str(tmp_path),
            "--vision-tower",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 1
    assert "x.pt does not exist" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["import", "llava-mole", str(empty), str(tmp_path / "out"), "--base-llm", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--vision-tower", str(tmp_path)])
    assert result.exit_code == 1 and "empty holds no weights" in result.output
    (tmp_path / "zero.pt").write_bytes(b"")
    args = [
        "import",
        "llava-mole",
        str(tmp_path / "zero.pt"),
        str(tmp_path / "out"),
        "--base-llm",
        str(tmp_path),
    ]
    result = CliRunner().invoke(app, [*args, "--vision-tower", str(tmp_path)])
    assert result.exit_code == 1
    assert (
        result.output
        == f"vlmoe import llava-mole: {tmp_path / 'zero.pt'}: the file is empty (0 bytes); fetch it again\n"
    )


def test_import_moe_llava_prints_no_model_type_warning(tmp_path):
    write_moe_llava(tmp_path / "ckpt", "phi")  # its own tokenizer files, config.json of type moe_llava_phi
    tower = write_vision_tower(tmp_path / "clip")
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)  # transformers' loggers do not propagate
    try:
        args = ["import", "moe-llava", str(tmp_path / "ckpt"), str(tmp_path / "out")]
        result = CliRunner().invoke(app, [*args, "--vision-tower", str(tower)])
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert result.exit_code == 0, result.output
    assert not [m for m in messages if "to instantiate a model of type" in m]


def test_vlmoe_import_refuses_a_dst_that_is_a_file_before_converting(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    for command in (
        ["moe-llava"],
        ["llava-mole", "--base-llm", str(tmp_path), "--vision-tower", str(tmp_path)],
    ):
        result = CliRunner().invoke(
            app, ["import", command[0], str(tmp_path / "ckpt"), str(notes), *command[1:]]
        )
        assert result.exit_code == 1 and f"DST {notes} is a file; pass a folder" in result.output
    assert notes.read_text() == "keep me"


def test_vlmoe_import_and_export_refuse_a_dst_folder_of_other_files_before_any_work(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("keep me")
    for args in (
        ["import", "moe-llava", str(tmp_path / "ckpt"), str(mine)],
        ["import", "llava-mole", str(tmp_path / "ckpt"), str(mine), "--base-llm", str(tmp_path),
         "--vision-tower", str(tmp_path)],
        ["export", str(tmp_path / "no-model"), str(mine)],
    ):  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output
        assert f"DST {mine} holds other files (data.csv) and no config.json" in result.output
    assert (mine / "data.csv").read_text() == "keep me" and len(list(mine.iterdir())) == 1


def test_vlmoe_import_and_export_refuse_a_dst_that_is_src_or_holds_it(tmp_path):
    source = tmp_path / "models" / "ckpt"  # a config.json passes it as "a model saved before"
    source.mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_text("the only copy")
    (tmp_path / "models" / "config.json").write_text("{}")
    for dst, relation in ((source, "is"), (tmp_path / "models", "holds")):
        for args in (
            ["import", "moe-llava", str(source), str(dst)],
            ["import", "llava-mole", str(source), str(dst), "--base-llm", str(tmp_path),
             "--vision-tower", str(tmp_path)],
            ["export", str(source), str(dst)],
        ):  # fmt: skip
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 1, result.output
            assert f"DST {dst} {relation} SRC {source}: writing the model there would delete" in result.output
    assert (source / "model.safetensors").read_text() == "the only copy"
