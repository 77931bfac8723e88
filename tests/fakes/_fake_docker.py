"""The engine behind the stand-in ``docker`` CLI (tests/fakes/docker), stdlib only.

It keeps a tiny image store in a directory and speaks the real ``docker save`` archive format, so the
code under test moves genuine image archives around:

    $FAKE_DOCKER_STATE/            (default: <TMPDIR>/fake-docker-state)
        blobs/sha256/<hex>          layer tars (uncompressed) and image configs, content-addressed
        images/<config hex>.json    one per image: {"size": …}
        tags.json                   {"nginx:1.25": "<config hex>", …}
        calls.log                   one JSON line per invocation ({"prog","args","pid","time"})
        tmp/                        staging for load/create

``docker save`` writes the docker 25+ layout by default (``oci-layout``, ``index.json``,
``blobs/sha256/…``, plus the legacy ``manifest.json`` and ``repositories``); with
``FAKE_DOCKER_SAVE_FORMAT=legacy`` it writes the pre-25 layout (``<id>/layer.tar``, ``<id>/json``,
``<config hex>.json``, ``manifest.json``, ``repositories``).  ``docker load`` accepts either (plain or
gzip/bzip2/xz-compressed), and checks what a real engine checks: a manifest, every referenced file
present, blob names matching their sha256, layer sha256 matching the config's ``rootfs.diff_ids``,
layers being readable tars.  Everything is deterministic: the same ``fake-create`` arguments give the
same image ID in any store, and ``docker save`` of the same images gives identical bytes.

Fault injection (environment):
    FAKE_DOCKER_DAEMON_DOWN=1              every engine command fails like a stopped Docker Desktop
    FAKE_DOCKER_SAVE_FAIL_AFTER=N          `save` writes N bytes, then fails (stderr message, exit 1)
    FAKE_DOCKER_SAVE_STALL_AFTER=N         `save` writes N bytes, then hangs (for cancellation tests)
    FAKE_DOCKER_LOAD_STALL_AFTER=N         `load` reads N bytes, then stops reading and hangs
    FAKE_DOCKER_LOAD_FAIL_AT_END=1         `load` reads the whole archive, then fails like an engine
                                           whose disk is full, before registering anything
    FAKE_DOCKER_LOAD_GATE=PATH             `load` reads the whole archive, creates PATH.reached, and
                                           registers the images only once PATH exists (at most 30 s)
    FAKE_DOCKER_SAVE_FORMAT=oci|legacy     archive layout written by `save` (default oci)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

try:
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FIXED_MTIME = 1767225600  # 2026-01-01T00:00:00Z: archives are byte-for-byte reproducible
CREATED = "2026-01-01T00:00:00Z"
SERVER_VERSION = "28.2.2-fake"
API_VERSION = "1.50"
DAEMON_DOWN = (
    "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker daemon running?"
)
CHUNK = 1 << 20


class DockerFail(Exception):
    """Exit with ``code`` after printing ``message`` on stderr, as the real CLI does."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# ----------------------------------------------------------------------------------------------
# Deterministic content shared with tests/helpers/rootfactory.py


def _text_table() -> bytes:
    """A 256-entry byte map with roughly English letter frequencies.

    Random bytes pushed through it look like text to a compressor (about 4 bits of entropy per
    character, ~2x with gzip or zstd alike) without any long repeats that one compressor could
    exploit and the other not — so benchmarks compare codecs fairly.
    """
    weights = {
        " ": 44,
        "e": 25,
        "t": 18,
        "a": 16,
        "o": 15,
        "i": 14,
        "n": 14,
        "s": 13,
        "r": 12,
        "h": 12,
        "l": 8,
        "d": 8,
        "c": 6,
        "u": 6,
        "m": 5,
        "\n": 5,
        "f": 4,
        "p": 4,
        "g": 4,
        "w": 4,
        "y": 4,
        "b": 3,
        ",": 3,
        ".": 3,
        "v": 2,
        "k": 2,
        "=": 2,
        ":": 2,
        "0": 1,
        "1": 1,
        "2": 1,
        "x": 1,
        "j": 1,
        "q": 1,
        "z": 1,
        "{": 1,
        "}": 1,
        '"': 1,
        "-": 1,
        "_": 1,
    }
    chars: list[str] = []
    for ch, w in weights.items():
        chars.extend(ch * w)
    while len(chars) < 256:
        chars.append(" ")
    return "".join(chars[:256]).encode()


TEXT_TABLE = _text_table()


def text_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n).translate(TEXT_TABLE)


def binary_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def content_chunks(rng: random.Random, size: int, kind: str) -> Iterator[bytes]:
    """``size`` bytes of ``kind`` ("text" or "binary") content in chunks of at most 1 MiB."""
    make = text_bytes if kind == "text" else binary_bytes
    left = size
    while left > 0:
        n = min(CHUNK, left)
        yield make(rng, n)
        left -= n


def seeded_rng(*parts: object) -> random.Random:
    material = "|".join(str(p) for p in parts).encode()
    return random.Random(int.from_bytes(hashlib.sha256(material).digest()[:16], "big"))


# ----------------------------------------------------------------------------------------------
# A minimal streaming tar writer (Go's archive/tar output shape: entries, then two zero blocks)


class Limit(Exception):
    pass


