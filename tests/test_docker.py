"""daemon.docker against the stand-in `docker` (tests/fakes/docker), which moves real image archives."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon import docker
from daemon.errors import ConfigError, DockerError, IntegrityError
from tests.helpers.rootfactory import create_image, fake_path, make_root, read_calls


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh stand-in Docker store, with the stand-ins first on PATH."""
    state = tmp_path / "docker-a"
    monkeypatch.setenv("PATH", fake_path())
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(state))
    for var in ("FAKE_DOCKER_SAVE_FORMAT", "FAKE_DOCKER_DAEMON_DOWN"):
        monkeypatch.delenv(var, raising=False)
    return state


@pytest.fixture
def images(store: Path) -> dict[str, str]:
    ids = {"ghcr.io/acme/app:1.0": create_image(store, "ghcr.io/acme/app:1.0", 300_000)}
    ids["ghcr.io/acme/worker:2"] = create_image(
        store, "ghcr.io/acme/worker:2", 120_000, base="ghcr.io/acme/app:1.0"
    )
    ids["redis:7"] = create_image(store, "redis:7", 80_000)
    return ids


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


async def replay(data: bytes, chunk: int = 50_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), chunk):
        yield data[i : i + chunk]


def archive_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}  # type: ignore[union-attr]


def docker_pids(store: Path, subcommand: str) -> list[int]:
    return [c["pid"] for c in read_calls(store / "calls.log", "docker") if c["args"][:1] == [subcommand]]


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.subprocess.Process]:
    """Every docker child process daemon.docker starts (a spy; the processes are real)."""
    procs: list[asyncio.subprocess.Process] = []
    real = docker._spawn

    async def spy(*argv: str, **kw: Any) -> asyncio.subprocess.Process:
        proc = await real(*argv, **kw)
        procs.append(proc)
        return proc

    monkeypatch.setattr(docker, "_spawn", spy)
    return procs


def assert_reaped(procs: list[asyncio.subprocess.Process]) -> None:
    assert len(procs) == 1
    assert procs[0].returncode == -9  # killed
    # and reaped: not even a zombie keeps the pid
    with pytest.raises(ProcessLookupError):
        os.kill(procs[0].pid, 0)


# ------------------------------------------------------------------------------------------------
# compose parsing


async def test_compose_images_are_parsed_deduplicated_and_sorted(tmp_path: Path, store: Path) -> None:
    root = make_root(tmp_path / "root", size="tiny", docker_state=store)
    assert await docker.images_from_compose(root.compose_path) == root.images
    assert len(root.images) == 3  # four services, one image used twice


async def test_compose_missing_file_means_no_images(tmp_path: Path) -> None:
    assert await docker.images_from_compose(tmp_path / "nope.yml") == []


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("services:\n  web:\n    image: [unclosed\n", "line 4"),
        ("services:\n  web:\n\timage: x\n", "line 3"),
        ("- just\n- a list\n", "top level is a list"),
        ("services:\n  - web\n", "`services` is a list"),
        ("services:\n  web: nginx\n", "service `web` is a string"),
        ("services:\n  web:\n    image: {name: nginx}\n", "services.web.image` is a dict"),
        ("services:\n  web:\n    image: '-v /:/host'\n", "not a valid image name"),
    ],
)
async def test_compose_malformed_is_a_clear_config_error(tmp_path: Path, text: str, needle: str) -> None:
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(text)
    with pytest.raises(ConfigError) as info:
        await docker.images_from_compose(compose)
    assert needle in info.value.message
    assert str(compose) in info.value.message
    assert "tinyserve deploy" in info.value.fix


