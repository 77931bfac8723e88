"""Test helper processes for WAL shipping, and what tests need to check their results.

``python -m tests.helpers.writer write DB LOG ...`` runs a writer *process*: random transactions
(inserts, updates, deletes, big rows that churn overflow pages, an occasional VACUUM and an
occasional app-forced ``wal_checkpoint(TRUNCATE)``), every one logged to LOG as a JSON line with
its statements and the wall-clock times just before BEGIN and just after COMMIT.  Replaying the
log (:func:`replay`) rebuilds the database as of any commit, so a test can compare a restore with
exactly what the application had committed.

``python -m tests.helpers.writer hold DB READY [--linger-until FILE]`` is a stand-in tinyserved: it
keeps DB open (one committed row ``held``), touches READY, and on SIGTERM (like a service shutting
down slowly) waits for FILE to exist if given, commits ``left`` and exits.

``python -m tests.helpers.writer ship DB SPOOL (--dir D | --s3 ENDPOINT BUCKET PREFIX)`` runs a
WAL shipper in its own process, so a test can ``kill -9`` it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sqlite3
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from daemon.storage import Storage

SCHEMA = [
    "CREATE TABLE kv (k TEXT PRIMARY KEY, v BLOB, n INTEGER)",
    "CREATE TABLE events (id INTEGER PRIMARY KEY, at REAL, payload TEXT)",
    "CREATE INDEX events_at ON events (at)",
]


def init_db(path: Path | str, *, wal: bool = True) -> None:
    """Create the test schema (the state every log replays from)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        if wal:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN")
        for sql in SCHEMA:
            conn.execute(sql)
        conn.execute("COMMIT")
    finally:
        conn.close()


