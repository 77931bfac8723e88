"""Alerts: healthchecks-style pings, a generic JSON webhook, and macOS notifications.

What is sent, by ``alerts.notify``:

- ``never``: nothing at all.
- ``errors`` (default): a person hears only about problems — a failed job, a stale backup, and the
  recovery after a failure (webhook + macOS notification).  The healthchecks URL still gets its
  ``/start`` and success pings, because a healthchecks check is a dead man's switch: it only alerts a
  person when the success pings stop or a ``/fail`` ping arrives, so silencing successes would turn
  every healthy day into an alert.
- ``always``: successes also go to the webhook and the notification centre.

Delivery is best effort and bounded (``alerts.timeout_seconds``): a failing endpoint logs a warning
naming the target kind (never its URL, which usually embeds a token) and never affects a backup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from .logs import redact

log = structlog.get_logger(__name__)

FAIL_BODY_MAX = 1000
TITLE = "tinyserve-backup"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _clean(text: str | None, limit: int = FAIL_BODY_MAX) -> str | None:
    """One short line with every registered secret masked."""
    if text is None:
        return None
    line = " ".join(str(text).split())
    masked = redact(None, "", {"v": line})["v"]
    return str(masked)[:limit]


def _applescript_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Alerter:
    """Sends alerts for one daemon.  ``cfg`` is a ``daemon.config.Alerts``.

    Calls return quickly: deliveries run as tasks tracked here; ``drain`` waits for them (bounded)
    at shutdown.  ``started`` is the exception: it is awaited (bounded) so healthchecks sees the
    ``/start`` ping before the success or failure ping of the same run.
    """

    def __init__(
        self,
        cfg: Any,
        *,
        host: str | None = None,
        macos: bool | None = None,
        now: Callable[[], str] = _now_iso,
    ) -> None:
        self.cfg = cfg
        self.host = host or socket.gethostname()
        self.macos = (sys.platform == "darwin") if macos is None else macos
        self._now = now
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent: list[tuple[str, str]] = []  # (target kind, event): for status and tests

    def configure(self, cfg: Any) -> None:
        self.cfg = cfg

    # ---- events -------------------------------------------------------------------------

    async def started(self, btype: str) -> None:
        if self.cfg.notify == "never" or not self.cfg.healthchecks_url:
            return
        await self._healthchecks("start", btype, None)

    def succeeded(self, btype: str, *, recovered: bool = False, detail: str | None = None) -> None:
        if self.cfg.notify == "never":
            return
        if self.cfg.healthchecks_url:
            self._spawn(self._healthchecks("success", btype, detail))
        if self.cfg.notify == "always" or recovered:
            event = "recovered" if recovered else "success"
            msg = f"{btype} backup succeeded" + (" again" if recovered else "")
            self._spawn(self._webhook(event, btype, None, detail))
            self._spawn(self._notify(msg))

    def failed(self, btype: str, error: str, *, notify_person: bool = True) -> None:
        """A job failed.  ``notify_person`` False (a repeat within a failure streak) pings only."""
        if self.cfg.notify == "never":
            return
        err = _clean(error)
        if self.cfg.healthchecks_url:
            self._spawn(self._healthchecks("fail", btype, err))
        if notify_person:
            self._spawn(self._webhook("failure", btype, err, None))
            self._spawn(self._notify(f"{btype} backup failed: {_clean(error, 150)}"))

    def stale(self, btype: str, age_hours: float | None, threshold_hours: float) -> None:
        if self.cfg.notify == "never":
            return
        if age_hours is None:
            err = f"no successful {btype} backup yet (expected one within {threshold_hours:g} h)"
        else:
            err = f"newest {btype} backup is {age_hours:.1f} h old (threshold {threshold_hours:g} h)"
        if self.cfg.healthchecks_url:
            self._spawn(self._healthchecks("fail", btype, err))
        self._spawn(self._webhook("stale", btype, err, None))
        self._spawn(self._notify(err))

    async def drain(self, budget: float = 3.0) -> None:
        """Wait at most ``budget`` seconds for deliveries in flight, then cancel the rest."""
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=budget)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)

    # ---- delivery -----------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, kind: str, event: str, url: str, *, data: bytes, content_type: str) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=float(self.cfg.timeout_seconds))
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(url, data=data, headers={"Content-Type": content_type}) as resp,
            ):
                await resp.read()
                if resp.status >= 300:
                    log.warning("alert_failed", target=kind, alert_event=event, http_status=resp.status)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an alert endpoint must never break the daemon
            log.warning("alert_failed", target=kind, alert_event=event, error=type(exc).__name__)
            return
        self.sent.append((kind, event))
        log.info("alert_sent", target=kind, alert_event=event)

    async def _healthchecks(self, what: str, btype: str, body: str | None) -> None:
        base = str(self.cfg.healthchecks_url).rstrip("/")
        url = base if what == "success" else f"{base}/{what}"
        text = body if body is not None else (f"{btype} backup" if what != "start" else f"{btype} starting")
        await self._post(
            "healthchecks", what, url, data=text.encode()[:FAIL_BODY_MAX], content_type="text/plain"
        )

    async def _webhook(self, event: str, btype: str, error: str | None, detail: str | None) -> None:
        if not self.cfg.webhook_url:
            return
        payload: dict[str, Any] = {
            "event": event,
            "type": btype,
            "timestamp": self._now(),
            "error": error,
            "host": self.host,
        }
        if detail:
            payload["detail"] = _clean(detail, 300)
        await self._post(
            "webhook",
            event,
            str(self.cfg.webhook_url),
            data=json.dumps(payload).encode(),
            content_type="application/json",
        )

    async def _notify(self, message: str) -> None:
        if not (self.macos and self.cfg.macos_notifications):
            return
        exe = shutil.which("osascript")
        if exe is None:
            return
        text = _applescript_string(_clean(message, 200) or "")
        script = f"display notification {text} with title {_applescript_string(TITLE)}"
        try:
            proc = await asyncio.create_subprocess_exec(
                exe,
                "-e",
                script,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                code = await asyncio.wait_for(proc.wait(), float(self.cfg.timeout_seconds))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                code = -1
        except OSError as exc:
            log.warning("alert_failed", target="macos", error=type(exc).__name__)
            return
        if code != 0:
            log.warning("alert_failed", target="macos", exit_code=code)
            return
        self.sent.append(("macos", "notification"))
