"""The guide's own backup and restore scripts, runnable on Linux against the test S3 server.

``GUIDE_FULL``, ``GUIDE_PARTIAL`` and ``GUIDE_RESTORE`` below are the three scripts exactly as the
Backup & Restore Guide prints them (``tests/test_rootfactory.py`` checks them against the guide when
``/work/shared/seeds`` is present).  ``guide_script()`` applies the few patches in ``_PATCHES`` — each
one marked in the emitted script by a ``# DEVIATION from the guide:`` comment — and nothing else:

1. ``TINYSERVE_ROOT`` honours the environment (``${TINYSERVE_ROOT:-<guide default>}``), so a test
   root can be used.  (All three scripts.)
2. ``TIMESTAMP`` honours ``GUIDE_TIMESTAMP`` so tests can pin it (two runs in one second would
   otherwise write the same prefix).  (full, partial.)
3. ``sleep`` becomes a no-op when ``GUIDE_SKIP_SLEEP=1`` (the default here): the guide sleeps 2 s
   after stopping the daemon and 3 s before `tinyserve status`; that is waiting, not work, and would
   only flatter our tool in the benchmark.  (full, restore — the partial script does not sleep.)

Everything else runs as written, with what the environment provides:
- ``aws`` is AWS CLI v1 (``aws-cli/1.45`` here, on PATH); the guide never passes ``--endpoint-url``,
  so the test server's endpoint reaches it through ``AWS_ENDPOINT_URL`` (honoured by the CLI since
  1.29), plus ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_DEFAULT_REGION`` — pass them in
  ``env``.
- ``launchctl``, ``docker`` and ``tinyserve`` are the stand-ins in tests/fakes (``fake_path()`` puts
  them first on PATH): set ``FAKE_DOCKER_STATE`` (and optionally ``FAKE_CALLS_LOG``,
  ``FAKE_TINYSERVED_STATE``) in ``env``.  ``sqlite3``, GNU ``tar``/``gzip``/``date``, ``mktemp`` and
  ``hostname`` are the system's.  The ``stat -f%z`` BSD-ism lives only in the WAL-shipping script,
  which is not reproduced here.

Note on the full script's ``cp state.db-wal``: after ``sqlite3 … .backup`` closes the last connection
SQLite checkpoints and deletes ``state.db-wal``, so the copy silently finds nothing.  A stray WAL beside
the snapshot — what the guide's bucket layout shows — appears only while another connection keeps the
database open (tinyserved still running); ``hold_db_open=True`` reproduces that.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .rootfactory import fake_path

Kind = Literal["full", "partial"]

# ------------------------------------------------------------------------------------------------
# Verbatim from the guide (do not edit: patches go in _PATCHES)

GUIDE_FULL = r"""#!/bin/bash
set -euo pipefail

TINYSERVE_ROOT="${HOME}/Library/Application Support/tinyserve"
BACKUP_BUCKET="${S3_BACKUP_BUCKET:-your-bucket}"
BACKUP_PREFIX="${S3_BACKUP_PREFIX:-tinyserve-backups}"
TIMESTAMP=$(date -u +"%Y-%m-%dT%H-%M-%SZ")
BACKUP_PATH="${BACKUP_PREFIX}/full/${TIMESTAMP}"
WORK_DIR=$(mktemp -d)

cleanup() { rm -rf "${WORK_DIR}"; }
trap cleanup EXIT

echo "==> Creating full backup: ${TIMESTAMP}"

# 1. Stop daemon to ensure clean SQLite state
echo "Stopping tinyserved..."
launchctl unload ~/Library/LaunchAgents/dev.tinyserve.daemon.plist 2>/dev/null || true
sleep 2

# 2. Copy SQLite database (with WAL checkpoint)
echo "Backing up database..."
sqlite3 "${TINYSERVE_ROOT}/state.db" ".backup '${WORK_DIR}/state.db'"
cp "${TINYSERVE_ROOT}/state.db-wal" "${WORK_DIR}/state.db-wal" 2>/dev/null || true

