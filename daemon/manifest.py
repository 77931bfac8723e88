"""Backup manifests and the catalogue of complete backups in a destination.

Layout (compatible with the guide): ``<type>/<TS>/<objects…>`` and ``<type>/<TS>/manifest.json``,
written last.  A prefix without a manifest is not a backup.  Manifests written by the guide's
scripts carry no checksums; they are listed with ``guide: true`` and restored "unverified".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from .errors import BackupNotFoundError, IntegrityError
from .storage import ObjectInfo, Storage

log = structlog.get_logger(__name__)

FORMAT = "tinyserve-backup/1"
MANIFEST = "manifest.json"
TYPES = ("partial", "full", "services")
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z$")
TS_FORMAT = "%Y-%m-%dT%H-%M-%SZ"


def format_ts(when: datetime) -> str:
    return when.astimezone(UTC).strftime(TS_FORMAT)


def parse_ts(ts: str) -> datetime:
    return datetime.strptime(ts, TS_FORMAT).replace(tzinfo=UTC)


@dataclass
class ObjectEntry:
    """One stored object of a backup."""

    name: str  # file name inside the backup prefix, e.g. "configs.tar.zst"
    kind: str  # sqlite | tar | images | wal-copy
    size: int
    sha256: str | None = None
    codec: str = "none"  # zstd | gzip | none
    encryption: str | None = None  # None | "age"
    sources: list[str] = field(default_factory=list)  # root-relative paths it holds
    service: str | None = None
    raw_size: int | None = None
    journal_mode: str | None = None  # sqlite: the live database's mode when it was backed up

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "sha256": self.sha256,
            "codec": self.codec,
            "encryption": self.encryption,
            "sources": self.sources,
        }
        if self.service:
            d["service"] = self.service
        if self.raw_size is not None:
            d["raw_size"] = self.raw_size
        if self.journal_mode is not None:
            d["journal_mode"] = self.journal_mode
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ObjectEntry:
        return cls(
            name=str(d["name"]),
            kind=str(d.get("kind", "unknown")),
            size=int(d.get("size", 0)),
            sha256=d.get("sha256"),
            codec=str(d.get("codec", "none")),
            encryption=d.get("encryption"),
            sources=list(d.get("sources", [])),
            service=d.get("service"),
            raw_size=d.get("raw_size"),
            journal_mode=d.get("journal_mode"),
        )


@dataclass
class Manifest:
    type: str
    timestamp: str
    objects: list[ObjectEntry]
    hostname: str = ""
    tool_version: str = ""
    tinyserve_version: str = "unknown"
    root: str = ""
    created_at: str = ""
    completed_at: str = ""
    images: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    guide: bool = False  # made by the guide's shell scripts: no checksums

    @property
    def size_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def encrypted(self) -> bool:
        return any(o.encryption for o in self.objects)

    def object(self, name: str) -> ObjectEntry | None:
        return next((o for o in self.objects if o.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "type": self.type,
            "timestamp": self.timestamp,
            "hostname": self.hostname,
            "tool_version": self.tool_version,
            "tinyserve_version": self.tinyserve_version,
            "root": self.root,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "size_bytes": self.size_bytes,
            "images": self.images,
            "services": self.services,
            "warnings": self.warnings,
            # `files` keeps the guide's field so its restore script can read our manifests too.
            "files": [o.name for o in self.objects],
            "objects": [o.to_json() for o in self.objects],
        }

    def dumps(self) -> bytes:
        return (json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n").encode()


def _guess_entry(info: ObjectInfo) -> ObjectEntry:
    name = info.key.rsplit("/", 1)[-1]
    codec = "gzip" if name.endswith((".gz", ".tgz")) else "zstd" if name.endswith(".zst") else "none"
    encryption = "age" if name.endswith(".age") else None
    if name.startswith("state.db-wal"):
        kind = "wal-copy"
    elif name.startswith("state.db"):
        kind = "sqlite"
    elif name.startswith("images"):
        kind = "images"
    else:
        kind = "tar"
    return ObjectEntry(name=name, kind=kind, size=info.size, codec=codec, encryption=encryption)


def parse_manifest(data: bytes, btype: str, ts: str, listing: list[ObjectInfo] | None = None) -> Manifest:
    where = f"{btype}/{ts}/{MANIFEST}"
    try:
        doc = json.loads(data)
    except ValueError:
        raise IntegrityError(f"manifest {where} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"manifest {where} is not a JSON object")
    if doc.get("format") == FORMAT:
        return Manifest(
            type=str(doc.get("type", btype)),
            timestamp=str(doc.get("timestamp", ts)),
            objects=[ObjectEntry.from_json(o) for o in doc.get("objects", [])],
            hostname=str(doc.get("hostname", "")),
            tool_version=str(doc.get("tool_version", "")),
            tinyserve_version=str(doc.get("tinyserve_version", "unknown")),
            root=str(doc.get("root", "")),
            created_at=str(doc.get("created_at", "")),
            completed_at=str(doc.get("completed_at", "")),
            images=list(doc.get("images", [])),
            services=list(doc.get("services", [])),
            warnings=list(doc.get("warnings", [])),
        )
    # The guide's manifest: what exists is what was uploaded (its `files` list is not reliable:
    # it names services.tar.gz and images.tar.gz even when they were never made).
    objects = [_guess_entry(o) for o in (listing or []) if not o.key.endswith("/" + MANIFEST)]
    return Manifest(
        type=str(doc.get("type", btype)),
        timestamp=str(doc.get("timestamp", ts)),
        objects=objects,
        hostname=str(doc.get("hostname", "")),
        tinyserve_version=str(doc.get("tinyserve_version", "unknown")),
        guide=True,
    )


@dataclass
class BackupRef:
    type: str
    timestamp: str
    manifest: Manifest

    @property
    def prefix(self) -> str:
        return f"{self.type}/{self.timestamp}/"

    def key(self, name: str) -> str:
        return self.prefix + name

    @property
    def when(self) -> datetime:
        return parse_ts(self.timestamp)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "type": self.type,
            "timestamp": self.timestamp,
            "size_bytes": m.size_bytes,
            "objects": len(m.objects),
            "guide": m.guide,
            "encrypted": m.encrypted,
            "hostname": m.hostname,
            "services": m.services,
            "warnings": len(m.warnings),
        }


@dataclass
class Catalog:
    complete: list[BackupRef]
    # type/TS prefixes with objects but no manifest, with the newest object time
    incomplete: list[tuple[str, str, datetime, list[str]]]


async def scan(storage: Storage, types: tuple[str, ...] = TYPES) -> Catalog:
    """Read every backup prefix once: complete backups (oldest first) and leftovers."""
    import asyncio

    complete: list[BackupRef] = []
    incomplete: list[tuple[str, str, datetime, list[str]]] = []
    listings = await asyncio.gather(*(storage.list(f"{t}/") for t in types))
    sem = asyncio.Semaphore(8)
    for btype, listing in zip(types, listings, strict=True):
        by_ts: dict[str, list[ObjectInfo]] = {}
        for o in listing:
            parts = o.key.split("/")
            if len(parts) < 3 or not TS_RE.match(parts[1]):
                continue
            by_ts.setdefault(parts[1], []).append(o)

        async def read(ts: str, objs: list[ObjectInfo], btype: str = btype) -> BackupRef | None:
            async with sem:
                data = await storage.get_bytes(f"{btype}/{ts}/{MANIFEST}")
            try:
                m = parse_manifest(data, btype, ts, objs)
            except IntegrityError as exc:
                log.warning("manifest_unreadable", backup=f"{btype}/{ts}", error=exc.message)
                return None
            return BackupRef(btype, ts, m)

        pending = []
        for ts, objs in sorted(by_ts.items()):
            if any(o.key.endswith("/" + MANIFEST) for o in objs):
                pending.append(read(ts, objs))
            else:
                newest = max(o.last_modified for o in objs)
                incomplete.append((btype, ts, newest, [o.key for o in objs]))
        for ref in await asyncio.gather(*pending):
            if ref is not None:
                complete.append(ref)
    complete.sort(key=lambda r: (r.timestamp, TYPES.index(r.type) if r.type in TYPES else 9))
    return Catalog(complete=complete, incomplete=incomplete)


async def list_backups(storage: Storage, btype: str | None = None) -> list[BackupRef]:
    types = (btype,) if btype else TYPES
    return (await scan(storage, types)).complete


async def find_backup(storage: Storage, ts: str, btype: str | None = None) -> BackupRef:
    if not TS_RE.match(ts):
        raise BackupNotFoundError(
            f"{ts!r} is not a backup timestamp", "timestamps look like 2026-01-10T03-00-00Z"
        )
    import asyncio

    types = (btype,) if btype else TYPES

    async def one(t: str) -> BackupRef | None:
        # Only this timestamp's prefix: a restore must not read every manifest in the bucket.
        objs = await storage.list(f"{t}/{ts}/")
        if not any(o.key == f"{t}/{ts}/{MANIFEST}" for o in objs):
            return None
        data = await storage.get_bytes(f"{t}/{ts}/{MANIFEST}")
        return BackupRef(t, ts, parse_manifest(data, t, ts, objs))

    refs = [r for r in await asyncio.gather(*(one(t) for t in types)) if r is not None]
    if not refs and btype:
        others = [t for t in TYPES if t != btype]
        found = [r for r in await asyncio.gather(*(one(t) for t in others)) if r is not None]
        if found:
            kinds = " or ".join(f"a {r.type}" for r in found)
            raise BackupNotFoundError(
                f"no {btype} backup with timestamp {ts}: that is {kinds} backup",
                f"ask for the {found[0].type} backup, or leave the type out",
            )
    if not refs:
        what = f"{btype} backup" if btype else "complete backup"
        raise BackupNotFoundError(f"no {what} with timestamp {ts}")
    if len(refs) > 1:
        kinds = ", ".join(f"--{r.type}" for r in refs)
        raise BackupNotFoundError(f"more than one backup has timestamp {ts}", f"say which one with {kinds}")
    return refs[0]
