"""The stand-ins' shared notion of whether tinyserved is running.

``$FAKE_TINYSERVED_STATE`` names a file holding ``running`` or ``stopped``; launchctl, systemctl and
tinyserved-ctl stand-ins update it when they "stop"/"start" tinyserved, and ``tinyserve status``
reads it.  Unset, nothing is tracked and tinyserved counts as running.  A start with
``$FAKE_TINYSERVED_STARTING_FOR=N`` leaves ``starting N`` instead: the next N status calls see it
still coming up (each counts one down), like launchd returning before tinyserved is ready.
"""

from __future__ import annotations

import os

LABEL = "dev.tinyserve.daemon"


def set_state(value: str) -> None:
    path = os.environ.get("FAKE_TINYSERVED_STATE")
    if not path:
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(value + "\n")
    os.replace(tmp, path)


def get_state() -> str:
    path = os.environ.get("FAKE_TINYSERVED_STATE")
    if not path:
        return "running"
    try:
        with open(path) as fh:
            return fh.read().strip() or "running"
    except FileNotFoundError:
        return "running"


def started() -> None:
    """What a start leaves: running, or still coming up for $FAKE_TINYSERVED_STARTING_FOR status calls."""
    n = int(os.environ.get("FAKE_TINYSERVED_STARTING_FOR") or 0)
    set_state(f"starting {n}" if n > 0 else "running")


def observe() -> str:
    """The state a status call sees; a call while starting counts one down."""
    state = get_state()
    if state.startswith("starting"):
        left = int(state.split()[1]) - 1 if len(state.split()) > 1 else 0
        set_state(f"starting {left}" if left > 0 else "running")
        return "starting"
    return state
