"""Streaming tar archives: create (tar → zstd/gzip → optional encryption), extract safely, verify.

Everything heavy runs in one dedicated worker thread per stream; bytes cross to and from the event
loop through small bounded channels, so memory stays bounded whatever the data size and the loop
never blocks on disk, compression or hashing.

Archives are plain PAX tar files that GNU/BSD tar, ``zstd`` and ``gzip`` read by hand:

    zstd -dc configs.tar.zst | tar -xf -        # or: tar --zstd -xf configs.tar.zst
    tar -xzf configs.tar.gz

Extraction treats every archive as hostile (see ``extract_stream``).
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import hashlib
import os
import stat
import tarfile
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypeVar, cast

import structlog
import zstandard

from daemon.errors import BackupError, EncryptionError, IntegrityError, RestoreError, UnsafeArchiveError
from daemon.fsutil import start_writeback
from daemon.streams import CHUNK, zstd_compressor

log = structlog.get_logger(__name__)

Codec = Literal["zstd", "gzip", "none"]
CODECS: tuple[Codec, ...] = ("zstd", "gzip", "none")
ARCHIVE_SUFFIX: dict[Codec, str] = {"zstd": ".tar.zst", "gzip": ".tar.gz", "none": ".tar"}

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
AGE_MAGIC = b"age-encryption.org/"

DEFAULT_CHUNK_SIZE = CHUNK
DEFAULT_QUEUE_CHUNKS = 4
_READ_SIZE = CHUNK
_MAX_SINGLE_READ = 64 << 20  # far beyond any real tar header, short of a memory problem
_PROGRESS_INTERVAL = 0.1
_WORKER_JOIN_TIMEOUT = 30.0
_ZEROS = bytes(_READ_SIZE)
_DIRECT_WRITE = 64 * 1024
_PENDING_MAX = 256 * 1024

_T = TypeVar("_T")


class Writer(Protocol):
    """What the optional encryption hook wraps and returns."""

    def write(self, data: bytes | bytearray | memoryview, /) -> object: ...

    def close(self) -> None: ...


# encrypt(sink) -> writer: archive_stream writes compressed bytes to the returned writer and calls
# its close() at the end, which must push the remaining ciphertext into `sink` (sink.close() is a
# no-op, so closing it is harmless).  Runs in the worker thread.
Encryptor = Callable[[Writer], Writer]
ProgressCallback = Callable[[int], None]


def suffix_for(codec: Codec) -> str:
    return ARCHIVE_SUFFIX[codec]


def codec_for_name(name: str) -> Codec | None:
    """Codec implied by an object name (``services.tar.gz`` → gzip); None when unknown."""
    lowered = name.lower()
    if lowered.endswith((".tar.zst", ".tzst", ".zst")):
        return "zstd"
    if lowered.endswith((".tar.gz", ".tgz", ".gz")):
        return "gzip"
    if lowered.endswith(".tar"):
        return "none"
    return None


# --------------------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class SkippedEntry:
    path: str
    reason: str  # socket, fifo, char_device, block_device, missing, vanished, unreadable, ...


@dataclass(frozen=True)
class ChangedEntry:
    path: str
    reason: str  # shrank, grew, modified, "read_error: …"
    header_size: int


@dataclass
class ArchiveStats:
    """Filled in by the worker thread; complete once the stream has ended."""

    files: int = 0
    dirs: int = 0
    links: int = 0  # symlinks + hardlinks
    bytes_in: int = 0  # file data read from disk
    bytes_out: int = 0  # bytes handed to the consumer (compressed, encrypted if asked)
    sha256: str = ""  # of the bytes handed to the consumer
    skipped: list[SkippedEntry] = field(default_factory=list)
    changed: list[ChangedEntry] = field(default_factory=list)
    # symlinks stored as they are that a restore will refuse (path, why): absolute or leading out
    unsafe_links: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def unreadable(self) -> list[SkippedEntry]:
        return [s for s in self.skipped if s.reason.startswith("unreadable")]


@dataclass
class ExtractStats:
    codec: Codec = "none"
    members: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes_written: int = 0  # file data written under dest
    compressed_bytes: int = 0
    uncompressed_bytes: int = 0
    stripped: list[str] = field(default_factory=list)  # members whose setuid/setgid/sticky bits went
    skipped: int = 0  # members outside `select_top`


class DecompressResult(NamedTuple):
    uncompressed_bytes: int
    member_count: int


# ------------------------------------------------------------------------------------ channels


class _Aborted(Exception):
    """The other side of a channel went away; unwind quietly."""


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _OutChannel:
    """Worker thread → event loop, at most ``maxsize`` chunks queued."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self._loop = loop
        self._maxsize = maxsize
        self._cond = threading.Condition()
        self._items: deque[bytes] = deque()
        self._done = False
        self._error: BaseException | None = None
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None
        self.max_queued = 0
        self.full = asyncio.Event()

    # worker side
    def put(self, item: bytes) -> None:
        with self._cond:
            if len(self._items) >= self._maxsize and not self.closed:
                self._call(self.full.set)
                while len(self._items) >= self._maxsize and not self.closed:
                    self._cond.wait()
            if self.closed:
                raise _Aborted
            self._items.append(item)
            self.max_queued = max(self.max_queued, len(self._items))
        self._call(self._wake)

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._done = True
            self._error = error
        self._call(self._wake)

    @property
    def completed(self) -> bool:
        with self._cond:
            return self._done and self._error is None

    def _call(self, fn: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:  # loop closed: nobody will ever read again
            with self._cond:
                self.closed = True

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)

    # loop side
    async def get(self) -> bytes | None:
        while True:
            with self._cond:
                if self._items:
                    item = self._items.popleft()
                    self._cond.notify_all()
                    self.full.clear()
                    return item
                if self._done:
                    if self._error is not None:
                        raise self._error
                    return None
                if self.closed:
                    return None
                waiter: asyncio.Future[None] = self._loop.create_future()
                self._waiter = waiter
            await waiter

    def close(self) -> None:
        """Consumer gone (any thread): the worker's next put raises ``_Aborted``."""
        with self._cond:
            self.closed = True
            self._items.clear()
            self._cond.notify_all()


