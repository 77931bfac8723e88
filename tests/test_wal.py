"""WAL shipper: real SQLite, real files, real S3 protocol (moto) through a fault proxy."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import zstandard
from structlog.testing import capture_logs

from daemon.errors import BackupNotFoundError, LeaseHeldError
from daemon.pitr import restore_point_in_time
from daemon.storage import LocalStorage, S3Storage
from daemon.wal import (
    LEASE_KEY,
    SegmentInfo,
    SnapshotInfo,
    WalShipper,
    format_ts,
    load_catalog,
    parse_wal_key,
    prune_wal,
    split_object,
)
from daemon.walfile import read_wal
from tests.conftest import s3_settings, wait_for
from tests.helpers.s3server import REPO, FaultProxy, MotoServer
from tests.helpers.writer import (
    RecordingStorage,
    commit_rows,
    fast_options,
    init_db,
    logical_dump,
    read_log,
    replay,
)


async def restore_latest(storage: Any, out: Path) -> dict[str, list[tuple[Any, ...]]]:
    await asyncio.to_thread(out.unlink, missing_ok=True)
    await restore_point_in_time(storage, None, out)
    return logical_dump(out)


def run_bytes(argv: list[str], data: bytes) -> bytes:
    return subprocess.run(argv, input=data, capture_output=True, check=True).stdout


def wal_size(db: Path) -> int:
    return Path(f"{db}-wal").stat().st_size if Path(f"{db}-wal").exists() else -1


def start_helper(out: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(out, "wb") as f:  # a file, not a pipe nobody drains
        return subprocess.Popen([sys.executable, "-m", "tests.helpers.writer", *args], cwd=REPO, stdout=f)


def has_line(path: Path, prefix: str) -> bool:
    try:
        return any(line.startswith(prefix) for line in path.read_text().splitlines())
    except FileNotFoundError:
        return False


def start_writer(db: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.writer", "write", str(db), str(log), *args], cwd=REPO
    )


def log_lines(log: Path) -> int:
    try:
        return sum(1 for _ in open(log))
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------------------------


async def test_ships_commits_and_restores_latest(
    db: Path, tmp_path: Path, local_storage: LocalStorage
) -> None:
    shipper = WalShipper(db, local_storage, tmp_path / "spool", fast_options())
    await shipper.start()
    try:
        await asyncio.to_thread(commit_rows, db, 0, 200)
        assert await shipper.flush(10)
        st = shipper.status()
        assert st["state"] == "shipping" and st["wal_mode"] is True
        assert st["spool_bytes"] == 0 and st["pending_commits"] == 0
        assert st["last_shipped_commit_at"] is not None and st["last_error"] is None
        assert st["lease_holder"] == shipper.holder_id
        assert await restore_latest(local_storage, tmp_path / "out.db") == logical_dump(db)
    finally:
        await shipper.stop()
    assert shipper.status()["state"] == "stopped"
    assert await local_storage.head(LEASE_KEY) is None  # released on stop
    # Nothing was written into state.db: no tables besides the application's.
    names = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master")}
    assert names == {"kv", "events", "events_at", "sqlite_autoindex_kv_1"}


async def test_layout_and_metadata(db: Path, tmp_path: Path, local_storage: LocalStorage) -> None:
    shipper = WalShipper(db, local_storage, tmp_path / "spool", fast_options())
    await shipper.start()
    try:
        for i in range(3):
            await asyncio.to_thread(commit_rows, db, i * 10, 10)
            assert await shipper.flush(10)
    finally:
        await shipper.stop()
    objs = await local_storage.list("wal/")
    infos = [parse_wal_key(o.key) for o in objs if o.key != LEASE_KEY]
    assert infos and all(i is not None for i in infos), [o.key for o in objs]
    snaps = [i for i in infos if isinstance(i, SnapshotInfo)]
    segs = [i for i in infos if isinstance(i, SegmentInfo)]
    assert len(snaps) == 1 and snaps[0].index == 0
    assert [s.index for s in segs] == list(range(len(segs))) and len(segs) >= 3
    for s in segs:
        data = await local_storage.get_bytes(s.key)
        meta, payload = split_object(data)
        assert meta["generation"] == s.generation and meta["index"] == s.index
        assert meta["page_size"] == 4096 and meta["commits"]
        assert meta["commits"][-1]["at"] == format_ts(s.last_at)
        # zstd -d skips the metadata frame and yields the raw WAL frames.
        raw = await asyncio.to_thread(run_bytes, ["zstd", "-dcq"], data)
        assert len(raw) == meta["raw_bytes"] and len(raw) % (24 + 4096) == 0
        assert raw == zstandard.ZstdDecompressor().decompress(bytes(payload))
    # A snapshot decompresses by hand into a database SQLite opens.
    snap_db = tmp_path / "by-hand.db"
    snap_bytes = await local_storage.get_bytes(snaps[0].key)
    await asyncio.to_thread(
        snap_db.write_bytes, await asyncio.to_thread(run_bytes, ["zstd", "-dcq"], snap_bytes)
    )
    assert sqlite3.connect(snap_db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_idle_makes_no_storage_requests(db: Path, tmp_path: Path, local_storage: LocalStorage) -> None:
    rec = RecordingStorage(local_storage)
    shipper = WalShipper(
        db,
        rec,
        tmp_path / "spool",
        fast_options(poll_interval=0.05),
    )
    await shipper.start()
    try:
        await asyncio.to_thread(commit_rows, db, 0, 5)
        assert await shipper.flush(10)
        rec.calls.clear()
        polls_before = time.monotonic()
        await asyncio.sleep(1.0)  # twenty safety polls' worth of idleness
        assert time.monotonic() - polls_before >= 1.0
        assert rec.calls == []
        # ... and the next commit is shipped promptly after the idle spell, lease renewed or not.
        await asyncio.to_thread(commit_rows, db, 5, 1)
        await wait_for(
            lambda: any(k == "put" and "/segments/" in key for k, key in rec.calls), 5, "a segment upload"
        )
    finally:
        await shipper.stop()


async def test_watch_events_drive_low_lag(db: Path, tmp_path: Path, local_storage: LocalStorage) -> None:
    # The safety poll is far away: only file events can make this fast.
    rec = RecordingStorage(local_storage)
    shipper = WalShipper(
        db,
        rec,
        tmp_path / "spool",
        fast_options(poll_interval=30),
    )
    await shipper.start()
    try:
        lags = []
        for i in range(5):
            n = len(rec.put_done)
            t = time.time()
            await asyncio.to_thread(commit_rows, db, i, 1)
            await wait_for(lambda n=n: len(rec.put_done) > n, 5, "an upload")  # type: ignore[misc]
            lags.append(max(rec.put_done.values()) - t)
        assert max(lags) < 5.0, lags  # far below the 30 s poll: events did it (lag is measured elsewhere)
    finally:
        await shipper.stop()


async def test_safety_poll_alone_ships(db: Path, tmp_path: Path, local_storage: LocalStorage) -> None:
    shipper = WalShipper(db, local_storage, tmp_path / "spool", fast_options(watch=False, poll_interval=0.1))
    await shipper.start()
    try:
        await asyncio.to_thread(commit_rows, db, 0, 3)
        await wait_for(
            lambda: shipper.status()["last_shipped_commit_at"] is not None, 5, "the poll to notice the commit"
        )
    finally:
        await shipper.stop()
    assert await restore_latest(local_storage, tmp_path / "out.db") == logical_dump(db)


async def test_checkpoints_keep_continuity_with_app_truncate(
    db: Path,
    tmp_path: Path,
    local_storage: LocalStorage,
) -> None:
    opts = fast_options(checkpoint_pages=30, checkpoint_min_interval=0.05, truncate_bytes=400 * 1024)
    shipper = WalShipper(db, local_storage, tmp_path / "spool", opts)
    await shipper.start()
    gen = shipper.status()["generation"]
    log = tmp_path / "w.log"
    writer = start_writer(
        db,
        log,
        "--seed",
        "7",
        "--count",
        "250",
        "--rate",
        "300",
        "--checkpoint-every",
        "25",
        "--vacuum-every",
        "90",
    )
    try:
        await asyncio.to_thread(writer.wait, 60)
        assert writer.returncode == 0
        assert await shipper.flush(10)
        st = shipper.status()
        assert st["checkpoints"] > 0
        assert st["generation"] == gen, "a checkpoint must never break continuity"
        assert st["last_error"] is None
    finally:
        writer.kill()
        await shipper.stop()
    # The WAL was kept small by our checkpoints (TRUNCATE once it passed the bound).
    assert await asyncio.to_thread(wal_size, db) < 3 * 1024 * 1024
    expected = logical_dump(replay(read_log(log)))
    assert logical_dump(db) == expected
    assert await restore_latest(local_storage, tmp_path / "out.db") == expected


async def test_restart_continues_generation(db: Path, tmp_path: Path, local_storage: LocalStorage) -> None:
    # tinyserved keeps its connection open; otherwise the last connection to close deletes the
    # WAL and a restarted shipper rightly cannot prove continuity.
    app = sqlite3.connect(db)
    app.execute("SELECT count(*) FROM sqlite_master").fetchone()
    spool = tmp_path / "spool"
    first = WalShipper(db, local_storage, spool, fast_options())
    await first.start()
    gen = first.status()["generation"]
    await asyncio.to_thread(commit_rows, db, 0, 20)
    await first.stop()
    await asyncio.to_thread(commit_rows, db, 20, 20)  # while no shipper runs
    second = WalShipper(db, local_storage, spool, fast_options())
    await second.start()
    try:
        assert second.status()["generation"] == gen
        await asyncio.to_thread(commit_rows, db, 40, 20)
        assert await second.flush(10)
    finally:
        await second.stop()
    cat = await load_catalog(local_storage)
    assert [g.id for g in cat] == [gen] and len(cat[0].snapshots) == 1
    assert await restore_latest(local_storage, tmp_path / "out.db") == logical_dump(db)
    app.close()


async def test_wal_reset_while_down_starts_new_generation(
    db: Path,
    tmp_path: Path,
    local_storage: LocalStorage,
) -> None:
    spool = tmp_path / "spool"
    first = WalShipper(db, local_storage, spool, fast_options())
    await first.start()
    gen = first.status()["generation"]
    await asyncio.to_thread(commit_rows, db, 0, 20)
    await first.stop()
    # While nobody watches, the application checkpoints and restarts the WAL: the frames we
    # never saw are gone, so the next shipper cannot place what follows.
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("INSERT INTO kv VALUES ('unseen', x'00', 0)")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("INSERT INTO kv VALUES ('after', x'01', 1)")
    conn.close()
    second = WalShipper(db, local_storage, spool, fast_options())
    await second.start()
    try:
        assert second.status()["generation"] != gen
        await asyncio.to_thread(commit_rows, db, 20, 10)
        assert await second.flush(10)
    finally:
        await second.stop()
    assert len(await load_catalog(local_storage)) == 2
    assert await restore_latest(local_storage, tmp_path / "out.db") == logical_dump(db)


async def test_not_wal_mode_is_snapshot_only(
    tmp_path: Path, local_storage: LocalStorage, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    db = root / "state.db"
    init_db(db, wal=False)
    await asyncio.to_thread(commit_rows, db, 0, 10)
    shipper = WalShipper(
        db, local_storage, tmp_path / "spool", fast_options(snapshot_interval=0.3, poll_interval=0.05)
    )
    await shipper.start()
    try:
        st = shipper.status()
        assert st["state"] == "snapshot_only" and st["wal_mode"] is False
        await wait_for(lambda: shipper.status()["uploaded_objects"] >= 1, 5, "a snapshot")
        await asyncio.to_thread(commit_rows, db, 10, 10)
        await wait_for(lambda: shipper.status()["uploaded_objects"] >= 3, 10, "periodic snapshots")
    finally:
        await shipper.stop()
    assert await asyncio.to_thread(wal_size, db) == -1
    assert await restore_latest(local_storage, tmp_path / "out.db") == logical_dump(db)


# ---- lease ---------------------------------------------------------------------------------


async def test_second_shipper_on_prefix_refuses(
    db: Path, tmp_path: Path, s3_server: MotoServer, bucket: str, s3_storage: S3Storage
) -> None:
    first = WalShipper(db, s3_storage, tmp_path / "spool1", fast_options())
    await first.start()
    try:
        # A second daemon (its own process) for the same prefix refuses and says who ships.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.helpers.writer", "ship", str(db), str(tmp_path / "spool2"),
            "--s3", s3_server.endpoint, bucket, "tb",
            cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == LeaseHeldError.exit_code, err
        assert b"another WAL shipper holds the lease" in err and f"pid {os.getpid()}".encode() in err
        # Another installation in this process, same prefix: refused as well.
        other_db = tmp_path / "other" / "state.db"
        await asyncio.to_thread(other_db.parent.mkdir)
        await asyncio.to_thread(init_db, other_db)
        other = WalShipper(other_db, s3_storage, tmp_path / "spool3", fast_options())
        with pytest.raises(LeaseHeldError, match="another WAL shipper holds the lease"):
            await other.start()
        assert other.status()["state"] == "stopped"
        # Same machine, same spool: refused before touching the bucket.
        same = WalShipper(db, s3_storage, tmp_path / "spool1", fast_options())
        with pytest.raises(LeaseHeldError, match="spool"):
            await same.start()
        # The first one is unaffected.
        await asyncio.to_thread(commit_rows, db, 0, 5)
        assert await first.flush(10)
    finally:
        await first.stop()
    assert await restore_latest(s3_storage, tmp_path / "out.db") == logical_dump(db)


async def test_stale_leases_are_taken_over(db: Path, tmp_path: Path, local_storage: LocalStorage) -> None:
    past = datetime.now(UTC) - timedelta(minutes=1)
    await local_storage.put_bytes(
        LEASE_KEY,
        json.dumps(
            {"holder": "elsewhere:1:x", "host": "elsewhere", "pid": 1, "expires_at": format_ts(past)}
        ).encode(),
    )
    s1 = WalShipper(db, local_storage, tmp_path / "spool", fast_options())
    await s1.start()
    assert json.loads(await local_storage.get_bytes(LEASE_KEY))["holder"] == s1.holder_id
    await s1.stop()
    # Not expired, but its holder is a dead process on this host (a kill -9).
    dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await dead.wait()
    future = datetime.now(UTC) + timedelta(hours=1)
    await local_storage.put_bytes(
        LEASE_KEY,
        json.dumps(
            {"holder": "x", "host": os.uname().nodename, "pid": dead.pid, "expires_at": format_ts(future)}
        ).encode(),
    )
    s2 = WalShipper(db, local_storage, tmp_path / "spool", fast_options())
    await s2.start()
    assert json.loads(await local_storage.get_bytes(LEASE_KEY))["holder"] == s2.holder_id
    await s2.stop()


async def test_lease_taken_by_another_fences_the_shipper(
    db: Path, tmp_path: Path, local_storage: LocalStorage
) -> None:
    shipper = WalShipper(db, local_storage, tmp_path / "spool", fast_options(lease_ttl=0.3))
    await shipper.start()
    try:
        await local_storage.put_bytes(LEASE_KEY, lease_of("intruder"))
        await asyncio.sleep(0.15)  # past the renewal point (ttl/3)
        await asyncio.to_thread(commit_rows, db, 0, 3)
        await wait_for(lambda: shipper.status()["state"] == "fenced", 5, "the shipper to stop")
        assert "intruder" in (shipper.status()["last_error"] or "")
    finally:
        await shipper.stop(timeout=1)
    # It did not delete the other holder's lease on its way out.
    assert json.loads(await local_storage.get_bytes(LEASE_KEY))["holder"] == "intruder:2:y"


def lease_of(holder: str, *, valid_for: timedelta = timedelta(hours=1)) -> bytes:
    """A lease as another shipper (on host ``holder``) would write it."""
    return json.dumps(
        {
            "holder": f"{holder}:2:y",
            "host": holder,
            "pid": 2,
            "expires_at": format_ts(datetime.now(UTC) + valid_for),
        }
    ).encode()


@pytest.fixture(params=["local", "s3"])
def any_storage(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue("local_storage" if request.param == "local" else "s3_storage")


async def test_a_takeover_between_a_renewals_read_and_write_wins(
    db: Path, tmp_path: Path, any_storage: Any
) -> None:
    """Our lease lapsed (a Mac asleep) and another shipper took it just after our renewal read it.

    The renewal's write is conditional on what it read, so it loses: this shipper stops instead of
    overwriting the other's lease and both shipping into one prefix.
    """
    storage = any_storage
    shipper = WalShipper(db, storage, tmp_path / "spool", fast_options(lease_ttl=0.3))
    intruder = lease_of("intruder")
    real_read = shipper._read_lease
    raced = asyncio.Event()

    async def read_then_lose_the_race() -> Any:
        got = await real_read()
        if shipper._lease_held and not raced.is_set():
            raced.set()
            # the other shipper's takeover lands now, after our read, before our write
            await storage.put_bytes(LEASE_KEY, intruder)
        return got

    shipper._read_lease = read_then_lose_the_race  # type: ignore[method-assign]
    await shipper.start()
    try:
        await asyncio.sleep(0.15)  # past the renewal point (ttl/3)
        await asyncio.to_thread(commit_rows, db, 0, 3)
        await wait_for(lambda: shipper.status()["state"] == "fenced", 10, "the shipper to stop")
        assert raced.is_set()
        assert "intruder" in (shipper.status()["last_error"] or "")
    finally:
        await shipper.stop(timeout=1)
    assert await storage.get_bytes(LEASE_KEY) == intruder  # not overwritten, nor deleted on the way out


async def test_two_takeovers_of_one_expired_lease_leave_one_holder(
    db: Path, tmp_path: Path, any_storage: Any
) -> None:
    """Two shippers find the same lapsed lease; the slower one must not delete the winner's."""
    storage = any_storage
    await storage.put_bytes(LEASE_KEY, lease_of("gone", valid_for=timedelta(0)))
    winner = lease_of("winner")
    slower = WalShipper(db, storage, tmp_path / "spool", fast_options())
    real_read = slower._read_lease
    raced = asyncio.Event()

    async def read_then_lose_the_race() -> Any:
        got = await real_read()
        if got is not None and got[0].get("holder") == "gone:2:y" and not raced.is_set():
            raced.set()
            # the other shipper deletes the lapsed lease and creates its own, after our read
            await storage.delete_many([LEASE_KEY])
            await storage.put_bytes(LEASE_KEY, winner, if_none_match=True)
        return got

    slower._read_lease = read_then_lose_the_race  # type: ignore[method-assign]
    with pytest.raises(LeaseHeldError, match="winner"):
        await slower.start()
    assert raced.is_set()
    assert await storage.get_bytes(LEASE_KEY) == winner


