"""The daemon's status file and `tinyserve-backup status`.

The daemon writes ``<state dir>/status/<root key>.json`` atomically (temp + fsync + rename) when
something changes; the CLI reads it and checks that the pid it names is alive.  Times are UTC
RFC 3339; ages and uptime are recomputed by the reader, so a status written an hour ago still
reads true.  Nothing secret goes in: no credentials, no alert URLs, errors masked like the log.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import paths
from .scheduler import atomic_write_json, parse_time

STATUS_VERSION = 1


def status_path(root: Path) -> Path:
    return paths.state_dir() / "status" / f"{paths.root_key(root)}.json"


def write_status(path: Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data)


def read_status(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"unreadable": True}
    return data if isinstance(data, dict) else {"unreadable": True}


def pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def command_of(pid: int) -> str | None:
    """The command line of ``pid`` (None if it cannot be read)."""
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.exists():
        try:
            return proc.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return None
    try:
        import subprocess

        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def is_daemon_command(cmd: str) -> bool:
    """``cmd`` runs this tool's daemon: ``tinyserve-backup … run`` or ``python -m daemon … run``.

    Matched word by word: a recycled pid whose program merely has "daemon" or "run" somewhere in
    its name or arguments is not ours.
    """
    words = cmd.split()
    if "run" not in words:
        return False
    if any(os.path.basename(w) == "tinyserve-backup" for w in words):
        return True
    return any(a == "-m" and b == "daemon" for a, b in itertools.pairwise(words))


def daemon_alive(pid: Any) -> bool:
    """``pid`` is alive and still looks like our daemon (a recycled pid does not count)."""
    if not pid_alive(pid):
        return False
    cmd = command_of(int(pid))
    if cmd is None:
        return True  # cannot tell; the pid exists
    return is_daemon_command(cmd)


def _age(t: Any, now: datetime) -> float | None:
    when = parse_time(t)
    return round((now - when).total_seconds(), 1) if when else None


def describe(data: dict[str, Any] | None, path: Path, now: datetime | None = None) -> dict[str, Any]:
    """The status file plus what only the reader can know: is the pid alive, ages, uptime."""
    now = now or datetime.now(UTC)
    if data is None:
        return {"daemon": "never run", "running": False, "status_file": str(path)}
    if data.get("unreadable"):
        return {"daemon": "unknown (status file unreadable)", "running": False, "status_file": str(path)}
    out = dict(data)
    out["status_file"] = str(path)
    alive = data.get("state") != "stopped" and daemon_alive(data.get("pid"))
    out["running"] = alive
    if alive:
        out["daemon"] = "running"
        started = parse_time(data.get("started_at"))
        out["uptime_s"] = round((now - started).total_seconds(), 1) if started else None
    else:
        when = data.get("stopped_at") or data.get("updated_at")
        how = "stopped at" if data.get("state") == "stopped" else "stale status from"
        out["daemon"] = f"not running ({how} {when})"
        out["uptime_s"] = None
    jobs = out.get("jobs") or {}
    for job in jobs.values():
        for key in ("last_success", "last_failure"):
            entry = job.get(key)
            if isinstance(entry, dict):
                entry["age_s"] = _age(entry.get("at"), now)
    return out


def _human_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = abs(seconds)
    if s < 90:
        text = f"{s:.0f} s"
    elif s < 90 * 60:
        text = f"{s / 60:.0f} min"
    elif s < 48 * 3600:
        text = f"{s / 3600:.1f} h"
    else:
        text = f"{s / 86400:.1f} d"
    return text + (" ago" if seconds >= 0 else " from now")


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _size(n: Any) -> str:
    return human_size(float(n)) if isinstance(n, int | float) else "?"


def render_human(d: dict[str, Any], now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    lines: list[str] = []
    if d.get("daemon") == "never run":
        return (
            "The daemon has not run for this root yet (no status file at "
            f"{d.get('status_file')}).\nStart it with `tinyserve-backup run` or `make install-agent`."
        )
    head = f"daemon: {d.get('daemon')}"
    if d.get("running"):
        head += f", pid {d.get('pid')}, up {_human_age(d.get('uptime_s')).removesuffix(' ago')}"
    lines.append(head)
    lines.append(f"config: {d.get('config_path')}")
    lines.append(f"root: {d.get('root')}  →  {d.get('destination')}")
    jobs: dict[str, Any] = d.get("jobs") or {}
    for name in ("partial", "full", "services"):
        job = jobs.get(name)
        if not job:
            continue
        sched = job.get("schedule") or "off"
        lines.append(f"{name}: schedule {sched}")
        ok = job.get("last_success")
        if ok:
            lines.append(
                f"    last success {ok.get('timestamp') or ok.get('at')} ({_human_age(ok.get('age_s'))}), "
                f"{_size(ok.get('size_bytes'))} in {ok.get('duration_s', '?')} s"
            )
        else:
            lines.append("    last success: none yet")
        bad = job.get("last_failure")
        if bad:
            age = _human_age(bad.get("age_s"))
            lines.append(f"    last failure {bad.get('at')} ({age}): {bad.get('error')}")
        if job.get("running"):
            lines.append(f"    running now (since {job.get('running_since')})")
        again = job.get("retry_at")
        if again and d.get("running") and not job.get("running"):
            when = parse_time(again)
            rel = _human_age((now - when).total_seconds()) if when else "?"
            lines.append(f"    retry at {again} ({rel}), after {job.get('consecutive_failures')} failure(s)")
        nxt = job.get("next_run")
        if nxt and d.get("running"):
            when = parse_time(nxt)
            rel = _human_age((now - when).total_seconds()) if when else "?"
            lines.append(f"    next run {nxt} ({rel})")
    wal = d.get("wal") or {}
    if wal:
        state = wal.get("state", "?")
        line = f"wal: {state}"
        if wal.get("generation"):
            line += f", generation {wal.get('generation')}"
        if wal.get("lag_seconds") is not None:
            line += f", lag {wal.get('lag_seconds')} s"
        if wal.get("spool_bytes") is not None:
            line += f", spool {_size(wal.get('spool_bytes'))}"
        lines.append(line)
        for key in ("error", "last_error"):
            if wal.get(key):
                lines.append(f"    {key.replace('_', ' ')}: {wal.get(key)}")
    err = d.get("last_error")
    if err:
        lines.append(f"last error ({err.get('at')}): {err.get('message')}")
    return "\n".join(lines)


def status_command(cfg: Any, as_json: bool) -> tuple[str, int]:
    """Text to print and the exit code: 0 running, 3 not running (like LSB `status`)."""
    from .scheduler import Clock

    path = status_path(cfg.root)
    # the daemon's own clock (the same test-only offset, if one is set) so ages agree with it
    now = Clock.from_env().now()
    d = describe(read_status(path), path, now)
    kept = _restore_leftovers(cfg.root)
    if kept is not None:
        d["restore_leftovers"] = kept
    last = _last_restore(cfg.root)
    if last is not None:
        d["last_restore"] = last
    if as_json:
        text = json.dumps(d, indent=2, default=str)
    else:
        text = render_human(d, now)
        if last is not None:
            text += "\n" + _render_last_restore(last)
        if kept is not None:
            text += (
                f"\nkept by earlier restores: {kept['items']} item(s), {_size(kept['size_bytes'])}"
                " (remove with `tinyserve-backup restore --clean-up`)"
            )
    return text, (0 if d.get("running") else 3)


def _restore_leftovers(root: Path) -> dict[str, int] | None:
    """What restores kept aside under ``root`` (*.pre-restore and such), so users learn of it."""
    from .restore import restore_leftovers, tree_bytes  # (restore imports this module's users)

    try:
        found = restore_leftovers(root)
        if not found:
            return None
        return {"items": len(found), "size_bytes": sum(tree_bytes(p) for p in found)}
    except OSError:
        return None  # an unreadable root says nothing here; the other commands will


def _render_last_restore(last: dict[str, str]) -> str:
    state = last["state"]
    if state in ("swapping", "undoing"):
        what = "a restore" if state == "swapping" else "an undo of a restore"
        return (
            f"INTERRUPTED: {what} of {last['backup']} stopped half-way ({last['at']}); "
            "run `tinyserve-backup restore --undo` to put the root right"
        )
    if state == "unreadable":
        return f"restore record unreadable: {last.get('error', '?')}"
    return (
        f"last restore: {last['backup']} ({last['at']}); "
        "`tinyserve-backup restore --undo` puts back what it replaced"
    )


def _last_restore(root: Path) -> dict[str, str] | None:
    from .errors import RestoreError
    from .restore_record import read_record

    try:
        rec = read_record(root)
    except RestoreError as exc:
        return {"state": "unreadable", "backup": "?", "at": "?", "error": exc.message}
    return None if rec is None else {"state": rec.state, "backup": rec.backup, "at": rec.at}


def remove_status(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
