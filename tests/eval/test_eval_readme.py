import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_sandbox_example_gives_the_commented_results():
    section = README.read_text().split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    (example,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    lines = [line for line in example.splitlines() if line.strip()]
    scope: dict = {}
    exec(lines[0], scope)  # the import
    for line in lines[1:]:
        expression, expected = line.split("#", 1)
        assert eval(expression, scope) == eval(expected.strip()), line
