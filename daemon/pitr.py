"""Point-in-time restore of ``state.db`` from shipped WAL (layout: see :mod:`daemon.wal`).

``restore_point_in_time`` picks the generation and snapshot at or before the target, verifies the
sha256 of every object it downloads, replays contiguous segments into a copy of the snapshot up to
the last commit observed at or before the target (pages written straight into the file, the file
sized as SQLite's checkpoint would), fails loudly naming any gap, runs ``PRAGMA integrity_check``
and only then moves the result to ``output`` atomically.  It never touches a live database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import structlog
import zstandard

from daemon.errors import (
    BackupNotFoundError,
    EncryptionError,
    IntegrityError,
    RestoreError,
    UsageError,
    WalError,
)
from daemon.fsutil import fsync_dir
from daemon.snapshot import integrity_check
from daemon.storage import Storage
from daemon.streams import CHUNK, HashingStream, write_stream
from daemon.wal import (
    SEGMENT_FORMAT,
    SNAPSHOT_FORMAT,
    GenerationInfo,
    SegmentInfo,
    SnapshotInfo,
    choose_base,
    format_ts,
    load_catalog,
    parse_ts,
    split_object,
)
from daemon.walfile import (
    STOP_EOF,
    WAL_HEADER_SIZE,
    Transaction,
    WalHeader,
    WalPosition,
    apply_frames,
    scan_frames,
)

log = structlog.get_logger(__name__)

Decryptor = Callable[[bytes], bytes]

_RFC3339 = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<h>\d{2}):(?P<m>\d{2}):(?P<s>\d{2})"
    r"(?:\.(?P<frac>\d+))?(?P<tz>[Zz]|[+-]\d{2}:\d{2})$"
)


def parse_rfc3339(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (``Z`` or ``±hh:mm``, any fraction of a second) into UTC.

    Fractions beyond microseconds are truncated, never rounded up: a restore target must not move
    past a commit it did not name.
    """
    m = _RFC3339.match(text.strip())
    if not m:
        raise UsageError(
            f"{text!r} is not an RFC 3339 time",
            "write it like 2026-01-10T03:00:00Z or 2026-01-10T04:00:00.250+01:00",
        )
    frac = (m["frac"] or "")[:6].ljust(6, "0")
    sec = int(m["s"])
    leap = sec == 60  # a leap second: the last instant of that minute
    try:
        base = datetime.fromisoformat(f"{m['date']}T{m['h']}:{m['m']}:{59 if leap else sec:02d}")
    except ValueError:
        raise UsageError(
            f"{text!r} is not a valid date and time", "check the month, day and hour fields"
        ) from None
    tz = m["tz"]
    if tz in ("Z", "z"):
        offset = timedelta(0)
    else:
        hh, mm = int(tz[1:3]), int(tz[4:6])
        if hh > 23 or mm > 59:
            raise UsageError(f"{text!r} has an invalid UTC offset", "use ±hh:mm, e.g. +02:00")
        offset = timedelta(hours=hh, minutes=mm) * (1 if tz[0] == "+" else -1)
    dt = base.replace(microsecond=999999 if leap else int(frac), tzinfo=timezone(offset))
    return dt.astimezone(UTC)


def _rfc3339(dt: datetime) -> str:
    """Times users read are RFC 3339, the form `restore --at` takes back."""
    return dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class PitrResult:
    output: Path
    target: datetime | None
    generation: str
    snapshot_key: str
    snapshot_taken_at: datetime
    segments_applied: int
    commits_applied: int
    restored_to: datetime  # observed time of the last commit applied (or of the snapshot)
    last_available_at: datetime | None  # newest commit the bucket holds for this generation
    size_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "target": _rfc3339(self.target) if self.target else None,
            "generation": self.generation,
            "snapshot": self.snapshot_key,
            "snapshot_taken_at": _rfc3339(self.snapshot_taken_at),
            "segments_applied": self.segments_applied,
            "commits_applied": self.commits_applied,
            "restored_to": _rfc3339(self.restored_to),
            "last_available_at": (_rfc3339(self.last_available_at) if self.last_available_at else None),
            "size_bytes": self.size_bytes,
        }


async def pitr_window(storage: Storage) -> tuple[datetime, datetime] | None:
    """(earliest, latest) times a point-in-time restore can reach, or None without WAL data."""
    catalog = await load_catalog(storage)
    usable = [g for g in catalog if g.snapshots]
    if not usable:
        return None
    earliest = min(s.taken_at for g in usable for s in g.snapshots)
    latest = max(g.last_at for g in usable if g.last_at is not None)
    return earliest, latest


