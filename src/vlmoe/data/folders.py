"""Output folders checked where a command reads its option, before anything is computed or written.

A path that names a regular file (or lies under one) would otherwise end in `FileExistsError` or
`NotADirectoryError` from deep inside a save, after minutes of work.
"""

from __future__ import annotations

from pathlib import Path


def output_folder(path: str | Path, option: str = "--out") -> Path:
    """`path` as a folder a command may create or write into; a ValueError with the fix if it cannot be.

    Nothing is created: the folder is made when the first file is written.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> output_folder(folder / "new") == folder / "new"
        True
        >>> _ = (folder / "notes.txt").write_text("")
        >>> output_folder(folder / "notes.txt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --out .../notes.txt is a file; pass a folder
    """
    path = Path(path)
    for existing in (path, *path.parents):
        if existing.is_dir():
            break
        if existing.exists():
            where = "is a file" if existing == path else f"is inside {existing}, which is a file"
            raise ValueError(f"{option} {path} {where}; pass a folder")
    return path
