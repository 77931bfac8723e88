"""Client-side encryption with age (https://age-encryption.org/v1), through pyrage.

Every object is a standard age file, so ``age -d -i key.txt obj.age | zstd -d | tar -x`` restores
by hand.  Recipients are X25519 (``age1…``) or SSH (``ssh-ed25519``/``ssh-rsa``) public keys; the
identity file is age's format (``# comments`` and ``AGE-SECRET-KEY-1…`` lines) or an unencrypted
OpenSSH private key, and must not be readable by group or others.

Why the plumbing below: pyrage keeps the GIL for as long as it runs Rust code, so a large
``pyrage.encrypt`` on the event loop (or even in a thread) stalls the loop for the whole object.
``encrypt_stream``/``decrypt_stream`` instead run ``pyrage.encrypt_io``/``decrypt_io`` in a worker
thread whose reader and writer are small Python objects: every 8 KiB read and 64 KiB write passes
through Python bytecode, where the interpreter can hand the GIL back to the loop.  Data moves
between the loop and the worker through two byte-bounded channels, so memory stays at a few MiB
whatever the object's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import pyrage
import structlog

from .errors import EncryptionError, IntegrityError, UsageError
from .fsutil import make_private_dirs
from .streams import MiB

log = structlog.get_logger(__name__)

AGE_HEADER = b"age-encryption.org/v1\n"
ENCRYPTION_NAME = "age"
SUFFIX = ".age"

# Per-direction bounds of the loop <-> worker channels.  A put may overshoot by one chunk and the
# worker holds the chunk it is reading, so one stream holds at most
# 2 * CHANNEL_LIMIT + 2 * (the largest chunk fed in) + 64 KiB, whatever the object's size.
CHANNEL_LIMIT = 1 * MiB
# The loop collects ciphertext/plaintext in pieces of this size (fewer wake-ups per MiB).
OUT_BATCH = 256 * 1024
# Below this, *_bytes call pyrage in one go (it holds the GIL for ~1 ms per 256 KiB).
SMALL_BYTES = 512 * 1024
_FILE_CHUNK = 64 * 1024
_JOIN_TIMEOUT = 30.0


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def _short(key: str) -> str:
    key = key.strip()
    return key if len(key) <= 24 else key[:20] + "…"


def parse_recipient(text: str) -> Any:
    """One public key as a pyrage recipient; a malformed key is an EncryptionError naming it."""
    s = text.strip()
    try:
        if s.startswith("age1"):
            return pyrage.x25519.Recipient.from_str(s)
        if s.startswith(("ssh-ed25519 ", "ssh-rsa ")):
            return pyrage.ssh.Recipient.from_str(s)
    except pyrage.RecipientError as exc:
        raise EncryptionError(
            f"encryption recipient {_short(s)!r} is not a valid public key ({exc})",
            "copy the whole `age1…` line printed by `tinyserve-backup keygen`, or a whole line of an "
            "SSH `.pub` file, into `encryption.recipients`",
        ) from None
    raise EncryptionError(
        f"encryption recipient {_short(s)!r} is neither an age key (age1…) nor an SSH key "
        "(ssh-ed25519 …, ssh-rsa …)",
        "fix `encryption.recipients` in the config",
    )


def check_private_file(path: Path) -> os.stat_result:
    """The identity file exists, is a regular file and only its owner can read it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise EncryptionError(
            f"identity file {path} does not exist",
            "copy your age private key there (from your password manager or the other machine), "
            "or fix `encryption.identity_file` in the config",
        ) from None
    except PermissionError:
        raise EncryptionError(
            f"identity file {path} cannot be read (permission denied)",
            f"make it yours and private: `chmod 600 {path}`",
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise EncryptionError(
            f"identity file {path} is not a regular file", "point `encryption.identity_file` at the key file"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise EncryptionError(
            f"identity file {path} is readable by other users (mode {mode:04o}); a private key must "
            "be private",
            f"run `chmod 600 {path}`",
        )
    return st


def load_identities(path: Path) -> list[Any]:
    """Parse an age identity file (or an unencrypted OpenSSH private key) into pyrage identities.

    Messages name the file and the line, never its content.
    """
    path = Path(path)
    check_private_file(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EncryptionError(f"cannot read identity file {path}: {exc.strerror}") from None
    body = raw.lstrip()
    if body.startswith(b"age-encryption.org/") or body.startswith(b"-----BEGIN AGE ENCRYPTED FILE"):
        raise EncryptionError(
            f"identity file {path} is itself passphrase-encrypted",
            f"decrypt it into a private file first (`age -d -o key.txt {path}`, then `chmod 600 key.txt`) "
            "and point `encryption.identity_file` at that",
        )
    if body.startswith(b"-----BEGIN"):
        try:
            return [pyrage.ssh.Identity.from_buffer(raw)]
        except pyrage.IdentityError as exc:
            if "decrypted" in str(exc) or "passphrase" in str(exc).lower():
                raise EncryptionError(
                    f"the SSH key in {path} is protected by a passphrase, which is not supported",
                    "use an unencrypted copy of it (mode 0600) or an age key from `tinyserve-backup keygen`",
                ) from None
            raise EncryptionError(
                f"identity file {path} holds an SSH key of a type age cannot use",
                "use an ssh-ed25519 or ssh-rsa key, or an age key from `tinyserve-backup keygen`",
            ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EncryptionError(
            f"identity file {path} is not a text file", "point `encryption.identity_file` at your age key"
        ) from None
    identities: list[Any] = []
    for n, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("AGE-PLUGIN-"):
            raise EncryptionError(
                f"line {n} of identity file {path} is an age plugin identity, which is not supported",
                "use an X25519 age key (`tinyserve-backup keygen`) or an SSH key",
            )
        if not s.startswith("AGE-SECRET-KEY-1"):
            raise EncryptionError(
                f"line {n} of identity file {path} is not an age secret key (AGE-SECRET-KEY-1…)",
                "the file holds `# comments` and `AGE-SECRET-KEY-1…` lines, as written by "
                "`tinyserve-backup keygen` or `age-keygen`",
            )
        try:
            identities.append(pyrage.x25519.Identity.from_str(s))
        except pyrage.IdentityError:
            raise EncryptionError(
                f"line {n} of identity file {path} is a damaged age secret key",
                "restore the file from your password manager or the other machine",
            ) from None
    if not identities:
        raise EncryptionError(f"identity file {path} holds no key", "put your AGE-SECRET-KEY-1… line into it")
    return identities


@dataclass(frozen=True)
class KeyPair:
    recipient: str  # age1… (public)
    identity: str  # AGE-SECRET-KEY-1… (secret: never log it)


def generate_keypair() -> KeyPair:
    ident = pyrage.x25519.Identity.generate()
    return KeyPair(recipient=str(ident.to_public()), identity=str(ident))


def identity_file_text(kp: KeyPair, now: datetime | None = None) -> str:
    """The same layout age-keygen writes, so either tool reads the other's keys."""
    created = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"# created: {created}\n# public key: {kp.recipient}\n{kp.identity}\n"


def write_new_identity(path: Path, kp: KeyPair) -> None:
    """Write the key with mode 0600 from the first byte; an existing file is never replaced."""
    path = Path(path)
    if os.path.lexists(path):
        raise UsageError(
            f"{path} already exists; refusing to overwrite a private key",
            "pass another --output, or move the old key away first (backups encrypted to it still "
            "need it to restore)",
        )
    make_private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(identity_file_text(kp))
            f.flush()
            os.fsync(f.fileno())
        # link() fails when the name exists, so a key created meanwhile is not replaced either.
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise UsageError(
                f"{path} already exists; refusing to overwrite a private key", "pass another --output"
            ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------
# Loop <-> worker plumbing
# --------------------------------------------------------------------------------------------


@dataclass
class StreamStats:
    """What one encrypt/decrypt stream moved; ``peak_buffered`` is the most it ever held."""

    bytes_in: int = 0
    bytes_out: int = 0
    buffered: int = 0
    peak_buffered: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.buffered += n
            if self.buffered > self.peak_buffered:
                self.peak_buffered = self.buffered

    def sub(self, n: int) -> None:
        with self._lock:
            self.buffered -= n


class _Closed(Exception):
    """The other side went away (the stream is being torn down)."""


class _UpstreamFailed(Exception):
    """The async source raised; the worker must stop (the source's own error is reported)."""


class _WorkerFailed(Exception):
    def __init__(self, exc: BaseException) -> None:
        super().__init__(repr(exc))
        self.exc = exc


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Channel:
    """A byte-bounded FIFO between the event loop (async end) and one worker thread (sync end).

    The async end waits on a future that the thread resolves through ``call_soon_threadsafe``, and
    only when the loop is actually waiting, so a busy stream costs few wake-ups.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int, stats: StreamStats) -> None:
        self._loop = loop
        self._limit = limit
        self._stats = stats
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._items: deque[bytes] = deque()
        self._head_off = 0  # bytes of _items[0] already handed out
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._ready: Callable[[], bool] = lambda: True

    # -- shared ---------------------------------------------------------------------------

    def _changed(self) -> None:
        """Called with the lock held after any change: wake whoever may now proceed."""
        self._cond.notify_all()
        fut = self._waiter
        if fut is not None and self._ready():
            self._waiter = None
            with contextlib.suppress(RuntimeError):  # loop already closed: nobody to wake
                self._loop.call_soon_threadsafe(_resolve, fut)

    def _append(self, data: bytes) -> None:
        self._items.append(data)
        self._size += len(data)
        self._stats.add(len(data))

    def _pop(self, most: int, account: bool = True) -> bytes:
        head = self._items[0]
        off = self._head_off
        if off == 0 and len(head) <= most:
            self._items.popleft()
            out = head
        else:
            out = head[off : off + most]
            if off + len(out) >= len(head):
                self._items.popleft()
                self._head_off = 0
            else:
                self._head_off = off + len(out)
        self._size -= len(out)
        if account:
            self._stats.sub(len(out))
        return out

    def finish(self) -> None:
        with self._lock:
            self._eof = True
            self._changed()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            self._error = exc
            self._changed()

    def close(self) -> None:
        """The consuming side is gone: drop what is buffered and refuse further data."""
        with self._lock:
            self._closed = True
            while self._items:
                self._pop(len(self._items[0]))
            self._changed()

    # -- async end (event loop) -----------------------------------------------------------

    async def put(self, data: bytes) -> None:
        while True:
            with self._lock:
                if self._closed:
                    raise _Closed
                if self._size < self._limit:
                    self._append(data)
                    self._changed()
                    return
                fut = self._loop.create_future()
                self._waiter = fut
                self._ready = lambda: self._size < self._limit or self._closed
            await fut

    async def get(self, batch: int) -> bytes | None:
        """Up to ``batch`` bytes (waiting until that many are there or the stream ended)."""
        while True:
            with self._lock:
                if self._closed:
                    raise _Closed
                ended = self._eof or self._error is not None
                if self._items and (self._size >= batch or ended):
                    parts = []
                    n = 0
                    while self._items and n < batch:
                        piece = self._pop(batch - n)
                        parts.append(piece)
                        n += len(piece)
                    self._changed()
                    return parts[0] if len(parts) == 1 else b"".join(parts)
                if self._error is not None:
                    raise _WorkerFailed(self._error)
                if self._eof:
                    return None
                fut = self._loop.create_future()
                self._waiter = fut
                self._ready = lambda: (
                    self._size >= batch or self._eof or self._error is not None or self._closed
                )
            await fut

    # -- sync end (worker thread) ---------------------------------------------------------

    def put_sync(self, data: bytes) -> None:
        with self._lock:
            while self._size >= self._limit and not self._closed:
                self._cond.wait()
            if self._closed:
                raise _Closed("the stream was closed")
            self._append(data)
            self._changed()

    def take_sync(self) -> bytes:
        """The next whole chunk (b"" at the end).  Its bytes stay counted in the stats until the
        reader calls ``release`` — it still holds them."""
        with self._lock:
            while not self._items and not self._eof and self._error is None and not self._closed:
                self._cond.wait()
            if self._closed:
                raise _Closed("the stream was closed")
            if self._items:
                out = self._pop(len(self._items[0]) - self._head_off, account=False)
                self._changed()
                return out
            if self._error is not None:
                raise _UpstreamFailed("the input stream failed")
            return b""

    def release(self, n: int) -> None:
        self._stats.sub(n)


class _ChannelReader:
    """The file-like object pyrage reads from (runs in the worker thread).

    pyrage asks for 8 KiB at a time; taking a whole chunk from the channel and slicing it here
    keeps the locking to once per chunk."""

    def __init__(self, ch: _Channel) -> None:
        self._ch = ch
        self._buf = memoryview(b"")
        self._off = 0

    def read(self, n: int = -1) -> bytes:
        if self._off >= len(self._buf):
            if self._buf:
                self._ch.release(len(self._buf))
            self._buf = memoryview(self._ch.take_sync())
            self._off = 0
            if not self._buf:
                return b""
        n = n if n and n > 0 else _FILE_CHUNK
        out = bytes(self._buf[self._off : self._off + n])
        self._off += len(out)
        return out


class _ChannelWriter:
    """The file-like object pyrage writes to.  Failures are remembered: pyrage's final flush
    happens in a destructor that swallows errors, and a lost tail must never pass as success."""

    def __init__(self, ch: _Channel) -> None:
        self._ch = ch
        self.failed: BaseException | None = None

    def write(self, data: bytes) -> int:
        try:
            self._ch.put_sync(bytes(data))
        except BaseException as exc:
            self.failed = exc
            raise
        return len(data)

    def flush(self) -> None:
        return None


class _FileReader:
    """A Python-level wrapper so each read runs bytecode (the GIL can change hands in between)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n if n and n > 0 else _FILE_CHUNK)


class _FileWriter:
    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.failed: BaseException | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except BaseException as exc:
            self.failed = exc
            raise

    def flush(self) -> None:
        self._f.flush()


class _MemReader:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        n = n if n and n > 0 else _FILE_CHUNK
        out = bytes(self._view[self._pos : self._pos + n])
        self._pos += len(out)
        return out


class _MemWriter:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.failed: BaseException | None = None

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        return None


Work = Callable[[Any, Any], None]
Classify = Callable[[BaseException], BaseException]


async def _pump(
    source: AsyncIterable[bytes], work: Work, classify: Classify, what: str, stats: StreamStats | None
) -> AsyncIterator[bytes]:
    """Feed ``source`` to ``work(reader, writer)`` in a worker thread; yield what it writes."""
    loop = asyncio.get_running_loop()
    st = stats if stats is not None else StreamStats()
    inbox = _Channel(loop, CHANNEL_LIMIT, st)
    outbox = _Channel(loop, CHANNEL_LIMIT, st)
    upstream: list[BaseException] = []
    done: asyncio.Future[None] = loop.create_future()

    async def feed() -> None:
        finished = False
        try:
            async for chunk in source:
                if chunk:
                    st.bytes_in += len(chunk)
                    await inbox.put(bytes(chunk))
            finished = True
            inbox.finish()
        except _Closed:
            pass  # the worker stopped reading; its own outcome is what gets reported
        except BaseException as exc:
            upstream.append(exc)
            inbox.fail(exc)
            raise
        finally:
            aclose = getattr(source, "aclose", None)
            if not finished and aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def run() -> None:
        writer = _ChannelWriter(outbox)
        try:
            work(_ChannelReader(inbox), writer)
            if writer.failed is not None:
                raise writer.failed
            outbox.finish()
        except BaseException as exc:
            outbox.fail(exc)
        finally:
            inbox.close()
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, done)

    feeder = asyncio.create_task(feed(), name=f"age-feed-{what}")
    worker = threading.Thread(target=run, name=f"age-{what}", daemon=True)
    worker.start()
    try:
        while True:
            try:
                data = await outbox.get(OUT_BATCH)
            except _WorkerFailed as wf:
                if upstream:
                    raise upstream[0] from None
                raise classify(wf.exc) from None
            if data is None:
                break
            st.bytes_out += len(data)
            yield data
    finally:
        inbox.close()
        outbox.close()
        if not feeder.done():
            feeder.cancel()
        await asyncio.wait([feeder, done], timeout=_JOIN_TIMEOUT)
        if feeder.done() and not feeder.cancelled():
            feeder.exception()  # retrieved here; re-raised above when it mattered


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class Encryptor:
    """Encrypts to a fixed set of recipients.  ``recipients`` are public keys (age1…, ssh-…).

    ``encrypt_stream`` is for the event loop; ``encrypt_bytes``/``encrypt_file`` are blocking and
    belong in a worker thread (``asyncio.to_thread``).  An Encryptor is also a
    ``Callable[[bytes], bytes]`` (== ``encrypt_bytes``) for hooks that take one.
    """

    def __init__(self, recipients: Sequence[str]) -> None:
        if not recipients:
            raise EncryptionError("encryption needs at least one recipient", "set `encryption.recipients`")
        self.recipients = [r.strip() for r in recipients]
        self._recipients = [parse_recipient(r) for r in self.recipients]

    def __repr__(self) -> str:
        return f"Encryptor({len(self.recipients)} recipients)"

    def _classify(self, what: str) -> Classify:
        def classify(exc: BaseException) -> BaseException:
            if isinstance(exc, EncryptionError | IntegrityError):
                return exc
            return EncryptionError(f"age encryption of {what} failed: {exc}", "report this as a bug")

        return classify

    def encrypt_stream(
        self, chunks: AsyncIterable[bytes], *, what: str = "object", stats: StreamStats | None = None
    ) -> AsyncIterator[bytes]:
        recipients = self._recipients

        def work(reader: Any, writer: Any) -> None:
            pyrage.encrypt_io(reader, writer, recipients)

        return _pump(chunks, work, self._classify(what), what, stats)

    def encrypt_bytes(self, data: bytes | bytearray | memoryview) -> bytes:
        if len(data) <= SMALL_BYTES:
            try:
                return bytes(pyrage.encrypt(bytes(data), self._recipients))
            except pyrage.EncryptError as exc:
                raise self._classify("data")(exc) from None
        out = _MemWriter()
        try:
            pyrage.encrypt_io(_MemReader(data), out, self._recipients)
        except pyrage.EncryptError as exc:
            raise self._classify("data")(exc) from None
        return b"".join(out.parts)

    __call__ = encrypt_bytes

    def encrypt_file(self, src: Path, dst: Path) -> None:
        """Stream ``src`` into the age file ``dst`` (blocking; memory stays at a few chunks)."""
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            writer = _FileWriter(fo)
            try:
                pyrage.encrypt_io(_FileReader(fi), writer, self._recipients)
            except pyrage.EncryptError as exc:
                if isinstance(writer.failed, OSError):
                    raise writer.failed from None
                raise self._classify(str(src))(exc) from None
            if writer.failed is not None:
                raise writer.failed
            fo.flush()
            os.fsync(fo.fileno())


def _decrypt_error(exc: BaseException, what: str, source: str) -> BaseException:
    if isinstance(exc, EncryptionError | IntegrityError):
        return exc
    text = str(exc)
    if isinstance(exc, pyrage.DecryptError) and "No matching keys" in text:
        return EncryptionError(
            f"cannot decrypt {what}: no key in {source} matches the recipients it was encrypted to",
            "set `encryption.identity_file` to the private key of a recipient that was configured "
            "when this backup was made",
        )
    if isinstance(exc, pyrage.DecryptError) and ("Header" in text or "header" in text or "fill" in text):
        return IntegrityError(
            f"{what} is not a valid age file (damaged, truncated or not encrypted): {text}",
            "run `tinyserve-backup verify --all` and restore from another backup",
        )
    return IntegrityError(
        f"{what} is damaged or truncated: age authentication failed ({text})",
        "run `tinyserve-backup verify --all` and restore from another backup",
    )


class Decryptor:
    """Decrypts with one or more identities (private keys).

    ``decrypt_stream`` is for the event loop; ``decrypt_bytes``/``decrypt_file`` are blocking and
    belong in a worker thread.  A wrong key is an EncryptionError; damaged or truncated ciphertext
    is an IntegrityError.  A Decryptor is also a ``Callable[[bytes], bytes]`` (== ``decrypt_bytes``).
    """

    def __init__(self, identities: Sequence[Any], source: str = "the configured identity") -> None:
        if not identities:
            raise EncryptionError("no identities to decrypt with", "set `encryption.identity_file`")
        self._identities = list(identities)
        self.source = source

    @classmethod
    def from_file(cls, path: Path) -> Decryptor:
        return cls(load_identities(Path(path)), source=f"identity file {path}")

    def __repr__(self) -> str:
        return f"Decryptor({self.source})"

    def decrypt_stream(
        self, chunks: AsyncIterable[bytes], *, what: str = "the object", stats: StreamStats | None = None
    ) -> AsyncIterator[bytes]:
        identities = self._identities

        def work(reader: Any, writer: Any) -> None:
            pyrage.decrypt_io(reader, writer, identities)

        return _pump(chunks, work, lambda exc: _decrypt_error(exc, what, self.source), what, stats)

    def decrypt_bytes(self, data: bytes | bytearray | memoryview, what: str = "the object") -> bytes:
        try:
            if len(data) <= SMALL_BYTES:
                return bytes(pyrage.decrypt(bytes(data), self._identities))
            out = _MemWriter()
            pyrage.decrypt_io(_MemReader(data), out, self._identities)
            return b"".join(out.parts)
        except (pyrage.DecryptError, OSError) as exc:
            raise _decrypt_error(exc, what, self.source) from None

    __call__ = decrypt_bytes

    def decrypt_file(self, src: Path, dst: Path, what: str | None = None) -> None:
        """Decrypt the age file ``src`` into ``dst`` (blocking, streaming).  On failure ``dst`` is
        removed, so a partial plaintext never looks like a result."""
        name = what or str(src)
        try:
            with open(src, "rb") as fi, open(dst, "wb") as fo:
                writer = _FileWriter(fo)
                try:
                    pyrage.decrypt_io(_FileReader(fi), writer, self._identities)
                except (pyrage.DecryptError, OSError) as exc:
                    if isinstance(writer.failed, OSError):
                        raise writer.failed from None
                    raise _decrypt_error(exc, name, self.source) from None
                if writer.failed is not None:
                    raise writer.failed
                fo.flush()
                os.fsync(fo.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)
            raise


def is_age(data: bytes) -> bool:
    return data.startswith(AGE_HEADER)


def encryptor_from_config(cfg: Any) -> Encryptor | None:
    """An Encryptor when ``encryption.recipients`` is set, else None (objects stay plain)."""
    recipients = list(cfg.encryption.recipients or [])
    if not recipients:
        return None
    enc = Encryptor(recipients)
    log.debug("encryption_enabled", recipients=len(recipients))
    return enc


def decryptor_from_config(cfg: Any) -> Decryptor | None:
    """A Decryptor from ``encryption.identity_file``, or None when it is not set.

    A set but missing, unreadable, group/other-readable or malformed file fails here, before any
    restore or verify work starts.
    """
    path = cfg.encryption.identity_file
    if path is None:
        return None
    return Decryptor.from_file(Path(path))