def _identity(p: WalPosition) -> tuple[int, int, int, int, int]:
    return (p.magic, p.page_size, p.checkpoint_seq, p.salt1, p.salt2)


def _decrypt(data: bytes, key: str, encrypted: bool, identity: Decryptor | None) -> bytes:
    if not encrypted:
        return data
    if identity is None:
        raise EncryptionError(f"{key} is encrypted and no identity was given")
    return identity(data)


def _check_sha(data: bytes | memoryview, expected: str, key: str) -> None:
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise IntegrityError(f"{key} is damaged: sha256 {got[:16]}… does not match its name")


@dataclass
class _Segment:
    info: SegmentInfo
    start: WalPosition
    end: WalPosition
    transactions: list[Transaction]
    commit_times: list[datetime]


def _decode_segment(data: bytes, info: SegmentInfo, identity: Decryptor | None) -> _Segment:
    """Verify and parse one segment: hashes, metadata, and the WAL checksum chain of every frame."""
    _check_sha(data, info.sha256, info.key)
    data = _decrypt(data, info.key, info.encrypted, identity)
    meta, payload = split_object(data)
    if meta.get("format") != SEGMENT_FORMAT or meta.get("version") != 1:
        raise WalError(f"{info.key} is not a segment this version can read", "upgrade tinyserve-backup")
    if meta.get("generation") != info.generation or meta.get("index") != info.index:
        raise IntegrityError(f"{info.key} carries metadata of another segment")
    try:
        raw = zstandard.ZstdDecompressor().decompress(
            bytes(payload), max_output_size=int(meta["raw_bytes"]) or 1
        )
    except zstandard.ZstdError as e:
        raise IntegrityError(f"{info.key} does not decompress: {e}") from None
    if len(raw) != meta["raw_bytes"] or hashlib.sha256(raw).hexdigest() != meta["raw_sha256"]:
        raise IntegrityError(f"{info.key}: WAL frames do not match their recorded sha256")
    start = WalPosition(
        int(meta["magic"]),
        int(meta["page_size"]),
        int(meta["checkpoint_seq"]),
        int(meta["salt1"]),
        int(meta["salt2"]),
        int(meta["start_offset"]),
        (int(meta["start_checksum"][0]), int(meta["start_checksum"][1])),
    )
    txns, end, reason, trailing = scan_frames(raw, start)
    commits = meta["commits"]
    ok = (
        reason == STOP_EOF
        and trailing == 0
        and end.offset == meta["end_offset"]
        and list(end.checksum) == meta["end_checksum"]
        and len(txns) == len(commits)
    )
    if ok:
        frames = 0
        for t, c in zip(txns, commits, strict=True):
            frames += t.frame_count
            ok = ok and frames == c["frames"] and t.db_size == c["db_size"]
    if not ok:
        raise IntegrityError(f"{info.key}: WAL frames fail validation ({reason})")
    return _Segment(info, start, end, txns, [parse_ts(c["at"]) for c in commits])


async def _download_to(storage: Storage, key: str, dest: Path) -> str:
    """Stream an object to ``dest``; returns the sha256 of what was received."""
    hs = HashingStream(storage.download_stream(key))
    await write_stream(hs, dest)
    return hs.sha256


