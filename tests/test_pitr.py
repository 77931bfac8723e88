"""Point-in-time restore: property test against a writer process, gaps, damage, encryption."""

from __future__ import annotations

import asyncio
import random
import re
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon.errors import (
    BackupNotFoundError,
    EncryptionError,
    IntegrityError,
    RestoreError,
    UsageError,
    WalError,
)
from daemon.pitr import parse_rfc3339, pitr_window, restore_point_in_time
from daemon.storage import LocalStorage, S3Storage
from daemon.wal import SegmentInfo, WalShipper, load_catalog, parse_ts, split_object
from tests.helpers.s3server import REPO
from tests.helpers.writer import commit_rows, fast_options, init_db, logical_dump, read_log, replay


def run_writer(db: Path, log: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "tests.helpers.writer", "write", str(db), str(log), *args],
        cwd=REPO,
        check=True,
        timeout=120,
    )


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


# ---- RFC 3339 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-10T03:00:00Z", datetime(2026, 1, 10, 3, 0, 0, tzinfo=UTC)),
        ("2026-01-10t03:00:00z", datetime(2026, 1, 10, 3, 0, 0, tzinfo=UTC)),
        ("2026-01-10 03:00:00.25Z", datetime(2026, 1, 10, 3, 0, 0, 250000, tzinfo=UTC)),
        ("2026-01-10T04:30:00.123456789+01:30", datetime(2026, 1, 10, 3, 0, 0, 123456, tzinfo=UTC)),
        ("2026-01-09T22:00:00-05:00", datetime(2026, 1, 10, 3, 0, 0, tzinfo=UTC)),
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ],
)
def test_parse_rfc3339(text: str, expected: datetime) -> None:
    got = parse_rfc3339(text)
    assert got == expected and got.tzinfo == UTC


@pytest.mark.parametrize(
    "text",
    [
        "2026-01-10T03:00:00",
        "2026-01-10",
        "yesterday",
        "2026-13-10T03:00:00Z",
        "2026-01-10T03:00Z",
        "2026-01-10T03:00:00+25:00",
    ],
)
def test_parse_rfc3339_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_rfc3339(text)


# ---- the property --------------------------------------------------------------------------


async def test_restore_at_any_time_equals_the_database_as_of_then(
    db: Path, tmp_path: Path, s3_storage: S3Storage
) -> None:
    """A writer process commits random transactions (page churn, VACUUM, app-forced TRUNCATE
    checkpoints; our checkpoints restart the WAL often).  For many targets T, the restore equals
    the writer's database as of the last commit observed at or before T — and that commit is the
    last one the writer made before T whenever the writer paused around T."""
    opts = fast_options(segment_interval=0.2, checkpoint_pages=40, checkpoint_min_interval=0.1)
    shipper = WalShipper(db, s3_storage, tmp_path / "spool", opts)
    await shipper.start()
    log = tmp_path / "w.log"
    try:
        await asyncio.to_thread(
            run_writer, db, log, "--seed", "42", "--count", "180", "--rate", "100",
            "--checkpoint-every", "37", "--vacuum-every", "61", "--pause-every", "20",
            "--pause", "0.4",
        )  # fmt: skip
        assert await shipper.flush(15)
        gen = shipper.status()["generation"]
    finally:
        await shipper.stop()
    entries = read_log(log)
    assert len(entries) == 180

    # Our clock: the observation time of every commit, in commit order, from segment metadata.
    catalog = await load_catalog(s3_storage)
    assert [g.id for g in catalog] == [gen], "continuity must hold through all of this"
    observed: list[datetime] = []
    for seg in catalog[0].segments:
        meta, _ = split_object(await s3_storage.get_bytes(seg.key))
        observed += [parse_ts(c["at"]) for c in meta["commits"]]
    assert len(observed) == len(entries)
    for e, at in zip(entries, observed, strict=True):
        # Observed after the commit began, and promptly after it ended.
        assert utc(e["t0"]) <= at <= utc(e["t1"]) + timedelta(seconds=1), (e["i"], at)

    rng = random.Random(7)
    start, end = entries[0]["t0"], entries[-1]["t1"] + 0.3
    targets = [utc(rng.uniform(start, end)) for _ in range(14)]
    # In the writer's pauses the answer is exact in its own terms: the last commit before T.
    pauses = [k for k in range(1, len(entries)) if entries[k]["t0"] - entries[k - 1]["t1"] > 0.35]
    assert len(pauses) >= 7
    exact = {utc(entries[k - 1]["t1"] + 0.25): k for k in pauses}
    targets += list(exact)
    targets.sort()

    expected_conn = replay([])
    applied = 0
    dumps: dict[int, Any] = {}
    wanted = sorted({sum(1 for at in observed if at <= t) for t in targets})
    for m in wanted:
        replay(entries[applied:m], into=expected_conn)
        applied = m
        dumps[m] = logical_dump(expected_conn)
    for t in targets:
        m = sum(1 for at in observed if at <= t)
        if t in exact:
            assert m == exact[t], "a commit was observed late, or early"
        out = tmp_path / "pitr" / f"{t.timestamp():.6f}.db"
        res = await restore_point_in_time(s3_storage, t, out)
        assert res.commits_applied == m and res.generation == gen
        assert logical_dump(out) == dumps[m], f"restore at {t} differs from commit {m}"


