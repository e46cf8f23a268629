"""`vlmoe.compile_server`, the preload of the forkserver QuACK's compile workers fork from: the
server and its workers die with the process that started them, however it ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

_STARTER = """
import multiprocessing, os, time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import forkserver

context = multiprocessing.get_context("forkserver")
context.set_forkserver_preload(PRELOAD)
pool = ProcessPoolExecutor(1, mp_context=context)  # as QuACK's executor: never shut down here
worker = pool.submit(os.getpid).result()
print(worker, forkserver._forkserver._forkserver_pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its reaping is left


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_the_server_and_its_workers_die_with_the_process_that_started_them(how):
    starter = _start(["vlmoe.compile_server"])
    try:
        worker, server = map(int, starter.stdout.readline().split())
        assert _alive(worker) and _alive(server) and worker != server
        starter.send_signal(how)
        starter.wait(timeout=30)
        deadline = time.monotonic() + 20
        while (_alive(worker) or _alive(server)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(server), "the compile server outlived its process"
        assert not _alive(worker), "a compile worker outlived its process"
    finally:
        if starter.poll() is None:
            starter.kill()
        for pid in locals().get("worker", None), locals().get("server", None):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_without_it_a_worker_outlives_a_killed_process():
    # Why the module exists: a ProcessPoolExecutor worker waits on its queue forever (it holds
    # both ends), and keeps the forkserver alive with it.
    starter = _start([])
    try:
        worker, server = map(int, starter.stdout.readline().split())
        starter.kill()
        starter.wait(timeout=30)
        time.sleep(1.0)
        assert _alive(worker) and _alive(server)
    finally:
        for pid in locals().get("worker", None), locals().get("server", None):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _start(preload):
    code = f"PRELOAD = {preload!r}\n" + _STARTER
    # stderr: the killed process's resource tracker reports its semaphores on the way out
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
