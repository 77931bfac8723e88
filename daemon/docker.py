"""Docker images: which ones a backup needs, and streaming them through `docker save` / `docker load`.

The engine is reached only through the real ``docker`` CLI, looked up on ``PATH`` at call time (tests
put a stand-in first on ``PATH``; launchd agents get a minimal ``PATH``, hence the fix hints).  Archives
are streamed through pipes in bounded chunks — never staged whole in memory or on disk — and a child
process never outlives the call that started it: on error, consumer cancellation or an early
``aclose()`` it is killed and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog
import yaml

from daemon.errors import ConfigError, DockerError
from daemon.streams import CHUNK

log = structlog.get_logger(__name__)

DEFAULT_CHUNK_SIZE = CHUNK
_STDERR_TAIL_BYTES = 4096
_STDOUT_LIMIT_BYTES = 1 << 20  # `docker load` prints one line per image; anything beyond is noise
_REAP_TIMEOUT_S = 10.0
_QUERY_TIMEOUT_S = 30.0

_COMPOSE_FIX = "fix generated/docker-compose.yml, or regenerate it with `tinyserve deploy`"
_NOT_FOUND_FIX = (
    "install Docker Desktop, or make sure `docker` is on the PATH the backup daemon runs with "
    "(launchd agents only get /usr/bin:/bin:/usr/sbin:/sbin; add /usr/local/bin or /opt/homebrew/bin)"
)
_ENGINE_DOWN_FIX = "start Docker Desktop (or the docker service) and try again"
_ENGINE_DOWN = re.compile(r"cannot connect to the docker daemon|is the docker daemon running", re.I)
_NO_SUCH_IMAGE = re.compile(r"no such image:?\s*(\S+)", re.I)


# ------------------------------------------------------------------------------------------------
# Which images: generated/docker-compose.yml


async def images_from_compose(path: Path) -> list[str]:
    """The images named by ``services.*.image`` in a compose file, deduplicated and sorted.

    A missing file means no images (as in the guide's script).  Malformed YAML, or a structure that is
    not a compose file, is a ``ConfigError`` naming the file (and the line, for YAML syntax errors).
    ``${VAR}``-style interpolation is resolved from the environment and a ``.env`` file beside the
    compose file, as ``docker compose`` does.
    """
    return await asyncio.to_thread(_images_from_compose_sync, Path(path))


def _images_from_compose_sync(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        log.info("compose_file_missing", path=str(path))
        return []
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})", _COMPOSE_FIX
        ) from exc
    except OSError as exc:
        raise ConfigError(
            f"cannot read {path}: {exc.strerror}", "check the file's permissions and the tinyserve root"
        ) from exc
    env: dict[str, str] = {**_read_dotenv(path.parent / ".env"), **os.environ}
    images = parse_compose_images(text, source=str(path), env=env)
    log.debug("compose_images_found", path=str(path), images=images)
    return images


def parse_compose_images(
    text: str, *, source: str = "docker-compose.yml", env: Mapping[str, str] | None = None
) -> list[str]:
    """Pure parsing half of :func:`images_from_compose` (``env`` defaults to ``os.environ``)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML ({_yaml_where(exc)})", _COMPOSE_FIX) from exc
    if doc is None:
        return []
    if not isinstance(doc, dict):
        raise ConfigError(
            f"{source} is not a compose file: its top level is a {_kind(doc)}, not a mapping", _COMPOSE_FIX
        )
    services = doc.get("services")
    if services is None:
        return []
    if not isinstance(services, dict):
        raise ConfigError(
            f"{source}: `services` is a {_kind(services)}, not a mapping of services", _COMPOSE_FIX
        )
    environ = os.environ if env is None else env
    images: set[str] = set()
    for name, service in services.items():
        if service is None:
            continue
        if not isinstance(service, dict):
            raise ConfigError(
                f"{source}: service `{name}` is a {_kind(service)}, not a mapping", _COMPOSE_FIX
            )
        if "image" not in service:
            # a service built locally has no image to export; the guide's grep skipped it too
            log.info("compose_service_without_image", source=source, service=str(name))
            continue
        raw = service["image"]
        if not isinstance(raw, str):
            raise ConfigError(
                f"{source}: `services.{name}.image` is a {_kind(raw)}, not an image name", _COMPOSE_FIX
            )
        image = _interpolate(raw, environ, source=source, where=f"services.{name}.image").strip()
        if not image or image.startswith("-") or any(c.isspace() or ord(c) < 32 for c in image):
            raise ConfigError(
                f"{source}: `services.{name}.image` is not a valid image name: {image!r}", _COMPOSE_FIX
            )
        images.add(image)
    return sorted(images)


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(problem)


def _kind(value: object) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


_VAR = re.compile(r"\$(?:(\$)|\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", re.S)


def _interpolate(value: str, env: Mapping[str, str], *, source: str, where: str) -> str:
    def replace(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        if m.group(3):
            return _lookup(m.group(3), None, "", env, source=source, where=where)
        inner = _BRACED.fullmatch(m.group(2) or "")
        if inner is None:
            raise ConfigError(
                f"{source}: `{where}` has an invalid substitution ${{{m.group(2)}}}", _COMPOSE_FIX
            )
        return _lookup(inner.group(1), inner.group(2), inner.group(3) or "", env, source=source, where=where)

    return _VAR.sub(replace, value)


def _lookup(name: str, op: str | None, arg: str, env: Mapping[str, str], *, source: str, where: str) -> str:
    value = env.get(name)
    unset_or_empty = not value
    if op in (":-", "-"):
        return arg if (value is None or (op == ":-" and unset_or_empty)) else str(value)
    if op in (":+", "+"):
        return arg if (value is not None and not (op == ":+" and unset_or_empty)) else ""
    if op in (":?", "?") and (value is None or (op == ":?" and unset_or_empty)):
        raise ConfigError(
            f"{source}: `{where}` needs ${name}: {arg or 'not set'}", f"set {name} in the environment"
        )
    if value is None:
        raise ConfigError(
            f"{source}: `{where}` uses ${name}, which is not set",
            f"set {name} in the environment (or in .env beside the compose file), or write the image out",
        )
    return str(value)


def _read_dotenv(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    out: dict[str, str] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, val = line.removeprefix("export ").partition("=")
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] and val[0] in "'\"":
            val = val[1:-1]
        out[key.strip()] = val
    return out


# ------------------------------------------------------------------------------------------------
# The CLI


def find_docker() -> str:
    """Absolute path of ``docker`` on the current PATH, or a ``DockerError`` saying how to fix it."""
    path = shutil.which("docker")
    if path is None:
        raise DockerError("the `docker` command was not found on PATH", _NOT_FOUND_FIX)
    return path


def _check_refs(images: Iterable[str]) -> list[str]:
    refs = list(dict.fromkeys(images))
    for ref in refs:
        # an image name is passed as an argument: one that looks like an option would be read as one
        if not ref or ref.startswith("-") or any(c.isspace() or ord(c) < 32 for c in ref):
            raise DockerError(f"not a valid image name: {ref!r}", _COMPOSE_FIX)
    return refs


async def _spawn(*argv: str, stdin: int, limit: int = DEFAULT_CHUNK_SIZE) -> asyncio.subprocess.Process:
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=limit,
        )
    except FileNotFoundError as exc:  # vanished between which() and exec
        raise DockerError("the `docker` command was not found on PATH", _NOT_FOUND_FIX) from exc
    except PermissionError as exc:
        raise DockerError(f"`{argv[0]}` is not executable", _NOT_FOUND_FIX) from exc


async def _tail(stream: asyncio.StreamReader | None, keep: int = _STDERR_TAIL_BYTES) -> bytes:
    """Drain a stream (so the child never blocks on a full pipe), keeping only its last bytes."""
    if stream is None:
        return b""
    buf = b""
    while chunk := await stream.read(65536):
        buf = (buf + chunk)[-keep:]
    return buf


async def _terminate(proc: asyncio.subprocess.Process, *tasks: asyncio.Task[Any]) -> None:
    """Kill ``proc`` if it still runs, reap it, and settle the reader tasks; never raises."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    for task in tasks:
        if not task.done():
            task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)

    async def settle() -> None:
        # Python 3.11's Process.wait() returns only once every pipe has reported EOF, and a read
        # transport paused because nobody consumed it never will: drain what the dead child left
        # (at most a pipe's worth) so the wait can finish.
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                while await stream.read(65536):
                    pass
        await proc.wait()

    with contextlib.suppress(TimeoutError, ProcessLookupError, ConnectionError):
        # shielded: a second cancellation must not leave a zombie behind
        await asyncio.wait_for(asyncio.shield(settle()), _REAP_TIMEOUT_S)


def _one_line(raw: bytes, limit: int = 400) -> str:
    text = raw.decode("utf-8", "replace")
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    if not lines:
        return "no error output"
    # docker's useful line is the last "Error…" one; usage text after it is noise
    errors = [line for line in lines if "error" in line.lower() or "cannot" in line.lower()]
    line = (errors or lines)[-1]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _failure(action: str, returncode: int | None, stderr: bytes, *, extra: str = "") -> DockerError:
    text = stderr.decode("utf-8", "replace")
    detail = _one_line(stderr)
    if _ENGINE_DOWN.search(text):
        return DockerError(
            f"`docker {action}` could not reach the Docker engine ({detail})", _ENGINE_DOWN_FIX
        )
    missing = _NO_SUCH_IMAGE.search(text)
    if missing and action == "save":
        image = missing.group(1)
        return DockerError(
            f"image {image} is not present in the local Docker engine, so `docker save` cannot export it",
            f"pull it (`docker pull {image}`), or remove it from the compose file with `tinyserve deploy`",
        )
    if returncode is not None and returncode < 0:
        how = f"was killed by signal {-returncode}"
    else:
        how = f"failed (exit {returncode})"
    return DockerError(f"`docker {action}` {how}{extra}: {detail}")


async def save_images(
    images: Sequence[str], *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> AsyncGenerator[bytes, None]:
    """Stream ``docker save IMAGE...`` (a docker-save tar) in chunks of at most ``chunk_size`` bytes.

    Memory stays bounded by about two chunks.  A non-zero exit raises ``DockerError`` (with the tail of
    docker's stderr) after the last chunk, so a consumer never mistakes a truncated archive for a
    whole one.  Use ``contextlib.aclosing`` (or exhaust the iterator): cancelling the consumer or
    closing the iterator early kills and reaps the ``docker`` process.
    """
    refs = _check_refs(images)
    if not refs:
        raise ValueError("save_images() needs at least one image")
    docker = find_docker()
    started = time.monotonic()
    proc = await _spawn(docker, "save", *refs, stdin=asyncio.subprocess.DEVNULL, limit=chunk_size)
    assert proc.stdout is not None
    stderr_task = asyncio.create_task(_tail(proc.stderr))
    total = 0
    finished = False
    log.info("docker_save_started", images=refs, pid=proc.pid)
    try:
        while chunk := await proc.stdout.read(chunk_size):
            total += len(chunk)
            yield chunk
        returncode = await proc.wait()
        stderr = await stderr_task
        if returncode != 0:
            raise _failure("save", returncode, stderr, extra=f" after {total} bytes")
        finished = True
        log.info(
            "docker_save_done", images=refs, size_bytes=total, seconds=round(time.monotonic() - started, 3)
        )
    finally:
        if not finished:
            log.info("docker_save_stopped", images=refs, size_bytes=total, running=proc.returncode is None)
        await _terminate(proc, stderr_task)


# `docker load` (the classic store and the containerd one alike) reads the whole archive up to
# tar's end-of-archive blocks before it registers an image or moves a tag. Withholding the last
# bytes therefore keeps a fully fed load pending, and killing it then leaves Docker unchanged.
TAIL_HOLD_BYTES = 64 * 1024
# How long `docker load` may take once it has the whole archive (registering layers, no more
# input). In a restore this runs with tinyserved stopped, so a stuck engine must not keep the
# services down for good: past it the load is killed and the restore rolls back. Generous, since
# a real engine unpacks every layer here: minutes for GBs of images on a slow disk.
LOAD_FINISH_TIMEOUT_S = 30 * 60.0


async def load_images(
    chunks: AsyncIterable[bytes],
    *,
    commit: asyncio.Event | None = None,
    fed: asyncio.Event | None = None,
) -> list[str]:
    """Feed a docker-save tar, chunk by chunk, into ``docker load``; return the loaded names.

    Names are what docker prints (``name:tag``, or ``sha256:…`` for an untagged image).  If the
    source raises or the caller is cancelled, ``docker load`` is killed before it sees the end of the
    archive, so a partial archive is never loaded.  The source iterator is not closed here.

    With ``commit``, the archive's last ``TAIL_HOLD_BYTES`` are held back until ``commit`` is set:
    docker does all the work of reading the archive while the caller checks everything else, and
    loads nothing unless the caller lets it finish (cancelling the call kills it).  ``fed`` is set
    once the source is exhausted and everything but that tail has been written.

    Once docker has the whole archive it gets ``LOAD_FINISH_TIMEOUT_S`` to finish; then it is
    killed and a ``DockerError`` raised.
    """
    if commit is None:
        commit = asyncio.Event()
        commit.set()  # the tail goes in as soon as the source ends
    docker = find_docker()
    started = time.monotonic()
    proc = await _spawn(docker, "load", stdin=asyncio.subprocess.PIPE)
    assert proc.stdin is not None
    _widen_pipe(proc.stdin)
    stdout_task = asyncio.create_task(_tail(proc.stdout, _STDOUT_LIMIT_BYTES))
    stderr_task = asyncio.create_task(_tail(proc.stderr))
    fed_bytes = 0
    log.info("docker_load_started", pid=proc.pid)
    held: deque[bytes] = deque()
    held_bytes = 0

    async def send(chunk: bytes) -> bool:
        nonlocal fed_bytes
        assert proc.stdin is not None
        try:
            proc.stdin.write(chunk)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return False  # docker gave up on the archive; its stderr says why
        fed_bytes += len(chunk)
        return True

    try:
        stopped_reading = False
        async for chunk in chunks:
            if not chunk:
                continue
            held.append(chunk)
            held_bytes += len(chunk)
            while len(held) > 1 and held_bytes - len(held[0]) >= TAIL_HOLD_BYTES:
                first = held.popleft()
                held_bytes -= len(first)
                if not await send(first):
                    stopped_reading = True
                    break
            if stopped_reading:
                break
        if not stopped_reading:
            if fed is not None:
                fed.set()
            if not commit.is_set():
                log.info("docker_load_waiting", fed_bytes=fed_bytes, held_bytes=held_bytes)
            exited = asyncio.ensure_future(proc.wait())
            released = asyncio.ensure_future(commit.wait())
            try:
                await asyncio.wait({exited, released}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                released.cancel()
                if not exited.done():
                    exited.cancel()
            if proc.returncode is not None:
                stopped_reading = True  # it ended without the tail: its exit code and stderr say why
            else:
                while held and not stopped_reading:
                    stopped_reading = not await send(held.popleft())
        if not stopped_reading:
            proc.stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await proc.stdin.wait_closed()
        limit = LOAD_FINISH_TIMEOUT_S
        try:
            async with asyncio.timeout(limit):
                returncode = await proc.wait()
        except TimeoutError:
            raise DockerError(
                f"`docker load` did not finish within {limit:g} s of receiving the whole image archive",
                "check that the Docker engine is healthy (`docker info`), then run the restore again",
            ) from None
        stdout, stderr = await stdout_task, await stderr_task
        if returncode != 0:
            raise _failure("load", returncode, stderr, extra=f" after {fed_bytes} bytes")
        if stopped_reading:
            raise DockerError(
                f"`docker load` stopped reading after {fed_bytes} bytes of the image archive",
                "run `tinyserve-backup verify` on this backup; the images archive may be damaged",
            )
        loaded = _parse_loaded(stdout)
        log.info(
            "docker_load_done",
            images=loaded,
            size_bytes=fed_bytes,
            seconds=round(time.monotonic() - started, 3),
        )
        return loaded
    finally:
        await _terminate(proc, stdout_task, stderr_task)


def _widen_pipe(stream: asyncio.StreamWriter) -> None:
    """Grow the pipe to docker (Linux; 64 KiB by default) so a 1 MiB chunk goes in one write."""
    pipe = stream.get_extra_info("pipe")
    setsz = getattr(fcntl, "F_SETPIPE_SZ", None)
    if pipe is None or setsz is None:
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(pipe.fileno(), setsz, DEFAULT_CHUNK_SIZE)


def _parse_loaded(stdout: bytes) -> list[str]:
    loaded: list[str] = []
    for line in stdout.decode("utf-8", "replace").splitlines():
        line = line.strip()
        for prefix in ("Loaded image ID:", "Loaded image:"):
            if line.startswith(prefix):
                loaded.append(line[len(prefix) :].strip())
                break
    return loaded


async def _query(*args: str, timeout_s: float = _QUERY_TIMEOUT_S) -> tuple[int, bytes, bytes]:
    """Run a short docker command to completion (bounded by ``timeout_s``): (exit code, stdout, stderr)."""
    docker = find_docker()
    proc = await _spawn(docker, *args, stdin=asyncio.subprocess.DEVNULL)
    tasks = (
        asyncio.create_task(_tail(proc.stdout, _STDOUT_LIMIT_BYTES)),
        asyncio.create_task(_tail(proc.stderr)),
    )
    try:
        async with asyncio.timeout(timeout_s):
            returncode = await proc.wait()
            stdout, stderr = await tasks[0], await tasks[1]
    except TimeoutError as exc:
        raise DockerError(
            f"`docker {args[0]}` did not answer within {timeout_s:g} s", _ENGINE_DOWN_FIX
        ) from exc
    finally:
        await _terminate(proc, *tasks)
    return returncode, stdout, stderr


async def check_docker(timeout_s: float = 10.0) -> str:
    """The engine's version, or a ``DockerError`` saying why Docker cannot be used (and the fix)."""
    returncode, stdout, stderr = await _query(
        "version", "--format", "{{.Server.Version}}", timeout_s=timeout_s
    )
    version = stdout.decode("utf-8", "replace").strip()
    if returncode != 0 or not version or version == "<no value>":
        raise _failure("version", returncode, stderr)
    return version


async def docker_available(timeout_s: float = 10.0) -> bool:
    """True when the ``docker`` CLI is on PATH and its engine answers."""
    try:
        await check_docker(timeout_s)
    except DockerError as exc:
        log.info("docker_unavailable", reason=exc.message)
        return False
    return True


async def inspect_images(images: Sequence[str]) -> dict[str, str | None]:
    """Image ID (``sha256:…``) of each reference, or None for those the engine does not have."""
    refs = _check_refs(images)

    async def one(ref: str) -> str | None:
        returncode, stdout, stderr = await _query("image", "inspect", "--format", "{{.Id}}", ref)
        if returncode == 0:
            return stdout.decode("utf-8", "replace").strip() or None
        if _NO_SUCH_IMAGE.search(stderr.decode("utf-8", "replace")):
            return None
        raise _failure("image inspect", returncode, stderr)

    ids = await asyncio.gather(*(one(ref) for ref in refs))
    return dict(zip(refs, ids, strict=True))
