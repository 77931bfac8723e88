"""Restore and verify against the real S3 server: exact round trips, safety, failures."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon import docker
from daemon import restore as restore_mod
from daemon import service as service_mod
from daemon.backup import BackupJob
from daemon.cancel import through_cancel
from daemon.config import Config, parse_config
from daemon.docker import inspect_images
from daemon.errors import (
    BackupNotFoundError,
    DockerError,
    IntegrityError,
    RestoreError,
    ServiceControlError,
    UnsafeArchiveError,
)
from daemon.manifest import list_backups
from daemon.restore import RestoreJob, RestorePlan, StagedItem, Swap, swap_in
from daemon.service import Tinyserved
from daemon.storage import S3Storage
from daemon.verify import verify_backup
from tests.conftest import run_cli, wait_for
from tests.helpers.rootfactory import RootInfo, db_dump, make_root, read_calls, tree_digest
from tests.helpers.s3server import REPO, MotoServer
from tests.helpers.tinyserved import DB_FILES as DB
from tests.helpers.tinyserved import cfg_for, ctl_calls, tinyserve_root


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RootInfo:
    return tinyserve_root(tmp_path, monkeypatch, seed=11)


async def release(fifo: Path, within: float = 20) -> None:
    """Write a line to ``fifo`` for the stand-in blocked reading it (no reader yet: retry, bounded)."""

    def write() -> None:
        deadline = time.monotonic() + within
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:  # ENXIO: nobody has it open for reading (yet)
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        try:
            os.write(fd, b"go\n")
        finally:
            os.close(fd)

    await asyncio.to_thread(write)


def snapshot(root: Path) -> tuple[dict[str, object], list[str]]:
    return tree_digest(root, exclude=[*DB, "logs", "*.pre-restore", "*.pre-restore/*"]), db_dump(
        root / "state.db"
    )


def journal_mode(db: Path) -> str:
    """The mode the file itself records (header bytes 18-19: 2 = WAL), without opening it in SQLite."""
    return "wal" if db.read_bytes()[18:20] == b"\x02\x02" else "rollback"


async def test_full_restore_into_wiped_root_is_exact(root: RootInfo, s3_storage: S3Storage) -> None:
    cfg = cfg_for(root.path)
    before_tree, before_db = snapshot(root.path)
    res = await BackupJob(cfg, s3_storage).run("full")
    # wipe everything, including images
    shutil.rmtree(root.path)
    shutil.rmtree(os.environ["FAKE_DOCKER_STATE"])
    out = await RestoreJob(cfg, s3_storage).run(res.timestamp)
    assert out.integrity == "ok"
    after_tree, after_db = snapshot(root.path)
    assert after_tree == before_tree
    assert after_db == before_db
    # back in the WAL mode it was in (the backup stores it self-contained, in rollback mode)
    assert [o.journal_mode for o in res.manifest.objects if o.kind == "sqlite"] == ["wal"]
    assert journal_mode(root.path / "state.db") == "wal"
    assert not (root.path / "state.db-wal").exists()
    assert sorted(out.images_loaded) == sorted(root.images)
    assert ctl_calls() == [["stop"], ["start"]]
    # nothing left beside the root
    assert sorted(p.name for p in root.path.parent.iterdir() if p.name.startswith(".")) == []


async def test_a_database_kept_in_rollback_mode_is_restored_in_it(
    root: RootInfo, s3_storage: S3Storage
) -> None:
    import sqlite3

    conn = sqlite3.connect(root.db_path)
    assert conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
    conn.close()
    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("partial")
    assert [o.journal_mode for o in res.manifest.objects if o.kind == "sqlite"] == ["delete"]
    await RestoreJob(cfg, s3_storage).run(res.timestamp, "partial")
    assert journal_mode(root.path / "state.db") == "rollback"


@pytest.mark.parametrize(
    ("recorded", "restored"),
    [("wal", "wal"), ("delete", "delete"), (None, "wal"), ("wal; DROP TABLE kv", "wal"), ("off", "wal")],
)
def test_the_recorded_journal_mode_is_restored_and_nothing_else(
    tmp_path: Path, recorded: str | None, restored: str
) -> None:
    """Manifests before the mode was recorded (and the guide's) mean WAL; a manifest is untrusted."""
    import sqlite3

    from daemon.manifest import ObjectEntry
    from daemon.snapshot import set_journal_mode

    entry = ObjectEntry("state.db.zst", "sqlite", 1, journal_mode=recorded)
    assert restore_mod.restored_journal_mode(entry) == restored
    (tmp_path / "r").mkdir()
    db = tmp_path / "r" / "state.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    set_journal_mode(db, restored)
    assert journal_mode(db) == ("wal" if restored == "wal" else "rollback")
    assert sorted(p.name for p in db.parent.iterdir()) == ["state.db"]  # no -wal/-shm left beside it
    with pytest.raises(ValueError):
        set_journal_mode(db, "wal; DROP TABLE t")


@pytest.mark.parametrize("comes_up", [True, False])
async def test_status_is_asked_until_tinyserved_is_up(
    comes_up: bool,
    root: RootInfo,
    s3_storage: S3Storage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """launchd returns before tinyserved is ready: ask again, and warn only when time is up."""
    monkeypatch.setattr(service_mod, "READY_POLL_S", 0.05)
    monkeypatch.setenv("FAKE_TINYSERVED_STARTING_FOR", "2" if comes_up else "1000")
    # (coming up, the wait ends at the third call: a long limit only guards against a slow machine)
    cfg = cfg_for(root.path, "  ready_seconds: 60\n" if comes_up else "  ready_seconds: 0.5\n")
    res = await BackupJob(cfg, s3_storage).run("partial")
    job = RestoreJob(cfg, s3_storage)
    t0 = time.monotonic()
    out = await job.run(res.timestamp)
    waited = time.monotonic() - t0
    calls = [c["args"] for c in read_calls(os.environ["FAKE_CALLS_LOG"], "tinyserve")]
    status_calls = [c for c in calls if c[:1] == ["status"]]
    if comes_up:
        assert status_calls == [["status"]] * 3
        assert out.tinyserve_status.startswith("tinyserved: running")
        assert not any("status" in w for w in out.warnings)
    else:
        assert len(status_calls) >= 2 and waited >= 0.5  # asked again, until the time was up
        assert any("tinyserve status reports a problem" in w for w in out.warnings)
    assert job.completed == out
    assert out.integrity == "ok" and ctl_calls() == [["stop"], ["start"]]


async def test_killing_a_command_that_has_just_exited_lets_the_cancellation_through() -> None:
    """A status call that ends as the Ctrl-C lands: the kill must not raise ProcessLookupError."""
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()  # exited and reaped, as when the cancellation comes in that instant
    await service_mod._kill(proc)  # no error
    assert proc.returncode == 0


async def test_a_cancel_while_waiting_for_tinyserved_keeps_what_was_restored(
    root: RootInfo, s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while asking whether tinyserved is up: the restore stands, and says what it did."""
    monkeypatch.setattr(service_mod, "READY_POLL_S", 0.05)
    monkeypatch.setenv("FAKE_TINYSERVED_STARTING_FOR", "1000")
    cfg = cfg_for(root.path, "  ready_seconds: 60\n")
    res = await BackupJob(cfg, s3_storage).run("partial")
    want = snapshot(root.path)
    (root.path / "generated" / "marker").write_text("newer than the backup")
    job = RestoreJob(cfg, s3_storage)
    task = asyncio.create_task(job.run(res.timestamp))

    def status_calls() -> int:
        calls = read_calls(os.environ["FAKE_CALLS_LOG"], "tinyserve")
        return sum(1 for c in calls if c["args"][:1] == ["status"])

    await wait_for(lambda: status_calls() >= 2 or task.done(), 30, "the status wait")
    assert not task.done()  # the wait is under way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 20)
    assert snapshot(root.path) == want  # restored, not rolled back
    assert job.completed is not None and job.completed.restored[0] == "state.db"
    assert job.completed.tinyserve_status == "not checked (interrupted)"
    assert ctl_calls() == [["stop"], ["start"]]


async def test_partial_restore_keeps_previous_state_aside(root: RootInfo, s3_storage: S3Storage) -> None:
    cfg = cfg_for(root.path)
    before_tree, before_db = snapshot(root.path)
    res = await BackupJob(cfg, s3_storage).run("partial")
    # the live state moves on: a new row, a changed config, a stale WAL
    import sqlite3

    conn = sqlite3.connect(root.db_path)
    conn.execute("create table later(x)")
    conn.commit()
    conn.close()
    (root.path / "generated" / "docker-compose.yml").write_text("services: {}\n")
    (root.path / "state.db-wal").write_bytes(b"a crashed writer's last commits")
    out = await RestoreJob(cfg, s3_storage).run(res.timestamp, "partial")
    assert out.restored == ["state.db", "backups", "cloudflared", "generated", "traefik"]
    # everything kept is reported, the -wal with its database
    assert sorted(out.kept_aside) == sorted(
        f"{n}.pre-restore" for n in ["state.db", "state.db-wal", *out.restored[1:]]
    )
    assert (root.path / "state.db-wal.pre-restore").read_bytes() == b"a crashed writer's last commits"
    after_tree, after_db = snapshot(root.path)
    assert after_db == before_db
    assert {k: v for k, v in after_tree.items() if not k.startswith("services")} == {
        k: v for k, v in before_tree.items() if not k.startswith("services")
    }
    assert (root.path / "state.db.pre-restore").exists()
    assert (root.path / "generated.pre-restore" / "docker-compose.yml").read_text() == "services: {}\n"
    assert not (root.path / "state.db-wal").exists() and not (root.path / "state.db-shm").exists()
    # a second restore replaces the first one's leftovers
    out = await RestoreJob(cfg, s3_storage).run(res.timestamp, "partial")
    assert not any(p.name.startswith(".restore-trash") for p in root.path.iterdir())
    assert db_dump(root.path / "state.db.pre-restore") == before_db


async def start_holder(db: Path, tmp: Path, linger_until: Path | None = None) -> subprocess.Popen[bytes]:
    """A stand-in tinyserved: a real process keeping ``db`` open until SIGTERM (tests/helpers/writer)."""
    ready = tmp / f"holder-{time.monotonic_ns()}.ready"
    argv = [sys.executable, "-m", "tests.helpers.writer", "hold", str(db), str(ready)]
    if linger_until is not None:
        argv += ["--linger-until", str(linger_until)]
    proc = subprocess.Popen(argv, cwd=str(REPO))
    await wait_for(ready.exists, 20, "the holder to open state.db")
    return proc


def holder_rows(db: Path) -> list[str]:
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("SELECT what FROM holder ORDER BY rowid")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


@pytest.mark.parametrize("stop", ["does not stop it", "none configured"])
async def test_restore_refuses_a_database_another_program_still_has_open(
    root: RootInfo, s3_storage: S3Storage, tmp_path: Path, stop: str
) -> None:
    """A stop that leaves tinyserved running (or none at all) must not let the restore swap under it."""
    res = await BackupJob(cfg_for(root.path), s3_storage).run("partial")
    holder = await start_holder(root.db_path, tmp_path)
    try:
        if stop == "none configured":
            cfg = parse_config(f"root: {root.path}\ncompression:\n  threads: 0\n")
        else:  # the stand-in only records the call; the holder keeps running
            cfg = cfg_for(root.path, "  timeout_seconds: 3\n")
        before_tree, before_db = snapshot(root.path)
        t0 = time.monotonic()
        with pytest.raises(ServiceControlError) as ei:
            await RestoreJob(cfg, s3_storage).run(res.timestamp, "partial")
        waited = time.monotonic() - t0
        msg = ei.value.message
        assert f"state.db is {'still ' if stop != 'none configured' else ''}open by pid {holder.pid}" in msg
        assert "the restore changed nothing" in msg
        assert snapshot(root.path) == (before_tree, before_db)
        assert not list(root.path.glob("*.pre-restore"))
        assert not [p for p in root.path.parent.iterdir() if p.name.startswith(".")]  # staging gone
        if stop == "none configured":
            assert ctl_calls() == []
        else:  # it waited the stop's timeout for the holder to go, then started tinyserved again
            assert waited >= 3
            assert ctl_calls() == [["stop"], ["start"]]
        assert holder.poll() is None
        assert holder_rows(root.db_path) == ["held"]
    finally:
        holder.terminate()
        holder.wait(10)


async def test_restore_waits_for_a_stopping_tinyserved_to_let_go_of_the_database(
    root: RootInfo, s3_storage: S3Storage, tmp_path: Path
) -> None:
    """`launchctl bootout` may return before tinyserved has exited: swap only once it has."""
    res = await BackupJob(cfg_for(root.path), s3_storage).run("partial")
    _, before_db = snapshot(root.path)
    go = tmp_path / "holder-may-exit"
    holder = await start_holder(root.db_path, tmp_path, linger_until=go)
    try:
        cfg = parse_config(
            f"root: {root.path}\ncompression:\n  threads: 0\n"
            f"tinyserved:\n  stop: [kill, -TERM, '{holder.pid}']\n  start: [tinyserved-ctl, start]\n"
        )
        with capture_logs() as logs:
            task = asyncio.create_task(RestoreJob(cfg, s3_storage).run(res.timestamp, "partial"))
            # stopped, but still shutting down (with state.db open): the restore must wait
            await wait_for(lambda: any(e["event"] == "tinyserved_stop_waiting" for e in logs), 30, "the wait")
            assert not task.done() and holder.poll() is None
            assert not (root.path / "state.db.pre-restore").exists()
            go.touch()
            out = await asyncio.wait_for(task, 60)
        events = [e["event"] for e in logs]
        assert events.index("tinyserved_stop_waiting") < events.index("tinyserved_released")
        assert holder.wait(10) == 0
        # its last write, made while shutting down, went into the old database, now kept aside
        assert holder_rows(root.path / "state.db.pre-restore") == ["held", "left"]
        assert out.integrity == "ok"
        assert db_dump(root.path / "state.db") == before_db
    finally:
        go.touch()
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


async def test_a_database_opened_again_during_the_swap_puts_everything_back(
    root: RootInfo, s3_storage: S3Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something (a service manager?) opens state.db between the last look and the renames."""
    res = await BackupJob(cfg_for(root.path), s3_storage).run("partial")
    before = snapshot(root.path)
    holders: list[subprocess.Popen[bytes]] = []
    real_apply = Swap.apply

    def apply_after_a_reopen(self: Swap, items: list[StagedItem]) -> list[str]:
        holders.append(asyncio.run(start_holder(root.db_path, tmp_path)))
        return real_apply(self, items)

    monkeypatch.setattr(Swap, "apply", apply_after_a_reopen)
    try:
        with pytest.raises(ServiceControlError, match=r"opened state\.db while the restore replaced it"):
            await RestoreJob(cfg_for(root.path), s3_storage).run(res.timestamp, "partial")
        assert holders and holders[0].poll() is None
        assert ctl_calls() == [["stop"], ["start"]]
        assert snapshot(root.path)[0] == before[0]
        # the live database is the old one again, with the holder's write (the backup's has none)
        assert holder_rows(root.db_path) == ["held"]
        assert not list(root.path.glob("*.pre-restore"))
    finally:
        for h in holders:
            h.terminate()
            h.wait(10)


async def test_lsof_finds_the_holder_as_on_a_mac_and_a_failing_lsof_tells_nothing(
    root: RootInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """macOS has no /proc: the same question goes to `lsof` (the real one here)."""
    if shutil.which("lsof") is None:
        pytest.skip("lsof is not installed")
    files = service_mod.db_files(root.db_path)
    holder = await start_holder(root.db_path, tmp_path)
    try:
        assert await service_mod._lsof_holders(files, set(), 30) == [holder.pid]
        assert await service_mod._lsof_holders(files, {holder.pid}, 30) == []
        assert await service_mod._lsof_holders([tmp_path / "none.db"], set(), 30) == []
        # an lsof that fails (or prints something else) is "cannot tell", never "nobody"
        fake = tmp_path / "bin"
        fake.mkdir()
        for code, text in ((2, ""), (1, "lsof: WARNING: something"), (0, "p123")):
            (fake / "lsof").write_text(f"#!/bin/sh\necho '{text}'\nexit {code}\n")
            (fake / "lsof").chmod(0o755)
            monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
            got = await service_mod._lsof_holders(files, set(), 30)
            assert isinstance(got, str), (code, text, got)
    finally:
        holder.terminate()
        holder.wait(10)


def test_only_a_live_daemon_of_ours_is_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale status file whose pid now belongs to another program must not hide that program."""
    from daemon.status import status_path, write_status

    root = tmp_path / "root"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        path = status_path(root)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_status(path, {"pid": sleeper.pid, "state": "running"})
        assert service_mod.ours(root) == {os.getpid()}  # `sleep 30` is not our daemon
        write_status(path, {"pid": os.getppid(), "state": "stopped"})
        assert service_mod.ours(root) == {os.getpid()}
    finally:
        sleeper.kill()
        sleeper.wait(10)


async def test_staged_files_are_on_disk_before_anything_live_is_renamed(
    root: RootInfo, s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every staged file is sent to disk as it is written, and the restore waits for the disk
    before the swap: a power cut after it leaves old items or whole new ones, never empty files."""
    from daemon import archive as archive_mod
    from daemon import fsutil

    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("full")
    live = snapshot(root.path)
    written: list[int] = []
    synced: list[tuple[Path, bool]] = []

    def writeback(fd: int) -> None:
        written.append(fd)
        fsutil.start_writeback(fd)

    def sync(path: Path) -> None:
        # called on the staging directory, while the live root is still untouched
        synced.append((path, snapshot(root.path) == live and ctl_calls() == []))
        fsutil.sync_filesystem(path)

    monkeypatch.setattr(archive_mod, "start_writeback", writeback)
    monkeypatch.setattr(restore_mod, "sync_filesystem", sync)
    with capture_logs() as logs:
        out = await RestoreJob(cfg, s3_storage).run(res.timestamp)
    assert out.integrity == "ok"
    # every file the archives held (state.db is written and fsync'd on its own)
    extracted = sum(e["files"] for e in logs if e["event"] == "extract_done")
    assert extracted > 20 and len(written) == extracted
    assert len(synced) == 1 and synced[0][1]
    assert synced[0][0].name.startswith(f".{root.path.name}.restore-")


def test_sync_filesystem_waits_for_the_disk_and_says_when_it_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes

    from daemon import fsutil

    f = tmp_path / "f"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"x" * 100_000)
    fsutil.start_writeback(fd)
    os.close(fd)
    fsutil.sync_filesystem(tmp_path)  # the real syncfs here
    synced: list[bool] = []
    monkeypatch.setattr(os, "sync", lambda: synced.append(True))

    def failing(code: int) -> Any:
        def syncfs(fd: int) -> int:
            ctypes.set_errno(code)
            return -1

        return syncfs

    monkeypatch.setattr(fsutil, "_syncfs", failing(errno.EIO))  # the disk failed: say so
    with pytest.raises(OSError) as ei:
        fsutil.sync_filesystem(tmp_path)
    assert ei.value.errno == errno.EIO and synced == []
    monkeypatch.setattr(fsutil, "_syncfs", failing(errno.ENOSYS))  # refused (seccomp): sync()
    fsutil.sync_filesystem(tmp_path)
    assert synced == [True]
    monkeypatch.setattr(fsutil, "_syncfs", None)  # no syncfs, no F_FULLFSYNC (Linux): sync()
    monkeypatch.setattr(fsutil, "_sync_file_range", None)  # and a plain fsync per file
    fd = os.open(f, os.O_WRONLY)
    fsutil.start_writeback(fd)
    os.close(fd)
    fsutil.sync_filesystem(tmp_path)
    assert synced == [True, True]


async def test_a_rollback_that_cannot_finish_deletes_nothing_and_says_what_is_left(
    root: RootInfo, s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A swap fails, then one move back fails too: later moves back would go onto paths that one
    still holds. Before, the next step deleted whatever sat there, which was the live data."""
    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("partial")
    (root.path / "generated" / "docker-compose.yml").write_text("services: {}\n")  # the live state
    older = root.path / "generated.pre-restore"  # an earlier restore's: goes to the trash first
    older.mkdir()
    (older / "note").write_text("older")
    real_move, real_rename = Swap._move, os.rename

    def move(self: Swap, src: Path, dst: Path) -> None:
        if src.name == "traefik" and dst.name == "traefik" and src.parent != root.path:
            raise OSError(errno.EIO, "Input/output error")  # the swap fails at a later item
        real_move(self, src, dst)

    def rename(src: Any, dst: Any) -> None:
        if Path(src).name == "generated.pre-restore" and Path(dst) == root.path / "generated":
            raise OSError(errno.EIO, "Input/output error")  # and so does one move back
        real_rename(src, dst)

    with monkeypatch.context() as m, pytest.raises(RestoreError) as ei:
        m.setattr(Swap, "_move", move)
        m.setattr(os, "rename", rename)
        await RestoreJob(cfg, s3_storage).run(res.timestamp, "partial")
    msg = ei.value.message
    assert "could not put everything back" in msg and "tinyserved was left stopped" in msg
    assert f"{older} -> {root.path / 'generated'}" in msg
    # nothing deleted: the live data where the failed move left it, the older copy in the trash
    assert (older / "docker-compose.yml").read_text() == "services: {}\n"
    assert [p.read_text() for p in root.path.glob(".restore-trash-*/generated/note")] == ["older"]
    assert ctl_calls() == [["stop"]]


async def test_one_service_restored_alone(root: RootInfo, s3_storage: S3Storage) -> None:
    cfg = cfg_for(root.path)
    before = tree_digest(root.path / "services" / "blog")
    res = await BackupJob(cfg, s3_storage).run("full")
    (root.path / "services" / "blog" / "new.txt").write_text("newer blog data\n")
    (root.path / "services" / "notes" / "newer.txt").write_text("newer notes data\n")
    db_before = db_dump(root.db_path)
    out = await RestoreJob(cfg, s3_storage).run(res.timestamp, services=["blog"])
    assert out.restored == ["services/blog"] and out.images_loaded == []
    assert tree_digest(root.path / "services" / "blog") == before
    assert (root.path / "services" / "notes" / "newer.txt").read_text() == "newer notes data\n"
    assert db_dump(root.db_path) == db_before
    assert (root.path / "services" / "blog.pre-restore" / "new.txt").exists()
    # the aside copy is not mistaken for a service by the next backup
    res2 = await BackupJob(cfg, s3_storage).run("services")
    assert sorted(res2.manifest.services) == sorted(root.services)


async def test_damaged_object_caught_by_verify_and_refused_by_restore(
    root: RootInfo, s3_storage: S3Storage
) -> None:
    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("partial")
    ref = (await list_backups(s3_storage))[0]
    assert (await verify_backup(s3_storage, ref)).ok
    key = f"partial/{res.timestamp}/configs.tar.zst"
    data = bytearray(await s3_storage.get_bytes(key))
    data[len(data) // 2] ^= 0xFF
    await s3_storage.put_bytes(key, bytes(data))
    check = await verify_backup(s3_storage, ref)
    assert not check.ok
    bad = [o for o in check.objects if not o.ok]
    assert [o.name for o in bad] == ["configs.tar.zst"]
    live = snapshot(root.path)
    with pytest.raises(IntegrityError):
        await RestoreJob(cfg, s3_storage).run(res.timestamp)
    assert snapshot(root.path) == live
    assert ctl_calls() == []  # tinyserved never stopped


async def test_unknown_and_incomplete_backups(root: RootInfo, s3_storage: S3Storage) -> None:
    cfg = cfg_for(root.path)
    with pytest.raises(BackupNotFoundError):
        await RestoreJob(cfg, s3_storage).run("2020-01-01T00-00-00Z")
    with pytest.raises(BackupNotFoundError, match="not a backup timestamp"):
        await RestoreJob(cfg, s3_storage).run("yesterday")
    # objects without a manifest are not a backup
    res = await BackupJob(cfg, s3_storage).run("partial")
    await s3_storage.delete_many([f"partial/{res.timestamp}/manifest.json"])
    with pytest.raises(BackupNotFoundError):
        await RestoreJob(cfg, s3_storage).run(res.timestamp)
    # (this one may get the same timestamp as the partial: types keep them apart)
    res = await BackupJob(cfg, s3_storage).run("services")
    with pytest.raises(BackupNotFoundError, match="that is a services backup") as exc:
        await RestoreJob(cfg, s3_storage).run(res.timestamp, "full")
    assert exc.value.fix == "ask for the services backup, or leave the type out"


def _hostile_tar(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ok = tarfile.TarInfo("generated/ok.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        tf.addfile(member, io.BytesIO(data) if data else None)
    return subprocess.run(["zstd", "-c"], input=buf.getvalue(), capture_output=True, check=True).stdout


@pytest.mark.parametrize(
    "kind",
    ["dotdot", "absolute", "symlink_out", "hardlink_out", "device", "outside_allowed"],
)
async def test_hostile_archive_refused(
    kind: str, root: RootInfo, s3_storage: S3Storage, tmp_path: Path
) -> None:
    import hashlib

    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("partial")
    m: tarfile.TarInfo
    data = b""
    if kind == "dotdot":
        m = tarfile.TarInfo("generated/../../evil.txt")
        data = b"pwned"
    elif kind == "absolute":
        m = tarfile.TarInfo(str(tmp_path / "evil-abs.txt"))
        data = b"pwned"
    elif kind == "symlink_out":
        m = tarfile.TarInfo("generated/escape")
        m.type = tarfile.SYMTYPE
        m.linkname = "../../.."
    elif kind == "hardlink_out":
        m = tarfile.TarInfo("generated/hl")
        m.type = tarfile.LNKTYPE
        m.linkname = "/etc/passwd"
    elif kind == "device":
        m = tarfile.TarInfo("generated/dev")
        m.type = tarfile.CHRTYPE
        m.devmajor, m.devminor = 1, 3
    else:
        m = tarfile.TarInfo("services/blog/planted.txt")
        data = b"a configs archive may not write service data"
    m.size = len(data)
    blob = _hostile_tar(m, data)
    prefix = f"partial/{res.timestamp}/"
    await s3_storage.put_bytes(prefix + "configs.tar.zst", blob)
    manifest = json.loads(await s3_storage.get_bytes(prefix + "manifest.json"))
    for o in manifest["objects"]:
        if o["name"] == "configs.tar.zst":
            o["size"], o["sha256"] = len(blob), hashlib.sha256(blob).hexdigest()
    await s3_storage.put_bytes(prefix + "manifest.json", json.dumps(manifest).encode())
    live = snapshot(root.path)
    outside_before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UnsafeArchiveError):
        await RestoreJob(cfg, s3_storage).run(res.timestamp)
    assert snapshot(root.path) == live
    assert sorted(p.name for p in tmp_path.iterdir()) == outside_before
    assert ctl_calls() == []
    ref = (await list_backups(s3_storage))[0]
    assert not (await verify_backup(s3_storage, ref)).ok


async def test_an_absolute_symlink_in_own_data_is_refused_with_the_way_out(
    root: RootInfo, s3_storage: S3Storage
) -> None:
    (root.path / "services" / "blog" / "localtime").symlink_to("/usr/share/zoneinfo/UTC")
    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("full")
    assert any("a restore will refuse it" in w for w in res.warnings)
    live = snapshot(root.path)
    with pytest.raises(UnsafeArchiveError, match="'services/blog/localtime' points at absolute") as err:
        await RestoreJob(cfg, s3_storage).run(res.timestamp)
    assert "unpack it by hand" in err.value.fix and "Restoring by hand" in err.value.fix
    assert snapshot(root.path) == live
    assert ctl_calls() == []


async def test_docker_down_refuses_a_full_restore_before_anything_stops(
    root: RootInfo, s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("full")
    live = snapshot(root.path)
    monkeypatch.setenv("FAKE_DOCKER_DAEMON_DOWN", "1")  # Docker Desktop not running
    # check_docker's words (asked while the load starts), not a half-fed load's
    with pytest.raises(DockerError, match=r"^`docker version` could not reach the Docker engine"):
        await RestoreJob(cfg, s3_storage).run(res.timestamp)
    assert snapshot(root.path) == live
    assert ctl_calls() == []  # tinyserved never stopped
    assert sorted(p.name for p in root.path.parent.iterdir() if p.name.startswith(".")) == []


async def test_images_stream_into_docker_but_load_only_after_the_swap(
    root: RootInfo, s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docker load reads the archive while the rest is staged, yet loads nothing until the swap."""
    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("full")
    shutil.rmtree(os.environ["FAKE_DOCKER_STATE"])
    loads: list[asyncio.subprocess.Process] = []
    real_spawn = docker._spawn

    async def spy(*argv: str, **kw: Any) -> asyncio.subprocess.Process:
        proc = await real_spawn(*argv, **kw)
        if argv[1:2] == ("load",):
            loads.append(proc)
        return proc

    monkeypatch.setattr(docker, "_spawn", spy)
    seen: dict[str, object] = {}

    async def confirm(plan: RestorePlan) -> bool:
        # everything is staged and the user is being asked: docker is mid-load, nothing loaded
        seen["running"] = [p.returncode is None for p in loads]
        seen["images"] = await inspect_images(root.images)
        seen["tree"] = snapshot(root.path) == live
        return answer

    live = snapshot(root.path)
    answer = False
    with pytest.raises(RestoreError, match="cancelled"):
        await RestoreJob(cfg, s3_storage, confirm=confirm).run(res.timestamp)
    assert seen == {"running": [True], "images": dict.fromkeys(root.images), "tree": True}
    assert loads[0].returncode == -9  # killed (and reaped) when the user said no
    assert await inspect_images(root.images) == dict.fromkeys(root.images)
    assert ctl_calls() == []

    answer = True
    out = await RestoreJob(cfg, s3_storage, confirm=confirm).run(res.timestamp)
    assert seen["running"] == [False, True] and seen["images"] == dict.fromkeys(root.images)
    assert sorted(out.images_loaded) == sorted(root.images)
    assert loads[1].returncode == 0
    assert None not in (await inspect_images(root.images)).values()
    assert ctl_calls() == [["stop"], ["start"]]


def cli_config(tmp_path: Path, s3_server: MotoServer, bucket: str, root: Path) -> Path:
    """A config file for the command line: this root, the test bucket, the tinyserved stand-ins."""
    cfgp = tmp_path / "cfg.yaml"
    cfgp.write_text(
        f"root: {root}\n"
        f"destination:\n  url: s3://{bucket}/tb\n  endpoint: {s3_server.endpoint}\n  addressing_style: path\n"
        "tinyserved:\n  stop: [tinyserved-ctl, stop]\n  start: [tinyserved-ctl, start]\n"
    )
    return cfgp


async def test_restore_onto_new_machine_via_cli(
    tmp_path: Path, s3_server: MotoServer, bucket: str, root: RootInfo
) -> None:
    cfgp = cli_config(tmp_path, s3_server, bucket, root.path)
    before_tree, before_db = snapshot(root.path)
    res = run_cli("--config", str(cfgp), "create", "--full", "--json")
    assert res.returncode == 0, res.stderr
    ts = json.loads(res.stdout)["timestamp"]
    new_root = tmp_path / "new-mac" / "tinyserve"
    env = {"TINYSERVE_ROOT": str(new_root)}
    res = run_cli("--config", str(cfgp), "restore", ts, "--full", env=env)
    assert res.returncode != 0 and "--yes" in res.stderr and not new_root.exists()
    res = run_cli("--config", str(cfgp), "restore", ts, "--full", "--yes", env=env)
    assert res.returncode == 0, res.stderr
    assert snapshot(new_root) == (before_tree, before_db)
    res = run_cli("--config", str(cfgp), "verify", ts, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)[0]["ok"] is True
    res = run_cli("--config", str(cfgp), "verify", "--all", "--deep")
    assert res.returncode == 0, res.stderr
    assert "deep:" in res.stdout


def test_clean_up_deletes_what_restores_kept_aside_and_nothing_live(
    tmp_path: Path, s3_server: MotoServer, bucket: str, root: RootInfo
) -> None:
    """The issue's "kept until the next successful restore or an explicit clean-up"."""
    cfgp = cli_config(tmp_path, s3_server, bucket, root.path)
    res = run_cli("--config", str(cfgp), "restore", "--clean-up", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["removed"] == []
    res = run_cli("--config", str(cfgp), "create", "--full", "--json")
    ts = json.loads(res.stdout)["timestamp"]
    service = sorted(p.name for p in (root.path / "services").iterdir())[0]
    for args in (["--full"], ["--full", "--service", service]):
        res = run_cli("--config", str(cfgp), "restore", ts, *args, "--yes")
        assert res.returncode == 0, res.stderr
    # what an interrupted restore could leave: its staging directory beside the root
    stale = root.path.parent / f".{root.path.name}.restore-deadbeef"
    (stale / "parts").mkdir(parents=True)
    # not ours to take: another root's staging whose name starts like ours, and a user's file
    other = root.path.parent / f".{root.path.name}.restore-deadbeef.restore-0123abcd"
    other.mkdir()
    (root.path / ".restore-trash-notes.txt").write_text("mine")
    live = snapshot(root.path)
    # and a killed point-in-time restore: its staged database and a download of its own
    pitr = [".state.db.pitr-999", "..state.db.pitr-999.pitr-abcd1234.download"]
    for name in pitr:
        (root.path / name).write_bytes(b"x")
    kept = sorted(p.name for p in root.path.iterdir() if p.name.endswith(".pre-restore"))
    # a full restore replaces each service's directory on its own
    svc_kept = sorted(f"services/{p.name}" for p in (root.path / "services").glob("*.pre-restore"))
    assert f"services/{service}.pre-restore" in svc_kept
    assert "state.db.pre-restore" in kept and (root.path / "services" / f"{service}.pre-restore").is_dir()

    res = run_cli("--config", str(cfgp), "status")  # where users learn of them
    assert "kept by earlier restores:" in res.stdout and "restore --clean-up" in res.stdout
    res = run_cli("--config", str(cfgp), "restore", "--clean-up")  # no terminal, no --yes
    assert res.returncode != 0 and "--yes" in res.stderr and "kept by earlier restores" in res.stderr
    assert stale.exists() and (root.path / "state.db.pre-restore").exists()
    res = run_cli("--config", str(cfgp), "restore", "--clean-up", "--yes", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    expected = [*kept, *svc_kept, *pitr, str(stale)]
    assert sorted(out["removed"]) == sorted(expected), (out["removed"], expected)
    assert out["size_bytes"] > 0
    assert not stale.exists() and other.exists() and (root.path / ".restore-trash-notes.txt").exists()
    assert not [p for p in root.path.rglob("*.pre-restore")]
    assert snapshot(root.path) == live  # nothing live touched
    res = run_cli("--config", str(cfgp), "status", "--json")
    assert "restore_leftovers" not in json.loads(res.stdout)
    res = run_cli("--config", str(cfgp), "restore", "--clean-up", ts)
    assert res.returncode != 0 and "takes no backup" in res.stderr


def test_clean_up_finds_what_restores_left_through_a_symlinked_root(tmp_path: Path) -> None:
    real = tmp_path / "disk" / "tinyserve"
    (real / "services" / "blog.pre-restore").mkdir(parents=True)
    (real / "state.db.pre-restore").write_bytes(b"x" * 10)
    link = tmp_path / "tinyserve"
    link.symlink_to(real)
    found = restore_mod.restore_leftovers(link)
    assert [p.relative_to(link).as_posix() for p in found] == [
        "state.db.pre-restore",
        "services/blog.pre-restore",
    ]
    restore_mod.remove_leftovers(found)
    assert sorted(p.name for p in real.rglob("*")) == ["services"] and link.is_symlink()


def test_full_disk_while_staging(tmp_path: Path, s3_server: MotoServer, bucket: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        big = make_root(tmp_path / "src", size="12MB", seed=2)
        cfgp = tmp_path / "cfg.yaml"
        cfgp.write_text(
            f"root: {big.path}\n"
            f"destination:\n  url: s3://{bucket}/tb\n  endpoint: {s3_server.endpoint}\n  addressing_style: path\n"
        )
        res = run_cli("--config", str(cfgp), "create", "--full", "--json")
        assert res.returncode == 0, res.stderr
        ts = json.loads(res.stdout)["timestamp"]
        target = mnt / "tinyserve"
        target.mkdir()
        (target / "keep.txt").write_text("live data")
        res = run_cli("--config", str(cfgp), "restore", ts, "--yes", env={"TINYSERVE_ROOT": str(target)})
        assert res.returncode != 0
        assert "no space left" in res.stderr and "Traceback" not in res.stderr
        assert [p.name for p in mnt.iterdir()] == ["tinyserve"]
        assert [p.name for p in target.iterdir()] == ["keep.txt"]
    finally:
        subprocess.run(["umount", str(mnt)])


def test_missing_credentials_is_clear(
    tmp_path: Path, s3_auth_server: tuple[MotoServer, str, str, str]
) -> None:
    server, bucket, _key, _secret = s3_auth_server
    cfgp = tmp_path / "cfg.yaml"
    cfgp.write_text(
        f"root: {tmp_path / 'r'}\n"
        f"destination:\n  url: s3://{bucket}/tb\n  endpoint: {server.endpoint}\n  addressing_style: path\n"
    )
    env = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
    }
    res = run_cli("--config", str(cfgp), "restore", "2026-01-01T00-00-00Z", "--yes", env=env)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "credentials" in res.stderr.lower()
    assert not (tmp_path / "r").exists()


# ---- backups made by the guide's own scripts ------------------------------------------------------


def _guide_storage_cfg(root: Path) -> Config:
    return cfg_for(root)


async def test_guide_full_backup_lists_and_restores(
    root: RootInfo, s3_server: MotoServer, bucket: str, s3_storage: S3Storage
) -> None:
    from tests.helpers.guide import run_guide_backup_async

    before_tree, before_db = snapshot(root.path)
    # tinyserved holds the db open, so the guide's script leaves a stray state.db-wal beside it
    run = await run_guide_backup_async(
        "full", root.path, bucket, "tb", {"AWS_ENDPOINT_URL": s3_server.endpoint}, hold_db_open=True
    )
    names = {o.key.rsplit("/", 1)[-1] for o in await s3_storage.list("full/")}
    assert {"state.db", "configs.tar.gz", "services.tar.gz", "images.tar.gz", "manifest.json"} <= names
    refs = await list_backups(s3_storage)
    assert len(refs) == 1 and refs[0].manifest.guide and refs[0].timestamp == run.timestamp
    shutil.rmtree(root.path)
    job = RestoreJob(cfg_for(root.path), s3_storage)
    out = await job.run(refs[0].timestamp)
    assert out.unverified
    assert any("UNVERIFIED" in w for w in out.warnings)
    if "state.db-wal" in names:
        assert any("state.db-wal" in w and "NOT applied" in w for w in out.warnings)
    assert not (root.path / "state.db-wal").exists()
    assert snapshot(root.path) == (before_tree, before_db)
    assert sorted(out.images_loaded) == sorted(root.images)


async def test_guide_partial_and_single_service_from_guide_full(
    root: RootInfo, s3_server: MotoServer, bucket: str, s3_storage: S3Storage
) -> None:
    from tests.helpers.guide import run_guide_backup_async

    env = {"AWS_ENDPOINT_URL": s3_server.endpoint}
    before_tree, before_db = snapshot(root.path)
    part = await run_guide_backup_async(
        "partial", root.path, bucket, "tb", env, timestamp="2026-01-10T06-00-00Z"
    )
    full = await run_guide_backup_async(
        "full", root.path, bucket, "tb", env, timestamp="2026-01-10T12-00-00Z"
    )
    (root.path / "services" / "notes" / "newer.txt").write_text("newer")
    shutil.rmtree(root.path / "services" / "blog")
    out = await RestoreJob(cfg_for(root.path), s3_storage).run(full.timestamp, services=["blog"])
    assert out.restored == ["services/blog"]
    assert tree_digest(root.path / "services" / "blog") == {
        k.removeprefix("services/blog/"): v for k, v in before_tree.items() if k.startswith("services/blog/")
    }
    assert (root.path / "services" / "notes" / "newer.txt").exists()
    import sqlite3

    conn = sqlite3.connect(root.db_path)
    conn.execute("create table later(x)")
    conn.commit()
    conn.close()
    out = await RestoreJob(cfg_for(root.path), s3_storage).run(part.timestamp, "partial")
    assert db_dump(root.db_path) == before_db
    # verify says clearly that guide objects have no checksum to compare
    ref = next(r for r in await list_backups(s3_storage) if r.timestamp == part.timestamp)
    check = await verify_backup(s3_storage, ref)
    assert check.ok and not any(o.verified for o in check.objects)


async def test_object_that_is_not_a_database_is_refused(root: RootInfo, s3_storage: S3Storage) -> None:
    ts = "2026-01-02T03-00-00Z"
    await s3_storage.put_bytes(f"partial/{ts}/state.db", b"this is not a SQLite database" * 100)
    await s3_storage.put_bytes(
        f"partial/{ts}/manifest.json", b'{"timestamp": "' + ts.encode() + b'", "type": "partial"}'
    )
    live = snapshot(root.path)
    with pytest.raises(IntegrityError, match="does not open as a database"):
        await RestoreJob(cfg_for(root.path), s3_storage).run(ts)
    assert snapshot(root.path) == live
    assert ctl_calls() == []


async def test_cancel_during_the_swap_puts_everything_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM (a cancel) while files move: the thread moving them is waited for, then undone."""
    root = tmp_path / "root"
    root.mkdir()
    items = []
    for name in ("a", "b", "c"):
        (root / name).write_text("old")
        staged = tmp_path / f"staged-{name}"
        staged.write_text("new")
        items.append(StagedItem(name, staged))
    first_move, go_on, applied = threading.Event(), threading.Event(), threading.Event()
    real_move, real_apply = Swap._move, Swap.apply

    def move(self: Swap, src: Path, dst: Path) -> None:
        real_move(self, src, dst)
        if not first_move.is_set():
            first_move.set()
            go_on.wait(0.5)  # the cancel lands while this thread is mid-swap

    def apply(self: Swap, staged: list[StagedItem]) -> list[str]:
        try:
            return real_apply(self, staged)
        finally:
            applied.set()

    monkeypatch.setattr(Swap, "_move", move)
    monkeypatch.setattr(Swap, "apply", apply)
    ctl = Tinyserved(["tinyserved-ctl", "stop"], ["tinyserved-ctl", "start"], [])
    task = asyncio.create_task(swap_in(Swap(root), items, ctl))
    assert await asyncio.to_thread(first_move.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    go_on.set()
    assert await asyncio.to_thread(applied.wait, 10)  # whatever the swap thread still had to do
    assert {p.name: p.read_text() for p in root.iterdir()} == {"a": "old", "b": "old", "c": "old"}
    assert ctl_calls() == [["stop"], ["start"]]


async def test_cancel_once_docker_has_the_whole_archive_lets_the_restore_finish(
    root: RootInfo, s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Past the commit there is no clean way back: a cancel then finishes the restore first."""
    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("full")
    want_tree, want_db = snapshot(root.path)
    (root.path / "generated" / "marker").write_text("newer than the backup")
    shutil.rmtree(os.environ["FAKE_DOCKER_STATE"])
    gate = tmp_path / "docker-may-register"
    monkeypatch.setenv("FAKE_DOCKER_LOAD_GATE", str(gate))
    job = RestoreJob(cfg, s3_storage)
    task = asyncio.create_task(job.run(res.timestamp))

    # docker has the whole archive, tail included
    await wait_for(Path(f"{gate}.reached").exists, 30, "docker to read the whole archive")
    task.cancel()
    gate.touch()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    assert snapshot(root.path) == (want_tree, want_db)  # restored, not rolled back
    # what it did, for the CLI to tell the user
    assert job.completed is not None and "state.db" in job.completed.restored
    assert sorted(job.completed.images_loaded) == sorted(root.images)
    assert None not in (await inspect_images(root.images)).values()
    assert ctl_calls() == [["stop"], ["start"]]


@pytest.mark.parametrize("how", ["fails_at_end", "never_finishes"])
async def test_a_docker_load_failing_after_the_swap_rolls_back_and_starts(
    how: str, root: RootInfo, s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("full")
    (root.path / "generated" / "marker").write_text("live")
    live = snapshot(root.path)
    shutil.rmtree(os.environ["FAKE_DOCKER_STATE"])
    gate = tmp_path / "never"
    if how == "fails_at_end":
        # the engine takes the whole archive, then fails to store it: after the stop and the swap
        monkeypatch.setenv("FAKE_DOCKER_LOAD_FAIL_AT_END", "1")
        expected = "no space left"
    else:
        # a stuck engine must not keep tinyserved down for good once it has the whole archive
        monkeypatch.setenv("FAKE_DOCKER_LOAD_GATE", str(gate))  # reads all, then hangs
        monkeypatch.setattr(docker, "LOAD_FINISH_TIMEOUT_S", 2.0)  # ms are enough to reach the gate
        expected = r"`docker load` did not finish within 2 s"
    with pytest.raises(DockerError, match=expected):
        await asyncio.wait_for(RestoreJob(cfg, s3_storage).run(res.timestamp), 25)
    if how == "never_finishes":
        assert Path(f"{gate}.reached").exists()  # it did get the whole archive
    assert snapshot(root.path) == live
    assert ctl_calls() == [["stop"], ["start"]]
    assert await inspect_images(root.images) == dict.fromkeys(root.images)  # nothing loaded
    assert sorted(p.name for p in root.path.parent.iterdir() if p.name.startswith(".")) == []


async def test_a_cancel_while_tinyserved_starts_after_a_point_in_time_swap_lets_it_start(
    tmp_path: Path,
) -> None:
    """`restore --at` in place: Ctrl-C as tinyserved starts must not leave it stopped."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "state.db").write_text("old")
    (root / "state.db.pre-restore").write_text("older")  # the previous restore's: goes to the trash
    staged = tmp_path / "staged.db"
    staged.write_text("new")
    reached, fifo = tmp_path / "reached", tmp_path / "release"
    os.mkfifo(fifo)
    # The start command signals it is under way, then waits for the test's line on the FIFO
    # (bounded by the command timeout).
    start = ["sh", "-c", 'touch "$1"; read _ < "$2"; exec tinyserved-ctl start', "sh"]
    ctl = Tinyserved(["tinyserved-ctl", "stop"], [*start, str(reached), str(fifo)], [], timeout=20)
    swapped: list[list[str]] = []
    task = asyncio.create_task(restore_mod.swap_database(cfg_for(root), staged, ctl, swapped=swapped.append))

    await wait_for(reached.exists, 20, "the start command")
    assert swapped == [["state.db.pre-restore"]]  # told before the start, for the CLI to report
    task.cancel()
    await asyncio.sleep(0)  # the cancel lands while the start command runs
    assert not task.done()
    await release(fifo)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 20)
    assert ctl_calls() == [["stop"], ["start"]]
    assert {p.name: p.read_text() for p in root.iterdir()} == {
        "state.db": "new",
        "state.db.pre-restore": "old",
    }  # and no trash directory left behind


async def test_a_cancel_landing_after_a_protected_step_ended_keeps_its_result() -> None:
    async def step() -> str:
        await asyncio.sleep(0)
        return "done"

    caller = asyncio.create_task(through_cancel(step()))
    await asyncio.sleep(0)  # the caller starts the step and waits on it
    while len(asyncio.all_tasks()) > 2:  # until the step itself has ended
        await asyncio.sleep(0)
    caller.cancel()  # lands before the caller has resumed with the step's result
    assert await caller == ("done", True)


async def test_a_cancel_while_killing_docker_still_rolls_back_and_starts(
    root: RootInfo, s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("full")
    (root.path / "generated" / "marker").write_text("live")
    live = snapshot(root.path)
    # the database turns out bad in place, after the swap: everything must go back...
    checks = iter(["ok", "*** in database main *** Page 2: btreeInitPage() returns error code 11"])
    monkeypatch.setattr(restore_mod, "integrity_check", lambda path: next(checks))
    real_cancel_load = RestoreJob._cancel_load

    fired: list[bool] = []

    async def sigterm_meanwhile(self: RestoreJob) -> bool:
        current = asyncio.current_task()
        assert current is not None
        if not fired:
            fired.append(True)
            current.cancel()  # ...even when a SIGTERM arrives while docker is being killed
        return await real_cancel_load(self)

    monkeypatch.setattr(RestoreJob, "_cancel_load", sigterm_meanwhile)
    with pytest.raises(IntegrityError, match="btreeInitPage"):
        await RestoreJob(cfg, s3_storage).run(res.timestamp)
    assert snapshot(root.path) == live
    assert ctl_calls() == [["stop"], ["start"]]
    assert sorted(p.name for p in root.path.parent.iterdir() if p.name.startswith(".")) == []


def test_sigterm_after_docker_has_the_archive_finishes_the_restore_then_exits(
    tmp_path: Path, s3_server: MotoServer, bucket: str
) -> None:
    src = make_root(tmp_path / "src", size="tiny", seed=5)
    want = snapshot(src.path)
    cfgp = tmp_path / "cfg.yaml"
    cfgp.write_text(
        f"root: {src.path}\n"
        f"destination:\n  url: s3://{bucket}/sigterm\n  endpoint: {s3_server.endpoint}\n"
        "  addressing_style: path\n"
        "tinyserved:\n  stop: [tinyserved-ctl, stop]\n  start: [tinyserved-ctl, start]\n"
    )
    res = run_cli("--config", str(cfgp), "create", "--full", "--json")
    assert res.returncode == 0, res.stderr
    ts = json.loads(res.stdout)["timestamp"]
    target = tmp_path / "new-machine"
    gate = tmp_path / "docker-may-register"
    env = {
        **os.environ,
        "TINYSERVE_ROOT": str(target),
        "FAKE_DOCKER_STATE": str(tmp_path / "docker-new"),
        "FAKE_DOCKER_LOAD_GATE": str(gate),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(cfgp), "restore", ts, "--full", "--yes"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{gate}.reached").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "docker never got the whole archive"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # a second one changes nothing
        gate.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    # Not "aborted": the user is told the restore went through, and what it did.
    assert err.strip().splitlines()[-1] == (
        "interrupted after the point of no return: the restore finished (above)"
    )
    assert out.startswith("Restored state.db, backups, cloudflared") and f"backup {ts}" in out
    assert "Traceback" not in err
    assert snapshot(target) == want  # restored to the end, not half-undone
    assert [c["args"] for c in read_calls(os.environ["FAKE_CALLS_LOG"], "tinyserved-ctl")][-2:] == [
        ["stop"],
        ["start"],
    ]


async def shipped_root(tmp_path: Path, commits: int) -> tuple[Path, Path, Path]:
    """(root, destination, state.db): ``commits`` commits shipped by a real WAL shipper to a local
    destination, then the shipper stopped."""
    from daemon.storage import LocalStorage
    from daemon.wal import WalShipper
    from tests.helpers.writer import commit_rows, fast_options, init_db

    root, dest = tmp_path / "root", tmp_path / "dest"
    root.mkdir()
    dest.mkdir()
    db = root / "state.db"
    init_db(db)
    shipper = WalShipper(db, LocalStorage(dest), tmp_path / "spool", fast_options())
    await shipper.start()
    await asyncio.to_thread(commit_rows, db, 0, commits, 100)
    assert await shipper.flush(10)
    await shipper.stop()
    return root, dest, db


@pytest.mark.parametrize("interrupted", [False, True])
async def test_point_in_time_restore_in_place_via_cli(
    interrupted: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`restore --latest --yes`: state.db replaced by the shipped one, the old kept, tinyserved
    stopped and started; a SIGTERM while it starts lets it finish and says so."""
    from tests.helpers.writer import commit_rows, logical_dump

    monkeypatch.setenv("FAKE_TINYSERVED_STATE", str(tmp_path / "tinyserved.state"))
    root, dest, db = await shipped_root(tmp_path, 20)
    shipped = logical_dump(db)
    await asyncio.to_thread(commit_rows, db, 20, 5, 100)  # the live database moves on, unshipped
    live = logical_dump(db)
    reached, fifo = tmp_path / "reached", tmp_path / "release"
    os.mkfifo(fifo)
    start = (
        f'[sh, -c, \'touch "$1"; read _ < "$2"; exec tinyserved-ctl start\', sh, {reached}, {fifo}]'
        if interrupted
        else "[tinyserved-ctl, start]"
    )
    cfgp = tmp_path / "cfg.yaml"
    log_file = tmp_path / "restore.log"
    cfgp.write_text(
        f"root: {root}\ndestination:\n  url: file://{dest}\nlogging:\n  file: {log_file}\n"
        f"tinyserved:\n  stop: [tinyserved-ctl, stop]\n  start: {start}\n  timeout_seconds: 20\n"
    )
    argv = [sys.executable, "-m", "daemon", "--config", str(cfgp), "restore", "--latest", "--yes"]
    if interrupted:
        argv.append("--json")  # a script reading the result learns that the restore went through
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        if interrupted:
            await wait_for(reached.exists, 30, "the start command")
            # SIGTERM until the restore logs a second one: then the first has cancelled it for
            # sure, while tinyserved's start is still waiting on the test.
            deadline = time.monotonic() + 30
            while b"signal_while_stopping" not in (log_file.read_bytes() if log_file.exists() else b""):
                assert time.monotonic() < deadline, "the restore never saw the signal"
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.05)
            await release(fifo)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if interrupted:
        assert proc.returncode == 130, err
        assert err.decode().strip().splitlines()[-1] == (
            "interrupted after the point of no return: the restore finished (above)"
        )
    else:
        assert proc.returncode == 0, err
    if interrupted:
        result = json.loads(out)
        assert result["interrupted"] is True and result["kept_aside"] == ["state.db.pre-restore"]
    else:
        assert out.decode().startswith("state.db restored to ")
    status_calls = [
        c for c in read_calls(os.environ["FAKE_CALLS_LOG"], "tinyserve") if c["args"] == ["status"]
    ]
    if not interrupted:  # tinyserved is asked about, and came up on the restored database
        assert len(status_calls) == 1 and b"warning" not in err
    assert logical_dump(db) == shipped
    assert logical_dump(root / "state.db.pre-restore") == live
    assert ctl_calls() == [["stop"], ["start"]]
    assert sorted(p.name for p in root.iterdir()) == ["state.db", "state.db.pre-restore"]


async def test_point_in_time_restore_to_a_file_never_overwrites_unasked(tmp_path: Path) -> None:
    """`--output` replaces an existing file only with --yes, never writes the live state.db (that
    would skip stopping tinyserved), and says when the asked-for time is past the newest commit."""
    from tests.helpers.writer import logical_dump

    root, dest, db = await shipped_root(tmp_path, 10)
    cfgp = tmp_path / "cfg.yaml"
    cfgp.write_text(f"root: {root}\ndestination:\n  url: file://{dest}\n")

    def restore(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("--config", str(cfgp), "restore", *args)

    out = tmp_path / "copy.db"
    res = restore("--latest", "--output", str(out))
    assert res.returncode == 0, res.stderr
    assert logical_dump(out) == logical_dump(db)
    out.write_bytes(b"something of the user's")
    res = restore("--latest", "--output", str(out))
    assert res.returncode == 2 and res.stderr.strip() == (
        f"error: {out} exists — choose another --output, or add --yes to replace it"
    )
    assert out.read_bytes() == b"something of the user's"
    res = restore("--latest", "--output", str(out), "--yes")
    assert res.returncode == 0, res.stderr
    assert logical_dump(out) == logical_dump(db)

    before = db.read_bytes()
    res = restore("--latest", "--output", str(root / "." / "state.db"), "--yes")
    assert res.returncode == 2 and "is the live state.db" in res.stderr
    (root / "state.db-wal").write_bytes(b"commits not yet in state.db")
    res = restore("--latest", "--output", str(root / "state.db-wal"), "--yes")
    assert res.returncode == 2 and "is the live state.db-wal" in res.stderr
    os.link(db, tmp_path / "hard-link.db")
    res = restore("--latest", "--output", str(tmp_path / "hard-link.db"), "--yes")
    assert res.returncode == 2 and "is the live state.db" in res.stderr
    assert db.read_bytes() == before
    assert (root / "state.db-wal").read_bytes() == b"commits not yet in state.db"

    res = restore("--at", "2099-01-01T00:00:00Z", "--output", str(tmp_path / "future.db"))
    assert res.returncode == 0, res.stderr
    assert "(nothing later was shipped: the newest commit in the bucket is at 20" in res.stdout
    res = restore("--latest", "--output", str(tmp_path / "latest.db"))
    assert "nothing later" not in res.stdout
