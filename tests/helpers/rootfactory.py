"""A realistic tinyserve root for tests and benchmarks, and exact descriptions of trees and databases.

``make_root(path)`` builds what a running tinyserve leaves on disk (see ``RootInfo`` for what tests can
rely on), optionally seeding the stand-in Docker store with the images its compose file names.
``tree_digest`` and ``db_dump`` describe a root so a restored one can be compared exactly.

Also here, for tests that drive the stand-in executables in ``tests/fakes``: ``FAKES_DIR``,
``fake_path()``, ``read_calls()`` and ``create_image()``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import sqlite3
import stat
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

FAKES_DIR = Path(__file__).resolve().parent.parent / "fakes"
DB_FILES = ("state.db", "state.db-wal", "state.db-shm")
SERVICES = ("blog", "photos", "notes")
BASE_MTIME = 1767225600  # 2026-01-01T00:00:00Z: make_root is reproducible down to mtimes

IMAGE_BLOG = "ghcr.io/tinyserve-demo/blog:1.4.2"
IMAGE_PHOTOS = "ghcr.io/tinyserve-demo/photos:2.0.1"
IMAGE_TRAEFIK = "traefik:v3.1"

_SIZES = {"tiny": 256 * 1024, "small": 1024 * 1024, "medium": 32 * 1024 * 1024}
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 10**6,
    "mb": 10**6,
    "mib": 1024**2,
    "g": 10**9,
    "gb": 10**9,
    "gib": 1024**3,
}


# ------------------------------------------------------------------------------------------------
# Stand-in executables


def fake_path(base: str | None = None) -> str:
    """A PATH with tests/fakes first.

    The running interpreter's directory comes next so the fakes' ``#!/usr/bin/env python3`` finds a
    real interpreter directly rather than through a slow version-manager shim (~30 ms vs ~120 ms a
    call); then ``base`` (default: the current PATH).
    """
    rest = os.environ.get("PATH", "") if base is None else base
    return os.pathsep.join([str(FAKES_DIR), os.path.dirname(sys.executable), rest])


@cache
def fake_docker_module() -> ModuleType:
    """tests/fakes/_fake_docker.py, imported by path (tests/fakes is not a package)."""
    spec = importlib.util.spec_from_file_location("_fake_docker", FAKES_DIR / "_fake_docker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_fake_docker"] = module
    spec.loader.exec_module(module)
    return module


def create_image(
    state_dir: Path | str,
    ref: str,
    size: int,
    *,
    seed: int = 0,
    layers: int | None = None,
    base: str | None = None,
) -> str:
    """Seed the stand-in Docker store (in-process, like ``docker fake-create``); returns ``sha256:<id>``.

    Deterministic: the same arguments give the same image ID in any store.
    """
    module = fake_docker_module()
    image_id: str = module.create_image(str(state_dir), ref, size, seed=seed, layers=layers, base=base)
    return image_id


def read_calls(log_path: Path | str, prog: str | None = None) -> list[dict[str, Any]]:
    """The JSON lines a stand-in wrote (``$FAKE_CALLS_LOG`` or ``$FAKE_DOCKER_STATE/calls.log``).

    Each is ``{"prog": "launchctl", "args": [...], "pid": 123, "time": 1.7e9}``; ``prog`` filters.
    """
    try:
        lines = Path(log_path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    calls = [json.loads(line) for line in lines if line.strip()]
    return [c for c in calls if prog is None or c["prog"] == prog]


# ------------------------------------------------------------------------------------------------
# make_root


@dataclass(frozen=True)
class RootInfo:
    path: Path
    db_path: Path
    compose_path: Path
    images: list[str]  # unique, sorted: what `services.*.image` names
    image_ids: dict[str, str]  # ref -> sha256:… in the fake Docker store (empty without one)
    services: list[str]  # names of the directories under services/
    tunnel_id: str
    tls_secret: str  # appears only inside traefik/acme.json
    tunnel_secret: str  # appears only inside cloudflared/<tunnel_id>.json
    secret_files: list[Path]  # mode 0600
    docker_state: Path | None
    hot_wal: bool  # state.db-wal holds committed frames not yet checkpointed
    size_bytes: int  # file bytes written under the root plus image layer bytes created
    db_rows: dict[str, int] = field(default_factory=dict)  # table -> row count, WAL included

    @property
    def secrets(self) -> list[str]:
        return [self.tls_secret, self.tunnel_secret]


def parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    if size in _SIZES:
        return _SIZES[size]
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"size must be tiny/small/medium, a byte count, or like '200MB'/'2GiB': {size!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class _Writer:
    """Creates files with explicit modes (whatever the umask) and counts the bytes written."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.seed = seed
        self.bytes = 0
        self.fake = fake_docker_module()

    def dir(self, rel: str, mode: int = 0o755) -> Path:
        p = self.root / rel
        p.mkdir(parents=True, exist_ok=True)
        os.chmod(p, mode)
        return p

    def text(self, rel: str, content: str, mode: int = 0o644) -> Path:
        return self.data(rel, content.encode("utf-8"), mode)

    def data(self, rel: str, content: bytes, mode: int = 0o644) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            fh.write(content)
        os.chmod(p, mode)
        self.bytes += len(content)
        return p

    def generated(self, rel: str, size: int, kind: str, rng: random.Random, mode: int = 0o644) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:
            for chunk in self.fake.content_chunks(rng, size, kind):
                fh.write(chunk)
        os.chmod(p, mode)
        self.bytes += size
        return p

    def symlink(self, rel: str, target: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, p)
        return p


