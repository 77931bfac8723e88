"""The storage layer against a real S3 server (moto, own process) and a local directory."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    EndpointUnreachableError,
    ObjectNotFoundError,
    PreconditionFailedError,
    TransientStorageError,
)
from daemon.storage import LocalStorage, S3Storage, Storage
from tests.conftest import s3_settings
from tests.helpers.s3server import REPO, FaultProxy, MotoServer

MiB = 1024 * 1024


async def gen(total: int, chunk: int = 256 * 1024, seed: int = 1) -> AsyncIterator[bytes]:
    block = hashlib.sha256(str(seed).encode()).digest() * (chunk // 32)
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        # vary content so parts differ
        yield bytes([sent // chunk % 251]) + block[1:n]
        sent += n


def expected_sha(total: int, chunk: int = 256 * 1024, seed: int = 1) -> str:
    h = hashlib.sha256()
    block = hashlib.sha256(str(seed).encode()).digest() * (chunk // 32)
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        h.update(bytes([sent // chunk % 251]) + block[1:n])
        sent += n
    return h.hexdigest()


@pytest.fixture(params=["s3", "local"])
def storage(request: pytest.FixtureRequest) -> Storage:
    return request.getfixturevalue("s3_storage" if request.param == "s3" else "local_storage")  # type: ignore[no-any-return]


async def test_put_get_head_list_delete(storage: Storage) -> None:
    await storage.put_bytes("partial/2026-01-01T00-00-00Z/a.txt", b"hello")
    await storage.put_bytes("partial/2026-01-01T00-00-00Z/b.txt", b"world!")
    await storage.put_bytes("full/2026-01-02T00-00-00Z/c", b"x")
    assert await storage.get_bytes("partial/2026-01-01T00-00-00Z/a.txt") == b"hello"
    info = await storage.head("partial/2026-01-01T00-00-00Z/b.txt")
    assert info is not None and info.size == 6
    assert await storage.head("nope") is None
    keys = [o.key for o in await storage.list("partial/")]
    assert keys == ["partial/2026-01-01T00-00-00Z/a.txt", "partial/2026-01-01T00-00-00Z/b.txt"]
    assert await storage.list_dirs("") == ["full", "partial"]
    assert await storage.list_dirs("partial/") == ["2026-01-01T00-00-00Z"]
    await storage.delete_many(["partial/2026-01-01T00-00-00Z/a.txt", "partial/2026-01-01T00-00-00Z/b.txt"])
    assert await storage.list("partial/") == []
    assert await storage.list_dirs("") == ["full"]
    with pytest.raises(ObjectNotFoundError):
        await storage.get_bytes("partial/2026-01-01T00-00-00Z/a.txt")


async def test_conditional_put(storage: Storage) -> None:
    await storage.put_bytes("wal/lease.json", b"1", if_none_match=True)
    with pytest.raises(PreconditionFailedError):
        await storage.put_bytes("wal/lease.json", b"2", if_none_match=True)
    assert await storage.get_bytes("wal/lease.json") == b"1"
    await storage.put_bytes("wal/lease.json", b"3")
    assert await storage.get_bytes("wal/lease.json") == b"3"


async def test_replace_and_delete_only_what_was_read(storage: Storage) -> None:
    """If-Match: a write or delete based on a stale read loses, and changes nothing."""
    key = "wal/lease.json"
    await storage.put_bytes(key, b"mine")
    data, version = await storage.get_versioned(key)
    assert data == b"mine"
    await storage.put_bytes(key, b"mine, renewed", if_match=version)
    # Someone else wrote after our read: our write based on it is refused...
    _, renewed = await storage.get_versioned(key)
    await storage.put_bytes(key, b"theirs")
    with pytest.raises(PreconditionFailedError):
        await storage.put_bytes(key, b"mine again", if_match=renewed)
    # ...and so is a delete.
    with pytest.raises(PreconditionFailedError):
        await storage.delete_if_match(key, renewed)
    assert await storage.get_bytes(key) == b"theirs"
    data, current = await storage.get_versioned(key)
    assert data == b"theirs" and current not in (version, renewed)
    await storage.delete_if_match(key, current)
    assert await storage.head(key) is None
    with pytest.raises(ObjectNotFoundError):
        await storage.put_bytes(key, b"gone", if_match=current)
    with pytest.raises(ObjectNotFoundError):
        await storage.delete_if_match(key, current)
    with pytest.raises(ObjectNotFoundError):
        await storage.get_versioned(key)


_RACER = """
import asyncio, sys, time
from pathlib import Path
from daemon.storage import LocalStorage
from daemon.errors import PreconditionFailedError

