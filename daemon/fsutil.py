"""Durable, private file writes shared by config, credentials, status, schedule records and spool."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def fsync_dir(directory: Path, *, strict: bool = True) -> None:
    """Make a rename or unlink in ``directory`` survive a power cut.

    ``strict=False`` ignores filesystems that cannot fsync a directory (some network mounts).
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: ``mode`` (private by default) from the first byte, fsync'd,
    atomic rename.

    Readers see the old file or the new one, never a torn one. The mode argument of ``open`` is only
    ever narrowed by the umask; the fchmod undoes a umask that would remove the owner's own bits.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent, strict=False)
