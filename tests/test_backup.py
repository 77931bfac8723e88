"""Snapshot backups against the real S3 server: partial, full, services, list, prune, crash safety."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.backup import BackupJob
from daemon.config import Config, parse_config
from daemon.errors import BackupError, LockError, UsageError
from daemon.lock import root_lock
from daemon.manifest import list_backups, scan
from daemon.retention import decide, prune
from daemon.storage import S3Storage
from tests.conftest import REPO, run_cli
from tests.helpers.rootfactory import RootInfo, db_dump, make_root, read_calls
from tests.helpers.s3server import FaultProxy, MotoServer


@pytest.fixture
def root(tmp_path: Path) -> RootInfo:
    return make_root(tmp_path / "tinyserve", size="tiny", seed=7)


def cfg_for(root: Path, extra: str = "") -> Config:
    return parse_config(f"root: {root}\ncompression:\n  threads: 0\n{extra}")


async def fetch(st: S3Storage, key: str) -> bytes:
    return await st.get_bytes(key)


def untar(data: bytes, dest: Path, flag: str = "--zstd") -> None:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", flag, "-xf", "-", "-C", str(dest)], input=data, check=True)


async def test_partial_backup_layout_and_manual_restore(
    root: RootInfo, s3_storage: S3Storage, tmp_path: Path
) -> None:
    res = await BackupJob(cfg_for(root.path), s3_storage).run("partial")
    prefix = f"partial/{res.timestamp}/"
    keys = sorted(o.key for o in await s3_storage.list(prefix))
    assert keys == [prefix + "configs.tar.zst", prefix + "manifest.json", prefix + "state.db.zst"]
    manifest = json.loads(await fetch(s3_storage, prefix + "manifest.json"))
    assert manifest["type"] == "partial" and manifest["timestamp"] == res.timestamp
    assert manifest["hostname"] and manifest["tool_version"]
    for o in manifest["objects"]:
        assert len(o["sha256"]) == 64 and o["size"] > 0 and o["codec"] == "zstd"
    # by hand, with standard tools only
    raw = await fetch(s3_storage, prefix + "state.db.zst")
    db = tmp_path / "manual" / "state.db"
    db.parent.mkdir()
    db.write_bytes(subprocess.run(["zstd", "-dc"], input=raw, capture_output=True, check=True).stdout)
    assert not (db.parent / "state.db-wal").exists()
    assert db_dump(db) == db_dump(root.db_path)  # includes the rows only in the live -wal
    untar(await fetch(s3_storage, prefix + "configs.tar.zst"), tmp_path / "manual")
    acme = tmp_path / "manual" / "traefik" / "acme.json"
    assert acme.read_text() == (root.path / "traefik" / "acme.json").read_text()
    assert oct(acme.stat().st_mode & 0o777) == "0o600"
    assert not (tmp_path / "manual" / "services").exists()


async def test_full_backup_has_services_and_images(root: RootInfo, s3_storage: S3Storage) -> None:
    with capture_logs() as logs:
        res = await BackupJob(cfg_for(root.path), s3_storage).run("full")
    events = [e["event"] for e in logs]
    # `docker save` starts first, to overlap the archives; the manifest keeps the artifacts' order
    assert events.index("docker_save_started") < events.index("archive_done")
    assert [o.name for o in res.manifest.objects][:2] == ["state.db.zst", "configs.tar.zst"]
    assert res.manifest.objects[-1].name == "images.tar.zst"
    names = sorted(o.name for o in res.manifest.objects)
    assert names == sorted(
        ["state.db.zst", "configs.tar.zst", "images.tar.zst"]
        + [f"services/{s}.tar.zst" for s in root.services]
    )
    assert res.manifest.images == root.images
    assert sorted(res.manifest.services) == sorted(root.services)
    saves = [c["args"] for c in read_calls(Path(os.environ["FAKE_DOCKER_STATE"]) / "calls.log", "docker")]
    assert ["save", *root.images] in saves
    # the images archive is a real `docker save` tar, zstd-compressed
    raw = await s3_storage.get_bytes(f"full/{res.timestamp}/images.tar.zst")
    listing = subprocess.run(["tar", "--zstd", "-tf", "-"], input=raw, capture_output=True, check=True).stdout
    assert b"manifest.json" in listing


async def test_links_a_restore_would_refuse_are_warned_about_at_backup_time(
    root: RootInfo, s3_storage: S3Storage
) -> None:
    blog = root.path / "services" / "blog"
    (blog / "localtime").symlink_to("/usr/share/zoneinfo/UTC")
    (blog / "shared").symlink_to("../../../elsewhere")
    (blog / "fine").symlink_to("../notes")
    res = await BackupJob(cfg_for(root.path), s3_storage).run("services", ["blog"])
    refused = [w for w in res.warnings if "a restore will refuse it" in w]
    assert len(refused) == 2, res.warnings
    assert "'services/blog/localtime' points at absolute path '/usr/share/zoneinfo/UTC'" in refused[0]
    assert "'services/blog/shared' points outside the destination" in refused[1]
    # stored as they are all the same: it is the user's data
    raw = await s3_storage.get_bytes(f"services/{res.timestamp}/services/blog.tar.zst")
    listing = subprocess.run(["tar", "--zstd", "-tvf", "-"], input=raw, capture_output=True, check=True)
    assert "services/blog/localtime -> /usr/share/zoneinfo/UTC" in listing.stdout.decode()


async def test_services_backup_selects_names(root: RootInfo, s3_storage: S3Storage) -> None:
    job = BackupJob(cfg_for(root.path), s3_storage)
    res = await job.run("services", ["blog"])
    assert [o.name for o in res.manifest.objects] == ["services/blog.tar.zst"]
    with pytest.raises(UsageError, match="unknown service nope"):
        await job.run("services", ["nope"])
    res = await job.run("services")
    assert sorted(res.manifest.services) == sorted(root.services)


async def test_hooks_run_around_service_and_post_runs_on_failure(
    root: RootInfo, s3_storage: S3Storage, tmp_path: Path
) -> None:
    marks = tmp_path / "marks.txt"
    extra = (
        "hooks:\n"
        "  blog:\n"
        f'    pre: "echo pre-$TINYSERVE_SERVICE >> {marks}"\n'
        f'    post: [sh, -c, "echo post-$TINYSERVE_SERVICE >> {marks}"]\n'
        "  notes:\n"
        '    pre: "exit 3"\n'
        f'    post: "echo post-notes >> {marks}"\n'
    )
    job = BackupJob(cfg_for(root.path, extra), s3_storage)
    await job.run("services", ["blog"])
    assert marks.read_text().split() == ["pre-blog", "post-blog"]
    with pytest.raises(BackupError, match="pre hook of service notes exited with 3"):
        await job.run("services", ["notes"])
    assert marks.read_text().split()[-1] == "post-notes"
    # the failed backup left nothing behind
    assert [r.type for r in await list_backups(s3_storage)] == ["services"]
    assert (await scan(s3_storage)).incomplete == []


async def test_snapshot_is_consistent_while_writer_keeps_writing(
    root: RootInfo, s3_storage: S3Storage, tmp_path: Path
) -> None:
    stop = tmp_path / "stop"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3,sys,os\n"
            "c=sqlite3.connect(sys.argv[1],isolation_level=None); c.execute('pragma journal_mode=wal')\n"
            "c.execute('create table if not exists churn(i integer primary key, v blob)')\n"
            "i=0\n"
            "while not os.path.exists(sys.argv[2]):\n"
            "    c.execute('begin'); c.execute('insert into churn(v) values (randomblob(3000))');"
            " c.execute('insert into churn(v) values (randomblob(3000))'); c.execute('commit'); i+=1\n",
            str(root.db_path),
            str(stop),
        ]
    )
    try:
        for _ in range(3):
            res = await BackupJob(cfg_for(root.path), s3_storage).run("partial")
            raw = await s3_storage.get_bytes(f"partial/{res.timestamp}/state.db.zst")
            db = tmp_path / f"snap-{res.timestamp}.db"
            db.write_bytes(subprocess.run(["zstd", "-dc"], input=raw, capture_output=True, check=True).stdout)
            conn = sqlite3.connect(db)
            assert conn.execute("pragma integrity_check").fetchone()[0] == "ok"
            # every transaction inserts two rows: a consistent snapshot never holds an odd count
            assert conn.execute("select count(*) % 2 from churn").fetchone()[0] == 0
            conn.close()
    finally:
        stop.touch()
        writer.wait(10)
    assert writer.returncode == 0


async def test_list_only_complete_and_marks_guide_backups(root: RootInfo, s3_storage: S3Storage) -> None:
    await BackupJob(cfg_for(root.path), s3_storage).run("partial")
    # an interrupted backup: objects but no manifest
    await s3_storage.put_bytes("full/2026-01-01T00-00-00Z/state.db.zst", b"x")
    # a guide-made backup
    await s3_storage.put_bytes("partial/2026-01-02T03-00-00Z/state.db", b"SQLite format 3\x00")
    await s3_storage.put_bytes("partial/2026-01-02T03-00-00Z/configs.tar.gz", b"x" * 10)
    await s3_storage.put_bytes(
        "partial/2026-01-02T03-00-00Z/manifest.json",
        b'{"timestamp": "2026-01-02T03-00-00Z", "type": "partial", "hostname": "mac", "tinyserve_version": "unknown"}',
    )
    refs = await list_backups(s3_storage)
    assert [r.type for r in refs] == ["partial", "partial"]
    assert refs[0].timestamp == "2026-01-02T03-00-00Z" and refs[0].manifest.guide
    assert refs[0].summary()["size_bytes"] == 16 + 10
    assert not refs[1].manifest.guide


def _ref(ts: datetime) -> object:
    from daemon.manifest import BackupRef, Manifest, format_ts

    return BackupRef("partial", format_ts(ts), Manifest("partial", format_ts(ts), []))


def test_retention_rules() -> None:
    from daemon.config import RetentionRule

    now = datetime(2026, 11, 26, 12, tzinfo=UTC)
    refs = [_ref(now - timedelta(days=d, hours=9)) for d in range(40)]
    keep = lambda rule: {d.ref.timestamp for d in decide(refs, rule, now, UTC) if d.keep}  # type: ignore[arg-type]  # noqa: E731
    assert len(keep(RetentionRule(max_age_days=7))) == 7
    assert len(keep(RetentionRule(keep_last=3))) == 3
    assert len(keep(RetentionRule(keep_daily=5))) == 5
    weekly = keep(RetentionRule(keep_weekly=4))
    assert len(weekly) == 4
    both = keep(RetentionRule(max_age_days=2, keep_monthly=3))
    # the two youngest by age, plus the newest of each month (Nov's is already kept; Oct 31)
    assert both == {"2026-11-26T03-00-00Z", "2026-11-25T03-00-00Z", "2026-10-31T03-00-00Z"}
    # the newest is kept even when every rule would drop it
    old = [_ref(now - timedelta(days=100 + d)) for d in range(3)]
    decisions = decide(old, RetentionRule(max_age_days=7), now, UTC)  # type: ignore[arg-type]
    assert [d.keep for d in decisions] == [True, False, False]
    # no rule at all keeps everything
    assert all(d.keep for d in decide(old, RetentionRule(), now, UTC))  # type: ignore[arg-type]


async def test_prune_deletes_old_keeps_newest_and_cleans_leftovers(
    root: RootInfo, s3_storage: S3Storage
) -> None:
    cfg = cfg_for(root.path, "retention:\n  partial:\n    max_age_days: 7\n")
    res = await BackupJob(cfg, s3_storage).run("partial")
    old_ts = "2020-01-01T03-00-00Z"
    for name in ("state.db.zst", "configs.tar.zst", "manifest.json"):
        await s3_storage.put_bytes(f"partial/{old_ts}/{name}", b"{}")
    await s3_storage.put_bytes("full/2020-02-02T03-00-00Z/images.tar.zst", b"partial leftovers")
    client = await s3_storage._get_client()
    await client.create_multipart_upload(Bucket=s3_storage.s.bucket, Key="tb/full/2020-02-02T03-00-00Z/x")
    future = datetime.now(UTC) + timedelta(hours=2)  # leftovers and upload are then > 1 h old
    dry = await prune(cfg, s3_storage, dry_run=True, now=future)
    assert dry.deleted == [f"partial/{old_ts}"] and dry.incomplete_deleted == ["full/2020-02-02T03-00-00Z"]
    assert len(await s3_storage.list("partial/")) == 6  # dry run deleted nothing
    rep = await prune(cfg, s3_storage, now=future)
    assert rep.uploads_aborted == ["full/2020-02-02T03-00-00Z/x"]
    assert [r.timestamp for r in await list_backups(s3_storage)] == [res.timestamp]
    assert await s3_storage.list("full/") == []
    assert await s3_storage.list_multipart_uploads() == []
    # much later: the only backup is old, but it is the newest and survives
    rep = await prune(cfg, s3_storage, now=datetime.now(UTC) + timedelta(days=60))
    assert rep.deleted == [] and [r.timestamp for r in await list_backups(s3_storage)] == [res.timestamp]


async def test_second_job_waits_then_fails_naming_holder(root: RootInfo) -> None:
    async with root_lock(root.path, "create --full"):
        t0 = time.monotonic()
        with pytest.raises(LockError, match=r"create --full \(pid \d+"):
            async with root_lock(root.path, "create --partial", wait=0.5):
                pass
        assert 0.4 < time.monotonic() - t0 < 5
    async with root_lock(root.path, "again", wait=0.5):
        pass


async def test_cut_during_upload_is_retried(
    root: RootInfo, fault_proxy: FaultProxy, proxied_storage: S3Storage, tmp_path: Path
) -> None:
    big = make_root(tmp_path / "big", size="24MB", seed=3)
    proxied_storage.part_size = 5 * 1024 * 1024
    started = asyncio.get_running_loop().time()

    async def cut_mid_upload() -> None:
        # Once a part's worth has gone through (not on a timer: under load a timer cut the
        # listing before the upload began). Healed well inside the retries' own waits (0.35 s
        # at least over FAST_RETRY's four attempts), so the backup must get through.
        while fault_proxy.bytes_forwarded < 6 * 1024 * 1024:
            assert asyncio.get_running_loop().time() - started < 60, "the upload never got going"
            await asyncio.sleep(0.01)
        before = fault_proxy.connections
        fault_proxy.cut()
        await asyncio.sleep(0.15)
        fault_proxy.heal()
        cut_at.append(before)

    cut_at: list[int] = []
    cutter = asyncio.create_task(cut_mid_upload())
    res = await BackupJob(cfg_for(big.path), proxied_storage).run("full")
    await asyncio.wait_for(cutter, 10)
    assert cut_at and fault_proxy.connections > cut_at[0]  # the cut was during the backup
    from daemon.verify import verify_backup

    ref = (await list_backups(proxied_storage, "full"))[0]
    check = await verify_backup(proxied_storage, ref)
    assert check.ok, check.to_json()
    assert ref.timestamp == res.timestamp


def _write_cfg(tmp_path: Path, root: Path, endpoint: str, bucket: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(
        f"root: {root}\n"
        f"destination:\n  url: s3://{bucket}/tb\n  endpoint: {endpoint}\n  addressing_style: path\n"
        "  part_size_mb: 5\n  concurrency: 2\n"
        "compression:\n  threads: 0\n"
    )
    return p


def _full_backup_under_way(cfg: Path) -> tuple[subprocess.Popen[str], Path]:
    """`create --full` as a child process, returned once its first artifact is uploaded."""
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(cfg), "create", "--full"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = Path(env["TINYSERVE_BACKUP_HOME"]) / "logs" / "tinyserve-backup.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and "artifact_uploaded" in log.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the backup finished before it could be interrupted"
    return proc, log


def test_sigkill_mid_upload_leaves_nothing_listed(tmp_path: Path, s3_server: MotoServer, bucket: str) -> None:
    big = make_root(tmp_path / "big", size="60MB", seed=5)
    proxy = FaultProxy(s3_server.port)
    try:
        proxy.latency(0.02)  # slow the upload down so the kill lands mid-stream
        cfg = _write_cfg(tmp_path, big.path, proxy.endpoint, bucket)
        proc, _ = _full_backup_under_way(cfg)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proxy.latency(0)
        res = run_cli("--config", str(cfg), "list", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == []
        res = run_cli("--config", str(cfg), "create", "--partial", "--json")
        assert res.returncode == 0, res.stderr
        assert len(json.loads(run_cli("--config", str(cfg), "list", "--json").stdout)) == 1
        # leftovers are cleaned by prune once they are old enough
        cfg.write_text(cfg.read_text() + "retention:\n  incomplete_after_hours: 0\n")
        res = run_cli("--config", str(cfg), "prune", "--dry-run")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0].startswith("Would delete incomplete full/")
        # (the WAL part of retention is named too, not only in --json)
        assert (
            lines[-1]
            == "Would delete 0 backups, 1 incomplete; 0 WAL objects older than the point-in-time window; kept 1."
        )
        res = run_cli("--config", str(cfg), "prune", "--json")
        assert res.returncode == 0, res.stderr
        rep = json.loads(res.stdout)
        assert rep["incomplete_deleted"] and rep["deleted"] == []
    finally:
        proxy.close()


def test_sigterm_mid_upload_aborts_it_and_exits_cleanly(
    tmp_path: Path, s3_server: MotoServer, bucket: str
) -> None:
    """launchd's stop, or a kill: uploads in flight are aborted and no traceback is printed."""
    import boto3

    big = make_root(tmp_path / "big", size="60MB", seed=6)
    proxy = FaultProxy(s3_server.port)
    try:
        proxy.latency(0.02)
        cfg = _write_cfg(tmp_path, big.path, proxy.endpoint, bucket)
        proc, log = _full_backup_under_way(cfg)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert "Traceback" not in err and err.strip().splitlines()[-1] == "aborted"
        assert "backup_abandoned" in log.read_text()
        s3 = boto3.client(
            "s3",
            endpoint_url=s3_server.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        assert s3.list_multipart_uploads(Bucket=bucket, Prefix="tb/").get("Uploads", []) == []
        assert s3.list_objects_v2(Bucket=bucket, Prefix="tb/full/").get("Contents", []) == []
        proxy.latency(0)
        res = run_cli("--config", str(cfg), "list", "--json")
        assert res.returncode == 0 and json.loads(res.stdout) == []
    finally:
        proxy.close()


def test_cli_create_json_and_list(tmp_path: Path, s3_server: MotoServer, bucket: str) -> None:
    r = make_root(tmp_path / "r", size="tiny", seed=1)
    cfg = _write_cfg(tmp_path, r.path, s3_server.endpoint, bucket)
    res = run_cli("--config", str(cfg), "create", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["type"] == "partial" and out["size_bytes"] > 0 and len(out["objects"]) == 2
    res = run_cli("--config", str(cfg), "create", "--services", "blog", "notes", "--json")
    assert res.returncode == 0, res.stderr
    assert [o["service"] for o in json.loads(res.stdout)["objects"]] == ["blog", "notes"]
    res = run_cli("--config", str(cfg), "create", "--services", "nope")
    assert res.returncode != 0 and "unknown service nope" in res.stderr and "Traceback" not in res.stderr
    listed = json.loads(run_cli("--config", str(cfg), "list", "--json").stdout)
    assert [x["type"] for x in listed] == ["partial", "services"]
    assert {"type", "timestamp", "size_bytes", "objects", "guide"} <= set(listed[0])
    listed = json.loads(run_cli("--config", str(cfg), "list", "--type", "services", "--json").stdout)
    assert [x["type"] for x in listed] == ["services"]
    table = run_cli("--config", str(cfg), "list").stdout.splitlines()
    assert table[2].startswith("services") and table[2].endswith("  blog, notes"), table


def test_an_empty_or_wrong_root_backs_up_nothing_and_says_so(
    tmp_path: Path, s3_server: MotoServer, bucket: str
) -> None:
    """A typo in `root` or an unmounted disk must not make "successful" empty backups, which
    retention would then keep as the newest while it prunes the real ones."""
    empty = tmp_path / "mnt" / "tinyserve"
    empty.mkdir(parents=True)
    (empty / "services").mkdir()
    cfg = _write_cfg(tmp_path, empty, s3_server.endpoint, bucket)
    for flags in (["--partial"], ["--full"], ["--services"]):
        res = run_cli("--config", str(cfg), "create", *flags)
        assert res.returncode == 1, (flags, res.stdout, res.stderr)
        err = res.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert str(empty) in err and "is its disk mounted?" in err, err
    assert json.loads(run_cli("--config", str(cfg), "list", "--json").stdout) == []
