"""daemon.archive: streaming creation, round trips, standard tools, back-pressure, cancellation."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.archive import (
    ArchiveStats,
    Writer,
    _encode_header,
    _format_pax_time,
    archive_stream,
    extract_stream,
    test_decompress,
)
from daemon.errors import BackupError, IntegrityError
from daemon.streams import HashingStream

MiB = 1 << 20
HAVE_ZSTD_TOOLS = shutil.which("tar") is not None and shutil.which("zstd") is not None


# ----------------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything restore must keep: type, mode, mtime (ns), content, link target, hardlink group."""
    entries: dict[str, tuple[object, ...]] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    stats: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            stats[rel] = st
            if stat.S_ISREG(st.st_mode):
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
    for rel, st in stats.items():
        path = os.path.join(root, rel)
        if stat.S_ISLNK(st.st_mode):
            entries[rel] = ("symlink", os.readlink(path), st.st_mtime_ns)
        elif stat.S_ISDIR(st.st_mode):
            entries[rel] = ("dir", oct(stat.S_IMODE(st.st_mode)), st.st_mtime_ns)
        else:
            group = tuple(sorted(inodes[(st.st_dev, st.st_ino)]))
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            entries[rel] = ("file", oct(stat.S_IMODE(st.st_mode)), st.st_mtime_ns, digest, group)
    return entries


def make_tree(root: Path) -> list[str]:
    """A small tinyserve-like root with every kind of entry we must keep; returns the members."""
    gen = root / "generated"
    (gen / "empty").mkdir(parents=True)
    (gen / "docker-compose.yml").write_text("services:\n  web:\n    image: nginx:1.27\n")
    (gen / "docker-compose.yml").chmod(0o640)
    (gen / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (gen / "run.sh").chmod(0o755)
    (gen / "ro.txt").write_text("read only\n")
    (gen / "ro.txt").chmod(0o444)
    (gen / "shared.txt").write_text("group writable\n")
    (gen / "shared.txt").chmod(0o664)
    traefik = root / "traefik"
    traefik.mkdir()
    (traefik / "acme.json").write_text('{"secret": 1}')
    (traefik / "acme.json").chmod(0o600)
    svc = root / "services" / "wéb"
    (svc / "data" / "deep" / ("x" * 120)).mkdir(parents=True)  # > 100 chars: pax path header
    (svc / "data" / "deep" / ("x" * 120) / "leaf.bin").write_bytes(os.urandom(70_000))
    (svc / "日本語.txt").write_text("ユニコード\n")
    (svc / "current").symlink_to("日本語.txt")
    (svc / "dangling").symlink_to("does/not/exist")
    (svc / "up").symlink_to("../../generated/run.sh")
    os.link(svc / "日本語.txt", svc / "hard-copy.txt")
    (svc / "private").mkdir(mode=0o700)
    (svc / "private").chmod(0o700)
    (svc / "private" / "key").write_bytes(b"k" * 10)
    (svc / "locked").mkdir()
    (svc / "locked" / "inside.txt").write_text("in a read-only dir\n")
    (svc / "locked").chmod(0o555)
    big = root / "backups"
    big.mkdir()
    (big / "zeros.bin").write_bytes(bytes(3 * MiB))
    # distinct nanosecond mtimes, children before parents (creating children moves dir mtimes)
    ns = 1_700_000_000_123_456_789
    paths = sorted((p for p in root.rglob("*")), key=lambda p: len(p.parts), reverse=True)
    for i, p in enumerate(paths):
        os.utime(p, ns=(ns + i * 1_000_001, ns + i * 1_000_001), follow_symlinks=False)
    return ["generated", "traefik", "services", "backups"]


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    out = bytearray()
    async for chunk in stream:
        out += chunk
    return bytes(out)


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def workers_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("archive-")]


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, list[str]]:
    src = tmp_path / "src"
    src.mkdir()
    return src, make_tree(src)


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], int]:
    """~200 MB of incompressible data (8 MiB random block repeated beyond zstd's window)."""
    root = tmp_path_factory.mktemp("big")
    block = os.urandom(8 * MiB)
    members = []
    for i in range(5):
        with open(root / f"part{i}.bin", "wb") as f:
            for _ in range(5):
                f.write(block)
        members.append(f"part{i}.bin")
    return root, members, 25 * 8 * MiB


