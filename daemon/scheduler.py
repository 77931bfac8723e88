"""Schedules: cron parsing, the jobs a config asks for, and catch-up planning.

Catch-up follows anacron: each job keeps a durable record of its last success; whenever the
daemon looks (at start, every minute, after a wall-clock jump such as a wake from sleep) a job whose
earliest fire time after that success (and after the schedule was first seen) has passed is run
once, however many fire times were missed.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

from . import paths
from .errors import ConfigError
from .fsutil import make_private_dirs, write_atomic

log = structlog.get_logger(__name__)

_DOW_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_DOW_INDEX = {n: i for i, n in enumerate(_DOW_NAMES)}


def _dow_value(token: str, expr: str) -> int:
    t = token.strip().lower()
    if t in _DOW_INDEX:
        return _DOW_INDEX[t]
    if t.isdigit() and 0 <= int(t) <= 7:
        return int(t) % 7
    raise ConfigError(
        f"invalid day of week {token!r} in cron {expr!r}", "use 0-7 (0 and 7 are Sunday) or sun-sat"
    )


def cron_dow_to_apscheduler(field: str, expr: str) -> str:
    """Translate a cron day-of-week field to APScheduler names.

    APScheduler 3's ``from_crontab`` reads 0 as Monday; cron users mean Sunday (and 7 too), so we
    expand the field ourselves into explicit day names.
    """
    if field == "*":
        return "*"
    days: set[int] = set()
    for part in field.split(","):
        step = 1
        if "/" in part:
            part, step_s = part.split("/", 1)
            if not step_s.isdigit() or int(step_s) == 0:
                raise ConfigError(f"invalid step in cron {expr!r}", "write the day of week like 1-5 or */2")
            step = int(step_s)
        if part == "*":
            lo, hi = 0, 6
        elif "-" in part:
            a, b = part.split("-", 1)
            lo, hi = _dow_value(a, expr), _dow_value(b, expr)
            if b.strip() == "7":
                hi = 7
            if hi < lo:
                hi += 7
        else:
            lo = hi = _dow_value(part, expr)
        days.update(d % 7 for d in range(lo, hi + 1, step))
    return ",".join(_DOW_NAMES[d] for d in sorted(days))


def parse_cron(expr: str, tz: tzinfo | str | None) -> CronTrigger:
    fields = expr.split()
    if len(fields) != 5:
        raise ConfigError(
            f"invalid cron string {expr!r}: expected 5 fields (minute hour day month weekday)",
            'write it like "0 3 * * 1-6"',
        )
    minute, hour, day, month, dow = fields
    try:
        return CronTrigger(
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=cron_dow_to_apscheduler(dow, expr),
            timezone=tz,
        )
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid cron string {expr!r}: {exc}", 'write it like "0 3 * * 1-6"') from None


# --------------------------------------------------------------------------------------------
# Jobs from the config, time zones, fire times
# --------------------------------------------------------------------------------------------

JOB_TYPES = ("partial", "full", "services")

# Presets of `tinyserve-backup schedule` (the guide's crontab lines).
PRESETS = {
    "partial-daily": "0 3 * * 1-6",
    "full-weekly": "0 3 * * 0",
    "services-daily": "30 3 * * *",
}


def schedule_tz(timezone: str | None) -> tzinfo:
    """The schedule's zone: `schedule.timezone`, else the machine's local zone."""
    if timezone:
        return ZoneInfo(timezone)
    import tzlocal

    return tzlocal.get_localzone()


@dataclass(frozen=True)
class JobSpec:
    """One scheduled job: a backup type on a cron string in a zone."""

    name: str
    cron: str
    tz: tzinfo
    trigger: CronTrigger

    @property
    def key(self) -> str:
        """Identifies the schedule: when it changes, missed runs of the old one are not caught up."""
        return f"{' '.join(self.cron.split())} @ {self.tz}"

    def next_fire(self, now: datetime) -> datetime | None:
        """The first fire time at or after ``now``."""
        nxt = self.trigger.get_next_fire_time(None, now.astimezone(self.tz))
        return nxt.astimezone(UTC) if nxt else None

    def first_fire_after(self, anchor: datetime) -> datetime | None:
        """The first fire time strictly after ``anchor``."""
        return self.next_fire(anchor + timedelta(microseconds=1))


def job_specs(schedule: Any) -> dict[str, JobSpec]:
    """The jobs a config's `schedule` section asks for (types set to off/None are absent)."""
    tz = schedule_tz(schedule.timezone)
    out: dict[str, JobSpec] = {}
    for name in JOB_TYPES:
        cron = getattr(schedule, name, None)
        if cron:
            out[name] = JobSpec(name, cron, tz, parse_cron(cron, tz))
    return out


