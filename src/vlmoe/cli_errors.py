"""How a `vlmoe` command ends on an error the user can fix: one line on stderr and exit code 1.

Its own module because both `vlmoe.cli` and `vlmoe.data.cli` use it, and `vlmoe.cli` imports
`vlmoe.data.cli`: kept in `vlmoe.cli`, the data commands could not import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer


@contextmanager
def reported(command: str) -> Iterator[None]:
    """End `vlmoe <command>` with one line and exit code 1 on what the user can fix, not a traceback:
    a ValueError (a RecipeError too) or any OSError (a missing file, no permission to write DST, a
    full disk). Other exceptions are bugs and keep their traceback.

    >>> with reported("demo"):  # stderr: vlmoe demo: No such file or directory (recipe.yaml)
    ...     raise FileNotFoundError(2, "No such file or directory", "recipe.yaml")
    Traceback (most recent call last):
    ...
    typer.exceptions.Exit
    """
    try:
        yield
    except (ValueError, OSError) as error:
        typer.echo(f"vlmoe {command}: {error_message(error)}", err=True)
        raise typer.Exit(code=1) from None


def error_message(error: Exception) -> str:
    """The error's text; an OSError raised by the system (errno set) as "<what> (<path>)".

    >>> error_message(IsADirectoryError(21, "Is a directory", "model/modules.json"))
    'Is a directory (model/modules.json)'
    """
    if not isinstance(error, OSError) or error.strerror is None:
        return str(error)  # vlmoe's own FileNotFoundError texts name the path and the fix
    paths = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    return f"{error.strerror} ({paths})" if paths else error.strerror