# ---- outages, spool, crashes ---------------------------------------------------------------


OUTAGE_SECONDS = float(os.environ.get("TSB_WAL_OUTAGE_SECONDS", "20"))


async def test_storage_outage_loses_nothing(
    db: Path,
    tmp_path: Path,
    fault_proxy: FaultProxy,
    proxied_storage: S3Storage,
) -> None:
    """Storage unreachable for 20 s (the issue's figure; TSB_WAL_OUTAGE_SECONDS shortens it locally)."""
    shipper = WalShipper(db, proxied_storage, tmp_path / "spool", fast_options())
    await shipper.start()
    gen = shipper.status()["generation"]
    log = tmp_path / "w.log"
    writer = start_writer(
        db,
        log,
        "--seed",
        "3",
        "--rate",
        "40",
        "--duration",
        str(OUTAGE_SECONDS + 2),
        "--checkpoint-every",
        "40",
    )
    try:
        await wait_for(lambda: log_lines(log) > 10, 10, "the writer")
        assert await shipper.flush(10)
        with capture_logs() as logs:
            fault_proxy.cut()
            cut_at = time.monotonic()
            await wait_for(lambda: shipper.status()["spool_bytes"] > 0, 5, "spooling")
            await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - cut_at)))
            st = shipper.status()
            assert st["spool_objects"] > 0 and st["last_error"] and st["lag_seconds"] > 0
            fault_proxy.heal()
            await asyncio.to_thread(writer.wait, 30)
            assert await shipper.flush(20)
        assert shipper.status()["generation"] == gen
    finally:
        writer.kill()
        await shipper.stop()
    # The outage reads as one warning and one recovery in the log, not one every few seconds.
    warned = [e for e in logs if e["log_level"] == "warning" and e["event"] == "wal_upload_failed"]
    assert len(warned) == 1
    assert [e["event"] for e in logs].count("wal_upload_recovered") == 1
    assert await restore_latest(proxied_storage, tmp_path / "out.db") == logical_dump(replay(read_log(log)))