class TarWriter:
    def __init__(
        self,
        fd: int,
        *,
        hasher: Any = None,
        limit: int | None = None,
        on_limit: Callable[[], None] | None = None,
    ) -> None:
        self.fd = fd
        self.hasher = hasher
        self.written = 0
        self.limit = limit
        self.on_limit = on_limit
        self._sendfile_ok = hasher is None

    def _room(self, n: int) -> int:
        if self.limit is None:
            return n
        return max(0, min(n, self.limit - self.written))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        room = self._room(len(view))
        pos = 0
        while pos < room:
            pos += os.write(self.fd, view[pos:room])
        if self.hasher is not None:
            self.hasher.update(view[:room])
        self.written += room
        if room < len(view):
            self._hit_limit()

    def _hit_limit(self) -> None:
        if self.on_limit is not None:
            self.on_limit()
        raise Limit()

    def _header(self, info: tarfile.TarInfo) -> None:
        info.mtime = FIXED_MTIME if info.mtime == 0 else info.mtime
        info.uname = info.gname = ""
        self._write(info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"))

    def _pad(self, size: int) -> None:
        rem = size % tarfile.BLOCKSIZE
        if rem:
            self._write(b"\0" * (tarfile.BLOCKSIZE - rem))

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        info = tarfile.TarInfo(name.rstrip("/") + "/")
        info.type = tarfile.DIRTYPE
        info.mode = mode
        self._header(info)

    def add_bytes(self, name: str, data: bytes, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = mode
        self._header(info)
        self._write(data)
        self._pad(len(data))

    def add_symlink(self, name: str, target: str) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        info.mode = 0o777
        self._header(info)

    def add_chunks(self, name: str, size: int, chunks: Iterable[bytes], mode: int = 0o644) -> None:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = mode
        self._header(info)
        total = 0
        for chunk in chunks:
            self._write(chunk)
            total += len(chunk)
        if total != size:
            raise AssertionError(f"{name}: wrote {total} bytes, header says {size}")
        self._pad(size)

    def add_file(self, name: str, path: str, mode: int = 0o644) -> None:
        size = os.stat(path).st_size
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = mode
        self._header(info)
        with open(path, "rb") as src:
            self._copy(src, size)
        self._pad(size)

    def _copy(self, src: BinaryIO, size: int) -> None:
        offset = 0
        while offset < size:
            want = self._room(min(8 * CHUNK, size - offset))
            if want == 0:
                self._hit_limit()
            sent = 0
            if self._sendfile_ok:
                try:
                    sent = os.sendfile(self.fd, src.fileno(), offset, want)
                except OSError as exc:
                    if exc.errno in (22, 38, 95):  # EINVAL/ENOSYS/EOPNOTSUPP: no sendfile here
                        self._sendfile_ok = False
                    else:
                        raise
            if sent:
                self.written += sent
                offset += sent
                continue
            src.seek(offset)
            data = src.read(want)
            if not data:
                raise OSError(f"short read copying {src.name}")
            self._write(data)
            offset += len(data)

    def close(self) -> None:
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))


# ----------------------------------------------------------------------------------------------
# The store


def default_state_dir() -> str:
    return os.environ.get("FAKE_DOCKER_STATE") or os.path.join(tempfile.gettempdir(), "fake-docker-state")


def normalize_ref(ref: str) -> str:
    """``nginx`` → ``nginx:latest``; ``docker.io/library/nginx:1`` → ``nginx:1`` (docker's familiar form)."""
    if not ref or any(c.isspace() for c in ref) or ref.startswith("-"):
        raise DockerFail(f'invalid reference format: "{ref}"')
    digest = ""
    if "@" in ref:
        ref, digest = ref.split("@", 1)
        digest = "@" + digest
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = ref.rsplit(":", 1)
    else:
        name, tag = ref, ("" if digest else "latest")
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/", "index.docker.io/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if name != name.lower() or not re.fullmatch(r"[a-z0-9][a-z0-9._/:-]*", name):
        raise DockerFail(f"invalid reference format: repository name ({name}) must be lowercase")
    return name + (":" + tag if tag else "") + digest


class Store:
    def __init__(self, root: str | None = None) -> None:
        self.root = root or default_state_dir()
        self.blobs = os.path.join(self.root, "blobs", "sha256")
        self.images_dir = os.path.join(self.root, "images")
        self.tmp = os.path.join(self.root, "tmp")
        for d in (self.blobs, self.images_dir, self.tmp):
            os.makedirs(d, exist_ok=True)
        self.tags_path = os.path.join(self.root, "tags.json")

    # -- locking and metadata
    def locked(self) -> _Lock:
        return _Lock(os.path.join(self.root, "lock"))

    def tags(self) -> dict[str, str]:
        try:
            with open(self.tags_path) as fh:
                data: dict[str, str] = json.load(fh)
                return data
        except FileNotFoundError:
            return {}

    def _write_json(self, path: str, data: Any) -> None:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write_json(self.tags_path, tags)

    def blob_path(self, hex_digest: str) -> str:
        return os.path.join(self.blobs, hex_digest)

    def has_image(self, image_hex: str) -> bool:
        return os.path.exists(os.path.join(self.images_dir, image_hex + ".json"))

    def image_ids(self) -> list[str]:
        return sorted(n[:-5] for n in os.listdir(self.images_dir) if n.endswith(".json"))

    def config(self, image_hex: str) -> dict[str, Any]:
        with open(self.blob_path(image_hex), "rb") as fh:
            data: dict[str, Any] = json.loads(fh.read())
            return data

    def layers(self, image_hex: str) -> list[str]:
        return [d.split(":", 1)[1] for d in self.config(image_hex)["rootfs"]["diff_ids"]]

    def image_size(self, image_hex: str) -> int:
        return sum(os.stat(self.blob_path(h)).st_size for h in self.layers(image_hex))

    def register(self, image_hex: str, refs: Iterable[str]) -> None:
        """Record an image (its blobs already stored) and point ``refs`` at it.  Caller holds the lock."""
        self._write_json(os.path.join(self.images_dir, image_hex + ".json"), {"id": image_hex})
        tags = self.tags()
        for ref in refs:
            tags[normalize_ref(ref)] = image_hex
        self.set_tags(tags)

    def resolve(self, ref: str) -> str | None:
        """Image config hex for a name, ``sha256:<hex>``, or an ID prefix; None when unknown."""
        candidate = ref[7:] if ref.startswith("sha256:") else ref
        if re.fullmatch(r"[0-9a-f]{4,64}", candidate):
            hits = [i for i in self.image_ids() if i.startswith(candidate)]
            if len(hits) == 1:
                return hits[0]
        try:
            key = normalize_ref(ref)
        except DockerFail:
            return None
        return self.tags().get(key)

    def store_blob_file(self, path: str, hex_digest: str) -> None:
        dest = self.blob_path(hex_digest)
        if os.path.exists(dest):
            os.unlink(path)
        else:
            os.replace(path, dest)

    def store_blob_bytes(self, data: bytes) -> str:
        hex_digest = hashlib.sha256(data).hexdigest()
        dest = self.blob_path(hex_digest)
        if not os.path.exists(dest):
            tmp = os.path.join(self.tmp, f"blob.{os.getpid()}.{hex_digest[:12]}")
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, dest)
        return hex_digest

    def gc(self) -> None:
        """Drop blobs no image needs.  Caller holds the lock."""
        keep: set[str] = set()
        for image_hex in self.image_ids():
            keep.add(image_hex)
            keep.update(self.layers(image_hex))
        for name in os.listdir(self.blobs):
            if name not in keep:
                os.unlink(self.blob_path(name))


