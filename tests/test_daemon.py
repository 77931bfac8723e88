"""The real daemon: `python -m daemon --config X run` in a child process, a local file:// destination.

Time is controlled with the daemon's test-only knobs (see daemon/scheduler.py ``Clock``):
``TINYSERVE_BACKUP_CLOCK_OFFSET_FILE`` holds seconds added to the daemon's wall clock, so a test
puts the daemon a few seconds before 03:00 to see the real cron string fire, or moves the offset
forward to simulate a sleep (the wall clock jumps, the monotonic clock does not — exactly what a
Mac waking up looks like).  ``TINYSERVE_BACKUP_WAKE_SECONDS`` shortens the once-a-minute wake-up
check.  Every wait polls the log or the status file against a deadline; no bare sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon.status import status_path
from tests.conftest import run_cli
from tests.helpers.rootfactory import make_root
from tests.helpers.s3server import REPO

SECRET_TOKEN = "hc-token-6f1b2c9d7e"


def next_3am(after: datetime) -> datetime:
    t = after.replace(hour=3, minute=0, second=0, microsecond=0)
    return t if t > after else t + timedelta(days=1)


class Daemon:
    def __init__(self, tmp: Path, config: str, *, virtual_now: datetime, wake: float = 0.3) -> None:
        self.tmp = tmp
        self.cfg_path = tmp / "config.yaml"
        self.cfg_path.write_text(config)
        self.log = tmp / "daemon.log"
        self.offset_file = tmp / "clock-offset"
        self.virtual_now = virtual_now
        self._set_offset()
        self.env = dict(os.environ)
        self.env.update(
            {
                "TINYSERVE_BACKUP_CLOCK_OFFSET_FILE": str(self.offset_file),
                "TINYSERVE_BACKUP_WAKE_SECONDS": str(wake),
            }
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_offset(self) -> None:
        # Replaced whole: the daemon rereads it at every clock read, and a file caught half
        # written (empty) reads as no offset, a jump of days back and forth.
        tmp = self.offset_file.with_name(self.offset_file.name + ".tmp")
        tmp.write_text(repr(self.offset))
        os.replace(tmp, self.offset_file)

    def _set_offset(self) -> None:
        self.offset = (self.virtual_now - datetime.now(UTC)).total_seconds()
        self._write_offset()

    def start(self) -> Daemon:
        # The virtual clock reads `virtual_now` at the spawn, whatever ran before (a `status` call
        # took seconds on a loaded machine and once ate a test's whole lead to the cron fire).
        self._set_offset()
        with open(self.tmp / "daemon.stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon", "--config", str(self.cfg_path), "run"],
                cwd=str(REPO),
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        self.wait_event(lambda e: e["event"] == "daemon_started", 20)
        return self

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("--config", str(self.cfg_path), *args, env=self.env)

    def sleep_for(self, seconds: float) -> None:
        """Simulate the machine sleeping: the daemon's wall clock jumps ahead."""
        self.offset += seconds
        self._write_offset()

    def events(self) -> list[dict[str, Any]]:
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == name]

    def wait_event(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float, count: int = 1
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            hits = [e for e in self.events() if pred(e)]
            if len(hits) >= count:
                return hits[count - 1]
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}): {self.stderr()}")
            if time.monotonic() > deadline:
                tail = [e["event"] for e in self.events()][-30:]
                raise AssertionError(f"timed out waiting; last events: {tail}")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        root = Path(self.cfg_path.read_text().split("root: ", 1)[1].split("\n", 1)[0])
        return json.loads(status_path(root).read_text())

    def wait_status(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.status()
                if pred(last):
                    return last
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"status never matched: {json.dumps(last)[:2000]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20) -> tuple[int, float]:
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout + 5)
        return rc, time.monotonic() - t0

    def stderr(self) -> str:
        try:
            return (self.tmp / "daemon.stderr").read_text()[-3000:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def config_text(root: Path, dest: Path, log: Path, schedule: str, *, wal: bool, extra: str = "") -> str:
    return (
        f"root: {root}\n"
        f"destination:\n  url: file://{dest}\n"
        f"schedule:\n  timezone: UTC\n{schedule}"
        f"wal:\n  enabled: {'true' if wal else 'false'}\n  poll_interval_seconds: 0.5\n"
        f"logging:\n  file: {log}\n"
        f"{extra}"
    )


def make_setup(tmp_path: Path) -> tuple[Path, Path]:
    root = make_root(tmp_path / "root", size="tiny").path
    dest = tmp_path / "dest"
    dest.mkdir()
    return root, dest


def manifests(dest: Path) -> list[Path]:
    return sorted(dest.rglob("manifest.json"))


def test_scheduled_job_runs_on_its_cron_and_status_is_true(tmp_path: Path, daemons: list[Daemon]) -> None:
    root, dest = make_setup(tmp_path)
    fire = next_3am(datetime.now(UTC) + timedelta(hours=1))
    cfg = config_text(
        root,
        dest,
        tmp_path / "daemon.log",
        '  partial: "0 3 * * *"\n  full: "off"\n',
        wal=True,
        extra=f"alerts:\n  healthchecks_url: http://127.0.0.1:9/{SECRET_TOKEN}\n  timeout_seconds: 1\n",
    )
    d = Daemon(tmp_path, cfg, virtual_now=fire - timedelta(seconds=6))

    never = d.cli("status")
    assert never.returncode == 3 and "has not run" in never.stdout

    daemons.append(d.start())
    ok = d.wait_event(lambda e: e["event"] == "job_succeeded", 30)
    assert ok["type"] == "partial" and ok["trigger"] == "schedule"
    assert [m.parent.name for m in manifests(dest / "partial")] == [ok["backup_timestamp"]]

    st = d.wait_status(
        lambda s: (
            (s["jobs"]["partial"].get("last_success") or {}).get("timestamp") == ok["backup_timestamp"]
            and s["wal"].get("generation")
        )
    )
    assert st["pid"] == d.proc.pid and st["state"] == "running"  # type: ignore[union-attr]
    assert st["config_path"] == str(d.cfg_path) and st["root"] == str(root)
    assert st["started_at"].endswith("Z") and st["uptime_s"] >= 0
    job = st["jobs"]["partial"]
    manifest = json.loads((dest / "partial" / ok["backup_timestamp"] / "manifest.json").read_text())
    assert job["last_success"]["size_bytes"] == sum(o["size"] for o in manifest["objects"]) > 0
    assert job["last_success"]["duration_s"] > 0 and job["last_success"]["trigger"] == "schedule"
    assert job["last_failure"] is None and job["schedule"] == "0 3 * * *"
    assert job["next_run"] == (fire + timedelta(days=1)).strftime("%Y-%m-%dT03:00:00Z")
    assert "full" not in st["jobs"] or st["jobs"]["full"]["schedule"] is None
    wal = st["wal"]
    assert wal["enabled"] is True and wal["state"] == "running"
    assert isinstance(wal["spool_bytes"], int) and isinstance(wal["lag_seconds"], int | float)
    assert (dest / "wal").is_dir()

    cli = d.cli("status", "--json")
    assert cli.returncode == 0, cli.stderr
    shown = json.loads(cli.stdout)
    assert shown["running"] is True and shown["daemon"] == "running" and shown["uptime_s"] >= 0
    assert 0 <= shown["jobs"]["partial"]["last_success"]["age_s"] < 120
    human = d.cli("status")
    assert human.returncode == 0 and "daemon: running" in human.stdout and "next run" in human.stdout

    rc, took = d.stop()
    assert rc == 0 and took < 20
    assert len(d.named("job_started")) == 1  # the cron fire only; no catch-up duplicate
    after = json.loads(d.cli("status", "--json").stdout)
    assert after["running"] is False and after["daemon"].startswith("not running (stopped")
    assert after["wal"]["generation"] == wal["generation"]  # last figures kept
    everything = status_path(root).read_text() + d.log.read_text()
    assert SECRET_TOKEN not in everything


def test_sigterm_mid_backup_leaves_no_manifest(tmp_path: Path, daemons: list[Daemon]) -> None:
    root, dest = make_setup(tmp_path)
    fire = next_3am(datetime.now(UTC) + timedelta(hours=1))
    cfg = config_text(
        root,
        dest,
        tmp_path / "daemon.log",
        '  partial: "off"\n  full: "off"\n  services: "0 3 * * *"\n',
        wal=False,
        # services go blog, notes, photos: photos' pre hook holds the backup mid-way
        extra="hooks:\n  photos:\n    pre: [sleep, '60']\n",
    )
    d = Daemon(tmp_path, cfg, virtual_now=fire - timedelta(seconds=5))
    daemons.append(d.start())
    d.wait_event(lambda e: e["event"] == "artifact_uploaded" and "notes" in str(e.get("name")), 30)
    assert (dest / "services").is_dir()
    rc, took = d.stop()
    assert rc == 0, d.stderr()
    assert took < 20
    assert manifests(dest) == []
    assert [p for p in dest.rglob("*") if p.is_file()] == []  # uploaded archives discarded too
    assert d.named("job_cancelled") and d.named("daemon_stopped")
    assert not d.named("job_failed")
    listed = d.cli("list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    st = d.status()
    assert st["state"] == "stopped" and st["jobs"]["services"]["last_failure"] is None


def test_sighup_with_broken_config_keeps_the_old_one(tmp_path: Path, daemons: list[Daemon]) -> None:
    root, dest = make_setup(tmp_path)
    log = tmp_path / "daemon.log"
    good = config_text(root, dest, log, '  partial: "0 3 * * *"\n', wal=False)
    d = Daemon(tmp_path, good, virtual_now=datetime.now(UTC))
    daemons.append(d.start())
    d.wait_status(lambda s: s["state"] == "running")

    d.cfg_path.write_text(good.replace("  partial:", "  parital:"))
    d.signal(signal.SIGHUP)
    failed = d.wait_event(lambda e: e["event"] == "config_reload_failed" and e["reason"] == "sighup", 15)
    assert "unknown config key `schedule.parital`" in failed["error"]
    assert "did you mean `schedule.partial`" in failed["error"]
    assert failed["level"] == "error"
    assert d.proc is not None and d.proc.poll() is None
    st = d.wait_status(lambda s: (s.get("last_error") or {}).get("kind") == "config")
    assert "old config kept" in st["last_error"]["message"]
    assert st["jobs"]["partial"]["schedule"] == "0 3 * * *"

    # a valid edit is picked up from the file alone (no signal)
    d.cfg_path.write_text(good.replace('"0 3 * * *"', '"30 4 * * 1-5"'))
    ok = d.wait_event(lambda e: e["event"] == "config_reloaded", 15)
    assert ok["reason"] == "file_changed" and "schedule" in ok["changed"]
    st = d.wait_status(lambda s: s["jobs"]["partial"]["schedule"] == "30 4 * * 1-5")
    assert st["last_error"] is None
    assert st["jobs"]["partial"]["next_run"].endswith("T04:30:00Z")
    rc, took = d.stop()
    assert rc == 0 and took < 20


def test_missed_job_runs_once_after_a_simulated_sleep(tmp_path: Path, daemons: list[Daemon]) -> None:
    root, dest = make_setup(tmp_path)
    noon = next_3am(datetime.now(UTC)) + timedelta(hours=9)
    cfg = config_text(
        root, dest, tmp_path / "daemon.log", '  partial: "0 3 * * *"\n  full: "off"\n', wal=False
    )
    d = Daemon(tmp_path, cfg, virtual_now=noon)
    daemons.append(d.start())
    d.wait_status(lambda s: s["state"] == "running")
    assert manifests(dest) == []

    d.sleep_for(24 * 3600)  # asleep across one 03:00
    d.wait_event(lambda e: e["event"] == "clock_jump_detected", 15)
    ok = d.wait_event(lambda e: e["event"] == "job_succeeded", 30)
    assert ok["trigger"] == "catch-up"

    d.sleep_for(3 * 24 * 3600)  # asleep across three more: still one run
    d.wait_event(lambda e: e["event"] == "clock_jump_detected", 15, count=2)
    d.wait_event(lambda e: e["event"] == "job_succeeded", 30, count=2)

    d.sleep_for(600)  # a short nap that crosses no 03:00: nothing to do
    check = d.wait_event(lambda e: e["event"] == "catch_up_check" and e["after_jump"], 15, count=3)
    assert check["queued"] == []
    assert len(d.named("job_started")) == 2
    assert len(manifests(dest / "partial")) == 2
    st = d.wait_status(lambda s: s["jobs"]["partial"]["last_success"] is not None)
    assert st["jobs"]["partial"]["last_success"]["trigger"] == "catch-up"
    rc, _ = d.stop()
    assert rc == 0
    assert len(d.named("job_started")) == 2


def test_status_with_a_dead_or_recycled_pid_is_stale(tmp_path: Path) -> None:
    from daemon.status import describe, render_human, write_status

    path = tmp_path / "status.json"
    doc = {
        "pid": os.getpid(),  # alive, but this is pytest, not the daemon: a recycled pid
        "state": "running",
        "started_at": "2026-01-10T03:00:00Z",
        "updated_at": "2026-01-10T04:00:00Z",
        "jobs": {"partial": {"schedule": "0 3 * * 1-6", "last_success": {"at": "2026-01-10T03:01:00Z"}}},
    }
    write_status(path, doc)
    d = describe(json.loads(path.read_text()), path, datetime(2026, 1, 10, 5, 1, tzinfo=UTC))
    assert d["running"] is False and d["daemon"] == "not running (stale status from 2026-01-10T04:00:00Z)"
    assert d["jobs"]["partial"]["last_success"]["age_s"] == 7200
    assert "not running (stale status" in render_human(d)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    doc["pid"] = int(dead.stdout)
    assert describe(doc, path)["running"] is False


@pytest.mark.parametrize(
    ("cmd", "ours"),
    [
        ("/opt/venv/bin/python /opt/venv/bin/tinyserve-backup --config /x/backup.yaml run ", True),
        ("/usr/bin/python3 -m daemon --config /Users/a/Library/Application Support/b.yaml run", True),
        ("/opt/venv/bin/tinyserve-backup --config /x/backup.yaml status ", False),
        ("/usr/sbin/cupsd -l run-daemon ", False),
        ("python tests/test_daemon.py --run ", False),
        ("/usr/bin/python3 -m daemonize run ", False),
    ],
)
def test_which_command_lines_are_our_daemon(cmd: str, ours: bool) -> None:
    from daemon.status import is_daemon_command

    assert is_daemon_command(cmd) is ours


def test_status_calls_a_pid_that_merely_mentions_daemon_and_run_stale(tmp_path: Path) -> None:
    """A recycled pid running some other program with those words in its arguments."""
    from daemon.status import describe

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "daemon", "run"])
    try:
        doc = {"pid": other.pid, "state": "running", "updated_at": "2026-01-10T04:00:00Z"}
        assert describe(doc, tmp_path / "status.json")["running"] is False
    finally:
        other.kill()
        other.wait(timeout=10)