# ---------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("codec", ["zstd", "gzip", "none"])
async def test_round_trip_preserves_modes_mtimes_links_and_names(
    tree: tuple[Path, list[str]], tmp_path: Path, codec: str
) -> None:
    src, members = tree
    stream = archive_stream(src, members, codec=codec)  # type: ignore[arg-type]
    dest = tmp_path / "stage" / "root"
    stats = await extract_stream(stream, dest)  # piped straight through, never whole in memory
    assert stream.finished
    assert stats.codec == codec
    assert snapshot(dest) == snapshot(src)
    assert (stream.stats.files, stream.stats.links, stream.stats.dirs) == (10, 4, 11)
    assert stream.stats.skipped == [] and stream.stats.changed == []
    assert (stats.files, stats.symlinks, stats.hardlinks, stats.dirs) == (10, 3, 1, 11)
    assert stats.bytes_written == stream.stats.bytes_in
    assert workers_alive() == []


async def test_archive_is_deterministic_and_hash_matches(
    tree: tuple[Path, list[str]],
) -> None:
    src, members = tree
    first = archive_stream(src, members)
    a = await collect(first)
    second = archive_stream(src, members, threads=2, chunk_size=64 * 1024)
    b = await collect(second)
    assert a == b
    assert first.sha256 == hashlib.sha256(a).hexdigest() == second.sha256
    assert first.size == len(a)
    assert a[:4] == b"\x28\xb5\x2f\xfd"


async def test_missing_members_are_skipped_with_a_log_line(tree: tuple[Path, list[str]]) -> None:
    src, members = tree
    with capture_logs() as logs:
        stream = archive_stream(src, ["cloudflared", *members, "generated/run.sh"])
        data = await collect(stream)
    assert [s.path for s in stream.stats.skipped] == ["cloudflared"]
    assert stream.stats.skipped[0].reason == "missing"
    assert any(e["event"] == "archive_member_missing" and e["path"] == "cloudflared" for e in logs)
    # "generated/run.sh" sits inside "generated": archived once, not twice
    result = await test_decompress(chunks_of(data), "zstd")
    assert result.member_count == stream.stats.files + stream.stats.dirs + stream.stats.links


