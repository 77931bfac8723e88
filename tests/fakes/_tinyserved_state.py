"""The stand-ins' shared notion of whether tinyserved is running.

``$FAKE_TINYSERVED_STATE`` names a file holding ``running`` or ``stopped``; launchctl, systemctl and
tinyserved-ctl stand-ins update it when they "stop"/"start" tinyserved, and ``tinyserve status``
reads it.  Unset, nothing is tracked and tinyserved counts as running.
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
