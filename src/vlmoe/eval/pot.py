"""Program-of-Thought answers: find the Python program in a model's answer, run it, keep what it printed."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vlmoe.eval.sandbox import ProgramResult, run_program

_FENCED = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class PotAnswer:
    """The answer to score, and the program run to get it (None when the answer was not code)."""

    answer: str
    program: str | None = None
    result: ProgramResult | None = None


def extract_program(text: str) -> str | None:
    """The program in `text`: a ```python fenced block, or the whole text if it is code that prints.

    Example:
        >>> extract_program("Sure:\\n```python\\nprint(1 + 1)\\n```")
        'print(1 + 1)\\n'
        >>> extract_program("The answer is 2.") is None
        True
    """
    fenced = _FENCED.search(text)
    if fenced:
        return fenced.group(1)
    if "print(" not in text:
        return None
    try:
        compile(text, "<answer>", "exec")
    except (SyntaxError, ValueError):
        return None
    return text


def pot_answer(text: str, timeout_s: float = 5.0, interpreter: str | None = None) -> PotAnswer:
    """Run the program in `text` in the sandbox; its last printed line is the answer.

    A program that fails, times out or is forbidden answers "" (scored wrong); text that is not
    code is its own answer. `interpreter`: the Python that runs it (see `run_program`).

    Example:
        >>> pot_answer("```python\\nvalues = [3, 4]\\nprint(sum(values))\\n```").answer
        '7'
    """
    program = extract_program(text)
    if program is None:
        return PotAnswer(answer=text)
    result = run_program(program, timeout_s=timeout_s, interpreter=interpreter)
    lines = result.stdout.strip().splitlines()
    answer = lines[-1].strip() if result.ok and lines else ""
    return PotAnswer(answer=answer, program=program, result=result)