# ---- failure modes -------------------------------------------------------------------------


async def ship_some(db: Path, tmp_path: Path, storage: Any, batches: int = 5, **kw: Any) -> str:
    shipper = WalShipper(db, storage, tmp_path / "spool", fast_options(**kw))
    await shipper.start()
    try:
        for b in range(batches):
            await asyncio.to_thread(commit_rows, db, b * 10, 10)
            assert await shipper.flush(10)
    finally:
        await shipper.stop()
    return str(shipper.status()["generation"])


async def test_sustained_writes_take_snapshots_so_a_restore_replays_little(
    db: Path, tmp_path: Path, local_storage: LocalStorage
) -> None:
    """`wal.snapshot_after_segments`: a day of non-stop writes must not mean 400k segments to replay."""
    gen = await ship_some(db, tmp_path, local_storage, batches=14, snapshot_after_segments=4)
    (g,) = await load_catalog(local_storage)
    assert g.id == gen and len(g.segments) >= 14
    assert len(g.snapshots) >= 3  # the first, then one per 4 segments
    for before, after in zip(g.snapshots, g.snapshots[1:], strict=False):
        assert after.index - before.index >= 4
    res = await restore_point_in_time(local_storage, None, tmp_path / "latest.db")
    assert res.segments_applied <= 6
    conn = sqlite3.connect(tmp_path / "latest.db")
    try:
        assert conn.execute("SELECT count(*) FROM kv").fetchone()[0] == 140
    finally:
        conn.close()
    # off: snapshots by time only
    (tmp_path / "off").mkdir()
    init_db(tmp_path / "off" / "state.db")
    gen2 = await ship_some(
        tmp_path / "off" / "state.db", tmp_path / "off", local_storage, batches=6, snapshot_after_segments=0
    )
    (g2,) = [x for x in await load_catalog(local_storage) if x.id == gen2]
    assert len(g2.snapshots) == 1


async def test_gap_fails_loudly_but_earlier_times_restore(
    db: Path, tmp_path: Path, local_storage: LocalStorage
) -> None:
    await ship_some(db, tmp_path, local_storage)
    (gen,) = await load_catalog(local_storage)
    assert len(gen.segments) >= 4
    lost = gen.segments[2]
    await local_storage.delete_many([lost.key])
    with pytest.raises(WalError, match=f"segment {lost.index:016x} missing"):
        await restore_point_in_time(local_storage, None, tmp_path / "latest.db")
    with pytest.raises(WalError, match="gap"):
        await restore_point_in_time(local_storage, gen.segments[3].last_at, tmp_path / "after.db")
    before = gen.segments[1].last_at
    res = await restore_point_in_time(local_storage, before, tmp_path / "before.db")
    assert res.segments_applied == 2 and res.restored_to == before
    assert not (tmp_path / "latest.db").exists()  # a failed restore writes nothing


