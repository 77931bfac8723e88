"""What age encryption costs a full backup: throughput with and without it, same data, same run.

Builds one tinyserve root (``make_root``: state.db, configs, three services, three Docker images in
the stand-in store), then runs full backups alternately without and with ``encryption.recipients``
set, to a local ``file://`` destination (the fastest sink, so the crypto share is the largest) or,
with ``--s3``, to the moto S3 server the test suite uses.  Alternating and taking medians keeps a
noisy neighbour from favouring one side.  Prints the median throughput of each (source bytes per
second, the same numerator for both) and the overhead ``1 - encrypted / plain``; issue 8 allows
at most 20 %.  CPU seconds (all threads and waited-for children) are printed too: on a busy
machine they vary less than wall time.  Also prints the bare ``encrypt_stream`` rate.

    python -m bench.crypto_bench [--size 512MB] [--runs 3] [--s3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from daemon.backup import BackupJob, tree_size  # noqa: E402
from daemon.config import parse_config  # noqa: E402
from daemon.crypto import Encryptor, StreamStats, generate_keypair  # noqa: E402
from daemon.logs import setup_logging  # noqa: E402
from daemon.storage import LocalStorage, Storage  # noqa: E402
from tests.helpers.rootfactory import FAKES_DIR, make_root  # noqa: E402

MiB = 1024 * 1024


def _cpu() -> float:
    """CPU seconds of this process (every thread) and of the children it waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


async def _one(
    cfg_text: str, storage: Storage, encryptor: Encryptor | None, when: datetime
) -> tuple[float, float]:
    cfg = parse_config(cfg_text)
    c0, t0 = _cpu(), time.perf_counter()
    await BackupJob(cfg, storage, encryptor=encryptor, now=lambda: when).run("full")
    return time.perf_counter() - t0, _cpu() - c0


async def _bare_encrypt(enc: Encryptor, total: int) -> float:
    block = os.urandom(MiB)

    async def src() -> AsyncIterator[bytes]:
        for _ in range(total // MiB):
            yield block

    st = StreamStats()
    t0 = time.perf_counter()
    async for _ in enc.encrypt_stream(src(), stats=st):
        pass
    return total / (time.perf_counter() - t0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="crypto-bench-"))
    server = None
    try:
        os.environ["FAKE_DOCKER_STATE"] = str(work / "docker-state")
        os.environ["FAKE_CALLS_LOG"] = str(work / "calls.jsonl")
        os.environ["PATH"] = f"{FAKES_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
        os.environ["TINYSERVE_BACKUP_HOME"] = str(work / "home")
        setup_logging(file=work / "bench.log", console_level="warning")
        root = make_root(work / "tinyserve", size=args.size, seed=5, logs=False)
        members = ["state.db", "generated", "backups", "traefik", "cloudflared", "services"]
        src_bytes = tree_size(root.path, members)
        img_dir = work / "docker-state"
        src_bytes += tree_size(img_dir, ["."]) if img_dir.exists() else 0
        base = f"root: {root.path}\n"
        if args.s3:
            from tests.helpers.s3server import create_bucket, start_moto

            server = start_moto()
            create_bucket(server.endpoint, "bench")
            base += (
                f"destination:\n  url: s3://bench/tb\n  endpoint: {server.endpoint}\n"
                "  addressing_style: path\n"
            )
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        kp = generate_keypair()
        enc = Encryptor([kp.recipient])
        times: dict[str, list[float]] = {"plain": [], "age": []}
        cpu: dict[str, list[float]] = {"plain": [], "age": []}
        when = datetime(2026, 1, 1, tzinfo=UTC)
        for i in range(args.runs):
            # ABBA order: neither side always runs first (warm caches, thermal drift)
            order = ["plain", "age"] if i % 2 == 0 else ["age", "plain"]
            for mode in order:
                when += timedelta(minutes=1)
                if args.s3:
                    from daemon.storage import storage_from_config

                    cfg = parse_config(base)
                    async with storage_from_config(cfg) as st:
                        dt, dc = await _one(base, st, enc if mode == "age" else None, when)
                else:
                    dest = work / "dest"
                    shutil.rmtree(dest, ignore_errors=True)
                    dest.mkdir()
                    dt, dc = await _one(base, LocalStorage(dest), enc if mode == "age" else None, when)
                times[mode].append(dt)
                cpu[mode].append(dc)
                rate = src_bytes / dt / MiB
                line = f"  run {i + 1} {mode:<5} {dt:6.2f} s  {rate:7.1f} MiB/s  cpu {dc:6.2f} s"
                print(line, file=sys.stderr)
        plain = statistics.median(times["plain"])
        age = statistics.median(times["age"])
        bare = await _bare_encrypt(enc, 256 * MiB)
        return {
            "destination": "s3 (moto)" if args.s3 else "local",
            "source_bytes": src_bytes,
            "runs": args.runs,
            "plain_s": round(plain, 3),
            "age_s": round(age, 3),
            "plain_mib_s": round(src_bytes / plain / MiB, 1),
            "age_mib_s": round(src_bytes / age / MiB, 1),
            "overhead_pct": round((1 - plain / age) * 100, 1),
            "plain_cpu_s": round(statistics.median(cpu["plain"]), 3),
            "age_cpu_s": round(statistics.median(cpu["age"]), 3),
            "cpu_overhead_pct": round(
                (statistics.median(cpu["age"]) / statistics.median(cpu["plain"]) - 1) * 100, 1
            ),
            "bare_encrypt_mib_s": round(bare / MiB, 1),
            "cpus": os.cpu_count(),
        }
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="512MB", help="root size for make_root (default 512MB)")
    ap.add_argument("--runs", type=int, default=3, help="backups of each kind (default 3)")
    ap.add_argument("--s3", action="store_true", help="back up to the moto S3 server instead of a local dir")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    res = asyncio.run(run(args))
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(
        f"full backup of {res['source_bytes'] / MiB:.0f} MiB to {res['destination']}, "
        f"median of {res['runs']}:\n"
        f"  without encryption  {res['plain_s']:7.2f} s  {res['plain_mib_s']:7.1f} MiB/s\n"
        f"  with age            {res['age_s']:7.2f} s  {res['age_mib_s']:7.1f} MiB/s\n"
        f"  throughput cost     {res['overhead_pct']:6.1f} %  (issue 8 budget: 20 %)\n"
        f"  CPU time            {res['plain_cpu_s']:7.2f} s → {res['age_cpu_s']:.2f} s "
        f"(+{res['cpu_overhead_pct']:.1f} %)\n"
        f"  bare encrypt_stream {res['bare_encrypt_mib_s']:7.1f} MiB/s on {res['cpus']} CPUs"
    )


if __name__ == "__main__":
    main()
