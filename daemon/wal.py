"""Continuous WAL shipping of ``state.db``: generations, snapshots, segments, spool and lease.

How it works
------------
The shipper reads ``state.db-wal`` directly (:mod:`daemon.walfile`) and ships whole committed
transactions.  File events (watchdog, debounced) are only hints; a cheap safety poll (stat plus a
32-byte header read, local only) catches dropped events.  Idle, it makes no storage request at all.

To make sure no frame is overwritten before it is copied, it keeps a read transaction open on the
database (connection ``R``, read-only) at all times: SQLite cannot restart or truncate the WAL while
a reader uses it.  It runs the checkpoints itself, in this order, while holding the write lock with a
``BEGIN IMMEDIATE`` that never writes (connection ``W``): read the WAL to its end, end ``R``'s
transaction, ``wal_checkpoint(PASSIVE)``, start a new one on ``R``, release the write lock.  No
transaction can commit in between, so at the moment ``R`` lets go everything in the WAL has been
read, and the one restart SQLite may then do (salts change) continues exactly where we are.  Any
other change of the WAL header means continuity is lost and a new generation starts.  It never
writes into the database (no helper tables); a ``TRUNCATE`` checkpoint runs only when the WAL file
has grown large, and only when it cannot drop unread frames.

Bucket layout (keys relative to the destination prefix)
-------------------------------------------------------
::

    wal/lease.json
    wal/<generation>/snapshots/<index>-<taken_at>-<sha256>.db.zst[.age]
    wal/<generation>/segments/<index>-<first_at>-<last_at>-<sha256>.seg.zst[.age]

* ``<generation>``: ``YYYYMMDDTHHMMSS.ffffffZ-<8 hex>`` (UTC start time to the microsecond, so
  names sort by time; a shipper never starts one that sorts before its previous one).  A
  generation is one unbroken history of the database: snapshots plus a gap-free run of segments.
* ``<index>``: 16 hex digits.  Segments are numbered 0, 1, 2, … with no gaps.  Snapshot ``k`` is
  the database exactly before segment ``k`` (snapshot 0 starts the generation; a fresh snapshot is
  taken every ``snapshot_interval`` so restores replay at most that much).
* ``<taken_at>``, ``<first_at>``, ``<last_at>``: ``YYYYMMDDTHHMMSS.ffffffZ`` — the time the shipper
  *observed* the commits (read them from the WAL), our point-in-time clock.  Never S3 LastModified.
* ``<sha256>``: of the stored object bytes, checked by every restore before anything else.
* Object bytes (before optional encryption, which adds ``.age``): a zstd *skippable frame* holding
  UTF-8 JSON metadata, then one zstd frame.  For a snapshot that frame is the SQLite database file;
  for a segment it is the raw WAL frames (24-byte frame header + page each) exactly as they were in
  ``-wal``.  ``zstd -d`` skips the metadata, so by hand ``zstd -dc X.db.zst > state.db`` works, and
  ``zstd -dc`` of a run of segments of one WAL incarnation behind a WAL header is a valid ``-wal``.

Segment metadata: generation, index, page size, magic, checkpoint seq, salts, start/end offset and
running checksum in the WAL, frame count, per commit (cumulative frames, database size in pages,
observed time), raw byte count and sha256.  Snapshot metadata: generation, index, taken_at, page
size, database pages, sha256 of the database, and the WAL position it corresponds to.  A restore
chains them: every segment must start at the position where the previous one (or the snapshot)
ended, or at frame 1 of a new WAL incarnation.

Lease: ``wal/lease.json`` is created with a conditional put (If-None-Match).  It names the holder
(host, pid, random nonce) and an expiry; it is renewed along with uploads (read back first to check
it is still ours), so an idle shipper makes no requests and its lease may lapse.  Another shipper
takes over only an expired lease, or one held by a dead process on the same host.  Renewals and
takeovers replace the lease conditionally on the version read (If-Match), so two shippers cannot
both win a race: the one whose lease changed under it stops (is fenced) instead of overwriting the
other's.  A provider without If-Match gets plain writes (logged once); the loser of a race then
finds out at its next renewal.

Spool: every object is written and fsync'd under ``spool_dir`` before it is uploaded and deleted
after; uploads happen strictly in order.  Past ``spool_max_bytes`` the spool is dropped and a new
generation starts once storage answers again.  ``spool_dir/state.json`` records the generation and
WAL position so a restarted shipper continues the same generation when the WAL proves it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import secrets
import socket
import sqlite3
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import structlog
import zstandard

from daemon.errors import (
    BackupError,
    LeaseHeldError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    WalError,
)
from daemon.fsutil import fsync_dir
from daemon.storage import Storage
from daemon.streams import MiB, file_chunks
from daemon.walfile import (
    STOP_LIMIT,
    Transaction,
    WalPosition,
    read_wal,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

WAL_PREFIX = "wal/"
LEASE_KEY = "wal/lease.json"
SEGMENT_FORMAT = "tinyserve-wal-segment"
SNAPSHOT_FORMAT = "tinyserve-wal-snapshot"
FORMAT_VERSION = 1
ENCRYPTED_SUFFIX = ".age"
_SKIPPABLE_MAGIC = 0x184D2A5B  # any of 0x184D2A50..5F; zstd -d skips these frames
_TS_FORMAT = "%Y%m%dT%H%M%S.%fZ"
_GEN_RE = re.compile(r"^\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}$")
_TS_RE = r"\d{8}T\d{6}\.\d{6}Z"
_SNAPSHOT_RE = re.compile(
    rf"^wal/(?P<gen>[^/]+)/snapshots/(?P<index>[0-9a-f]{{16}})-(?P<at>{_TS_RE})-"
    rf"(?P<sha>[0-9a-f]{{64}})\.db\.zst(?P<enc>\.age)?$"
)
_SEGMENT_RE = re.compile(
    rf"^wal/(?P<gen>[^/]+)/segments/(?P<index>[0-9a-f]{{16}})-(?P<first>{_TS_RE})-"
    rf"(?P<last>{_TS_RE})-(?P<sha>[0-9a-f]{{64}})\.seg\.zst(?P<enc>\.age)?$"
)

Encryptor = Callable[[bytes], bytes]


# --------------------------------------------------------------------------------------------
# Names, times and object encoding (shared with daemon.pitr)
# --------------------------------------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime(_TS_FORMAT)


def parse_ts(s: str) -> datetime:
    return datetime.strptime(s, _TS_FORMAT).replace(tzinfo=UTC)


def new_generation_id(now: datetime) -> str:
    return f"{format_ts(now)}-{secrets.token_hex(4)}"


def generation_started_at(gen: str) -> datetime | None:
    try:
        return parse_ts(gen.split("-", 1)[0])
    except ValueError:
        return None


def snapshot_key(gen: str, index: int, taken_at: datetime, sha256: str, encrypted: bool) -> str:
    suffix = ENCRYPTED_SUFFIX if encrypted else ""
    return f"wal/{gen}/snapshots/{index:016x}-{format_ts(taken_at)}-{sha256}.db.zst{suffix}"


def segment_key(
    gen: str, index: int, first_at: datetime, last_at: datetime, sha256: str, encrypted: bool
) -> str:
    suffix = ENCRYPTED_SUFFIX if encrypted else ""
    return (
        f"wal/{gen}/segments/{index:016x}-{format_ts(first_at)}-{format_ts(last_at)}-{sha256}.seg.zst{suffix}"
    )


@dataclass(frozen=True)
class SnapshotInfo:
    key: str
    generation: str
    index: int
    taken_at: datetime
    sha256: str
    encrypted: bool
    size: int = 0


@dataclass(frozen=True)
class SegmentInfo:
    key: str
    generation: str
    index: int
    first_at: datetime
    last_at: datetime
    sha256: str
    encrypted: bool
    size: int = 0


def parse_wal_key(key: str, size: int = 0) -> SnapshotInfo | SegmentInfo | None:
    """Metadata encoded in an object name under ``wal/``; None for anything else."""
    m = _SEGMENT_RE.match(key)
    if m:
        return SegmentInfo(
            key,
            m["gen"],
            int(m["index"], 16),
            parse_ts(m["first"]),
            parse_ts(m["last"]),
            m["sha"],
            bool(m["enc"]),
            size,
        )
    m = _SNAPSHOT_RE.match(key)
    if m:
        return SnapshotInfo(
            key, m["gen"], int(m["index"], 16), parse_ts(m["at"]), m["sha"], bool(m["enc"]), size
        )
    return None


@dataclass
class GenerationInfo:
    id: str
    snapshots: list[SnapshotInfo] = field(default_factory=list)
    segments: list[SegmentInfo] = field(default_factory=list)
    other_keys: list[str] = field(default_factory=list)

    @property
    def last_at(self) -> datetime | None:
        """Time of the newest data in the generation (last commit or snapshot)."""
        times = [s.taken_at for s in self.snapshots] + [s.last_at for s in self.segments]
        return max(times) if times else None


async def load_catalog(storage: Storage) -> list[GenerationInfo]:
    """Every generation under ``wal/``, oldest first, with snapshots and segments by index."""
    gens: dict[str, GenerationInfo] = {}
    for obj in await storage.list(WAL_PREFIX):
        if obj.key == LEASE_KEY:
            continue
        parts = obj.key.split("/")
        if len(parts) < 3:
            continue
        g = gens.setdefault(parts[1], GenerationInfo(parts[1]))
        info = parse_wal_key(obj.key, obj.size)
        if isinstance(info, SnapshotInfo):
            g.snapshots.append(info)
        elif isinstance(info, SegmentInfo):
            g.segments.append(info)
        else:
            g.other_keys.append(obj.key)
    for g in gens.values():
        g.snapshots.sort(key=lambda s: (s.index, s.taken_at))
        g.segments.sort(key=lambda s: s.index)
    return [gens[k] for k in sorted(gens)]


def encode_object(meta: dict[str, Any], compressed: bytes) -> bytes:
    """Metadata (zstd skippable frame) followed by an already compressed zstd frame."""
    blob = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    return struct.pack("<II", _SKIPPABLE_MAGIC, len(blob)) + blob + compressed


def split_object(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """(metadata, compressed payload) of an object written by :func:`encode_object`."""
    if len(data) < 8:
        raise WalError("WAL object is truncated", "restore from another snapshot or generation")
    magic, n = struct.unpack_from("<II", data)
    if magic != _SKIPPABLE_MAGIC or 8 + n > len(data):
        raise WalError(
            "WAL object has no metadata frame", "this is not an object written by tinyserve-backup"
        )
    try:
        meta = json.loads(bytes(data[8 : 8 + n]))
    except ValueError:
        raise WalError(
            "WAL object metadata is not valid JSON", "restore from another snapshot or generation"
        ) from None
    return meta, memoryview(data)[8 + n :]


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclass
class WalOptions:
    debounce: float = 0.05  # file events within this window make one read
    poll_interval: float = 2.0  # safety poll (local stat + header read), in case events drop
    segment_interval: float = 0.2  # at most one segment per interval: batches commits under load
    max_segment_bytes: int = 16 * MiB  # raw frames per segment (a bigger transaction stays whole)
    checkpoint_pages: int = 1000  # PASSIVE checkpoint once the WAL holds this many frames
    checkpoint_min_interval: float = 1.0  # between attempts when readers keep the WAL pinned
    truncate_bytes: int = 64 * MiB  # TRUNCATE checkpoint once the -wal file is this large
    snapshot_interval: float = 24 * 3600.0
    # Also a snapshot once this many segments follow the newest one (0: by time only): under
    # sustained writes a day of segments is ~400k objects for a restore to fetch one by one.
    snapshot_after_segments: int = 10_000
    retention: float | None = 24 * 3600.0  # PITR window kept by prune_wal after snapshots
    spool_max_bytes: int = 256 * MiB
    # Renewed with uploads once a third of it has passed; an idle shipper lets it lapse (no
    # requests when idle) and checks it is still the holder before its next upload.
    lease_ttl: float = 600.0
    retry_base: float = 0.1
    retry_max: float = 2.0
    stop_timeout: float = 10.0
    lock_timeout: float = 5.0  # waiting for the write lock to start a generation or snapshot
    checkpoint_lock_timeout: float = 0.2  # a busy writer just postpones a checkpoint
    compression_level: int = 3
    watch: bool = True  # watchdog events; off leaves only the safety poll
    encrypt: Encryptor | None = None  # issue 8 plugs age in here; objects then end in .age

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> WalOptions:
        """From a ``daemon.config.Config``."""
        w = cfg.wal
        opts = cls(
            debounce=w.debounce_ms / 1000.0,
            segment_interval=w.upload_interval_ms / 1000.0,
            poll_interval=w.poll_interval_seconds,
            checkpoint_pages=w.checkpoint_pages,
            truncate_bytes=w.truncate_mb * MiB,
            snapshot_interval=w.snapshot_interval_hours * 3600.0,
            snapshot_after_segments=w.snapshot_after_segments,
            retention=w.retention_hours * 3600.0,
            spool_max_bytes=w.spool_max_mb * MiB,
            compression_level=cfg.compression.level,
        )
        # Same recipients as every other backup object (issue 8): WAL objects then end in .age.
        from daemon.crypto import encryptor_from_config

        opts.encrypt = encryptor_from_config(cfg)
        for k, v in overrides.items():
            setattr(opts, k, v)
        return opts


# --------------------------------------------------------------------------------------------
# Durable local spool
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpoolEntry:
    key: str
    path: Path
    size: int
    kind: str  # "snapshot" | "segment"
    generation: str
    index: int
    first_at: datetime
    last_at: datetime
    commits: int = 0

    def order(self) -> tuple[str, int, int]:
        return (self.generation, self.index, 0 if self.kind == "snapshot" else 1)


class Spool:
    """Objects waiting for upload, as files mirroring their keys under ``<dir>/objects``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.state_path = self.root / "state.json"
        self._lock_fd: int | None = None

    def lock(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LeaseHeldError(
                f"another WAL shipper on this machine uses the spool {self.root}",
                "stop the other daemon for this tinyserve root first",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def path_for(self, key: str) -> Path:
        return self.objects.joinpath(*key.split("/"))

    def _mkdirs(self, d: Path) -> None:
        if d.is_dir():
            return
        d.mkdir(parents=True, exist_ok=True)
        # New directories must survive a crash too, or the files in them do not.
        p = d
        while p != self.root and self.root in p.parents:
            fsync_dir(p.parent)
            p = p.parent

    def _write_file(self, path: Path, chunks: Iterable[bytes]) -> int:
        self._mkdirs(path.parent)
        tmp = path.with_name(f".tmp-{path.name}.{secrets.token_hex(4)}")
        size = 0
        try:
            with open(tmp, "wb") as f:
                for c in chunks:
                    f.write(c)
                    size += len(c)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
        return size

    def put(self, key: str, data: bytes) -> Path:
        path = self.path_for(key)
        self._write_file(path, [data])
        return path

    def remove(self, entry: SpoolEntry) -> None:
        entry.path.unlink(missing_ok=True)

    def clear(self) -> None:
        if not self.objects.is_dir():
            return
        for dirpath, _dirs, files in os.walk(self.objects, topdown=False):
            for name in files:
                Path(dirpath, name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                if Path(dirpath) != self.objects:
                    Path(dirpath).rmdir()

    def load(self) -> list[SpoolEntry]:
        """Spooled objects in upload order (half-written temp files are removed)."""
        out: list[SpoolEntry] = []
        if not self.objects.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(self.objects):
            for name in files:
                p = Path(dirpath, name)
                if name.startswith(".tmp-"):
                    p.unlink(missing_ok=True)
                    continue
                key = p.relative_to(self.objects).as_posix()
                info = parse_wal_key(key)
                size = p.stat().st_size
                if isinstance(info, SegmentInfo):
                    out.append(
                        SpoolEntry(
                            key, p, size, "segment", info.generation, info.index, info.first_at, info.last_at
                        )
                    )
                elif isinstance(info, SnapshotInfo):
                    out.append(
                        SpoolEntry(
                            key,
                            p,
                            size,
                            "snapshot",
                            info.generation,
                            info.index,
                            info.taken_at,
                            info.taken_at,
                        )
                    )
        out.sort(key=SpoolEntry.order)
        return out

    def load_state(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.state_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def save_state(self, state: dict[str, Any]) -> None:
        self._write_file(self.state_path, [json.dumps(state, indent=1).encode()])


# --------------------------------------------------------------------------------------------
# The SQLite side: everything here runs on one dedicated thread
# --------------------------------------------------------------------------------------------


class _ContinuityLost(Exception):
    pass


@dataclass
class _Step:
    pending_commits: int = 0
    checkpoint: str | None = None  # "passive" | "truncate" when one is due
    wal_restarted: bool = False


class _Engine:
    """WAL reading, generations, snapshots and checkpoints; confined to the shipper's DB thread."""

    def __init__(self, db_path: Path, spool: Spool, opts: WalOptions, clock: Callable[[], datetime]) -> None:
        self.db_path = db_path
        self.wal_path = Path(f"{db_path}-wal")
        self.spool = spool
        self.opts = opts
        self.clock = clock
        self.R: sqlite3.Connection | None = None  # long-lived reader (read-only)
        self.W: sqlite3.Connection | None = None  # write lock holder, never writes
        self.C: sqlite3.Connection | None = None  # runs checkpoints
        self.reading = False
        self.wal_mode = False
        self.db_id: tuple[int, int] | None = None  # (device, inode) of the file we have open
        self.generation: str | None = None
        self.next_index = 0
        self.snapshot_index = 0  # next_index when the generation's newest snapshot was taken
        self.pos: WalPosition | None = None
        self.expect_restart = False
        self.pending: list[tuple[Transaction, datetime]] = []
        self.pending_bytes = 0
        self.last_observed: datetime | None = None
        self.last_snapshot_at: datetime | None = None
        self.generation_started_at: datetime | None = None
        self.last_checkpoint_mono = 0.0
        self.last_checkpoint_pos: WalPosition | None = None
        self.checkpoints = 0
        self.broken: str | None = None
        # Objects spooled by any call; the shipper takes them after each call, even one that
        # raised, so nothing spooled is ever left out of the upload queue.
        self.outbox: list[SpoolEntry] = []

    def take_outbox(self) -> list[SpoolEntry]:
        out, self.outbox = self.outbox, []
        return out

    # ---- connections and locks ----

    def open(self) -> bool:
        if not self.db_path.is_file():
            raise WalError(
                f"database {self.db_path} does not exist",
                "check `root` in the config; tinyserved creates state.db on first start",
            )
        self.db_id = self._db_identity()
        try:
            self.W = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
            mode = str(self.W.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            self.wal_mode = mode == "wal"
            if not self.wal_mode:
                self.close()
                return False
            self.C = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
            # Read-only: it cannot checkpoint, so closing it last never deletes the -wal file
            # (which would cost us continuity across a restart of the daemon).
            self.R = sqlite3.connect(
                f"{self.db_path.resolve().as_uri()}?mode=ro",
                uri=True,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            self.close()
            raise WalError(
                f"cannot open {self.db_path.name} for WAL shipping: {e}",
                "check that the file is a SQLite database and readable",
            ) from None
        return True

    def close(self) -> None:
        # R closes last: it is read-only, so it never checkpoints or deletes the WAL on close.
        for attr in ("W", "C"):
            conn = getattr(self, attr)
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
                setattr(self, attr, None)
        self.end_read()
        if self.R is not None:
            with contextlib.suppress(sqlite3.Error):
                self.R.close()
            self.R = None

    def begin_read(self) -> None:
        assert self.R is not None
        if not self.reading:
            self.R.execute("BEGIN")
            # A read transaction starts at its first read; this one pins the WAL.
            self.R.execute("SELECT count(*) FROM sqlite_master").fetchone()
            self.reading = True

    def end_read(self) -> None:
        if self.reading and self.R is not None:
            with contextlib.suppress(sqlite3.Error):
                self.R.execute("COMMIT")
        self.reading = False

    def _lock_writes(self, timeout: float) -> bool:
        assert self.W is not None
        self.W.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        try:
            self.W.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                return False
            raise
        return True

    def _unlock_writes(self) -> None:
        assert self.W is not None
        with contextlib.suppress(sqlite3.Error):
            self.W.execute("ROLLBACK")

    # ---- reading ----

    def _observe(self, strictly_after: bool = False) -> datetime:
        now = self.clock()
        # Observed times never go backwards, whatever the wall clock does.
        if self.last_observed is not None:
            floor = self.last_observed + timedelta(microseconds=1 if strictly_after else 0)
            now = max(now, floor)
        self.last_observed = now
        return now

    def _db_identity(self) -> tuple[int, int] | None:
        try:
            st = self.db_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    def _check_db(self) -> None:
        # A restore swaps in another state.db (and moves its -wal aside) while we may be running:
        # our connections would still see the old file while the -wal path shows the new one's.
        ident = self._db_identity()
        if ident != self.db_id:
            raise _ContinuityLost(
                "state.db was replaced (a restore?)" if ident else "state.db disappeared (a restore?)"
            )

    def _reopen_if_replaced(self) -> None:
        if self._db_identity() == self.db_id and self.W is not None and self.R is not None:
            return
        self.close()
        if not self.open():
            raise WalError(
                "the new state.db is not in WAL mode yet",
                "it is retried automatically; tinyserved switches it to WAL when it starts",
            )
        log.info("wal_database_reopened", db=str(self.db_path))

    def _read(self) -> bool:
        """Read newly committed transactions into ``pending``; True if the WAL restarted."""
        self._check_db()
        restarted = False
        while True:
            r = read_wal(self.wal_path, self.pos, max_bytes=self.opts.max_segment_bytes)
            # Strictly increasing per read: commits read apart never share a time, so a segment
            # boundary never splits one instant (restore relies on it at gaps).
            now = self._observe(strictly_after=True)
            if r.restarted or r.header is None:
                self._check_db()  # a new WAL header could be another file's: check again
            if r.position_lost:
                raise _ContinuityLost(
                    "the WAL no longer holds the frames last read (rolled back by a crash or power "
                    "loss, then rewritten)"
                )
            if r.header is None:
                if self.pos is not None and not self.expect_restart:
                    raise _ContinuityLost(
                        "the -wal file was truncated or removed while it held unread frames"
                    )
                return restarted
            if self.pos is None or r.restarted:
                if self.pos is not None and not self.expect_restart:
                    raise _ContinuityLost("the WAL was restarted while frames were unread")
                # A segment never spans two WAL incarnations.
                self._cut()
                restarted = self.pos is not None
            if r.transactions:
                self.expect_restart = False
                for t in r.transactions:
                    self.pending.append((t, now))
                    self.pending_bytes += t.end.offset - t.start.offset
            self.pos = r.position
            if self.pending and self.pending_bytes >= self.opts.max_segment_bytes:
                self._cut()
            if r.stop_reason != STOP_LIMIT:
                return restarted

    def sync(self) -> _Step:
        if self.broken is not None or self.generation is None:
            return _Step()
        if not self.reading:
            # Detached by a failed reopen (state.db replaced): only a new generation re-attaches.
            raise _ContinuityLost("not attached to state.db")
        restarted = self._read()
        return _Step(len(self.pending), self._checkpoint_due(), restarted)

    def _checkpoint_due(self) -> str | None:
        if self.pos is None or self.pos == self.last_checkpoint_pos:
            return None
        if time.monotonic() - self.last_checkpoint_mono < self.opts.checkpoint_min_interval:
            return None
        size = 0
        with contextlib.suppress(OSError):
            size = self.wal_path.stat().st_size
        if size >= self.opts.truncate_bytes:
            return "truncate"
        if self.pos.frame_count >= self.opts.checkpoint_pages:
            return "passive"
        return None

    # ---- segments ----

    def _cut(self) -> None:
        if not self.pending or self.generation is None:
            return
        txns = [t for t, _ in self.pending]
        start, end = txns[0].start, txns[-1].end
        raw = b"".join(f.raw for t in txns for f in t.frames)
        commits = []
        frames = 0
        for t, at in self.pending:
            frames += t.frame_count
            commits.append({"frames": frames, "db_size": t.db_size, "at": format_ts(at)})
        first_at, last_at = self.pending[0][1], self.pending[-1][1]
        meta = {
            "format": SEGMENT_FORMAT,
            "version": FORMAT_VERSION,
            "generation": self.generation,
            "index": self.next_index,
            "page_size": start.page_size,
            "magic": start.magic,
            "checkpoint_seq": start.checkpoint_seq,
            "salt1": start.salt1,
            "salt2": start.salt2,
            "start_offset": start.offset,
            "start_checksum": list(start.checksum),
            "end_offset": end.offset,
            "end_checksum": list(end.checksum),
            "frames": frames,
            "commits": commits,
            "raw_bytes": len(raw),
            "raw_sha256": hashlib.sha256(raw).hexdigest(),
        }
        cctx = zstandard.ZstdCompressor(level=self.opts.compression_level, write_checksum=True)
        data = encode_object(meta, cctx.compress(raw))
        encrypted = self.opts.encrypt is not None
        if self.opts.encrypt is not None:
            data = self.opts.encrypt(data)
        key = segment_key(
            self.generation, self.next_index, first_at, last_at, hashlib.sha256(data).hexdigest(), encrypted
        )
        path = self.spool.put(key, data)
        entry = SpoolEntry(
            key, path, len(data), "segment", self.generation, self.next_index, first_at, last_at, len(commits)
        )
        self.next_index += 1
        self.pending = []
        self.pending_bytes = 0
        self.save_state()
        self.outbox.append(entry)

    def cut(self) -> None:
        self._cut()

    # ---- generations and snapshots ----

    def save_state(self) -> None:
        self.spool.save_state(
            {
                "db_path": str(self.db_path),
                "generation": self.generation,
                "next_index": self.next_index,
                "snapshot_index": self.snapshot_index,
                "position": self.pos.to_dict() if self.pos is not None else None,
                "last_snapshot_at": format_ts(self.last_snapshot_at) if self.last_snapshot_at else None,
                "generation_started_at": (
                    format_ts(self.generation_started_at) if self.generation_started_at else None
                ),
                "last_observed": format_ts(self.last_observed) if self.last_observed else None,
                "broken": self.broken,
            }
        )

    def load_clock(self, state: dict[str, Any] | None) -> None:
        """Carry the observation clock over restarts, so times and generation names only grow."""
        if state and state.get("last_observed"):
            with contextlib.suppress(ValueError):
                self.last_observed = parse_ts(str(state["last_observed"]))

    def resume(self, state: dict[str, Any] | None, snapshot_known: bool) -> bool:
        """Continue the generation recorded in the spool state, if the WAL proves we can."""
        if (
            not state
            or state.get("broken")
            or not state.get("generation")
            or state.get("db_path") != str(self.db_path)
            or not state.get("position")
            or not snapshot_known
        ):
            return False
        pos = WalPosition.from_dict(state["position"])
        if not self._lock_writes(self.opts.lock_timeout):
            return False
        try:
            r = read_wal(self.wal_path, pos, keep_frames=False)
            if r.header is None or r.restarted or r.position_lost:
                return False
            self.generation = str(state["generation"])
            self.next_index = int(state["next_index"])
            self.snapshot_index = int(state.get("snapshot_index") or 0)
            self.pos = pos
            self.expect_restart = False
            if state.get("last_snapshot_at"):
                self.last_snapshot_at = parse_ts(state["last_snapshot_at"])
            if state.get("generation_started_at"):
                self.generation_started_at = parse_ts(state["generation_started_at"])
            self._read()
            self._cut()
            self.end_read()
            self.begin_read()
            self.expect_restart = True
        finally:
            self._unlock_writes()
        log.info("wal_generation_resumed", generation=self.generation, index=self.next_index)
        return True

    def new_generation(self, reason: str) -> None:
        """Start a generation: pin the WAL, note its end, snapshot exactly that state."""
        if self.broken is None:
            # Commits read before continuity was lost are still good history of the old one.
            self._cut()
        self._reopen_if_replaced()
        if not self._lock_writes(self.opts.lock_timeout):
            raise WalError(
                "state.db stayed locked by a writer; cannot start a WAL generation",
                "it is retried automatically; check for a stuck writer if this repeats",
            )
        try:
            r = read_wal(self.wal_path, None, keep_frames=False)
            # Strictly later than anything seen so far: generation names must sort by time.
            taken_at = self._observe(strictly_after=True)
            self.end_read()
            self.begin_read()
        finally:
            self._unlock_writes()
        gen = new_generation_id(taken_at)
        self.generation = gen
        self.generation_started_at = taken_at
        self.next_index = 0
        self.snapshot_index = 0
        self.pos = r.position
        self.expect_restart = True
        self.pending = []
        self.pending_bytes = 0
        self.broken = None
        self.last_checkpoint_pos = None
        self._snapshot(taken_at)
        self.save_state()
        log.info("wal_generation_started", generation=gen, reason=reason, snapshot_bytes=self.outbox[-1].size)

    def snapshot(self) -> bool:
        """A fresh snapshot within the current generation, at the current end of the WAL; False
        when none was taken (no generation, or the writer held its lock all along)."""
        if self.broken is not None or self.generation is None:
            return False
        if not self._lock_writes(self.opts.lock_timeout):
            return False
        try:
            self._read()
            taken_at = self._observe()
            self.end_read()
            self.begin_read()
            self.expect_restart = True
        finally:
            self._unlock_writes()
        # Spooling needs no lock: the frames are in memory, and R now pins exactly their end.
        self._cut()
        self._snapshot(taken_at)
        return True

    def _snapshot(self, taken_at: datetime) -> None:
        """Back up the database as R sees it (R's read transaction is at ``self.pos``)."""
        assert self.R is not None and self.generation is not None
        tmp_db = self.spool.root / f".snapshot-{secrets.token_hex(4)}.db"
        try:
            dst = sqlite3.connect(tmp_db)
            try:
                # One step, inside R's read transaction: exactly the state at self.pos.
                self.R.backup(dst, pages=-1)
            finally:
                dst.close()
            self.outbox.append(self._spool_snapshot(tmp_db, taken_at))
        finally:
            tmp_db.unlink(missing_ok=True)
        self.last_snapshot_at = taken_at
        self.snapshot_index = self.next_index
        self.save_state()

    def segments_since_snapshot(self) -> int:
        return self.next_index - self.snapshot_index

    def _spool_snapshot(self, db_file: Path, taken_at: datetime) -> SpoolEntry:
        assert self.generation is not None
        h = hashlib.sha256()
        with open(db_file, "rb") as f:
            head = f.read(100)
            f.seek(0)
            while chunk := f.read(MiB):
                h.update(chunk)
        size = db_file.stat().st_size
        page_size = int.from_bytes(head[16:18], "big") if len(head) >= 18 else 0
        page_size = 65536 if page_size == 1 else page_size
        meta = {
            "format": SNAPSHOT_FORMAT,
            "version": FORMAT_VERSION,
            "generation": self.generation,
            "index": self.next_index,
            "taken_at": format_ts(taken_at),
            "page_size": page_size,
            "db_pages": size // page_size if page_size else 0,
            "db_bytes": size,
            "db_sha256": h.hexdigest(),
            "position": self.pos.to_dict() if self.pos is not None else None,
        }
        blob = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
        head_frame = struct.pack("<II", _SKIPPABLE_MAGIC, len(blob)) + blob
        tmp = self.spool.root / f".snapshot-{secrets.token_hex(4)}.zst"
        try:
            out = hashlib.sha256()
            cctx = zstandard.ZstdCompressor(level=self.opts.compression_level, write_checksum=True)
            with open(tmp, "wb") as dst, open(db_file, "rb") as src:
                dst.write(head_frame)
                cctx.copy_stream(src, dst, size=size)
            encrypted = self.opts.encrypt is not None
            if self.opts.encrypt is not None:
                encrypt_file = getattr(self.opts.encrypt, "encrypt_file", None)
                if encrypt_file is not None:  # streams: memory stays flat whatever the db size
                    sealed = tmp.with_name(tmp.name + ".age")
                    try:
                        encrypt_file(tmp, sealed)
                        os.replace(sealed, tmp)
                    finally:
                        sealed.unlink(missing_ok=True)
                else:
                    tmp.write_bytes(self.opts.encrypt(tmp.read_bytes()))
            with open(tmp, "rb") as f:
                while chunk := f.read(MiB):
                    out.update(chunk)
            key = snapshot_key(self.generation, self.next_index, taken_at, out.hexdigest(), encrypted)
            path = self.spool.path_for(key)
            self.spool._mkdirs(path.parent)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return SpoolEntry(
            key, path, path.stat().st_size, "snapshot", self.generation, self.next_index, taken_at, taken_at
        )

    def snapshot_only(self) -> None:
        """Rollback-journal database: a consistent copy, each in its own generation."""
        taken_at = self._observe(strictly_after=True)
        self.generation = new_generation_id(taken_at)
        self.generation_started_at = taken_at
        self.next_index = 0
        self.snapshot_index = 0
        self.pos = None
        src = sqlite3.connect(
            f"{self.db_path.resolve().as_uri()}?mode=ro", uri=True, timeout=self.opts.lock_timeout
        )
        tmp_db = self.spool.root / f".snapshot-{secrets.token_hex(4)}.db"
        try:
            dst = sqlite3.connect(tmp_db)
            try:
                src.backup(dst, pages=-1)
            finally:
                dst.close()
            self.outbox.append(self._spool_snapshot(tmp_db, taken_at))
        finally:
            src.close()
            tmp_db.unlink(missing_ok=True)
        self.last_snapshot_at = taken_at
        self.save_state()

    # ---- checkpoints ----

    def checkpoint(self, truncate: bool) -> None:
        """Checkpoint without ever letting SQLite drop a frame we have not read."""
        if self.broken is not None or self.generation is None or not self.reading:
            return
        assert self.C is not None
        self.last_checkpoint_mono = time.monotonic()
        if not self._lock_writes(self.opts.checkpoint_lock_timeout):
            log.debug("wal_checkpoint_postponed", reason="writer busy")
            return
        try:
            # Under the lock only what must be: read to the end, checkpoint, pin again.  The
            # frames wait in memory and are spooled after the writers are let go.
            self._read()
            self.end_read()
            try:
                self.C.execute("PRAGMA busy_timeout=0")
                busy, wal_frames, done = self.C.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                self.begin_read()
            # Everything in the WAL has been read and nothing can commit before we let go.
            self.expect_restart = True
        finally:
            self._unlock_writes()
        self.checkpoints += 1
        self.last_checkpoint_pos = self.pos
        self._cut()
        complete = wal_frames >= 0 and done == wal_frames
        if truncate and complete:
            # R now reads without the WAL (mark 0): if a writer slipped in after the unlock, its
            # frames cannot be backfilled past R, so this TRUNCATE then gives up rather than
            # dropping them.
            busy, wal_frames, done = self.C.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        log.debug(
            "wal_checkpoint",
            truncate=truncate,
            complete=complete,
            busy=busy,
            frames=wal_frames,
            backfilled=done,
        )

    def drop(self, reason: str) -> None:
        """Give up the generation (spool overflow): stop pinning the WAL until a new one."""
        self.broken = reason
        self.pending = []
        self.pending_bytes = 0
        self.end_read()
        self.save_state()


# --------------------------------------------------------------------------------------------
# The shipper
# --------------------------------------------------------------------------------------------


class _DropStopRace(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


def _quiet_watchdog_stop_race() -> None:
    # watchdog's inotify emitter logs an ERROR when an event arrives while it is being stopped;
    # nothing is wrong then, and a daemon log full of false errors hides real ones.
    lg = logging.getLogger("watchdog.observers.inotify")
    if not any(isinstance(f, _DropStopRace) for f in lg.filters):
        lg.addFilter(_DropStopRace())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WalShipper:
    """Ships ``db_path``'s WAL to ``storage`` under ``wal/`` until :meth:`stop`."""

    def __init__(
        self,
        db_path: Path,
        storage: Storage,
        spool_dir: Path,
        options: WalOptions | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db_path = Path(db_path)
        self.storage = storage
        self.opts = options or WalOptions()
        self.clock = clock
        self.spool = Spool(Path(spool_dir))
        self._engine = _Engine(self.db_path, self.spool, self.opts, clock)
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._observer: Any = None
        self._wake = asyncio.Event()
        self._queue_changed = asyncio.Event()
        self._queue: deque[SpoolEntry] = deque()
        self._spool_bytes = 0
        self._segment_bytes = 0  # what the spool bound counts (see _check_spool)
        self._hint_pending = threading.Event()
        self._debounce_handle: asyncio.TimerHandle | None = None
        self._cut_handle: asyncio.TimerHandle | None = None
        self._last_cut_mono = 0.0
        self._force_cut = False
        self._snapshot_due = False
        self._count_snapshot_after = 0.0  # monotonic time before which no count-triggered snapshot
        self._count_snapshot_backoff = 0.0
        self._need_generation: str | None = None
        self._stopping = False
        self._started = False
        self._state = "stopped"
        self._fatal: BackupError | None = None
        # lease
        self._holder = {"host": socket.gethostname(), "pid": os.getpid(), "nonce": secrets.token_hex(8)}
        self._lease_held = False
        self._lease_renew_at: datetime | None = None
        self._lease_expires_at: datetime | None = None
        # status
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None
        self._last_shipped_at: datetime | None = None
        self._last_upload_at: datetime | None = None
        self._uploaded_objects = 0
        self._uploaded_bytes = 0
        self._lags: deque[float] = deque(maxlen=2048)
        self._poll_sig: tuple[int, int, int, bytes] | None = None
        self._spool_dropped = 0
        self._last_prune_mono: float | None = None

    @property
    def holder_id(self) -> str:
        h = self._holder
        return f"{h['host']}:{h['pid']}:{h['nonce']}"

    # ---- plumbing ----

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the SQLite thread; whatever it spooled joins the upload queue."""
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, fn, *args)
        try:
            # Shielded: cancelling the caller must not abandon a half-done SQLite operation.
            return await asyncio.shield(fut)
        finally:
            if fut.done():
                self._enqueue(self._engine.take_outbox())

    def _enqueue(self, entries: list[SpoolEntry]) -> None:
        for e in entries:
            self._queue.append(e)
            self._spool_bytes += e.size
            if e.kind == "segment":
                self._segment_bytes += e.size
        if entries:
            self._queue_changed.set()

    def _record_error(self, err: BaseException, event: str, *, again: bool = False) -> None:
        """``again``: the same failure repeating (an outage): kept for status, logged at debug, so
        a long outage is one warning and one recovery line, not a warning every few seconds."""
        msg = err.message if isinstance(err, BackupError) else f"{type(err).__name__}: {err}"
        self._last_error = msg
        self._last_error_at = self.clock()
        (log.debug if again else log.warning)(event, error=msg)

    # ---- lifecycle ----

    async def start(self) -> None:
        """Take the lease and the spool, then start shipping (or snapshot-only operation).

        Raises :class:`LeaseHeldError` if another shipper holds this prefix.  A storage outage at
        start is not fatal: shipping starts into the spool and the lease is taken before the first
        upload.
        """
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.spool.lock)
        try:
            try:
                await self._acquire_lease()
            except LeaseHeldError:
                raise
            except StorageError as e:
                self._record_error(e, "wal_lease_deferred")
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="wal-sqlite")
            wal_mode = await self._call(self._engine.open)
            spooled = await asyncio.to_thread(self.spool.load)
            self._enqueue(spooled)
            state = await asyncio.to_thread(self.spool.load_state)
            self._engine.load_clock(state)
            if wal_mode:
                gen = state.get("generation") if state else None
                known = any(e.generation == gen and e.kind == "snapshot" for e in spooled) or (
                    gen is not None and await self._snapshot_uploaded(str(gen))
                )
                if not await self._call(self._engine.resume, state, known):
                    reason = "first start" if not state else "continuity not provable"
                    await self._call(self._engine.new_generation, reason)
                self._state = "shipping"
                self._start_watch()
                self._tasks.append(asyncio.create_task(self._reader(), name="wal-reader"))
            else:
                log.warning(
                    "wal_mode_off",
                    db=str(self.db_path),
                    fix="tinyserved normally enables WAL; until then only periodic snapshots are shipped",
                )
                self._state = "snapshot_only"
                last = state.get("last_snapshot_at") if state else None
                self._engine.last_snapshot_at = parse_ts(last) if last else None
                if self._snapshot_is_due():
                    await self._call(self._engine.snapshot_only)
            self._tasks.append(asyncio.create_task(self._uploader(), name="wal-uploader"))
            self._tasks.append(asyncio.create_task(self._poller(), name="wal-poller"))
        except BaseException:
            await self._teardown()
            raise
        self._started = True
        log.info(
            "wal_shipper_started",
            db=str(self.db_path),
            destination=self.storage.url,
            generation=self._engine.generation,
            mode=self._state,
            spooled_objects=len(self._queue),
        )

    async def _snapshot_uploaded(self, gen: str) -> bool:
        try:
            objs = await self.storage.list(f"wal/{gen}/snapshots/")
        except StorageError:
            return False
        return any(isinstance(parse_wal_key(o.key), SnapshotInfo) for o in objs)

    async def stop(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - a budget, split inside
        """Ship what is committed, keep the rest spooled, release the lease — all within ``timeout``
        seconds (default ``stop_timeout``), so a caller's own deadline is never overrun."""
        if not self._started:
            return
        budget = self.opts.stop_timeout if timeout is None else max(0.0, timeout)
        deadline = time.monotonic() + budget
        # Kept back from flushing for closing SQLite and releasing the lease.
        reserve = min(1.0, budget * 0.25)
        self._stopping = True
        try:
            self._stop_watch()
            for t in self._tasks:
                if t.get_name() in ("wal-reader", "wal-poller"):
                    t.cancel()
            await asyncio.gather(
                *[t for t in self._tasks if t.get_name() != "wal-uploader"], return_exceptions=True
            )
            if self._state == "shipping" and self._fatal is None and self._executor is not None:
                try:
                    await asyncio.wait_for(
                        self._final_read(), max(0.1, deadline - reserve - time.monotonic())
                    )
                except (TimeoutError, _ContinuityLost, WalError, sqlite3.Error, OSError) as e:
                    self._record_error(e, "wal_final_read_failed")
            remaining = deadline - reserve - time.monotonic()
            if self._queue and remaining > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._drained(), remaining)
            if self._queue:
                log.warning("wal_spool_kept", objects=len(self._queue), bytes=self._spool_bytes)
        finally:
            await self._teardown(max(0.2, (deadline - time.monotonic()) / 2))
            remaining = deadline - time.monotonic()
            if self._lease_held and remaining > 0.05:
                # Not released in time: it expires, or is taken over by our next start on this host.
                with contextlib.suppress(StorageError, TimeoutError):
                    await asyncio.wait_for(self._release_lease(), remaining)
            self._started = False
            self._state = "stopped"
        log.info("wal_shipper_stopped", generation=self._engine.generation, spooled_objects=len(self._queue))

    async def _final_read(self) -> None:
        await self._call(self._engine.sync)
        await self._call(self._engine.cut)

    async def _drained(self) -> None:
        while self._queue and self._fatal is None:
            self._queue_changed.clear()
            await self._queue_changed.wait()

    async def _teardown(self, budget: float = 5.0) -> None:
        self._stop_watch()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for h in (self._debounce_handle, self._cut_handle):
            if h is not None:
                h.cancel()
        if self._executor is not None:
            executor, loop = self._executor, asyncio.get_running_loop()
            # Queued behind whatever the SQLite thread is doing; it runs even if we stop waiting.
            closing = loop.run_in_executor(executor, self._engine.close)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(closing), budget)
            executor.shutdown(wait=False)
            self._executor = None
        self.spool.unlock()

    async def flush(self, wait_seconds: float = 10.0) -> bool:
        """Read and ship everything committed so far; True once it is all in the bucket."""
        if self._need_generation is not None or self._fatal is not None:
            return False  # history was dropped or someone else ships: nothing is "all shipped"
        if self._state != "shipping" or self._executor is None:
            return not self._queue
        await self._call(self._engine.sync)
        await self._call(self._engine.cut)
        try:
            await asyncio.wait_for(self._drained(), wait_seconds)
        except TimeoutError:
            return False
        return not self._queue

    # ---- file events and the safety poll ----

    def _start_watch(self) -> None:
        if not self.opts.watch:
            return
        from watchdog.events import (
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
            FileSystemEvent,
            FileSystemEventHandler,
        )
        from watchdog.observers import Observer

        names = {self.db_path.name + "-wal"}
        hint = self._hint_from_thread
        # Only changes are hints. Our own reads of -wal raise open/close-no-write events; reacting
        # to them made the shipper wake itself up ~20 times a second while idle.
        wanted = [FileModifiedEvent, FileCreatedEvent, FileDeletedEvent, FileMovedEvent, FileClosedEvent]
        wanted_types = {"modified", "created", "deleted", "moved", "closed"}

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type not in wanted_types:
                    return
                for p in (event.src_path, getattr(event, "dest_path", "")):
                    if p and os.path.basename(os.fsdecode(p)) in names:
                        hint()
                        return

        _quiet_watchdog_stop_race()
        observer = Observer()
        try:
            observer.schedule(Handler(), str(self.db_path.parent), recursive=False, event_filter=wanted)
        except TypeError:  # watchdog < 4 has no event_filter; the handler filters anyway
            observer.schedule(Handler(), str(self.db_path.parent), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _stop_watch(self) -> None:
        if self._observer is not None:
            obs, self._observer = self._observer, None
            with contextlib.suppress(Exception):
                # Unscheduling first stops the emitter cleanly (stop() alone races with it).
                obs.unschedule_all()
                obs.stop()
                obs.join(timeout=2)

    def _hint_from_thread(self) -> None:
        # Bursts of events cost one wake-up: only the first since the last read crosses threads.
        if self._hint_pending.is_set() or self._loop is None:
            return
        self._hint_pending.set()
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._on_hint)

    def _on_hint(self) -> None:
        if self._debounce_handle is None and self._loop is not None:
            self._debounce_handle = self._loop.call_later(self.opts.debounce, self._debounced)

    def _debounced(self) -> None:
        self._debounce_handle = None
        self._hint_pending.clear()
        self._wake.set()

    def _wal_signature(self) -> tuple[int, int, int, bytes] | None:
        wal = Path(f"{self.db_path}-wal")
        try:
            st = wal.stat()
            with open(wal, "rb") as f:
                head = f.read(32)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, head)

    def _snapshot_queued(self) -> bool:
        # One snapshot waits at a time: the spool's bound counts segments only, so during an
        # outage every trigger would otherwise add a copy of the database to it.
        return any(e.kind == "snapshot" for e in self._queue)

    def _snapshot_is_due(self) -> bool:
        last = self._engine.last_snapshot_at
        return last is None or (self.clock() - last).total_seconds() >= self.opts.snapshot_interval

    async def _poller(self) -> None:
        while True:
            await asyncio.sleep(self.opts.poll_interval)
            try:
                if self._state == "shipping":
                    sig = await asyncio.to_thread(self._wal_signature)
                    if sig != self._poll_sig:
                        self._poll_sig = sig
                        self._wake.set()
                    if (
                        self._snapshot_is_due()
                        and self._engine.broken is None
                        and not self._snapshot_queued()
                    ):
                        self._snapshot_due = True
                        self._wake.set()
                elif (
                    self._state == "snapshot_only" and self._snapshot_is_due() and not self._snapshot_queued()
                ):
                    await self._call(self._engine.snapshot_only)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep polling whatever happens; it is the safety net
                self._record_error(e, "wal_poll_failed")

    # ---- reading, cutting, checkpointing ----

    def _schedule_cut(self) -> None:
        if self._cut_handle is not None or self._loop is None:
            return
        delay = max(0.0, self._last_cut_mono + self.opts.segment_interval - time.monotonic())

        def fire() -> None:
            self._cut_handle = None
            self._force_cut = True
            self._wake.set()

        self._cut_handle = self._loop.call_later(delay, fire)

    async def _reader(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._fatal is not None:
                return
            try:
                await self._reader_step()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                failures += 1
                self._record_error(e, "wal_read_failed")
                await asyncio.sleep(min(self.opts.retry_max * 5, 0.2 * 2**failures))
                self._wake.set()

    async def _reader_step(self) -> None:
        eng = self._engine
        if self._need_generation is not None:
            return  # waiting for storage before starting over (spool overflow)
        try:
            step = await self._call(eng.sync)
        except _ContinuityLost as e:
            log.warning("wal_continuity_lost", generation=eng.generation, reason=str(e))
            await self._call(eng.new_generation, str(e))
            self._check_spool()
            return
        if step.wal_restarted:
            log.debug("wal_restart_followed", generation=eng.generation)
        if step.pending_commits:
            due = self._force_cut or (time.monotonic() - self._last_cut_mono >= self.opts.segment_interval)
            if due:
                self._force_cut = False
                if self._cut_handle is not None:
                    self._cut_handle.cancel()
                    self._cut_handle = None
                self._last_cut_mono = time.monotonic()
                await self._call(eng.cut)
            else:
                self._schedule_cut()
        self._check_spool()
        if self._need_generation is not None:
            return
        if step.checkpoint is not None:
            await self._call(eng.checkpoint, step.checkpoint == "truncate")
            self._last_cut_mono = time.monotonic()
            self._check_spool()
        n = self.opts.snapshot_after_segments
        if (
            n
            and not self._snapshot_due
            and eng.segments_since_snapshot() >= n
            and time.monotonic() >= self._count_snapshot_after
            and not self._snapshot_queued()
        ):
            log.info(
                "wal_snapshot_by_segments", generation=eng.generation, segments=eng.segments_since_snapshot()
            )
            self._snapshot_due = True
        if self._snapshot_due and self._need_generation is None:
            self._snapshot_due = False
            if await self._call(eng.snapshot):
                self._count_snapshot_backoff = 0.0
            else:
                # The writer held its lock for lock_timeout: try again later, not at every commit
                # (each try holds the reader that long), a little later each time.
                self._count_snapshot_backoff = min(
                    300.0, max(self.opts.poll_interval, 2 * self._count_snapshot_backoff)
                )
                self._count_snapshot_after = time.monotonic() + self._count_snapshot_backoff
                log.info(
                    "wal_snapshot_postponed", reason="writer busy", retry_in_s=self._count_snapshot_backoff
                )
            self._last_cut_mono = time.monotonic()
            self._check_spool()

    def _check_spool(self) -> None:
        # The bound counts segments only.  Snapshots are bounded by the database size and never
        # pile up (a periodic one waits until the previous one is uploaded); counting them could
        # drop each new generation's own snapshot as soon as one segment followed it, forever.
        if self._segment_bytes <= self.opts.spool_max_bytes or self._need_generation is not None:
            return
        dropped, nbytes = len(self._queue), self._segment_bytes
        reason = (
            f"spool passed its bound ({nbytes} > {self.opts.spool_max_bytes} bytes): uploads fell "
            "behind the writes (storage unreachable or slow, or one very large transaction)"
        )
        log.error(
            "wal_spool_overflow",
            generation=self._engine.generation,
            dropped=dropped,
            bytes=nbytes,
            fix="a new generation starts from a fresh snapshot once uploads go through; raise "
            "wal.spool_max_mb if large transactions are normal here",
        )
        self._queue.clear()
        self._spool_bytes = 0
        self._segment_bytes = 0
        self._need_generation = reason
        self._spool_dropped += 1
        self._last_error = reason
        self._last_error_at = self.clock()
        self._queue_changed.set()
        assert self._executor is not None
        self._executor.submit(self._drop_spool, reason)

    def _drop_spool(self, reason: str) -> None:
        self._engine.drop(reason)
        self.spool.clear()

    # ---- uploading ----

    async def _uploader(self) -> None:
        attempt = 0
        while True:
            if self._fatal is not None:
                return
            if not self._queue:
                if self._need_generation is not None and not self._stopping:
                    if await self._recover_generation():
                        attempt = 0
                        continue
                    attempt += 1
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                self._queue_changed.clear()
                await self._queue_changed.wait()
                continue
            entry = self._queue[0]
            try:
                await self._ensure_lease()
                await self._upload(entry)
            except asyncio.CancelledError:
                raise
            except LeaseHeldError as e:
                self._fence(e)
                return
            except (StorageError, OSError) as e:
                attempt += 1
                self._record_error(e, "wal_upload_failed", again=attempt > 1)
                await asyncio.sleep(self._backoff(attempt))
                continue
            if attempt:
                log.info("wal_upload_recovered", failed_attempts=attempt, spooled=len(self._queue))
            attempt = 0
            if self._queue and self._queue[0] is entry:
                self._queue.popleft()
                self._spool_bytes -= entry.size
                if entry.kind == "segment":
                    self._segment_bytes -= entry.size
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.spool.remove, entry)
            now = self.clock()
            self._last_upload_at = now
            self._uploaded_objects += 1
            self._uploaded_bytes += entry.size
            if entry.kind == "segment":
                self._last_shipped_at = entry.last_at
                self._lags.append((now - entry.first_at).total_seconds())
            elif self._last_shipped_at is None or entry.last_at > self._last_shipped_at:
                self._last_shipped_at = entry.last_at
            self._queue_changed.set()
            if (
                entry.kind == "snapshot"
                and self.opts.retention is not None
                and (self._last_prune_mono is None or time.monotonic() - self._last_prune_mono > 3600)
            ):
                self._last_prune_mono = time.monotonic()
                await self._prune()

    def _backoff(self, attempt: int) -> float:
        cap = min(self.opts.retry_max, self.opts.retry_base * 2 ** min(attempt, 20))
        return random.uniform(cap / 2, cap)

    async def _upload(self, entry: SpoolEntry) -> None:
        if entry.size <= self.storage.part_size:
            data = await asyncio.to_thread(entry.path.read_bytes)
            await self.storage.put_bytes(entry.key, data)
            return
        result = await self.storage.upload_stream(entry.key, file_chunks(entry.path, self.storage.part_size))
        expected = entry.key.rsplit("-", 1)[1].split(".", 1)[0]
        if result.sha256 != expected:
            raise StorageError(
                f"upload of {entry.key} stored different bytes than spooled",
                "it is retried; check the spool disk if this repeats",
            )

    async def _recover_generation(self) -> bool:
        try:
            await self._ensure_lease(force=True)
        except LeaseHeldError as e:
            self._fence(e)
            return False
        except (StorageError, OSError) as e:  # (OSError: a local destination's disk)
            self._record_error(e, "wal_storage_still_down")
            return False
        reason = self._need_generation or "recovery"
        try:
            await self._call(self._engine.new_generation, reason)
        except (WalError, sqlite3.Error, OSError) as e:
            self._record_error(e, "wal_generation_failed")
            return False
        self._need_generation = None
        self._wake.set()
        return True

    async def _prune(self) -> None:
        assert self.opts.retention is not None
        try:
            await prune_wal(
                self.storage,
                window=timedelta(seconds=self.opts.retention),
                now=self.clock(),
                keep_generation=self._engine.generation,
            )
        except StorageError as e:
            self._record_error(e, "wal_prune_failed")

    def _fence(self, err: LeaseHeldError) -> None:
        """Someone else ships to this prefix now: stop shipping, keep the spool, say why."""
        self._fatal = err
        self._lease_held = False
        self._state = "fenced"
        self._last_error = err.message
        self._last_error_at = self.clock()
        log.error("wal_lease_lost", error=err.message, fix=err.fix)
        self._stop_watch()
        if self._executor is not None:
            self._executor.submit(self._engine.end_read)
        self._queue_changed.set()

    # ---- lease ----

    def _lease_body(self) -> bytes:
        now = self.clock()
        exp = now + timedelta(seconds=self.opts.lease_ttl)
        self._lease_expires_at = exp
        return json.dumps(
            {
                "holder": self.holder_id,
                **self._holder,
                "db": str(self.db_path),
                "generation": self._engine.generation,
                "renewed_at": format_ts(now),
                "expires_at": format_ts(exp),
            },
            indent=1,
        ).encode()

    def _lease_granted(self) -> None:
        self._lease_held = True
        # Wall clock, not monotonic: after a Mac's sleep the lease may have expired meanwhile.
        self._lease_renew_at = self.clock() + timedelta(seconds=self.opts.lease_ttl / 3)

    def _takeover_allowed(self, cur: dict[str, Any]) -> bool:
        try:
            expired = parse_ts(str(cur["expires_at"])) <= self.clock()
        except (KeyError, ValueError):
            return True  # unreadable lease: nobody can prove they hold it
        if expired:
            return True
        if cur.get("host") != self._holder["host"]:
            return False
        try:
            pid = int(cur["pid"])
        except (KeyError, TypeError, ValueError):
            return False
        if pid != os.getpid():
            # Left by a killed process on this very host: no need to wait out its expiry.
            return not _pid_alive(pid)
        # Left by an earlier shipper in this process that could not release it (storage down
        # at stop): for the same database that one is gone, as we hold its spool lock now.
        return cur.get("db") == str(self.db_path)

    def _held_error(self, cur: dict[str, Any], what: str) -> LeaseHeldError:
        return LeaseHeldError(
            f"{what}: another WAL shipper holds the lease on {self.storage.url}/{LEASE_KEY} "
            f"(host {cur.get('host')}, pid {cur.get('pid')}, until {cur.get('expires_at')})"
        )

    async def _read_lease(self) -> tuple[dict[str, Any], str] | None:
        """The lease and its version, or None when there is none."""
        try:
            data, version = await self.storage.get_versioned(LEASE_KEY)
        except ObjectNotFoundError:
            return None
        try:
            cur = json.loads(data)
        except ValueError:
            return {}, version
        return (cur if isinstance(cur, dict) else {}), version

    async def _acquire_lease(self) -> None:
        for _ in range(4):
            try:
                await self.storage.put_bytes(LEASE_KEY, self._lease_body(), if_none_match=True)
                self._lease_granted()
                log.info("wal_lease_acquired", holder=self.holder_id)
                return
            except PreconditionFailedError:
                pass
            got = await self._read_lease()
            if got is None:
                continue  # released in between: try the conditional create again
            cur, version = got
            mine = cur.get("holder") == self.holder_id
            if not mine and not self._takeover_allowed(cur):
                raise self._held_error(cur, "refusing to ship")
            try:
                # Replaces only the lease just judged, in one step (never leaving none): a
                # renewal or another takeover meanwhile wins, and we look again.
                await self.storage.put_bytes(LEASE_KEY, self._lease_body(), if_match=version)
            except (PreconditionFailedError, ObjectNotFoundError):
                continue
            self._lease_granted()
            if not mine:
                log.warning(
                    "wal_lease_takeover",
                    previous_holder=cur.get("holder"),
                    previous_expiry=cur.get("expires_at"),
                    holder=self.holder_id,
                )
            return
        raise LeaseHeldError(
            f"could not take the WAL lease on {self.storage.url}: other shippers keep racing for it"
        )

    async def _ensure_lease(self, force: bool = False) -> None:
        renew_at = self._lease_renew_at
        if self._lease_held and not force and renew_at is not None and self.clock() < renew_at:
            return
        if not self._lease_held:
            await self._acquire_lease()
            return
        got = await self._read_lease()
        if got is None:
            await self._acquire_lease()
            return
        cur, version = got
        if cur.get("holder") != self.holder_id:
            self._lease_held = False
            raise self._held_error(cur, "stopped shipping")
        try:
            await self.storage.put_bytes(LEASE_KEY, self._lease_body(), if_match=version)
        except (PreconditionFailedError, ObjectNotFoundError):
            # Taken over between our read and our write (our lease had lapsed, e.g. over a Mac's
            # sleep): whoever holds it now decides; _acquire_lease raises if it is another shipper.
            self._lease_held = False
            await self._acquire_lease()
            return
        self._lease_granted()

    async def _release_lease(self) -> None:
        got = await self._read_lease()
        self._lease_held = False
        if got is not None and got[0].get("holder") == self.holder_id:
            with contextlib.suppress(PreconditionFailedError, ObjectNotFoundError):
                await self.storage.delete_if_match(LEASE_KEY, got[1])  # (unless taken meanwhile)

    # ---- status ----

    def status(self) -> dict[str, Any]:
        """Plain data for the daemon's status file (no secrets)."""
        eng = self._engine
        now = self.clock()
        oldest: datetime | None = None
        if self._queue:
            oldest = min(e.first_at for e in self._queue)
        if eng.pending:
            t = eng.pending[0][1]
            oldest = t if oldest is None else min(oldest, t)
        lags = sorted(self._lags)

        def pct(p: float) -> float | None:
            return round(lags[min(len(lags) - 1, int(p * len(lags)))], 4) if lags else None

        return {
            "state": self._state,
            "db": str(self.db_path),
            "wal_mode": eng.wal_mode,
            "generation": eng.generation,
            "generation_started_at": _iso(eng.generation_started_at),
            "segment_index": eng.next_index,
            "last_snapshot_at": _iso(eng.last_snapshot_at),
            "last_commit_observed_at": _iso(eng.last_observed),
            "last_shipped_commit_at": _iso(self._last_shipped_at),
            "last_upload_at": _iso(self._last_upload_at),
            "lag_seconds": round((now - oldest).total_seconds(), 3) if oldest else 0.0,
            "lag_p50_seconds": pct(0.50),
            "lag_p99_seconds": pct(0.99),
            "spool_bytes": self._spool_bytes,
            "spool_objects": len(self._queue),
            "spool_max_bytes": self.opts.spool_max_bytes,
            "pending_commits": len(eng.pending),
            # Set while the spool has been dropped and a new generation waits for storage.
            "continuity_lost": self._need_generation,
            "spool_dropped": self._spool_dropped,
            "uploaded_objects": self._uploaded_objects,
            "uploaded_bytes": self._uploaded_bytes,
            "checkpoints": eng.checkpoints,
            "lease_holder": self.holder_id if self._lease_held else None,
            "lease_expires_at": _iso(self._lease_expires_at) if self._lease_held else None,
            "last_error": self._last_error,
            "last_error_at": _iso(self._last_error_at),
        }


def _iso(dt: datetime | None) -> str | None:
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z") if dt else None


# --------------------------------------------------------------------------------------------
# Retention
# --------------------------------------------------------------------------------------------


def choose_base(
    catalog: list[GenerationInfo], target: datetime | None
) -> tuple[GenerationInfo, SnapshotInfo] | None:
    """The generation and snapshot a restore to ``target`` (None: latest) starts from.

    The newest generation with a snapshot taken at or before the target, and its latest such
    snapshot.  Generations follow each other in time, so a newer one supersedes older ones.
    """
    for g in reversed(catalog):
        snaps = [s for s in g.snapshots if target is None or s.taken_at <= target]
        if snaps:
            return g, max(snaps, key=lambda s: (s.index, s.taken_at))
    return None


async def prune_wal(
    storage: Storage,
    *,
    window: timedelta = timedelta(hours=24),
    now: datetime | None = None,
    keep_generation: str | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Delete WAL objects no restore within ``window`` of ``now`` can need; returns their keys.

    A restore to the start of the window begins at a certain snapshot (see :func:`choose_base`):
    that snapshot, everything after it in its generation and every newer generation stay.  Older
    snapshots and the segments before the kept snapshot go, and older generations entirely —
    except ``keep_generation`` (the one being shipped) and anything if no snapshot is old enough.
    """
    now = now or utcnow()
    cutoff = now - window
    catalog = await load_catalog(storage)
    base = choose_base(catalog, cutoff)
    if base is None:
        return []
    gen, snap = base
    doomed: list[str] = []
    for g in catalog:
        if g.id == keep_generation and g.id != gen.id:
            continue
        if g.id < gen.id:
            doomed += [s.key for s in g.snapshots] + [s.key for s in g.segments] + g.other_keys
        elif g.id == gen.id:
            doomed += [s.key for s in g.snapshots if s.index < snap.index]
            doomed += [s.key for s in g.segments if s.index < snap.index]
    if doomed and not dry_run:
        await storage.delete_many(doomed)
        log.info(
            "wal_pruned",
            objects=len(doomed),
            kept_generation=gen.id,
            kept_snapshot=snap.key,
            cutoff=format_ts(cutoff),
        )
    return doomed


def is_generation_id(name: str) -> bool:
    return bool(_GEN_RE.match(name))
