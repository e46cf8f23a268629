import doctest
import importlib

import pytest

MODULES = [
    "vlmoe.models.tiny",
    "vlmoe.models.tokenizer",
    "vlmoe.models.families",
    "vlmoe.models.surgery",
    "vlmoe.models.mole",
    "vlmoe.models.parts",
    "vlmoe.models.checkpoint",
    "vlmoe.models.export",
]


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
