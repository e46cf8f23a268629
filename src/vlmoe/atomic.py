"""Write a whole directory or nothing: build it beside its final place, then rename it in."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# What marks a directory as one this library (or transformers) wrote: one holding it may be replaced.
MODEL_MARKER = "config.json"


def check_replaceable(path: str | os.PathLike, marker: str = MODEL_MARKER, option: str = "") -> Path:
    """`path` if a directory written there may replace what is there: nothing, an empty
    directory, or a directory holding `marker` (a model folder saved before). A file, or a folder
    of other things, raises a ValueError naming the fix: replacing it would delete them.
    `option`: the command-line name of the path, put before it in the message (e.g. "DST").

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "notes.txt").write_text("mine")
        >>> check_replaceable(folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: ... holds other files (notes.txt) and no config.json: ...
    """
    path = Path(path)
    named = f"{option} {path}" if option else str(path)
    if path.is_dir():
        entries = sorted(entry.name for entry in path.iterdir())
        if entries and marker not in entries:
            raise ValueError(
                f"{named} holds other files ({first_names(entries)}) and no {marker}: writing a model "
                "there would replace the whole folder and delete them; pass a new or empty folder (or a "
                "model folder saved before, which is replaced)"
            )
    elif path.exists() or path.is_symlink():
        raise ValueError(f"{named} is a file, not a folder: pass a folder path for the model")
    else:
        existing = next(parent for parent in path.parents if parent.exists())
        if not existing.is_dir():  # the folder could not be made: mkdir's bare FileExistsError
            raise ValueError(
                f"{named} is inside {existing}, which is a file: pass a folder path for the model"
            )
    return path


def first_names(names: list[str]) -> str:
    """The first three of `names` and how many more, for a message about what would be deleted.

    Example:
        >>> first_names(["a", "b", "c", "d", "e"])
        'a, b, c and 2 more'
    """
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def deletes_source(path: str | os.PathLike, source: str | os.PathLike) -> str | None:
    """How replacing the folder `path` would delete the folder `source`: "is" (it is `source`),
    "holds" (`source` lies inside it), or None (it would not; a `path` inside `source` leaves
    `source` and its files in place). Written to be read in a message: f"{path} {how} {source}".

    Example:
        >>> deletes_source("/runs", "/runs/model"), deletes_source("/runs/model/moe", "/runs/model")
        ('holds', None)
    """
    target, source = Path(path).resolve(), Path(source).resolve()
    if target == source:
        return "is"
    return "holds" if target in source.parents else None


@contextmanager
def atomic_directory(path: str | os.PathLike, marker: str | None = MODEL_MARKER) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `path` when the block succeeds.

    A crash or an exception inside the block leaves `path` as it was (an old copy stays until
    the new one is in place) and removes the temporary directory. What is at `path` is checked
    before anything is written: it must be nothing, an empty directory or one holding `marker`
    (`check_replaceable`), so a typo cannot replace a folder of the user's own; `marker` None
    skips the check.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "model"
        >>> with atomic_directory(target) as temp:
        ...     _ = (temp / "config.json").write_text("{}")
        >>> sorted(p.name for p in target.iterdir())
        ['config.json']
    """
    path = Path(path)
    if marker is not None:
        check_replaceable(path, marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield temp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(temp, path)
            shutil.rmtree(old)
        else:
            os.replace(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """`write(temp)` into a temporary file beside `path`, then rename it over `path`, so a kill
    mid-write leaves the earlier file whole (a rerun over its old report, a resumed run's records).

    Example:
        >>> path = Path(tempfile.mkdtemp()) / "report.html"
        >>> write_atomically(path, lambda temp: temp.write_text("<html></html>"))
        >>> path.read_text(), sorted(p.name for p in path.parent.iterdir())
        ('<html></html>', ['report.html'])
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