def _unpack_snapshot(src: Path, dest: Path, snap: SnapshotInfo) -> dict[str, Any]:
    """Metadata frame + zstd stream in ``src`` → database file ``dest``; verifies its sha256."""
    with open(src, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise IntegrityError(f"{snap.key} is truncated")
        _magic, n = struct.unpack("<II", head)
        meta, _ = split_object(head + f.read(n))
        if meta.get("format") != SNAPSHOT_FORMAT or meta.get("version") != 1:
            raise WalError(f"{snap.key} is not a snapshot this version can read", "upgrade tinyserve-backup")
        if meta.get("generation") != snap.generation or meta.get("index") != snap.index:
            raise IntegrityError(f"{snap.key} carries metadata of another snapshot")
        h = hashlib.sha256()
        with open(dest, "wb") as out:
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            try:
                while chunk := reader.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
            except zstandard.ZstdError as e:
                raise IntegrityError(f"{snap.key} does not decompress: {e}") from None
    if h.hexdigest() != meta.get("db_sha256"):
        raise IntegrityError(f"{snap.key}: database does not match its recorded sha256")
    return meta


def _integrity_check(path: Path) -> None:
    result = integrity_check(path)
    if result != "ok":
        raise IntegrityError(f"the restored database fails PRAGMA integrity_check: {result}")


def _check_output(output: Path) -> None:
    for side in ("-wal", "-shm"):
        if Path(f"{output}{side}").exists():
            raise RestoreError(
                f"{output}{side} exists beside the output file; SQLite would replay it into the "
                "restored database",
                f"move {output}{side} away (it belongs to the database being replaced)",
            )
    output.parent.mkdir(parents=True, exist_ok=True)


def _publish(tmp: Path, output: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, output)
    fsync_dir(output.parent)


def _plan(gen: GenerationInfo, snap: SnapshotInfo, target: datetime | None) -> list[SegmentInfo]:
    """Segments to replay after ``snap``; raises on a gap that the target depends on."""
    plan: list[SegmentInfo] = []
    expected = snap.index
    prev_last = snap.taken_at
    for seg in (s for s in gen.segments if s.index >= snap.index):
        if target is not None and seg.first_at > target:
            # A missing segment holds commits observed after prev_last (observation times are
            # strictly increasing across segments): needed only if the target is later.
            if seg.index != expected and target > prev_last:
                raise _gap(gen, expected, seg.index, prev_last)
            break
        if seg.index != expected:
            raise _gap(gen, expected, seg.index, prev_last)
        plan.append(seg)
        expected += 1
        prev_last = seg.last_at
    return plan


def _gap(gen: GenerationInfo, expected: int, found: int, after: datetime) -> WalError:
    missing = (
        f"segment {expected:016x}" if found == expected + 1 else f"segments {expected:016x}…{found - 1:016x}"
    )
    return WalError(
        f"WAL generation {gen.id} has a gap: {missing} missing (history after "
        f"{_rfc3339(after)} cannot be replayed)",
        "restore to an earlier time, or from a backup; run `tinyserve-backup verify --all`",
    )


async def restore_point_in_time(
    storage: Storage,
    target: datetime | None,
    output: Path,
    identity: Decryptor | None = None,
    *,
    concurrency: int = 4,
) -> PitrResult:
    """Rebuild ``state.db`` as of ``target`` (None: the latest shipped commit) into ``output``.

    ``identity`` decrypts objects stored encrypted (``.age``); issue 8 passes one built from the
    age identity file.  ``output`` is replaced atomically, and only by a database that passed
    every check.
    """
    if target is not None and target.tzinfo is None:
        raise UsageError("the restore time has no time zone", "add Z or an offset like +02:00")
    output = Path(output)
    await asyncio.to_thread(_check_output, output)
    catalog = await load_catalog(storage)
    base = choose_base(catalog, target)
    if base is None:
        snaps = [s.taken_at for g in catalog for s in g.snapshots]
        # (RFC 3339, as `--at` takes it, not the compact form of the bucket's keys)
        when = "" if target is None else f" at or before {_rfc3339(target)}"
        earliest = f"; the earliest is {_rfc3339(min(snaps))}" if snaps else ""
        raise BackupNotFoundError(
            f"no WAL snapshot{when} in {storage.url}{earliest}",
            "pick a later time, or restore a backup with `restore TS`",
        )
    gen, snap = base
    plan = _plan(gen, snap, target)
    log.info(
        "pitr_restore_started",
        target=format_ts(target) if target else "latest",
        generation=gen.id,
        snapshot=snap.key,
        segments=len(plan),
    )

    token = secrets.token_hex(4)
    tmp = output.parent / f".{output.name}.pitr-{token}"
    dl = output.parent / f".{output.name}.pitr-{token}.download"
    sealed = output.parent / f".{output.name}.pitr-{token}.age"
    try:
        if snap.encrypted:
            if identity is None:
                raise EncryptionError(f"{snap.key} is encrypted and no identity was given")
            decrypt_file = getattr(identity, "decrypt_file", None)
            if decrypt_file is not None:  # streams: memory stays flat whatever the db size
                got = await _download_to(storage, snap.key, sealed)
                if got != snap.sha256:
                    raise IntegrityError(f"{snap.key} is damaged: sha256 does not match its name")
                await asyncio.to_thread(decrypt_file, sealed, dl)
                await asyncio.to_thread(sealed.unlink)
            else:
                data = await storage.get_bytes(snap.key)
                _check_sha(data, snap.sha256, snap.key)
                await asyncio.to_thread(dl.write_bytes, identity(data))
        else:
            got = await _download_to(storage, snap.key, dl)
            if got != snap.sha256:
                raise IntegrityError(f"{snap.key} is damaged: sha256 does not match its name")
        meta = await asyncio.to_thread(_unpack_snapshot, dl, tmp, snap)
        dl.unlink(missing_ok=True)
        page_size = int(meta["page_size"])
        pos = WalPosition.from_dict(meta["position"]) if meta.get("position") else None
        result = await _replay(storage, plan, tmp, page_size, pos, target, identity, concurrency)
        commits, segments, restored_to = result
        await asyncio.to_thread(_integrity_check, tmp)
        size = tmp.stat().st_size
        await asyncio.to_thread(_publish, tmp, output)
    finally:
        for p in (tmp, dl, sealed, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    res = PitrResult(
        output=output,
        target=target,
        generation=gen.id,
        snapshot_key=snap.key,
        snapshot_taken_at=snap.taken_at,
        segments_applied=segments,
        commits_applied=commits,
        restored_to=restored_to or snap.taken_at,
        last_available_at=gen.last_at,
        size_bytes=size,
    )
    log.info("pitr_restore_done", **res.as_dict())
    return res


async def _replay(
    storage: Storage,
    plan: list[SegmentInfo],
    db: Path,
    page_size: int,
    pos: WalPosition | None,
    target: datetime | None,
    identity: Decryptor | None,
    concurrency: int,
) -> tuple[int, int, datetime | None]:
    """Apply ``plan`` to ``db``; (commits applied, segments applied, time of the last commit)."""
    commits = 0
    segments = 0
    restored_to: datetime | None = None
    # Pages go in as they come; the file is sized only when a WAL incarnation ends, as SQLite's
    # checkpoint does (a page past an intermediate commit's size may still be read later).
    pending_size: int | None = None
    window = max(1, concurrency)
    tasks: dict[int, asyncio.Task[bytes]] = {}

    def prefetch(i: int) -> None:
        if i < len(plan) and i not in tasks:
            tasks[i] = asyncio.create_task(storage.get_bytes(plan[i].key))

    try:
        for i in range(min(window, len(plan))):
            prefetch(i)
        for i, info in enumerate(plan):
            data = await tasks.pop(i)
            prefetch(i + window)
            seg = await asyncio.to_thread(_decode_segment, data, info, identity)
            if seg.start.page_size != page_size:
                raise IntegrityError(
                    f"{info.key}: page size {seg.start.page_size} differs from the snapshot's {page_size}"
                )
            if pos is not None and _identity(pos) == _identity(seg.start):
                if (seg.start.offset, seg.start.checksum) != (pos.offset, pos.checksum):
                    raise WalError(
                        f"{info.key} does not continue where the previous object ended "
                        f"(WAL offset {seg.start.offset}, expected {pos.offset})",
                        "restore to an earlier time; run `tinyserve-backup verify --all`",
                    )
            else:
                fresh = WalHeader.build(
                    page_size=seg.start.page_size,
                    salt1=seg.start.salt1,
                    salt2=seg.start.salt2,
                    checkpoint_seq=seg.start.checkpoint_seq,
                    big_endian=seg.start.big_endian,
                )
                if seg.start.offset != WAL_HEADER_SIZE or seg.start.checksum != fresh.checksum:
                    raise WalError(
                        f"{info.key} starts mid-WAL but does not follow the previous object",
                        "restore to an earlier time; run `tinyserve-backup verify --all`",
                    )
                # The previous incarnation was checkpointed completely before this one began.
                if pending_size is not None:
                    await asyncio.to_thread(apply_frames, db, [], page_size, pending_size)
                    pending_size = None
            stop = False
            for txn, at in zip(seg.transactions, seg.commit_times, strict=True):
                if target is not None and at > target:
                    stop = True
                    break
                await asyncio.to_thread(apply_frames, db, txn.frames, page_size, None)
                pending_size = txn.db_size
                commits += 1
                restored_to = at
            segments += 1
            pos = seg.end
            if stop:
                break
        if pending_size is not None:
            await asyncio.to_thread(apply_frames, db, [], page_size, pending_size)
    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    return commits, segments, restored_to
