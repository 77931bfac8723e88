"""The record of the last restore's renames, per root: what `restore --undo` works from.

A restore renames the live items aside (``*.pre-restore``) and the staged ones in. Before the first
rename it writes the whole plan here (state ``swapping``, fsync'd), and once the restore stands it
replaces that with what it kept aside (state ``done``). An undo writes its own plan first (state
``undoing``). So whatever stops the process half-way (a crash, a power cut, a kill), the next
command finds which renames were planned, works out from the disk which of them happened, and
either rolls them back (an interrupted restore) or finishes them (an interrupted undo). Until then
no other restore and no clean-up may touch the root: both would mix two states for good.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import paths
from .errors import RestoreError
from .fsutil import fsync_dir, write_atomic

SWAPPING = "swapping"
DONE = "done"
UNDOING = "undoing"
_STATES = (SWAPPING, DONE, UNDOING)


@dataclass
class RestoreRecord:
    state: str
    backup: str  # "full/2026-01-10T03-00-00Z", or "point-in-time 2026-…Z"
    at: str  # when the restore (or undo) began, RFC 3339
    # swapping / undoing: every rename planned, in order (absolute paths, as strings)
    moves: list[list[str]] = field(default_factory=list)
    # done: per replaced item, its root-relative name and what was kept aside for it
    items: list[dict[str, Any]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # done: images the restore loaded
    # swapping: the record this restore replaces, put back if it is rolled back
    previous: dict[str, Any] | None = None
    undone_dir: str | None = None  # undoing: where the restored items go
    root: str = ""  # the root as spelled when written (the paths above start with it)
    # swapping: the staged items among the moves' sources; gone once a failed restore cleaned up
    staged: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RestoreRecord:
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        rec = cls(**known)
        if rec.state not in _STATES:
            raise ValueError(f"unknown state {rec.state!r}")
        pairs = all(
            isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m) for m in rec.moves
        )
        items = all(
            isinstance(i, dict) and isinstance(i.get("rel"), str) and isinstance(i.get("kept", []), list)
            for i in rec.items
        )
        if not (isinstance(rec.moves, list) and isinstance(rec.items, list) and pairs and items):
            raise ValueError("its renames or items are malformed")
        return rec

    @property
    def interrupted(self) -> bool:
        return self.state in (SWAPPING, UNDOING)


def record_path(root: Path) -> Path:
    # Beside the status file and the lock, not in the root: the root is what gets backed up and
    # compared, and a restore into it must leave exactly the backup's files there.
    return paths.state_dir() / "restores" / f"{paths.root_key(root)}.json"


def read_record(root: Path) -> RestoreRecord | None:
    path = record_path(root)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RestoreError(
            f"cannot read {path}: {exc.strerror or exc}", "check its permissions, then try again"
        ) from None
    try:
        return RestoreRecord.from_dict(json.loads(data))
    except (ValueError, TypeError, AttributeError) as exc:
        raise RestoreError(
            f"{path} is damaged ({exc}); it says which renames the last restore made",
            f"compare the *.pre-restore items in {root} by hand (README: going back by hand), then "
            "remove that file",
        ) from None


def write_record(root: Path, rec: RestoreRecord) -> None:
    write_atomic(record_path(root), json.dumps(rec.to_dict(), indent=1) + "\n")


def put_back_record(root: Path, rec: dict[str, Any] | RestoreRecord | None) -> None:
    """Make ``rec`` the record again (None: no record), e.g. after a restore rolled back."""
    if rec is None:
        path = record_path(root)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            fsync_dir(path.parent, strict=False)
        return
    write_record(root, rec if isinstance(rec, RestoreRecord) else RestoreRecord.from_dict(rec))


def check_not_interrupted(root: Path) -> None:
    """Refuse to go on over a root that an interrupted restore or undo left half-swapped."""
    rec = read_record(root)
    if rec is not None and rec.interrupted:
        what, then = (
            ("restore", "to put it back") if rec.state == SWAPPING else ("undo of a restore", "to finish it")
        )
        raise RestoreError(
            f"an interrupted {what} ({rec.backup}, {rec.at}) left {root} half-swapped",
            f"run `tinyserve-backup restore --undo` {then} first",
        )
