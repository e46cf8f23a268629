"""vlmoe.console: the console live displays share, and its restoration."""

import io

from rich.console import Console

from vlmoe.console import shared_console, sharing


def test_sharing_sets_the_shared_console_inside_its_block_and_nests():
    default = shared_console()
    assert default is shared_console() and default.stderr
    outer, inner = Console(file=io.StringIO()), Console(file=io.StringIO())
    with sharing(outer):
        assert shared_console() is outer
        with sharing(inner):
            assert shared_console() is inner
        assert shared_console() is outer
    assert shared_console() is default


def test_sharing_restores_the_console_when_its_block_raises():
    default = shared_console()
    try:
        with sharing(Console(file=io.StringIO())):
            raise KeyError("stop")
    except KeyError:
        pass
    assert shared_console() is default
