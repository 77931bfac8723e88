"""SQLite WAL file format: parse, validate and apply — pure and synchronous.

Format (https://www.sqlite.org/fileformat2.html#walformat), all header fields big-endian:

* 32-byte header: magic (0x377f0682 or 0x377f0683), format version (3007000), page size,
  checkpoint sequence, salt-1, salt-2, checksum-1, checksum-2 (over the first 24 bytes).
* Frames: a 24-byte frame header (page number, db size in pages after commit — non-zero only on the
  last frame of a transaction, salt-1, salt-2, checksum-1, checksum-2) followed by one page.
* Checksums: the input is read as 32-bit words, little-endian when the magic is 0x377f0682 and
  big-endian when it is 0x377f0683 (``magic & 1``); for each word pair ``s0 += x0 + s1;
  s1 += x1 + s0`` (mod 2**32).  A frame's checksum covers the first 8 bytes of its header and its
  page, seeded with the checksum of the previous frame (the header's checksum for frame 1).

A frame is valid only when its salts equal the header's and the checksum chain holds up to it; the
WAL ends at the first invalid frame.  A transaction counts only when its commit frame is valid, so
readers here report whole transactions up to the last valid commit frame and nothing after it.

This module does no I/O beyond reading the file or bytes it is given (and, for :func:`apply_frames`,
writing the database copy it is given); callers run it in a worker thread.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from daemon.errors import WalError

WAL_HEADER_SIZE = 32
FRAME_HEADER_SIZE = 24
MAGIC_LE = 0x377F0682
MAGIC_BE = 0x377F0683
WAL_FORMAT_VERSION = 3007000
_MASK = 0xFFFFFFFF

_HEADER = struct.Struct(">IIIIIIII")
_FRAME_HEADER = struct.Struct(">IIIIII")


class WalFormatError(WalError):
    """Bytes that should be a WAL header or segment are not."""

    default_fix = "the WAL or segment is damaged; restore from another snapshot or generation"


def _sum_words(words: tuple[int, ...], s0: int, s1: int) -> tuple[int, int]:
    """The checksum recurrence over ``words`` (even count), continuing from (s0, s1)."""
    n = len(words)
    bulk = n - n % 8
    it = iter(words[:bulk] if bulk != n else words)
    # Unrolled by four pairs and masked once per round: the intermediate sums stay far below the
    # sizes where Python ints slow down, and reducing mod 2**32 late gives the same result.
    for a, b, c, d, e, f, g, h in zip(it, it, it, it, it, it, it, it, strict=True):
        s0 += a + s1
        s1 += b + s0
        s0 += c + s1
        s1 += d + s0
        s0 += e + s1
        s1 += f + s0
        s0 += g + s1
        s1 = (s1 + h + s0) & _MASK
        s0 &= _MASK
    for i in range(bulk, n, 2):
        s0 = (s0 + words[i] + s1) & _MASK
        s1 = (s1 + words[i + 1] + s0) & _MASK
    return s0, s1


def wal_checksum(
    data: bytes | memoryview, big_endian: bool, seed: tuple[int, int] = (0, 0)
) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (length a multiple of 8), continuing from ``seed``."""
    n = len(data)
    if n % 8:
        raise ValueError("WAL checksum input must be a multiple of 8 bytes")
    words = struct.unpack(f"{'>' if big_endian else '<'}{n // 4}I", data)
    return _sum_words(words, *seed)