real = LocalStorage._check_version
def slow_check(self, path, key, version):
    real(self, path, key, version)
    time.sleep(0.3)  # widen the gap between the check and the write: the lock must cover it
LocalStorage._check_version = slow_check

async def main():
    root, version, go, me = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    deadline = time.monotonic() + 20
    while not go.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    try:
        await LocalStorage(root).put_bytes("wal/lease.json", me.encode(), if_match=version)
        print("won")
    except PreconditionFailedError:
        print("lost")
asyncio.run(main())
"""


async def test_local_conditional_writes_exclude_each_other_across_processes(tmp_path: Path) -> None:
    """Several processes replace the same version at once: exactly one wins."""
    root = tmp_path / "dest"
    root.mkdir()
    st = LocalStorage(root)
    await st.put_bytes("wal/lease.json", b"original")
    _, version = await st.get_versioned("wal/lease.json")
    go = tmp_path / "go"
    procs = []
    for i in range(4):
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _RACER,
                str(root),
                version,
                str(go),
                f"racer-{i}",
                cwd=REPO,
                stdout=asyncio.subprocess.PIPE,
            )
        )
    go.touch()
    outs = [(await asyncio.wait_for(p.communicate(), 30))[0].decode().strip() for p in procs]
    assert sorted(outs) == ["lost", "lost", "lost", "won"]
    winner = f"racer-{outs.index('won')}".encode()
    assert await st.get_bytes("wal/lease.json") == winner
    assert [o.key for o in await st.list("")] == ["wal/lease.json"]  # the lock file is not listed


async def test_local_destination_without_locks_still_checks_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem without record locks (ENOLCK): conditional writes still check, and say so once."""
    import errno
    import fcntl

    def no_locks(fd: int, cmd: int, *args: object) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    st = LocalStorage(tmp_path)
    await st.put_bytes("wal/lease.json", b"mine")
    _, version = await st.get_versioned("wal/lease.json")
    with capture_logs() as logs:
        await st.put_bytes("wal/lease.json", b"renewed", if_match=version)
        with pytest.raises(PreconditionFailedError):
            await st.put_bytes("wal/lease.json", b"stale", if_match=version)
    assert await st.get_bytes("wal/lease.json") == b"renewed"
    assert [e["event"] for e in logs] == ["storage_lock_unsupported"]


async def test_a_provider_without_if_match_gets_plain_writes(
    fault_proxy: FaultProxy, proxied_storage: S3Storage
) -> None:
    """501 NotImplemented for If-Match: the write and the delete go through unconditionally."""
    key = "wal/lease.json"
    await proxied_storage.put_bytes(key, b"mine")
    _, version = await proxied_storage.get_versioned(key)
    fault_proxy.without_conditionals()
    await proxied_storage.put_bytes(key, b"theirs")
    with capture_logs() as logs:
        await proxied_storage.put_bytes(key, b"mine, renewed", if_match=version)  # stale, yet written
        assert await proxied_storage.get_bytes(key) == b"mine, renewed"
        await proxied_storage.delete_if_match(key, version)
    assert await proxied_storage.head(key) is None
    # said once (not per request), and nothing was retried as if the provider were down
    assert [e["event"] for e in logs] == ["storage_conditional_unsupported"]


@pytest.mark.parametrize("total", [0, 1000, 5 * MiB, 17 * MiB + 3])
async def test_stream_roundtrip(storage: Storage, total: int) -> None:
    res = await storage.upload_stream("full/x/blob", gen(total))
    assert res.size == total
    assert res.sha256 == expected_sha(total)
    h = hashlib.sha256()
    n = 0
    async for chunk in storage.download_stream("full/x/blob"):
        h.update(chunk)
        n += len(chunk)
    assert n == total and h.hexdigest() == res.sha256
    info = await storage.head("full/x/blob")
    assert info is not None and info.size == total


async def test_multipart_memory_is_bounded(s3_storage: S3Storage) -> None:
    """The producer may only run ahead of the uploads by concurrency + 1 parts."""
    produced = 0
    s3_storage.concurrency = 2
    part = s3_storage.part_size
    max_ahead = 0
    uploaded_before = 0

    async def src() -> AsyncIterator[bytes]:
        nonlocal produced, max_ahead
        async for c in gen(12 * part):
            produced += len(c)
            max_ahead = max(max_ahead, produced)
            yield c

    res = await s3_storage.upload_stream("full/x/big", src())
    assert res.size == 12 * part
    del uploaded_before
    # a weak but meaningful bound: everything was produced and no error; the strong check below
    # is that the whole upload never needed more than (concurrency+2) parts in flight, which the
    # semaphore enforces; measured by bench/ as peak RSS.
    assert max_ahead == 12 * part