async def test_sockets_fifos_and_devices_are_skipped_with_a_log_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "svc").mkdir(parents=True)
    (src / "svc" / "keep.txt").write_text("kept")
    os.mkfifo(src / "svc" / "pipe")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(src / "svc" / "sock"))
    expected = {"svc/pipe": "fifo", "svc/sock": "socket"}
    try:
        os.mknod(src / "svc" / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        expected["svc/null"] = "char_device"
    except PermissionError:
        pass  # not root: sockets and FIFOs still cover the rule
    try:
        with capture_logs() as logs:
            stream = archive_stream(src, ["svc"])
            data = await collect(stream)
    finally:
        sock.close()
    assert {s.path: s.reason for s in stream.stats.skipped} == expected
    logged = {e["path"]: e["kind"] for e in logs if e["event"] == "archive_skipped"}
    assert logged == expected
    dest = tmp_path / "out"
    await extract_stream(chunks_of(data), dest)
    assert sorted(p.name for p in (dest / "svc").iterdir()) == ["keep.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
async def test_unreadable_file_is_skipped_and_recorded(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.txt").write_text("ok")
    (src / "secret.txt").write_text("no")
    (src / "secret.txt").chmod(0)
    with capture_logs() as logs:
        stream = archive_stream(src, ["ok.txt", "secret.txt"])
        data = await collect(stream)
    assert [(s.path, s.reason) for s in stream.stats.unreadable] == [("secret.txt", "unreadable")]
    assert any(e["event"] == "archive_unreadable" and e["log_level"] == "warning" for e in logs)
    assert (await test_decompress(chunks_of(data))).member_count == 1


async def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="not a directory"):
        await collect(archive_stream(tmp_path / "nope", ["x"]))
    with pytest.raises(ValueError):
        archive_stream(tmp_path, ["../etc"])


# ------------------------------------------------------------------------------ standard tools


def run(cmd: str, cwd: Path) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, check=True, timeout=60)


def gnu_tar_version() -> str:
    return subprocess.run(["tar", "--version"], capture_output=True, text=True).stdout.split("\n")[0]


@pytest.mark.skipif(not HAVE_ZSTD_TOOLS, reason="needs tar and zstd")
async def test_standard_tools_extract_zstd_archive(tree: tuple[Path, list[str]], tmp_path: Path) -> None:
    assert "GNU tar" in gnu_tar_version()
    src, members = tree
    archive = tmp_path / "configs.tar.zst"
    archive.write_bytes(await collect(archive_stream(src, members)))
    by_tar = tmp_path / "by_tar"
    by_tar.mkdir()
    run(f"tar --zstd -xf {archive}", by_tar)
    by_pipe = tmp_path / "by_pipe"
    by_pipe.mkdir()
    run(f"zstd -dc {archive} | tar -xf -", by_pipe)
    expected = snapshot(src)
    assert snapshot(by_tar) == expected
    assert snapshot(by_pipe) == expected


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs tar")
async def test_gzip_and_plain_archives_extract_with_tar(tree: tuple[Path, list[str]], tmp_path: Path) -> None:
    src, members = tree
    gz = tmp_path / "configs.tar.gz"
    gz.write_bytes(await collect(archive_stream(src, members, codec="gzip", level=6)))
    plain = tmp_path / "configs.tar"
    plain.write_bytes(await collect(archive_stream(src, members, codec="none")))
    for name, cmd in (("gz", f"tar -xzf {gz}"), ("plain", f"tar -xf {plain}")):
        out = tmp_path / name
        out.mkdir()
        run(cmd, out)
        assert snapshot(out) == snapshot(src)


@pytest.mark.skipif(not HAVE_ZSTD_TOOLS, reason="needs tar and zstd")
@pytest.mark.parametrize("flags", ["-czf", "--zstd -cf", "-cf"])
async def test_archives_made_by_gnu_tar_extract(
    tree: tuple[Path, list[str]], tmp_path: Path, flags: str
) -> None:
    """The guide's own backups are `tar -czf … -C root generated …`: they must restore too."""
    src, members = tree
    archive = tmp_path / "guide.tar.x"
    run(f"tar {flags} {archive} {' '.join(members)}", src)
    data = archive.read_bytes()
    dest = tmp_path / "stage"
    stats = await extract_stream(chunks_of(data), dest, codec="auto")
    assert stats.codec == {"-czf": "gzip", "--zstd -cf": "zstd", "-cf": "none"}[flags]
    # GNU tar's default format keeps whole-second mtimes only
    strip_ns = {
        k: tuple(x // 10**9 if isinstance(x, int) and x > 10**18 else x for x in v)
        for k, v in snapshot(src).items()
    }
    got = {
        k: tuple(x // 10**9 if isinstance(x, int) and x > 10**18 else x for x in v)
        for k, v in snapshot(dest).items()
    }
    assert got == strip_ns
    assert (await test_decompress(chunks_of(data))).member_count == stats.members


@pytest.mark.skipif(not HAVE_ZSTD_TOOLS, reason="needs tar")
async def test_sparse_members_from_gnu_tar_extract_exactly(tmp_path: Path) -> None:
    """`tar -S` stores holes as a map, not as data: such members take tarfile's sparse path."""
    src = tmp_path / "src"
    src.mkdir()
    body = os.urandom(70_000)
    with open(src / "disk.img", "wb") as fh:
        fh.truncate(8 * MiB)
        fh.seek(3 * MiB + 17)
        fh.write(body)
    (src / "after.txt").write_text("after the sparse one\n")
    archive = tmp_path / "sparse.tar"
    run(f"tar -cSf {archive} disk.img after.txt", src)
    data = archive.read_bytes()
    assert len(data) < 2 * MiB  # really sparse in the archive
    stats = await extract_stream(chunks_of(data), tmp_path / "out", codec="none")
    assert stats.files == 2
    got = (tmp_path / "out" / "disk.img").read_bytes()
    assert got == bytes(3 * MiB + 17) + body + bytes(5 * MiB - 17 - len(body))
    assert (tmp_path / "out" / "after.txt").read_text() == "after the sparse one\n"


async def test_archive_cut_inside_a_member_is_truncated_not_short(tmp_path: Path) -> None:
    """Member data is read straight from the decompressor: a cut there must still be caught."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(3 * MiB + 5))
    data = await collect(archive_stream(src, ["big.bin"], codec="none"))
    for cut in (2 * MiB, 3 * MiB + 512 + 3):  # inside the data, inside its last block
        with pytest.raises(IntegrityError, match="truncated"):
            await extract_stream(chunks_of(data[:cut]), tmp_path / f"out-{cut}", codec="none")


# ------------------------------------------------------------------ memory, progress, cancellation


async def test_queue_stays_bounded_on_200mb(big_tree: tuple[Path, list[str], int]) -> None:
    root, members, total = big_tree
    stream = archive_stream(root, members, queue_chunks=4)
    consumed = n = 0
    max_lag = 0
    async for chunk in stream:
        consumed += len(chunk)
        n += 1
        if n % 40 == 1 and consumed < total - 64 * MiB:
            # a stalled consumer: the worker (input left) must park on the full queue
            assert stream.queue_full is not None
            await asyncio.wait_for(stream.queue_full.wait(), 10)
            lag = stream.stats.bytes_in - consumed
            max_lag = max(max_lag, lag)
    assert stream.stats.bytes_in == total
    assert 0 < stream.max_queued <= 4
    # input read ahead of what the consumer took: queue + chunk buffer + zstd's jobs in flight
    # (~20 MiB measured with 2-4 workers); it must not depend on the data size
    assert max_lag <= 32 * MiB, max_lag
    assert stream.size == consumed


async def test_progress_is_reported_on_the_loop(tree: tuple[Path, list[str]]) -> None:
    src, members = tree
    seen: list[tuple[int, int]] = []
    stream = archive_stream(src, members, progress=lambda n: seen.append((n, threading.get_ident())))
    await collect(stream)
    assert seen and seen[-1][0] == stream.stats.bytes_in
    assert {ident for _, ident in seen} == {threading.get_ident()}
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)


async def test_cancel_mid_stream_ends_the_worker(big_tree: tuple[Path, list[str], int]) -> None:
    root, members, total = big_tree
    stream = archive_stream(root, members)
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in stream:
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    t0 = time.monotonic()
    assert await stream.wait_closed(5)
    assert time.monotonic() - t0 < 2
    assert stream.thread is not None and not stream.thread.is_alive()
    assert stream.stats.bytes_in < total
    assert not stream.finished
    with pytest.raises(RuntimeError):
        _ = stream.sha256


async def test_leaving_early_with_aclose_ends_the_worker(
    big_tree: tuple[Path, list[str], int],
) -> None:
    root, members, total = big_tree
    async with archive_stream(root, members) as stream:
        async for _ in stream:
            break
    assert stream.thread is not None and not stream.thread.is_alive()
    assert stream.stats.bytes_in < total
    # dropping an unfinished stream without aclose also frees its worker
    stream2 = archive_stream(root, members)
    await stream2.__anext__()
    thread = stream2.thread
    assert thread is not None
    del stream2
    await asyncio.wait_for(asyncio.to_thread(thread.join, 5), 10)
    assert not thread.is_alive()


async def test_extract_cancelled_or_failing_source_ends_the_worker(
    big_tree: tuple[Path, list[str], int], tmp_path: Path
) -> None:
    root, members, _ = big_tree
    fed = asyncio.Event()

    async def slow_source() -> AsyncIterator[bytes]:
        async with archive_stream(root, members, codec="none") as stream:
            async for chunk in stream:
                yield chunk
                fed.set()

    task = asyncio.create_task(extract_stream(slow_source(), tmp_path / "a"))
    await asyncio.wait_for(fed.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert workers_alive() == []

    async def broken_source() -> AsyncIterator[bytes]:
        n = 0
        async with archive_stream(root, members) as stream:
            async for chunk in stream:
                yield chunk
                n += 1
                if n == 3:
                    raise ConnectionResetError("download cut")

    with pytest.raises(ConnectionResetError):
        await extract_stream(broken_source(), tmp_path / "b")
    assert workers_alive() == []


# ------------------------------------------------------------------- files changing while read


async def archive_while_mutating(
    tmp_path: Path, mutate: Callable[[Path], None]
) -> tuple[ArchiveStats, bytes, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    original = os.urandom(16 * MiB)
    big = src / "big.bin"
    big.write_bytes(original)
    (src / "z-after.txt").write_text("after")
    # single-threaded zstd and a tiny queue: the worker parks a few MiB into big.bin
    stream = archive_stream(
        src, ["big.bin", "z-after.txt"], threads=0, level=1, chunk_size=64 * 1024, queue_chunks=2
    )
    out = bytearray(await stream.__anext__())
    assert stream.queue_full is not None
    await asyncio.wait_for(stream.queue_full.wait(), 10)
    assert stream.stats.bytes_in < 8 * MiB
    mutate(big)
    async for chunk in stream:
        out += chunk
    return stream.stats, bytes(out), original


async def extract_big(data: bytes, dest: Path) -> bytes:
    await extract_stream(chunks_of(data), dest)
    assert (dest / "z-after.txt").read_text() == "after"
    return (dest / "big.bin").read_bytes()


async def test_file_shrinking_during_read_is_flagged(tmp_path: Path) -> None:
    with capture_logs() as logs:
        stats, data, original = await archive_while_mutating(tmp_path, lambda p: os.truncate(p, 4 * MiB))
    assert [(c.path, c.reason, c.header_size) for c in stats.changed] == [("big.bin", "shrank", 16 * MiB)]
    assert any(e["event"] == "file_changed_during_read" for e in logs)
    got = await extract_big(data, tmp_path / "out")
    # consistent member: header size kept, zero padded after what could be read
    assert len(got) == 16 * MiB
    assert got[: 4 * MiB] == original[: 4 * MiB] and got[4 * MiB :] == bytes(12 * MiB)


async def test_file_growing_during_read_is_flagged(tmp_path: Path) -> None:
    def grow(p: Path) -> None:
        with open(p, "ab") as f:
            f.write(b"more" * 1000)

    stats, data, original = await archive_while_mutating(tmp_path, grow)
    assert [(c.path, c.reason) for c in stats.changed] == [("big.bin", "grew")]
    assert await extract_big(data, tmp_path / "out") == original  # cut at the header size


async def test_file_rewritten_in_place_during_read_is_flagged(tmp_path: Path) -> None:
    def rewrite(p: Path) -> None:
        fd = os.open(p, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xff" * MiB, 12 * MiB)
        finally:
            os.close(fd)
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    stats, data, _ = await archive_while_mutating(tmp_path, rewrite)
    assert [(c.path, c.reason) for c in stats.changed] == [("big.bin", "modified")]
    assert len(await extract_big(data, tmp_path / "out")) == 16 * MiB


# --------------------------------------------------------------------- verify, hashing, hooks


async def test_test_decompress_counts_and_catches_truncation(
    tree: tuple[Path, list[str]], tmp_path: Path
) -> None:
    src, members = tree
    data = await collect(archive_stream(src, members))
    stats = await extract_stream(chunks_of(data), tmp_path / "x")
    result = await test_decompress(chunks_of(data), "zstd")
    assert result == (stats.uncompressed_bytes, stats.members)
    uncompressed, count = result
    assert uncompressed % 10240 == 0 and count == stats.members
    with pytest.raises(IntegrityError, match="truncated"):
        await test_decompress(chunks_of(data[:-7]), "zstd")


class XorWriter:
    """Stand-in for the age hook: transforms bytes and must be closed to flush."""

    def __init__(self, sink: Writer) -> None:
        self.sink = sink
        self.pending = bytearray()

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        self.pending += bytes(b ^ 0x5A for b in bytes(data))
        if len(self.pending) > 4096:
            self.sink.write(bytes(self.pending))
            self.pending.clear()
        return len(data)

    def close(self) -> None:
        self.sink.write(bytes(self.pending) + b"END")
        self.sink.close()


async def test_encrypt_hook_wraps_the_compressed_stream(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello " * 1000)
    stream = archive_stream(src, ["a.txt"], encrypt=XorWriter)
    data = await collect(stream)
    assert data.endswith(b"END") and stream.sha256 == hashlib.sha256(data).hexdigest()
    plain = bytes(b ^ 0x5A for b in data[:-3])
    await extract_stream(chunks_of(plain), tmp_path / "out", codec="zstd")
    assert (tmp_path / "out" / "a.txt").read_text() == "hello " * 1000


async def test_hashing_stream_matches_hashlib() -> None:
    parts = [b"a" * 10, os.urandom(2 * MiB), b"", os.urandom(300_000), b"tail"]

    async def source() -> AsyncIterator[bytes]:
        for p in parts:
            yield p

    hs = HashingStream(source())
    with pytest.raises(RuntimeError):
        _ = hs.sha256
    got = [c async for c in hs]
    assert got == parts
    assert hs.finished and hs.size == sum(map(len, parts))
    assert hs.sha256 == hashlib.sha256(b"".join(parts)).hexdigest()


@pytest.mark.parametrize(
    ("name", "kind", "mode", "uid", "gid", "size", "mtime_ns", "link"),
    [
        ("a.txt", tarfile.REGTYPE, 0o644, 1000, 1000, 123, 1_700_000_000 * 10**9, ""),
        ("a.txt", tarfile.REGTYPE, 0o4755, 0, 0, 0, 1_700_000_000_123_456_789, ""),
        ("dir", tarfile.DIRTYPE, 0o700, 501, 20, 0, 1_700_000_000_000_000_005, ""),
        ("x" * 100, tarfile.REGTYPE, 0o644, 1, 1, 5, 1_700_000_000 * 10**9, ""),
        ("x" * 101, tarfile.REGTYPE, 0o644, 1, 1, 5, 1_700_000_000 * 10**9 + 1, ""),
        ("日本/語.txt", tarfile.SYMTYPE, 0o777, 1, 1, 0, 1_700_000_000 * 10**9, "ünï" + "y" * 200),
        ("hard", tarfile.LNKTYPE, 0o644, 1, 1, 0, 1, "a.txt"),
        ("bad\udcff", tarfile.REGTYPE, 0o644, 1, 1, 0, 1, ""),  # not UTF-8: tarfile's path
        ("big", tarfile.REGTYPE, 0o644, 3_000_000, 1, 9 * 8**11, 1, ""),
        ("old", tarfile.REGTYPE, 0o644, 1, 1, 0, -1_500_000_000, ""),
    ],
)
def test_fast_header_encoder_matches_tarfile(
    name: str, kind: bytes, mode: int, uid: int, gid: int, size: int, mtime_ns: int, link: str
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.size = kind, mode, uid, gid, size
    sec, frac = divmod(mtime_ns, 10**9)
    info.mtime, info.linkname, info.uname, info.gname = sec, link, "", ""
    if frac:
        info.pax_headers = {"mtime": _format_pax_time(mtime_ns)}
    expected = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    assert _encode_header(name, kind, mode, uid, gid, size, mtime_ns, link) == expected


@pytest.mark.skipif(os.uname().sysname == "Darwin", reason="APFS only stores UTF-8 names")
async def test_non_utf8_file_names_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    raw = os.fsencode(src / "d") + b"/caf\xe9-latin1.txt"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"bytes name")
    os.close(fd)
    data = await collect(archive_stream(src, ["d"]))
    dest = tmp_path / "out"
    await extract_stream(chunks_of(data), dest)
    assert os.listdir(os.fsencode(dest / "d")) == [b"caf\xe9-latin1.txt"]
    if HAVE_ZSTD_TOOLS:
        by_tar = tmp_path / "by_tar"
        by_tar.mkdir()
        (tmp_path / "a.tar.zst").write_bytes(data)
        run(f"tar --zstd -xf {tmp_path / 'a.tar.zst'}", by_tar)
        assert os.listdir(os.fsencode(by_tar / "d")) == [b"caf\xe9-latin1.txt"]
