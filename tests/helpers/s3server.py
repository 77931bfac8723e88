"""A real S3-protocol server (moto's server mode) in its own process, and a fault-injecting proxy.

Used by the test suite and by bench/: nothing here patches the code under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MotoServer:
    port: int
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_moto(extra_env: dict[str, str] | None = None, timeout: float = 30.0) -> MotoServer:
    """A moto S3 server in its own process, on a free port.

    The port is free when chosen but not reserved: on a busy machine another process can take it
    before moto binds. Then moto exits (or something else answers), and a fresh port is tried.
    """
    deadline = time.monotonic() + timeout
    for _ in range(3):
        server = _try_moto(extra_env, deadline)
        if server is not None:
            return server
    raise RuntimeError("moto server did not start: its port was taken three times")


def _try_moto(extra_env: dict[str, str] | None, deadline: float) -> MotoServer | None:
    port = free_port()
    env = dict(os.environ)
    env.update(extra_env or {})
    # moto logs every request to stderr; a pipe nobody drains would eventually block it.
    log = open(os.devnull, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=log,
        env=env,
    )
    while True:
        if proc.poll() is not None:
            return None  # most likely the port was taken meanwhile
        if _answers_as_moto(port):
            if proc.poll() is None:
                return MotoServer(port=port, proc=proc, env=extra_env or {})
            return None
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(timeout=10)
            raise RuntimeError("moto server did not start in time")
        time.sleep(0.05)


def _answers_as_moto(port: int) -> bool:
    """moto answers on the port (not merely: something listens there). Its own API, not an S3
    request: those count against INITIAL_NO_AUTH_ACTION_COUNT."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET /moto-api/data.json HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while len(data) < 65536:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    # (with auth enforced it is refused, but still by moto's server)
    return data.startswith(b"HTTP/1.") and b"Werkzeug" in data.split(b"\r\n\r\n", 1)[0]


class FaultProxy:
    """A TCP proxy in its own thread: ``cut()`` drops every connection and refuses new ones
    (connections are accepted and reset at once), ``heal()`` restores service, ``latency(s)``
    delays every forwarded chunk, ``blackhole()`` accepts but never answers, and
    ``without_conditionals()`` plays a provider that does not implement If-Match: such requests get
    S3's 501 NotImplemented, the rest go through (one request per connection, so each is seen)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._mode = "ok"
        self._latency = 0.0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self.connections = 0
        self.bytes_forwarded = 0  # both ways, for tests that act once traffic is under way
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(server.wait_closed())

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await r.read(65536)
                if not data or self._mode in ("cut", "blackhole"):
                    break
                if self._latency:
                    await asyncio.sleep(self._latency)
                self.bytes_forwarded += len(data)
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                w.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._mode == "cut":
            self._reset(cw)
            return
        if self._mode == "blackhole":
            self._writers.add(cw)
            return
        head = b""
        if self._mode == "no_conditionals":
            try:
                head = await asyncio.wait_for(cr.readuntil(b"\r\n\r\n"), 10)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
                self._reset(cw)
                return
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
            if "if-match" in headers:
                await self._not_implemented(cr, cw, headers)
                return
            kept = [x for x in lines[1:] if x and not x.lower().startswith("connection:")]
            head = "\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode("latin-1")
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            self._reset(cw)
            return
        self._writers.update((cw, uw))
        try:
            if head:
                uw.write(head)
            await asyncio.gather(self._pipe(cr, uw), self._pipe(ur, cw))
        finally:
            self._writers.discard(cw)
            self._writers.discard(uw)

    @staticmethod
    async def _not_implemented(
        r: asyncio.StreamReader, w: asyncio.StreamWriter, headers: dict[str, str]
    ) -> None:
        with contextlib.suppress(Exception):
            if headers.get("expect", "").lower() != "100-continue":
                await asyncio.wait_for(r.readexactly(int(headers.get("content-length", "0"))), 10)
            body = (
                b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>NotImplemented</Code>'
                b"<Message>A header you provided implies functionality that is not implemented"
                b"</Message><Header>If-Match</Header></Error>"
            )
            w.write(
                b"HTTP/1.1 501 Not Implemented\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await w.drain()
        with contextlib.suppress(Exception):
            w.close()

    @staticmethod
    def _reset(w: asyncio.StreamWriter) -> None:
        sock = w.get_extra_info("socket")
        with contextlib.suppress(Exception):
            # SO_LINGER 0 makes close() send RST, like a dead peer or a firewall reject.
            import struct

            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(Exception):
            w.close()

    def _call(self, fn: object) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                fn()  # type: ignore[operator]
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(10)

    def cut(self) -> None:
        def do() -> None:
            self._mode = "cut"
            for w in list(self._writers):
                self._reset(w)
            self._writers.clear()

        self._call(do)

    def blackhole(self) -> None:
        def do() -> None:
            self._mode = "blackhole"

        self._call(do)

    def heal(self) -> None:
        def do() -> None:
            self._mode = "ok"
            for w in list(self._writers):
                self._reset(w)
            self._writers.clear()

        self._call(do)

    def without_conditionals(self) -> None:
        def do() -> None:
            self._mode = "no_conditionals"
            for w in list(self._writers):  # (kept-alive connections would not be inspected)
                self._reset(w)
            self._writers.clear()

        self._call(do)

    def latency(self, seconds: float) -> None:
        self._latency = seconds

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def create_bucket(endpoint: str, bucket: str, key: str = "testing", secret: str = "testing") -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
    )
    s3.create_bucket(Bucket=bucket)


REPO = Path(__file__).resolve().parents[2]
