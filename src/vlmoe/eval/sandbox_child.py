"""The program run inside the Program-of-Thought sandbox process (see `sandbox.py`).

Not imported by vlmoe: `run_program` passes this file's text to `python -I -S -c`, with argv
`[sandbox_dir, allowed_modules]` and the user's program on stdin. Order matters: everything the
program may use is imported *before* the audit hook goes in, so after it no import, no file
outside the sandbox directory and no process/socket/os call is possible; a forbidden action ends
the process at once with exit code 3 (the program cannot catch it and carry on).

Exit codes: 0 ran to the end, 1 the program raised, 3 forbidden action, 5 out of memory.
"""

import builtins
import os
import stat
import sys

FORBIDDEN, OUT_OF_MEMORY = 3, 5
# Imported lazily by allowed modules (datetime.strptime -> _strptime, functools.singledispatch ->
# types, weakref): preloaded and importable too, since none of them can act outside the process.
_INTERNAL_MODULES = ("_strptime", "collections.abc", "types", "weakref")
# Audit events a pure computation may raise; every other event is a forbidden action.
_ALLOWED_EVENTS = frozenset(
    {
        "exec",
        "compile",
        "time.sleep",
        "builtins.id",
        "array.__new__",
        "function.__new__",
        "object.__setattr__",
        "object.__delattr__",
        "sys._getframe",  # collections.namedtuple reads its caller's module name
        "sys.unraisablehook",
        "cpython._PySys_ClearAuditHooks",  # interpreter shutdown (normally skipped by _exit)
        "cpython.PyInterpreterState_Clear",
    }
)

sandbox_dir, allowed_names = sys.argv[1], frozenset(sys.argv[2].split(","))
source = sys.stdin.read()
for _name in sorted(allowed_names) + list(_INTERNAL_MODULES):
    __import__(_name)
program = compile(source, "<program>", "exec")

_write, _exit, _realpath, _join, _sep, _stat = (
    os.write,
    os._exit,
    os.path.realpath,
    os.path.join,
    os.sep,
    os.stat,
)
_is_plain = (stat.S_ISREG, stat.S_ISDIR)
importable = allowed_names | frozenset(_INTERNAL_MODULES)
_modules, _stdout, _stderr = sys.modules, sys.stdout, sys.stderr
_root = _realpath(sandbox_dir)


def _forbid(what: str) -> None:
    _write(2, f"forbidden: {what}\n".encode(errors="replace")[:2000])
    _exit(FORBIDDEN)


def _inside_sandbox(path: object) -> bool:
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    if not isinstance(path, str):  # file descriptors and path-likes we did not expect
        return False
    resolved = _realpath(_join(_root, path))
    if resolved != _root and not resolved.startswith(_root + _sep):
        return False
    try:
        mode = _stat(resolved).st_mode
    except OSError:
        return True  # a new file
    # A device node made in the sandbox (mknod is not audited) must not open the host's disks.
    return any(check(mode) for check in _is_plain)


def _audit(event: str, args: tuple) -> None:
    if event in _ALLOWED_EVENTS:
        return
    if event == "open" and _inside_sandbox(args[0]):
        return
    _forbid(f"{event} {args!r}"[:500])


def _import(name, globals=None, locals=None, fromlist=(), level=0):
    # Only preloaded, allowed modules, from sys.modules: nothing is ever loaded from disk.
    top = name.partition(".")[0]
    if level != 0 or top not in importable or name not in _modules or top not in _modules:
        _forbid(f"import {name!r} (allowed: {', '.join(sorted(allowed_names))})")
    return _modules[name] if fromlist else _modules[top]


builtins.__import__ = _import
sys.addaudithook(_audit)
namespace = {"__name__": "__main__", "__builtins__": builtins}
del os, stat, sys  # not reachable by name from the program's namespace


def _finish(exit_code: int, message: str = "") -> None:
    try:
        _stdout.flush()
        _stderr.flush()
    except BaseException as error:  # e.g. the output limit (EFBIG); the parent reports which
        exit_code, message = exit_code or 1, message or f"{type(error).__name__}: {error}"
    if message:
        _write(2, (message + "\n").encode(errors="replace")[:2000])
    _exit(exit_code)  # skips interpreter shutdown: nothing of the program runs after this


try:
    exec(program, namespace)
except MemoryError:
    _finish(OUT_OF_MEMORY, "MemoryError: the program ran out of its memory limit")
except SystemExit as stop:
    _finish(0 if stop.code in (None, 0) else 1, "" if stop.code in (None, 0) else f"SystemExit: {stop.code}")
except BaseException as error:
    _finish(1, f"{type(error).__name__}: {error}")
_finish(0)
