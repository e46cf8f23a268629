import torch
from typer.testing import CliRunner

import vlmoe
from tests.interop.moe_llava_checkpoints import write_moe_llava, write_vision_tower
from vlmoe.cli import app
from vlmoe.interop import import_moe_llava


def test_vlmoe_import_moe_llava_writes_a_model_vlmoe_load_reads(tmp_path):
    write_moe_llava(tmp_path / "ckpt", "stablelm")
    tower = write_vision_tower(tmp_path / "clip")
    runner = CliRunner()
    result = runner.invoke(app, ["import", "moe-llava", str(tmp_path / "ckpt"), str(tmp_path / "out")])
    assert result.exit_code == 1 and "--vision-tower" in result.output
    args = [
        "import",
        "moe-llava",
        str(tmp_path / "ckpt"),
        str(tmp_path / "out"),
        "--vision-tower",
        str(tower),
    ]
    result = runner.invoke(app, [*args, "--image-token-id", "95"])
    assert result.exit_code == 0, result.output
    loaded = vlmoe.load(tmp_path / "out")
    direct = import_moe_llava(tmp_path / "ckpt", tower, image_token_id=95)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, direct(input_ids=ids).logits)
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
    assert "x.pt holds no weights" in result.output