class _Lock:
    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> _Lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


# ----------------------------------------------------------------------------------------------
# fake-create: seed the store with a deterministic image of roughly the requested size


def _layer_plan(rng: random.Random, size: int, index: int) -> Iterator[tuple[str, int, str, int]]:
    """(path, size, kind, mode) of the files of one layer, totalling ``size`` bytes."""
    yield (f"etc/fake-layer-{index}.conf", 200, "text", 0o644)
    left = max(0, size - 200)
    n = 0
    while left > 0:
        kind = "binary" if n % 2 == 0 else "text"
        file_size = min(left, rng.randint(1, 8) * (CHUNK // 2) if left > 64 * 1024 else left)
        if kind == "binary":
            path = f"usr/lib/fake/layer{index}/lib{n:04d}.so"
            mode = 0o755
        else:
            path = f"usr/share/fake/layer{index}/doc{n:04d}.txt"
            mode = 0o644
        yield (path, file_size, kind, mode)
        left -= file_size
        n += 1


def _write_layer(store: Store, rng: random.Random, size: int, index: int) -> str:
    hasher = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=store.tmp, prefix="layer.")
    try:
        writer = TarWriter(fd, hasher=hasher)
        dirs_done: set[str] = set()
        for path, file_size, kind, mode in _layer_plan(rng, size, index):
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs_done:
                    writer.add_dir(d)
                    dirs_done.add(d)
            writer.add_chunks(path, file_size, content_chunks(rng, file_size, kind), mode)
        writer.close()
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    hex_digest = hasher.hexdigest()
    store.store_blob_file(tmp, hex_digest)
    return hex_digest


def create_image(
    state_dir: str | None,
    ref: str,
    size: int,
    *,
    seed: int = 0,
    layers: int | None = None,
    base: str | None = None,
) -> str:
    """Create (or re-create identically) image ``ref`` with about ``size`` bytes of layer content.

    ``base`` names an image already in the store whose layers this one starts with, as ``FROM``
    does; shared layers appear once in a multi-image ``docker save``.  Returns ``sha256:<id>``.
    """
    store = Store(state_dir)
    normalized = normalize_ref(ref)
    base_layers: list[str] = []
    history: list[dict[str, Any]] = []
    if base is not None:
        base_hex = store.resolve(base)
        if base_hex is None:
            raise DockerFail(f"Error response from daemon: No such image: {base}")
        base_cfg = store.config(base_hex)
        base_layers = [d for d in base_cfg["rootfs"]["diff_ids"]]
        history = list(base_cfg.get("history", []))
    count = layers if layers is not None else (2 if base else 3)
    count = max(1, count)
    rng = seeded_rng("fake-create", normalized, size, seed, base_layers)
    weights = [count - i for i in range(count)]  # bigger layers first, as base images usually are
    sizes = [size * w // sum(weights) for w in weights]
    sizes[0] += size - sum(sizes)
    new_layers = []
    for i, layer_size in enumerate(sizes):
        new_layers.append("sha256:" + _write_layer(store, rng, layer_size, len(base_layers) + i))
        history.append(
            {"created": CREATED, "created_by": f"/bin/sh -c #(nop) fake layer {i} of {normalized}"}
        )
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"dev.tinyserve.fake": "1", "dev.tinyserve.fake.name": normalized},
        },
        "rootfs": {"type": "layers", "diff_ids": base_layers + new_layers},
        "history": history,
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    with store.locked():
        image_hex = store.store_blob_bytes(config_bytes)
        store.register(image_hex, [normalized])
    return "sha256:" + image_hex


# ----------------------------------------------------------------------------------------------
# save


def _oci_manifest(store: Store, image_hex: str) -> bytes:
    config_size = os.stat(store.blob_path(image_hex)).st_size
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + image_hex,
            "size": config_size,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": "sha256:" + h,
                "size": os.stat(store.blob_path(h)).st_size,
            }
            for h in store.layers(image_hex)
        ],
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