@dataclass(frozen=True, slots=True)
class WalHeader:
    magic: int
    version: int
    page_size: int
    checkpoint_seq: int
    salt1: int
    salt2: int
    checksum: tuple[int, int]

    @property
    def big_endian(self) -> bool:
        """Byte order of the checksum words (the header fields themselves are always big-endian)."""
        return bool(self.magic & 1)

    @classmethod
    def parse(cls, data: bytes) -> WalHeader:
        """Parse and validate a 32-byte WAL header; :class:`WalFormatError` if it is not one."""
        if len(data) < WAL_HEADER_SIZE:
            raise WalFormatError(f"WAL header is {len(data)} bytes, expected {WAL_HEADER_SIZE}")
        magic, version, page_size, seq, salt1, salt2, c0, c1 = _HEADER.unpack_from(data)
        if magic not in (MAGIC_LE, MAGIC_BE):
            raise WalFormatError(f"not a WAL file: magic {magic:#010x}")
        if version != WAL_FORMAT_VERSION:
            raise WalFormatError(f"unsupported WAL format version {version}")
        # SQLite stores 65536 as 1 in the db header, but the WAL header carries the real value.
        if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
            raise WalFormatError(f"invalid WAL page size {page_size}")
        if wal_checksum(data[:24], bool(magic & 1)) != (c0, c1):
            raise WalFormatError("WAL header checksum mismatch")
        return cls(magic, version, page_size, seq, salt1, salt2, (c0, c1))

    @classmethod
    def build(
        cls,
        *,
        page_size: int,
        salt1: int,
        salt2: int,
        checkpoint_seq: int = 0,
        big_endian: bool = False,
    ) -> WalHeader:
        """A valid header (for re-creating a WAL by hand from shipped frames, and for tests)."""
        magic = MAGIC_BE if big_endian else MAGIC_LE
        head = struct.pack(">IIIIII", magic, WAL_FORMAT_VERSION, page_size, checkpoint_seq, salt1, salt2)
        return cls(
            magic, WAL_FORMAT_VERSION, page_size, checkpoint_seq, salt1, salt2, wal_checksum(head, big_endian)
        )

    def to_bytes(self) -> bytes:
        return _HEADER.pack(
            self.magic,
            self.version,
            self.page_size,
            self.checkpoint_seq,
            self.salt1,
            self.salt2,
            *self.checksum,
        )

    def start_position(self) -> WalPosition:
        """Position of frame 1 of this WAL incarnation."""
        return WalPosition(
            self.magic,
            self.page_size,
            self.checkpoint_seq,
            self.salt1,
            self.salt2,
            WAL_HEADER_SIZE,
            self.checksum,
        )


