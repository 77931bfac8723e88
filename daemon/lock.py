"""One job per tinyserve root at a time: a file lock shared by the CLI and the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from . import paths
from .errors import LockError

log = structlog.get_logger(__name__)


def lock_path(root: Path) -> Path:
    return paths.state_dir() / "locks" / f"{paths.root_key(root)}.lock"


def _holder(path: Path, *, job: bool = True) -> str:
    """Who holds the lock at ``path``, as its file says: "<job> (pid N, since T)"."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    who = f"(pid {info.get('pid', '?')}, since {info.get('since', '?')})"
    return f"{info.get('job', 'a job')} {who}" if job else who


def _try_lock(path: Path, job: str) -> int | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(
        fd,
        json.dumps(
            {"pid": os.getpid(), "job": job, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        ).encode(),
    )
    return fd


@contextlib.asynccontextmanager
async def root_lock(root: Path, job: str, *, wait: float = 900.0, poll: float = 0.2) -> AsyncIterator[None]:
    """Hold the root's lock for the duration of a job, waiting at most ``wait`` seconds for it.

    flock is released by the kernel when the process dies, so a SIGKILLed job never leaves a
    stale lock behind.
    """
    path = lock_path(root)
    deadline = time.monotonic() + wait
    logged = False
    while True:
        fd = await asyncio.to_thread(_try_lock, path, job)
        if fd is not None:
            break
        if time.monotonic() >= deadline:
            raise LockError(
                f"another job holds the lock for {root}: {_holder(path)}; gave up after {wait:.0f} s"
            )
        if not logged:
            log.info("lock_wait", root=str(root), holder=_holder(path), wait_s=wait)
            logged = True
        await asyncio.sleep(poll)
    try:
        yield
    finally:
        _release(fd)


def _release(fd: int) -> None:
    """Empty the holder note, then let go (closing the descriptor drops the flock)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    with contextlib.suppress(OSError):
        os.close(fd)


def daemon_lock_path(root: Path) -> Path:
    return paths.state_dir() / "locks" / f"{paths.root_key(root)}.daemon"


def acquire_daemon_lock(root: Path) -> int:
    """One daemon per root, for the life of the process (the kernel drops it when the process
    dies): a second one would run every scheduled job twice. Returns the descriptor to keep open.
    """
    path = daemon_lock_path(root)
    fd = _try_lock(path, "daemon")
    if fd is None:
        raise LockError(
            f"another daemon already runs for {root}: {_holder(path, job=False)}",
            "one daemon per root: use the running one (`tinyserve-backup status`), or stop it first",
        )
    return fd


def release_daemon_lock(fd: int) -> None:
    _release(fd)