def _repositories(groups: list[tuple[str, list[str]]], last_layer: Callable[[str], str]) -> bytes:
    repos: dict[str, dict[str, str]] = {}
    for image_hex, refs in groups:
        for ref in refs:
            if "@" in ref:
                continue
            name, tag = ref.rsplit(":", 1)
            repos.setdefault(name, {})[tag] = last_layer(image_hex)
    return json.dumps(repos, separators=(",", ":")).encode() + b"\n"


def _v1_ids(layers: list[str]) -> list[str]:
    ids: list[str] = []
    parent = ""
    for h in layers:
        parent = hashlib.sha256(f"{parent}|{h}".encode()).hexdigest()
        ids.append(parent)
    return ids


def save(store: Store, refs: list[str], fd: int, fmt: str = "oci") -> None:
    groups: list[tuple[str, list[str]]] = []  # (image hex, refs naming it) in request order
    index: dict[str, int] = {}
    for ref in refs:
        image_hex = store.resolve(ref)
        if image_hex is None or not store.has_image(image_hex):
            raise DockerFail(f"Error response from daemon: No such image: {ref}")
        by_id = ref.startswith("sha256:") or image_hex.startswith(ref)
        name = None if by_id else normalize_ref(ref)
        if image_hex not in index:
            index[image_hex] = len(groups)
            groups.append((image_hex, []))
        bucket = groups[index[image_hex]][1]
        if name and name not in bucket:
            bucket.append(name)

    limit, on_limit = _save_fault()
    writer = TarWriter(fd, limit=limit, on_limit=on_limit)
    try:
        if fmt == "legacy":
            _save_legacy(store, groups, writer)
        else:
            _save_oci(store, groups, writer)
        writer.close()
    except Limit:
        pass


def _save_fault() -> tuple[int | None, Callable[[], None] | None]:
    fail = os.environ.get("FAKE_DOCKER_SAVE_FAIL_AFTER")
    stall = os.environ.get("FAKE_DOCKER_SAVE_STALL_AFTER")
    if fail:

        def do_fail() -> None:
            raise DockerFail("Error response from daemon: simulated failure: write /dev/stdout: i/o error")

        return int(fail), do_fail
    if stall:

        def do_stall() -> None:
            time.sleep(3600)

        return int(stall), do_stall
    return None, None


def _save_oci(store: Store, groups: list[tuple[str, list[str]]], writer: TarWriter) -> None:
    writer.add_dir("blobs")
    writer.add_dir("blobs/sha256")
    written: set[str] = set()
    manifests: list[tuple[str, list[str], bytes]] = []
    for image_hex, refs in groups:
        for h in store.layers(image_hex):
            if h not in written:
                writer.add_file(f"blobs/sha256/{h}", store.blob_path(h))
                written.add(h)
        if image_hex not in written:
            writer.add_file(f"blobs/sha256/{image_hex}", store.blob_path(image_hex))
            written.add(image_hex)
        manifest = _oci_manifest(store, image_hex)
        manifest_hex = hashlib.sha256(manifest).hexdigest()
        if manifest_hex not in written:
            writer.add_bytes(f"blobs/sha256/{manifest_hex}", manifest)
            written.add(manifest_hex)
        manifests.append((image_hex, refs, manifest))
    index_entries = []
    for _image_hex, refs, manifest in manifests:
        entry_base = {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
            "size": len(manifest),
        }
        if not refs:
            index_entries.append(entry_base)
        for ref in refs:
            full = (
                ref
                if "/" in ref.split(":")[0] and "." in ref.split("/")[0]
                else "docker.io/" + (ref if "/" in ref.split(":")[0] else "library/" + ref)
            )
            annotations = {"io.containerd.image.name": full}
            if "@" not in ref:
                annotations["org.opencontainers.image.ref.name"] = ref.rsplit(":", 1)[1]
            index_entries.append({**entry_base, "annotations": annotations})
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": index_entries,
    }
    writer.add_bytes("index.json", json.dumps(index, separators=(",", ":")).encode() + b"\n")
    legacy = [
        {
            "Config": f"blobs/sha256/{image_hex}",
            "RepoTags": refs or None,
            "Layers": [f"blobs/sha256/{h}" for h in store.layers(image_hex)],
        }
        for image_hex, refs, _m in manifests
    ]
    writer.add_bytes("manifest.json", json.dumps(legacy, separators=(",", ":")).encode() + b"\n")
    writer.add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    writer.add_bytes("repositories", _repositories(groups, lambda i: store.layers(i)[-1]))