async def test_upload_cancel_aborts_multipart(s3_storage: S3Storage) -> None:
    started = asyncio.Event()

    async def src() -> AsyncIterator[bytes]:
        async for c in gen(30 * MiB):
            yield c
            if not started.is_set():
                started.set()
        await asyncio.Event().wait()  # never finishes: the caller must cancel

    task = asyncio.create_task(s3_storage.upload_stream("full/x/cancelled", src()))
    await asyncio.wait_for(started.wait(), 10)
    # let some parts go out
    for _ in range(50):
        await asyncio.sleep(0.05)
        if await s3_storage.list_multipart_uploads():
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await s3_storage.list_multipart_uploads() == []
    assert await s3_storage.head("full/x/cancelled") is None


async def test_cancel_while_the_multipart_upload_is_being_opened_aborts_it(
    s3_storage: S3Storage, proxied_storage: S3Storage, fault_proxy: FaultProxy
) -> None:
    """The server may open the upload before its answer reaches us: that upload is aborted too."""
    fault_proxy.latency(0.5)  # each way: the answer to "create" comes 0.5 s after it took effect
    task = asyncio.create_task(proxied_storage.upload_stream("full/x/opening", gen(12 * MiB)))
    deadline = asyncio.get_running_loop().time() + 30
    while not await s3_storage.list_multipart_uploads():  # straight to the server, no proxy
        assert asyncio.get_running_loop().time() < deadline, "the upload was never opened"
        assert not task.done()
        await asyncio.sleep(0.02)
    task.cancel()  # while the answer is still on its way
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    assert await s3_storage.list_multipart_uploads() == []


async def test_upload_failure_aborts_multipart(s3_storage: S3Storage) -> None:
    class Boom(Exception):
        pass

    async def src() -> AsyncIterator[bytes]:
        async for c in gen(12 * MiB):
            yield c
        raise Boom()

    with pytest.raises(Boom):
        await s3_storage.upload_stream("full/x/failed", src())
    assert await s3_storage.list_multipart_uploads() == []
    assert await s3_storage.head("full/x/failed") is None


async def test_stale_multipart_listing_and_abort(s3_storage: S3Storage) -> None:
    client = await s3_storage._get_client()
    await client.create_multipart_upload(Bucket=s3_storage.s.bucket, Key="tb/full/y/orphan")
    ups = await s3_storage.list_multipart_uploads()
    assert [u.key for u in ups] == ["full/y/orphan"]
    await s3_storage.abort_multipart(ups[0].key, ups[0].upload_id)
    assert await s3_storage.list_multipart_uploads() == []


async def test_pagination(s3_storage: S3Storage) -> None:
    await asyncio.gather(*(s3_storage.put_bytes(f"wal/seg/{i:05d}", b"x") for i in range(1100)))
    objs = await s3_storage.list("wal/seg/")
    assert len(objs) == 1100
    await s3_storage.delete_many([o.key for o in objs])
    assert await s3_storage.list("wal/") == []


async def test_upload_survives_connection_cut(fault_proxy: FaultProxy, proxied_storage: S3Storage) -> None:
    """A cut during a multipart upload is retried part by part; the object ends up whole."""
    cut_done = asyncio.Event()

    async def src() -> AsyncIterator[bytes]:
        n = 0
        async for c in gen(16 * MiB):
            n += len(c)
            if n > 6 * MiB and not cut_done.is_set():
                fault_proxy.cut()
                asyncio.get_running_loop().call_later(0.3, fault_proxy.heal)
                cut_done.set()
            yield c

    res = await proxied_storage.upload_stream("full/z/obj", src())
    assert cut_done.is_set()
    assert res.sha256 == expected_sha(16 * MiB)
    h = hashlib.sha256()
    async for c in proxied_storage.download_stream("full/z/obj"):
        h.update(c)
    assert h.hexdigest() == res.sha256


async def test_long_outage_fails_and_aborts(fault_proxy: FaultProxy, proxied_storage: S3Storage) -> None:
    async def src() -> AsyncIterator[bytes]:
        n = 0
        async for c in gen(16 * MiB):
            n += len(c)
            if n > 6 * MiB:
                fault_proxy.cut()
            yield c

    with pytest.raises(TransientStorageError):
        await proxied_storage.upload_stream("full/z/lost", src())
    fault_proxy.heal()
    assert await proxied_storage.list_multipart_uploads() == []
    assert await proxied_storage.head("full/z/lost") is None


