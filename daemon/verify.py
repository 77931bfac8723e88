"""`verify`: read every object back and prove the backup restores, without touching the root."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from .archive import extract_stream, test_decompress
from .errors import BackupError, EncryptionError, IntegrityError
from .manifest import BackupRef, ObjectEntry
from .restore import archive_codec, entry_sources
from .snapshot import integrity_check
from .storage import Storage
from .streams import HashingStream, decompress_stream, write_stream

log = structlog.get_logger(__name__)


@dataclass
class ObjectCheck:
    name: str
    ok: bool
    detail: str
    verified: bool  # False when there was no checksum to compare (guide-made)
    key_problem: bool = False  # could not be checked: no identity, or not the right one
    sealed: bool = False  # encrypted, no identity here: stored bytes checked, contents not


@dataclass
class BackupCheck:
    type: str
    timestamp: str
    objects: list[ObjectCheck] = field(default_factory=list)
    deep: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.objects)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "timestamp": self.timestamp,
            "ok": self.ok,
            "objects": [o.__dict__ for o in self.objects],
            "deep": self.deep,
        }


async def _check_object(
    storage: Storage, ref: BackupRef, e: ObjectEntry, decryptor: Any, scratch: Path, deep_dir: Path | None
) -> ObjectCheck:
    key = ref.key(e.name)
    try:
        hs = HashingStream(storage.download_stream(key))
        stream: Any = hs
        if e.encryption:
            if decryptor is None:
                if deep_dir is not None:  # --deep promises a restore: without the key there is none
                    return ObjectCheck(e.name, False, "encrypted and no identity configured", True, True)
                # The manifest's size and sha256 are of the object as stored, sealed: those can be
                # checked without the key, which is best kept off this machine (README).
                return await _check_sealed(hs, e)
            stream = decryptor.decrypt_stream(stream, what=e.name)
        detail = ""
        if e.kind == "tar":
            if deep_dir is not None:
                stats = await extract_stream(
                    stream, deep_dir, codec=archive_codec(e), allowed_top=entry_sources(e) or None
                )
                detail = f"{stats.members} members extracted"
            else:
                res = await test_decompress(stream, archive_codec(e), allowed_top=entry_sources(e) or None)
                detail = f"{res[1]} members, {res[0]} bytes uncompressed"
        elif e.kind == "sqlite":
            db = scratch / f"{ref.type}-{ref.timestamp}-state.db"
            await write_stream(decompress_stream(stream, e.codec, e.name), db)
            result = await asyncio.to_thread(integrity_check, db)
            await asyncio.to_thread(db.unlink)
            if result != "ok":
                return ObjectCheck(e.name, False, f"integrity_check: {result}", bool(e.sha256))
            detail = "integrity_check ok"
        else:
            n = 0
            async for c in decompress_stream(stream, e.codec, e.name):
                n += len(c)
            detail = f"{n} bytes uncompressed"
        if hs.size != e.size:
            return ObjectCheck(e.name, False, f"size {hs.size}, manifest says {e.size}", bool(e.sha256))
        if e.sha256 and hs.sha256 != e.sha256:
            return ObjectCheck(e.name, False, "sha256 does not match the manifest", True)
        return ObjectCheck(e.name, True, detail, bool(e.sha256))
    except EncryptionError as exc:
        return ObjectCheck(e.name, False, exc.message, bool(e.sha256), True)
    except BackupError as exc:
        return ObjectCheck(e.name, False, exc.message, bool(e.sha256))


async def _check_sealed(hs: HashingStream, e: ObjectEntry) -> ObjectCheck:
    async for _ in hs:
        pass
    if hs.size != e.size:
        return ObjectCheck(e.name, False, f"size {hs.size}, manifest says {e.size}", bool(e.sha256))
    if e.sha256 and hs.sha256 != e.sha256:
        return ObjectCheck(e.name, False, "sha256 does not match the manifest", True)
    note = "stored bytes ok (size, sha256); contents not checked: no identity configured"
    return ObjectCheck(e.name, True, note, bool(e.sha256), sealed=True)


async def verify_backup(
    storage: Storage,
    ref: BackupRef,
    *,
    decryptor: Any = None,
    deep: bool = False,
    live_root: Path | None = None,
) -> BackupCheck:
    check = BackupCheck(ref.type, ref.timestamp)
    scratch = Path(tempfile.mkdtemp(prefix="tsb-verify-"))
    try:
        deep_dir = scratch / "root" if deep else None
        if deep_dir is not None:
            await asyncio.to_thread(deep_dir.mkdir)
        for e in ref.manifest.objects:
            oc = await _check_object(storage, ref, e, decryptor, scratch, deep_dir)
            log.info(
                "verify_object",
                backup=f"{ref.type}/{ref.timestamp}",
                object=e.name,
                ok=oc.ok,
                detail=oc.detail,
            )
            check.objects.append(oc)
        if deep_dir is not None and live_root is not None:
            check.deep = await asyncio.to_thread(compare_trees, deep_dir, live_root)
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, True)
    return check


def _walk(top: Path) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            p = Path(dirpath, name)
            rel = p.relative_to(top).as_posix()
            st = p.lstat()
            kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
            out[rel] = (kind, st.st_size if kind == "file" else 0)
    return out


def compare_trees(restored: Path, live: Path) -> dict[str, Any]:
    """How the restored copy differs from the live root (informational: the live root moved on)."""
    a = _walk(restored)
    tops = {k.split("/", 1)[0] for k in a}
    b = {k: v for k, v in _walk(live).items() if k.split("/", 1)[0] in tops} if live.exists() else {}
    changed = sorted(k for k in a if k in b and a[k] != b[k])
    return {
        "restored_entries": len(a),
        "only_in_backup": len(set(a) - set(b)),
        "only_live": len(set(b) - set(a)),
        "differ": len(changed),
        "examples": changed[:5],
    }


def raise_if_damaged(checks: list[BackupCheck]) -> None:
    bad = [
        f"{c.type}/{c.timestamp}/{o.name} ({o.detail})"
        for c in checks
        for o in c.objects
        if not o.ok and not o.key_problem
    ]
    unchecked = [f"{c.type}/{c.timestamp}/{o.name}" for c in checks for o in c.objects if o.key_problem]
    if bad:
        raise IntegrityError(
            f"{len(bad)} damaged object(s): " + "; ".join(bad[:5]) + (" …" if len(bad) > 5 else ""),
            "restore from another backup and take a new one",
        )
    if unchecked:
        raise EncryptionError(
            f"{len(unchecked)} encrypted object(s) could not be checked: "
            + "; ".join(unchecked[:3])
            + (" …" if len(unchecked) > 3 else "")
        )