def _save_legacy(store: Store, groups: list[tuple[str, list[str]]], writer: TarWriter) -> None:
    entries: list[tuple[str, Callable[[], None]]] = []
    seen_layer_dirs: dict[str, str] = {}  # layer hex -> first dir holding it
    manifest = []
    last_v1: dict[str, str] = {}
    for image_hex, refs in groups:
        layers = store.layers(image_hex)
        v1_ids = _v1_ids(layers)
        last_v1[image_hex] = v1_ids[-1]
        for i, (h, v1) in enumerate(zip(layers, v1_ids, strict=True)):
            if any(name == v1 + "/" for name, _ in entries):
                continue
            v1_json = json.dumps(
                {
                    "id": v1,
                    "parent": v1_ids[i - 1] if i else None,
                    "created": CREATED,
                    "container_config": {"Cmd": None},
                    "os": "linux",
                },
                separators=(",", ":"),
            ).encode()
            entries.append((v1 + "/", lambda v1=v1: writer.add_dir(v1)))
            entries.append((v1 + "/VERSION", lambda v1=v1: writer.add_bytes(f"{v1}/VERSION", b"1.0")))
            entries.append((v1 + "/json", lambda v1=v1, j=v1_json: writer.add_bytes(f"{v1}/json", j)))
            if h in seen_layer_dirs:
                # docker writes a shared layer once and links to it from later images
                target = f"../{seen_layer_dirs[h]}/layer.tar"
                entries.append(
                    (v1 + "/layer.tar", lambda v1=v1, t=target: writer.add_symlink(f"{v1}/layer.tar", t))
                )
            else:
                seen_layer_dirs[h] = v1
                entries.append(
                    (
                        v1 + "/layer.tar",
                        lambda v1=v1, h=h: writer.add_file(f"{v1}/layer.tar", store.blob_path(h)),
                    )
                )
        entries.append(
            (image_hex + ".json", lambda i=image_hex: writer.add_file(f"{i}.json", store.blob_path(i)))
        )
        manifest.append(
            {
                "Config": f"{image_hex}.json",
                "RepoTags": refs or None,
                "Layers": [f"{v1}/layer.tar" for v1 in v1_ids],
            }
        )
    manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode() + b"\n"
    repos = _repositories(groups, lambda i: last_v1[i])
    entries.append(("manifest.json", lambda: writer.add_bytes("manifest.json", manifest_bytes)))
    entries.append(("repositories", lambda: writer.add_bytes("repositories", repos)))
    done: set[str] = set()
    for name, emit in sorted(entries, key=lambda e: e[0]):
        if name not in done:
            done.add(name)
            emit()


# ----------------------------------------------------------------------------------------------
# load


class _CountingReader(io.RawIOBase):
    """Wraps the input to stall after N bytes when FAKE_DOCKER_LOAD_STALL_AFTER asks for it."""

    def __init__(self, raw: BinaryIO, stall_after: int | None) -> None:
        self.raw = raw
        self.count = 0
        self.stall_after = stall_after

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        want = len(b)
        if self.stall_after is not None:
            room = self.stall_after - self.count
            if room <= 0:
                time.sleep(3600)
                return 0
            want = min(want, room)
        data = self.raw.read(want)
        n = len(data)
        b[:n] = data
        self.count += n
        return n


def _archive_path(name: str) -> str:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise DockerFail(f"Error processing tar file(exit status 1): invalid path in archive: {name!r}")
    return "/".join(parts)


