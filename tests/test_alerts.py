"""Alerts against a real local HTTP server: healthchecks pings, JSON webhook, notify levels, failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from daemon.alerts import Alerter
from daemon.config import Alerts
from daemon.logs import register_secret


@dataclass
class Recorder:
    base: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    delay: float = 0.0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]


@pytest.fixture
async def server() -> AsyncIterator[Recorder]:
    rec = Recorder(base="")

    async def handle(request: web.Request) -> web.Response:
        if rec.delay:
            # a hanging endpoint, released at teardown so the server stops at once
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rec.release.wait(), rec.delay)
        rec.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "body": (await request.read()).decode(),
                "content_type": request.headers.get("Content-Type"),
            }
        )
        return web.Response(status=rec.status, text="OK")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rec.base = f"http://127.0.0.1:{port}"
    yield rec
    rec.release.set()
    await runner.cleanup()


def alerts(server: Recorder, **kw: Any) -> Alerts:
    base: dict[str, Any] = {
        "healthchecks_url": f"{server.base}/hc/uuid-123",
        "webhook_url": f"{server.base}/hook",
        "timeout_seconds": 2,
        "macos_notifications": False,
    }
    base.update(kw)
    return Alerts(**base)


async def test_failure_pings_fail_and_posts_webhook(server: Recorder) -> None:
    a = Alerter(alerts(server), host="mac-mini")
    await a.started("partial")
    a.failed("partial", "upload failed: endpoint unreachable — check the network")
    await a.drain()
    assert server.paths()[0] == "/hc/uuid-123/start"  # awaited before the job runs
    assert sorted(server.paths()[1:]) == ["/hc/uuid-123/fail", "/hook"]
    fail = next(r for r in server.requests if r["path"].endswith("/fail"))
    assert "endpoint unreachable" in fail["body"] and fail["method"] == "POST"
    hook = json.loads(next(r for r in server.requests if r["path"] == "/hook")["body"])
    assert hook["event"] == "failure" and hook["type"] == "partial" and hook["host"] == "mac-mini"
    assert "endpoint unreachable" in hook["error"] and hook["timestamp"].endswith("Z")
    assert next(r for r in server.requests if r["path"] == "/hook")["content_type"] == "application/json"


async def test_errors_only_by_default(server: Recorder) -> None:
    a = Alerter(alerts(server), host="h")
    await a.started("full")
    a.succeeded("full")
    await a.drain()
    # healthchecks needs its success ping (a dead man's switch); the webhook hears nothing
    assert server.paths() == ["/hc/uuid-123/start", "/hc/uuid-123"]
    a.succeeded("full", recovered=True)  # the end of a failure streak is news
    await a.drain()
    events = [json.loads(r["body"])["event"] for r in server.requests if r["path"] == "/hook"]
    assert events == ["recovered"]


async def test_always_and_never(server: Recorder) -> None:
    a = Alerter(alerts(server, notify="always"), host="h")
    a.succeeded("services", detail="services/2026-01-10T03-00-00Z")
    await a.drain()
    hook = [json.loads(r["body"]) for r in server.requests if r["path"] == "/hook"]
    assert hook and hook[0]["event"] == "success" and hook[0]["error"] is None
    n = len(server.requests)
    quiet = Alerter(alerts(server, notify="never"), host="h")
    await quiet.started("partial")
    quiet.failed("partial", "boom")
    quiet.stale("partial", 50.0, 36)
    await quiet.drain()
    assert len(server.requests) == n


async def test_stale_alert(server: Recorder) -> None:
    a = Alerter(alerts(server, healthchecks_url=None), host="h")
    a.stale("full", 200.5, 192)
    a.stale("partial", None, 36)
    await a.drain()
    bodies = sorted((json.loads(r["body"]) for r in server.requests), key=lambda b: b["type"])
    assert [b["event"] for b in bodies] == ["stale", "stale"]
    assert "200.5 h old" in bodies[0]["error"] and "no successful partial backup" in bodies[1]["error"]


async def test_failing_endpoints_never_raise(server: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    server.status = 500
    a = Alerter(alerts(server), host="h")
    a.failed("partial", "boom")
    await a.drain()
    assert len(server.requests) == 2  # both tried, both failed with 500, nothing raised
    # an endpoint that hangs: bounded by timeout_seconds
    server.delay = 5
    slow = Alerter(alerts(server, timeout_seconds=0.3), host="h")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await slow.started("partial")
    assert loop.time() - t0 < 2
    # nothing listens here at all
    dead = Alerter(
        Alerts(
            healthchecks_url="http://127.0.0.1:9/x", webhook_url="http://127.0.0.1:9/y", timeout_seconds=1
        ),
        host="h",
        macos=False,
    )
    dead.failed("full", "boom")
    await dead.drain()
    assert dead.sent == []


async def test_secret_urls_and_values_never_logged(server: Recorder, tmp_path: Path) -> None:
    from daemon.logs import setup_logging

    log_file = tmp_path / "log.jsonl"
    setup_logging(file=log_file, console_level=None)
    token = "hc-secret-token-9876"
    register_secret(token)
    server.status = 503
    a = Alerter(alerts(server, healthchecks_url=f"{server.base}/{token}"), host="h")
    a.failed("partial", f"upload to https://x/?t={token} failed")
    await a.drain()
    fail = next(r for r in server.requests if r["path"].endswith("/fail"))
    assert token not in fail["body"]  # the error text sent out is masked too
    text = log_file.read_text()
    assert "alert_failed" in text and token not in text and server.base not in text


async def test_macos_notification_via_osascript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    out = tmp_path / "osascript.args"
    script = bindir / "osascript"
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {out}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    a = Alerter(Alerts(timeout_seconds=2), host="h", macos=True)
    a.failed("full", 'disk "Backup" is full')
    await a.drain()
    args = out.read_text().splitlines()
    assert args[0] == "-e"
    expected = 'display notification "full backup failed: disk \\"Backup\\" is full"'
    assert args[1] == expected + ' with title "tinyserve-backup"'
    assert a.sent == [("macos", "notification")]


# --------------------------------------------------------------------------------------------
# the daemon raising alerts (in process, controllable clock, real jobs)


def _daemon(tmp_path: Path, server: Recorder, dest: Path, **clock_kw: Any) -> Any:
    from daemon.config import load_config
    from daemon.runner import Daemon
    from daemon.scheduler import Clock
    from tests.helpers.rootfactory import make_root

    root = make_root(tmp_path / "root", size="tiny").path
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        f"root: {root}\ndestination: {{url: 'file://{dest}'}}\nwal: {{enabled: false}}\n"
        "schedule: {partial: '0 3 * * *', full: 'off', timezone: UTC}\n"
        f"alerts: {{webhook_url: '{server.base}/hook', healthchecks_url: '{server.base}/hc',"
        " macos_notifications: false, timeout_seconds: 2, stale_after_hours: {partial: 30}}\n"
        f"logging: {{file: {tmp_path / 'log.jsonl'}}}\n"
    )
    return Daemon(cfg_path, load_config(cfg_path), clock=Clock(**clock_kw), wake_interval=1)


async def test_daemon_alerts_on_failure_then_recovery(tmp_path: Path, server: Recorder) -> None:
    from datetime import UTC, datetime, timedelta

    dest = tmp_path / "dest"  # missing: the backup fails
    wall = [datetime(2026, 1, 5, 12, 0, tzinfo=UTC).timestamp()]
    d = _daemon(tmp_path, server, dest, wall=lambda: wall[0], mono=lambda: 0.0)
    await d._apply_schedule()
    wall[0] += 86400

    async def run_one() -> None:
        assert d.check_due() == ["partial"]
        name, fire = d.queue.get_nowait()
        await d._run_job(name, d.pending.pop(name), fire)
        await d.alerter.drain()

    await run_one()
    rec = d.records.job("partial")
    assert rec["consecutive_failures"] == 1 and "does not exist" in rec["last_failure"]["error"]
    assert server.paths()[0] == "/hc/start"
    assert sorted(server.paths()[1:]) == ["/hc/fail", "/hook"]
    hook = json.loads(next(r for r in server.requests if r["path"] == "/hook")["body"])
    assert hook["event"] == "failure" and "does not exist" in hook["error"]
    # status says when it is tried again (5 minutes after a first failure), not only the next cron
    from daemon.scheduler import parse_time
    from daemon.status import render_human

    job = d.status_doc()["jobs"]["partial"]
    failed_at = parse_time(rec["last_failure"]["at"])
    assert failed_at is not None and parse_time(job["retry_at"]) == failed_at + timedelta(minutes=5)
    doc = d.status_doc() | {"running": True}
    assert f"retry at {job['retry_at']}" in render_human(doc, datetime.fromtimestamp(wall[0], UTC))

    dest.mkdir()
    server.requests.clear()
    wall[0] += 3600  # past the 5-minute retry delay
    await run_one()
    assert sorted(server.paths()[1:]) == ["/hc", "/hook"]
    assert (
        json.loads(next(r for r in server.requests if r["path"] == "/hook")["body"])["event"] == "recovered"
    )
    assert "retry_at" not in d.status_doc()["jobs"]["partial"]


async def test_daemon_alerts_once_when_backups_go_stale(tmp_path: Path, server: Recorder) -> None:
    from datetime import UTC, datetime

    dest = tmp_path / "dest"
    dest.mkdir()
    wall = [datetime(2026, 1, 5, 12, 0, tzinfo=UTC).timestamp()]
    d = _daemon(tmp_path, server, dest, wall=lambda: wall[0], mono=lambda: 0.0)
    await d._apply_schedule()
    await d._check_stale()
    assert server.requests == []
    wall[0] += 31 * 3600  # no partial backup for 31 h (threshold 30 h)
    await d._check_stale()
    await d.alerter.drain()
    hooks = [json.loads(r["body"]) for r in server.requests if r["path"] == "/hook"]
    assert [h["event"] for h in hooks] == ["stale"] and "no successful partial backup" in hooks[0]["error"]
    await d._check_stale()  # once per episode
    wall[0] += 3 * 3600
    await d._check_stale()
    await d.alerter.drain()
    assert len([r for r in server.requests if r["path"] == "/hook"]) == 1
    assert d.status_doc()["last_error"]["kind"] == "stale"


async def test_a_gap_in_the_wal_history_is_alerted(tmp_path: Path, server: Recorder) -> None:
    """One transaction larger than the spool bound: the shipper drops its spool and starts over
    from a snapshot. Point-in-time restore now has a gap; a person must hear about it."""
    import sqlite3

    from daemon.config import load_config
    from daemon.runner import Daemon

    d = _daemon(tmp_path, server, tmp_path / "dest")
    (tmp_path / "dest").mkdir()
    text = d.config_path.read_text().replace(
        "wal: {enabled: false}", "wal: {enabled: true, spool_max_mb: 1, poll_interval_seconds: 0.2}"
    )
    d.config_path.write_text(text)
    d = Daemon(d.config_path, load_config(d.config_path), wake_interval=1)
    await d.shipper.ensure(d.cfg)
    try:
        assert d.shipper.status()["state"] == "running"
        d.check_wal_history()
        assert server.requests == []  # nothing dropped yet, nothing said
        c = sqlite3.connect(d.cfg.root / "state.db")
        c.execute("create table big(x)")
        c.execute("insert into big values (?)", (os.urandom(3 * 1024 * 1024),))
        c.commit()
        c.close()
        deadline = asyncio.get_running_loop().time() + 30
        while not d.shipper.status().get("spool_dropped"):
            assert asyncio.get_running_loop().time() < deadline, "the spool was never dropped"
            await asyncio.sleep(0.05)
        d.check_wal_history()
        d.check_wal_history()  # once per drop, not at every wake-up
        await d.alerter.drain()
        assert sorted(server.paths()) == ["/hc/fail", "/hook"]

        # A restarted shipper counts from zero: its first drop is still news.
        await d.shipper.reconfigure(
            d.cfg.model_copy(update={"wal": d.cfg.wal.model_copy(update={"debounce_ms": 7})})
        )
        assert d.shipper.status()["state"] == "running"
        d.check_wal_history()
        await d.alerter.drain()
        assert len(server.requests) == 2  # nothing new yet
        c = sqlite3.connect(d.cfg.root / "state.db")
        c.execute("insert into big values (?)", (os.urandom(3 * 1024 * 1024),))
        c.commit()
        c.close()
        deadline = asyncio.get_running_loop().time() + 30
        while d.shipper.status().get("spool_dropped", 0) < 2:
            assert asyncio.get_running_loop().time() < deadline, "the second drop never came"
            await asyncio.sleep(0.05)
        d.check_wal_history()
        await d.alerter.drain()
    finally:
        await d.shipper.stop(5)
    assert sorted(server.paths()) == ["/hc/fail", "/hc/fail", "/hook", "/hook"]
    hook = json.loads(next(r for r in server.requests if r["path"] == "/hook")["body"])
    assert hook["event"] == "failure" and "point-in-time restore has a gap" in hook["error"]
    assert d.last_error is not None and d.last_error["kind"] == "wal"