def make_root(
    path: Path | str,
    *,
    size: str | int = "small",
    seed: int = 0,
    docker_state: Path | str | None = None,
    hot_wal: bool = True,
    logs: bool = True,
) -> RootInfo:
    """Build a tinyserve root at ``path`` (created; must be empty or absent).

    - ``state.db`` in WAL mode with ``settings``, ``services``, ``tunnel`` and ``deployments`` rows;
      with ``hot_wal`` (default) a ``state.db-wal`` beside it holds committed, un-checkpointed frames
      (as a running tinyserved leaves it); no connection stays open and no ``-shm`` is left.
    - ``generated/`` (docker-compose.yml naming 3 images, one of them twice; traefik and cloudflared
      configs), ``backups/`` (two compose snapshots), ``traefik/acme.json`` and
      ``cloudflared/<tunnel_id>.json`` (mode 0600, holding ``tls_secret`` / ``tunnel_secret``),
      ``services/{blog,photos,notes}/`` with nested and empty dirs, relative symlinks (to a dir and to
      a file), unicode names (``services/blog/café/naïve-日本.txt``), modes 0640/0755/0700/0600, and
      each service's own SQLite file; ``logs/`` unless ``logs=False``.
    - ``size`` ("tiny", "small", "medium", a byte count or "200MB"/"2GiB") is roughly the total of
      file bytes in the root plus, when a Docker store is used, the images' layer bytes (30 %).
      Contents mix text-like (≈2x compressible) and random (incompressible) data, generated from
      ``seed`` in 1 MiB chunks, so 2 GB takes seconds and no more memory than a chunk.
    - ``docker_state`` (default ``$FAKE_DOCKER_STATE``, else none): the stand-in Docker store in which
      to create the compose file's images.

    Everything but the WAL's salts is a function of ``seed``: file contents, modes, mtimes, image IDs.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"make_root needs an empty directory: {root}")
    os.chmod(root, 0o755)
    total = parse_size(size)
    state_dir = Path(docker_state) if docker_state is not None else None
    if state_dir is None and os.environ.get("FAKE_DOCKER_STATE"):
        state_dir = Path(os.environ["FAKE_DOCKER_STATE"])
    rng = random.Random(f"tinyserve-root|{seed}")
    w = _Writer(root, seed)
    tunnel_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    tls_secret = f"SECRET-TLS-KEY-{seed}"
    tunnel_secret = f"SECRET-TUNNEL-{seed}"

    image_budget = int(total * 0.30) if state_dir is not None else 0
    logs_budget = max(4096, int(total * 0.02)) if logs else 0
    fixed_estimate = 96 * 1024
    service_budget = max(0, total - image_budget - logs_budget - fixed_estimate)

    _write_configs(w, tunnel_id, tls_secret, tunnel_secret, seed)
    db_rows = _write_state_db(root, tmp_parent=root, seed=seed, tunnel_id=tunnel_id, hot_wal=hot_wal)
    w.bytes += sum((root / n).stat().st_size for n in DB_FILES if (root / n).exists())
    secret_files = [root / "traefik" / "acme.json", root / "cloudflared" / f"{tunnel_id}.json"]
    for name, share, binary_share in (("blog", 0.50, 0.5), ("photos", 0.35, 0.8), ("notes", 0.15, 0.2)):
        _write_service(w, name, int(service_budget * share), binary_share, seed)
    if logs:
        log_rng = random.Random(f"logs|{seed}")
        w.dir("logs")
        w.text("logs/tinyserved.log", _log_lines(seed))
        w.generated("logs/tinyserved.1.log", logs_budget, "text", log_rng)

    image_ids: dict[str, str] = {}
    image_bytes = 0
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        image_ids[IMAGE_BLOG] = create_image(state_dir, IMAGE_BLOG, int(image_budget * 0.45), seed=seed)
        image_ids[IMAGE_PHOTOS] = create_image(
            state_dir, IMAGE_PHOTOS, int(image_budget * 0.35), seed=seed, base=IMAGE_BLOG
        )
        image_ids[IMAGE_TRAEFIK] = create_image(state_dir, IMAGE_TRAEFIK, int(image_budget * 0.20), seed=seed)
        image_bytes = image_budget

    _fix_mtimes(root)
    return RootInfo(
        path=root,
        db_path=root / "state.db",
        compose_path=root / "generated" / "docker-compose.yml",
        images=sorted({IMAGE_BLOG, IMAGE_PHOTOS, IMAGE_TRAEFIK}),
        image_ids=image_ids,
        services=list(SERVICES),
        tunnel_id=tunnel_id,
        tls_secret=tls_secret,
        tunnel_secret=tunnel_secret,
        secret_files=secret_files,
        docker_state=state_dir,
        hot_wal=hot_wal,
        size_bytes=w.bytes + image_bytes,
        db_rows=db_rows,
    )


def compose_yaml(seed: int = 0) -> str:
    # Unquoted image names on `image:` lines: the guide's `grep | awk '{print $2}'` must read them too.
    return f"""# Generated by tinyserve (seed {seed}) - do not edit; run `tinyserve deploy` instead.
