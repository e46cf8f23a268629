"""Program-of-Thought sandbox: run untrusted model-written Python and get what it printed.

Layers, each enough for some attacks and together meant for all the tests name:
1. a separate process (`python -I -S`: no site, no user paths, no environment) in its own
   process group, started in a fresh temporary directory, killed as a group on timeout;
2. kernel limits, set by the child before it reads the program: CPU seconds, address space,
   file size (also caps what it prints, since stdout/stderr go to files), open files, processes;
3. when we are root and the interpreter is readable by others, a throwaway user id, so file
   permissions and the process limit bind (root ignores RLIMIT_NPROC);
4. inside the child (`sandbox_child.py`): only allow-listed modules, all loaded before an audit
   hook that ends the process on any other import, any file opened outside its directory, and
   any process, socket, os or introspection event (fork, exec, system, connect, ...).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ALLOWED_MODULES = (
    "math",
    "statistics",
    "fractions",
    "decimal",
    "itertools",
    "functools",
    "collections",
    "re",
    "json",
    "datetime",
    "operator",
    "numbers",
    "string",
)
Status = Literal["ok", "error", "timeout", "killed", "forbidden"]
_CHILD_SOURCE = (Path(__file__).with_name("sandbox_child.py")).read_text()
_FORBIDDEN_EXIT, _OUT_OF_MEMORY_EXIT = 3, 5
# Throwaway user ids for the child, far above any real account; one per run.
_SANDBOX_UID_BASE = 1_500_000_000
_run_counter = itertools.count()


@dataclass(frozen=True)
class ProgramResult:
    """How a sandboxed program ended and what it printed (stdout, capped)."""

    status: Status
    stdout: str
    message: str = ""  # why it did not end "ok": the exception, the forbidden action, the limit
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_program(
    code: str,
    timeout_s: float = 5.0,
    *,
    memory_mb: int = 512,
    max_output_bytes: int = 64_000,
    allowed_modules: tuple[str, ...] = ALLOWED_MODULES,
    interpreter: str | None = None,
) -> ProgramResult:
    """Run `code` in a sandboxed Python process and return its printed output and status.

    Status is "ok" (ran to the end), "error" (raised; message names the exception), "timeout"
    (wall clock or CPU limit), "killed" (memory or output limit, or a fatal signal) or
    "forbidden" (tried an import, file, process, socket or os action outside the sandbox).
    Never raises for anything the program does. `interpreter` is the Python that runs the
    child (default: this one); under root, pick one other users can read (e.g. /usr/bin/python3)
    so the child can run under a throwaway user id.

    Example:
        >>> run_program("import math\\nprint(math.sqrt(16) + 1)").stdout
        '5.0\\n'
        >>> run_program("import os").status
        'forbidden'
    """
    unknown = sorted(set(allowed_modules) - set(ALLOWED_MODULES))
    if unknown:
        raise ValueError(
            f"run_program: allowed_modules {unknown} are not in the vetted list {list(ALLOWED_MODULES)}; "
            "remove them (the sandbox only vouches for pure-computation modules)"
        )
    started = time.monotonic()
    try:
        source = code.encode()
    except UnicodeEncodeError as error:  # a lone surrogate, e.g. from a "\\ud800" escape in a JSON file
        return ProgramResult(
            status="error", stdout="", message=f"the program is not valid text, so it was not run ({error})"
        )
    # Set by the child itself before anything else runs (no preexec_fn: it is unsafe in a
    # multi-threaded parent such as one running torch).
    cpu_s = int(timeout_s) + 1
    limits = json.dumps(
        {
            "RLIMIT_CPU": [cpu_s, cpu_s + 1],  # SIGXCPU, then SIGKILL
            "RLIMIT_AS": [memory_mb * 2**20] * 2,
            "RLIMIT_FSIZE": [max_output_bytes + 1] * 2,  # stdout/stderr are files: +1 shows the overflow
            "RLIMIT_NOFILE": [16, 16],
            "RLIMIT_NPROC": [1, 1],  # no fork; binds unless the child is still root
            "RLIMIT_CORE": [0, 0],
        }
    )
    interpreter = interpreter or sys.executable
    uid = _sandbox_uid(interpreter)
    private_dir = Path(tempfile.mkdtemp(prefix="vlmoe-pot-io-"))  # 0700: the child cannot open it
    work_dir = Path(tempfile.mkdtemp(prefix="vlmoe-pot-"))
    try:
        if uid is not None:
            os.chown(work_dir, uid, uid)
        stdout_path, stderr_path = private_dir / "stdout", private_dir / "stderr"
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                [
                    interpreter,
                    "-I",
                    "-S",
                    "-c",
                    _CHILD_SOURCE,
                    str(work_dir),
                    ",".join(allowed_modules),
                    limits,
                ],
                stdin=subprocess.PIPE,
                stdout=stdout,
                stderr=stderr,
                cwd=work_dir,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                start_new_session=True,  # its own process group, killed as one
                close_fds=True,
                **({"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}),
            )
            timed_out = _feed_and_wait(process, source, timeout_s)
        printed = stdout_path.read_bytes()
        errors = stderr_path.read_bytes()[-4000:].decode(errors="replace").strip()
    finally:
        shutil.rmtree(private_dir, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
    seconds = time.monotonic() - started
    stdout_text = printed[:max_output_bytes].decode(errors="replace")
    status, message = _classify(
        process.returncode, timed_out, len(printed), errors, timeout_s, memory_mb, max_output_bytes
    )
    return ProgramResult(status=status, stdout=stdout_text, message=message, seconds=seconds)


def _feed_and_wait(process: subprocess.Popen, source: bytes, timeout_s: float) -> bool:
    """Send the program, wait; on timeout kill the whole process group. True if it timed out."""
    try:
        process.communicate(source, timeout=timeout_s)
        return False
    except subprocess.TimeoutExpired:
        _kill_group(process)
        return True
    except BaseException:  # e.g. KeyboardInterrupt in the evaluator: leave nothing running
        _kill_group(process)
        raise


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # pgid == pid: start_new_session
    process.kill()
    process.wait()


def _classify(
    returncode: int,
    timed_out: bool,
    printed_bytes: int,
    errors: str,
    timeout_s: float,
    memory_mb: int,
    max_output_bytes: int,
) -> tuple[Status, str]:
    last_error = errors.splitlines()[-1] if errors else ""
    if timed_out:
        return "timeout", f"ran longer than the {timeout_s:g} s wall-clock limit"
    if returncode == -signal.SIGXCPU:
        return "timeout", "used up its CPU-time limit"
    if printed_bytes > max_output_bytes:
        return "killed", f"printed more than the {max_output_bytes}-byte output limit"
    if returncode == _FORBIDDEN_EXIT:
        return "forbidden", last_error
    if returncode == _OUT_OF_MEMORY_EXIT:
        return "killed", f"exceeded the {memory_mb} MB memory limit"
    if returncode == 0:
        return "ok", ""
    if returncode < 0:
        return "killed", f"killed by {signal.Signals(-returncode).name}"
    return "error", last_error or f"exited with status {returncode}"


@functools.cache
def _can_switch_user(interpreter: str) -> bool:
    """True when we are root and a throwaway uid can run the interpreter (checked once)."""
    if os.geteuid() != 0:
        return False
    uid = _SANDBOX_UID_BASE
    try:
        probe = subprocess.run(
            [interpreter, "-I", "-S", "-c", "pass"],
            user=uid,
            group=uid,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):  # e.g. the interpreter lives under /root
        return False
    return probe.returncode == 0


def _sandbox_uid(interpreter: str) -> int | None:
    if not _can_switch_user(interpreter):
        return None
    # Distinct per process and run, so RLIMIT_NPROC=1 counts only this child.
    return _SANDBOX_UID_BASE + 1 + (os.getpid() % 100_000) * 1000 + next(_run_counter) % 1000