def load(store: Store, src: BinaryIO, quiet: bool = False) -> list[str]:
    stall = os.environ.get("FAKE_DOCKER_LOAD_STALL_AFTER")
    counter = _CountingReader(src, int(stall) if stall else None)
    reader = io.BufferedReader(counter, CHUNK)
    staging = tempfile.mkdtemp(dir=store.tmp, prefix="load.")
    try:
        files: dict[str, tuple[str, str, int]] = {}  # archive path -> (staged path, sha256, size)
        links: dict[str, str] = {}
        entries = 0
        try:
            archive = tarfile.open(fileobj=reader, mode="r|*")
            for member in archive:
                entries += 1
                name = _archive_path(member.name)
                if member.issym():
                    links[name] = _archive_path(
                        os.path.normpath(os.path.join(os.path.dirname(name), member.linkname))
                    )
                elif member.islnk():
                    links[name] = _archive_path(member.linkname)
                elif member.isfile():
                    extracted = archive.extractfile(member)
                    assert extracted is not None
                    staged = os.path.join(staging, f"f{len(files):06d}")
                    hasher = hashlib.sha256()
                    size = 0
                    with open(staged, "wb") as out:
                        while chunk := extracted.read(CHUNK):
                            hasher.update(chunk)
                            out.write(chunk)
                            size += len(chunk)
                    if size != member.size:
                        raise DockerFail("Error processing tar file(exit status 1): unexpected EOF")
                    files[name] = (staged, hasher.hexdigest(), size)
        except (tarfile.TarError, EOFError, OSError, UnicodeError) as exc:
            if counter.count == 0:
                raise DockerFail("requested load from stdin, but stdin is empty") from exc
            if entries == 0 and not files:
                raise DockerFail("Error response from daemon: unexpected EOF") from exc
            raise DockerFail(f"Error processing tar file(exit status 1): unexpected EOF ({exc})") from exc
        if entries == 0:
            raise DockerFail("requested load from stdin, but stdin is empty")

        def get(name: str, depth: int = 0) -> tuple[str, str, int]:
            if name in files:
                return files[name]
            if name in links and depth < 8:
                return get(links[name], depth + 1)
            raise DockerFail(
                f"Error response from daemon: open /var/lib/docker/tmp/docker-import-fake/{name}: "
                "no such file or directory"
            )

        # every content-addressed blob must match its name, referenced or not
        for name, (_staged, digest, _size) in files.items():
            m = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", name)
            if m and m.group(1) != digest:
                raise DockerFail(
                    f"Error response from daemon: digest mismatch for {name}: "
                    f"expected sha256:{m.group(1)}, got sha256:{digest}"
                )

        images = _read_manifest(files, get)
        loaded: list[str] = []
        checked_layers: set[str] = set()
        plan: list[tuple[str, list[str], list[tuple[str, str]]]] = []
        for config_name, repo_tags, layer_names in images:
            config_staged, config_digest, _ = get(config_name)
            m = re.fullmatch(r"(?:.*/)?(?:sha256/)?([0-9a-f]{64})(?:\.json)?", config_name)
            if m and m.group(1) != config_digest:
                raise DockerFail(
                    f"Error response from daemon: invalid checksum for image config {config_name}: "
                    f"got sha256:{config_digest}"
                )
            try:
                with open(config_staged, "rb") as fh:
                    config = json.loads(fh.read())
                diff_ids = list(config["rootfs"]["diff_ids"])
            except (ValueError, KeyError, TypeError) as exc:
                raise DockerFail(
                    f"Error response from daemon: invalid image config {config_name}: {exc}"
                ) from exc
            if len(diff_ids) != len(layer_names):
                raise DockerFail(
                    "Error response from daemon: invalid manifest, layers length mismatch: "
                    f"expected {len(diff_ids)}, got {len(layer_names)}"
                )
            layer_files: list[tuple[str, str]] = []
            for i, (layer_name, diff_id) in enumerate(zip(layer_names, diff_ids, strict=True)):
                staged, digest, _ = get(layer_name)
                if "sha256:" + digest != diff_id:
                    raise DockerFail(
                        f"Error response from daemon: invalid diffID for layer {i}: "
                        f"expected {diff_id}, got sha256:{digest}"
                    )
                if digest not in checked_layers:
                    _check_layer_tar(staged, layer_name)
                    checked_layers.add(digest)
                layer_files.append((staged, digest))
            plan.append((config_digest, repo_tags, [(config_staged, config_digest), *layer_files]))

        gate = os.environ.get("FAKE_DOCKER_LOAD_GATE")
        if gate:
            open(gate + ".reached", "w").close()
            deadline = time.monotonic() + 30
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)
        if os.environ.get("FAKE_DOCKER_LOAD_FAIL_AT_END") not in (None, "", "0"):
            raise DockerFail(
                "Error response from daemon: write /var/lib/docker/tmp/docker-import-fake: "
                "no space left on device"
            )
        with store.locked():
            for config_digest, repo_tags, blobs in plan:
                for staged, digest in blobs:
                    # staging lives inside the store, so a rename moves even a 2 GB layer for free
                    if not os.path.exists(store.blob_path(digest)):
                        os.replace(staged, store.blob_path(digest))
                store.register(config_digest, repo_tags)
                if repo_tags:
                    loaded.extend(f"Loaded image: {t}" for t in repo_tags)
                else:
                    loaded.append(f"Loaded image ID: sha256:{config_digest}")
        return loaded
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_manifest(
    files: dict[str, tuple[str, str, int]], get: Callable[[str], tuple[str, str, int]]
) -> list[tuple[str, list[str], list[str]]]:
    """(config path, repo tags, layer paths) per image, from manifest.json or an OCI index.json."""
    if "manifest.json" in files:
        try:
            with open(files["manifest.json"][0], "rb") as fh:
                manifest = json.loads(fh.read())
            out = []
            for entry in manifest:
                tags = [normalize_ref(t) for t in (entry.get("RepoTags") or [])]
                out.append(
                    (_archive_path(entry["Config"]), tags, [_archive_path(x) for x in entry["Layers"]])
                )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DockerFail(f"Error response from daemon: invalid manifest.json: {exc}") from exc
        if not out:
            raise DockerFail("Error response from daemon: no images found in manifest.json")
        return out
    if "index.json" in files:
        try:
            with open(files["index.json"][0], "rb") as fh:
                index = json.loads(fh.read())
            grouped: dict[str, tuple[str, list[str], list[str]]] = {}
            for desc in index["manifests"]:
                digest = desc["digest"].split(":", 1)[1]
                staged, _, _ = get(f"blobs/sha256/{digest}")
                with open(staged, "rb") as fh:
                    manifest = json.loads(fh.read())
                name = (desc.get("annotations") or {}).get("io.containerd.image.name")
                if digest not in grouped:
                    grouped[digest] = (
                        "blobs/sha256/" + manifest["config"]["digest"].split(":", 1)[1],
                        [],
                        ["blobs/sha256/" + layer["digest"].split(":", 1)[1] for layer in manifest["layers"]],
                    )
                if name:
                    grouped[digest][1].append(normalize_ref(name))
            return list(grouped.values())
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise DockerFail(f"Error response from daemon: invalid index.json: {exc}") from exc
    raise DockerFail(
        "Error response from daemon: open /var/lib/docker/tmp/docker-import-fake/repositories: "
        "no such file or directory"
    )


def _check_layer_tar(path: str, name: str) -> None:
    try:
        with tarfile.open(path, mode="r:") as layer:
            for _member in layer:
                pass
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DockerFail(
            f"Error processing tar file(exit status 1): layer {name} is not a tar: {exc}"
        ) from exc


# ----------------------------------------------------------------------------------------------
# Tiny Go-template subset for --format: {{.A.B}}, {{json .A}}, {{json .}}


def render(fmt: str, obj: Any) -> str:
    fmt = fmt.replace("\\t", "\t").replace("\\n", "\n")

    def lookup(expr: str) -> Any:
        value = obj
        for part in [p for p in expr.strip().split(".") if p]:
            if isinstance(value, dict) and part in value:
                value = value[part]
            else:
                raise DockerFail(
                    f'template: :1: executing "" at <{expr.strip()}>: map has no entry for key "{part}"'
                )
        return value

    def go_str(value: Any) -> str:
        if value is None:
            return "<no value>"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, list):
            return "[" + " ".join(go_str(v) for v in value) + "]"
        if isinstance(value, dict):
            return "map[" + " ".join(f"{k}:{go_str(v)}" for k, v in value.items()) + "]"
        return str(value)

    def repl(m: re.Match[str]) -> str:
        expr = m.group(1).strip()
        if expr.startswith("json "):
            return json.dumps(lookup(expr[5:]), separators=(",", ":"))
        return go_str(lookup(expr))

    return re.sub(r"\{\{(.*?)\}\}", repl, fmt)


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n}B"