# --------------------------------------------------------------------------------------------
# The daemon's clock (with a test-only offset) and wall-clock jump detection
# --------------------------------------------------------------------------------------------

ENV_CLOCK_OFFSET_FILE = "TINYSERVE_BACKUP_CLOCK_OFFSET_FILE"


class Clock:
    """Wall-clock time for the scheduler, plus detection of jumps (sleep/wake, clock changes).

    The monotonic clock stops while a Mac (or a suspended Linux box) sleeps but the wall clock does
    not, so "wall time advanced much more than monotonic time since the last look" means the machine
    slept (or someone set the clock).

    Test-only: when ``TINYSERVE_BACKUP_CLOCK_OFFSET_FILE`` names a file holding a number of seconds,
    that offset is added to the wall clock (re-read whenever the file changes).  A test moves the
    offset forward to simulate a sleep — exactly what a sleeping machine looks like to the daemon:
    the wall clock jumps, the monotonic clock does not.  Nothing else in the daemon knows about it.
    """

    def __init__(
        self,
        *,
        offset_file: Path | None = None,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.offset_file = offset_file
        self._wall = wall
        self._mono = mono
        self._offset = 0.0
        self._offset_sig: tuple[int, int] | None = None
        self._ref = (self._wall_now(), self._mono())

    @classmethod
    def from_env(cls) -> Clock:
        path = os.environ.get(ENV_CLOCK_OFFSET_FILE)
        return cls(offset_file=Path(path) if path else None)

    @property
    def shifted(self) -> bool:
        return self.offset_file is not None

    @property
    def offset(self) -> float:
        if self.offset_file is not None:
            try:
                st = self.offset_file.stat()
                sig = (st.st_mtime_ns, st.st_size)
                if sig != self._offset_sig:
                    self._offset = float(self.offset_file.read_text().strip() or 0)
                    self._offset_sig = sig
            except (OSError, ValueError):
                pass
        return self._offset

    def _wall_now(self) -> float:
        return self._wall() + self.offset

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._wall_now(), UTC)

    def jump(self) -> float:
        """Seconds the wall clock moved beyond the monotonic clock since the last call."""
        wall, mono = self._wall_now(), self._mono()
        w0, m0 = self._ref
        self._ref = (wall, mono)
        return (wall - w0) - (mono - m0)


class ShiftedTrigger(BaseTrigger):
    """Makes APScheduler (which reads the real wall clock) follow a ``Clock`` with a test offset."""

    __slots__ = ("clock", "inner")

    def __init__(self, inner: BaseTrigger, clock: Clock) -> None:
        self.inner = inner
        self.clock = clock

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        off = timedelta(seconds=self.clock.offset)
        prev = previous_fire_time + off if previous_fire_time else None
        nxt = self.inner.get_next_fire_time(prev, now + off)
        return nxt - off if nxt else None

    def __str__(self) -> str:
        return f"shifted({self.inner})"


# --------------------------------------------------------------------------------------------
# Durable per-job records: the basis of catch-up, status and stale alerts
# --------------------------------------------------------------------------------------------


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z") if t else None


def parse_time(s: Any) -> datetime | None:
    if not s or not isinstance(s, str):
        return None
    try:
        t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def records_path(root: Path) -> Path:
    return paths.state_dir() / "schedule" / f"{paths.root_key(root)}.json"