name: tinyserve
services:
  traefik:
    image: {IMAGE_TRAEFIK}
    restart: unless-stopped
    ports:
      - "80:80"
      - "443:443"
    volumes:
      - ../traefik:/etc/traefik
      - ./traefik:/etc/traefik/generated:ro
  blog:
    image: {IMAGE_BLOG}
    restart: unless-stopped
    environment:
      BLOG_URL: https://blog.example.com
    volumes:
      - ../services/blog:/data
    labels:
      - "traefik.http.routers.blog.rule=Host(`blog.example.com`)"
  photos:
    image: {IMAGE_PHOTOS}
    restart: unless-stopped
    volumes:
      - ../services/photos:/data
  notes:
    image: {IMAGE_BLOG}
    command: ["--mode", "notes"]
    volumes:
      - ../services/notes:/data
networks:
  default:
    name: tinyserve
"""


def _write_configs(w: _Writer, tunnel_id: str, tls_secret: str, tunnel_secret: str, seed: int) -> None:
    w.dir("generated")
    w.text("generated/docker-compose.yml", compose_yaml(seed))
    w.dir("generated/traefik")
    w.text(
        "generated/traefik/traefik.yml",
        "entryPoints:\n  web:\n    address: ':80'\n  websecure:\n    address: ':443'\n"
        "providers:\n  file:\n    directory: /etc/traefik/generated/dynamic\n"
        "certificatesResolvers:\n  le:\n    acme:\n      storage: /etc/traefik/acme.json\n",
    )
    w.dir("generated/traefik/dynamic")
    routes = "".join(
        f"    {s}:\n      rule: Host(`{s}.example.com`)\n      service: {s}\n"
        "      tls: {certResolver: le}\n"
        for s in SERVICES
    )
    w.text("generated/traefik/dynamic/routes.yml", "http:\n  routers:\n" + routes)
    w.dir("generated/cloudflared")
    w.text(
        "generated/cloudflared/config.yml",
        f"tunnel: {tunnel_id}\ncredentials-file: /etc/cloudflared/{tunnel_id}.json\ningress:\n"
        + "".join(f"  - hostname: {s}.example.com\n    service: http://traefik:80\n" for s in SERVICES)
        + "  - service: http_status:404\n",
    )
    w.dir("backups")
    for ts in ("2026-01-09T12-00-00Z", "2026-01-10T12-00-00Z"):
        w.dir(f"backups/{ts}")
        w.text(f"backups/{ts}/docker-compose.yml", compose_yaml(seed).replace("1.4.2", "1.4.1"))
    w.dir("traefik")
    acme = {
        "le": {
            "Account": {"Email": "admin@example.com", "PrivateKey": f"{tls_secret}-ACCOUNT"},
            "Certificates": [
                {
                    "domain": {"main": f"{s}.example.com"},
                    "certificate": "LS0tLS1CRUdJTi...",
                    "key": tls_secret,
                }
                for s in SERVICES
            ],
        }
    }
    w.text("traefik/acme.json", json.dumps(acme, indent=2), mode=0o600)
    w.dir("traefik/dynamic")
    w.text(
        "traefik/dynamic/middlewares.yml", "http:\n  middlewares:\n    secure-headers:\n      headers: {}\n"
    )
    w.dir("cloudflared")
    creds = {"AccountTag": f"acct{seed:04d}", "TunnelSecret": tunnel_secret, "TunnelID": tunnel_id}
    w.text(f"cloudflared/{tunnel_id}.json", json.dumps(creds), mode=0o600)
    w.text("cloudflared/config.yml", f"tunnel: {tunnel_id}\ncredentials-file: {tunnel_id}.json\n")


_SCHEMA = """
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE services (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, image TEXT NOT NULL, domain TEXT,
    port INTEGER, enabled INTEGER NOT NULL DEFAULT 1, created_at TEXT NOT NULL);
