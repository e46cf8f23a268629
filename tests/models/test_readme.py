import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from vlmoe.cli import app

README = Path(__file__).resolve().parents[2] / "README.md"


def _surgery_examples() -> list[str]:
    section = README.read_text().split("## Surgery", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("index", range(3))
def test_readme_surgery_examples_run(index):
    examples = _surgery_examples()
    assert len(examples) == 3
    exec(compile(examples[index], f"README.md Surgery example {index}", "exec"), {})


def _training_recipe() -> str:
    section = README.read_text().split("## Training", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```yaml\n(.*?)```", section, flags=re.S)[0]


@pytest.mark.slow  # two short stages on a tiny LLaVA: ~10 s
def test_readme_training_recipe_trains_at_tiny_scale(tmp_path):
    """The Training section's recipe, copied with its output and data paths pointed at tmp_path."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(images / "red.png")
    turns = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]
    (tmp_path / "data" / "llava_instruct.json").write_text(
        json.dumps([{"id": f"r{i}", "image": "red.png", "conversations": turns} for i in range(4)])
    )
    text = _training_recipe().replace("runs/my-chartmoe", str(tmp_path / "run"))
    text = text.replace("data/", f"{tmp_path}/data/")
    recipe = yaml.safe_load(text)
    assert recipe["stages"][0]["data"]["sources"][0]["charts"]["held_out"] == 100  # the example as written
    (tmp_path / "my-chartmoe.yaml").write_text(text)
    result = CliRunner().invoke(
        app, ["train", str(tmp_path / "my-chartmoe.yaml"), "--scale", "tiny", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    for stage, steps in (("align_table", 5), ("sft", 10)):
        done = json.loads((tmp_path / "run" / stage / "stage_done.json").read_text())
        assert done["log_history"][-1]["step"] == steps