class JobRecords:
    """Last success / failure per backup type, in a small JSON file in the state dir.

    Writes are read-modify-write under an flock on a sidecar file, then temp + fsync + rename, so
    the daemon and a manual ``create`` can both record results and a crash never leaves a torn file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"version": 1, "jobs": {}}
        except (OSError, ValueError) as exc:
            # A damaged record must not stop the daemon; the worst case is one extra catch-up run.
            log.warning("job_records_unreadable", path=str(self.path), error=str(exc)[:200])
            return {"version": 1, "jobs": {}}
        if not isinstance(data, dict) or not isinstance(data.get("jobs"), dict):
            return {"version": 1, "jobs": {}}
        return data

    def job(self, name: str) -> dict[str, Any]:
        rec = self.load()["jobs"].get(name)
        return rec if isinstance(rec, dict) else {}

    def update(self, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        make_private_dirs(self.path.parent)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self.load()
            fn(data)
            atomic_write_json(self.path, data)
            return data
        finally:
            os.close(fd)

    def update_job(self, name: str, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        def apply(data: dict[str, Any]) -> None:
            rec = data["jobs"].setdefault(name, {})
            fn(rec)

        job: dict[str, Any] = self.update(apply)["jobs"][name]
        return job


def atomic_write_json(path: Path, data: Any) -> None:
    """temp + fsync + rename (+ fsync of the directory): readers see the old file or the new one."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def record_success(
    records: JobRecords,
    name: str,
    *,
    started: datetime,
    finished: datetime,
    timestamp: str,
    size_bytes: int,
    duration_s: float,
    trigger: str,
) -> dict[str, Any]:
    def fn(rec: dict[str, Any]) -> None:
        rec["last_success"] = {
            "at": _iso(finished),
            "started_at": _iso(started),
            "timestamp": timestamp,
            "size_bytes": size_bytes,
            "duration_s": round(duration_s, 3),
            "trigger": trigger,
        }
        rec["consecutive_failures"] = 0
        rec.pop("stale_alerted_at", None)

    return records.update_job(name, fn)


def record_failure(
    records: JobRecords,
    name: str,
    *,
    started: datetime,
    finished: datetime,
    error: str,
    duration_s: float,
    trigger: str,
) -> dict[str, Any]:
    def fn(rec: dict[str, Any]) -> None:
        rec["last_failure"] = {
            "at": _iso(finished),
            "started_at": _iso(started),
            "error": error[:500],
            "duration_s": round(duration_s, 3),
            "trigger": trigger,
        }
        rec["consecutive_failures"] = int(rec.get("consecutive_failures") or 0) + 1

    return records.update_job(name, fn)


def note_manual_backup(cfg: Any, result: Any, started: datetime | None = None) -> None:
    """Record a successful manual ``create`` so the daemon does not catch up a run it no longer needs.

    ``result`` is a ``daemon.backup.BackupResult``.  Best effort: a failure here never fails the backup.
    A backup to another destination than the daemon's (another config for the same root, a USB
    disk) is not recorded: it does not stand in for the daemon's scheduled one.
    """
    try:
        from .status import read_status, status_path

        daemon_dest = (read_status(status_path(cfg.root)) or {}).get("destination")
        if daemon_dest and daemon_dest != cfg.destination.resolved_url:
            log.info(
                "manual_backup_not_recorded", destination=cfg.destination.resolved_url, daemon=daemon_dest
            )
            return
        finished = datetime.now(UTC)
        record_success(
            JobRecords(records_path(cfg.root)),
            result.type,
            started=started or finished - timedelta(seconds=result.duration_s),
            finished=finished,
            timestamp=result.timestamp,
            size_bytes=result.manifest.size_bytes,
            duration_s=result.duration_s,
            trigger="manual",
        )
    except Exception as exc:
        log.warning("job_record_failed", type=getattr(result, "type", "?"), error=type(exc).__name__)


# --------------------------------------------------------------------------------------------
# Catch-up planning (anacron semantics)
# --------------------------------------------------------------------------------------------

RETRY_BASE_S = 300.0
RETRY_MAX_S = 3600.0


def retry_delay(consecutive_failures: int) -> float:
    """After a failed run, wait 5, 10, 20, 40, 60, 60… minutes before trying that fire again."""
    n = max(consecutive_failures, 1)
    return min(RETRY_BASE_S * (2 ** (n - 1)), RETRY_MAX_S)


def sync_configured(records: JobRecords, specs: dict[str, JobSpec], now: datetime) -> None:
    """Remember when each job's current schedule was first seen.

    Fire times before that are not "missed": a fresh install does not back up at once, and editing
    a schedule does not run the new one for times that passed before the edit.
    """

    def fn(data: dict[str, Any]) -> None:
        for name, spec in specs.items():
            rec = data["jobs"].setdefault(name, {})
            if rec.get("schedule") != spec.key or not parse_time(rec.get("configured_at")):
                rec["schedule"] = spec.key
                rec["configured_at"] = _iso(now)

    if any(
        records.job(n).get("schedule") != s.key or not records.job(n).get("configured_at")
        for n, s in specs.items()
    ):
        records.update(fn)


