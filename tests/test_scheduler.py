"""Cron parsing (Sunday is 0 and 7), catch-up planning with a controllable clock, job records."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from daemon.config import Config, parse_config
from daemon.errors import ConfigError, UsageError
from daemon.scheduler import (
    Clock,
    JobRecords,
    JobSpec,
    ShiftedTrigger,
    due_fire,
    job_specs,
    parse_cron,
    record_failure,
    record_success,
    records_path,
    render_schedule,
    retry_delay,
    schedule_updates,
    sync_configured,
)
from tests.conftest import run_cli
from tests.helpers.rootfactory import make_root

UTCZ = ZoneInfo("UTC")
SAT = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)  # a Saturday


def fires(expr: str, start: datetime, n: int, tz: Any = UTCZ) -> list[datetime]:
    trig = parse_cron(expr, tz)
    out: list[datetime] = []
    t: datetime | None = start
    for _ in range(n):
        t = trig.get_next_fire_time(None, t + timedelta(seconds=1)) if t else None
        assert t is not None
        out.append(t)
    return out


# --------------------------------------------------------------------------------------------
# cron


@pytest.mark.parametrize("dow", ["0", "7", "sun", "SUN"])
def test_cron_sunday_is_zero_and_seven(dow: str) -> None:
    got = fires(f"0 3 * * {dow}", SAT, 3)
    assert [t.strftime("%a %H:%M") for t in got] == ["Sun 03:00"] * 3
    assert got[0] == datetime(2026, 1, 11, 3, 0, tzinfo=UTCZ)


def test_cron_guide_defaults_split_the_week() -> None:
    partial = {t.strftime("%a") for t in fires("0 3 * * 1-6", SAT, 14)}
    full = {t.strftime("%a") for t in fires("0 3 * * 0", SAT, 3)}
    assert partial == {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat"}
    assert full == {"Sun"}


@pytest.mark.parametrize(
    ("dow", "days"),
    [
        ("5-7", {"Fri", "Sat", "Sun"}),
        ("0-1", {"Sun", "Mon"}),
        ("6,0", {"Sat", "Sun"}),
        ("*/2", {"Sun", "Tue", "Thu", "Sat"}),
        ("mon-fri", {"Mon", "Tue", "Wed", "Thu", "Fri"}),
    ],
)
def test_cron_day_of_week_forms(dow: str, days: set[str]) -> None:
    assert {t.strftime("%a") for t in fires(f"0 3 * * {dow}", SAT, 20)} == days


@pytest.mark.parametrize("bad", ["0 3 * *", "0 3 * * 8", "0 25 * * *", "x 3 * * *", "0 3 * * 1/0"])
def test_cron_invalid_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_cron(bad, None)


def test_cron_in_a_zone_with_dst() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    # 2026-03-29: clocks go 02:00 -> 03:00 in Berlin; 03:00 still happens, one hour "earlier" in UTC
    got = fires("0 3 * * *", datetime(2026, 3, 27, 12, tzinfo=UTC), 3, berlin)
    assert [t.astimezone(UTC).hour for t in got] == [2, 1, 1]


# --------------------------------------------------------------------------------------------
# catch-up planning


def spec(cron: str = "0 3 * * *") -> JobSpec:
    return JobSpec("partial", cron, UTCZ, parse_cron(cron, UTCZ))


def test_fresh_install_does_not_run_at_once() -> None:
    now = datetime(2026, 1, 12, 12, 0, tzinfo=UTC)
    rec = {"configured_at": now.isoformat()}
    assert due_fire(spec(), rec, now) is None
    assert due_fire(spec(), rec, now + timedelta(hours=14)) is None  # before 03:00 next day
    assert due_fire(spec(), rec, now + timedelta(hours=15, minutes=1)) == datetime(2026, 1, 13, 3, tzinfo=UTC)


def test_many_missed_fires_make_one_run() -> None:
    configured = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    rec: dict[str, Any] = {"configured_at": configured.isoformat()}
    wake = configured + timedelta(days=6, hours=1)  # asleep for six 03:00s
    fire = due_fire(spec(), rec, wake)
    assert fire == datetime(2026, 1, 6, 3, tzinfo=UTC)  # the first missed one
    # one successful run satisfies every missed fire time
    rec["last_success"] = {"at": (wake + timedelta(minutes=2)).isoformat()}
    for minutes in (3, 60, 600):
        assert due_fire(spec(), rec, wake + timedelta(minutes=minutes)) is None
    # until the next 03:00 has passed
    assert due_fire(spec(), rec, datetime(2026, 1, 12, 3, 0, 1, tzinfo=UTC)) is not None


def test_failure_backs_off_then_retries() -> None:
    configured = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    fail_at = datetime(2026, 1, 6, 3, 1, tzinfo=UTC)
    rec: dict[str, Any] = {
        "configured_at": configured.isoformat(),
        "last_failure": {"at": fail_at.isoformat()},
        "consecutive_failures": 1,
    }
    assert due_fire(spec(), rec, fail_at + timedelta(minutes=4)) is None
    assert due_fire(spec(), rec, fail_at + timedelta(minutes=5)) is not None
    rec["consecutive_failures"] = 3
    assert due_fire(spec(), rec, fail_at + timedelta(minutes=19)) is None
    assert due_fire(spec(), rec, fail_at + timedelta(minutes=20)) is not None
    assert retry_delay(50) == 3600


def test_changed_schedule_is_not_caught_up_for_the_past(tmp_path: Path) -> None:
    records = JobRecords(tmp_path / "r.json")
    t0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    sync_configured(records, {"partial": spec("0 3 * * *")}, t0)
    t1 = t0 + timedelta(days=1)  # 03:00 on the 6th was missed...
    sync_configured(records, {"partial": spec("0 4 * * *")}, t1)  # ...but the schedule changed at t1
    assert records.job("partial")["configured_at"].startswith("2026-01-06T12:00")
    assert due_fire(spec("0 4 * * *"), records.job("partial"), t1 + timedelta(hours=1)) is None
    # the same schedule again keeps its original time
    sync_configured(records, {"partial": spec("0 4 * * *")}, t1 + timedelta(days=3))
    assert records.job("partial")["configured_at"].startswith("2026-01-06T12:00")


# --------------------------------------------------------------------------------------------
# records


def test_records_survive_damage_and_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "records.json"
    path.write_text("{not json")
    records = JobRecords(path)
    assert records.load()["jobs"] == {}

    def bump(_: int) -> None:
        for _ in range(20):
            records.update_job("partial", lambda r: r.update(n=int(r.get("n", 0)) + 1))

    threads = [threading.Thread(target=bump, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads(path.read_text())["jobs"]["partial"]["n"] == 80
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert (path.stat().st_mode & 0o777) == 0o600


def test_success_resets_failures(tmp_path: Path) -> None:
    records = JobRecords(tmp_path / "r.json")
    t = datetime(2026, 1, 5, 3, tzinfo=UTC)
    for i in range(2):
        rec = record_failure(
            records, "full", started=t, finished=t, error=f"boom {i}", duration_s=1, trigger="x"
        )
    assert rec["consecutive_failures"] == 2
    rec = record_success(
        records,
        "full",
        started=t,
        finished=t,
        timestamp="2026-01-05T03-00-00Z",
        size_bytes=5,
        duration_s=1.5,
        trigger="schedule",
    )
    assert rec["consecutive_failures"] == 0
    assert rec["last_success"]["size_bytes"] == 5
    assert rec["last_failure"]["error"] == "boom 1"


# --------------------------------------------------------------------------------------------
# clock


def test_clock_detects_sleep_as_a_wall_clock_jump() -> None:
    wall, mono = [1000.0], [50.0]
    clock = Clock(wall=lambda: wall[0], mono=lambda: mono[0])
    wall[0] += 60
    mono[0] += 60
    assert abs(clock.jump()) < 1e-9  # awake: both advance together
    wall[0] += 8 * 3600  # asleep: the monotonic clock stood still
    mono[0] += 1
    assert clock.jump() == pytest.approx(8 * 3600 - 1)
    assert clock.now() == datetime.fromtimestamp(wall[0], UTC)


def test_clock_offset_file_and_shifted_trigger(tmp_path: Path) -> None:
    f = tmp_path / "offset"
    f.write_text("86400")
    wall = [datetime(2026, 1, 10, 2, 59, 0, tzinfo=UTC).timestamp()]
    clock = Clock(offset_file=f, wall=lambda: wall[0], mono=lambda: 0.0)
    assert clock.now() == datetime(2026, 1, 11, 2, 59, tzinfo=UTC)
    inner = parse_cron("0 3 * * *", UTCZ)
    real_now = datetime.fromtimestamp(wall[0], UTC)
    # APScheduler sees real time; the shifted trigger fires when the *shifted* clock says 03:00
    nxt = ShiftedTrigger(inner, clock).get_next_fire_time(None, real_now)
    assert nxt == real_now + timedelta(minutes=1)


# --------------------------------------------------------------------------------------------
# schedule command


def test_schedule_updates_presets_and_conflicts() -> None:
    up = schedule_updates(presets={"partial": True, "full": True}, crons={}, off=("services",), wal=False)
    assert up == {
        "schedule.partial": "0 3 * * 1-6",
        "schedule.full": "0 3 * * 0",
        "schedule.services": "off",
        "wal.enabled": False,
    }
    with pytest.raises(UsageError):
        schedule_updates(presets={"partial": True}, crons={"partial": "0 1 * * *"}, off=(), wal=None)
    with pytest.raises(ConfigError):
        schedule_updates(presets={}, crons={"full": "0 3 * * 9"}, off=(), wal=None)


def test_render_schedule_lists_next_runs() -> None:
    cfg = parse_config('schedule: {timezone: UTC, services: "30 3 * * *"}\nwal: {enabled: false}\n')
    text = render_schedule(cfg, now=SAT)
    assert "partial   0 3 * * 1-6" in text and "Mon 2026-01-12 03:00 UTC" in text
    assert "full      0 3 * * 0" in text and "Sun 2026-01-11 03:00 UTC" in text
    assert "Sun 2026-01-11 03:30 UTC" in text
    assert "wal       off" in text


def test_schedule_cli_edits_yaml_keeping_comments(tmp_path: Path) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        '# my settings\nschedule:\n  partial: "15 2 * * *"   # nightly\n  timezone: UTC\n'
        "wal:\n  enabled: true # keep\n"
    )
    r = run_cli("--config", str(cfg_path), "schedule", "--partial-daily", "--full-weekly", "--no-wal")
    assert r.returncode == 0, r.stderr
    text = cfg_path.read_text()
    assert "# my settings" in text and "# nightly" in text and "# keep" in text
    assert "0 3 * * 1-6" in text and "0 3 * * 0" in text
    cfg = Config.model_validate(__import__("yaml").safe_load(text))
    assert cfg.schedule.partial == "0 3 * * 1-6" and cfg.wal.enabled is False
    assert "partial   0 3 * * 1-6" in r.stdout and "next:" in r.stdout and "not running" in r.stdout
    r = run_cli("--config", str(cfg_path), "schedule", "--off", "full", "--partial", "0 4 * * 7")
    assert r.returncode == 0, r.stderr
    assert "full      off" in r.stdout and "Sun" in r.stdout
    r = run_cli("--config", str(cfg_path), "schedule", "--full", "0 3 * * 8")
    assert r.returncode == 2 and "day of week" in r.stderr and "Traceback" not in r.stderr
    before = cfg_path.read_text()
    r = run_cli("--config", str(cfg_path), "schedule", "--timezone", "Mars/Olympus")
    assert r.returncode == 2 and r.stderr.startswith("error: --timezone: unknown time zone 'Mars/Olympus'")
    assert "config file" not in r.stderr and cfg_path.read_text() == before


# --------------------------------------------------------------------------------------------
# the daemon's catch-up, in process, with a controllable clock and real backups


async def test_daemon_catches_up_once_after_sleep(tmp_path: Path) -> None:
    from daemon.runner import Daemon

    root = make_root(tmp_path / "root", size="tiny").path
    dest = tmp_path / "dest"
    dest.mkdir()
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        f"root: {root}\ndestination: {{url: 'file://{dest}'}}\nwal: {{enabled: false}}\n"
        "schedule: {partial: '0 3 * * *', full: 'off', timezone: UTC}\n"
        f"logging: {{file: {tmp_path / 'log.jsonl'}}}\n"
    )
    from daemon.config import load_config

    cfg = load_config(cfg_path)
    wall = [datetime(2026, 1, 5, 12, 0, tzinfo=UTC).timestamp()]
    mono = [100.0]
    clock = Clock(wall=lambda: wall[0], mono=lambda: mono[0])
    d = Daemon(cfg_path, cfg, clock=clock, wake_interval=1)
    await d._apply_schedule()
    assert d.check_due() == []

    async def run_queued() -> list[str]:
        ran = []
        while not d.queue.empty():
            name, fire = d.queue.get_nowait()
            await d._run_job(name, d.pending.pop(name), fire)
            ran.append(name)
        return ran

    # asleep for three days: the wall clock jumps, the monotonic clock does not
    wall[0] += 3 * 86400
    assert clock.jump() > 3 * 86400 - 1
    assert d.check_due() == ["partial"]
    assert d.check_due() == []  # already queued: never twice
    assert await run_queued() == ["partial"]
    rec = d.records.job("partial")
    assert rec["last_success"]["trigger"] == "catch-up"
    assert len(list((dest / "partial").iterdir())) == 1
    for _ in range(5):  # later checks the same day: nothing
        wall[0] += 60
        mono[0] += 60
        assert d.check_due() == []
    # the next 03:00 passes while awake: due again, once
    wall[0] = datetime(2026, 1, 9, 3, 0, 30, tzinfo=UTC).timestamp()
    assert d.check_due() == ["partial"]
    assert await run_queued() == ["partial"]
    assert len(list((dest / "partial").iterdir())) == 2
    # a wake-up check just after the next 03:00, before the scheduler's own timer got to it:
    # the job is on time, not a catch-up
    wall[0] = datetime(2026, 1, 10, 3, 0, 0, 500_000, tzinfo=UTC).timestamp()
    assert d.check_due() == ["partial"]
    assert d.pending["partial"] == "schedule"
    assert await run_queued() == ["partial"]
    assert d.records.job("partial")["last_success"]["trigger"] == "schedule"
    assert records_path(root).exists()
    # the schedule from the config and a manual spec agree
    assert job_specs(cfg.schedule)["partial"].key == d.specs["partial"].key


async def test_job_that_cannot_get_the_lock_is_retried_not_dropped(tmp_path: Path) -> None:
    from daemon.config import load_config
    from daemon.lock import root_lock
    from daemon.runner import Daemon

    root = make_root(tmp_path / "root", size="tiny").path
    dest = tmp_path / "dest"
    dest.mkdir()
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        f"root: {root}\ndestination: {{url: 'file://{dest}'}}\nwal: {{enabled: false}}\n"
        "schedule: {partial: '0 3 * * *', full: 'off', timezone: UTC, lock_wait_seconds: 0.3}\n"
        f"logging: {{file: {tmp_path / 'log.jsonl'}}}\n"
    )
    wall = [datetime(2026, 1, 5, 12, 0, tzinfo=UTC).timestamp()]
    clock = Clock(wall=lambda: wall[0], mono=lambda: 0.0)
    d = Daemon(cfg_path, load_config(cfg_path), clock=clock, wake_interval=1)
    await d._apply_schedule()
    wall[0] += 86400
    async with root_lock(root, "a manual create"):
        assert d.check_due() == ["partial"]
        name, fire = d.queue.get_nowait()
        await d._run_job(name, d.pending.pop(name), fire)
    rec = d.records.job("partial")
    assert "last_failure" not in rec and "last_success" not in rec  # deferred, not failed
    assert d.last_error is not None and "a manual create" in d.last_error["message"]
    assert d.status_doc()["jobs"]["partial"]["deferred"]
    # the next wake-up check tries again, now that the lock is free
    assert d.check_due() == ["partial"]
    assert d.pending["partial"] == "retry-lock"
    name, fire = d.queue.get_nowait()
    await d._run_job(name, d.pending.pop(name), fire)
    assert d.records.job("partial")["last_success"]["trigger"] == "retry-lock"
    assert "partial" not in d.lock_deferred


async def test_a_reload_that_only_respells_the_root_keeps_the_daemon_lock(tmp_path: Path) -> None:
    """A root given through a symlink (or /var vs /private/var) is the same root: the daemon must
    not take itself for another daemon and refuse the reload."""
    from daemon.config import load_config
    from daemon.lock import acquire_daemon_lock, release_daemon_lock
    from daemon.runner import Daemon

    root = make_root(tmp_path / "root", size="tiny").path
    link = tmp_path / "link-to-root"
    link.symlink_to(root)
    cfg_path = tmp_path / "c.yaml"
    body = f"destination: {{url: 'file://{tmp_path}'}}\nwal: {{enabled: false}}\n"
    cfg_path.write_text(f"root: {root}\n" + body)
    d = Daemon(cfg_path, load_config(cfg_path), wake_interval=1)
    d.daemon_lock = acquire_daemon_lock(root)
    try:
        cfg_path.write_text(f"root: {link}\n" + body)
        assert await d.reload("test") is True
        assert d.cfg.root == link and d.last_error is None
    finally:
        release_daemon_lock(d.daemon_lock)


def test_a_manual_backup_counts_for_the_schedule_only_to_the_daemons_destination(tmp_path: Path) -> None:
    """`create` records its success so the daemon does not catch up a run it no longer needs; a
    backup to another destination (a second config, a USB disk) must not stand in for it."""
    import json

    from daemon.status import status_path, write_status
    from tests.conftest import run_cli

    root = make_root(tmp_path / "root", size="tiny").path
    usb, s3ish = tmp_path / "usb", tmp_path / "main-dest"
    usb.mkdir()
    s3ish.mkdir()
    cfg = tmp_path / "usb.yaml"
    cfg.write_text(f"root: {root}\ndestination: {{url: 'file://{usb}'}}\n")

    def partial_success() -> object:
        path = records_path(root)
        data = json.loads(path.read_text()) if path.exists() else {}
        return ((data.get("jobs") or {}).get("partial") or {}).get("last_success")

    write_status(status_path(root), {"state": "running", "destination": f"file://{s3ish}", "pid": 1})
    assert run_cli("--config", str(cfg), "create", "--partial").returncode == 0
    assert partial_success() is None  # the daemon ships elsewhere: its schedule still stands
    write_status(status_path(root), {"state": "running", "destination": f"file://{usb}", "pid": 1})
    assert run_cli("--config", str(cfg), "create", "--partial").returncode == 0
    ok = partial_success()
    assert isinstance(ok, dict) and ok["trigger"] == "manual"
