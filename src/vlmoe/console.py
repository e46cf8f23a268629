"""The one rich console that vlmoe's live displays share in a process.

A training run draws its stage's progress bar (`vlmoe.train`), and the first step on QuACK draws
its own bar for each expert-matmul problem it tunes (`vlmoe.moe.kernels.quack_gemm`), from inside
that step. Two live displays on two consoles would both redraw the same terminal lines; on one
console rich (>= 14) stacks the inner one under the outer one. So a caller that owns a live
display shares its console for that time (`sharing`), and the kernels draw on `shared_console()`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from rich.console import Console

_shared: Console | None = None


@functools.cache
def _stderr_console() -> Console:
    return Console(stderr=True)


def shared_console() -> Console:
    """The console shared now (`sharing`), else one on stderr, beside the log."""
    return _shared if _shared is not None else _stderr_console()


@contextlib.contextmanager
def sharing(console: Console) -> Iterator[Console]:
    """`console` as the shared one inside the block (the one before it again after)."""
    global _shared
    before, _shared = _shared, console
    try:
        yield console
    finally:
        _shared = before