class _InChannel:
    """Event loop → worker thread, at most ``maxsize`` chunks queued."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self._loop = loop
        self._maxsize = maxsize
        self._cond = threading.Condition()
        self._items: deque[bytes] = deque()
        self._done = False
        self._aborted = False
        self.closed = False
        self._space: asyncio.Future[None] | None = None
        self.max_queued = 0

    # loop side
    async def put(self, item: bytes) -> bool:
        """Queue a chunk; False once the worker has stopped reading."""
        while True:
            with self._cond:
                if self.closed:
                    return False
                if len(self._items) < self._maxsize:
                    self._items.append(item)
                    self.max_queued = max(self.max_queued, len(self._items))
                    self._cond.notify_all()
                    return True
                space: asyncio.Future[None] = self._loop.create_future()
                self._space = space
            await space

    def finish(self) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._done = True
            self._aborted = True
            self._items.clear()
            self._cond.notify_all()

    # worker side
    def get(self) -> bytes | None:
        with self._cond:
            while not self._items and not self._done:
                self._cond.wait()
            if self._aborted:
                raise _Aborted
            if not self._items:
                return None
            item = self._items.popleft()
            space, self._space = self._space, None
        if space is not None:
            self._wake(space)
        return item

    def close(self) -> None:
        """Worker stopped reading (any reason): release a blocked producer."""
        with self._cond:
            self.closed = True
            self._items.clear()
            space, self._space = self._space, None
        if space is not None:
            self._wake(space)

    def _wake(self, fut: asyncio.Future[None]) -> None:
        try:
            self._loop.call_soon_threadsafe(_resolve, fut)
        except RuntimeError:
            pass


def _start_worker(name: str, fn: Callable[[], _T]) -> tuple[threading.Thread, asyncio.Future[_T]]:
    """Run ``fn`` in a dedicated daemon thread; the future settles on the loop when it returns."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[_T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def run() -> None:
        result: Any = None
        error: BaseException | None = None
        try:
            result = fn()
        except BaseException as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread, fut


async def _wait_quietly(fut: asyncio.Future[Any], limit: float = _WORKER_JOIN_TIMEOUT) -> bool:
    """Wait (bounded) for a worker to end after an abort; swallow what it raised."""
    if not fut.done():
        await asyncio.wait({fut}, timeout=limit)
    if fut.done():
        if not fut.cancelled():
            fut.exception()  # mark retrieved
        return True
    return False


# ------------------------------------------------------------------------------------ creation


def _format_pax_time(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    sec, frac = divmod(abs(ns), 1_000_000_000)
    return f"{sign}{sec}.{f'{frac:09d}'.rstrip('0')}"


def _parse_pax_time(text: str) -> int | None:
    text = text.strip()
    negative = text.startswith("-")
    if negative:
        text = text[1:]
    sec, _, frac = text.partition(".")
    if not sec.isdigit() or (frac and not frac.isdigit()):
        return None
    ns = int(sec) * 1_000_000_000 + int((frac[:9]).ljust(9, "0") or "0")
    return -ns if negative else ns


def _member_mtime_ns(member: tarfile.TarInfo) -> int:
    exact = member.pax_headers.get("mtime")
    if exact is not None:
        parsed = _parse_pax_time(exact)
        if parsed is not None:
            return parsed
    return round(member.mtime * 1_000_000_000)


def _skip_kind(mode: int) -> str:
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISCHR(mode):
        return "char_device"
    if stat.S_ISBLK(mode):
        return "block_device"
    return "unknown_type"


def _normalize_member(member: str) -> str:
    parts = [p for p in member.replace(os.sep, "/").split("/") if p not in ("", ".")]
    if member.startswith("/") or ".." in parts or not parts:
        raise ValueError(f"archive member must be a relative path inside the root: {member!r}")
    return "/".join(parts)


def _dedupe_members(members: Iterable[str]) -> list[str]:
    """Normalized members in the given order, dropping duplicates and paths inside another."""
    normalized = [_normalize_member(m) for m in members]
    kept: list[str] = []
    seen: set[str] = set()
    for m in normalized:
        if m in seen:
            continue
        ancestors = m.split("/")
        if any("/".join(ancestors[:i]) in normalized for i in range(1, len(ancestors))):
            continue
        seen.add(m)
        kept.append(m)
    return kept


_PAX_NAME = b"././@PaxHeader"
_USTAR_TAIL = b"ustar\x0000" + bytes(32 + 32 + 8 + 8 + 155 + 12)


def _ustar_block(
    name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, kind: bytes, link: bytes
) -> bytes:
    block = b"".join(
        (
            name[:100].ljust(100, b"\0"),
            b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode, uid, gid, size, mtime),
            b"        ",
            kind,
            link[:100].ljust(100, b"\0"),
            _USTAR_TAIL,
        )
    )
    return b"%s%06o\0 %s" % (block[:148], sum(block), block[156:])


def _pax_record(key: bytes, value: bytes) -> bytes:
    length = len(key) + len(value) + 3
    total = prev = 0
    while True:  # the length prefix counts its own digits
        total = length + len(str(prev))
        if total == prev:
            break
        prev = total
    return b"%d %s=%s\n" % (total, key, value)


def _encode_header(
    name: str, kind: bytes, mode: int, uid: int, gid: int, size: int, mtime_ns: int, link: str
) -> bytes:
    """PAX header block(s) for one member; byte-identical to ``TarInfo.tobuf(PAX_FORMAT)``.

    tarfile's own encoder was half of the CPU time of archiving many small files; this covers
    the common case and hands anything unusual (non-UTF-8 names, huge ids/sizes/times) to it.
    """
    if kind == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    sec, frac = divmod(mtime_ns, 1_000_000_000)
    try:
        name_b = name.encode("utf-8")
        link_b = link.encode("utf-8")
        fast = uid < 0o10000000 and gid < 0o10000000 and size < 8**11 and 0 <= sec < 8**11
    except UnicodeEncodeError:
        fast = False
    if not fast:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
        info.size, info.mtime, info.linkname, info.uname, info.gname = size, sec, link, "", ""
        if frac:
            info.pax_headers = {"mtime": _format_pax_time(mtime_ns)}
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    records = b""
    if frac:
        # exact decimal, not a float: tar keeps nanoseconds and the bytes stay deterministic
        records += _pax_record(b"mtime", _format_pax_time(mtime_ns).encode())
    if len(name_b) > 100 or not name.isascii():
        records += _pax_record(b"path", name_b)
    if len(link_b) > 100 or not link.isascii():
        records += _pax_record(b"linkpath", link_b)
    block = _ustar_block(
        name.encode("ascii", "replace"),
        mode & 0o7777,
        uid,
        gid,
        size,
        sec,
        kind,
        link.encode("ascii", "replace"),
    )
    if not records:
        return block
    pad = -len(records) % tarfile.BLOCKSIZE
    return b"".join(
        (
            _ustar_block(_PAX_NAME, 0, 0, 0, len(records), 0, tarfile.XHDTYPE, b""),
            records,
            bytes(pad),
            block,
        )
    )


class _ChunkSink:
    """End of the writer chain, in the worker: hashes, counts and cuts output into chunks."""

    def __init__(self, chan: _OutChannel, chunk_size: int) -> None:
        self._chan = chan
        self._chunk_size = chunk_size
        self._buf = bytearray()
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        if self._chan.closed:
            raise _Aborted
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if not n:
            return 0
        self._hash.update(data)  # hashlib drops the GIL for big buffers
        self.size += n
        self._buf += data
        while len(self._buf) >= self._chunk_size:
            chunk = bytes(self._buf[: self._chunk_size])
            del self._buf[: self._chunk_size]
            self._chan.put(chunk)
        return n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def finish(self) -> str:
        if self._buf:
            self._chan.put(bytes(self._buf))
            self._buf.clear()
        return self._hash.hexdigest()