async def test_spool_overflow_starts_new_generation(
    db: Path,
    tmp_path: Path,
    fault_proxy: FaultProxy,
    proxied_storage: S3Storage,
) -> None:
    shipper = WalShipper(db, proxied_storage, tmp_path / "spool", fast_options(spool_max_bytes=60_000))
    await shipper.start()
    gen = shipper.status()["generation"]
    try:
        assert await shipper.flush(10)
        fault_proxy.cut()
        for i in range(10):
            await asyncio.to_thread(commit_rows, db, i * 10, 10, 4000)
            await asyncio.sleep(0.06)
        await wait_for(lambda: shipper.status()["spool_dropped"] == 1, 10, "the spool overflow")
        st = shipper.status()
        assert "spool passed its bound" in st["continuity_lost"] and st["spool_bytes"] == 0
        await asyncio.to_thread(commit_rows, db, 100, 5)
        fault_proxy.heal()
        await wait_for(
            lambda: shipper.status()["generation"] != gen and shipper.status()["continuity_lost"] is None,
            15,
            "a new generation",
        )
        await asyncio.to_thread(commit_rows, db, 105, 5)
        assert await shipper.flush(15)
    finally:
        await shipper.stop()
    assert await restore_latest(proxied_storage, tmp_path / "out.db") == logical_dump(db)