def commit_rows(db: Path | str, start: int, n: int, size: int = 500) -> None:
    """Commit rows r<start>…r<start+n-1> into ``kv``, one transaction each."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        for i in range(start, start + n):
            conn.execute("INSERT INTO kv (k, v, n) VALUES (?, randomblob(?), ?)", (f"r{i}", size, i))
    finally:
        conn.close()


def _enc(p: Any) -> Any:
    return {"hex": p.hex()} if isinstance(p, bytes) else p


def _dec(p: Any) -> Any:
    return bytes.fromhex(p["hex"]) if isinstance(p, dict) else p


class _Workload:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.keys: list[str] = []
        self.big: list[str] = []
        self.n = 0

    def transaction(self) -> list[tuple[str, list[Any]]]:
        r = self.rng
        ops: list[tuple[str, list[Any]]] = []
        for _ in range(r.randint(1, 6)):
            self.n += 1
            roll = r.random()
            if roll < 0.35 or not self.keys:
                k = f"k{self.n}"
                self.keys.append(k)
                ops.append(
                    (
                        "INSERT INTO kv (k, v, n) VALUES (?, ?, ?)",
                        [k, r.randbytes(r.randint(10, 600)), self.n],
                    )
                )
            elif roll < 0.6:
                ops.append(
                    (
                        "UPDATE kv SET v = ?, n = n + 1 WHERE k = ?",
                        [r.randbytes(r.randint(10, 900)), r.choice(self.keys)],
                    )
                )
            elif roll < 0.72:
                k = self.keys.pop(r.randrange(len(self.keys)))
                ops.append(("DELETE FROM kv WHERE k = ?", [k]))
            elif roll < 0.8:
                # Page churn: rows over several overflow pages, freed again later.
                k = f"big{self.n}"
                self.big.append(k)
                ops.append(
                    (
                        "INSERT INTO kv (k, v, n) VALUES (?, ?, ?)",
                        [k, r.randbytes(r.randint(5000, 40000)), self.n],
                    )
                )
            elif roll < 0.86 and self.big:
                ops.append(("DELETE FROM kv WHERE k = ?", [self.big.pop(0)]))
            else:
                ops.append(
                    (
                        "INSERT INTO events (at, payload) VALUES (?, ?)",
                        [self.n / 7.0, "e" * r.randint(1, 300)],
                    )
                )
        return ops


def write(args: argparse.Namespace) -> int:
    conn = sqlite3.connect(args.db, isolation_level=None, timeout=10)
    conn.execute("PRAGMA busy_timeout=10000")
    work = _Workload(args.seed)
    rng = random.Random(args.seed + 1)
    stop_file = Path(args.stop_file) if args.stop_file else None
    deadline = time.monotonic() + args.duration if args.duration else None
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    stopping = False

    def on_term(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    with open(args.log, "a", buffering=1) as log:
        i = 0
        while not stopping:
            if args.count and i >= args.count:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            if stop_file is not None and stop_file.exists():
                break
            i += 1
            ops = work.transaction()
            vacuum = args.vacuum_every and i % args.vacuum_every == 0
            t0 = time.time()
            if vacuum:
                # VACUUM is its own transaction and rewrites (and usually shrinks) the file.
                conn.execute("VACUUM")
                ops = [("VACUUM", [])]
            else:
                conn.execute("BEGIN IMMEDIATE")
                for sql, params in ops:
                    conn.execute(sql, params)
                conn.execute("COMMIT")
            t1 = time.time()
            log.write(
                json.dumps({"i": i, "t0": t0, "t1": t1, "ops": [[s, [_enc(p) for p in ps]] for s, ps in ops]})
                + "\n"
            )
            if args.checkpoint_every and i % args.checkpoint_every == 0:
                # What an application may do on its own; with our reader pinning the WAL it
                # mostly cannot complete, and it must not wait long for us.
                conn.execute("PRAGMA busy_timeout=0")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                conn.execute("PRAGMA busy_timeout=10000")
            if args.pause_every and i % args.pause_every == 0:
                time.sleep(args.pause)
            elif interval:
                time.sleep(rng.uniform(0, 2 * interval))
    conn.close()
    return 0


def hold(args: argparse.Namespace) -> int:
    # Blocked, then waited for: a SIGTERM arriving before the wait is not lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    conn = sqlite3.connect(args.db, isolation_level=None, timeout=10)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS holder (what TEXT, at REAL)")
    conn.execute("INSERT INTO holder VALUES ('held', ?)", (time.time(),))
    Path(args.ready).touch()
    signal.sigwait({signal.SIGTERM})
    if args.linger_until:
        deadline = time.monotonic() + 30
        while not os.path.exists(args.linger_until) and time.monotonic() < deadline:
            time.sleep(0.01)
    conn.execute("INSERT INTO holder VALUES ('left', ?)", (time.time(),))
    conn.close()
    return 0


def read_log(path: Path | str) -> list[dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            if line.endswith("\n"):  # a line cut by kill -9 never committed as far as we know
                out.append(json.loads(line))
    return out


def replay(
    entries: Iterable[dict[str, Any]], into: sqlite3.Connection | None = None, *, init: bool = True
) -> sqlite3.Connection:
    """Apply logged transactions to a fresh in-memory database (schema from :data:`SCHEMA`)."""
    conn = into or sqlite3.connect(":memory:", isolation_level=None)
    if init and into is None:
        for sql in SCHEMA:
            conn.execute(sql)
    for e in entries:
        ops = e["ops"]
        if ops and ops[0][0] == "VACUUM":
            continue
        conn.execute("BEGIN")
        for sql, params in ops:
            conn.execute(sql, [_dec(p) for p in params])
        conn.execute("COMMIT")
    return conn


def logical_dump(db: sqlite3.Connection | Path | str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, order-independent: two databases with equal dumps hold the same
    data whatever their page layout."""
    conn = db if isinstance(db, sqlite3.Connection) else sqlite3.connect(db)
    try:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        return {t: sorted(conn.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}
    finally:
        if not isinstance(db, sqlite3.Connection):
            conn.close()


class RecordingStorage(Storage):
    """Wraps a real Storage and records every request (and when each put finished).

    Not a mock: every call goes to the wrapped storage; this only watches.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.url = inner.url
        self.part_size = inner.part_size
        self.calls: list[tuple[str, str]] = []
        self.put_done: dict[str, float] = {}

    async def put_bytes(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> None:
        self.calls.append(("put", key))
        await self.inner.put_bytes(key, data, if_none_match=if_none_match, if_match=if_match)
        self.put_done[key] = time.time()

    async def get_bytes(self, key: str) -> bytes:
        self.calls.append(("get", key))
        return bytes(await self.inner.get_bytes(key))

    async def get_versioned(self, key: str) -> tuple[bytes, str]:
        self.calls.append(("get", key))
        data, version = await self.inner.get_versioned(key)
        return bytes(data), str(version)

    async def delete_if_match(self, key: str, version: str) -> None:
        self.calls.append(("delete", key))
        await self.inner.delete_if_match(key, version)

    async def head(self, key: str) -> Any:
        self.calls.append(("head", key))
        return await self.inner.head(key)

    async def upload_stream(self, key: str, chunks: Any) -> Any:
        self.calls.append(("upload", key))
        r = await self.inner.upload_stream(key, chunks)
        self.put_done[key] = time.time()
        return r

    def download_stream(self, key: str) -> Any:
        self.calls.append(("download", key))
        return self.inner.download_stream(key)

    async def list(self, prefix: str) -> Any:
        self.calls.append(("list", prefix))
        return await self.inner.list(prefix)

    async def list_dirs(self, prefix: str) -> Any:
        self.calls.append(("list_dirs", prefix))
        return await self.inner.list_dirs(prefix)

    async def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self.calls.append(("delete", ",".join(keys)))
        await self.inner.delete_many(keys)

    async def list_multipart_uploads(self) -> Any:
        self.calls.append(("list_multipart_uploads", ""))
        return await self.inner.list_multipart_uploads()

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        self.calls.append(("abort_multipart", key))
        await self.inner.abort_multipart(key, upload_id)

    async def close(self) -> None:
        await self.inner.close()


def fast_options(**kw: Any) -> Any:
    """Shipper options scaled down for tests (short intervals, quick retries)."""
    from daemon.wal import WalOptions

    base: dict[str, Any] = {
        "poll_interval": 0.2,
        "debounce": 0.02,
        "segment_interval": 0.05,
        "retry_base": 0.05,
        "retry_max": 0.3,
        "lease_ttl": 30.0,
        "stop_timeout": 5.0,
    }
    base.update(kw)
    return WalOptions(**base)


async def _ship(args: argparse.Namespace) -> int:
    from daemon.storage import LocalStorage, RetryPolicy, S3Settings, S3Storage
    from daemon.wal import WalOptions, WalShipper

    storage: Storage
    if args.dir:
        storage = LocalStorage(Path(args.dir))
    else:
        endpoint, bucket, prefix = args.s3
        storage = S3Storage(
            S3Settings(
                bucket=bucket,
                prefix=prefix,
                endpoint=endpoint,
                region="us-east-1",
                addressing_style="path",
                access_key_id="testing",
                secret_access_key="testing",
                retry=RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.3),
                connect_timeout=2.0,
                read_timeout=5.0,
            )
        )
    opts = WalOptions(poll_interval=0.5, checkpoint_pages=args.checkpoint_pages, retry_max=0.5, lease_ttl=30)
    from daemon.errors import BackupError

    shipper = WalShipper(Path(args.db), storage, Path(args.spool), opts)
    try:
        await shipper.start()
    except BackupError as e:  # like the CLI: one line on stderr, the error's exit code
        print(f"error: {e.one_line()}", file=sys.stderr, flush=True)
        await storage.close()
        return e.exit_code
    print(f"READY {shipper.status()['generation']}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await shipper.stop()
    await storage.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="writer")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("db")
    w.add_argument("log")
    w.add_argument("--seed", type=int, default=1)
    w.add_argument("--count", type=int, default=0)
    w.add_argument("--duration", type=float, default=0.0)
    w.add_argument("--rate", type=float, default=50.0, help="average commits per second")
    w.add_argument("--checkpoint-every", type=int, default=0)
    w.add_argument("--vacuum-every", type=int, default=0)
    w.add_argument("--pause-every", type=int, default=0)
    w.add_argument("--pause", type=float, default=0.5)
    w.add_argument("--stop-file", default="")
    h = sub.add_parser("hold")
    h.add_argument("db")
    h.add_argument("ready")
    h.add_argument("--linger-until", default="")
    s = sub.add_parser("ship")
    s.add_argument("db")
    s.add_argument("spool")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--dir")
    g.add_argument("--s3", nargs=3, metavar=("ENDPOINT", "BUCKET", "PREFIX"))
    s.add_argument("--checkpoint-pages", type=int, default=1000)
    args = p.parse_args(argv)
    if args.cmd == "write":
        return write(args)
    if args.cmd == "hold":
        return hold(args)
    return asyncio.run(_ship(args))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