async def test_damaged_objects_are_detected(db: Path, tmp_path: Path, local_storage: LocalStorage) -> None:
    await ship_some(db, tmp_path, local_storage, batches=2)
    (gen,) = await load_catalog(local_storage)
    seg = gen.segments[-1]
    data = bytearray(await local_storage.get_bytes(seg.key))
    data[-10] ^= 1
    await local_storage.put_bytes(seg.key, bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        await restore_point_in_time(local_storage, None, tmp_path / "x.db")
    snap = gen.snapshots[0]
    await local_storage.put_bytes(snap.key, b"garbage")
    with pytest.raises(IntegrityError, match="sha256"):
        await restore_point_in_time(local_storage, None, tmp_path / "y.db")


async def test_target_before_any_snapshot(db: Path, tmp_path: Path, local_storage: LocalStorage) -> None:
    with pytest.raises(BackupNotFoundError):
        await restore_point_in_time(local_storage, None, tmp_path / "none.db")
    await ship_some(db, tmp_path, local_storage, batches=1)
    window = await pitr_window(local_storage)
    assert window is not None
    earliest, latest = window
    assert earliest <= latest
    with pytest.raises(BackupNotFoundError, match="the earliest is") as ei:
        await restore_point_in_time(local_storage, earliest - timedelta(seconds=1), tmp_path / "x.db")
    # times in messages are written the way --at takes them (RFC 3339), not the bucket's key form
    assert re.search(r"at or before \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z in ", ei.value.message)


async def test_encryption_hooks(db: Path, tmp_path: Path, local_storage: LocalStorage) -> None:
    def seal(b: bytes) -> bytes:  # a stand-in cipher: the hook's shape is what is tested
        return b"SEALED" + bytes(x ^ 0x5A for x in b)

    def unseal(b: bytes) -> bytes:
        assert b.startswith(b"SEALED")
        return bytes(x ^ 0x5A for x in b[6:])

    await ship_some(db, tmp_path, local_storage, batches=2, encrypt=seal)
    (gen,) = await load_catalog(local_storage)
    keys = [s.key for s in gen.snapshots] + [s.key for s in gen.segments]
    assert keys and all(k.endswith(".age") for k in keys)
    with pytest.raises(EncryptionError):
        await restore_point_in_time(local_storage, None, tmp_path / "x.db")
    await restore_point_in_time(local_storage, None, tmp_path / "y.db", identity=unseal)
    assert logical_dump(tmp_path / "y.db") == logical_dump(db)


async def test_output_next_to_stale_wal_is_refused(
    db: Path, tmp_path: Path, local_storage: LocalStorage
) -> None:
    await ship_some(db, tmp_path, local_storage, batches=1)
    out = tmp_path / "restored" / "state.db"
    out.parent.mkdir()
    Path(f"{out}-wal").write_bytes(b"old")
    with pytest.raises(RestoreError, match="-wal exists"):
        await restore_point_in_time(local_storage, None, out)
    assert not out.exists()


async def test_segments_are_chained(db: Path, tmp_path: Path, local_storage: LocalStorage) -> None:
    """Two generations' segments cannot be spliced: the WAL positions do not line up."""
    await ship_some(db, tmp_path, local_storage, batches=3)
    (gen,) = await load_catalog(local_storage)
    a, b = gen.segments[0], gen.segments[1]
    # Put segment 1's bytes under a name claiming to be segment 0: hashes match, chain does not.
    data = await local_storage.get_bytes(b.key)
    await local_storage.delete_many([a.key])
    fake = a.key.replace(a.sha256, b.sha256)
    await local_storage.put_bytes(fake, data)
    assert isinstance(
        next(s for s in (await load_catalog(local_storage))[0].segments if s.index == 0), SegmentInfo
    )
    with pytest.raises(IntegrityError, match="metadata of another segment"):
        await restore_point_in_time(local_storage, None, tmp_path / "x.db")


async def test_age_encryption_end_to_end(db: Path, tmp_path: Path, local_storage: LocalStorage) -> None:
    """With issue 8's age Encryptor/Decryptor: objects are age files, restore needs the key."""
    from daemon.crypto import Decryptor, Encryptor, generate_keypair, is_age, write_new_identity

    kp = generate_keypair()
    await ship_some(db, tmp_path, local_storage, batches=2, encrypt=Encryptor([kp.recipient]))
    (gen,) = await load_catalog(local_storage)
    assert is_age(await local_storage.get_bytes(gen.snapshots[0].key))
    assert is_age(await local_storage.get_bytes(gen.segments[0].key))
    key_file = tmp_path / "key.txt"
    await asyncio.to_thread(write_new_identity, key_file, kp)
    right = Decryptor.from_file(key_file)
    other = tmp_path / "other.txt"
    await asyncio.to_thread(write_new_identity, other, generate_keypair())
    with pytest.raises(EncryptionError):
        await restore_point_in_time(
            local_storage, None, tmp_path / "x.db", identity=Decryptor.from_file(other)
        )
    await restore_point_in_time(local_storage, None, tmp_path / "y.db", identity=right)
    assert logical_dump(tmp_path / "y.db") == logical_dump(db)
