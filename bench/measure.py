"""Run one command and measure what it costs: wall time, CPU, peak memory, temporary disk.

Why each figure is taken the way it is:

- CPU (user + sys) and the largest single process's peak RSS come from ``os.wait4`` on the
  command's own process: Linux reports there the resources of that process *and of every
  descendant it waited for* (``tar``, ``gzip``, ``aws``, ``docker save`` …), and ``ru_maxrss`` is
  the maximum over those processes, never over unrelated earlier commands (which is what
  ``getrusage(RUSAGE_CHILDREN)`` of the benchmark process would mix in).
- The peak RSS of the whole *tree* at once (a pipeline's processes added up) is sampled from
  ``/proc`` every ``interval`` seconds: a lower bound of the true peak, close for anything that
  runs longer than a few samples.
- Temporary disk is sampled the same way: the bytes under the directories the command is told
  to use for temporary files (``TMPDIR`` — ``mktemp -d`` and restic's pack files go there — and
  our tool's own ``state/tmp``), plus the largest single file seen there.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
# A temp-tree walk waits this many times its own duration before the next one (see _Sampler.sample).
WALK_BUDGET = 50


@dataclass
class TempSpec:
    """A place to watch for temporary files; ``glob`` entries are matched anew on every sample
    (restore staging directories get random names); ``skip`` names sub-directories that are not
    temporary (a staged tree that becomes the restored root)."""

    path: Path
    glob: str | None = None
    skip: tuple[str, ...] = ()


@dataclass
class Result:
    label: str
    argv: list[str]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    max_rss_bytes: int  # largest single process (wait4 ru_maxrss)
    tree_rss_peak_bytes: int  # sampled sum over the process tree
    temp_peak_bytes: int
    temp_max_file_bytes: int
    samples: int
    stdout: str = ""
    stderr: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def tree(pid: int) -> list[int]:
    seen = [pid]
    i = 0
    while i < len(seen):
        seen.extend(c for c in _children(seen[i]) if c not in seen)
        i += 1
    return seen


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of one process."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def cpu_ticks(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _walk_size(top: Path, skip: tuple[str, ...]) -> tuple[int, int]:
    total = biggest = 0
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        if d == top and e.name in skip:
                            continue
                        stack.append(Path(e.path))
                    elif e.is_file(follow_symlinks=False):
                        n = e.stat(follow_symlinks=False).st_size
                        total += n
                        biggest = max(biggest, n)
                except OSError:
                    pass
    return total, biggest


def temp_usage(specs: Iterable[TempSpec]) -> tuple[int, int]:
    total = biggest = 0
    for s in specs:
        tops = sorted(s.path.glob(s.glob)) if s.glob else [s.path]
        for top in tops:
            t, b = _walk_size(top, s.skip)
            total += t
            biggest = max(biggest, b)
    return total, biggest


class _Sampler(threading.Thread):
    def __init__(self, pid: int, temps: Sequence[TempSpec], interval: float) -> None:
        super().__init__(daemon=True, name="bench-sampler")
        self.pid = pid
        self.temps = temps
        self.interval = interval
        self.stop_ev = threading.Event()
        self.rss_peak = 0
        self.temp_peak = 0
        self.temp_file_peak = 0
        self.samples = 0
        self.next_walk = 0.0

    def sample(self) -> None:
        rss = sum(rss_bytes(p) for p in tree(self.pid))
        self.rss_peak = max(self.rss_peak, rss)
        now = time.monotonic()
        if self.temps and now >= self.next_walk:
            total, biggest = temp_usage(self.temps)
            self.temp_peak = max(self.temp_peak, total)
            self.temp_file_peak = max(self.temp_file_peak, biggest)
            # Walking a restore's staging tree (~1,700 files) took 7-37 ms: every 0.1 s, that CPU
            # was taken from the command measured on these 2 cores. Walks now use at most ~2% of one.
            self.next_walk = now + max(self.interval, WALK_BUDGET * (time.monotonic() - now))
        self.samples += 1

    def run(self) -> None:
        while not self.stop_ev.wait(self.interval):
            self.sample()


def run(
    label: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    temps: Sequence[TempSpec] = (),
    cwd: str | Path | None = None,
    timeout_s: float = 3600.0,
    interval: float = 0.1,
    log_dir: Path | None = None,
) -> Result:
    """Run ``argv`` to completion (stdout/stderr to files, stdin closed) and measure it."""
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    log_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
    out_path, err_path = log_dir / f"{safe}.out", log_dir / f"{safe}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
        sampler = _Sampler(proc.pid, temps, interval)
        sampler.sample()
        sampler.start()
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            _pid, status, ru = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop_ev.set()
        sampler.join()
    return Result(
        label=label,
        argv=list(argv),
        returncode=proc.returncode,
        wall_s=wall,
        user_s=ru.ru_utime,
        sys_s=ru.ru_stime,
        max_rss_bytes=ru.ru_maxrss * 1024,
        tree_rss_peak_bytes=sampler.rss_peak,
        temp_peak_bytes=sampler.temp_peak,
        temp_max_file_bytes=sampler.temp_file_peak,
        samples=sampler.samples,
        stdout=out_path.read_text(errors="replace")[-4000:],
        stderr=err_path.read_text(errors="replace")[-4000:],
    )