@dataclass(frozen=True, slots=True)
class WalPosition:
    """A point in one WAL incarnation, always at a transaction boundary.

    ``offset`` is where the next frame starts and ``checksum`` the running checksum there; together
    with the header identity (magic, page size, checkpoint seq, salts) this is everything needed to
    validate frames appended after it without re-reading what came before.
    """

    magic: int
    page_size: int
    checkpoint_seq: int
    salt1: int
    salt2: int
    offset: int
    checksum: tuple[int, int]

    @property
    def big_endian(self) -> bool:
        return bool(self.magic & 1)

    @property
    def frame_size(self) -> int:
        return FRAME_HEADER_SIZE + self.page_size

    @property
    def frame_count(self) -> int:
        """Frames before this position in its incarnation."""
        return (self.offset - WAL_HEADER_SIZE) // self.frame_size

    def same_incarnation(self, header: WalHeader) -> bool:
        """Whether ``header`` is the header this position was read under (no restart since)."""
        return (header.magic, header.page_size, header.checkpoint_seq, header.salt1, header.salt2) == (
            self.magic,
            self.page_size,
            self.checkpoint_seq,
            self.salt1,
            self.salt2,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "magic": self.magic,
            "page_size": self.page_size,
            "checkpoint_seq": self.checkpoint_seq,
            "salt1": self.salt1,
            "salt2": self.salt2,
            "offset": self.offset,
            "checksum": list(self.checksum),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WalPosition:
        c = d["checksum"]
        return cls(
            int(d["magic"]),
            int(d["page_size"]),
            int(d["checkpoint_seq"]),
            int(d["salt1"]),
            int(d["salt2"]),
            int(d["offset"]),
            (int(c[0]), int(c[1])),
        )


@dataclass(frozen=True, slots=True)
class Frame:
    offset: int  # of the frame header, in the WAL incarnation it was read from
    pgno: int
    commit_size: int  # db size in pages after the commit; 0 unless this frame commits
    raw: bytes  # frame header + page, exactly as in the WAL file

    @property
    def page(self) -> memoryview:
        return memoryview(self.raw)[FRAME_HEADER_SIZE:]

    @property
    def is_commit(self) -> bool:
        return self.commit_size != 0


@dataclass(frozen=True, slots=True)
class Transaction:
    start: WalPosition
    end: WalPosition
    db_size: int  # pages, from the commit frame
    frames: tuple[Frame, ...]  # empty when read with keep_frames=False

    @property
    def frame_count(self) -> int:
        return (self.end.offset - self.start.offset) // self.start.frame_size


# Why a scan stopped.  Only "eof" and "uncommitted_tail" are normal for a live WAL; the others
# also happen normally while a writer is mid-write or after a restart left old frames behind.
STOP_EOF = "eof"
STOP_PARTIAL_FRAME = "partial_frame"
STOP_SALT_MISMATCH = "salt_mismatch"
STOP_CHECKSUM_MISMATCH = "checksum_mismatch"
STOP_BAD_PGNO = "bad_page_number"
STOP_LIMIT = "limit"
STOP_NO_HEADER = "no_header"
STOP_POSITION_LOST = "position_lost"


@dataclass(frozen=True, slots=True)
class WalRead:
    """Result of reading committed transactions from a WAL."""

    header: WalHeader | None  # None: file missing, shorter than a header, or header invalid
    position: WalPosition | None  # after the last committed transaction (None without header)
    transactions: list[Transaction] = field(default_factory=list)
    restarted: bool = False  # header differs from the position we were asked to continue from
    stop_reason: str = STOP_EOF
    uncommitted_frames: int = 0  # valid frames after the last commit (a transaction in flight)
    file_size: int = 0
    header_error: str | None = None
    # Same header, but the frame that ended at the position is gone or different: frames we had
    # read were rolled back (power loss, or a writer crash before the wal-index was updated) and
    # SQLite has written other frames there under the same salts.
    position_lost: bool = False

    @property
    def frame_count(self) -> int:
        return sum(t.frame_count for t in self.transactions)


def _scan(
    read: Callable[[int], bytes],
    start: WalPosition,
    *,
    keep_frames: bool,
    max_bytes: int | None,
) -> tuple[list[Transaction], WalPosition, str, int]:
    """Validate frames from ``start`` using ``read``; return the committed transactions."""
    page_size = start.page_size
    frame_size = FRAME_HEADER_SIZE + page_size
    big_endian = start.big_endian
    salts = (start.salt1, start.salt2)
    order = ">" if big_endian else "<"
    head_fmt = struct.Struct(f"{order}II")
    page_fmt = struct.Struct(f"{order}{page_size // 4}I")
    s0, s1 = start.checksum
    offset = start.offset
    txn_start = start
    pending: list[Frame] = []
    pending_count = 0
    txns: list[Transaction] = []
    reason = STOP_EOF
    read_bytes = 0
    while True:
        if max_bytes is not None and read_bytes >= max_bytes and txns:
            reason = STOP_LIMIT
            break
        raw = read(frame_size)
        if len(raw) < frame_size:
            reason = STOP_EOF if not raw else STOP_PARTIAL_FRAME
            break
        pgno, commit_size, salt1, salt2, c0, c1 = _FRAME_HEADER.unpack_from(raw)
        if (salt1, salt2) != salts:
            reason = STOP_SALT_MISMATCH
            break
        if pgno == 0:
            reason = STOP_BAD_PGNO
            break
        # The checksum covers frame-header bytes 0..8 (page number, commit size), then the page.
        x0, x1 = head_fmt.unpack_from(raw, 0)
        t0 = (s0 + x0 + s1) & _MASK
        t1 = (s1 + x1 + t0) & _MASK
        t0, t1 = _sum_words(page_fmt.unpack_from(raw, FRAME_HEADER_SIZE), t0, t1)
        if (t0, t1) != (c0, c1):
            reason = STOP_CHECKSUM_MISMATCH
            break
        s0, s1 = t0, t1
        if keep_frames:
            pending.append(Frame(offset, pgno, commit_size, raw))
        pending_count += 1
        offset += frame_size
        read_bytes += frame_size
        if commit_size:
            end = WalPosition(
                start.magic, page_size, start.checkpoint_seq, start.salt1, start.salt2, offset, (s0, s1)
            )
            txns.append(Transaction(txn_start, end, commit_size, tuple(pending)))
            txn_start = end
            pending = []
            pending_count = 0
    return txns, txn_start, reason, pending_count


def read_wal(
    source: str | os.PathLike[str] | BinaryIO,
    position: WalPosition | None = None,
    *,
    keep_frames: bool = True,
    max_bytes: int | None = None,
) -> WalRead:
    """Read the committed transactions of a WAL file, from its start or from ``position``.

    With ``position`` from an earlier read of the same incarnation (same header), only frames
    appended since are read, validated against the running checksum held in ``position``.  If the
    header differs (the WAL was restarted or replaced), ``restarted`` is set and the new incarnation
    is read from its first frame; the caller decides whether it can still prove continuity.

    ``max_bytes`` bounds the frame bytes read per call (at least one whole transaction is returned
    if there is one); ``stop_reason == "limit"`` then says there may be more.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            f: BinaryIO = open(source, "rb")  # closed in finally
        except FileNotFoundError:
            return WalRead(None, None, stop_reason=STOP_NO_HEADER, restarted=position is not None)
        owned = True
    else:
        f = source
        owned = False
    try:
        f.seek(0, io.SEEK_END)
        size = f.tell()
        f.seek(0)
        head = f.read(WAL_HEADER_SIZE)
        if len(head) < WAL_HEADER_SIZE:
            return WalRead(
                None, None, stop_reason=STOP_NO_HEADER, file_size=size, restarted=position is not None
            )
        try:
            header = WalHeader.parse(head)
        except WalFormatError as e:
            return WalRead(
                None,
                None,
                stop_reason=STOP_NO_HEADER,
                file_size=size,
                restarted=position is not None,
                header_error=e.message,
            )
        restarted = position is not None and not position.same_incarnation(header)
        if position is not None and not restarted and not _still_there(f, position, size):
            return WalRead(
                header, position, stop_reason=STOP_POSITION_LOST, file_size=size, position_lost=True
            )
        start = header.start_position() if position is None or restarted else position
        if start.offset > WAL_HEADER_SIZE:
            f.seek(start.offset)
        txns, end, reason, uncommitted = _scan(f.read, start, keep_frames=keep_frames, max_bytes=max_bytes)
        return WalRead(header, end, txns, restarted, reason, uncommitted, size)
    finally:
        if owned:
            f.close()


def _still_there(f: BinaryIO, pos: WalPosition, size: int) -> bool:
    """Whether the frame that ends at ``pos`` is still the commit frame we read there.

    Its header carries the running checksum after it, which is ``pos.checksum``: comparing 24
    bytes proves (to 64 bits) that nothing before the position was rewritten.
    """
    if pos.offset == WAL_HEADER_SIZE:
        return True  # nothing read in this incarnation yet; the header match is the proof
    if size < pos.offset:
        return False
    f.seek(pos.offset - pos.frame_size)
    raw = f.read(FRAME_HEADER_SIZE)
    if len(raw) < FRAME_HEADER_SIZE:
        return False
    _pgno, commit_size, salt1, salt2, c0, c1 = _FRAME_HEADER.unpack(raw)
    return commit_size != 0 and (salt1, salt2) == (pos.salt1, pos.salt2) and (c0, c1) == pos.checksum


def scan_frames(
    data: bytes, start: WalPosition, *, keep_frames: bool = True
) -> tuple[list[Transaction], WalPosition, str, int]:
    """Validate raw frame bytes (as shipped in a segment) that continue from ``start``.

    Returns (transactions, end position, stop reason, uncommitted trailing frames); a caller that
    expects ``data`` to be whole, valid transactions checks ``reason == "eof"`` and no trailing
    frames.
    """
    return _scan(io.BytesIO(data).read, start, keep_frames=keep_frames, max_bytes=None)


def iter_frames(transactions: Iterable[Transaction]) -> Iterator[Frame]:
    for t in transactions:
        yield from t.frames


def apply_frames(
    db_path: str | os.PathLike[str],
    frames: Iterable[Frame],
    page_size: int,
    commit_db_size: int | None,
    *,
    fsync: bool = False,
) -> int:
    """Write ``frames``' pages into a database file and size it to ``commit_db_size`` pages.

    This is what a checkpoint does: later frames of a page overwrite earlier ones, and the file is
    truncated (or extended) to the database size of the last commit applied.  SQLite resizes only
    once, at the end of a WAL incarnation, so a caller applying one incarnation in several calls
    passes ``commit_db_size=None`` (write pages only) until the last one.  Returns pages written.
    """
    if commit_db_size is not None and commit_db_size <= 0:
        raise ValueError("commit_db_size must be the positive page count of a commit frame")
    n = 0
    fd = os.open(db_path, os.O_RDWR)
    try:
        for fr in frames:
            if len(fr.raw) != FRAME_HEADER_SIZE + page_size:
                raise WalFormatError(
                    f"frame for page {fr.pgno} is {len(fr.raw) - FRAME_HEADER_SIZE} bytes, "
                    f"page size is {page_size}"
                )
            os.pwrite(fd, fr.page, (fr.pgno - 1) * page_size)
            n += 1
        if commit_db_size is not None:
            os.ftruncate(fd, commit_db_size * page_size)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return n


def wal_path_for(db_path: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(db_path)}-wal")