CREATE TABLE tunnel (
    id INTEGER PRIMARY KEY CHECK (id = 1), tunnel_id TEXT NOT NULL, name TEXT NOT NULL,
    hostname TEXT, credentials_file TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE deployments (
    id INTEGER PRIMARY KEY, service_id INTEGER NOT NULL REFERENCES services(id), image TEXT NOT NULL,
    status TEXT NOT NULL, created_at TEXT NOT NULL, log TEXT);
CREATE INDEX deployments_by_service ON deployments(service_id, created_at);
"""


def _write_state_db(
    root: Path, *, tmp_parent: Path, seed: int, tunnel_id: str, hot_wal: bool
) -> dict[str, int]:
    rng = random.Random(f"state.db|{seed}")
    fake = fake_docker_module()
    build = Path(tempfile.mkdtemp(prefix=".state-build-", dir=tmp_parent))
    db = build / "state.db"
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        conn.executescript(_SCHEMA)
        conn.execute("BEGIN")
        settings = {
            "domain": "example.com",
            "acme_email": "admin@example.com",
            "theme": "dark",
            "backup.enabled": "true",
            "tunnel.enabled": "true",
            "version": "0.9.0",
            "seed": str(seed),
            "greeting": "héllo wörld ✓",
        }
        for k, v in settings.items():
            conn.execute("INSERT INTO settings VALUES (?, ?, ?)", (k, v, "2026-01-01T00:00:00Z"))
        images = {"blog": IMAGE_BLOG, "photos": IMAGE_PHOTOS, "notes": IMAGE_BLOG}
        for i, name in enumerate(SERVICES, 1):
            conn.execute(
                "INSERT INTO services VALUES (?, ?, ?, ?, ?, 1, ?)",
                (i, name, images[name], f"{name}.example.com", 8000 + i, "2026-01-01T00:00:00Z"),
            )
        conn.execute(
            "INSERT INTO tunnel VALUES (1, ?, 'tinyserve', 'example.com', ?, '2026-01-01T00:00:00Z')",
            (tunnel_id, f"cloudflared/{tunnel_id}.json"),
        )
        _insert_deployments(conn, rng, fake, 0, 300)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if hot_wal:
            # Nothing checkpoints these commits: they live only in the -wal, as after a busy tinyserved.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute("BEGIN")
            conn.execute(
                "UPDATE settings SET value = 'light', updated_at = '2026-01-02T00:00:00Z' WHERE key = 'theme'"
            )
            conn.execute(
                "INSERT INTO settings VALUES ('last_deploy', '2026-01-02T00:00:00Z', '2026-01-02T00:00:00Z')"
            )
            _insert_deployments(conn, rng, fake, 300, 40)
            conn.execute("COMMIT")
            conn.execute("BEGIN")
            conn.execute("UPDATE services SET enabled = 0 WHERE name = 'notes'")
            conn.execute("COMMIT")
            # Copied while the connection still holds the file open, so closing cannot checkpoint
            # the frames away; the -shm is left behind on purpose (SQLite rebuilds it).
            shutil.copyfile(db, root / "state.db")
            shutil.copyfile(build / "state.db-wal", root / "state.db-wal")
        counts = {
            t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("settings", "services", "tunnel", "deployments")
        }
    finally:
        conn.close()
    if not hot_wal:
        shutil.copyfile(db, root / "state.db")
    shutil.rmtree(build)
    for name in ("state.db", "state.db-wal"):
        if (root / name).exists():
            os.chmod(root / name, 0o644)
    return counts


def _insert_deployments(conn: sqlite3.Connection, rng: random.Random, fake: Any, start: int, n: int) -> None:
    for i in range(start, start + n):
        service_id = 1 + i % len(SERVICES)
        status = ("succeeded", "succeeded", "succeeded", "failed", "rolled_back")[rng.randrange(5)]
        log = fake.text_bytes(rng, rng.randint(80, 600)).decode("ascii")
        created = f"2025-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:00:00Z"
        conn.execute(
            "INSERT INTO deployments VALUES (?, ?, ?, ?, ?, ?)",
            (i + 1, service_id, IMAGE_BLOG, status, created, log),
        )


def _service_db(path: Path, name: str, rng: random.Random, fake: Any, rows: int) -> None:
    """A service's own SQLite database, in rollback-journal mode as most apps leave theirs."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, title TEXT NOT NULL, body TEXT, blob BLOB)")
        conn.execute("BEGIN")
        for i in range(rows):
            conn.execute(
                "INSERT INTO items VALUES (?, ?, ?, ?)",
                (
                    i + 1,
                    f"{name} item {i}",
                    fake.text_bytes(rng, rng.randint(50, 400)).decode("ascii"),
                    rng.randbytes(rng.randint(0, 64)),
                ),
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


def _write_service(w: _Writer, name: str, budget: int, binary_share: float, seed: int) -> None:
    rng = random.Random(f"service|{name}|{seed}")
    fake = w.fake
    base = f"services/{name}"
    w.dir("services")
    w.dir(base)
    w.text(
        f"{base}/config.json", json.dumps({"name": name, "port": 8080, "debug": False}, indent=2), mode=0o640
    )
    w.dir(f"{base}/bin")
    w.text(f"{base}/bin/entrypoint.sh", f'#!/bin/sh\nexec /app/{name} --data /data "$@"\n', mode=0o755)
    w.dir(f"{base}/data")
    if name == "blog":
        for month, slug in (("01", "hello-world"), ("02", "second-post")):
            w.dir(f"{base}/content/posts/2025/{month}")
            w.text(
                f"{base}/content/posts/2025/{month}/{slug}.md",
                f"# {slug}\n\n" + fake.text_bytes(rng, 3000).decode(),
            )
        w.dir(f"{base}/content/images")
        w.generated(f"{base}/content/images/cover.jpg", 20_000, "binary", rng)
        w.symlink(f"{base}/current", "content/posts/2025")  # relative link to a directory
        w.symlink(f"{base}/latest.md", "content/posts/2025/02/second-post.md")  # and to a file
        w.dir(f"{base}/cache")  # empty dir
        w.dir(f"{base}/café")
        w.text(f"{base}/café/naïve-日本.txt", "unicode names survive: café naïve 日本語\n")
        _service_db(w.root / base / "data" / "blog.sqlite", name, rng, fake, 120)
    elif name == "photos":
        w.dir(f"{base}/library/2024")
        w.dir(f"{base}/library/Ünïcødé album")
        w.generated(f"{base}/library/2024/IMG_0001.jpg", 30_000, "binary", rng)
        w.generated(f"{base}/library/Ünïcødé album/Straße 🌅.jpg", 12_000, "binary", rng)
        w.dir(f"{base}/thumbnails/2024")
        w.generated(f"{base}/thumbnails/2024/IMG_0001.webp", 3_000, "binary", rng)
        w.dir(f"{base}/uploads", mode=0o775)  # empty dir with a non-default mode
        w.symlink(f"{base}/library/latest", "2024/IMG_0001.jpg")
        _service_db(w.root / base / "data" / "photos.db", name, rng, fake, 60)
    else:
        w.dir(f"{base}/attachments")
        w.text(f"{base}/attachments/todo.md", "- [ ] back up\n- [x] restore\n")
        w.dir(f"{base}/private", mode=0o700)
        w.text(f"{base}/private/token.txt", "not-a-real-token\n", mode=0o600)
        w.dir(f"{base}/trash")  # empty dir
        _service_db(w.root / base / "notes.db", name, rng, fake, 200)
    for i, path in enumerate(_bulk_files(rng, budget, binary_share, name)):
        rel, size, kind = path
        mode = 0o640 if i % 7 == 3 else 0o644
        w.generated(f"{base}/data/{rel}", size, kind, rng, mode=mode)


def _bulk_files(
    rng: random.Random, budget: int, binary_share: float, name: str
) -> Iterator[tuple[str, int, str]]:
    """The size-scaled payload: many small files, then files of 1–16 MiB, text and random mixed."""
    small_budget = min(budget // 5, 8 * 1024 * 1024)
    spent = 0
    i = 0
    while spent < small_budget:
        size = min(rng.randint(512, 32 * 1024), small_budget - spent)
        kind = "binary" if rng.random() < binary_share else "text"
        ext = "bin" if kind == "binary" else "txt"
        yield (f"small/{i // 50:03d}/{name}-{i:05d}.{ext}", size, kind)
        spent += size
        i += 1
    left = budget - spent
    j = 0
    binary_left = int(left * binary_share)
    while left > 0:
        size = min(left, rng.randint(1, 16) * 1024 * 1024)
        kind = "binary" if binary_left > 0 else "text"
        if kind == "binary":
            binary_left -= size
        ext = "bin" if kind == "binary" else "log"
        yield (f"bulk/{j // 20:03d}/{name}-{j:05d}.{ext}", size, kind)
        left -= size
        j += 1


def _log_lines(seed: int) -> str:
    return "".join(
        json.dumps({"ts": f"2026-01-01T00:{i:02d}:00Z", "level": "info", "event": "service_healthy", "n": i})
        + "\n"
        for i in range(40)
    )


def _fix_mtimes(root: Path) -> None:
    """Deterministic mtimes, set children first so a directory's own mtime sticks."""
    entries = sorted(_walk(root), key=lambda p: len(p.parts), reverse=True)
    for i, p in enumerate(sorted(entries, key=lambda p: (-len(p.parts), str(p)))):
        t = BASE_MTIME + (i * 37) % 86400
        os.utime(p, (t, t), follow_symlinks=False)
    os.utime(root, (BASE_MTIME, BASE_MTIME))


def _walk(top: Path) -> Iterator[Path]:
    with os.scandir(top) as it:
        for entry in it:
            p = Path(entry.path)
            yield p
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(p)


# ------------------------------------------------------------------------------------------------
# Describing trees and databases


def tree_digest(
    path: Path | str, *, exclude: Iterable[str] = (), mtimes: bool = False
) -> dict[str, dict[str, Any]]:
    """Relative POSIX path → description of every entry under ``path`` (the top itself excluded).

    Files: ``{"type": "file", "mode", "size", "sha256"}``; directories (empty ones included):
    ``{"type": "dir", "mode"}``; symlinks (never followed): ``{"type": "symlink", "target"}``;
    anything else: ``{"type": "other", "mode"}``.  ``mode`` is the permission bits (e.g. 0o640).
    ``exclude`` holds fnmatch patterns against the relative path (a matching directory drops its
    subtree), e.g. ``DB_FILES`` or ``"logs"``.  ``mtimes`` adds whole-second ``mtime`` to files
    and directories.
    """
    top = Path(path)
    patterns = list(exclude)
    out: dict[str, dict[str, Any]] = {}

    def excluded(rel: str) -> bool:
        return any(fnmatch.fnmatchcase(rel, pat) for pat in patterns)

    def visit(d: Path, prefix: str) -> None:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = prefix + entry.name
            if excluded(rel):
                continue
            st = entry.stat(follow_symlinks=False)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = {"type": "symlink", "target": os.readlink(entry.path)}
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = {"type": "dir", "mode": mode}
                if mtimes:
                    out[rel]["mtime"] = int(st.st_mtime)
                visit(Path(entry.path), rel + "/")
            elif stat.S_ISREG(st.st_mode):
                out[rel] = {
                    "type": "file",
                    "mode": mode,
                    "size": st.st_size,
                    "sha256": _sha256_file(entry.path),
                }
                if mtimes:
                    out[rel]["mtime"] = int(st.st_mtime)
            else:
                out[rel] = {"type": "other", "mode": mode}

    visit(top, "")
    return dict(sorted(out.items()))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def diff_trees(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]], limit: int = 20) -> list[str]:
    """Readable differences between two ``tree_digest`` results (for assertion messages)."""
    lines: list[str] = []
    for rel in sorted(a.keys() | b.keys()):
        if rel not in b:
            lines.append(f"only in first: {rel} {a[rel]['type']}")
        elif rel not in a:
            lines.append(f"only in second: {rel} {b[rel]['type']}")
        elif a[rel] != b[rel]:
            keys = sorted(k for k in a[rel].keys() | b[rel].keys() if a[rel].get(k) != b[rel].get(k))
            lines.append(
                f"differs: {rel}: " + ", ".join(f"{k} {a[rel].get(k)!r} != {b[rel].get(k)!r}" for k in keys)
            )
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def db_dump(path: Path | str) -> list[str]:
    """Logical dump (SQL statements, ``iterdump`` order) of a SQLite database, WAL content included.

    The database and its ``-wal`` are copied to a temporary directory first, so the original is
    never touched: no ``-shm`` created, no checkpoint, no WAL removed.  Meant for quiescent
    databases (a writer committing during the copy could tear it).
    """
    with _quiet_copy(path) as conn:
        return list(conn.iterdump())


@contextlib.contextmanager
def _quiet_copy(path: Path | str) -> Iterator[sqlite3.Connection]:
    """A connection to a copy of the database and its ``-wal``: the original is never touched."""
    src = Path(path)
    if not src.exists():
        raise FileNotFoundError(src)
    with tempfile.TemporaryDirectory(prefix="db-copy-") as tmp:
        copy = Path(tmp) / "db"
        shutil.copyfile(src, copy)
        wal = src.with_name(src.name + "-wal")
        if wal.exists():
            shutil.copyfile(wal, Path(tmp) / "db-wal")
        conn = sqlite3.connect(copy)
        try:
            yield conn
        finally:
            conn.close()


def db_rows(path: Path | str, table: str) -> list[tuple[Any, ...]]:
    """All rows of one table (rowid order), read the same non-intrusive way as ``db_dump``."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table):
        raise ValueError(f"not a table name: {table!r}")
    with _quiet_copy(path) as conn:
        return list(conn.execute(f"SELECT * FROM {table} ORDER BY rowid"))
