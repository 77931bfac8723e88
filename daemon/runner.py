"""`tinyserve-backup run`: the daemon's run loop.

One asyncio process holds:

- the WAL shipper (``daemon.wal``), through ``ShipperAdapter`` so the daemon runs without it;
- APScheduler's AsyncIOScheduler, firing the scheduled backup jobs on their cron strings;
- a worker that runs queued jobs one at a time under the root lock, then prunes;
- the wake-up check (every ``WAKE_SECONDS``, and at start): catch-up of missed jobs with
  anacron semantics (see ``daemon.scheduler.due_fire``), stale-backup alerts, detection of
  wall-clock jumps (sleep/wake), restart of a WAL shipper that could not start;
- the config watch (a stat every ``CONFIG_POLL_SECONDS``) and SIGHUP: reload, validated first;
- the status writer (``daemon.status``).

Signals: SIGTERM/SIGINT stop within ``STOP_BUDGET_S`` (launchd waits 25 s): the running backup is
cancelled (its multipart upload is aborted, its partial objects discarded; the manifest is written
last, so none exists), the shipper flushes and stops, the final status is written, exit 0.

Priority: ``lower_priority`` runs once at start, before any thread exists, so every thread and child
process inherits it.  Everywhere: nice 10 (a no-op when launchd/systemd already set it).  macOS:
``setiopolicy_np(IOPOL_TYPE_DISK, IOPOL_SCOPE_PROCESS, IOPOL_THROTTLE)``, the same thing the
LaunchAgent's ``LowPriorityIO`` asks for, so a foreground `make run` behaves like the agent.  Linux:
``ioprio_set`` best-effort class, level 7 (lowest), unless the process is already in the idle class
(the systemd unit's ``IOSchedulingClass=idle``).  The whole process is lowered, not just backups:
the WAL shipper reads pages that are in the page cache and is not slowed measurably.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import platform
import signal
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from . import paths
from .alerts import Alerter
from .config import Config, iter_secret_values, load_config
from .errors import BackupError, LockError
from .logs import redact, register_secret, setup_logging
from .runtime import release_memory
from .scheduler import (
    Clock,
    JobRecords,
    JobSpec,
    ShiftedTrigger,
    due_fire,
    job_specs,
    parse_time,
    record_failure,
    record_success,
    records_path,
    retry_at,
    sync_configured,
)
from .status import remove_status, status_path, write_status

log = structlog.get_logger(__name__)

ENV_WAKE_SECONDS = "TINYSERVE_BACKUP_WAKE_SECONDS"  # test-only: shorter wake-up checks
WAKE_SECONDS = 60.0
STARTUP_DELAY_S = 30.0  # catch-up runs this long after start, not while the login is still busy
CONFIG_POLL_SECONDS = 2.0
STATUS_POLL_SECONDS = 2.0  # how stale WAL figures in the status file may get
STOP_BUDGET_S = 18.0  # launchd's ExitTimeOut and systemd's TimeoutStopSec are 25 s
SHIPPER_STOP_S = 10.0  # flushing shipped WAL on stop; what does not make it stays in the spool
JUMP_THRESHOLD_S = 10.0
FIRE_TOLERANCE_S = 2.0
SHIPPER_RETRY_S = 300.0
FAILURE_RENOTIFY_S = 6 * 3600.0
STALE_RECHECK_S = 3600.0


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z") if t else None


def _scrub(text: str) -> str:
    """Mask registered secrets, exactly as the log does, before text reaches status or records."""
    return str(redact(None, "", {"v": text})["v"])


# --------------------------------------------------------------------------------------------
# Background priority
# --------------------------------------------------------------------------------------------


def lower_priority(target_nice: int = 10) -> dict[str, Any]:
    """Run the whole process at background CPU and I/O priority; returns what was done."""
    done: dict[str, Any] = {}
    try:
        cur = os.nice(0)
        if cur < target_nice:
            cur = os.nice(target_nice - cur)
        done["nice"] = cur
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            # IOPOL_TYPE_DISK = 0, IOPOL_SCOPE_PROCESS = 0, IOPOL_THROTTLE = 3
            if libc.setiopolicy_np(0, 0, 3) == 0:
                done["io"] = "throttle"
        except (OSError, AttributeError):
            pass
    elif sys.platform.startswith("linux"):
        numbers = {"x86_64": (251, 252), "aarch64": (30, 31)}.get(platform.machine())
        if numbers:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                set_nr, get_nr = numbers
                who_process, shift = 1, 13
                current = libc.syscall(get_nr, who_process, 0)
                if current >= 0 and current >> shift == 3:
                    done["io"] = "idle"
                elif libc.syscall(set_nr, who_process, 0, (2 << shift) | 7) == 0:
                    done["io"] = "best-effort/7"
            except (OSError, AttributeError):
                pass
    return done


# --------------------------------------------------------------------------------------------
# The WAL shipper, through a narrow adapter
# --------------------------------------------------------------------------------------------


class ShipperAdapter:
    """Starts, stops and reports on ``daemon.wal.WalShipper`` when it is available and wanted.

    The daemon only needs start/stop/status; everything else about shipping is the shipper's.
    A shipper that cannot start (lease held by another machine, storage down) is reported in
    status and retried every ``SHIPPER_RETRY_S``; scheduled backups carry on regardless.
    """

    def __init__(self) -> None:
        self._shipper: Any = None
        self._storage: Any = None
        self._key: Any = None
        self.state = "disabled"
        self.error: str | None = None
        self._retry_at = 0.0
        self._last_raw: dict[str, Any] = {}
        self._lock = asyncio.Lock()  # start, stop and restart never interleave
        self._dropped_before = 0  # spool drops of shippers since replaced (each counts from 0)

    @staticmethod
    def settings_key(cfg: Config) -> Any:
        # encryption too: segments and snapshots are sealed to the recipients the shipper was
        # started with, so a change must restart it
        return (
            cfg.wal.model_dump(mode="json"),
            cfg.destination.model_dump(mode="json"),
            cfg.encryption.model_dump(mode="json"),
            str(cfg.root),
        )

    @property
    def running(self) -> bool:
        return self._shipper is not None

    async def ensure(self, cfg: Config) -> None:
        """Start the shipper if the config wants it and it is not running (cheap when nothing to do)."""
        if self._shipper is not None:
            return
        async with self._lock:
            if self._shipper is None:
                await self._ensure(cfg)

    async def _ensure(self, cfg: Config) -> None:
        if not cfg.wal.enabled:
            self.state, self.error = "disabled", None
            return
        if not cfg.db_path.exists():
            if self.state != "waiting_for_database":
                log.info("wal_waiting_for_database", path=str(cfg.db_path))
            self.state, self.error = "waiting_for_database", None
            return
        if time.monotonic() < self._retry_at:
            return
        try:
            from . import wal as wal_module
        except ImportError:
            if self.state != "unavailable":
                log.warning("wal_shipper_unavailable", reason="daemon.wal is not installed")
            self.state, self.error = "unavailable", "this build has no WAL shipper"
            return
        from .storage import storage_from_config

        storage = None
        self.state, self.error = "starting", None  # (it may wait for storage, or for the lease)
        try:
            storage = storage_from_config(cfg)
            shipper = _build_shipper(wal_module, cfg, storage)
            await shipper.start()
        except asyncio.CancelledError:
            if storage is not None:
                await storage.close()
            raise
        except Exception as exc:
            msg = exc.one_line() if isinstance(exc, BackupError) else f"internal error ({type(exc).__name__})"
            if not isinstance(exc, BackupError):
                log.exception("wal_shipper_crashed")
            log.error("wal_shipper_start_failed", error=msg, retry_in_s=SHIPPER_RETRY_S)
            self.state, self.error = "error", msg
            self._retry_at = time.monotonic() + SHIPPER_RETRY_S
            if storage is not None:
                with contextlib.suppress(Exception):
                    await storage.close()
            return
        self._shipper, self._storage, self._key = shipper, storage, self.settings_key(cfg)
        self.state, self.error = "running", None  # (the shipper logs wal_shipper_started itself)

    async def stop(self, budget: float) -> None:
        """Flush what is committed within ``budget`` seconds; the rest stays in the spool."""
        async with self._lock:
            await self._stop(budget)

    async def _stop(self, budget: float) -> None:
        shipper, storage = self._shipper, self._storage
        if shipper is None:
            return
        self.status()  # keep the last figures (generation, spool) for the final status
        self._dropped_before += int((self._last_raw or {}).get("spool_dropped") or 0)
        self._last_raw = {k: v for k, v in (self._last_raw or {}).items() if k != "spool_dropped"}
        self._shipper = self._storage = None
        budget = max(budget, 1.0)
        try:
            await asyncio.wait_for(shipper.stop(timeout=budget - 0.5), budget)  # (it logs the stop)
        except TimeoutError:
            log.error("wal_shipper_stop_timeout", budget_s=round(budget, 1))
        except Exception as exc:
            log.error("wal_shipper_stop_failed", error=type(exc).__name__)
        finally:
            if storage is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(storage.close(), 2)
        self.state = "stopped"

    async def reconfigure(self, cfg: Config, budget: float = 15.0) -> None:
        """Restart the shipper if the settings it depends on changed (or stop it if now disabled)."""
        async with self._lock:
            if self._shipper is not None and self._key == self.settings_key(cfg):
                return
            if self._shipper is not None:
                log.info("wal_shipper_restarting")
                await self._stop(budget)
            self._retry_at = 0.0
            await self._ensure(cfg)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state}
        if self.error:
            out["error"] = self.error
        if self._shipper is not None:
            try:
                raw = self._shipper.status()
            except Exception as exc:
                out["error"] = f"status unavailable ({type(exc).__name__})"
                return out
            if isinstance(raw, dict):
                self._last_raw = raw
        raw = self._last_raw
        if raw and self.state in ("running", "stopped"):
            out.update({k: v for k, v in raw.items() if k != "state"})
            # the shipper's own mode: shipping | snapshot_only | …
            out["mode"] = raw.get("state")
        # over every shipper this daemon ran, so a restart never hides a drop from check_wal_history
        out["spool_dropped"] = int((raw or {}).get("spool_dropped") or 0) + self._dropped_before
        return out


def _build_shipper(wal_module: Any, cfg: Config, storage: Any) -> Any:
    """The one place that knows how ``daemon.wal`` wants to be constructed."""
    factory = getattr(wal_module, "shipper_from_config", None)
    if factory is not None:
        return factory(cfg, storage)
    return wal_module.WalShipper(
        cfg.db_path, storage, cfg.spool_dir, options=wal_module.WalOptions.from_config(cfg)
    )


# --------------------------------------------------------------------------------------------
# The daemon
# --------------------------------------------------------------------------------------------


def _stat_sig(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class Daemon:
    def __init__(
        self,
        config_path: Path,
        cfg: Config,
        *,
        clock: Clock | None = None,
        wake_interval: float | None = None,
        console_level: str | None = None,
        priority: dict[str, Any] | None = None,
    ) -> None:
        self.config_path = config_path.absolute()
        self.cfg = cfg
        self.clock = clock or Clock.from_env()
        env_wake = os.environ.get(ENV_WAKE_SECONDS)
        self.wake_interval = wake_interval or (float(env_wake) if env_wake else WAKE_SECONDS)
        self.console_level = console_level
        self.priority = priority or {}
        self.records = JobRecords(records_path(cfg.root))
        self.specs: dict[str, JobSpec] = {}
        self.alerter = Alerter(cfg.alerts)
        self.shipper = ShipperAdapter()
        self.queue: asyncio.Queue[tuple[str, datetime]] = asyncio.Queue()
        self.pending: dict[str, str] = {}
        self.current: tuple[str, asyncio.Task[None], datetime] | None = None
        self.lock_deferred: set[str] = set()
        self.last_error: dict[str, Any] | None = None
        self.started_at = self.clock.now()
        self.state = "starting"
        # the root's daemon lock (lock.acquire_daemon_lock), when run as `tinyserve-backup run`
        self.daemon_lock: int | None = None
        self._wal_dropped_seen = 0  # the shipper's spool_dropped already alerted about
        self.stopping = False
        self._stop = asyncio.Event()
        self._dirty = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._config_sig = _stat_sig(config_path)
        self._stale_checked: dict[str, float] = {}
        self._last_status: Any = None
        self._status_path = status_path(cfg.root)
        self._sched: Any = None
        self._bg: set[asyncio.Task[Any]] = set()

    # ---- lifecycle ----------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._spawn_reload, "sighup")
        self._register_secrets(self.cfg)
        log.info(
            "daemon_started",
            pid=os.getpid(),
            config=str(self.config_path),
            root=str(self.cfg.root),
            destination=self.cfg.destination.resolved_url,
            priority=self.priority,
            wake_interval_s=self.wake_interval,
            test_clock=self.clock.shifted or None,
        )
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self._sched = AsyncIOScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        await self._apply_schedule()
        self._sched.start()
        self.state = "running"
        await self._write_status(force=True)
        # in the background: taking the lease may wait on the network, and SIGTERM must not
        self._spawn(self.shipper.ensure(self.cfg))
        tasks = [
            asyncio.create_task(self._worker(), name="worker"),
            asyncio.create_task(self._waker(), name="waker"),
            asyncio.create_task(self._config_watch(), name="config-watch"),
            asyncio.create_task(self._status_loop(), name="status"),
        ]
        self._dirty.set()
        await self._stop.wait()
        await self._shutdown(tasks)
        return 0

    def request_stop(self, why: str = "request") -> None:
        if self.stopping:
            log.info("stop_already_requested", signal=why)
            return
        self.stopping = True
        log.info("daemon_stopping", signal=why)
        self._arm_hard_deadline()
        self._stop.set()

    def _arm_hard_deadline(self) -> None:
        # A thread that cannot be cancelled (a huge SQLite snapshot in progress) must not keep the
        # process past the service manager's stop timeout; nothing visible is half-written, because
        # the manifest is only ever written last.
        def expire() -> None:
            with contextlib.suppress(Exception):
                log.error("stop_deadline_exceeded", budget_s=STOP_BUDGET_S + 1)
                logging.shutdown()
            os._exit(0)

        t = threading.Timer(STOP_BUDGET_S + 1, expire)
        t.daemon = True
        t.start()

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        t0 = time.monotonic()
        self.state = "stopping"

        def left() -> float:
            return STOP_BUDGET_S - (time.monotonic() - t0)

        with contextlib.suppress(Exception):
            self._sched.shutdown(wait=False)
        for t in tasks:
            if t.get_name() != "worker":
                t.cancel()
        current = self.current
        if current is not None:
            name, task, _since = current
            log.info("job_cancelling", type=name)
            task.cancel()
            await asyncio.wait({task}, timeout=max(min(10.0, left() - 5), 1.0))
        for t in tasks:
            t.cancel()
        for t in list(self._bg):
            t.cancel()
        await asyncio.wait([*tasks, *self._bg], timeout=2.0)
        await self.shipper.stop(max(min(SHIPPER_STOP_S, left() - 3), 1.0))
        await self.alerter.drain(max(min(2.0, left() - 1), 0.1))
        self.state = "stopped"
        await self._write_status(force=True, stopped=True)
        log.info("daemon_stopped", shutdown_s=round(time.monotonic() - t0, 2))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _spawn_reload(self, reason: str) -> None:
        if not self.stopping:
            self._spawn(self.reload(reason))

    def _register_secrets(self, cfg: Config) -> None:
        for value in iter_secret_values(cfg):
            register_secret(value)

    def _set_error(self, message: str, kind: str) -> None:
        self.last_error = {"at": _iso(self.clock.now()), "message": _scrub(message), "kind": kind}
        self._dirty.set()

    # ---- scheduling ---------------------------------------------------------------------

    async def _apply_schedule(self) -> None:
        """(Re)build the jobs from the config and (re)plan APScheduler's timers."""
        specs = job_specs(self.cfg.schedule)
        await asyncio.to_thread(sync_configured, self.records, specs, self.clock.now())
        self.specs = specs
        self._plan_timers()
        log.info(
            "schedule_planned",
            jobs={n: s.cron for n, s in specs.items()},
            timezone=str(next(iter(specs.values())).tz) if specs else None,
            next_runs={n: _iso(s.next_fire(self.clock.now())) for n, s in specs.items()},
        )

    def _plan_timers(self) -> None:
        if self._sched is None:
            return
        self._sched.remove_all_jobs()
        for name, spec in self.specs.items():
            trigger: Any = ShiftedTrigger(spec.trigger, self.clock) if self.clock.shifted else spec.trigger
            self._sched.add_job(self._on_fire, trigger=trigger, args=[name], id=name, name=f"{name} backup")

    async def _on_fire(self, name: str) -> None:
        self.request(name, "schedule")

    def request(self, name: str, reason: str) -> bool:
        """Queue ``name`` if it has an unsatisfied fire time that has passed (at most once)."""
        if self.stopping or name not in self.specs:
            return False
        if name in self.pending or (self.current is not None and self.current[0] == name):
            return False
        slack = FIRE_TOLERANCE_S if reason == "schedule" else 0.0
        fire = due_fire(self.specs[name], self.records.job(name), self.clock.now() + timedelta(seconds=slack))
        if fire is None:
            return False
        if reason == "catch-up" and (self.clock.now() - fire).total_seconds() < FIRE_TOLERANCE_S:
            # On time: the wake-up check got there just before the scheduler's own timer.
            reason = "schedule"
        self.pending[name] = reason
        self.queue.put_nowait((name, fire))
        log.info("job_queued", type=name, trigger=reason, fire_time=_iso(fire))
        self._dirty.set()
        return True

    def check_due(self) -> list[str]:
        queued = []
        for name in list(self.specs):
            if not self.cfg.schedule.catch_up and name not in self.lock_deferred:
                continue
            reason = "retry-lock" if name in self.lock_deferred else "catch-up"
            if self.request(name, reason):
                queued.append(name)
        return queued

    async def _worker(self) -> None:
        while True:
            name, fire = await self.queue.get()
            reason = self.pending.get(name, "schedule")
            try:
                if name not in self.specs or self.stopping:
                    continue
                soon = self.clock.now() + timedelta(seconds=FIRE_TOLERANCE_S)
                if due_fire(self.specs[name], self.records.job(name), soon) is None:
                    log.info("job_skipped", type=name, reason="already satisfied")
                    continue
                task = asyncio.create_task(self._run_job(name, reason, fire), name=f"job-{name}")
                self.current = (name, task, self.clock.now())
                self._dirty.set()
                # shield: stopping cancels the job task itself (see _shutdown), not through us
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    me = asyncio.current_task()
                    if me is not None and me.cancelling():
                        raise
            finally:
                self.pending.pop(name, None)
                self.current = None
                self._dirty.set()

    async def _run_job(self, name: str, reason: str, fire: datetime) -> None:
        cfg = self.cfg
        started = self.clock.now()
        t0 = time.monotonic()
        log.info("job_started", type=name, trigger=reason, scheduled_for=_iso(fire))
        try:
            await asyncio.wait_for(self.alerter.started(name), float(cfg.alerts.timeout_seconds) + 1)
        except Exception:
            pass
        from .backup import BackupJob, LogProgress
        from .crypto import encryptor_from_config
        from .lock import root_lock
        from .retention import prune
        from .storage import storage_from_config

        try:
            async with storage_from_config(cfg) as st:
                holder = f"daemon: scheduled {name} backup"
                async with root_lock(cfg.root, holder, wait=cfg.schedule.lock_wait_seconds):
                    job = BackupJob(cfg, st, progress=LogProgress(), encryptor=encryptor_from_config(cfg))
                    result = await job.run(name)
                    self.lock_deferred.discard(name)
                    prev = self.records.job(name)
                    await asyncio.to_thread(
                        record_success,
                        self.records,
                        name,
                        started=started,
                        finished=self.clock.now(),
                        timestamp=result.timestamp,
                        size_bytes=result.manifest.size_bytes,
                        duration_s=result.duration_s,
                        trigger=reason,
                    )
                    await asyncio.to_thread(
                        self.records.update_job, name, lambda r: r.pop("failure_notified_at", None)
                    )
                    log.info(
                        "job_succeeded",
                        type=name,
                        trigger=reason,
                        backup_timestamp=result.timestamp,
                        size_bytes=result.manifest.size_bytes,
                        duration_s=round(time.monotonic() - t0, 2),
                    )
                    self.alerter.succeeded(
                        name,
                        recovered=int(prev.get("consecutive_failures") or 0) > 0,
                        detail=f"{name}/{result.timestamp}",
                    )
                    self._dirty.set()
                    try:
                        await prune(cfg, st)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        msg = exc.one_line() if isinstance(exc, BackupError) else type(exc).__name__
                        log.warning("prune_failed", after=name, error=msg)
                        self._set_error(f"prune after {name} backup failed: {msg}", "prune")
        except LockError as exc:
            self.lock_deferred.add(name)
            log.warning("job_deferred", type=name, reason="lock", error=exc.message, retry="next check")
            self._set_error(f"{name} backup deferred: {exc.message}", "lock")
        except asyncio.CancelledError:
            log.warning("job_cancelled", type=name, duration_s=round(time.monotonic() - t0, 2))
            raise
        except Exception as exc:
            if isinstance(exc, BackupError):
                msg = exc.one_line()
            else:
                log.exception("job_crashed", type=name)
                msg = f"internal error ({type(exc).__name__}); details in the log"
            await self._job_failed(name, reason, started, t0, msg)
        finally:
            # The daemon idles for hours between jobs: hand the job's buffers back to the system.
            await asyncio.to_thread(release_memory)

    async def _job_failed(self, name: str, reason: str, started: datetime, t0: float, msg: str) -> None:
        now = self.clock.now()
        rec = await asyncio.to_thread(
            record_failure,
            self.records,
            name,
            started=started,
            finished=now,
            error=_scrub(msg),
            duration_s=time.monotonic() - t0,
            trigger=reason,
        )
        n = int(rec.get("consecutive_failures") or 1)
        notified = parse_time(rec.get("failure_notified_at"))
        notify_person = notified is None or (now - notified).total_seconds() >= FAILURE_RENOTIFY_S
        if notify_person:
            await asyncio.to_thread(
                self.records.update_job, name, lambda r: r.update(failure_notified_at=_iso(now))
            )
        log.error("job_failed", type=name, trigger=reason, error=msg, consecutive_failures=n)
        self._set_error(f"{name} backup failed: {msg}", "job")
        self.alerter.failed(name, msg, notify_person=notify_person)

    # ---- periodic wake-up ---------------------------------------------------------------

    async def _waker(self) -> None:
        await asyncio.sleep(min(self.wake_interval, STARTUP_DELAY_S))
        while True:
            jump = self.clock.jump()
            jumped = abs(jump) >= JUMP_THRESHOLD_S
            if jumped:
                # Sleep/wake or a clock change: APScheduler's timers were planned on the old clock.
                log.info("clock_jump_detected", seconds=round(jump, 1))
                self._plan_timers()
                self._dirty.set()
            queued = self.check_due()
            if jumped or queued:
                log.info("catch_up_check", queued=queued, after_jump=jumped)
            await self._check_stale()
            self.check_wal_history()
            if not self.stopping:
                await self.shipper.ensure(self.cfg)
                self._dirty.set()
            await asyncio.sleep(self.wake_interval)

    def check_wal_history(self) -> None:
        """Alert when the shipper had to drop its spool: point-in-time restore then has a gap
        (until the fresh snapshot it starts from), which a person must hear about."""
        dropped = int(self.shipper.status().get("spool_dropped") or 0)
        if dropped <= self._wal_dropped_seen:
            return
        self._wal_dropped_seen = dropped
        msg = (
            "WAL shipping fell behind its spool bound (wal.spool_max_mb) and dropped what it held: "
            "point-in-time restore has a gap until the fresh snapshot it started from"
        )
        log.error("wal_history_gap", spool_dropped=dropped)
        self._set_error(msg, "wal")
        self.alerter.failed("wal", msg)

    async def _check_stale(self) -> None:
        thresholds = self.cfg.alerts.stale_after_hours
        now = self.clock.now()
        for name in self.specs:
            limit = thresholds.get(name)
            if not limit:
                continue
            rec = self.records.job(name)
            if rec.get("stale_alerted_at"):
                continue
            newest = parse_time((rec.get("last_success") or {}).get("at"))
            since = newest or parse_time(rec.get("configured_at"))
            if since is None or (now - since).total_seconds() < limit * 3600:
                continue
            # Our record says stale; a manual backup may have been made without telling us, so ask
            # the destination once (two small requests) before alerting.
            if time.monotonic() < self._stale_checked.get(name, 0):
                continue
            self._stale_checked[name] = time.monotonic() + STALE_RECHECK_S
            found = await self._newest_in_destination(name)
            if found is not None and (now - found).total_seconds() < limit * 3600:
                continue
            latest = found or newest
            age = (now - latest).total_seconds() / 3600 if latest else None
            log.warning("backup_stale", type=name, age_h=round(age, 1) if age else None, threshold_h=limit)
            self._set_error(f"newest {name} backup is older than {limit:g} h", "stale")
            await asyncio.to_thread(
                self.records.update_job, name, lambda r: r.update(stale_alerted_at=_iso(now))
            )
            self.alerter.stale(name, age, limit)

    async def _newest_in_destination(self, btype: str) -> datetime | None:
        from .manifest import parse_ts
        from .storage import storage_from_config

        try:
            async with storage_from_config(self.cfg) as st:
                names: list[str] = await st.list_dirs(f"{btype}/")
                for ts in sorted(names, reverse=True)[:5]:
                    if await st.head(f"{btype}/{ts}/manifest.json") is not None:
                        return parse_ts(ts)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("stale_check_failed", type=btype, error=type(exc).__name__)
        return None

    # ---- config reload ------------------------------------------------------------------

    async def _config_watch(self) -> None:
        while True:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            sig = _stat_sig(self.config_path)
            if sig == self._config_sig:
                continue
            # Let an editor finish writing before reading it.
            await asyncio.sleep(0.2)
            if _stat_sig(self.config_path) != sig:
                continue
            self._config_sig = sig
            await self.reload("file_changed")

    async def reload(self, reason: str) -> bool:
        async with self._reload_lock:
            self._config_sig = _stat_sig(self.config_path)
            try:
                new = await asyncio.to_thread(load_config, self.config_path)
            except BackupError as exc:
                msg = exc.one_line()
                log.error("config_reload_failed", reason=reason, path=str(self.config_path), error=msg)
                self._set_error(f"config reload failed (old config kept): {msg}", "config")
                return False
            old = self.cfg
            changed = [k for k in Config.model_fields if k != "source" and getattr(old, k) != getattr(new, k)]
            if not changed:
                log.info("config_unchanged", reason=reason)
                if self.last_error and self.last_error.get("kind") == "config":
                    self.last_error = None
                    self._dirty.set()
                return True
            same_root = paths.root_key(new.root) == paths.root_key(old.root)  # (another spelling)
            if "root" in changed and self.daemon_lock is not None and not same_root:
                from .lock import acquire_daemon_lock, release_daemon_lock

                try:  # the new root must not have a daemon of its own either
                    fd = await asyncio.to_thread(acquire_daemon_lock, new.root)
                except LockError as exc:
                    log.error("config_reload_failed", reason=reason, error=exc.one_line())
                    self._set_error(f"config not applied, old config kept: {exc.message}", "config")
                    return False
                release_daemon_lock(self.daemon_lock)
                self.daemon_lock = fd
            self.cfg = new
            self._register_secrets(new)
            if "logging" in changed:
                lg = new.logging
                setup_logging(
                    file=lg.file,
                    level=lg.level,
                    max_bytes=lg.max_bytes,
                    backups=lg.backups,
                    console_level=self.console_level,
                )
            self.alerter.configure(new.alerts)
            if "root" in changed:
                remove_status(self._status_path)
                self._status_path = status_path(new.root)
                self.records = JobRecords(records_path(new.root))
            if "schedule" in changed or "root" in changed:
                await self._apply_schedule()
            if self.last_error and self.last_error.get("kind") == "config":
                self.last_error = None
            log.info("config_reloaded", reason=reason, changed=changed)
            await self.shipper.reconfigure(new)
            self._dirty.set()
            return True

    # ---- status -------------------------------------------------------------------------

    def status_doc(self) -> dict[str, Any]:
        now = self.clock.now()
        data = self.records.load()
        jobs: dict[str, Any] = {}
        names = [n for n in ("partial", "full", "services") if n in self.specs or n in data["jobs"]]
        for name in names:
            rec = data["jobs"].get(name) or {}
            spec = self.specs.get(name)
            job: dict[str, Any] = {
                "schedule": spec.cron if spec else None,
                "next_run": _iso(spec.next_fire(now)) if spec and not self.stopping else None,
                "running": self.current is not None and self.current[0] == name,
                "queued": name in self.pending and not (self.current and self.current[0] == name),
                "last_success": rec.get("last_success"),
                "last_failure": rec.get("last_failure"),
                "consecutive_failures": int(rec.get("consecutive_failures") or 0),
                "configured_at": rec.get("configured_at"),
            }
            if job["running"] and self.current is not None:
                job["running_since"] = _iso(self.current[2])
            if name in self.lock_deferred:
                job["deferred"] = "waiting for the root lock; retried at the next check"
            # (without catch-up a failed fire is not retried: the next cron time is the next try)
            again = retry_at(rec) if spec and not self.stopping and self.cfg.schedule.catch_up else None
            if again is not None:
                job["retry_at"] = _iso(max(again, now))
            jobs[name] = job
        return {
            "version": 1,
            "pid": os.getpid(),
            "state": self.state,
            "started_at": _iso(self.started_at),
            "uptime_s": round((now - self.started_at).total_seconds(), 1),
            "config_path": str(self.config_path),
            "root": str(self.cfg.root),
            "destination": self.cfg.destination.resolved_url,
            "timezone": str(next(iter(self.specs.values())).tz) if self.specs else None,
            "catch_up": self.cfg.schedule.catch_up,
            "priority": self.priority,
            "jobs": jobs,
            "wal": self.shipper.status() | {"enabled": self.cfg.wal.enabled},
            "last_error": self.last_error,
        }

    async def _write_status(self, *, force: bool = False, stopped: bool = False) -> None:
        doc = self.status_doc()
        # uptime changes every second; rewrite only when something else did
        key = {k: v for k, v in doc.items() if k != "uptime_s"}
        wal = dict(key.get("wal") or {})
        for volatile in ("lag_seconds", "lag_p50_seconds", "lag_p99_seconds"):
            if isinstance(wal.get(volatile), float):
                wal[volatile] = round(wal[volatile], 0)
        key["wal"] = wal
        if not force and key == self._last_status:
            return
        self._last_status = key
        now = self.clock.now()
        doc["updated_at"] = _iso(now)
        if stopped:
            doc["stopped_at"] = _iso(now)
        try:
            await asyncio.to_thread(write_status, self._status_path, doc)
        except OSError as exc:
            log.warning("status_write_failed", path=str(self._status_path), error=exc.strerror)

    async def _status_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), STATUS_POLL_SECONDS)
            self._dirty.clear()
            await self._write_status()
            await asyncio.sleep(0.5)  # coalesce bursts of changes into one write


def run_daemon(config_path: Path, cfg: Config, *, console_level: str | None = None) -> int:
    """Entry point of `tinyserve-backup run`; returns the exit code."""
    from .lock import acquire_daemon_lock, release_daemon_lock

    daemon = Daemon(config_path, cfg, console_level=console_level, priority=lower_priority())
    daemon.daemon_lock = acquire_daemon_lock(cfg.root)
    try:
        return asyncio.run(daemon.run())
    finally:
        release_daemon_lock(daemon.daemon_lock)
