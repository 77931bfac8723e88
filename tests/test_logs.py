"""Structured logs: JSON lines in the file, secrets never written, tracebacks without locals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog

from daemon.logs import read_log_lines, register_secret, setup_logging


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_json_lines_redaction_and_no_locals(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "t.log"
    setup_logging(file=log_file, level="debug", console_level=None)
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    register_secret(secret)
    log = structlog.get_logger("t")
    log.info("storage_configured", bucket="b", secret_access_key=secret, endpoint="http://x")
    log.warning("request_failed", detail=f"signature mismatch for {secret}", nested={"password": "hunter22"})

    def fail(token: str) -> None:
        local_secret = token  # a local that must never be rendered
        raise ValueError("boom " + local_secret[:0])

    try:
        fail(secret)
    except ValueError:
        log.exception("job_failed", job="partial")
    text = log_file.read_text()
    assert secret not in text and "hunter22" not in text
    recs = _records(log_file)
    assert [r["event"] for r in recs] == ["storage_configured", "request_failed", "job_failed"]
    assert recs[0]["secret_access_key"] == "[redacted]" and recs[0]["bucket"] == "b"
    assert "[redacted]" in str(recs[1]["detail"])
    assert all("timestamp" in r and "level" in r and r["pid"] == os.getpid() for r in recs)
    exc = recs[2]["exception"]
    assert "ValueError" in json.dumps(exc) and "local_secret" not in json.dumps(exc)
    assert oct(log_file.stat().st_mode & 0o777) == "0o600"
    # the reader renders readable lines and filters
    lines = list(read_log_lines(log_file, level="warning"))
    assert len(lines) == 2 and "WARNING" in lines[0] and "request_failed" in lines[0]
    assert next(iter(read_log_lines(log_file, event="storage_*"))).split()[3] == "storage_configured"


def test_log_rotates_by_size(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    log_file = tmp_path / "logs" / "r.log"
    setup_logging(file=log_file, level="info", max_bytes=64 * 1024, backups=2, console_level=None)
    log = structlog.get_logger("r")
    for i in range(3000):
        log.info("tick", i=i, pad="x" * 40)
    files = sorted(p.name for p in log_file.parent.iterdir())
    assert files == ["r.log", "r.log.1", "r.log.2"]
    assert all(p.stat().st_size <= 64 * 1024 + 512 for p in log_file.parent.iterdir())
