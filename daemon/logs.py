"""Structured logging: JSON lines to a size-rotated file, readable lines on a terminal.

Secrets never reach a log: a processor drops values under secret-looking keys and masks every
registered secret value wherever it appears, and tracebacks are rendered without local variables.
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import logging.handlers
import os
import re
import sys
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

_SECRET_KEY = re.compile(
    r"(secret|password|passwd|token|credential|authorization|access_key|private|identity_key)", re.I
)
_REDACTED = "[redacted]"
_secret_values: set[str] = set()
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def register_secret(value: str | None) -> None:
    """Mask this value in every log line from now on (short values would mask too much)."""
    if value and len(value) >= 6:
        _secret_values.add(value)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        for s in _secret_values:
            if s in value:
                value = value.replace(s, _REDACTED)
        return value
    if isinstance(value, dict):
        return {k: (_REDACTED if _SECRET_KEY.search(str(k)) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k in list(event_dict):
        if _SECRET_KEY.search(k):
            event_dict[k] = _REDACTED
        else:
            event_dict[k] = _scrub(event_dict[k])
    return event_dict


_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    redact,
]


def _add_pid(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Which process wrote the line: daemons of several roots, and one-shot commands, share the
    log file."""
    event_dict.setdefault("pid", os.getpid())
    return event_dict


def _exc_to_dict() -> Any:
    return structlog.processors.ExceptionRenderer(
        structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
    )


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    def _open(self) -> io.TextIOWrapper:
        # Logs can name hosts and paths; keep them private to the user like the config.
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return open(fd, "a", encoding=self.encoding or "utf-8")


def setup_logging(
    *,
    file: Path | None,
    level: str = "info",
    max_bytes: int = 5 * 1024 * 1024,
    backups: int = 3,
    console_level: str | None = "warning",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog + stdlib logging once per process (calling again reconfigures)."""
    stream = stream or sys.stderr
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.DEBUG)

    if file is not None:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            fh = _PrivateRotatingFileHandler(file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        except OSError:
            fh = None
        if fh is not None:
            fh.setLevel(_LEVELS.get(level, 20))
            fh.setFormatter(
                structlog.stdlib.ProcessorFormatter(
                    foreign_pre_chain=_SHARED,
                    processors=[
                        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        _add_pid,
                        _exc_to_dict(),
                        structlog.processors.JSONRenderer(default=str),
                    ],
                )
            )
            root.addHandler(fh)

    if console_level is not None:
        tty = hasattr(stream, "isatty") and stream.isatty()
        ch = logging.StreamHandler(stream)
        ch.setLevel(_LEVELS.get(console_level, 30))
        renderer: Any
        if tty:
            renderer = structlog.dev.ConsoleRenderer(
                colors=True, exception_formatter=structlog.dev.plain_traceback
            )
            chain = [structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer]
        else:
            chain = [
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                _exc_to_dict(),
                structlog.processors.JSONRenderer(default=str),
            ]
        ch.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=_SHARED, processors=chain))
        root.addHandler(ch)

    # Library chatter (botocore's debug dumps can include signed headers) stays out of our logs.
    for noisy in ("botocore", "aiobotocore", "urllib3", "apscheduler", "watchdog", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


# --------------------------------------------------------------------------------------------
# Reading the log back (`tinyserve-backup logs`)
# --------------------------------------------------------------------------------------------


def format_record(rec: dict[str, Any]) -> str:
    ts = str(rec.get("timestamp", ""))[:23].replace("T", " ")
    level = str(rec.get("level", "info")).upper()
    event = rec.get("event", "")
    rest = " ".join(f"{k}={v}" for k, v in rec.items() if k not in ("timestamp", "level", "event", "logger"))
    return f"{ts} {level:<7} {event} {rest}".rstrip()


def _matches(rec: dict[str, Any], min_level: int, event_glob: str | None) -> bool:
    if _LEVELS.get(str(rec.get("level", "info")).lower(), 20) < min_level:
        return False
    return not (event_glob and not fnmatch.fnmatch(str(rec.get("event", "")), event_glob))


def read_log_lines(
    path: Path,
    *,
    follow: bool = False,
    level: str = "debug",
    event: str | None = None,
    raw_json: bool = False,
    tail: int = 50,
    poll: float = 0.5,
    stop_after: float | None = None,
) -> Iterator[str]:
    """Yield rendered log lines; with ``follow`` keeps going across rotations like `tail -F`."""
    min_level = _LEVELS.get(level, 10)
    deadline = time.monotonic() + stop_after if stop_after else None

    def render(line: str) -> str | None:
        line = line.strip()
        if not line:
            return None
        try:
            rec = json.loads(line)
        except ValueError:
            return line
        if not isinstance(rec, dict) or not _matches(rec, min_level, event):
            return None
        return line if raw_json else format_record(rec)

    if path.exists():
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [r for r in (render(x) for x in f) if r is not None]
            yield from lines[-tail:] if tail else lines
            pos = f.tell()
            ino = os.fstat(f.fileno()).st_ino
    else:
        pos, ino = 0, -1
    while follow:
        if deadline and time.monotonic() > deadline:
            return
        try:
            st = path.stat()
        except FileNotFoundError:
            time.sleep(poll)
            continue
        if st.st_ino != ino or st.st_size < pos:
            pos, ino = 0, st.st_ino
        if st.st_size > pos:
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(pos)
                for line in f:
                    r = render(line)
                    if r is not None:
                        yield r
                pos = f.tell()
        else:
            time.sleep(poll)