async def test_download_resumes_after_cut(fault_proxy: FaultProxy, proxied_storage: S3Storage) -> None:
    res = await proxied_storage.upload_stream("full/z/dl", gen(9 * MiB))
    h = hashlib.sha256()
    n = 0
    async for c in proxied_storage.download_stream("full/z/dl"):
        h.update(c)
        n += len(c)
        if n >= 2 * MiB and n - len(c) < 2 * MiB:
            fault_proxy.cut()
            asyncio.get_running_loop().call_later(0.2, fault_proxy.heal)
    assert n == 9 * MiB and h.hexdigest() == res.sha256


async def test_missing_bucket(s3_server: MotoServer) -> None:
    st = S3Storage(s3_settings(s3_server.endpoint, "does-not-exist"))
    try:
        with pytest.raises(BucketNotFoundError):
            await st.check_access()
        with pytest.raises(BucketNotFoundError):
            await st.list("partial/")
    finally:
        await st.close()


async def test_unreachable_endpoint() -> None:
    from tests.helpers.s3server import free_port

    st = S3Storage(s3_settings(f"http://127.0.0.1:{free_port()}", "b"))
    try:
        with pytest.raises(EndpointUnreachableError):
            await st.check_access()
    finally:
        await st.close()


async def test_wrong_secret_is_access_denied(s3_auth_server: tuple[MotoServer, str, str, str]) -> None:
    server, bucket, key_id, secret = s3_auth_server
    good = S3Storage(s3_settings(server.endpoint, bucket, access_key_id=key_id, secret_access_key=secret))
    bad = S3Storage(
        s3_settings(server.endpoint, bucket, access_key_id=key_id, secret_access_key="wrong" + secret[5:])
    )
    try:
        await good.check_access()
        await good.put_bytes("x", b"1")
        with pytest.raises(AccessDeniedError) as ei:
            await bad.check_access()
        assert secret not in str(ei.value) and "wrong" not in str(ei.value)
    finally:
        await good.close()
        await bad.close()


async def test_local_missing_root(tmp_path: Path) -> None:
    st = LocalStorage(tmp_path / "not-mounted")
    with pytest.raises(BucketNotFoundError):
        await st.put_bytes("a", b"b")


async def test_local_cancel_leaves_no_file(local_storage: LocalStorage) -> None:
    async def src() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await local_storage.upload_stream("full/a/b", src())
    assert await local_storage.list("") == []
    files = [p for p in local_storage.root.rglob("*") if p.is_file()]
    assert files == []
    assert os.listdir(local_storage.root) in ([], ["full"])


def test_part_sizes_double_to_fit_s3_part_limit() -> None:
    from daemon.storage import part_size_for

    base = 5 * MiB
    assert [part_size_for(n, base) for n in (1, 2000, 2001, 4001, 8001, 9999)] == [
        base,
        base,
        2 * base,
        4 * base,
        16 * base,
        16 * base,
    ]
    total = sum(part_size_for(n, base) for n in range(1, 10_001))
    assert total > 300 * 1024**3


async def test_rechunk_cuts_exact_parts() -> None:
    from daemon.storage import _rechunk

    async def src() -> AsyncIterator[bytes]:
        for i in range(7):
            yield bytes([i]) * 3_000_000

    parts = [p.getvalue() async for p in _rechunk(src(), 5 * MiB)]
    assert [len(p) for p in parts] == [5 * MiB] * 4 + [21_000_000 - 4 * 5 * MiB]
    assert b"".join(parts) == b"".join(bytes([i]) * 3_000_000 for i in range(7))


async def test_a_local_destination_that_is_missing_or_a_file_says_which(tmp_path: Path) -> None:
    missing = LocalStorage(tmp_path / "Volumes" / "Backup")
    with pytest.raises(BucketNotFoundError, match="does not exist") as ei:
        await missing.list("partial/")
    assert "mount the disk" in ei.value.fix
    assert not (tmp_path / "Volumes").exists()  # a folder the user named is never made
    afile = tmp_path / "backups.tar"
    afile.write_bytes(b"x")
    with pytest.raises(BucketNotFoundError, match="is a file, not a directory"):
        await LocalStorage(afile).put_bytes("partial/x/manifest.json", b"{}")
    ours = LocalStorage(tmp_path / "share" / "backups", create=True)
    await ours.put_bytes("partial/x/manifest.json", b"{}")
    assert (tmp_path / "share" / "backups" / "partial" / "x" / "manifest.json").read_bytes() == b"{}"