async def test_compose_edge_cases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compose = tmp_path / "docker-compose.yml"
    (tmp_path / ".env").write_text("# comment\nAPP_TAG='3.2'\n")
    monkeypatch.setenv("REGISTRY", "ghcr.io/acme")
    monkeypatch.delenv("UNSET_TAG", raising=False)
    compose.write_text(
        "x-common: &common\n  image: redis:7\n"
        "services:\n"
        "  built:\n    build: .\n"  # built locally: nothing to export
        "  empty:\n"
        "  cache:\n    <<: *common\n"
        "  app:\n    image: ${REGISTRY}/app:${APP_TAG}\n"
        "  worker:\n    image: $REGISTRY/worker:${UNSET_TAG:-latest}\n"
        "  price:\n    image: shop/price:$$literal\n"
    )
    assert await docker.images_from_compose(compose) == [
        "ghcr.io/acme/app:3.2",
        "ghcr.io/acme/worker:latest",
        "redis:7",
        "shop/price:$literal",
    ]
    compose.write_text("services:\n  app:\n    image: acme/app:${UNSET_TAG}\n")
    with pytest.raises(ConfigError, match=r"UNSET_TAG, which is not set"):
        await docker.images_from_compose(compose)
    compose.write_text("")
    assert await docker.images_from_compose(compose) == []
    compose.write_bytes(b"services:\n  a:\n    image: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        await docker.images_from_compose(compose)


# ------------------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("layout", ["oci", "legacy"])
async def test_save_load_round_trip_moves_real_archives(
    tmp_path: Path, store: Path, images: dict[str, str], monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    monkeypatch.setenv("FAKE_DOCKER_SAVE_FORMAT", layout)
    refs = sorted(images)
    chunk_sizes: list[int] = []
    parts: list[bytes] = []
    async for chunk in docker.save_images(refs, chunk_size=64 * 1024):
        chunk_sizes.append(len(chunk))
        parts.append(chunk)
    data = b"".join(parts)
    assert max(chunk_sizes) <= 64 * 1024 and len(chunk_sizes) > 3  # streamed, bounded chunks

    # a genuine docker-save archive: manifest, configs named by their digest, layers matching diff_ids
    members = archive_members(data)
    manifest = json.loads(members["manifest.json"])
    assert sorted(t for entry in manifest for t in entry["RepoTags"]) == refs
    for entry in manifest:
        config_bytes = members[entry["Config"]]
        config_digest = hashlib.sha256(config_bytes).hexdigest()
        assert "sha256:" + config_digest in images.values()
        diff_ids = json.loads(config_bytes)["rootfs"]["diff_ids"]
        layers = [members.get(p) for p in entry["Layers"]]
        if layout == "legacy":
            assert all(p.endswith("/layer.tar") for p in entry["Layers"])
        for layer, diff_id in zip(layers, diff_ids, strict=True):
            assert layer is not None
            assert "sha256:" + hashlib.sha256(layer).hexdigest() == diff_id
            with tarfile.open(fileobj=io.BytesIO(layer)) as lt:
                assert any(m.isfile() for m in lt)
    if layout == "oci":
        assert "oci-layout" in members and "index.json" in members
        for name, body in members.items():
            if name.startswith("blobs/sha256/"):
                assert hashlib.sha256(body).hexdigest() == name.rsplit("/", 1)[1]

    # into an empty engine
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(tmp_path / "docker-b"))
    assert await docker.inspect_images(refs) == dict.fromkeys(refs)
    loaded = await docker.load_images(replay(data))
    assert sorted(loaded) == refs
    assert await docker.inspect_images(refs) == images
    # and out again, byte for byte
    assert await collect(docker.save_images(refs)) == data


async def test_save_unknown_image_is_a_docker_error_naming_it(store: Path, images: dict[str, str]) -> None:
    with pytest.raises(DockerError) as info:
        await collect(docker.save_images(["redis:7", "ghcr.io/acme/missing:9"]))
    assert "ghcr.io/acme/missing:9" in info.value.message
    assert "docker pull ghcr.io/acme/missing:9" in info.value.fix


async def test_save_failing_midstream_raises_after_the_partial_output(
    store: Path, images: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DOCKER_SAVE_FAIL_AFTER", "70000")
    got = 0
    with pytest.raises(DockerError) as info:
        async for chunk in docker.save_images(["redis:7"], chunk_size=16 * 1024):
            got += len(chunk)
    assert got == 70000
    assert "exit 1" in info.value.message and "after 70000 bytes" in info.value.message
    assert "simulated failure" in info.value.message


async def test_cancelling_the_consumer_kills_and_reaps_docker_save(
    store: Path, images: dict[str, str], monkeypatch: pytest.MonkeyPatch, spawned: list[Any]
) -> None:
    monkeypatch.setenv("FAKE_DOCKER_SAVE_STALL_AFTER", "40000")  # then hangs, like a wedged engine
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(docker.save_images(["redis:7"], chunk_size=8192)) as chunks:
            async for _ in chunks:
                first_chunk.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert_reaped(spawned)


async def test_closing_the_iterator_early_kills_docker_save(
    store: Path, images: dict[str, str], spawned: list[Any]
) -> None:
    chunks = docker.save_images(sorted(images), chunk_size=4096)
    assert await anext(chunks)
    await asyncio.wait_for(chunks.aclose(), 10)
    assert_reaped(spawned)


async def test_load_refuses_a_damaged_archive(
    tmp_path: Path, store: Path, images: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytearray(await collect(docker.save_images(["redis:7"])))
    data[3000] ^= 0xFF  # inside the first layer blob
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(tmp_path / "docker-b"))
    with pytest.raises(DockerError) as info:
        await docker.load_images(replay(bytes(data)))
    assert "docker load" in info.value.message and "digest" in info.value.message
    truncated = bytes(data[: len(data) // 2])
    with pytest.raises(DockerError, match="unexpected EOF"):
        await docker.load_images(replay(truncated))
    assert await docker.inspect_images(["redis:7"]) == {"redis:7": None}


async def test_failing_source_kills_docker_load_before_anything_is_loaded(
    tmp_path: Path, store: Path, images: dict[str, str], monkeypatch: pytest.MonkeyPatch, spawned: list[Any]
) -> None:
    data = await collect(docker.save_images(["redis:7"]))
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(tmp_path / "docker-b"))
    spawned.clear()

    async def broken() -> AsyncIterator[bytes]:
        yield data[: len(data) - 2048]  # everything but the tar's end: a truncated download
        raise ConnectionResetError("download interrupted")

    with pytest.raises(ConnectionResetError):
        await docker.load_images(broken())
    assert_reaped(spawned)
    assert await docker.inspect_images(["redis:7"]) == {"redis:7": None}


async def test_gated_load_reads_all_but_the_tail_and_loads_only_when_released(
    tmp_path: Path, store: Path, images: dict[str, str], monkeypatch: pytest.MonkeyPatch, spawned: list[Any]
) -> None:
    refs = sorted(images)
    data = await collect(docker.save_images(refs))
    assert len(data) > 4 * docker.TAIL_HOLD_BYTES
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(tmp_path / "docker-b"))
    spawned.clear()
    commit, fed = asyncio.Event(), asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(docker.load_images(replay(data), commit=commit, fed=fed))
        await asyncio.wait_for(fed.wait(), 30)
    waiting = next(e for e in logs if e["event"] == "docker_load_waiting")
    # all but the tail is in docker's hands, and it is still waiting for the end
    assert len(data) - docker.TAIL_HOLD_BYTES - 50_000 <= waiting["fed_bytes"] < len(data)
    load = spawned[0]
    assert load.returncode is None
    assert await docker.inspect_images(refs) == dict.fromkeys(refs)
    commit.set()
    assert sorted(await asyncio.wait_for(task, 30)) == refs
    assert load.returncode == 0
    assert await docker.inspect_images(refs) == images


async def test_gated_load_of_a_source_failing_at_its_end_loads_nothing(
    tmp_path: Path, store: Path, images: dict[str, str], monkeypatch: pytest.MonkeyPatch, spawned: list[Any]
) -> None:
    """A download's checksum is known only after its last byte: that must still stop the load."""
    refs = sorted(images)
    data = await collect(docker.save_images(refs))
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(tmp_path / "docker-b"))
    spawned.clear()

    async def damaged() -> AsyncIterator[bytes]:
        async for chunk in replay(data):
            yield chunk
        raise IntegrityError("images.tar.zst does not match its sha256 in the manifest")

    with pytest.raises(IntegrityError):
        await docker.load_images(damaged(), commit=asyncio.Event())
    assert_reaped(spawned)
    assert await docker.inspect_images(refs) == dict.fromkeys(refs)


async def test_cancelling_a_stalled_load_kills_and_reaps_it(
    tmp_path: Path, store: Path, images: dict[str, str], monkeypatch: pytest.MonkeyPatch, spawned: list[Any]
) -> None:
    data = await collect(docker.save_images(sorted(images)))
    spawned.clear()
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(tmp_path / "docker-b"))
    monkeypatch.setenv("FAKE_DOCKER_LOAD_STALL_AFTER", "10000")  # stops reading: our writes back up
    fed = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 4096):
            if i >= 96 * 1024:  # past what the stalled reader took plus a pipe's worth
                fed.set()
            yield data[i : i + 4096]

    task = asyncio.create_task(docker.load_images(source()))
    await asyncio.wait_for(fed.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert_reaped(spawned)


# ------------------------------------------------------------------------------------------------
# availability


async def test_missing_docker_binary_is_a_docker_error_with_a_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    with pytest.raises(DockerError) as info:
        await collect(docker.save_images(["redis:7"]))
    assert "not found on PATH" in info.value.message
    assert "PATH" in info.value.fix and "/usr/local/bin" in info.value.fix
    with pytest.raises(DockerError):
        await docker.load_images(replay(b""))
    assert await docker.docker_available() is False


async def test_engine_down_is_reported_with_a_fix(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert await docker.docker_available() is True
    assert await docker.check_docker() == "28.2.2-fake"
    monkeypatch.setenv("FAKE_DOCKER_DAEMON_DOWN", "1")
    assert await docker.docker_available() is False
    with pytest.raises(DockerError) as info:
        await collect(docker.save_images(["redis:7"]))
    assert "could not reach the Docker engine" in info.value.message
    assert "start Docker Desktop" in info.value.fix


async def test_option_like_image_names_never_reach_docker(store: Path) -> None:
    for bad in ("--output=/etc/passwd", "", "a b"):
        with pytest.raises(DockerError, match="not a valid image name"):
            await collect(docker.save_images([bad]))
    assert docker_pids(store, "save") == []