def inspect_obj(store: Store, image_hex: str) -> dict[str, Any]:
    config = store.config(image_hex)
    tags = sorted(t for t, h in store.tags().items() if h == image_hex)
    return {
        "Id": "sha256:" + image_hex,
        "RepoTags": tags,
        "RepoDigests": [],
        "Parent": "",
        "Comment": "",
        "Created": config.get("created", CREATED),
        "DockerVersion": "",
        "Author": "",
        "Config": config.get("config", {}),
        "Architecture": config.get("architecture", "amd64"),
        "Os": config.get("os", "linux"),
        "Size": store.image_size(image_hex),
        "GraphDriver": {"Data": None, "Name": "fake"},
        "RootFS": {"Type": "layers", "Layers": config["rootfs"]["diff_ids"]},
        "Metadata": {"LastTagTime": "0001-01-01T00:00:00Z"},
    }


# ----------------------------------------------------------------------------------------------
# CLI


GLOBAL_WITH_VALUE = {
    "-H",
    "--host",
    "-c",
    "--context",
    "--config",
    "-l",
    "--log-level",
    "--tlscacert",
    "--tlscert",
    "--tlskey",
}


def _split_opts(args: list[str], with_value: set[str]) -> tuple[dict[str, str | bool], list[str]]:
    opts: dict[str, str | bool] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest.extend(args[i + 1 :])
            break
        if a.startswith("-") and a != "-":
            if "=" in a and a.startswith("--"):
                k, v = a.split("=", 1)
                opts[k] = v
            elif a in with_value:
                if i + 1 >= len(args):
                    raise DockerFail(f"flag needs an argument: {a}")
                opts[a] = args[i + 1]
                i += 1
            else:
                opts[a] = True
        else:
            rest.append(a)
        i += 1
    return opts, rest


def _need_daemon() -> None:
    if os.environ.get("FAKE_DOCKER_DAEMON_DOWN") not in (None, "", "0"):
        raise DockerFail(DAEMON_DOWN)


def main(argv: list[str]) -> int:
    state = default_state_dir()
    os.makedirs(state, exist_ok=True)
    sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
    import _fakelib

    _fakelib.record_call("docker", argv, extra_log=os.path.join(state, "calls.log"))
    try:
        return _dispatch(argv)
    except DockerFail as exc:
        sys.stderr.write(exc.message + "\n")
        return exc.code
    except BrokenPipeError:
        sys.stderr.write("write /dev/stdout: broken pipe\n")
        return 1


def _dispatch(argv: list[str]) -> int:
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in GLOBAL_WITH_VALUE else 1
    args = argv[i:]
    if not args:
        sys.stdout.write("Usage:  docker [OPTIONS] COMMAND\n")
        return 0
    cmd, rest = args[0], args[1:]
    if cmd == "image" and rest:
        sub = {"ls": "images", "list": "images", "rm": "rmi", "remove": "rmi"}.get(rest[0], rest[0])
        cmd, rest = ("image-" + sub if sub == "inspect" else sub), rest[1:]
    if cmd == "inspect":
        cmd = "image-inspect"
    handlers: dict[str, Callable[[list[str]], int]] = {
        "save": cmd_save,
        "load": cmd_load,
        "image-inspect": cmd_inspect,
        "images": cmd_images,
        "rmi": cmd_rmi,
        "info": cmd_info,
        "version": cmd_version,
        "fake-create": cmd_fake_create,
    }
    handler = handlers.get(cmd)
    if handler is None:
        raise DockerFail(f"docker: unknown command: docker {cmd}\n\nRun 'docker --help' for more information")
    return handler(rest)


def cmd_save(args: list[str]) -> int:
    opts, refs = _split_opts(args, {"-o", "--output", "--platform"})
    if not refs:
        raise DockerFail('docker: "save" requires at least 1 argument.')
    _need_daemon()
    output = opts.get("-o") or opts.get("--output")
    store = Store()
    fmt = os.environ.get("FAKE_DOCKER_SAVE_FORMAT", "oci")
    if isinstance(output, str):
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            save(store, refs, fd, fmt)
        except BaseException:
            os.close(fd)
            os.unlink(output)
            raise
        os.close(fd)
        return 0
    if os.isatty(1):
        raise DockerFail("cowardly refusing to save to a terminal. Use the -o flag or redirect")
    save(store, refs, 1, fmt)
    return 0


def cmd_load(args: list[str]) -> int:
    opts, _ = _split_opts(args, {"-i", "--input", "--platform"})
    _need_daemon()
    source = opts.get("-i") or opts.get("--input")
    quiet = bool(opts.get("-q") or opts.get("--quiet"))
    store = Store()
    if isinstance(source, str):
        try:
            fh = open(source, "rb")
        except OSError as exc:
            raise DockerFail(f"open {source}: no such file or directory ({exc.strerror})") from exc
        with fh:
            lines = load(store, fh, quiet)
    else:
        if os.isatty(0):
            raise DockerFail("requested load from stdin, but stdin is empty")
        lines = load(store, sys.stdin.buffer, quiet)
    if not quiet:
        sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


def cmd_inspect(args: list[str]) -> int:
    opts, refs = _split_opts(args, {"-f", "--format", "--type", "--platform"})
    if not refs:
        raise DockerFail('docker: "inspect" requires at least 1 argument.')
    _need_daemon()
    store = Store()
    fmt = opts.get("-f") or opts.get("--format")
    found: list[dict[str, Any]] = []
    missing: list[str] = []
    for ref in refs:
        image_hex = store.resolve(ref)
        if image_hex is None or not store.has_image(image_hex):
            missing.append(ref)
        else:
            found.append(inspect_obj(store, image_hex))
    if isinstance(fmt, str):
        sys.stdout.write("".join(render(fmt, obj) + "\n" for obj in found))
    else:
        sys.stdout.write(json.dumps(found, indent=4) + "\n")
    for ref in missing:
        sys.stderr.write(f"Error response from daemon: No such image: {ref}\n")
    return 1 if missing else 0


