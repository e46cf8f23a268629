"""Imported by the forkserver that QuACK's compile workers fork from (`vlmoe.moe.kernels.quack_gemm`
names it in COMPILE_SERVER_PRELOAD), before anything else there.

The server and its workers must not outlive the training process. Python's forkserver exits
once every holder of its "alive" pipe has gone, but a ProcessPoolExecutor worker holds that pipe
and both ends of its own task queue, so a worker whose parent was killed (SIGKILL, torchrun's
SIGTERM, a Jupyter kernel restart) waits on its queue forever, and keeps the server alive with
it. So the server asks Linux to kill it when the process that started it dies, and every
process forked from it asks the same of the server. Then it runs QuACK's own preload (torch and
the CUTLASS DSL imported once, GPU-blind) for the workers to inherit.

This module sits at the package's top level so that importing it imports nothing else of vlmoe
(`vlmoe/__init__.py` loads lazily): the server must not touch CUDA before it forks.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> bool:
    """Have the kernel send this process SIGKILL when its parent thread exits (Linux only). The
    server is started from the training process's main thread (quack_gemm starts it from no
    other), so it lives as long as that process."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if armed and os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(0)
    return armed


die_with_parent()
os.register_at_fork(after_in_child=die_with_parent)  # every worker, with the server as its parent

# QuACK's preload: its environment, then the imports. Without QuACK there is nothing to preload
# (its pool never runs then; only the test imports this module).
with contextlib.suppress(ImportError):
    import quack.cache._pool_preload  # noqa: F401