# 3. Archive configs
echo "Archiving configs..."
tar -czf "${WORK_DIR}/configs.tar.gz" -C "${TINYSERVE_ROOT}" \
    generated backups traefik cloudflared 2>/dev/null || true

# 4. Archive service data
echo "Archiving service data..."
if [ -d "${TINYSERVE_ROOT}/services" ]; then
    tar -czf "${WORK_DIR}/services.tar.gz" -C "${TINYSERVE_ROOT}" services
fi

# 5. Export Docker images
echo "Exporting Docker images..."
COMPOSE_FILE="${TINYSERVE_ROOT}/generated/docker-compose.yml"
if [ -f "${COMPOSE_FILE}" ]; then
    IMAGES=$(grep -E '^\s+image:' "${COMPOSE_FILE}" | awk '{print $2}' | sort -u)
    if [ -n "${IMAGES}" ]; then
        docker save ${IMAGES} | gzip > "${WORK_DIR}/images.tar.gz"
    fi
fi

# 6. Create manifest
cat > "${WORK_DIR}/manifest.json" << EOF
{
    "timestamp": "${TIMESTAMP}",
    "type": "full",
    "hostname": "$(hostname)",
    "tinyserve_version": "$(tinyserve version 2>/dev/null || echo 'unknown')",
    "files": [
        "state.db",
        "configs.tar.gz",
        "services.tar.gz",
        "images.tar.gz"
    ]
}
EOF

# 7. Upload to S3
echo "Uploading to s3://${BACKUP_BUCKET}/${BACKUP_PATH}/"
aws s3 cp "${WORK_DIR}/" "s3://${BACKUP_BUCKET}/${BACKUP_PATH}/" \
    --recursive --quiet

# 8. Restart daemon
echo "Restarting tinyserved..."
launchctl load ~/Library/LaunchAgents/dev.tinyserve.daemon.plist

echo "==> Full backup complete: s3://${BACKUP_BUCKET}/${BACKUP_PATH}/"
"""

GUIDE_PARTIAL = r"""#!/bin/bash
set -euo pipefail

TINYSERVE_ROOT="${HOME}/Library/Application Support/tinyserve"
BACKUP_BUCKET="${S3_BACKUP_BUCKET:-your-bucket}"
BACKUP_PREFIX="${S3_BACKUP_PREFIX:-tinyserve-backups}"
TIMESTAMP=$(date -u +"%Y-%m-%dT%H-%M-%SZ")
BACKUP_PATH="${BACKUP_PREFIX}/partial/${TIMESTAMP}"
WORK_DIR=$(mktemp -d)

cleanup() { rm -rf "${WORK_DIR}"; }
trap cleanup EXIT

echo "==> Creating partial backup: ${TIMESTAMP}"

# Online backup using SQLite backup API (no daemon stop needed)
echo "Backing up database (online)..."
sqlite3 "${TINYSERVE_ROOT}/state.db" ".backup '${WORK_DIR}/state.db'"

# Archive configs
echo "Archiving configs..."
tar -czf "${WORK_DIR}/configs.tar.gz" -C "${TINYSERVE_ROOT}" \
    generated backups traefik cloudflared 2>/dev/null || true

# Create manifest
cat > "${WORK_DIR}/manifest.json" << EOF
{
    "timestamp": "${TIMESTAMP}",
    "type": "partial",
    "hostname": "$(hostname)",
    "tinyserve_version": "$(tinyserve version 2>/dev/null || echo 'unknown')"
}
EOF

# Upload
echo "Uploading to s3://${BACKUP_BUCKET}/${BACKUP_PATH}/"
aws s3 cp "${WORK_DIR}/" "s3://${BACKUP_BUCKET}/${BACKUP_PATH}/" \
    --recursive --quiet

echo "==> Partial backup complete: s3://${BACKUP_BUCKET}/${BACKUP_PATH}/"
"""

GUIDE_RESTORE = r"""#!/bin/bash
set -euo pipefail

TINYSERVE_ROOT="${HOME}/Library/Application Support/tinyserve"
BACKUP_BUCKET="${S3_BACKUP_BUCKET:-your-bucket}"
BACKUP_PREFIX="${S3_BACKUP_PREFIX:-tinyserve-backups}"
BACKUP_TIMESTAMP="${1:-}"
BACKUP_TYPE="${2:-full}"

