"""The program run inside the Program-of-Thought sandbox process (see `sandbox.py`).

`run_program` passes this file's text to `python -I -S -c`, with argv `[sandbox_dir,
allowed_modules, limits]` and the untrusted program on stdin; importing this module does nothing. Order
matters: everything the program may use is imported *before* the audit hook goes in, so after it
no import, no file outside the sandbox directory and no process/socket/os call is possible; a
forbidden action ends the process at once with exit code 3 (the program cannot catch it).

The program can reach Python objects it should not (stdlib modules leak `sys`), and it can
rebind builtins and module globals. So the audit hook reads nothing mutable at call time: every
name it uses is bound once in `make_audit_hook`'s closure, shared with no other function, and it
only calls C functions and methods of built-in types. Frames, the only way to reach that closure,
are refused (`sys._getframe` raises, `tb_frame`/`gi_frame` are audited reads and forbidden).

Exit codes: 0 ran to the end, 1 the program raised, 3 forbidden action, 5 out of memory.
"""

import builtins
import json
import os
import resource
import sys

FORBIDDEN, OUT_OF_MEMORY = 3, 5
# Imported lazily by allowed modules (datetime.strptime -> _strptime, functools.singledispatch ->
# types, weakref): preloaded and importable too, since none of them can act outside the process.
INTERNAL_MODULES = ("_strptime", "collections.abc", "types", "weakref")
# Audit events a pure computation may raise; every other event is a forbidden action.
ALLOWED_EVENTS = frozenset(
    {
        "exec",
        "compile",
        "time.sleep",
        "builtins.id",
        "array.__new__",
        "function.__new__",
        "object.__setattr__",
        "object.__delattr__",
        "sys.unraisablehook",
        "cpython._PySys_ClearAuditHooks",  # interpreter shutdown (normally skipped by _exit)
        "cpython.PyInterpreterState_Clear",
    }
)
# Refused with an exception the caller may catch (collections.namedtuple tolerates ValueError).
REFUSED_EVENTS = frozenset({"sys._getframe", "sys._getframemodulename"})


def make_audit_hook(root: str):
    """The hook; `root` is the sandbox directory (already a real path)."""
    allowed, refused = ALLOWED_EVENTS, REFUSED_EVENTS
    write, exit_now, stat_of = os.write, os._exit, os.stat
    str_type, bytes_type, type_of, is_instance = str, bytes, type, isinstance
    str_concat, bytes_decode = str.__add__, bytes.decode
    os_error, value_error = OSError, ValueError
    prefix = root + "/"

    def inside_sandbox(path) -> bool:
        if type_of(path) is bytes_type:
            path = bytes_decode(path, "utf-8", "replace")
        elif is_instance(path, str_type):
            path = str_concat("", path)  # an exact str: a subclass could override its methods
        else:
            return False  # file descriptors, path-likes
        if not path.startswith("/"):
            path = prefix + path
        parts: list = []
        for part in path.split("/"):  # ".." resolved as text: nothing in the sandbox is a link
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        resolved = "/" + "/".join(parts)
        if resolved != root and not resolved.startswith(prefix):
            return False
        try:
            kind = stat_of(resolved).st_mode & 0o170000
        except os_error:
            return True  # a new file
        # A device node made in the sandbox (mknod is not audited) must not open the host's disks.
        return kind == 0o100000 or kind == 0o040000  # regular file or directory

    def audit(event: str, args: tuple) -> None:
        if event in allowed:
            return
        if event in refused:
            raise value_error("call frames are not available in the sandbox")
        if event == "open" and inside_sandbox(args[0]):
            return
        shown = ""  # the first plain str/bytes argument (a path, an attribute); never repr() objects
        for arg in args:
            if type_of(arg) is str_type or type_of(arg) is bytes_type:
                shown = arg
                break
        write(2, f"forbidden: {event} {shown!r}\n".encode("utf-8", "replace"))
        exit_now(FORBIDDEN)

    return audit


def make_import(allowed_names: frozenset, modules: dict):
    """`__import__` serving only preloaded allowed modules from sys.modules; never loads from disk."""
    importable = allowed_names | frozenset(INTERNAL_MODULES)
    listed = ", ".join(sorted(allowed_names))
    write, exit_now = os.write, os._exit

    def restricted_import(name, globals=None, locals=None, fromlist=(), level=0):
        top = name.partition(".")[0]
        if level != 0 or top not in importable or name not in modules or top not in modules:
            write(2, f"forbidden: import {name!r} (allowed: {listed})\n".encode("utf-8", "replace"))
            exit_now(FORBIDDEN)
        return modules[name] if fromlist else modules[top]

    return restricted_import


def main(sandbox_dir: str, allowed_names: frozenset, limits: dict) -> None:
    for name, (soft, hard) in limits.items():  # resource limits first, before any input is read
        resource.setrlimit(getattr(resource, name), (soft, hard))
    source = sys.stdin.read()
    for name in sorted(allowed_names) + list(INTERNAL_MODULES):
        __import__(name)
    program = compile(source, "<program>", "exec")  # a SyntaxError ends here, as an error
    write, exit_now, stdout, stderr = os.write, os._exit, sys.stdout, sys.stderr

    def finish(exit_code: int, message: str = "") -> None:
        try:
            stdout.flush()
            stderr.flush()
        except BaseException as error:  # e.g. the output limit (EFBIG); the parent reports which
            exit_code, message = exit_code or 1, message or f"{type(error).__name__}: {error}"
        if message:
            write(2, (message + "\n").encode(errors="replace")[:2000])
        exit_now(exit_code)  # skips interpreter shutdown: nothing of the program runs after this

    builtins.__import__ = make_import(allowed_names, sys.modules)
    sys.addaudithook(make_audit_hook(os.path.realpath(sandbox_dir)))
    try:
        exec(program, {"__name__": "__main__", "__builtins__": builtins})
    except MemoryError:
        finish(OUT_OF_MEMORY, "MemoryError: the program ran out of its memory limit")
    except SystemExit as stop:
        clean = stop.code in (None, 0)
        finish(0 if clean else 1, "" if clean else f"SystemExit: {stop.code}")
    except BaseException as error:
        finish(1, f"{type(error).__name__}: {error}")
    finish(0)


if __name__ == "__main__":  # `python -c` runs this file's text as __main__
    main(sys.argv[1], frozenset(sys.argv[2].split(",")), json.loads(sys.argv[3]))
