"""Shared plumbing for the stand-in executables in this directory (stdlib only, imported by them).

Every stand-in appends one JSON line per invocation to ``$FAKE_CALLS_LOG`` (when set)::

    {"prog": "launchctl", "args": ["bootout", "gui/501/dev.tinyserve.daemon"], "pid": 1234, "time": 1.7e9}

and exits with a code chosen by the environment, most specific first:

    FAKE_<PROG>_EXIT_<SUBCOMMAND>   e.g. FAKE_LAUNCHCTL_EXIT_BOOTSTRAP=5, FAKE_TINYSERVED_CTL_EXIT_START=1
    FAKE_<PROG>_EXIT                e.g. FAKE_SYSTEMCTL_EXIT=1

``<PROG>``/``<SUBCOMMAND>`` are upper-cased with every non-alphanumeric character turned into ``_``
(``tinyserved-ctl`` → ``TINYSERVED_CTL``).  ``FAKE_<PROG>_STDERR`` is printed to stderr when the chosen
exit code is non-zero.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Sequence

try:  # fcntl keeps concurrent writers' lines whole; it exists everywhere these fakes run
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def env_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", text).upper()


def append_json_line(path: str, record: dict[str, object]) -> None:
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
    finally:
        os.close(fd)


def record_call(prog: str, args: Sequence[str], extra_log: str | None = None) -> None:
    """Append this invocation to $FAKE_CALLS_LOG (and to ``extra_log`` when given)."""
    record: dict[str, object] = {"prog": prog, "args": list(args), "pid": os.getpid(), "time": time.time()}
    targets = [p for p in (os.environ.get("FAKE_CALLS_LOG"), extra_log) if p]
    for target in dict.fromkeys(targets):
        append_json_line(target, record)


def chosen_exit(prog: str, args: Sequence[str]) -> int:
    base = "FAKE_" + env_name(prog) + "_EXIT"
    subcommand = next((a for a in args if not a.startswith("-")), None)
    names = ([base + "_" + env_name(subcommand)] if subcommand else []) + [base]
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return 0


def finish(prog: str, args: Sequence[str], default_stdout: str = "") -> None:
    """Exit the way the environment asks (see module docstring)."""
    code = chosen_exit(prog, args)
    if code != 0:
        message = os.environ.get("FAKE_" + env_name(prog) + "_STDERR", f"{prog}: simulated failure")
        sys.stderr.write(message.rstrip("\n") + "\n")
    elif default_stdout:
        sys.stdout.write(default_stdout)
    sys.stdout.flush()
    sys.exit(code)
