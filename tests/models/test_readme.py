import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _surgery_examples() -> list[str]:
    section = README.read_text().split("## Surgery", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("index", range(3))
def test_readme_surgery_examples_run(index):
    examples = _surgery_examples()
    assert len(examples) == 3
    exec(compile(examples[index], f"README.md Surgery example {index}", "exec"), {})
