"""Storage destinations: S3-compatible object stores (aiobotocore) and local directories.

Every key is relative to the destination prefix, so callers never see the bucket or the prefix.
Both backends keep the same semantics: writes are all-or-nothing (a reader sees the old object or the
new one, never a torn one), ``if_none_match`` is an exclusive create, ``if_match`` (with the version
``get_versioned`` returned) replaces or ``delete_if_match`` deletes only an object nobody changed
since, and a streaming upload that fails or is cancelled leaves nothing behind but, at worst, an
upload that ``prune`` aborts.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import hashlib
import io
import os
import random
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from .cancel import through_cancel
from .errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ConfigError,
    CredentialsError,
    EndpointUnreachableError,
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageError,
    TransientStorageError,
    UnsupportedRequestError,
)
from .fsutil import fsync_dir, make_private_dirs
from .streams import HashingStream, MiB, file_chunks

log = structlog.get_logger(__name__)

T = TypeVar("T")

# S3 refuses parts under 5 MiB (except the last one).
MIN_PART_SIZE = 5 * MiB


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime


@dataclass(frozen=True)
class UploadResult:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class MultipartUpload:
    key: str
    upload_id: str
    initiated: datetime


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        # Full jitter keeps several retrying parts from hammering a recovering endpoint in step.
        cap = min(self.max_delay, self.base_delay * (2**attempt))
        return random.uniform(cap / 2, cap)


class Storage(ABC):
    """What every job needs from a destination."""

    url: str
    part_size: int = 5 * MiB
    concurrency: int = 4

    @abstractmethod
    async def put_bytes(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> None:
        """Write ``key``; ``if_none_match``: only if absent; ``if_match``: only while at that version.

        A lost condition raises ``PreconditionFailedError`` (``ObjectNotFoundError`` when an
        ``if_match`` object is gone).
        """

    @abstractmethod
    async def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    async def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and its version (S3's ETag), for ``if_match``/``delete_if_match``."""

    @abstractmethod
    async def delete_if_match(self, key: str, version: str) -> None:
        """Delete ``key`` only while it is at ``version`` (errors as ``put_bytes(if_match=…)``)."""

    @abstractmethod
    async def head(self, key: str) -> ObjectInfo | None: ...

    @abstractmethod
    async def upload_stream(self, key: str, chunks: AsyncIterator[bytes]) -> UploadResult: ...

    @abstractmethod
    def download_stream(self, key: str) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def list(self, prefix: str) -> builtins.list[ObjectInfo]: ...

    @abstractmethod
    async def list_dirs(self, prefix: str) -> builtins.list[str]: ...

    @abstractmethod
    async def delete_many(self, keys: Iterable[str]) -> None: ...

    @abstractmethod
    async def list_multipart_uploads(self) -> builtins.list[MultipartUpload]: ...

    @abstractmethod
    async def abort_multipart(self, key: str, upload_id: str) -> None: ...

    async def check_access(self) -> None:
        """One cheap request that fails clearly on bad credentials, a missing bucket or no network."""
        await self.list_dirs("")

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def part_size_for(number: int, base: int) -> int:
    """Size of multipart part ``number`` (1-based): ``base``, doubling every 2000 parts.

    S3 allows 10,000 parts; small parts keep memory low for the usual object, and doubling lets a
    5 MiB base still reach ~300 GiB.
    """
    return base << min((number - 1) // 2000, 4)


async def _rechunk(chunks: AsyncIterator[bytes], base: int) -> AsyncIterator[io.BytesIO]:
    """Regroup a stream into multipart parts (see ``part_size_for``; the last may be shorter).

    Each part is written once into a ``BytesIO`` of its own: one copy of the data, not a growing
    buffer copied again at every cut. A ``BytesIO`` rather than ``bytes``: botocore turns a bytes
    body into ``BytesIO(body)``, which shares the bytes, and aiohttp then takes its buffer, which
    unshares it, i.e. copies the whole part again. With parts in flight that was ~17 MB of peak
    RSS per upload (+57 MB against +40 MB for one 300 MB stream), for nothing.
    """
    number = 1
    size = part_size_for(number, base)
    part = io.BytesIO()
    held = 0
    async for chunk in chunks:
        view = memoryview(chunk)  # cut without copying; the part's write is the one copy
        while view:
            take = min(len(view), size - held)
            part.write(view[:take])
            view = view[take:]
            held += take
            if held == size:
                yield part
                part, held = io.BytesIO(), 0
                number += 1
                size = part_size_for(number, base)
    if held:
        yield part


def _from_start(part: io.BytesIO) -> io.BytesIO:
    """The part ready to be sent (again: a retried request must not start where the last ended)."""
    part.seek(0)
    return part


# --------------------------------------------------------------------------------------------
# Local directory (external disk, NAS mount, and the default before S3 is configured)
# --------------------------------------------------------------------------------------------

_UPLOAD_TMP = ".upload-"
# Held (lockf) around conditional writes; never listed, never pruned.
_LOCK_NAME = ".tinyserve-backup.lock"
_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock_for(root: Path) -> threading.Lock:
    with _thread_locks_guard:
        return _thread_locks.setdefault(os.path.realpath(root), threading.Lock())


def _local_error(exc: OSError, where: str) -> StorageError:
    """An OSError of the local backend as the storage error callers handle."""
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return ObjectNotFoundError(f"object not found ({where})")
    return StorageError(f"local destination failed: {exc.strerror or exc} ({where})")


class LocalStorage(Storage):
    def __init__(self, root: Path, *, part_size: int = 5 * MiB, create: bool = False) -> None:
        """``create``: make a missing ``root`` (our own default folder). A folder the user named is
        never made: missing, it is usually a disk that is not mounted, and backups written to the
        empty mount point would fill the system disk and vanish behind the mount."""
        self.root = Path(root)
        self.url = f"file://{self.root}"
        self.part_size = part_size
        self.create = create
        self._warned_no_lock = False

    def _path(self, key: str) -> Path:
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts) or not parts:
            raise StorageError(f"invalid object key {key!r}", "this is a bug; please report it")
        return self.root.joinpath(*parts)

    def _tmp_for(self, path: Path) -> Path:
        return path.with_name(f"{_UPLOAD_TMP}{path.name}.{secrets.token_hex(6)}")

    def _check_root(self) -> None:
        if self.create and not self.root.is_dir():
            make_private_dirs(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise BucketNotFoundError(
                f"destination {self.root} is a file, not a directory",
                "fix `destination.url` in the config",
            )
        if not self.root.is_dir():
            raise BucketNotFoundError(
                f"destination directory {self.root} does not exist",
                "create it (or mount the disk), or fix `destination.url` in the config",
            )

    def _write_atomic(self, key: str, data: bytes, if_none_match: bool, if_match: str | None = None) -> None:
        self._check_root()
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp_for(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if if_match is None:
            self._publish(tmp, path, if_none_match)
            return
        try:
            with self._conditional():
                self._check_version(path, key, if_match)
                self._publish(tmp, path, False)
        except OSError as exc:
            raise _local_error(exc, f"put {key}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @contextlib.contextmanager
    def _conditional(self) -> Iterator[None]:
        """Serialise check-then-act requests: a POSIX record lock on a lock file in the root.

        Record locks (``lockf``), unlike ``flock``, reach the server of an NFS or SMB mount, so two
        machines sharing a NAS exclude each other. They belong to the process, so threads of one
        process also take a lock of their own first.
        """
        import fcntl

        with _thread_lock_for(self.root):
            fd = os.open(self.root / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                        raise
                    # No locks on this filesystem: the version check alone narrows the race to
                    # microseconds instead of closing it. Said once.
                    if not self._warned_no_lock:
                        self._warned_no_lock = True
                        log.warning(
                            "storage_lock_unsupported",
                            url=self.url,
                            error=exc.strerror,
                            note="conditional writes here are checked without a lock",
                        )
                yield
            finally:
                os.close(fd)  # (releases the lock)

    @staticmethod
    def _version(data: bytes) -> str:
        # Of the content, like S3's ETag: a file replaced by another with the same inode, size
        # and mtime cannot pass for the one that was read.
        return hashlib.sha256(data).hexdigest()

    def _check_version(self, path: Path, key: str, version: str) -> None:
        try:
            current = self._version(path.read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFoundError(f"object {key} not found at {self.url}") from None
        if current != version:
            raise PreconditionFailedError(f"object {key} changed since it was read")

    def _publish(self, tmp: Path, path: Path, if_none_match: bool) -> None:
        try:
            if if_none_match:
                # link() fails if the name exists: an exclusive create, atomic on POSIX filesystems.
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise PreconditionFailedError(f"object {path.name} already exists") from None
            else:
                os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    async def put_bytes(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> None:
        await asyncio.to_thread(self._write_atomic, key, data, if_none_match, if_match)

    async def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFoundError(f"object {key} not found at {self.url}") from None

    async def get_versioned(self, key: str) -> tuple[bytes, str]:
        path = self._path(key)

        def _get() -> tuple[bytes, str]:
            data = path.read_bytes()
            return data, self._version(data)

        try:
            return await asyncio.to_thread(_get)
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFoundError(f"object {key} not found at {self.url}") from None
        except OSError as exc:
            raise _local_error(exc, f"get {key}") from None

    async def delete_if_match(self, key: str, version: str) -> None:
        path = self._path(key)

        def _delete() -> None:
            with self._conditional():
                self._check_version(path, key, version)
                path.unlink()

        try:
            await asyncio.to_thread(_delete)
        except OSError as exc:
            raise _local_error(exc, f"delete {key}") from None

    def _info(self, path: Path) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(
            key=path.relative_to(self.root).as_posix(),
            size=st.st_size,
            last_modified=datetime.fromtimestamp(st.st_mtime, UTC),
        )

    async def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)

        def _head() -> ObjectInfo | None:
            try:
                return self._info(path) if path.is_file() else None
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(_head)

    async def upload_stream(self, key: str, chunks: AsyncIterator[bytes]) -> UploadResult:
        await asyncio.to_thread(self._check_root)
        path = self._path(key)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        tmp = self._tmp_for(path)
        hs = HashingStream(chunks)
        f = await asyncio.to_thread(open, tmp, "wb")
        try:
            async for chunk in hs:
                await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(f.flush)
            await asyncio.to_thread(os.fsync, f.fileno())
            await asyncio.to_thread(f.close)
            await asyncio.to_thread(self._publish, tmp, path, False)
        except BaseException:
            f.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return UploadResult(key=key, size=hs.size, sha256=hs.sha256)

    async def download_stream(self, key: str) -> AsyncIterator[bytes]:
        path = self._path(key)
        if not await asyncio.to_thread(path.is_file):
            raise ObjectNotFoundError(f"object {key} not found at {self.url}")
        async for chunk in file_chunks(path):
            yield chunk

    def _walk(self, prefix: str) -> builtins.list[ObjectInfo]:
        if not self.root.is_dir():
            self._check_root()
        base = self.root
        # Only descend into the directory part of the prefix; the rest is a name filter.
        dir_part = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = base.joinpath(*[p for p in dir_part.split("/") if p]) if dir_part else base
        out: list[ObjectInfo] = []
        if not start.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith(_UPLOAD_TMP) or name == _LOCK_NAME:
                    continue
                p = Path(dirpath, name)
                rel = p.relative_to(base).as_posix()
                if rel.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        out.append(self._info(p))
        out.sort(key=lambda o: o.key)
        return out

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        return await asyncio.to_thread(self._walk, prefix)

    async def list_dirs(self, prefix: str) -> builtins.list[str]:
        def _dirs() -> builtins.list[str]:
            self._check_root()
            d = self.root.joinpath(*[p for p in prefix.split("/") if p]) if prefix else self.root
            if not d.is_dir():
                return []
            return sorted(e.name for e in d.iterdir() if e.is_dir())

        return await asyncio.to_thread(_dirs)

    async def delete_many(self, keys: Iterable[str]) -> None:
        paths = [self._path(k) for k in keys]

        def _delete() -> None:
            parents = set()
            for p in paths:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                parents.add(p.parent)
            # Remove directories left empty so listings do not show ghost backups.
            for d in sorted(parents, key=lambda x: len(x.parts), reverse=True):
                while d != self.root and d.is_relative_to(self.root):
                    try:
                        d.rmdir()
                    except OSError:
                        break
                    d = d.parent

        await asyncio.to_thread(_delete)

    async def list_multipart_uploads(self) -> builtins.list[MultipartUpload]:
        def _uploads() -> builtins.list[MultipartUpload]:
            out: builtins.list[MultipartUpload] = []
            if not self.root.is_dir():
                return out
            for dirpath, _dirs, files in os.walk(self.root):
                for name in files:
                    if name.startswith(_UPLOAD_TMP):
                        p = Path(dirpath, name)
                        with contextlib.suppress(FileNotFoundError):
                            st = p.stat()
                            out.append(
                                MultipartUpload(
                                    key=p.relative_to(self.root).as_posix(),
                                    upload_id=name,
                                    initiated=datetime.fromtimestamp(st.st_mtime, UTC),
                                )
                            )
            return out

        return await asyncio.to_thread(_uploads)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        path = self._path(key)
        if not path.name.startswith(_UPLOAD_TMP):
            raise StorageError(f"{key} is not an unfinished upload")
        await asyncio.to_thread(lambda: path.unlink(missing_ok=True))


# --------------------------------------------------------------------------------------------
# S3-compatible object storage
# --------------------------------------------------------------------------------------------

_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
    "Forbidden",
    "403",
}
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "OperationAborted",
    "500",
    "502",
    "503",
    "504",
}


def translate_error(
    exc: BaseException, where: str, *, bucket: str = "", endpoint: str | None = None
) -> StorageError | CredentialsError:
    """Turn a botocore/aiohttp exception into one of ours, without leaking request details.

    ``bucket`` and ``endpoint`` name what could not be found or reached, so the user sees which
    of several configured destinations is wrong.
    """
    import aiohttp
    import botocore.exceptions as bex

    if isinstance(exc, StorageError | CredentialsError):
        return exc
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",):
            return BucketNotFoundError(
                f"bucket {bucket!r} does not exist at {endpoint or 'AWS S3'} ({where})"
                if bucket
                else f"bucket not found ({where})"
            )
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return ObjectNotFoundError(f"object not found ({where})")
        # 409 ConditionalRequestConflict: a concurrent write to the same key won while ours was
        # being evaluated; for the caller that is the same as losing the condition.
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict") or status == 412:
            return PreconditionFailedError(f"object exists or changed meanwhile ({where})")
        if code == "NotImplemented" or status == 501:
            return UnsupportedRequestError(f"the storage provider does not implement this ({where})")
        if code in _AUTH_CODES or status == 403:
            return AccessDeniedError(f"access denied by the storage provider ({code}, {where})")
        if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
            return TransientStorageError(f"storage provider error {code} ({where})")
        return StorageError(f"storage request failed: {code or status} ({where})")
    if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
        return CredentialsError("no storage credentials found")
    if isinstance(exc, bex.EndpointConnectionError | bex.ConnectTimeoutError):
        at = f" {endpoint}" if endpoint else ""
        return EndpointUnreachableError(f"cannot reach the storage endpoint{at} ({where})")
    if isinstance(
        exc,
        bex.ReadTimeoutError
        | bex.ConnectionClosedError
        | bex.ResponseStreamingError
        | bex.IncompleteReadError
        | bex.HTTPClientError
        | aiohttp.ClientError
        | asyncio.TimeoutError
        | ConnectionError,
    ):
        return TransientStorageError(f"connection to storage failed: {type(exc).__name__} ({where})")
    if isinstance(exc, bex.BotoCoreError):
        return StorageError(f"storage client error: {type(exc).__name__} ({where})")
    if isinstance(exc, OSError):
        return TransientStorageError(f"network error: {exc.strerror or type(exc).__name__} ({where})")
    return StorageError(f"unexpected storage failure: {type(exc).__name__} ({where})")


@dataclass
class S3Settings:
    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    addressing_style: str = "auto"  # auto | path | virtual
    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    part_size: int = 5 * MiB
    concurrency: int = 4
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retry: RetryPolicy = RetryPolicy()

    def display_url(self) -> str:
        url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{url} ({self.endpoint})" if self.endpoint else url


class S3Storage(Storage):
    def __init__(self, settings: S3Settings) -> None:
        self.s = settings
        self.url = settings.display_url()
        self.part_size = max(MIN_PART_SIZE, settings.part_size)
        self.concurrency = max(1, settings.concurrency)
        self._prefix = settings.prefix.strip("/")
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._open_lock = asyncio.Lock()
        self._part_slots: asyncio.Semaphore | None = None
        self._warned_unconditional = False

    def _full(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self._prefix) + 1 :] if self._prefix else full

    async def _get_client(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._open_lock:
            if self._client is None:
                from aiobotocore.config import AioConfig
                from aiobotocore.session import AioSession

                session = AioSession(profile=self.s.profile) if self.s.profile else AioSession()
                config = AioConfig(
                    s3={"addressing_style": self.s.addressing_style},
                    # botocore >= 1.36 sends CRC checksums by default; R2, B2 and older MinIO
                    # reject or mangle them, so only send what an operation requires.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    # We retry ourselves (with resumable downloads and per-part retries).
                    retries={"total_max_attempts": 1},
                    connect_timeout=self.s.connect_timeout,
                    read_timeout=self.s.read_timeout,
                    max_pool_connections=max(10, self.concurrency * 2),
                )
                kwargs: dict[str, Any] = {"config": config}
                if self.s.endpoint:
                    kwargs["endpoint_url"] = self.s.endpoint
                kwargs["region_name"] = self.s.region or "us-east-1"
                if self.s.access_key_id and self.s.secret_access_key:
                    kwargs["aws_access_key_id"] = self.s.access_key_id
                    kwargs["aws_secret_access_key"] = self.s.secret_access_key
                stack = contextlib.AsyncExitStack()
                try:
                    self._client = await stack.enter_async_context(session.create_client("s3", **kwargs))
                except Exception as exc:
                    await stack.aclose()
                    if "Invalid endpoint" in str(exc) or isinstance(exc, ValueError):
                        raise ConfigError(
                            f"invalid storage endpoint {self.s.endpoint!r}",
                            "set `destination.endpoint` to a URL like https://s3.example.com",
                        ) from None
                    raise self._translate(exc, "opening client") from None
                self._stack = stack
        return self._client

    async def close(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._client = self._stack, None, None
            await stack.aclose()

    def _translate(self, exc: BaseException, where: str) -> StorageError | CredentialsError:
        return translate_error(exc, where, bucket=self.s.bucket, endpoint=self.s.endpoint)

    async def _call(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run one request with retries on transient failures."""
        policy = self.s.retry
        attempt = 0
        while True:
            client = await self._get_client()
            try:
                return await fn(client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                err = self._translate(exc, what)
                attempt += 1
                if not getattr(err, "retryable", False) or attempt >= policy.attempts:
                    raise err from None
                delay = policy.delay(attempt)
                # the first retry of a request is news; the ones after it, during an outage, noise
                (log.warning if attempt == 1 else log.debug)(
                    "storage_retry", op=what, attempt=attempt, error=err.message, delay_s=round(delay, 2)
                )
                await asyncio.sleep(delay)

    async def put_bytes(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.s.bucket, "Key": self._full(key), "Body": data}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            await self._call(f"put {key}", lambda c: c.put_object(**kwargs))
        except UnsupportedRequestError:
            if if_match is None:
                raise
            # A provider without conditional writes: the unconditional write, as before they existed.
            self._warn_unconditional("put")
            del kwargs["IfMatch"]
            await self._call(f"put {key}", lambda c: c.put_object(**kwargs))

    async def get_versioned(self, key: str) -> tuple[bytes, str]:
        async def _get(c: Any) -> tuple[bytes, str]:
            resp = await c.get_object(Bucket=self.s.bucket, Key=self._full(key))
            async with resp["Body"] as body:
                data: bytes = await body.read()
            return data, str(resp["ETag"])

        return await self._call(f"get {key}", _get)

    async def delete_if_match(self, key: str, version: str) -> None:
        full = self._full(key)
        try:
            await self._call(
                f"delete {key}", lambda c: c.delete_object(Bucket=self.s.bucket, Key=full, IfMatch=version)
            )
        except UnsupportedRequestError:
            self._warn_unconditional("delete")
            await self._call(f"delete {key}", lambda c: c.delete_object(Bucket=self.s.bucket, Key=full))

    def _warn_unconditional(self, op: str) -> None:
        if not self._warned_unconditional:
            self._warned_unconditional = True
            log.warning(
                "storage_conditional_unsupported",
                op=op,
                url=self.url,
                note="no If-Match at this provider: the WAL lease falls back to read-then-write",
            )

    async def get_bytes(self, key: str) -> bytes:
        async def _get(c: Any) -> bytes:
            resp = await c.get_object(Bucket=self.s.bucket, Key=self._full(key))
            async with resp["Body"] as body:
                data: bytes = await body.read()
                return data

        return await self._call(f"get {key}", _get)

    async def head(self, key: str) -> ObjectInfo | None:
        async def _head(c: Any) -> ObjectInfo | None:
            try:
                resp = await c.head_object(Bucket=self.s.bucket, Key=self._full(key))
            except Exception as exc:
                err = self._translate(exc, f"head {key}")
                if isinstance(err, ObjectNotFoundError):
                    return None
                raise
            return ObjectInfo(key=key, size=resp["ContentLength"], last_modified=resp["LastModified"])

        return await self._call(f"head {key}", _head)

    async def upload_stream(self, key: str, chunks: AsyncIterator[bytes]) -> UploadResult:
        full = self._full(key)
        hs = HashingStream(chunks)
        parts = _rechunk(hs, self.part_size)
        try:
            first = await anext(parts)
        except StopAsyncIteration:
            first = io.BytesIO()
        try:
            second = await anext(parts)
        except StopAsyncIteration:
            # Small object: one PUT, no multipart bookkeeping to clean up.
            await self._call(
                f"put {key}",
                lambda c: c.put_object(Bucket=self.s.bucket, Key=full, Body=_from_start(first)),
            )
            return UploadResult(key=key, size=hs.size, sha256=hs.sha256)

        # The request may reach the server even when we are cancelled meanwhile: the upload it
        # opens would keep its parts (and their cost) until prune, so wait for it and abort it.
        resp, cancelled = await through_cancel(
            self._call(
                f"create multipart {key}",
                lambda c: c.create_multipart_upload(Bucket=self.s.bucket, Key=full),
            )
        )
        if cancelled:
            with contextlib.suppress(Exception):
                await through_cancel(asyncio.wait_for(self._abort(full, resp["UploadId"]), 30))
                log.warning("upload_aborted", key=key, error="CancelledError")
            raise asyncio.CancelledError
        upload_id: str = resp["UploadId"]
        etags: dict[int, str] = {}
        if self._part_slots is None:
            # Shared by every upload of this storage: concurrent artifacts never hold more than
            # `concurrency` parts in flight between them.
            self._part_slots = asyncio.Semaphore(self.concurrency)
        sem = self._part_slots
        tasks: set[asyncio.Task[None]] = set()
        failure: list[BaseException] = []

        async def send(number: int, body: io.BytesIO) -> None:
            try:
                r = await self._call(
                    f"upload part {number} of {key}",
                    lambda c: c.upload_part(
                        Bucket=self.s.bucket,
                        Key=full,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=_from_start(body),
                    ),
                )
                etags[number] = r["ETag"]
            except BaseException as exc:
                failure.append(exc)
                raise
            finally:
                sem.release()

        async def submit(number: int, body: io.BytesIO) -> None:
            # Acquiring before reading the next part is what bounds memory to concurrency + 1 parts.
            await sem.acquire()
            if failure:
                sem.release()
                raise failure[0]
            t = asyncio.create_task(send(number, body))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        try:
            number = 1
            await submit(number, first)
            number += 1
            await submit(number, second)
            async for body in parts:
                number += 1
                await submit(number, body)
            if tasks:
                await asyncio.gather(*list(tasks))
            if failure:
                raise failure[0]
            part_list = [{"ETag": etags[n], "PartNumber": n} for n in sorted(etags)]
            await self._call(
                f"complete multipart {key}",
                lambda c: c.complete_multipart_upload(
                    Bucket=self.s.bucket,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": part_list},
                ),
            )
        except BaseException as exc:
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(*list(tasks), return_exceptions=True)
            # Shielded so a cancellation (SIGTERM) still leaves no orphaned parts behind.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._abort(full, upload_id))
            log.warning("upload_aborted", key=key, error=type(exc).__name__)
            raise
        return UploadResult(key=key, size=hs.size, sha256=hs.sha256)

    async def _abort(self, full: str, upload_id: str) -> None:
        client = await self._get_client()
        await asyncio.wait_for(
            client.abort_multipart_upload(Bucket=self.s.bucket, Key=full, UploadId=upload_id),
            timeout=30,
        )

    async def download_stream(self, key: str) -> AsyncIterator[bytes]:
        full = self._full(key)
        offset = 0
        total: int | None = None
        attempt = 0
        policy = self.s.retry
        while True:
            client = await self._get_client()
            try:
                kwargs: dict[str, Any] = {"Bucket": self.s.bucket, "Key": full}
                if offset:
                    # Resume where the broken connection left off instead of starting over.
                    kwargs["Range"] = f"bytes={offset}-"
                resp = await client.get_object(**kwargs)
                if total is None:
                    total = int(resp["ContentLength"])
                async with resp["Body"] as body:
                    while True:
                        chunk = await body.read(MiB)
                        if not chunk:
                            break
                        offset += len(chunk)
                        attempt = 0
                        yield chunk
                if total is not None and offset < total:
                    raise TransientStorageError(f"download of {key} ended early")
                return
            except asyncio.CancelledError:
                raise
            except GeneratorExit:
                raise
            except Exception as exc:
                err = self._translate(exc, f"get {key}")
                attempt += 1
                if not getattr(err, "retryable", False) or attempt >= policy.attempts:
                    raise err from None
                delay = policy.delay(attempt)
                log.warning("storage_retry", op=f"get {key}", attempt=attempt, offset=offset)
                await asyncio.sleep(delay)

    async def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        async def _list(c: Any) -> builtins.list[ObjectInfo]:
            out = []
            paginator = c.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.s.bucket, Prefix=self._full(prefix)):
                for o in page.get("Contents", []):
                    out.append(
                        ObjectInfo(key=self._rel(o["Key"]), size=o["Size"], last_modified=o["LastModified"])
                    )
            out.sort(key=lambda o: o.key)
            return out

        return await self._call(f"list {prefix}", _list)

    async def list_dirs(self, prefix: str) -> builtins.list[str]:
        full = self._full(prefix) if prefix else (f"{self._prefix}/" if self._prefix else "")

        async def _dirs(c: Any) -> builtins.list[str]:
            out = []
            paginator = c.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.s.bucket, Prefix=full, Delimiter="/"):
                for p in page.get("CommonPrefixes", []):
                    out.append(p["Prefix"][len(full) :].rstrip("/"))
            return sorted(out)

        return await self._call(f"list {prefix or '/'}", _dirs)

    async def delete_many(self, keys: Iterable[str]) -> None:
        full = [self._full(k) for k in keys]
        for i in range(0, len(full), 1000):
            batch = full[i : i + 1000]

            async def _delete(c: Any, batch: list[str] = batch) -> None:
                resp = await c.delete_objects(
                    Bucket=self.s.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
                errors = resp.get("Errors") or []
                if errors:
                    raise StorageError(
                        f"could not delete {len(errors)} objects (first: {errors[0].get('Code')})"
                    )

            await self._call("delete objects", _delete)

    async def list_multipart_uploads(self) -> builtins.list[MultipartUpload]:
        async def _uploads(c: Any) -> builtins.list[MultipartUpload]:
            out = []
            paginator = c.get_paginator("list_multipart_uploads")
            kwargs: dict[str, Any] = {"Bucket": self.s.bucket}
            if self._prefix:
                kwargs["Prefix"] = self._prefix + "/"
            async for page in paginator.paginate(**kwargs):
                for u in page.get("Uploads", []):
                    out.append(
                        MultipartUpload(
                            key=self._rel(u["Key"]), upload_id=u["UploadId"], initiated=u["Initiated"]
                        )
                    )
            return out

        return await self._call("list uploads", _uploads)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        full = self._full(key)
        await self._call(
            f"abort upload {key}",
            lambda c: c.abort_multipart_upload(Bucket=self.s.bucket, Key=full, UploadId=upload_id),
        )

    async def check_access(self) -> None:
        # HeadBucket is the cheapest request that proves credentials, bucket and network together.
        try:
            await self._call("check bucket", lambda c: c.head_bucket(Bucket=self.s.bucket))
        except ObjectNotFoundError:
            raise BucketNotFoundError(f"bucket {self.s.bucket!r} does not exist") from None


def storage_from_config(cfg: Any, *, retry: RetryPolicy | None = None) -> Storage:
    """Build the destination named by the config (a ``daemon.config.Config``)."""
    dest = cfg.destination
    part_size = dest.part_size_mb * MiB
    if dest.scheme == "file":
        from .paths import default_local_destination

        own = dest.local_path == default_local_destination()
        return LocalStorage(dest.local_path, part_size=part_size, create=own)
    from .keychain import load_credentials
    from .logs import register_secret

    creds = None if dest.profile else load_credentials()
    settings = S3Settings(
        bucket=dest.bucket,
        prefix=dest.prefix,
        endpoint=dest.endpoint,
        region=dest.region,
        addressing_style=dest.addressing_style,
        profile=dest.profile,
        part_size=part_size,
        concurrency=dest.concurrency,
        retry=retry or RetryPolicy(),
    )
    if creds is not None:
        settings.access_key_id, settings.secret_access_key = creds
        register_secret(settings.secret_access_key)
    return S3Storage(settings)