class _Compressor:
    def __init__(self, codec: Codec, out: Writer, level: int, threads: int) -> None:
        self._out = out
        self._writer: Any
        if codec == "zstd":
            cctx = zstd_compressor(level, threads)
            self._writer = cctx.stream_writer(cast(Any, out), closefd=False)
        elif codec == "gzip":
            # mtime=0 and no file name keep the output byte-for-byte reproducible
            self._writer = gzip.GzipFile(
                filename="", fileobj=cast(Any, out), mode="wb", compresslevel=min(max(level, 1), 9), mtime=0
            )
        else:
            self._writer = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._writer is None:
            # the caller reuses `data`; an encryption hook may keep what it is given
            self._out.write(data if isinstance(self._out, _ChunkSink) else bytes(data))
        else:
            self._writer.write(data)

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()


@dataclass(frozen=True)
class _ArchiveSpec:
    root: Path
    members: list[str]
    codec: Codec
    level: int
    threads: int
    chunk_size: int
    encrypt: Encryptor | None
    progress: ProgressCallback | None


class _ArchiveWorker:
    # holds no reference to the ArchiveStream, so dropping the stream still runs its __del__
    def __init__(
        self,
        spec: _ArchiveSpec,
        stats: ArchiveStats,
        chan: _OutChannel,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._s = spec
        self._chan = chan
        self._loop = loop
        self._stats = stats
        self._root = os.fspath(spec.root)
        self._offset = 0
        self._pending = bytearray()
        self._inodes: dict[tuple[int, int], str] = {}
        self._buf = bytearray(_READ_SIZE)
        self._last_progress = 0.0
        self._out: _Compressor | None = None

    def run(self) -> None:
        started = time.monotonic()
        s = self._s
        try:
            if not os.path.isdir(self._root):
                raise BackupError(
                    f"cannot archive: {self._root} is not a directory",
                    fix="check `root` in the config (or TINYSERVE_ROOT)",
                )
            sink = _ChunkSink(self._chan, s.chunk_size)
            enc = s.encrypt(sink) if s.encrypt is not None else None
            self._out = _Compressor(s.codec, enc if enc is not None else sink, s.level, s.threads)
            for member in s.members:
                self._add_tree(member)
            self._write_end()
            self._out.finish()
            if enc is not None:
                enc.close()
            self._stats.sha256 = sink.finish()
            self._stats.bytes_out = sink.size
            self._stats.seconds = time.monotonic() - started
            self._progress(force=True)
            log.info(
                "archive_done",
                root=self._root,
                codec=s.codec,
                files=self._stats.files,
                dirs=self._stats.dirs,
                links=self._stats.links,
                bytes_in=self._stats.bytes_in,
                bytes_out=self._stats.bytes_out,
                skipped=len(self._stats.skipped),
                changed=len(self._stats.changed),
                seconds=round(self._stats.seconds, 3),
            )
            self._chan.finish()
        except _Aborted:
            log.debug("archive_cancelled", root=self._root, bytes_in=self._stats.bytes_in)
        except BackupError as exc:
            self._chan.finish(exc)
        except Exception as exc:
            err = BackupError(
                f"creating the archive of {self._root} failed: {exc}",
                fix="check the files under the root and free disk/memory, then try again",
            )
            err.__cause__ = exc
            self._chan.finish(err)

    # -- output helpers
    def _write(self, data: bytes | memoryview) -> None:
        # headers and small files are gathered: one compressor call per ~256 KiB, not per header
        n = len(data) if isinstance(data, bytes) else data.nbytes
        self._offset += n
        if n < _DIRECT_WRITE:
            self._pending += data
            if len(self._pending) >= _PENDING_MAX:
                self._flush()
            return
        self._flush()
        assert self._out is not None
        self._out.write(data)

    def _flush(self) -> None:
        if self._pending:
            assert self._out is not None
            self._out.write(self._pending)
            self._pending.clear()

    def _pad_block(self) -> None:
        rem = self._offset % tarfile.BLOCKSIZE
        if rem:
            self._write(_ZEROS[: tarfile.BLOCKSIZE - rem])

    def _write_end(self) -> None:
        self._write(_ZEROS[: 2 * tarfile.BLOCKSIZE])
        rem = self._offset % tarfile.RECORDSIZE
        if rem:
            self._write(_ZEROS[: tarfile.RECORDSIZE - rem])
        self._flush()

    def _emit_header(self, rel: str, st: os.stat_result, kind: bytes, size: int = 0, link: str = "") -> None:
        self._write(
            _encode_header(
                rel, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, st.st_mtime_ns, link
            )
        )

    def _progress(self, force: bool = False) -> None:
        cb = self._s.progress
        if cb is None:
            return
        now = time.monotonic()
        if not force and now - self._last_progress < _PROGRESS_INTERVAL:
            return
        self._last_progress = now
        try:
            self._loop.call_soon_threadsafe(cb, self._stats.bytes_in)
        except RuntimeError:
            pass

    # -- walking
    def _skip(self, rel: str, reason: str, level: str = "info", **extra: object) -> None:
        self._stats.skipped.append(SkippedEntry(rel, reason))
        if reason == "missing":
            log.info("archive_member_missing", path=rel, root=self._root)
        elif reason.startswith("unreadable"):
            log.warning("archive_unreadable", path=rel, reason=reason, **extra)
        elif reason == "vanished":
            log.info("archive_vanished", path=rel)
        else:
            getattr(log, level)("archive_skipped", path=rel, kind=reason)

    def _add_tree(self, member: str) -> None:
        stack = [member]
        top = True
        while stack:
            if self._chan.closed:
                raise _Aborted
            rel = stack.pop()
            children = self._add_entry(rel, top)
            top = False
            stack.extend(reversed(children))

    def _add_entry(self, rel: str, top: bool) -> list[str]:
        path = os.path.join(self._root, rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._skip(rel, "missing" if top else "vanished")
            return []
        except OSError as exc:
            self._skip(rel, "unreadable", error=exc.strerror)
            return []
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            self._emit_header(rel, st, tarfile.DIRTYPE)
            self._stats.dirs += 1
            try:
                names = sorted(os.listdir(path))
            except OSError as exc:
                self._skip(rel, "unreadable_dir", error=exc.strerror)
                return []
            return [f"{rel}/{name}" for name in names]
        if stat.S_ISLNK(mode):
            try:
                target = os.readlink(path)
            except FileNotFoundError:
                self._skip(rel, "vanished")
                return []
            except OSError as exc:
                self._skip(rel, "unreadable", error=exc.strerror)
                return []
            self._emit_header(rel, st, tarfile.SYMTYPE, link=target)
            self._stats.links += 1
            try:
                _check_symlink_target(rel, _member_parts(rel), target)
            except UnsafeArchiveError as exc:
                # Kept, since it is the user's data, but said now, while it can still be fixed:
                # restore refuses such links (they are how hostile archives escape the root).
                self._stats.unsafe_links.append((rel, exc.message))
                log.warning("archive_unsafe_link", path=rel, target=target)
            return []
        if stat.S_ISREG(mode):
            self._add_file(rel, path, st)
            return []
        self._skip(rel, _skip_kind(mode))
        return []

    def _add_file(self, rel: str, path: str, lst: os.stat_result) -> None:
        key = (lst.st_dev, lst.st_ino)
        if lst.st_nlink > 1 and key in self._inodes:
            self._emit_header(rel, lst, tarfile.LNKTYPE, link=self._inodes[key])
            self._stats.links += 1
            return
        try:
            # O_NONBLOCK: if the path was swapped for a FIFO since lstat, open must not hang
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            self._skip(rel, "vanished")
            return
        except OSError as exc:
            self._skip(rel, "unreadable", error=exc.strerror)
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self._skip(rel, _skip_kind(st.st_mode))
                return
            size = st.st_size
            self._emit_header(rel, st, tarfile.REGTYPE, size=size)
            reason = self._copy(fd, size)
            self._pad_block()
            if reason is None:
                after = os.fstat(fd)
                if after.st_size > size:
                    reason = "grew"
                elif after.st_size < size:
                    reason = "shrank"
                elif after.st_mtime_ns != st.st_mtime_ns:
                    reason = "modified"
            if reason is not None:
                # the member stays exactly `size` bytes (zero-padded or cut), so the tar is sound
                self._stats.changed.append(ChangedEntry(rel, reason, size))
                log.warning("file_changed_during_read", path=rel, reason=reason, size_bytes=size)
            self._stats.files += 1
            if st.st_nlink > 1:
                self._inodes[(st.st_dev, st.st_ino)] = rel
        finally:
            os.close(fd)

    def _copy(self, fd: int, size: int) -> str | None:
        view = memoryview(self._buf)
        remaining = size
        reason: str | None = None
        while remaining:
            if self._chan.closed:
                raise _Aborted
            want = min(len(view), remaining)
            try:
                n = os.readv(fd, [view[:want]])
            except OSError as exc:
                reason = f"read_error: {exc.strerror}"
                break
            if n == 0:
                reason = "shrank"
                break
            self._write(view[:n])
            remaining -= n
            self._stats.bytes_in += n
            self._progress()
        while remaining:
            pad = min(remaining, len(_ZEROS))
            self._write(_ZEROS[:pad])
            remaining -= pad
        return reason


class ArchiveStream(AsyncIterator[bytes]):
    """Async iterator of archive bytes; see ``archive_stream``.

    The worker thread starts on the first ``__anext__``.  Leaving early (``aclose()``, ``break`` plus
    ``aclose()``, cancellation of the consuming task, garbage collection) stops it promptly.
    """

    def __init__(
        self,
        root: Path,
        members: list[str],
        *,
        codec: Codec,
        level: int,
        threads: int,
        chunk_size: int,
        encrypt: Encryptor | None,
        progress: ProgressCallback | None,
        queue_chunks: int,
    ) -> None:
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")
        if chunk_size < 1024:
            raise ValueError("chunk_size must be at least 1 KiB")
        if queue_chunks < 1:
            raise ValueError("queue_chunks must be at least 1")
        self.root = Path(root)
        self.members = _dedupe_members(members)
        self.codec: Codec = codec
        self.level = level
        self.threads = threads
        self.chunk_size = chunk_size
        self.encrypt = encrypt
        self.progress = progress
        self.queue_chunks = queue_chunks
        self.stats = ArchiveStats()
        self._chan: _OutChannel | None = None
        self._thread: threading.Thread | None = None
        self._done: asyncio.Future[None] | None = None
        self._finished = False

    # -- public state
    @property
    def finished(self) -> bool:
        """True once the last chunk was delivered (stats are then final)."""
        return self._finished

    @property
    def sha256(self) -> str:
        self._require_finished()
        return self.stats.sha256

    @property
    def size(self) -> int:
        self._require_finished()
        return self.stats.bytes_out

    @property
    def max_queued(self) -> int:
        """Most chunks ever waiting between the worker and the consumer."""
        return self._chan.max_queued if self._chan is not None else 0

    @property
    def queue_full(self) -> asyncio.Event | None:
        """Set while the worker waits for the consumer (back-pressure); None before start."""
        return self._chan.full if self._chan is not None else None

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def _require_finished(self) -> None:
        if not self._finished:
            raise RuntimeError("the archive stream has not been read to the end")

    # -- iteration
    def __aiter__(self) -> ArchiveStream:
        return self

    def _start(self) -> _OutChannel:
        loop = asyncio.get_running_loop()
        chan = self._chan = _OutChannel(loop, self.queue_chunks)
        spec = _ArchiveSpec(
            self.root,
            self.members,
            self.codec,
            self.level,
            self.threads,
            self.chunk_size,
            self.encrypt,
            self.progress,
        )
        worker = _ArchiveWorker(spec, self.stats, chan, loop)
        self._thread, self._done = _start_worker("archive-writer", worker.run)
        return chan

    async def __anext__(self) -> bytes:
        if self._finished:
            raise StopAsyncIteration
        chan = self._chan if self._chan is not None else self._start()
        try:
            chunk = await chan.get()
        except BaseException:
            # cancelled or failed: an async generator would be finished now, so is this stream
            chan.close()
            raise
        if chunk is None:
            # None also means "closed by the consumer": only a completed worker finishes the stream
            self._finished = chan.completed
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        if self._chan is not None:
            self._chan.close()
        await self.wait_closed()

    async def wait_closed(self, limit: float = _WORKER_JOIN_TIMEOUT) -> bool:
        """Wait (bounded) until the worker thread has ended; True if it has (or never started)."""
        if self._done is None:
            return True
        ended = await _wait_quietly(self._done, limit)
        if ended and self._thread is not None:
            # the future settles from the thread's last statement; the join is immediate
            self._thread.join(timeout=1.0)
        return ended and (self._thread is None or not self._thread.is_alive())

    async def __aenter__(self) -> ArchiveStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        chan = getattr(self, "_chan", None)
        if chan is not None:
            chan.close()


def archive_stream(
    root: Path,
    members: list[str],
    *,
    codec: Codec = "zstd",
    level: int = 3,
    threads: int = -1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    encrypt: Encryptor | None = None,
    progress: ProgressCallback | None = None,
    queue_chunks: int = DEFAULT_QUEUE_CHUNKS,
) -> ArchiveStream:
    """Stream a PAX tar of ``members`` (paths relative to ``root``), compressed with ``codec``.

    Directories are archived recursively in sorted order (so equal trees give equal bytes);
    symlinks are stored as links, hardlinks as hardlinks, uid/gid numerically, mtimes to the
    nanosecond.  Missing members, sockets, FIFOs, devices and unreadable files are skipped with a
    log line and listed in ``stats.skipped``; files that change while read are kept consistent
    (padded or cut to the size in their header) and listed in ``stats.changed``.  ``threads`` is
    zstd's worker count (-1: one per core, at most 4; 0: single-threaded).  ``progress(bytes_in)`` is called
    on the event loop at most every 0.1 s and once at the end.
    """
    return ArchiveStream(
        root,
        members,
        codec=codec,
        level=level,
        threads=threads,
        chunk_size=chunk_size,
        encrypt=encrypt,
        progress=progress,
        queue_chunks=queue_chunks,
    )


# ---------------------------------------------------------------------------------- extraction


class _ZstdFrameTracker:
    """Follows zstd frame and block boundaries in the compressed bytes.

    python-zstandard's stream reader returns a clean EOF for a stream cut mid-frame; walking the
    block headers (cheap: blocks are up to 128 KiB) proves the stream ended on a frame boundary.
    """

    _MAGIC, _SKIP_LEN, _FHD, _BLOCK = range(4)

    def __init__(self) -> None:
        self._state = self._MAGIC
        self._need = 4
        self._hdr = bytearray()
        self._skip = 0
        self._checksum = False
        self.frames = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                i += take
                self._skip -= take
                continue
            take = min(self._need - len(self._hdr), n - i)
            self._hdr += view[i : i + take]
            i += take
            if len(self._hdr) == self._need:
                header = bytes(self._hdr)
                self._hdr.clear()
                self._advance(header)

    def _advance(self, header: bytes) -> None:
        if self._state == self._MAGIC:
            magic = int.from_bytes(header, "little")
            if header == ZSTD_MAGIC:
                self._state, self._need = self._FHD, 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = self._SKIP_LEN, 4
            else:
                raise IntegrityError("the archive is not valid zstd data (bad frame magic)")
        elif self._state == self._SKIP_LEN:
            self._skip = int.from_bytes(header, "little")
            self._state, self._need = self._MAGIC, 4
        elif self._state == self._FHD:
            fhd = header[0]
            if fhd & 0x08:
                raise IntegrityError("the archive's zstd frame header is corrupt")
            single = (fhd >> 5) & 1
            self._checksum = bool((fhd >> 2) & 1)
            fcs = (single, 2, 4, 8)[fhd >> 6]
            self._skip = (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
            self._state, self._need = self._BLOCK, 3
        else:
            value = int.from_bytes(header, "little")
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3 or size > 1 << 17:
                raise IntegrityError("the archive's zstd data is corrupt (bad block header)")
            self._skip = 1 if kind == 1 else size
            if last:
                self._skip += 4 if self._checksum else 0
                self.frames += 1
                self._state, self._need = self._MAGIC, 4

    def check_complete(self) -> None:
        if self._state != self._MAGIC or self._hdr or self._skip or not self.frames:
            raise IntegrityError(
                "the archive's zstd data ends in the middle of a frame (truncated download or file)"
            )


class _ChannelReader:
    """File-like ``read`` over chunks from an ``_InChannel`` (worker side)."""

    def __init__(self, chan: _InChannel) -> None:
        self._chan = chan
        self._chunk = b""  # the chunk _cur views, handed out whole (no copy) when read whole
        self._cur = memoryview(b"")
        self._eof = False
        self.count = 0
        self.observer: Callable[[bytes], None] | None = None

    def _fill(self) -> bool:
        while not self._cur:
            if self._eof:
                return False
            chunk = self._chan.get()
            if chunk is None:
                self._eof = True
                return False
            if self.observer is not None:
                self.observer(chunk)
            self._chunk = chunk
            self._cur = memoryview(chunk)
        return True

    def peek(self, n: int) -> bytes:
        """Up to ``n`` leading bytes without consuming them."""
        if not self._fill():
            return b""
        while len(self._cur) < n and not self._eof:
            chunk = self._chan.get()
            if chunk is None:
                self._eof = True
                break
            if self.observer is not None:
                self.observer(chunk)
            self._chunk = bytes(self._cur) + chunk
            self._cur = memoryview(self._chunk)
        return bytes(self._cur[:n])

    @property
    def at_eof(self) -> bool:
        return self._eof

    def buffered(self) -> bytes:
        return self._cur.tobytes()

    def read(self, size: int = -1) -> bytes:
        if not self._fill():
            return b""
        if size < 0 or size >= len(self._cur):
            out = self._chunk if len(self._cur) == len(self._chunk) else self._cur.tobytes()
            self._chunk = b""
            self._cur = memoryview(b"")
        else:
            out = self._cur[:size].tobytes()
            self._cur = self._cur[size:]
        self.count += len(out)
        return out

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass


class _DecodedReader:
    """Decompressed side, for tarfile: counts bytes, remembers the last non-zero byte, maps
    decompression failures to ``IntegrityError``."""

    def __init__(self, source: Any, codec: Codec) -> None:
        self._source = source
        self._codec = codec
        self.count = 0
        self.last_nonzero = 0  # offset just past the last non-zero byte seen

    def read(self, size: int = -1) -> bytes:
        try:
            data: bytes = self._source.read(size)
        except (IntegrityError, _Aborted):
            raise
        except (zstandard.ZstdError, zlib.error, EOFError, gzip.BadGzipFile) as exc:
            raise IntegrityError(f"the archive's {self._codec} data is corrupt or truncated: {exc}") from exc
        if data:
            if data[-1]:
                self.last_nonzero = self.count + len(data)
            else:
                stripped = len(data.rstrip(b"\0"))  # copies: only for reads ending in zeros
                if stripped:
                    self.last_nonzero = self.count + stripped
            self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(_READ_SIZE):
            pass

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        pass


class _ForwardReader:
    """The decoded tar stream as a file that tarfile opens in random-access mode ("r:").

    In stream mode ("r|") tarfile passes every byte through its own buffer (joined, then sliced
    twice) and member data through a BufferedReader as well; here member data is read straight
    from the decompressor (``read_exactly``). Reading an archive in order needs only forward
    seeks: tarfile's look-back before a header (``seek(offset - 1)``) lands at or after what was
    read; the last byte is kept in case a tarfile version looks back exactly one byte. Anything
    else backwards, or a single read larger than any sane header, is a damaged archive.
    """

    def __init__(self, source: _DecodedReader) -> None:
        self._src = source
        self._pos = 0  # bytes taken from the source
        self._last = b""  # the last byte taken, for the one-byte look-back
        self._back = False  # that byte is to be read again

    def tell(self) -> int:
        return self._pos - 1 if self._back else self._pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self.read(_READ_SIZE)]
            while parts[-1]:
                parts.append(self.read(_READ_SIZE))
            return b"".join(parts)
        return self.read_exactly(size)

    def read_exactly(self, size: int) -> bytes:
        """``size`` bytes, or fewer only at the end of the stream."""
        if size <= 0:
            return b""
        if size > _MAX_SINGLE_READ:
            # Member data comes in 1 MiB reads; only a header (GNU long name, pax) asks for more.
            raise tarfile.ReadError(f"a header claims {size} bytes of metadata")
        head = b""
        if self._back:
            self._back = False
            head, size = self._last, size - 1
            if not size:
                return head
        data = self._src.read(size)
        if data and len(data) < size:
            parts = [data]
            got = len(data)
            while got < size:
                more = self._src.read(size - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        if data:
            self._pos += len(data)
            self._last = data[-1:]
        return head + data if head else data

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise tarfile.StreamError("only absolute seeks")
        cur = self.tell()
        if pos == cur - 1 and not self._back and self._last:
            self._back = True
        elif pos > cur:
            left = pos - cur
            while left:
                n = len(self.read_exactly(min(left, _READ_SIZE)))
                if not n:
                    break  # tarfile's next read finds the end of data and says so
                left -= n
        elif pos != cur:
            raise tarfile.StreamError(f"the archive points back from offset {cur} to {pos}")
        return self.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _open_decoder(
    raw: _ChannelReader, codec: Codec | Literal["auto"]
) -> tuple[_DecodedReader, Codec, _ZstdFrameTracker | None]:
    head = raw.peek(32)
    if head.startswith(AGE_MAGIC):
        raise EncryptionError(
            "the archive is age-encrypted and no decryption was set up",
            fix="decrypt it first (set `encryption.identity_file`, or `age -d` by hand)",
        )
    actual: Codec
    if codec == "auto":
        if head.startswith(ZSTD_MAGIC) or (
            len(head) >= 4 and int.from_bytes(head[:4], "little") & 0xFFFFFFF0 == 0x184D2A50
        ):
            actual = "zstd"
        elif head.startswith(GZIP_MAGIC):
            actual = "gzip"
        else:
            actual = "none"
    elif codec in CODECS:
        actual = codec
    else:
        raise ValueError(f"unknown codec {codec!r}; use auto or one of {', '.join(CODECS)}")
    if not head:
        raise IntegrityError("the archive is empty (0 bytes)")
    tracker: _ZstdFrameTracker | None = None
    source: Any
    if actual == "zstd":
        tracker = _ZstdFrameTracker()
        tracker.feed(raw.buffered())  # fetched before the tracker existed: all of it, once
        raw.observer = tracker.feed
        dctx = zstandard.ZstdDecompressor()
        source = dctx.stream_reader(
            cast(Any, raw), read_size=_READ_SIZE, read_across_frames=True, closefd=False
        )
    elif actual == "gzip":
        source = gzip.GzipFile(fileobj=cast(Any, raw), mode="rb")
    else:
        source = raw
    return _DecodedReader(source, actual), actual, tracker


def _member_parts(name: str, what: str = "member") -> tuple[str, ...]:
    if not name or "\0" in name:
        raise UnsafeArchiveError(f"archive {what} has an empty or invalid name: {name!r}")
    if name.startswith("/") or (os.sep != "/" and name.startswith(os.sep)):
        raise UnsafeArchiveError(f"archive {what} {name!r} has an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(f"archive {what} {name!r} contains '..'")
    return parts


_LINK_FIX = (
    "restore refuses links that lead out of the root; if this backup is your own, unpack it by hand "
    "(README: Restoring by hand) and make the link relative (the backup warned about it)"
)


def _check_symlink_target(name: str, parts: tuple[str, ...], target: str) -> None:
    """Refuse link targets that can leave the destination.

    A target may climb with leading ``..`` only (never ``a/../b``): the link's own directories are
    real directories (nothing is ever written through a symlink), so leading ``..`` climbs real
    directories and is checked exactly; later components only descend, possibly through other
    links that obey the same rule — so no chain of links can end outside.
    """
    if not target or "\0" in target:
        raise UnsafeArchiveError(f"symlink {name!r} has an empty or invalid target")
    if target.startswith("/"):
        raise UnsafeArchiveError(f"symlink {name!r} points at absolute path {target!r}", _LINK_FIX)
    ups = 0
    descended = False
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if descended:
                raise UnsafeArchiveError(
                    f"symlink {name!r} has target {target!r} with '..' after a path component"
                )
            ups += 1
        else:
            descended = True
    if ups > len(parts) - 1:
        raise UnsafeArchiveError(f"symlink {name!r} points outside the destination ({target!r})", _LINK_FIX)


def _under(parts: tuple[str, ...], prefixes: list[tuple[str, ...]]) -> bool:
    return any(parts[: len(p)] == p for p in prefixes)


def _ancestor_of(parts: tuple[str, ...], prefixes: list[tuple[str, ...]]) -> bool:
    return any(len(parts) < len(p) and p[: len(parts)] == parts for p in prefixes)


def _prefixes(tops: set[str] | None, what: str) -> list[tuple[str, ...]] | None:
    if tops is None:
        return None
    out = []
    for top in sorted(tops):
        parts = tuple(p for p in top.split("/") if p not in ("", "."))
        if not parts or ".." in parts or top.startswith("/"):
            raise ValueError(f"{what} entries must be relative paths: {top!r}")
        out.append(parts)
    return out


_STOCK_DATA_FILTER: Callable[[tarfile.TarInfo, str], tarfile.TarInfo] | None = getattr(
    tarfile, "data_filter", None
)


def _describe_type(member: tarfile.TarInfo) -> str:
    if member.ischr():
        return "character device"
    if member.isblk():
        return "block device"
    if member.isfifo():
        return "FIFO"
    return f"special file (type {member.type!r})"


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FD_CACHE = 64


class _Extractor:
    """Writes members under ``dest`` through directory fds opened with O_NOFOLLOW, so nothing is
    ever written through a symlink, whatever earlier members created."""

    def __init__(
        self,
        dest: Path,
        stats: ExtractStats,
        allowed: list[tuple[str, ...]] | None,
        select: list[tuple[str, ...]] | None,
        durable: bool = False,
    ) -> None:
        self._dest = dest
        self._stats = stats
        self._durable = durable
        self._allowed = allowed
        self._select = select
        self._dest_fd = -1
        # open directory fds by path; a directory is never replaced once made (that is refused),
        # so a cached fd always names what its path names
        self._dirs: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self._dir_attrs: dict[tuple[str, ...], tuple[int, int]] = {}
        self._real_dest = ""

    def open(self) -> None:
        self._dest.mkdir(parents=True, exist_ok=True)
        self._dest_fd = os.open(self._dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._real_dest = os.path.realpath(self._dest)

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        if self._dest_fd >= 0:
            os.close(self._dest_fd)
            self._dest_fd = -1

    # -- checks
    def check(self, member: tarfile.TarInfo) -> tuple[str, ...] | None:
        """Parts of the member's path, or None to skip it; raises for hostile members."""
        name = member.name
        parts = _member_parts(name)
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise UnsafeArchiveError(f"archive member {name!r} is a {_describe_type(member)}")
        if not parts:
            return None  # the "./" entry for the destination itself
        if self._select is not None and not _under(parts, self._select):
            if not (member.isdir() and _ancestor_of(parts, self._select)):
                return None
        if self._allowed is not None and not _under(parts, self._allowed):
            if not (member.isdir() and _ancestor_of(parts, self._allowed)):
                allowed = ", ".join("/".join(p) for p in self._allowed)
                raise UnsafeArchiveError(f"archive member {name!r} is outside the expected paths ({allowed})")
        if member.issym() or member.islnk():
            if member.issym():
                _check_symlink_target(name, parts, member.linkname)
            else:
                _member_parts(member.linkname, f"hardlink {name!r} target")
            # second opinion from the stdlib (its mode/owner rewrites are not used).  Plain files
            # and dirs skip it: the O_NOFOLLOW walk proves more than its realpath check, for free
            if _STOCK_DATA_FILTER is not None:
                try:
                    _STOCK_DATA_FILTER(member, self._real_dest)
                except tarfile.FilterError as exc:
                    raise UnsafeArchiveError(f"archive member {name!r} refused: {exc}") from exc
        return parts

    # -- fs helpers
    def _dir_fd(self, parts: tuple[str, ...], create: bool, name: str = "") -> int | None:
        """fd of directory ``parts`` (relative to dest), walking without following links.

        The fd belongs to the cache: use it before the next call.
        """
        if not parts:
            return self._dest_fd
        cached = self._dirs.get(parts)
        if cached is not None:
            self._dirs.move_to_end(parts)
            return cached
        start, fd = 0, self._dest_fd
        for i in range(len(parts) - 1, 0, -1):
            hit = self._dirs.get(parts[:i])
            if hit is not None:
                start, fd = i, hit
                break
        for i in range(start, len(parts)):
            comp = parts[i]
            try:
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        return None
                    os.mkdir(comp, 0o777, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise UnsafeArchiveError(
                        f"archive member {name or '/'.join(parts)!r} goes through "
                        f"{'/'.join(parts[: i + 1])!r}, which is a symlink or not a directory"
                    ) from exc
                raise
            self._dirs[parts[: i + 1]] = fd = nfd
        while len(self._dirs) > _DIR_FD_CACHE:
            _, old = self._dirs.popitem(last=False)
            if old != fd:
                os.close(old)
            else:  # never evict the fd being returned
                self._dirs[parts] = old
                break
        return fd

    def _clear(self, pfd: int, leaf: str, name: str, keep_dir: bool = False) -> bool:
        """Remove a non-directory at ``leaf``; True if a directory is there (kept)."""
        try:
            st = os.stat(leaf, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return True
            raise UnsafeArchiveError(f"archive member {name!r} would replace a directory")
        os.unlink(leaf, dir_fd=pfd)
        return False

    def _create(self, make: Callable[[], _T], pfd: int, leaf: str, name: str) -> _T:
        """Create-first (one syscall in the usual, empty-staging case); replace a non-dir once."""
        try:
            return make()
        except FileExistsError:
            self._clear(pfd, leaf, name)
            return make()

    # -- members
    def extract(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        name = member.name
        mode = member.mode & 0o7777
        if mode & 0o7000:
            self._stats.stripped.append(name)
            log.warning("extract_mode_stripped", member=name, mode=oct(mode))
            mode &= 0o777
        mtime_ns = _member_mtime_ns(member)
        pfd = self._dir_fd(parts[:-1], create=True, name=name)
        assert pfd is not None
        leaf = parts[-1]
        if member.isdir():
            try:
                os.mkdir(leaf, 0o777, dir_fd=pfd)
            except FileExistsError:
                if not self._clear(pfd, leaf, name, keep_dir=True):
                    os.mkdir(leaf, 0o777, dir_fd=pfd)
            # applied at the end: a read-only dir must still receive its children
            self._dir_attrs[parts] = (mode, mtime_ns)
            self._stats.dirs += 1
        elif member.isreg():
            fd = self._create(lambda: os.open(leaf, _NEW_FILE_FLAGS, 0o600, dir_fd=pfd), pfd, leaf, name)
            self._write_file(tar, member, fd, mode, mtime_ns)
            self._stats.files += 1
        elif member.issym():
            target = member.linkname
            self._create(lambda: os.symlink(target, leaf, dir_fd=pfd), pfd, leaf, name)
            if os.utime in os.supports_follow_symlinks:
                os.utime(leaf, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)
            self._stats.symlinks += 1
        else:
            self._hardlink(member, parts)
            self._stats.hardlinks += 1

    def _write_file(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, fd: int, mode: int, mtime_ns: int
    ) -> None:
        try:
            reader = tar.fileobj
            if member.sparse is not None or not isinstance(reader, _ForwardReader):
                src = tar.extractfile(member)
                assert src is not None
                chunks: Iterator[bytes] = iter(lambda: src.read(_READ_SIZE), b"")
            else:
                chunks = _member_data(reader, member)
            for data in chunks:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                self._stats.bytes_written += len(data)
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
            if self._durable:
                start_writeback(fd)
        finally:
            os.close(fd)

    def _hardlink(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        name = member.name
        target = _member_parts(member.linkname, f"hardlink {name!r} target")
        if not target:
            raise UnsafeArchiveError(f"hardlink {name!r} points at the destination itself")
        tfd = self._dir_fd(target[:-1], create=False, name=name)
        try:
            st = None if tfd is None else os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is None or tfd is None:
            raise IntegrityError(
                f"hardlink {name!r} points at {member.linkname!r}, which is not in the archive before it"
            )
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeArchiveError(
                f"hardlink {name!r} points at {member.linkname!r}, which is not a regular file"
            )
        tfd = os.dup(tfd)  # the next _dir_fd call may evict it from the cache
        try:
            dfd = self._dir_fd(parts[:-1], create=True, name=name)
            assert dfd is not None
            leaf = parts[-1]
            self._create(
                lambda: os.link(target[-1], leaf, src_dir_fd=tfd, dst_dir_fd=dfd, follow_symlinks=False),
                dfd,
                leaf,
                name,
            )
        finally:
            os.close(tfd)

    def finish(self) -> None:
        # deepest first, so a read-only parent is locked only after its children are done
        for parts in sorted(self._dir_attrs, key=len, reverse=True):
            mode, mtime_ns = self._dir_attrs[parts]
            fd = self._dir_fd(parts, create=False)
            if fd is None:
                continue
            os.fchmod(fd, mode)
            os.utime(fd, ns=(mtime_ns, mtime_ns))


def _member_data(reader: _ForwardReader, member: tarfile.TarInfo) -> Iterator[bytes]:
    reader.seek(member.offset_data)
    left = member.size
    while left:
        data = reader.read_exactly(min(left, _READ_SIZE))
        if not data:
            raise tarfile.ReadError("unexpected end of data")
        left -= len(data)
        yield data


def _read_archive(
    chan: _InChannel,
    codec: Codec | Literal["auto"],
    on_member: Callable[[tarfile.TarFile, tarfile.TarInfo], None],
    stats: ExtractStats | None = None,
) -> tuple[int, int, int, Codec]:
    """Decode and walk the whole archive in the worker; returns (members, uncompressed, compressed, codec)."""
    raw = _ChannelReader(chan)
    decoded, actual, tracker = _open_decoder(raw, codec)
    if stats is not None:
        stats.codec = actual
    members = 0
    try:
        # (opening reads the first header already)
        tar = tarfile.open(fileobj=cast(Any, _ForwardReader(decoded)), mode="r:")
    except (tarfile.TarError, ValueError) as exc:  # ValueError: e.g. a malformed sparse map
        if tracker is not None and raw.at_eof:
            tracker.check_complete()
        raise IntegrityError(f"the archive is not a readable tar stream ({actual}): {exc}") from exc
    last = ""
    try:
        while True:
            try:
                member = tar.next()
            except ValueError as exc:  # e.g. a malformed sparse map: tarfile's int() fails
                raise tarfile.ReadError(f"unreadable header ({exc})") from exc
            if member is None:
                break
            cast(Any, tar).members.clear()  # tarfile keeps every header otherwise: unbounded memory
            members += 1
            last = member.name
            on_member(tar, member)
        end = tar.offset
    except tarfile.TarError as exc:
        if tracker is not None and raw.at_eof:
            tracker.check_complete()  # the compressed stream was cut: say that, it is the cause
        if "unexpected end of data" in str(exc):
            raise IntegrityError(f"the archive is truncated: it ends inside member {last!r}") from exc
        where = f" after member {last!r}" if last else ""
        raise IntegrityError(f"the archive is damaged{where}: {exc}") from exc
    decoded.drain()
    if tracker is not None:
        tracker.check_complete()
    # tarfile silently stops at an unparseable header or at plain EOF; insist on the zero blocks
    if decoded.last_nonzero > end:
        raise IntegrityError(f"the archive is damaged: unreadable data after member {last!r} at offset {end}")
    if decoded.count - end < tarfile.BLOCKSIZE:
        raise IntegrityError(
            "the archive ends without tar's end-of-archive marker (truncated?)"
            + (f"; last member {last!r}" if last else "")
        )
    return members, decoded.count, raw.count, actual


def _wrap_os_error(exc: OSError, dest: Path) -> BackupError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return RestoreError(
            f"no space left while extracting into {dest}",
            fix="free disk space on that volume, then run the restore again (nothing live was changed)",
        )
    return RestoreError(
        f"extracting into {dest} failed: {exc.strerror or exc}"
        + (f" ({exc.filename})" if exc.filename else ""),
        fix="check permissions and free space of the staging directory",
    )


async def _feed_worker(
    chunks: AsyncIterable[bytes],
    chan: _InChannel,
    worker: tuple[threading.Thread, asyncio.Future[_T]],
    progress: ProgressCallback | None,
) -> _T:
    thread, done = worker
    fed = 0
    it = aiter(chunks)
    try:
        try:
            async for chunk in it:
                if not chunk:
                    continue
                if not await chan.put(chunk):
                    break  # the worker stopped early; its outcome says why
                fed += len(chunk)
                if progress is not None:
                    progress(fed)
        except BaseException:
            chan.abort()
            await _wait_quietly(done)
            raise
        chan.finish()
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            chan.abort()
            await _wait_quietly(done)
            raise
    finally:
        if done.done():
            # the future settles from the thread's last statement: this join is immediate
            thread.join(timeout=1.0)
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception as exc:  # already failing or done; closing must not mask that
                log.debug("archive_source_close_failed", error=str(exc))


async def extract_stream(
    chunks: AsyncIterable[bytes],
    dest: Path,
    *,
    codec: Codec | Literal["auto"] = "auto",
    allowed_top: set[str] | None = None,
    select_top: set[str] | None = None,
    progress: ProgressCallback | None = None,
    queue_chunks: int = 8,
    durable: bool = False,
) -> ExtractStats:
    """Decompress and untar ``chunks`` into ``dest`` (a staging directory), refusing hostile input.

    Refused with ``UnsafeArchiveError`` naming the member: absolute paths, ``..``, devices/FIFOs,
    symlinks whose target is absolute or can resolve outside ``dest`` (any ``..`` after a path
    component counts), hardlinks to anything but a regular file already extracted, any member
    that would be written through a symlink or replace a directory, and — when ``allowed_top``
    is given — members outside those path prefixes (parent directories of a prefix are fine).
    ``select_top`` instead extracts only members under its prefixes and skips the rest.
    Setuid/setgid/sticky bits are stripped (logged, listed in ``stats.stripped``); every other
    mode bit is kept exactly (unlike tarfile's stock ``data`` filter, which also runs as a second
    opinion) and mtimes are restored to the nanosecond; ownership is not changed.
    Damaged or truncated data raises ``IntegrityError``; a full disk ``RestoreError``.  On error
    ``dest`` may hold a partial tree (never anything outside it): discard it.
    ``durable`` sends each file towards the disk as soon as it is written (see
    ``fsutil.start_writeback``); the caller then waits with ``fsutil.sync_filesystem``.
    """
    if codec != "auto" and codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; use auto or one of {', '.join(CODECS)}")
    dest = Path(dest)
    stats = ExtractStats()
    extractor = _Extractor(
        dest,
        stats,
        _prefixes(allowed_top, "allowed_top"),
        _prefixes(select_top, "select_top"),
        durable,
    )
    chan = _InChannel(asyncio.get_running_loop(), queue_chunks)

    def on_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        stats.members += 1
        try:
            parts = extractor.check(member)
            if parts is None:
                stats.skipped += 1
                return
            extractor.extract(tar, member, parts)
        except UnsafeArchiveError as exc:
            log.error("extract_refused", member=member.name, dest=str(dest), reason=exc.message)
            raise

    def work() -> ExtractStats:
        try:
            extractor.open()
            _, stats.uncompressed_bytes, stats.compressed_bytes, _ = _read_archive(
                chan, codec, on_member, stats
            )
            extractor.finish()
        except (BackupError, _Aborted):
            raise
        except OSError as exc:
            raise _wrap_os_error(exc, dest) from exc
        finally:
            chan.close()
            extractor.close()
        log.info(
            "extract_done",
            dest=str(dest),
            codec=stats.codec,
            members=stats.members,
            files=stats.files,
            bytes_written=stats.bytes_written,
            stripped=len(stats.stripped),
        )
        return stats

    return await _feed_worker(chunks, chan, _start_worker("archive-extract", work), progress)


async def test_decompress(
    chunks: AsyncIterable[bytes],
    codec: Codec | Literal["auto"] = "auto",
    *,
    check_safety: bool = True,
    allowed_top: set[str] | None = None,
    queue_chunks: int = 8,
) -> DecompressResult:
    """Decompress and walk the tar without writing anything (for ``verify``).

    Returns ``(uncompressed_bytes, member_count)``; corruption or truncation → ``IntegrityError``.
    With ``check_safety`` the path/link/type rules of ``extract_stream`` that need no filesystem
    are applied too, so an archive that restore would refuse fails verify as well; ``allowed_top``
    as in ``extract_stream``.
    """
    if codec != "auto" and codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; use auto or one of {', '.join(CODECS)}")
    allowed = _prefixes(allowed_top, "allowed_top")
    chan = _InChannel(asyncio.get_running_loop(), queue_chunks)

    def on_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        if not check_safety:
            return
        parts = _member_parts(member.name)
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise UnsafeArchiveError(f"archive member {member.name!r} is a {_describe_type(member)}")
        if parts and allowed is not None and not _under(parts, allowed):
            if not (member.isdir() and _ancestor_of(parts, allowed)):
                raise UnsafeArchiveError(
                    f"archive member {member.name!r} is outside the expected paths "
                    f"({', '.join('/'.join(p) for p in allowed)})"
                )
        if member.issym() and parts:
            _check_symlink_target(member.name, parts, member.linkname)
        elif member.islnk():
            _member_parts(member.linkname, f"hardlink {member.name!r} target")

    def work() -> DecompressResult:
        try:
            members, uncompressed, _, _ = _read_archive(chan, codec, on_member)
        finally:
            chan.close()
        return DecompressResult(uncompressed, members)

    return await _feed_worker(chunks, chan, _start_worker("archive-verify", work), None)


test_decompress.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported
