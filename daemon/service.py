"""Stopping and starting tinyserved around a restore, and asking tinyserve about itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from pathlib import Path

import structlog

from . import status
from .errors import ServiceControlError

log = structlog.get_logger(__name__)

# Between two `tinyserve status` calls while waiting for tinyserved to come up. There is no event to
# wait on (launchd starts it and returns); the wait is bounded by `tinyserved.ready_seconds`.
READY_POLL_S = 0.5
READY_MIN_CALL_S = 5.0
# Between two looks at who still has state.db open after a stop (bounded by the stop's timeout).
RELEASE_POLL_S = 0.25
# The least time one look may take (lsof on a Mac with many processes takes a fraction of it).
HOLDERS_MIN_S = 10.0


async def run_command(
    argv: list[str] | str, *, timeout_s: float, what: str, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run a configured command (argv list, or a string for `sh -c`); returns (code, output tail)."""
    if isinstance(argv, str):
        cmd = ["/bin/sh", "-c", argv]
    else:
        cmd = list(argv)
    if not cmd:
        return 0, ""
    if not await asyncio.to_thread(_resolvable, cmd[0]):
        raise ServiceControlError(
            f"{what}: command {cmd[0]!r} not found", f"install it or fix the {what} command"
        )
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        await _kill(proc)
        raise ServiceControlError(f"{what} did not finish within {timeout_s:.0f} s") from None
    except asyncio.CancelledError:
        await _kill(proc)
        raise
    text = out.decode(errors="replace").strip()
    return proc.returncode or 0, text[-2000:]


async def _kill(proc: asyncio.subprocess.Process) -> None:
    # It may have exited just now, between its last output and the cancellation: kill() would then
    # raise ProcessLookupError instead of letting the cancellation through.
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


def _resolvable(program: str) -> bool:
    return shutil.which(program) is not None or os.path.exists(program)


class Tinyserved:
    """tinyserved as the config describes it (argv lists; empty means nothing to do)."""

    def __init__(
        self,
        stop: list[str],
        start: list[str],
        status: list[str],
        timeout: float = 60,
        ready_seconds: float = 30,
    ) -> None:
        self.stop_cmd = stop
        self.start_cmd = start
        self.status_cmd = status
        self.timeout = timeout
        self.ready_seconds = ready_seconds

    @classmethod
    def from_config(cls, cfg: object) -> Tinyserved:
        t = cfg.tinyserved  # type: ignore[attr-defined]
        return cls(t.stop, t.start, t.status, t.timeout_seconds, t.ready_seconds)

    async def stop(self) -> None:
        if not self.stop_cmd:
            log.info("tinyserved_stop_skipped", reason="no stop command configured")
            return
        code, out = await run_command(self.stop_cmd, timeout_s=self.timeout, what="tinyserved.stop")
        # launchctl bootout of a service that is not loaded fails; that is the state we want.
        if code != 0:
            log.warning("tinyserved_stop_nonzero", code=code, output=out[-300:])
        else:
            log.info("tinyserved_stopped")

    async def wait_released(self, db: Path) -> None:
        """Return once no other program has ``db`` (or its -wal/-shm) open; else ServiceControlError.

        A stop command's exit code says little: `launchctl bootout` fails for a service that is not
        loaded (fine) and for one it could not stop (not fine), and a real process may take a moment
        to exit after a successful one. Swapping a database that a running tinyserved still writes
        would lose those writes and leave tinyserved on the old file, so the restore asks the system
        instead. With a stop command it waits up to that command's timeout for the holders to exit;
        without one nobody is stopping them, so it looks once.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if self.stop_cmd else 0)
        waiting = False
        while True:
            remaining = deadline - loop.time()
            held = await holders(db_files(db), ours(db.parent), limit_s=max(remaining, HOLDERS_MIN_S))
            if not held:  # none, or no way to tell (warned)
                if waiting:
                    log.info("tinyserved_released", db=str(db))
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                if self.stop_cmd:
                    problem = f"{db.name} is still open by {_who(held)} after `tinyserved.stop`"
                else:
                    problem = f"{db.name} is open by {_who(held)} and no `tinyserved.stop` is configured"
                raise ServiceControlError(
                    f"{problem}; the restore changed nothing",
                    "stop that program (or fix `tinyserved.stop` in the config) and run the restore again",
                )
            if not waiting:
                log.info("tinyserved_stop_waiting", db=str(db), holders=_who(held))
                waiting = True
            await asyncio.sleep(min(RELEASE_POLL_S, remaining))

    async def check_not_reopened(self, aside: Path, root: Path | None = None) -> None:
        """After the renames: fail (to be rolled back) if something opened the old database (now
        ``aside``; in ``root``, by default beside it) between the last look and the rename, e.g. a
        service manager starting tinyserved again."""
        held = await holders(db_files(aside), ours(root or aside.parent), limit_s=HOLDERS_MIN_S)
        if held:
            raise ServiceControlError(
                f"{_who(held)} opened state.db while the restore replaced it; everything was put back",
                "make sure tinyserved stays stopped (check `tinyserved.stop`) and run the restore again",
            )

    async def start(self) -> None:
        if not self.start_cmd:
            log.info("tinyserved_start_skipped", reason="no start command configured")
            return
        code, out = await run_command(self.start_cmd, timeout_s=self.timeout, what="tinyserved.start")
        if code != 0:
            raise ServiceControlError(
                f"tinyserved.start exited with {code}: {out[-200:]}",
                "start tinyserved by hand and check `tinyserved.start` in the config",
            )
        log.info("tinyserved_started")

    async def status(self, limit_s: float | None = None) -> tuple[bool, str]:
        """Run `tinyserve status` when it exists, within ``limit_s`` (default: the timeout); (ok, output)."""
        if not self.status_cmd or shutil.which(self.status_cmd[0]) is None:
            return True, "tinyserve CLI not found; status not checked"
        limit = self.timeout if limit_s is None else limit_s
        try:
            code, out = await run_command(self.status_cmd, timeout_s=limit, what="tinyserve status")
        except ServiceControlError as exc:
            return False, exc.message
        return code == 0, out

    async def wait_ready(self) -> tuple[bool, str]:
        """`status` until it reports tinyserved up, for at most ``ready_seconds``; (ok, output).

        Right after a start, launchd has only just launched tinyserved: one status call then would
        report it down (the guide sleeps 3 s before asking). Asking again until it answers ok costs
        nothing when tinyserved is quick, and a real problem is still reported once the time is up.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_seconds
        tries = 0
        while True:
            # A hanging status call may not stretch the wait past the deadline by more than a
            # few seconds (the first call gets at least those, however short ready_seconds is).
            limit = min(self.timeout, max(deadline - loop.time(), READY_MIN_CALL_S))
            ok, out = await self.status(limit)
            tries += 1
            if ok or loop.time() + READY_POLL_S > deadline:
                if tries > 1:
                    log.info("tinyserved_ready" if ok else "tinyserved_not_ready", status_calls=tries)
                return ok, out
            await asyncio.sleep(READY_POLL_S)


def db_files(db: Path) -> list[Path]:
    """A database and the files SQLite keeps beside it while it has it open."""
    return [db, *(db.with_name(db.name + side) for side in ("-wal", "-shm"))]


def _who(held: list[tuple[int, str]]) -> str:
    return ", ".join(f"pid {pid} ({cmd})" for pid, cmd in held[:3])


