import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_analysis_python_example_runs():
    section = README.read_text().split("## Analysis", 1)[1].split("\n## ", 1)[0]
    (example,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    scope: dict = {}
    exec(compile(example, "README.md Analysis example", "exec"), scope)
    assert scope["html"].name == "report.html"
    assert (Path(scope["out"]) / "redrawn" / "report.html").is_file()