async def test_snapshots_by_count_do_not_pile_up_in_the_spool_during_an_outage(
    db: Path,
    tmp_path: Path,
    fault_proxy: FaultProxy,
    proxied_storage: S3Storage,
) -> None:
    """Each is a copy of the database and the spool's bound counts segments: one at a time."""
    shipper = WalShipper(db, proxied_storage, tmp_path / "spool", fast_options(snapshot_after_segments=3))
    await shipper.start()
    try:
        assert await shipper.flush(10)
        fault_proxy.cut()
        queued = shipper._queue  # what waits in the spool for storage to come back
        for i in range(15):
            await asyncio.to_thread(commit_rows, db, i * 10, 10)
            n = len(queued)
            await wait_for(lambda n=n: len(queued) > n, 10, "the batch in the spool")
        assert sum(e.kind == "segment" for e in queued) >= 12
        assert sum(e.kind == "snapshot" for e in queued) == 1
        fault_proxy.heal()
        assert await shipper.flush(20)
    finally:
        await shipper.stop()
    assert await restore_latest(proxied_storage, tmp_path / "out.db") == logical_dump(db)


async def test_a_snapshot_the_busy_writer_keeps_refusing_is_tried_less_and_less_often(
    db: Path, tmp_path: Path, local_storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each try holds the reader up to lock_timeout: not at every commit while the writer is busy."""
    from daemon import wal as wal_mod

    tries: list[float] = []

    def refused(self: Any) -> bool:  # as when the writer holds its lock past lock_timeout
        tries.append(time.monotonic())
        return False

    opts = fast_options(snapshot_after_segments=2, poll_interval=0.1)
    shipper = WalShipper(db, local_storage, tmp_path / "spool", opts)
    await shipper.start()
    try:
        monkeypatch.setattr(wal_mod._Engine, "snapshot", refused)
        t0 = time.monotonic()
        i = 0
        while time.monotonic() - t0 < 2.5:  # ~40 commits a second, each a reader step
            await asyncio.to_thread(commit_rows, db, i, 1)
            i += 1
            await asyncio.sleep(0.025)
        assert await shipper.flush(10)
    finally:
        await shipper.stop()
    # backing off 0.1, 0.2, 0.4, 0.8, 1.6 s: about 5 tries in 2.5 s, not one per commit
    assert 2 <= len(tries) <= 7, len(tries)
    assert i > 40


async def test_kill_9_loses_nothing(db: Path, tmp_path: Path, s3_server: MotoServer, bucket: str) -> None:
    spool = tmp_path / "spool"
    ship_out = tmp_path / "ship.out"
    ship = start_helper(ship_out, "ship", str(db), str(spool), "--s3", s3_server.endpoint, bucket, "tb")
    storage = S3Storage(s3_settings(s3_server.endpoint, bucket))
    log = tmp_path / "w.log"
    stop_file = tmp_path / "stop"
    writer = None
    try:
        await wait_for(lambda: has_line(ship_out, "READY"), 20, "the shipper process")
        writer = start_writer(
            db, log, "--seed", "11", "--rate", "60", "--stop-file", str(stop_file), "--checkpoint-every", "50"
        )
        await wait_for(lambda: log_lines(log) > 120, 20, "two seconds of commits")
        os.kill(ship.pid, signal.SIGKILL)
        killed_at = time.time()
        ship.wait(10)
        # Every commit made at least a second before the kill is in the bucket.
        out = tmp_path / "after-kill.db"
        await restore_point_in_time(storage, None, out)
        entries = read_log(log)
        old = [e for e in entries if e["t1"] <= killed_at - 1.0]
        assert len(old) > 50
        restored = logical_dump(out)
        n = next(
            (k for k in range(len(old), len(entries) + 1) if logical_dump(replay(entries[:k])) == restored),
            None,
        )
        assert n is not None, "the restore is not any committed state at or after kill - 1 s"
        # A new shipper (the crashed one's lease is taken over: its pid is dead) continues.
        shipper = WalShipper(db, storage, spool, fast_options())
        await shipper.start()
        try:
            await wait_for(lambda: log_lines(log) > len(entries) + 30, 20, "more commits")
            stop_file.touch()
            await asyncio.to_thread(writer.wait, 20)
            assert await shipper.flush(15)
        finally:
            await shipper.stop()
        assert await restore_latest(storage, tmp_path / "final.db") == logical_dump(replay(read_log(log)))
    finally:
        for p in (ship, writer):
            if p is not None and p.poll() is None:
                p.kill()
        await storage.close()


# ---- lag -----------------------------------------------------------------------------------


async def test_lag_at_100_commits_per_second(db: Path, tmp_path: Path, s3_storage: S3Storage) -> None:
    rec = RecordingStorage(s3_storage)
    shipper = WalShipper(
        db,
        rec,
        tmp_path / "spool",
        fast_options(segment_interval=0.2),
    )
    await shipper.start()
    log = tmp_path / "w.log"
    try:
        assert await shipper.flush(10)
        writer = start_writer(db, log, "--seed", "5", "--rate", "100", "--duration", "3")
        await asyncio.to_thread(writer.wait, 30)
        assert await shipper.flush(10)
    finally:
        await shipper.stop()
    # Map each commit (in order) to the segment that holds it, and so to its upload time.
    done: list[float] = []
    for key, t in sorted(rec.put_done.items()):
        info = parse_wal_key(key)
        if isinstance(info, SegmentInfo):
            meta, _ = split_object(await s3_storage.get_bytes(key))
            done += [t] * len(meta["commits"])
    entries = read_log(log)
    assert len(done) == len(entries)
    lags = sorted(d - e["t1"] for d, e in zip(done, entries, strict=True))
    p50, p99 = lags[len(lags) // 2], lags[int(len(lags) * 0.99)]
    print(
        f"commit-to-durable lag over {len(lags)} commits: p50 {p50:.3f}s p99 {p99:.3f}s "
        f"max {lags[-1]:.3f}s, {len([k for k in rec.put_done if '/segments/' in k])} segments"
    )
    assert p99 < 1.0


async def test_the_upload_interval_bounds_requests_under_sustained_writes(
    db: Path, tmp_path: Path, s3_storage: S3Storage
) -> None:
    """`wal.upload_interval_ms`: fewer, bigger segments under load, every commit still shipped."""
    from daemon.config import parse_config
    from daemon.wal import WalOptions

    cfg = parse_config(f"root: {tmp_path}\nwal:\n  upload_interval_ms: 1000\n")
    assert WalOptions.from_config(cfg).segment_interval == 1.0
    assert WalOptions.from_config(parse_config(f"root: {tmp_path}\n")).segment_interval == 0.2
    rec = RecordingStorage(s3_storage)
    shipper = WalShipper(db, rec, tmp_path / "spool", fast_options(segment_interval=1.0))
    await shipper.start()
    log = tmp_path / "w.log"
    try:
        assert await shipper.flush(10)
        before = len([k for k in rec.put_done if "/segments/" in k])
        t0 = time.monotonic()
        writer = start_writer(db, log, "--seed", "6", "--rate", "100", "--duration", "3")
        await asyncio.to_thread(writer.wait, 30)
        assert await shipper.flush(10)
        took = time.monotonic() - t0
    finally:
        await shipper.stop()
    segments = [k for k in rec.put_done if "/segments/" in k][before:]
    shipped = 0
    for key in segments:
        meta, _ = split_object(await s3_storage.get_bytes(key))
        shipped += len(meta["commits"])
    assert shipped == len(read_log(log)) > 100
    # one upload per second, plus the first commit after idle (shipped at once), the checkpoint
    # (which ships what it folds in first), the final flush and one timer at the edge; at 0.2 s
    # this load makes ~18
    assert len(segments) <= took + 4, ([k.split("/")[-1][17:75] for k in segments], took)


# ---- retention -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


async def test_prune_keeps_what_the_window_needs(
    db: Path, tmp_path: Path, local_storage: LocalStorage
) -> None:
    clock = FakeClock()
    spool = tmp_path / "spool"
    # An old generation ...
    old = WalShipper(db, local_storage, spool, fast_options(retention=None), clock)
    await old.start()
    await asyncio.to_thread(commit_rows, db, 0, 5)
    await old.stop()
    await asyncio.to_thread(
        Path(f"{db}-wal").unlink
    )  # continuity is lost: the next start is a new generation
    clock.offset += timedelta(hours=2)
    # ... and a current one with a second snapshot ten hours in.
    opts = fast_options(retention=None, snapshot_interval=8 * 3600, poll_interval=0.05)
    cur = WalShipper(db, local_storage, spool, opts, clock)
    await cur.start()
    try:
        await asyncio.to_thread(commit_rows, db, 5, 5)
        assert await cur.flush(10)
        clock.offset += timedelta(hours=10)
        await wait_for(
            lambda: (
                cur.status()["segment_index"] > 0
                and cur.status()["last_snapshot_at"] > cur.status()["generation_started_at"]
            ),
            5,
            "a second snapshot",
        )
        await asyncio.to_thread(commit_rows, db, 10, 5)
        assert await cur.flush(10)
        cat = await load_catalog(local_storage)
        assert len(cat) == 2 and len(cat[1].snapshots) == 2
        gen = cur.status()["generation"]
        now = clock() + timedelta(hours=25)  # the window starts after the second snapshot
        doomed = await prune_wal(
            local_storage, window=timedelta(hours=24), now=now, keep_generation=gen, dry_run=True
        )
        first_snap, second_snap = cat[1].snapshots
        assert set(doomed) == (
            {s.key for s in cat[0].snapshots}
            | {s.key for s in cat[0].segments}
            | {first_snap.key}
            | {s.key for s in cat[1].segments if s.index < second_snap.index}
        )
        assert second_snap.key not in doomed
        await prune_wal(local_storage, window=timedelta(hours=24), now=now, keep_generation=gen)
        # Within the window (and latest) still restores; before the kept snapshot does not.
        assert await restore_latest(local_storage, tmp_path / "out.db") == logical_dump(db)
        with pytest.raises(BackupNotFoundError):
            await restore_point_in_time(
                local_storage, second_snap.taken_at - timedelta(seconds=1), tmp_path / "early.db"
            )
        # A window reaching back before every snapshot deletes nothing.
        assert await prune_wal(local_storage, window=timedelta(days=30), now=now) == []
    finally:
        await cur.stop()


async def test_stop_within_budget_keeps_spool_for_next_start(
    db: Path, tmp_path: Path, fault_proxy: FaultProxy, proxied_storage: S3Storage
) -> None:
    app = sqlite3.connect(db)  # tinyserved stays up while the daemon restarts
    app.execute("SELECT count(*) FROM sqlite_master").fetchone()
    spool = tmp_path / "spool"
    first = WalShipper(db, proxied_storage, spool, fast_options())
    await first.start()
    gen = first.status()["generation"]
    assert await first.flush(10)
    fault_proxy.cut()
    await asyncio.to_thread(commit_rows, db, 0, 30)
    await wait_for(lambda: first.status()["spool_objects"] > 0, 5, "spooling")
    t = time.monotonic()
    await first.stop(timeout=1.5)
    assert time.monotonic() - t < 1.8  # the daemon's own deadline is never overrun
    spooled = [p for p in (spool / "objects").rglob("*") if p.is_file()]
    assert spooled, "unshipped segments must stay in the spool"
    fault_proxy.heal()
    second = WalShipper(db, proxied_storage, spool, fast_options())
    await second.start()
    try:
        assert second.status()["generation"] == gen
        await asyncio.to_thread(commit_rows, db, 30, 5)
        assert await second.flush(10)
    finally:
        await second.stop()
    assert not [p for p in (spool / "objects").rglob("*") if p.is_file()]
    assert await restore_latest(proxied_storage, tmp_path / "out.db") == logical_dump(db)
    app.close()


async def test_rolled_back_wal_starts_new_generation(
    db: Path, tmp_path: Path, local_storage: LocalStorage
) -> None:
    """Power loss: commits we shipped never reached the disk, and after reboot SQLite writes other
    commits at the same WAL offsets under the same salts.  The restarted shipper must notice."""
    app = sqlite3.connect(db, isolation_level=None)
    app.execute("SELECT count(*) FROM sqlite_master").fetchone()
    spool = tmp_path / "spool"
    first = WalShipper(db, local_storage, spool, fast_options())
    await first.start()
    gen = first.status()["generation"]
    await asyncio.to_thread(commit_rows, db, 0, 3)
    assert await first.flush(10)
    disk = tmp_path / "disk"  # what the disk held when the power went
    await asyncio.to_thread(disk.mkdir)
    for suffix in ("", "-wal"):
        await asyncio.to_thread(shutil.copyfile, f"{db}{suffix}", disk / f"state.db{suffix}")
    await asyncio.to_thread(commit_rows, db, 3, 5)  # shipped, then lost with the power
    assert await first.flush(10)
    await first.stop()
    app.close()
    for suffix in ("", "-wal"):
        await asyncio.to_thread(shutil.copyfile, disk / f"state.db{suffix}", f"{db}{suffix}")
    await asyncio.to_thread(Path(f"{db}-shm").unlink, missing_ok=True)
    app = sqlite3.connect(db, isolation_level=None)  # "after reboot": recovery, then new commits
    app.execute("INSERT INTO kv VALUES ('after-reboot', randomblob(9000), 0)")
    # Same WAL incarnation (same salts) as the frames we shipped: only the position check tells.
    before = read_wal(disk / "state.db-wal").header
    after = read_wal(Path(f"{db}-wal"))
    assert before is not None and after.header == before
    second = WalShipper(db, local_storage, spool, fast_options())
    await second.start()
    try:
        assert second.status()["generation"] != gen
        await asyncio.to_thread(commit_rows, db, 100, 3)
        assert await second.flush(10)
    finally:
        await second.stop()
    assert await restore_latest(local_storage, tmp_path / "out.db") == logical_dump(db)
    app.close()


async def test_database_swapped_by_a_restore_starts_new_generation(
    db: Path, tmp_path: Path, local_storage: LocalStorage
) -> None:
    """An in-place restore moves state.db and its -wal aside and puts another file there while the
    daemon's shipper runs: it must re-attach to the new file, never mix the two."""
    app = sqlite3.connect(db, isolation_level=None)
    app.execute("SELECT count(*) FROM sqlite_master").fetchone()
    shipper = WalShipper(db, local_storage, tmp_path / "spool", fast_options(poll_interval=0.05))
    await shipper.start()
    gen = shipper.status()["generation"]

    def events(path: Path, tag: str) -> None:  # rows nothing touches later: a mix would show
        c = sqlite3.connect(path, isolation_level=None)
        c.executemany("INSERT INTO events (at, payload) VALUES (?, ?)", [(i, tag * 50) for i in range(300)])
        c.close()

    try:
        await asyncio.to_thread(events, db, "old")
        await asyncio.to_thread(commit_rows, db, 0, 10)
        assert await shipper.flush(10)
        # The replacement: a different database, as the restore swap leaves it.
        other = tmp_path / "other.db"
        await asyncio.to_thread(init_db, other)
        await asyncio.to_thread(events, other, "new")
        await asyncio.to_thread(commit_rows, other, 500, 7)
        app.close()  # tinyserved stopped
        for suffix in ("", "-wal", "-shm"):
            if await asyncio.to_thread(os.path.lexists, f"{db}{suffix}"):
                await asyncio.to_thread(os.rename, f"{db}{suffix}", f"{db}{suffix}.pre-restore")
        await asyncio.to_thread(os.rename, other, db)
        app = sqlite3.connect(db, isolation_level=None)  # tinyserved started again
        app.execute("INSERT INTO kv VALUES ('on-the-new-file', x'01', 1)")
        await wait_for(lambda: shipper.status()["generation"] != gen, 10, "a new generation")
        await asyncio.to_thread(commit_rows, db, 600, 5)
        assert await shipper.flush(10)
    finally:
        await shipper.stop()
    restored = await restore_latest(local_storage, tmp_path / "out.db")
    assert restored == logical_dump(db)
    assert ("on-the-new-file", b"\x01", 1) in restored["kv"]
    assert {row[2][:3] for row in restored["events"]} == {"new"}
    app.close()
