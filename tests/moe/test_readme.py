import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_core_example_runs(capsys):
    section = README.read_text().split("## The sparse core", 1)[1].split("\n## ", 1)[0]
    (example,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    exec(compile(example, "README.md sparse core example", "exec"), {})
    printed = capsys.readouterr().out
    counts = [int(n) for n in re.findall(r"\d+", printed.split("tensor(", 1)[1])]
    assert len(counts) == 4 and sum(counts) == 10  # 5 tokens x top-2
