"""A writer process for the WAL benchmark: paced single-row commits, each commit time recorded.

``python -m bench.walwriter DB LOG --rate R --duration S`` commits one small row per transaction
into the ``bench_commits`` table at R commits/s (paced against a schedule, not by sleeping a fixed
interval, so slow commits do not lower the rate unless the machine really cannot keep up) and
writes one line per commit to LOG: ``<seq> <t_commit>`` where ``t_commit`` is ``time.time()`` right
after ``COMMIT`` returned, i.e. the moment an application would consider the change made.

``synchronous=NORMAL`` is what applications in WAL mode normally use (``FULL`` fsyncs every commit,
which on this VM's disk caps the rate well below 1000/s); the shipper reads the ``-wal`` file either
way.  The table is created with :func:`prepare` before the shipper starts, so only these commits
follow the shipper's snapshot.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from pathlib import Path

TABLE = "bench_commits"


def prepare(db: Path | str) -> None:
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (seq INTEGER PRIMARY KEY, t REAL, pad BLOB)")
    finally:
        conn.close()


def write(db: str, log: str, rate: float, duration: float, start_seq: int) -> int:
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA synchronous=NORMAL")
    lines: list[str] = []
    t0 = time.monotonic()
    n = int(rate * duration)
    seq = start_seq
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        seq += 1
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"INSERT INTO {TABLE} VALUES (?, ?, ?)", (seq, time.time(), os.urandom(64)))
        conn.execute("COMMIT")
        lines.append(f"{seq} {time.time():.6f}\n")
    elapsed = time.monotonic() - t0
    conn.close()
    with open(log, "w") as f:
        f.writelines(lines)
        f.write(f"# elapsed {elapsed:.6f}\n")
    return 0


def read_log(path: Path | str) -> tuple[list[tuple[int, float]], float]:
    commits: list[tuple[int, float]] = []
    elapsed = 0.0
    for line in Path(path).read_text().splitlines():
        if line.startswith("# elapsed"):
            elapsed = float(line.split()[2])
        elif line.strip():
            s, t = line.split()
            commits.append((int(s), float(t)))
    return commits, elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.walwriter")
    p.add_argument("db")
    p.add_argument("log")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--start-seq", type=int, default=0)
    a = p.parse_args(argv)
    return write(a.db, a.log, a.rate, a.duration, a.start_seq)


if __name__ == "__main__":
    sys.exit(main())
