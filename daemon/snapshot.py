"""Consistent copies of SQLite databases while their owner keeps writing."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import structlog

from .errors import BackupError, IntegrityError

log = structlog.get_logger(__name__)

# The modes a file itself records (the rest, e.g. "truncate", are per connection and read as
# "delete" from the file).
JOURNAL_MODES = ("wal", "delete")


def _snapshot(src: Path, dest: Path) -> tuple[int, str]:
    dest.unlink(missing_ok=True)
    # Read-only URI: the snapshot never writes into the live database (no checkpoint, no -shm
    # creation beyond what WAL readers need).
    source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=30)
    try:
        mode = str(source.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        target = sqlite3.connect(dest)
        try:
            # pages=-1 copies in one step under one read transaction: in WAL mode that does not
            # block the writer, and a one-step copy never restarts when the writer commits.
            source.backup(target, pages=-1)
            target.execute("PRAGMA journal_mode=DELETE")
            result = target.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                raise IntegrityError(f"snapshot of {src.name} failed its quick_check: {result}")
        finally:
            target.close()
    finally:
        source.close()
    return dest.stat().st_size, mode


async def snapshot_database(src: Path, dest: Path) -> tuple[int, str]:
    """Copy ``src`` to ``dest`` with SQLite's online backup API; returns (size in bytes, the
    journal mode ``src`` was in).

    The copy is self-contained (rollback-journal mode, no -wal beside it), so `sqlite3 state.db`
    opens it anywhere; a restore puts it back in the recorded mode (see ``set_journal_mode``).
    """
    if not await asyncio.to_thread(src.exists):
        raise BackupError(f"database {src} does not exist", "check `root` in the config")
    try:
        return await asyncio.to_thread(_snapshot, src, dest)
    except sqlite3.Error as exc:
        raise BackupError(
            f"could not snapshot {src.name}: {exc}", "check that the file is a SQLite database"
        ) from None


def integrity_check(db: Path) -> str:
    """``PRAGMA integrity_check`` on a file nobody else has open.

    A read-write connection on purpose: a read-only one cannot remove the ``-wal``/``-shm`` it makes
    for a WAL-mode file, and a restore must never leave a WAL beside the database it put in place.
    """
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("PRAGMA integrity_check(20)").fetchall()
    except sqlite3.DatabaseError as exc:
        return f"the file does not open as a database: {exc}"
    finally:
        conn.close()
    return "ok" if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows[:5])


def set_journal_mode(db: Path, mode: str) -> None:
    """Put a database nobody else has open into ``mode`` (e.g. back into WAL after a restore).

    Backups store the database in rollback-journal mode, but tinyserved's is in WAL mode, and the
    mode lives in the file: restored as stored, it would stay in rollback mode unless tinyserved
    asks for WAL at every start, and WAL shipping would wait for it forever. Closing the only
    connection checkpoints and removes the -wal/-shm it made, so nothing is left beside the file.
    """
    if mode not in JOURNAL_MODES:  # it comes from a manifest: never into SQL unchecked
        raise ValueError(f"unsupported journal mode {mode!r}")
    try:
        conn = sqlite3.connect(db)
        try:
            got = str(conn.execute(f"PRAGMA journal_mode={mode}").fetchone()[0]).lower()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise IntegrityError(f"{db.name} could not be put in {mode} journal mode: {exc}") from None
    if got != mode:
        raise IntegrityError(f"{db.name} could not be put in {mode} journal mode (it stays {got})")