def ours(root: Path) -> set[int]:
    """Processes of this tool that may keep ``root``'s state.db open: this one, and its daemon.

    The daemon counts only while its status file says it runs and its pid still shows our daemon's
    command line: a stale file whose pid now belongs to another program must not hide it.
    """
    pids = {os.getpid()}
    data = status.read_status(status.status_path(root)) or {}
    pid = data.get("pid")
    if isinstance(pid, int) and data.get("state") != "stopped" and status.pid_alive(pid):
        # Unlike `status`, an unreadable command line does not count: exempting a process from
        # the holder check needs certainty.
        cmd = status.command_of(pid)
        if cmd is not None and status.is_daemon_command(cmd):
            pids.add(pid)  # the WAL shipper reopens the new file by itself
    return pids


def _proc_holders(files: list[Path], exclude: set[int]) -> list[int]:
    """Linux: every process with one of ``files`` open, by inode (renames and links included)."""
    targets = set()
    for f in files:
        with contextlib.suppress(OSError):
            st = f.stat()
            targets.add((st.st_dev, st.st_ino))
    if not targets:
        return []
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            with os.scandir(f"/proc/{name}/fd") as fds:
                for fd in fds:
                    try:
                        st = os.stat(fd.path)
                    except OSError:
                        continue  # closed meanwhile, or not a file
                    if (st.st_dev, st.st_ino) in targets:
                        found.append(int(name))
                        break
        except OSError:
            # Exited, or another user's: not seen. tinyserved runs as this user (a LaunchAgent
            # or a user unit), so its files are always readable here.
            continue
    return found


def _lsof_path() -> str | None:
    # launchd and cron give a PATH without /usr/sbin, where macOS keeps lsof.
    return shutil.which("lsof") or next(
        (p for p in ("/usr/sbin/lsof", "/usr/bin/lsof") if os.access(p, os.X_OK)), None
    )


async def _lsof_holders(files: list[Path], exclude: set[int], limit_s: float) -> list[int] | str:
    """macOS (and Linux without /proc): pids from `lsof -t`, or why it cannot tell."""
    present = [str(f) for f in files if await asyncio.to_thread(os.path.lexists, f)]
    if not present:
        return []
    lsof = await asyncio.to_thread(_lsof_path)
    if lsof is None:
        return "lsof not found"
    proc = await asyncio.create_subprocess_exec(
        lsof,
        "-w",
        "-t",
        "--",
        *present,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        await _kill(proc)
        return f"lsof did not answer within {limit_s:.0f} s"
    except asyncio.CancelledError:
        await _kill(proc)
        raise
    lines = out.decode(errors="replace").split()
    # Exit 1 with no output is lsof's "nobody has them open"; any other failure tells nothing.
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and lines):
        return f"lsof exited with {proc.returncode}"
    if not all(x.isdigit() for x in lines):
        return "lsof printed something other than pids"
    return sorted({int(x) for x in lines} - exclude)


async def holders(
    files: list[Path], exclude: set[int], *, limit_s: float = 30
) -> list[tuple[int, str]] | None:
    """(pid, command) of every other process with one of ``files`` open; None when it cannot tell
    (logged as a warning: the restore then relies on the stop command alone)."""
    if sys.platform == "linux" and await asyncio.to_thread(os.path.isdir, "/proc/self/fd"):
        pids: list[int] | str = await asyncio.to_thread(_proc_holders, files, exclude)
    else:
        pids = await _lsof_holders(files, exclude, limit_s)
    if isinstance(pids, str):
        log.warning("holder_check_unavailable", reason=pids, fix="install lsof, or check by hand")
        return None
    out = []
    for pid in pids:
        cmd = await asyncio.to_thread(status.command_of, pid)
        if cmd is not None or status.pid_alive(pid):
            out.append((pid, (cmd or "?").strip()[:80]))
    return out


async def tinyserve_version() -> str:
    if shutil.which("tinyserve") is None:
        return "unknown"
    try:
        code, out = await run_command(["tinyserve", "version"], timeout_s=10, what="tinyserve version")
    except ServiceControlError:
        return "unknown"
    return out.splitlines()[0][:100] if code == 0 and out else "unknown"
