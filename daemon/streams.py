"""Small streaming building blocks: (de)compression and file I/O off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import zstandard

from .errors import IntegrityError, RestoreError

MiB = 1024 * 1024
# The unit every stream here moves in: file reads, downloads, pipes, tar data.
CHUNK = MiB
# What threads=-1 means at most, and zstd's job size: zstd's default job (4 windows) times the jobs
# in flight made read-ahead grow with the core count (113 MiB at 8 workers); 2 MiB jobs keep it
# near 20 MiB for ~0.3% more output.
MAX_ZSTD_WORKERS = 4
ZSTD_JOB_SIZE = 2 << 20


def zstd_compressor(level: int, threads: int) -> zstandard.ZstdCompressor:
    """The one zstd setup for every artifact: bounded memory, checksummed frames."""
    if threads < 0:
        threads = min(os.cpu_count() or 1, MAX_ZSTD_WORKERS)
    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=threads, job_size=ZSTD_JOB_SIZE if threads > 0 else 0, write_checksum=1
    )
    return zstandard.ZstdCompressor(compression_params=params)


class HashingStream(AsyncIterator[bytes]):
    """Pass chunks through unchanged while computing their size and sha256.

    Chunks of ``offload_threshold`` bytes or more are hashed in a thread (hashlib releases the GIL)
    so big chunks never stall the loop.  ``size``/``sha256`` are final once the source is exhausted
    (``finished``).
    """

    def __init__(self, source: AsyncIterable[bytes], *, offload_threshold: int = 256 * 1024) -> None:
        self._source = source
        self._it = aiter(source)
        self._hash = hashlib.sha256()
        self._threshold = offload_threshold
        self.size = 0
        self.finished = False

    @property
    def sha256(self) -> str:
        if not self.finished:
            raise RuntimeError("the stream has not been read to the end")
        return self._hash.hexdigest()

    def __aiter__(self) -> HashingStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._it.__anext__()
        except StopAsyncIteration:
            self.finished = True
            raise
        if len(chunk) >= self._threshold:
            await asyncio.to_thread(self._hash.update, chunk)
        else:
            self._hash.update(chunk)
        self.size += len(chunk)
        return chunk

    async def aclose(self) -> None:
        aclose = getattr(self._it, "aclose", None)
        if aclose is not None:
            await aclose()


@contextlib.asynccontextmanager
async def _closing(chunks: AsyncIterable[bytes]) -> AsyncIterator[AsyncIterable[bytes]]:
    try:
        yield chunks
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


async def file_chunks(path: Path, chunk: int = CHUNK) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while True:
            data = await asyncio.to_thread(f.read, chunk)
            if not data:
                return
            yield data
    finally:
        f.close()


async def compress_stream(
    chunks: AsyncIterable[bytes], level: int = 3, threads: int = -1
) -> AsyncIterator[bytes]:
    cobj = zstd_compressor(level, threads).compressobj()
    # aclosing: when we are closed or cancelled, the source (e.g. a `docker save` child) is closed
    # at once instead of whenever the garbage collector gets to it.
    async with _closing(chunks) as source:
        async for chunk in source:
            out = await asyncio.to_thread(cobj.compress, chunk)
            if out:
                yield out
    tail = await asyncio.to_thread(cobj.flush)
    if tail:
        yield tail


async def decompress_stream(
    chunks: AsyncIterable[bytes], codec: str, what: str = "object"
) -> AsyncIterator[bytes]:
    """Undo ``codec`` (zstd, gzip or none); damaged or truncated input is an IntegrityError."""
    if codec == "none":
        async for c in chunks:
            yield c
        return
    import zlib

    if codec == "zstd":
        dobj: object = zstandard.ZstdDecompressor().decompressobj()
    elif codec == "gzip":
        dobj = zlib.decompressobj(wbits=31)
    else:
        raise IntegrityError(f"{what} uses unknown codec {codec!r}", "upgrade tinyserve-backup")
    try:
        async with _closing(chunks) as source:
            async for c in source:
                out = await asyncio.to_thread(dobj.decompress, c)  # type: ignore[attr-defined]
                if out:
                    yield out
        if codec == "zstd" and not dobj.eof:  # type: ignore[attr-defined]
            raise IntegrityError(f"{what} is truncated (zstd frame incomplete)")
        if codec == "gzip":
            if not dobj.eof:  # type: ignore[attr-defined]
                raise IntegrityError(f"{what} is truncated (gzip stream incomplete)")
            tail = dobj.flush()  # type: ignore[attr-defined]
            if tail:
                yield tail
    except (zstandard.ZstdError, zlib.error) as exc:
        raise IntegrityError(f"{what} is damaged: {exc}") from None


async def write_stream(chunks: AsyncIterable[bytes], dest: Path) -> int:
    """Write a stream to ``dest`` (fsync'd); a full disk is a clear RestoreError."""
    n = 0
    f = await asyncio.to_thread(open, dest, "wb")
    try:
        async for c in chunks:
            await asyncio.to_thread(f.write, c)
            n += len(c)
        await asyncio.to_thread(f.flush)
        await asyncio.to_thread(os.fsync, f.fileno())
    except OSError as exc:
        raise disk_error(exc, dest) from None
    finally:
        f.close()
    return n


def disk_error(exc: OSError, where: Path) -> RestoreError:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return RestoreError(
            f"no space left on the disk while writing {where}",
            "free some disk space (the restore needs room for a staged copy) and try again",
        )
    return RestoreError(f"cannot write {where}: {exc.strerror}")
