"""The examples in the eval modules' docstrings run and print what they claim."""

import doctest
import importlib

import pytest

MODULES = [
    "forced",
    "generate",
    "metrics",
    "pot",
    "readers",
    "report",
    "runner",
    "samples",
    "sandbox",
    "tasks",
    "vqa_normalize",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"vlmoe.eval.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