def retry_at(rec: dict[str, Any]) -> datetime | None:
    """When a job that failed (and has not succeeded since) is tried again, per ``retry_delay``."""
    bad = parse_time((rec.get("last_failure") or {}).get("at"))
    ok = parse_time((rec.get("last_success") or {}).get("at"))
    if bad is None or (ok is not None and ok >= bad):
        return None
    return bad + timedelta(seconds=retry_delay(int(rec.get("consecutive_failures") or 1)))


def due_fire(spec: JobSpec, rec: dict[str, Any], now: datetime) -> datetime | None:
    """The earliest fire time of ``spec`` not yet satisfied by a success, if it has passed.

    ``None`` means nothing to do now.  One missed fire or fifty: the answer is one time, so the
    caller runs the job once (never a burst).  After a failure for that fire the job waits for
    ``retry_delay`` before the next attempt.
    """
    configured = parse_time(rec.get("configured_at")) or now
    anchor = configured
    ok = rec.get("last_success") or {}
    last_ok = parse_time(ok.get("at"))
    if last_ok and last_ok > anchor:
        anchor = last_ok
    fire = spec.first_fire_after(anchor)
    if fire is None or fire > now:
        return None
    bad = rec.get("last_failure") or {}
    last_bad = parse_time(bad.get("at"))
    if last_bad and last_bad >= fire:
        wait = retry_delay(int(rec.get("consecutive_failures") or 1))
        if now < last_bad + timedelta(seconds=wait):
            return None
    return fire


# --------------------------------------------------------------------------------------------
# `tinyserve-backup schedule`
# --------------------------------------------------------------------------------------------


def schedule_updates(
    *,
    presets: dict[str, bool],
    crons: dict[str, str | None],
    off: tuple[str, ...] | list[str],
    wal: bool | None,
    timezone: str | None = None,
) -> dict[str, Any]:
    """The dotted config updates the `schedule` options ask for (validated by ``edit_config``)."""
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString as Quoted

    from .errors import UsageError

    # Quoted like the example config; a bare `off` would read back as the boolean false.
    updates: dict[str, Any] = {}
    for name in JOB_TYPES:
        chosen = [
            label
            for label, on in (
                (f"--{name}-{'weekly' if name == 'full' else 'daily'}", presets.get(name, False)),
                (f"--{name} CRON", bool(crons.get(name))),
                (f"--off {name}", name in off),
            )
            if on
        ]
        if len(chosen) > 1:
            raise UsageError(f"{' and '.join(chosen)} both set the {name} schedule", "choose one")
        if presets.get(name):
            updates[f"schedule.{name}"] = Quoted(PRESETS[f"{name}-{'weekly' if name == 'full' else 'daily'}"])
        elif crons.get(name):
            cron = " ".join(str(crons[name]).split())
            parse_cron(cron, None)  # a clear message before anything is written
            updates[f"schedule.{name}"] = Quoted(cron)
        elif name in off:
            updates[f"schedule.{name}"] = Quoted("off")
    if wal is not None:
        updates["wal.enabled"] = wal
    if timezone is not None:
        if timezone:
            from .config import check_timezone

            try:
                check_timezone(timezone)  # the flag's fault, not the file's (which is unchanged)
            except ValueError as exc:
                raise UsageError(f"--timezone: {exc}", 'pass an IANA name, or "" for local time') from None
        updates["schedule.timezone"] = timezone or None
    return updates


def render_schedule(cfg: Any, now: datetime | None = None, runs: int = 2) -> str:
    now = now or datetime.now(UTC)
    specs = job_specs(cfg.schedule)
    tz = schedule_tz(cfg.schedule.timezone)
    lines = [f"Schedule (time zone {tz}{'' if cfg.schedule.timezone else ', local'}):"]
    for name in JOB_TYPES:
        spec = specs.get(name)
        if spec is None:
            lines.append(f"  {name:<9} off")
            continue
        nxt: list[str] = []
        t: datetime | None = now
        for _ in range(runs):
            t = spec.next_fire(t + timedelta(seconds=1)) if t else None
            if t is None:
                break
            nxt.append(t.astimezone(tz).strftime("%a %Y-%m-%d %H:%M %Z"))
        lines.append(f"  {name:<9} {spec.cron:<16} next: {', '.join(nxt) or 'never'}")
    lines.append(f"  {'wal':<9} {'continuous' if cfg.wal.enabled else 'off'}")
    catch_up = "on (a missed run happens once after wake/start)" if cfg.schedule.catch_up else "off"
    lines.append(f"  {'catch-up':<9} {catch_up}")
    return "\n".join(lines)
