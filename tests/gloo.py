"""Run a function on N CPU processes joined by gloo, and collect what each rank returns.

A file store under the test's tmp_path joins the processes: no TCP port, so parallel xdist
workers never collide.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, store: str, out: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)  # the CI machine has two cores for everything
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    # Every rank's connections up before any goes on: a function with no collective (a refusal)
    # let a fast rank finish and close its side while another was still connecting ("Gloo
    # connectFullMesh failed ... Connection closed by peer", seen once in a loaded full run).
    dist.barrier()
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable, world_size: int, tmp_path: Path, *args: Any) -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` gloo processes; the list of their results.

    `fn` runs in child processes (`start_method`); its result is saved with torch.save and loaded here.
    """
    out = Path(tempfile.mkdtemp(prefix=f"gloo-{fn.__name__}-", dir=tmp_path))
    mp.start_processes(
        _worker,
        args=(world_size, str(out / "store"), str(out), fn, args),
        nprocs=world_size,
        start_method=start_method(),
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def start_method() -> str:
    """fork where it is safe: the children need not import torch and vlmoe again (seconds per
    test). Once this process has used CUDA (a GPU machine running the whole suite), autograd's
    device threads make a forked child's backward fail, so the children are spawned instead."""
    return "spawn" if torch.cuda.is_initialized() else "fork"