if [ -z "${BACKUP_TIMESTAMP}" ]; then
    echo "Usage: $0 <timestamp> [full|partial]"
    echo "Example: $0 2026-01-10T12-00-00Z full"
    exit 1
fi

BACKUP_PATH="${BACKUP_PREFIX}/${BACKUP_TYPE}/${BACKUP_TIMESTAMP}"
WORK_DIR=$(mktemp -d)

cleanup() { rm -rf "${WORK_DIR}"; }
trap cleanup EXIT

echo "==> Restoring from s3://${BACKUP_BUCKET}/${BACKUP_PATH}/"

# 1. Stop daemon
echo "Stopping tinyserved..."
launchctl unload ~/Library/LaunchAgents/dev.tinyserve.daemon.plist 2>/dev/null || true
sleep 2

# 2. Download backup
echo "Downloading backup..."
aws s3 cp "s3://${BACKUP_BUCKET}/${BACKUP_PATH}/" "${WORK_DIR}/" --recursive

# 3. Verify manifest
if [ ! -f "${WORK_DIR}/manifest.json" ]; then
    echo "ERROR: No manifest.json found in backup"
    exit 1
fi
cat "${WORK_DIR}/manifest.json"

# 4. Back up current state (just in case)
if [ -f "${TINYSERVE_ROOT}/state.db" ]; then
    echo "Backing up current state..."
    mv "${TINYSERVE_ROOT}/state.db" "${TINYSERVE_ROOT}/state.db.pre-restore"
    mv "${TINYSERVE_ROOT}/state.db-wal" "${TINYSERVE_ROOT}/state.db-wal.pre-restore" 2>/dev/null || true
fi

# 5. Restore database
echo "Restoring database..."
cp "${WORK_DIR}/state.db" "${TINYSERVE_ROOT}/state.db"

# 6. Restore configs
if [ -f "${WORK_DIR}/configs.tar.gz" ]; then
    echo "Restoring configs..."
    tar -xzf "${WORK_DIR}/configs.tar.gz" -C "${TINYSERVE_ROOT}"
fi

# 7. Restore service data (if present)
if [ -f "${WORK_DIR}/services.tar.gz" ]; then
    echo "Restoring service data..."
    tar -xzf "${WORK_DIR}/services.tar.gz" -C "${TINYSERVE_ROOT}"
fi

# 8. Load Docker images (if present)
if [ -f "${WORK_DIR}/images.tar.gz" ]; then
    echo "Loading Docker images..."
    gunzip -c "${WORK_DIR}/images.tar.gz" | docker load
fi

# 9. Restart daemon
echo "Starting tinyserved..."
launchctl load ~/Library/LaunchAgents/dev.tinyserve.daemon.plist

# 10. Verify
sleep 3
tinyserve status

echo "==> Restore complete!"
"""

# ------------------------------------------------------------------------------------------------
# The deviations, applied to the verbatim text

_ROOT_LINE = 'TINYSERVE_ROOT="${HOME}/Library/Application Support/tinyserve"\n'
_TS_LINE = 'TIMESTAMP=$(date -u +"%Y-%m-%dT%H-%M-%SZ")\n'
_STRICT_LINE = "set -euo pipefail\n"

_PATCHES: dict[str, list[tuple[str, str]]] = {
    "root": [
        (
            _ROOT_LINE,
            "# DEVIATION from the guide: TINYSERVE_ROOT may come from the environment (test roots).\n"
            'TINYSERVE_ROOT="${TINYSERVE_ROOT:-${HOME}/Library/Application Support/tinyserve}"\n',
        )
    ],
    "timestamp": [
        (
            _TS_LINE,
            "# DEVIATION from the guide: GUIDE_TIMESTAMP may pin the timestamp (tests).\n"
            'TIMESTAMP="${GUIDE_TIMESTAMP:-$(date -u +"%Y-%m-%dT%H-%M-%SZ")}"\n',
        )
    ],
    "sleep": [
        (
            _STRICT_LINE,
            _STRICT_LINE
            + "\n# DEVIATION from the guide: GUIDE_SKIP_SLEEP=1 skips the fixed sleeps (tests, benchmarks).\n"
            'sleep() { if [ "${GUIDE_SKIP_SLEEP:-0}" = 1 ]; then return 0; fi; command sleep "$@"; }\n',
        )
    ],
}

_SCRIPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "full": (GUIDE_FULL, ("sleep", "root", "timestamp")),
    "partial": (GUIDE_PARTIAL, ("root", "timestamp")),
    "restore": (GUIDE_RESTORE, ("sleep", "root")),
}


def guide_script(kind: Literal["full", "partial", "restore"]) -> str:
    """The guide's script for ``kind`` with the documented deviations applied."""
    text, patch_names = _SCRIPTS[kind]
    for name in patch_names:
        for old, new in _PATCHES[name]:
            if text.count(old) != 1:
                raise AssertionError(f"guide {kind} script: patch {name!r} expects exactly one {old!r}")
            text = text.replace(old, new)
    return text


