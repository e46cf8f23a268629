"""Every example in the vlmoe.data docstrings runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import warnings

import pytest

MODULES = [
    "chart_agg",
    "chart_code",
    "chart_conversations",
    "chart_dataset",
    "chart_qa",
    "chart_record",
    "chart_render",
    "chart_text",
    "clustering",
    "collator",
    "conversations",
    "folders",
    "mixing",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(f"vlmoe.data.{name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reader's example warns about its bad sample, as it should
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