def test_a_restore_goes_on_while_the_daemon_ships_the_wal(tmp_path: Path, daemons: list[Daemon]) -> None:
    """The shipper keeps state.db open; a restore must not take the daemon for tinyserved."""
    root, dest = make_setup(tmp_path)
    cfg = config_text(
        root,
        dest,
        tmp_path / "daemon.log",
        '  partial: "off"\n  full: "off"\n',
        wal=True,
        extra="tinyserved:\n  stop: [tinyserved-ctl, stop]\n  start: [tinyserved-ctl, start]\n"
        "  timeout_seconds: 5\n",
    )
    d = Daemon(tmp_path, cfg, virtual_now=datetime.now(UTC))
    daemons.append(d.start())
    d.wait_event(lambda e: e["event"] == "wal_generation_started", 30)
    made = d.cli("create", "--partial", "--json")
    assert made.returncode == 0, made.stderr
    ts = json.loads(made.stdout)["timestamp"]
    restored = d.cli("restore", ts, "--partial", "--yes")
    assert restored.returncode == 0, restored.stderr
    assert (root / "state.db.pre-restore").exists()
    # the shipper notices the new file and carries on with it (a new generation)
    d.wait_event(lambda e: e["event"] == "wal_generation_started", 30, count=2)


def test_turning_encryption_on_while_running_seals_the_wal_from_then_on(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """The shipper seals segments to the recipients it started with: an edit adding recipients
    must restart it, or the WAL stream stays in the clear until the daemon restarts."""
    import sqlite3

    from daemon.crypto import generate_keypair

    root, dest = make_setup(tmp_path)
    log = tmp_path / "daemon.log"
    plain = config_text(root, dest, log, '  partial: "off"\n  full: "off"\n', wal=True)
    d = Daemon(tmp_path, plain, virtual_now=datetime.now(UTC))
    daemons.append(d.start())
    d.wait_status(lambda s: (s.get("wal") or {}).get("state") == "running")

    def commit(n: int) -> None:
        c = sqlite3.connect(root / "state.db")
        c.execute("create table if not exists t(x)")
        c.execute("insert into t values (?)", (n,))
        c.commit()
        c.close()

    def segments(suffix: str) -> list[Path]:
        return [p for p in dest.rglob("*.seg*") if p.is_file() and p.name.endswith(suffix)]

    def wait_segment(suffix: str) -> None:
        deadline = time.monotonic() + 20
        while not segments(suffix):
            assert time.monotonic() < deadline, f"no {suffix} segment shipped"
            time.sleep(0.05)

    commit(1)
    wait_segment(".seg.zst")
    assert not segments(".age")

    recipient = generate_keypair().recipient
    d.cfg_path.write_text(plain + f"encryption:\n  recipients: [{recipient}]\n")
    reloaded = d.wait_event(lambda e: e["event"] == "config_reloaded", 15)
    assert "encryption" in reloaded["changed"]
    d.wait_event(lambda e: e["event"] == "wal_shipper_restarting", 15)
    d.wait_event(lambda e: e["event"] == "wal_shipper_started", 20, count=2)
    commit(2)
    wait_segment(".seg.zst.age")
    rc, _ = d.stop()
    assert rc == 0


def test_a_second_daemon_for_the_same_root_is_refused(tmp_path: Path, daemons: list[Daemon]) -> None:
    """Two daemons on one root ran every scheduled job twice, and the second one's exit removed
    the status file while the first still ran."""
    root, dest = make_setup(tmp_path)
    cfg = config_text(root, dest, tmp_path / "daemon.log", '  partial: "0 3 * * *"\n', wal=False)
    d = Daemon(tmp_path, cfg, virtual_now=datetime.now(UTC))
    daemons.append(d.start())
    d.wait_status(lambda s: s["state"] == "running")
    assert d.proc is not None
    other = tmp_path / "other.yaml"  # another config file, the same root
    other.write_text(cfg)
    res = run_cli("--config", str(other), "run", env=d.env, timeout=60)
    assert res.returncode == 4, res.stderr
    assert res.stderr.startswith(f"error: another daemon already runs for {root}: (pid {d.proc.pid}")
    assert "Traceback" not in res.stderr
    assert d.cli("status", "--json").returncode == 0  # the first one untouched, still running
    rc, _ = d.stop()
    assert rc == 0
    # once it is gone, a daemon may start again
    again = Daemon(tmp_path, cfg, virtual_now=datetime.now(UTC))
    daemons.append(again.start())
    again.wait_status(lambda s: s["state"] == "running" and s["pid"] == again.proc.pid)  # type: ignore[union-attr]