def cmd_images(args: list[str]) -> int:
    opts, filters = _split_opts(args, {"--format", "-f", "--filter"})
    _need_daemon()
    store = Store()
    fmt = opts.get("--format")
    rows = []
    for tag, image_hex in sorted(store.tags().items()):
        repo, _, tagname = tag.rpartition(":")
        if filters and not any(tag == normalize_ref(f) or repo == f for f in filters):
            continue
        size = store.image_size(image_hex)
        rows.append(
            {
                "Repository": repo,
                "Tag": tagname,
                "ID": image_hex[:12] if not opts.get("--no-trunc") else "sha256:" + image_hex,
                "Digest": "<none>",
                "CreatedAt": "2026-01-01 00:00:00 +0000 UTC",
                "CreatedSince": "2 months ago",
                "Size": human_size(size),
                "VirtualSize": human_size(size),
                "Containers": "N/A",
            }
        )
    out = []
    if opts.get("-q") or opts.get("--quiet"):
        out = list(dict.fromkeys(r["ID"] for r in rows))
    elif isinstance(fmt, str):
        out = [
            json.dumps(r, separators=(",", ":")) if fmt.strip() == "{{json .}}" else render(fmt, r)
            for r in rows
        ]
    else:
        out = [f"{'REPOSITORY':<40} {'TAG':<15} {'IMAGE ID':<14} {'CREATED':<14} SIZE"]
        out += [
            f"{r['Repository']:<40} {r['Tag']:<15} {r['ID']:<14} {r['CreatedSince']:<14} {r['Size']}"
            for r in rows
        ]
    sys.stdout.write("".join(line + "\n" for line in out))
    return 0


def cmd_rmi(args: list[str]) -> int:
    _opts, refs = _split_opts(args, set())
    if not refs:
        raise DockerFail('docker: "rmi" requires at least 1 argument.')
    _need_daemon()
    store = Store()
    code = 0
    with store.locked():
        for ref in refs:
            image_hex = store.resolve(ref)
            if image_hex is None:
                sys.stderr.write(f"Error response from daemon: No such image: {ref}\n")
                code = 1
                continue
            tags = store.tags()
            by_id = ref.startswith("sha256:") or image_hex.startswith(ref)
            removed = [t for t, h in tags.items() if h == image_hex and (by_id or t == normalize_ref(ref))]
            for t in removed:
                del tags[t]
                sys.stdout.write(f"Untagged: {t}\n")
            store.set_tags(tags)
            if image_hex not in tags.values():
                os.unlink(os.path.join(store.images_dir, image_hex + ".json"))
                sys.stdout.write(f"Deleted: sha256:{image_hex}\n")
        store.gc()
    return code


def _info_obj() -> dict[str, Any]:
    store = Store()
    return {
        "ServerVersion": SERVER_VERSION,
        "Images": len(store.image_ids()),
        "Containers": 0,
        "Driver": "fake",
        "OperatingSystem": "Fake Docker Engine",
        "OSType": "linux",
        "Architecture": "x86_64",
        "DockerRootDir": store.root,
    }


def cmd_info(args: list[str]) -> int:
    opts, _ = _split_opts(args, {"-f", "--format"})
    fmt = opts.get("-f") or opts.get("--format")
    _need_daemon()
    info = _info_obj()
    if isinstance(fmt, str):
        sys.stdout.write(render(fmt, info) + "\n")
    else:
        sys.stdout.write(
            "Client:\n Version:    "
            + SERVER_VERSION
            + "\n Context:    default\n\nServer:\n"
            + "".join(f" {k}: {v}\n" for k, v in info.items())
        )
    return 0


def cmd_version(args: list[str]) -> int:
    opts, _ = _split_opts(args, {"-f", "--format"})
    fmt = opts.get("-f") or opts.get("--format")
    client = {"Version": SERVER_VERSION, "ApiVersion": API_VERSION, "Os": "linux", "Arch": "amd64"}
    down = os.environ.get("FAKE_DOCKER_DAEMON_DOWN") not in (None, "", "0")
    server = None if down else {"Version": SERVER_VERSION, "ApiVersion": API_VERSION, "Os": "linux"}
    if isinstance(fmt, str):
        if down and ".Server" in fmt:
            raise DockerFail(DAEMON_DOWN)
        sys.stdout.write(render(fmt, {"Client": client, "Server": server}) + "\n")
    else:
        sys.stdout.write(
            f"Client:\n Version:           {SERVER_VERSION}\n API version:       {API_VERSION}\n"
        )
        if server:
            sys.stdout.write(
                f"\nServer: Fake Docker Engine\n Engine:\n  Version:          {SERVER_VERSION}\n"
            )
    if down:
        raise DockerFail(DAEMON_DOWN)
    return 0


def cmd_fake_create(args: list[str]) -> int:
    opts, rest = _split_opts(args, {"--seed", "--layers", "--from"})
    if len(rest) != 2 or not rest[1].isdigit():
        raise DockerFail("usage: docker fake-create IMAGE SIZE_BYTES [--seed N] [--layers N] [--from BASE]")
    seed = int(opts["--seed"]) if isinstance(opts.get("--seed"), str) else 0
    layers = int(opts["--layers"]) if isinstance(opts.get("--layers"), str) else None
    base = opts.get("--from") if isinstance(opts.get("--from"), str) else None
    image_id = create_image(None, rest[0], int(rest[1]), seed=seed, layers=layers, base=base)  # type: ignore[arg-type]
    sys.stdout.write(image_id + "\n")
    return 0
