"""Durable, private file writes shared by config, credentials, status, schedule records and spool."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import sys
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
# Linux only: start writing a file's dirty pages now, and wait for a whole filesystem.
_sync_file_range = getattr(_libc, "sync_file_range", None) if sys.platform == "linux" else None
_syncfs = getattr(_libc, "syncfs", None) if sys.platform == "linux" else None
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
if _syncfs is not None:
    _syncfs.argtypes = [ctypes.c_int]
_SYNC_FILE_RANGE_WRITE = 2


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


def make_private_dirs(path: Path) -> None:
    """``path`` and its missing parents, each 0700 whatever the umask.

    ``Path.mkdir(parents=True, mode=…)`` gives the parents the umask's default instead: under a
    umask like 0277 they come out 0500, and the next directory down cannot be created in them.
    """
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
            os.chmod(d, 0o700)


def write_atomic(path: Path, data: bytes | str, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: ``mode`` (private by default) from the first byte, fsync'd,
    atomic rename.

    Readers see the old file or the new one, never a torn one. The mode argument of ``open`` is only
    ever narrowed by the umask; the fchmod undoes a umask that would remove the owner's own bits.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    make_private_dirs(path.parent)
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


def start_writeback(fd: int) -> None:
    """Send a just-written file towards the disk; ``sync_filesystem`` later waits for all of them.

    On Linux this only starts the writes (the disk works while the restore goes on, and the final
    wait is short); elsewhere it is an fsync, which ``sync_filesystem``'s cache flush makes durable.
    """
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a hint: an error changes nothing
    else:
        os.fsync(fd)


def sync_filesystem(path: Path) -> None:
    """Make everything written so far on ``path``'s filesystem survive a power cut.

    Linux: syncfs (that filesystem only). macOS: F_FULLFSYNC, which also empties the drive's own
    write cache, after the per-file fsyncs of ``start_writeback``. Elsewhere, or where those are
    refused (a sandbox's seccomp, a network mount): sync.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs is not None:
            if _syncfs(fd) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
                raise OSError(err, os.strerror(err), str(path))
        elif flush_device(fd):
            return
        os.sync()
    finally:
        os.close(fd)


def flush_device(fd: int) -> bool:
    """macOS: F_FULLFSYNC on ``fd`` (its file, then the drive's write cache, so everything fsync'd
    before on that drive too). False where there is no such thing or the filesystem refuses it."""
    import fcntl

    full = getattr(fcntl, "F_FULLFSYNC", None)
    if full is None:
        return False
    try:
        fcntl.fcntl(fd, full)
    except OSError:
        return False
    return True


def sync_renames(directories: list[Path]) -> None:
    """Make renames into ``directories`` survive a power cut (each fsync'd; on macOS the drive's
    cache flushed too, which a plain fsync there does not do)."""
    for d in directories:
        fsync_dir(d, strict=False)
    if directories:
        with contextlib.suppress(OSError):
            fd = os.open(directories[0], os.O_RDONLY)
            try:
                flush_device(fd)
            finally:
                os.close(fd)
