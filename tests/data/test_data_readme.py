import json
import re
from pathlib import Path

import pytest
from PIL import Image

from vlmoe.data import ChartSetConfig, generate_chart_set

README = Path(__file__).resolve().parents[2] / "README.md"


def _data_examples() -> list[str]:
    section = README.read_text().split("## Data", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow  # 12 charts at 64 px and a tiny Qwen2-VL forward: a few seconds
def test_readme_conversations_example_runs(tmp_path, monkeypatch):
    """The Conversations example, run in a folder holding the files it names (charts from
    `vlmoe data charts`, a LLaVA JSON with one good and one missing image)."""
    monkeypatch.chdir(tmp_path)
    generate_chart_set("data/charts", ChartSetConfig(n=12, size_px=64, questions_per_chart=1))
    Path("data/coco").mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save("data/coco/red.png")
    turns = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."}]
    samples = [{"id": "red", "image": "red.png", "conversations": turns}]
    samples.append({"id": "gone", "image": "gone.png", "conversations": turns})
    Path("data/llava_instruct.json").write_text(json.dumps(samples))
    example = next(e for e in _data_examples() if "read_conversations" in e)
    scope: dict = {}
    with pytest.warns(UserWarning, match="missing_image 1"):
        exec(compile(example.replace("10_000", "40"), "README.md Data example", "exec"), scope)
    assert len(scope["train"]) == 40 and {s.domain for s in scope["train"]} == {"chart", "chat"}
    assert scope["loss"].isfinite()