def write_guide_scripts(directory: Path | str) -> dict[str, Path]:
    """Write the three patched scripts (executable) as the guide names them; returns kind → path."""
    names = {
        "full": "tinyserve-backup-full.sh",
        "partial": "tinyserve-backup-partial.sh",
        "restore": "tinyserve-restore.sh",
    }
    out: dict[str, Path] = {}
    for kind, name in names.items():
        p = Path(directory) / name
        p.write_text(guide_script(kind))  # type: ignore[arg-type]
        p.chmod(0o755)
        out[kind] = p
    return out


# ------------------------------------------------------------------------------------------------
# Running them


@dataclass(frozen=True)
class GuideRun:
    kind: str  # full | partial | restore
    timestamp: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def key_prefix(self, prefix: str) -> str:
        """Where the backup lives in the bucket: ``<prefix>/<kind>/<TS>/``."""
        return f"{prefix}/{self.kind}/{self.timestamp}/"


class GuideScriptError(AssertionError):
    pass


def guide_env(
    root: Path | str,
    bucket: str,
    prefix: str,
    env: Mapping[str, str] | None = None,
    *,
    timestamp: str | None = None,
    skip_sleep: bool = True,
) -> dict[str, str]:
    """The environment the scripts run with: ours, then ``env``, then the guide's variables."""
    merged = dict(os.environ)
    merged.update(env or {})
    merged["PATH"] = fake_path(merged.get("PATH", ""))
    merged["TINYSERVE_ROOT"] = str(root)
    merged["S3_BACKUP_BUCKET"] = bucket
    merged["S3_BACKUP_PREFIX"] = prefix
    merged["GUIDE_SKIP_SLEEP"] = "1" if skip_sleep else "0"
    merged.setdefault("AWS_DEFAULT_REGION", merged.get("AWS_REGION", "us-east-1"))
    merged.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # no slow instance-metadata probing
    if timestamp is not None:
        merged["GUIDE_TIMESTAMP"] = timestamp
    else:
        merged.pop("GUIDE_TIMESTAMP", None)
    return merged


_TS_RE = re.compile(r"==> Creating (?:full|partial) backup: (\S+)")
_TS_FORMAT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z")


@contextmanager
def _db_held_open(root: Path, hold: bool) -> Iterator[None]:
    """Keep a connection on state.db open (as a still-running tinyserved would).

    With it, the script's ``sqlite3`` is not the last connection, so it leaves ``state.db-wal`` in
    place.  Closing it afterwards checkpoints the WAL into the root's ``state.db`` (same content).
    """
    if not hold:
        yield
        return
    conn = sqlite3.connect(root / "state.db")
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        yield
    finally:
        conn.close()


def _prepare(kind: str, args: list[str]) -> tuple[tempfile.TemporaryDirectory[str], list[str]]:
    tmp = tempfile.TemporaryDirectory(prefix="guide-")
    script = write_guide_scripts(tmp.name)[kind]
    return tmp, ["bash", str(script), *args]


