"""An HTTP/1.1-aware counting proxy in front of the S3 server.

``tests/helpers/s3server.FaultProxy`` counts TCP connections, but S3 clients keep connections alive,
so one connection carries many requests.  This proxy understands just enough HTTP/1.1 to delimit
messages (``Content-Length``, ``Transfer-Encoding: chunked``, bodiless ``HEAD``/1xx/204/304
responses, ``Expect: 100-continue``) and records every request: method, target, status, bytes each
way, when the request started and when the response headers came back (the moment the server
acknowledged it — for a ``PUT`` that is when the object became durable).  Bytes are forwarded
untouched as they arrive; nothing is buffered whole.  It runs in its own thread with its own event
loop and records times with ``time.time()`` so they compare with other processes' wall clocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


@dataclass
class Request:
    method: str
    target: str
    t_start: float
    req_bytes: int = 0
    status: int = 0
    t_ack: float = 0.0  # response headers received from the server
    t_done: float = 0.0  # response body forwarded
    resp_bytes: int = 0

    @property
    def path(self) -> str:
        return unquote(urlsplit(self.target).path)

    @property
    def query(self) -> str:
        return urlsplit(self.target).query


class _Closed(Exception):
    pass


async def _read_head(r: asyncio.StreamReader) -> bytes | None:
    try:
        return await r.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise _Closed from None
        return None


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    hdrs: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    return lines[0], hdrs


async def _forward_n(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> int:
    left = n
    while left > 0:
        data = await r.read(min(left, 1 << 16))
        if not data:
            raise _Closed
        w.write(data)
        await w.drain()
        left -= len(data)
    return n


async def _forward_chunked(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> int:
    total = 0
    while True:
        line = await r.readuntil(b"\r\n")
        w.write(line)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                t = await r.readuntil(b"\r\n")
                w.write(t)
                if t == b"\r\n":
                    break
            await w.drain()
            return total
        total += await _forward_n(r, w, size + 2) - 2


async def _forward_body(r: asyncio.StreamReader, w: asyncio.StreamWriter, hdrs: dict[str, str]) -> int:
    if "chunked" in hdrs.get("transfer-encoding", "").lower():
        return await _forward_chunked(r, w)
    n = int(hdrs.get("content-length", "0") or 0)
    return await _forward_n(r, w, n) if n else 0


class CountingProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.requests: list[Request] = []
        self.connections = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name="counting-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("counting proxy did not start")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def snapshot(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def count_between(self, t0: float, t1: float) -> list[Request]:
        return [r for r in self.snapshot() if t0 <= r.t_start < t1]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 20)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            ur, uw = await asyncio.open_connection(*self.target, limit=1 << 20)
        except OSError:
            cw.close()
            return
        pending: deque[Request] = deque()

        async def upstream() -> None:
            try:
                while True:
                    head = await _read_head(cr)
                    if head is None:
                        break
                    line, hdrs = _headers(head)
                    parts = line.split(" ")
                    req = Request(parts[0], parts[1] if len(parts) > 1 else "", time.time())
                    pending.append(req)
                    uw.write(head)
                    req.req_bytes = len(head) + await _forward_body(cr, uw, hdrs)
                    await uw.drain()
            except (_Closed, ConnectionError, OSError, asyncio.IncompleteReadError, ValueError):
                pass
            finally:
                # The client is gone: let the server finish what it was asked, then hang up.
                while pending:
                    await asyncio.sleep(0.05)
                with contextlib.suppress(Exception):
                    uw.close()

        async def downstream() -> None:
            try:
                while True:
                    head = await _read_head(ur)
                    if head is None:
                        break
                    line, hdrs = _headers(head)
                    status = int(line.split(" ")[1])
                    now = time.time()
                    cw.write(head)
                    if 100 <= status < 200:
                        await cw.drain()
                        continue
                    req = pending.popleft() if pending else Request("?", "?", now)
                    req.status, req.t_ack = status, now
                    if req.method == "HEAD" or status in (204, 304):
                        n = 0
                    elif "content-length" in hdrs or "chunked" in hdrs.get("transfer-encoding", ""):
                        n = await _forward_body(ur, cw, hdrs)
                    else:  # body until the server closes
                        n = 0
                        while data := await ur.read(1 << 16):
                            cw.write(data)
                            n += len(data)
                    await cw.drain()
                    req.resp_bytes = len(head) + n
                    req.t_done = time.time()
                    with self._lock:
                        self.requests.append(req)
            except (_Closed, ConnectionError, OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                self.errors += 1
            finally:
                with contextlib.suppress(Exception):
                    cw.close()

        try:
            await asyncio.gather(upstream(), downstream())
        finally:
            with contextlib.suppress(Exception):
                uw.close()
            with contextlib.suppress(Exception):
                cw.close()

    def close(self) -> None:
        def stop() -> None:
            if self._server is not None:
                self._server.close()
            self._loop.stop()

        self._loop.call_soon_threadsafe(stop)
        self._thread.join(10)