def _result(kind: str, ts: str | None, rc: int, out: str, err: str, started: float, check: bool) -> GuideRun:
    if ts is None:
        m = _TS_RE.search(out)
        ts = m.group(1) if m else ""
    run = GuideRun(kind, ts, rc, out, err, time.monotonic() - started)
    if check and rc != 0:
        raise GuideScriptError(
            f"guide {kind} script exited {rc}\n--- stdout (tail)\n{out[-2000:]}\n"
            f"--- stderr (tail)\n{err[-2000:]}"
        )
    return run


def run_guide_backup(
    kind: Kind,
    root: Path | str,
    bucket: str,
    prefix: str,
    env: Mapping[str, str] | None = None,
    *,
    timestamp: str | None = None,
    skip_sleep: bool = True,
    hold_db_open: bool = False,
    check: bool = True,
    timeout_s: float = 900.0,
) -> GuideRun:
    """Run the guide's full or partial backup script; blocks (use the async variant in event loops
    whose own servers the script talks to).  Returns the run, with the backup's timestamp."""
    if kind not in ("full", "partial"):
        raise ValueError(f"kind must be 'full' or 'partial', not {kind!r}")
    if timestamp is not None and not _TS_FORMAT.fullmatch(timestamp):
        raise ValueError(f"timestamp must look like 2026-01-10T12-00-00Z: {timestamp!r}")
    tmp, argv = _prepare(kind, [])
    started = time.monotonic()
    with tmp, _db_held_open(Path(root), hold_db_open):
        proc = subprocess.run(
            argv,
            env=guide_env(root, bucket, prefix, env, timestamp=timestamp, skip_sleep=skip_sleep),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
    return _result(kind, timestamp, proc.returncode, proc.stdout, proc.stderr, started, check)


def run_guide_restore(
    timestamp: str,
    kind: Kind,
    root: Path | str,
    bucket: str,
    prefix: str,
    env: Mapping[str, str] | None = None,
    *,
    skip_sleep: bool = True,
    check: bool = True,
    timeout_s: float = 900.0,
) -> GuideRun:
    """Run the guide's restore script: ``tinyserve-restore.sh TIMESTAMP KIND``."""
    tmp, argv = _prepare("restore", [timestamp, kind])
    started = time.monotonic()
    with tmp:
        proc = subprocess.run(
            argv,
            env=guide_env(root, bucket, prefix, env, skip_sleep=skip_sleep),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
    return _result("restore", timestamp, proc.returncode, proc.stdout, proc.stderr, started, check)


async def _run_async(argv: list[str], env: dict[str, str], timeout_s: float) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


async def run_guide_backup_async(
    kind: Kind,
    root: Path | str,
    bucket: str,
    prefix: str,
    env: Mapping[str, str] | None = None,
    *,
    timestamp: str | None = None,
    skip_sleep: bool = True,
    hold_db_open: bool = False,
    check: bool = True,
    timeout_s: float = 900.0,
) -> GuideRun:
    """``run_guide_backup`` without blocking the event loop (e.g. behind an in-loop fault proxy)."""
    if kind not in ("full", "partial"):
        raise ValueError(f"kind must be 'full' or 'partial', not {kind!r}")
    tmp, argv = _prepare(kind, [])
    started = time.monotonic()
    with tmp, _db_held_open(Path(root), hold_db_open):
        env_ = guide_env(root, bucket, prefix, env, timestamp=timestamp, skip_sleep=skip_sleep)
        rc, out, err = await _run_async(argv, env_, timeout_s)
    return _result(kind, timestamp, rc, out, err, started, check)


async def run_guide_restore_async(
    timestamp: str,
    kind: Kind,
    root: Path | str,
    bucket: str,
    prefix: str,
    env: Mapping[str, str] | None = None,
    *,
    skip_sleep: bool = True,
    check: bool = True,
    timeout_s: float = 900.0,
) -> GuideRun:
    """``run_guide_restore`` without blocking the event loop."""
    tmp, argv = _prepare("restore", [timestamp, kind])
    started = time.monotonic()
    with tmp:
        rc, out, err = await _run_async(
            argv, guide_env(root, bucket, prefix, env, skip_sleep=skip_sleep), timeout_s
        )
    return _result("restore", timestamp, rc, out, err, started, check)
