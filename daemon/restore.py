"""Restore: download and verify everything first, then stop tinyserved, swap, start, check.

Order of work (nothing live changes before step 3):
  1. every object the restore needs is downloaded into a staging directory beside the root and
     checked against the manifest (size, sha256); archives are extracted there with the hostile-
     archive rules of ``archive.extract_stream``; the database is integrity-checked there; the
     images archive streams into ``docker load`` meanwhile, its last bytes held back, so Docker
     reads it in parallel but loads nothing yet;
  2. the caller confirms (TTY) and tinyserved is stopped;
  3. each replaced item is moved aside as ``<name>.pre-restore`` (kept until the next successful
     restore) and the staged item renamed into place — same filesystem, so each swap is atomic;
     a restored ``state.db`` never has a stale ``-wal``/``-shm`` beside it;
  4. ``PRAGMA integrity_check`` on the database now in place (a failure still rolls back);
     the held-back tail of the images archive is sent and ``docker load`` finishes (full backups;
     within ``docker.LOAD_FINISH_TIMEOUT_S``, or it is killed and the restore fails);
  5. tinyserved is started — also after a failure past step 2, once the old state is rolled back;
  6. ``tinyserve status`` when it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import structlog

from .archive import CODECS, Codec, extract_stream
from .backup import CONFIG_DIRS, NoProgress, Progress
from .cancel import through_cancel
from .config import Config
from .errors import BackupError, EncryptionError, IntegrityError, RestoreError, UsageError
from .fsutil import sync_filesystem, sync_renames
from .manifest import BackupRef, ObjectEntry, find_backup
from .restore_record import (
    DONE,
    SWAPPING,
    RestoreRecord,
    check_not_interrupted,
    put_back_record,
    read_record,
    write_record,
)
from .service import Tinyserved
from .snapshot import JOURNAL_MODES, integrity_check, set_journal_mode
from .storage import Storage
from .streams import HashingStream, decompress_stream, disk_error, write_stream

log = structlog.get_logger(__name__)

PRE = ".pre-restore"
# The names this tool gives what a restore leaves in or beside the root, each with
# secrets.token_hex(4): a clean-up takes exactly these, never a user's file or another root's.
TRASH_PREFIX = ".restore-trash-"  # an older restore's *.pre-restore items, until this one stands
UNDONE_PREFIX = ".restore-undone-"  # what an undone restore had put in place
_HEX8 = "[0-9a-f]{8}"


def staging_re(root_name: str | None = None) -> re.Pattern[str]:
    """Staging directories beside a root named ``root_name`` (of any root when None)."""
    name = re.escape(root_name) if root_name is not None else ".+"
    return re.compile(rf"\.{name}\.restore-{_HEX8}")


# Objects downloaded and unpacked at once (the images archive counts as one). Four, not two: on
# 2 cores a 2 GB full restore took 5.70 s against 5.85 s (medians of 5) and varied less, since a
# stream waiting on the network, on `docker load` or on the disk leaves its core to the others;
# and real S3 and R2 serve each connection at a fraction of a link's speed. ~15 MB more RSS.
STAGE_AT_ONCE = 4
DB_SIDE_FILES = ("state.db-wal", "state.db-shm", "state.db-journal")


@dataclass
class StagedItem:
    rel: str  # root-relative path that will be replaced, e.g. "state.db", "services/app"
    staged: Path


@dataclass
class RestorePlan:
    ref: BackupRef
    entries: list[ObjectEntry]
    services: list[str] | None
    unverified: bool
    items: list[str] = field(default_factory=list)  # rels that will be replaced
    images: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = ", ".join(self.items) or "nothing"
        extra = f" and load {len(self.images)} Docker images" if self.images else ""
        return f"replace {what}{extra} with {self.ref.type} backup {self.ref.timestamp}"


@dataclass
class RestoreResult:
    type: str
    timestamp: str
    restored: list[str]
    images_loaded: list[str]
    unverified: bool
    integrity: str
    tinyserve_status: str
    warnings: list[str]
    kept_aside: list[str]

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


Confirm = Callable[[RestorePlan], Awaitable[bool]]


def entry_sources(e: ObjectEntry) -> set[str]:
    """Which root-relative tops an archive may write (its manifest `sources`, or guide names)."""
    if e.sources:
        return set(e.sources)
    if e.name.startswith("configs"):
        return set(CONFIG_DIRS)
    if e.name.startswith("services"):
        return {"services"}
    return set()


def restored_journal_mode(e: ObjectEntry) -> str:
    """The mode the live database was in (our manifests record it); else WAL, tinyserved's mode."""
    return e.journal_mode if e.journal_mode in JOURNAL_MODES else "wal"


def archive_codec(e: ObjectEntry) -> Codec | Literal["auto"]:
    """The manifest's codec for an archive; anything unknown is sniffed from the bytes."""
    return cast(Codec, e.codec) if e.codec in CODECS else "auto"


Move = tuple[Path, Path]


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Swap:
    """Renames in the root, journaled so a failure can undo them all, and recorded on disk first
    (``restore_record``) so a crash half-way can be undone by the next ``restore --undo``."""

    def __init__(self, root: Path, backup: str = "") -> None:
        self.root = root
        self.backup = backup
        self.at = now_rfc3339()
        self.journal: list[Move] = []
        # the previous restore's leftovers, deleted once this one has succeeded
        self.trash = root / f"{TRASH_PREFIX}{secrets.token_hex(4)}"
        self.kept: list[dict[str, Any]] = []  # per item: its name and what was kept aside for it
        self._record_before: RestoreRecord | None = None
        self._recorded = False

    def _move(self, src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
        self.journal.append((src, dst))

    def plan(self, items: list[StagedItem]) -> list[Move]:
        """Every rename that swaps ``items`` in, in order; fills ``kept``."""
        root = self.root
        moves: list[Move] = []
        self.kept = []
        for item in items:
            live = root / item.rel
            pre = live.with_name(live.name + PRE)
            kept: list[str] = []
            if os.path.lexists(pre):
                moves.append((pre, self.trash / item.rel))
            side = [root / n for n in DB_SIDE_FILES] if item.rel == "state.db" else []
            for s in side:
                spre = s.with_name(s.name + PRE)
                if os.path.lexists(spre):
                    moves.append((spre, self.trash / s.name))
            if os.path.lexists(live):
                moves.append((live, pre))
                kept.append(str(pre.relative_to(root)))
            for s in side:
                if os.path.lexists(s):
                    # kept with the database: its last commits may be only in the -wal
                    moves.append((s, s.with_name(s.name + PRE)))
                    kept.append(s.name + PRE)
            moves.append((item.staged, live))
            self.kept.append({"rel": item.rel, "kept": kept})
        return moves

    def run(
        self, moves: list[Move], record: RestoreRecord | None, before: RestoreRecord | None = None
    ) -> None:
        """Make ``moves``, after writing ``record`` (the plan) over ``before`` (the record on disk,
        put back by a rollback); then make them durable."""
        if record is not None:
            self._record_before = before
            write_record(self.root, record)
            self._recorded = True
        for src, dst in moves:
            self._move(src, dst)
        # The renames themselves, durable once the command reports success (the root's parent
        # too: the root may be new).
        sync_renames(sorted({self.root.parent, *(p.parent for m in moves for p in m)}))

    def apply(self, items: list[StagedItem]) -> list[str]:
        """Swap every item in; returns the root-relative names kept aside as ``*.pre-restore``."""
        self.root.mkdir(parents=True, exist_ok=True)
        moves = self.plan(items)
        before = read_record(self.root)
        record = RestoreRecord(
            SWAPPING,
            self.backup,
            self.at,
            moves=[[str(a), str(b)] for a, b in moves],
            previous=before.to_dict() if before else None,
            root=str(self.root),
            staged=[str(i.staged) for i in items],
        )
        self.run(moves, record, before)
        return [k for item in self.kept for k in item["kept"]]

    def commit(self, images: list[str] | None = None) -> None:
        """The restore stands: record what it kept aside, for `restore --undo`."""
        try:
            rec = RestoreRecord(
                DONE, self.backup, self.at, items=self.kept, images=images or [], root=str(self.root)
            )
            write_record(self.root, rec)
        except OSError as exc:
            # The restore is done either way. A record left at "swapping" would have the next
            # --undo roll a finished restore back, so rather none at all.
            log.warning("restore_record_not_written", error=str(exc))
            with contextlib.suppress(OSError):
                put_back_record(self.root, None)

    def rollback(self) -> list[str]:
        """Move everything back, newest first; returns the moves it could not make ("dst -> src").

        It never deletes. Something found where an item must go back is renamed aside, not
        removed (it may be the user's data). A move that fails stops the rollback there: each
        earlier move would go onto a path the failed one still occupies, so carrying on would
        push user data out of the way or worse. The record then still says what was planned, so
        `restore --undo` can finish the job once the cause is fixed.
        """
        while self.journal:
            src, dst = self.journal[-1]
            try:
                if os.path.lexists(src):
                    aside = src.with_name(f"{src.name}.rollback-conflict-{secrets.token_hex(4)}")
                    os.rename(src, aside)
                    log.error("rollback_conflict_kept", path=str(src), kept_as=str(aside))
                os.rename(dst, src)
            except OSError as exc:
                left = [f"{d} -> {s}" for s, d in reversed(self.journal)]
                log.error("rollback_stopped", src=str(src), dst=str(dst), error=str(exc), left=left)
                return left
            self.journal.pop()
        remove_empty_dirs(self.trash)  # what the rollback emptied; not to be listed as a leftover
        if self._recorded:
            try:
                put_back_record(self.root, self._record_before)
            except OSError as exc:
                log.warning("restore_record_not_put_back", error=str(exc))
        return []

    def discard_trash(self) -> None:
        shutil.rmtree(self.trash, ignore_errors=True)


def remove_empty_dirs(top: Path) -> None:
    """``top`` and the directories under it, when empty (files are never touched)."""
    for dirpath, _dirs, _files in os.walk(top, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


async def _undo(swap: Swap, tinyserved: Tinyserved, what: str = "restore") -> None:
    """Move everything back and start tinyserved again, whatever interrupts meanwhile.

    If some move cannot be undone, tinyserved stays stopped (its state is half old, half new) and
    the error says which moves are left, for a person to make.
    """
    left, _ = await through_cancel(asyncio.to_thread(swap.rollback))
    if left:
        raise RestoreError(
            f"the {what} failed and could not put everything back; tinyserved was left stopped. "
            f"Still to move back (newest first): {'; '.join(left)}",
            "fix the cause (the log event rollback_stopped has it), then run `tinyserve-backup "
            "restore --undo`, which finishes the job, or make those moves by hand and start tinyserved",
        )
    with contextlib.suppress(BackupError):
        await through_cancel(tinyserved.start())


async def swap_in(swap: Swap, items: list[StagedItem], tinyserved: Tinyserved) -> list[str]:
    """Stop tinyserved, swap ``items`` in; on failure or cancellation put everything back first."""
    await asyncio.to_thread(check_not_interrupted, swap.root)
    db = any(i.rel == "state.db" for i in items)
    aside_db = swap.root / f"state.db{PRE}" if db else None
    return await swap_with_tinyserved_stopped(swap, tinyserved, lambda: swap.apply(items), aside_db)


async def swap_with_tinyserved_stopped(
    swap: Swap,
    tinyserved: Tinyserved,
    apply: Callable[[], list[str]],
    aside_db: Path | None,
    what: str = "restore",
) -> list[str]:
    """Stop tinyserved, run ``apply`` (renames through ``swap``); on failure or cancellation put
    everything back first and start tinyserved again. ``aside_db``: where the live state.db goes,
    when it is among the renames: every other process must have let go of it first, and must
    not have opened it again meanwhile."""
    aside: list[str] = []
    _, cancelled = await through_cancel(tinyserved.stop())
    if not cancelled:
        try:
            if aside_db is not None:
                await tinyserved.wait_released(swap.root / "state.db")
            aside, cancelled = await through_cancel(asyncio.to_thread(apply))
            if aside_db is not None and not cancelled:
                await tinyserved.check_not_reopened(aside_db, swap.root)
        except BaseException:
            await _undo(swap, tinyserved, what)
            raise
    if cancelled:
        await _undo(swap, tinyserved, what)  # (nothing to move back when the stop was interrupted)
        raise asyncio.CancelledError
    return aside


async def start_on_new_state(swap: Swap, tinyserved: Tinyserved) -> bool:
    """Start tinyserved on the swapped-in state and empty the trash, both to their end.

    Returns whether a cancellation arrived meanwhile, for the caller to raise once it is done: a
    Ctrl-C landing here must not leave tinyserved stopped or the previous restore's leftovers half
    deleted.
    """
    _, cancelled = await through_cancel(tinyserved.start())
    _, late = await through_cancel(asyncio.to_thread(swap.discard_trash))
    return cancelled or late


class RestoreJob:
    def __init__(
        self,
        cfg: Config,
        storage: Storage,
        *,
        tinyserved: Tinyserved | None = None,
        decryptor: Any = None,
        progress: Progress | None = None,
        confirm: Confirm | None = None,
    ) -> None:
        self.cfg = cfg
        self.storage = storage
        self.root = cfg.root
        self.tinyserved = tinyserved or Tinyserved.from_config(cfg)
        self.decryptor = decryptor
        self.progress = progress or NoProgress()
        self.confirm = confirm
        self.warnings: list[str] = []
        self._load: asyncio.Task[list[str]] | None = None
        self._load_commit = asyncio.Event()
        # Set once the new state is in place and tinyserved started: a cancellation after that
        # point (or during it) ends the command, not the restore.
        self.completed: RestoreResult | None = None

    # ---- step 0: plan ---------------------------------------------------------------------

    async def plan(self, ts: str, btype: str | None, services: list[str] | None) -> RestorePlan:
        if services and btype == "partial":
            raise UsageError("--service needs a full or services backup", "drop --partial")
        ref = await find_backup(self.storage, ts, btype)
        m = ref.manifest
        if services:
            if ref.type == "partial":
                raise UsageError(
                    f"backup {ts} is partial and holds no service data", "pick a full or services backup"
                )
            have = set(m.services) or {e.service for e in m.objects if e.service}
            guide_all = next((e for e in m.objects if e.name.startswith("services.tar")), None)
            if guide_all is None:
                missing = sorted(set(services) - have)
                if missing:
                    raise BackupError(
                        f"backup {ts} has no data for service {', '.join(missing)}",
                        f"services in it: {', '.join(sorted(have)) or 'none'}",
                    )
                entries = [e for e in m.objects if e.service in services]
            else:
                entries = [guide_all]
            return RestorePlan(
                ref, entries, sorted(services), m.guide, [f"services/{s}" for s in sorted(services)]
            )
        entries = [e for e in m.objects if e.kind != "wal-copy"]
        if any(e.kind == "wal-copy" for e in m.objects):
            self.warnings.append(
                "this guide-made backup holds a copy of state.db-wal; it is NOT applied (it cannot be "
                "replayed onto the .backup snapshot)"
            )
        items: list[str] = []
        images: list[str] = []
        for e in entries:
            if e.kind == "sqlite":
                items.append("state.db")
            elif e.kind == "tar":
                if e.service:
                    items.append(f"services/{e.service}")
                else:
                    items.extend(sorted(entry_sources(e)))
            elif e.kind == "images":
                if images:
                    raise IntegrityError(f"backup {ts} lists more than one images archive")
                images = list(m.images) or ["(images archive)"]
        seen: list[str] = []
        for i in items:
            if i not in seen:
                seen.append(i)
        return RestorePlan(ref, entries, None, m.guide, seen, images)

    # ---- step 1: stage --------------------------------------------------------------------

    def _staging_dir(self) -> Path:
        # Beside the root, so the final renames stay on one filesystem.
        parent = self.root.parent
        return parent / f".{self.root.name}.restore-{secrets.token_hex(4)}"

    async def _download(self, plan: RestorePlan, e: ObjectEntry) -> AsyncIterator[bytes]:
        """The object's bytes as stored, checked against the manifest once fully read."""
        key = plan.ref.key(e.name)
        hs = HashingStream(self.storage.download_stream(key))
        async for c in hs:
            self.progress.advance(len(c))
            yield c
        if hs.size != e.size:
            raise IntegrityError(f"{key} is {hs.size} bytes, the manifest says {e.size}")
        if e.sha256 and hs.sha256 != e.sha256:
            raise IntegrityError(f"{key} does not match its sha256 in the manifest (damaged object)")

    def _decoded(self, plan: RestorePlan, e: ObjectEntry) -> AsyncIterator[bytes]:
        stream: AsyncIterator[bytes] = self._download(plan, e)
        if e.encryption:
            if self.decryptor is None:
                raise EncryptionError(
                    f"{e.name} is encrypted and no identity is configured",
                    "set `encryption.identity_file` to your age private key",
                )
            stream = self.decryptor.decrypt_stream(stream, what=e.name)
        return stream

    async def _stage_entry(self, plan: RestorePlan, e: ObjectEntry, dest: Path, staging: Path) -> None:
        try:
            if e.kind == "sqlite":
                db = dest / "state.db"
                chunks = self._decoded(plan, e)
                await write_stream(decompress_stream(chunks, e.codec, e.name), db)
                result = await asyncio.to_thread(integrity_check, db)
                if result != "ok":
                    raise IntegrityError(f"the database in {e.name} fails integrity_check: {result}")
                try:
                    await asyncio.to_thread(set_journal_mode, db, restored_journal_mode(e))
                except IntegrityError as exc:
                    # The data is whole; only the mode is not what it was (a filesystem without
                    # shared memory for WAL?). tinyserved can still open it; say so.
                    log.warning("restore_journal_mode_unchanged", error=exc.message)
                    self.warnings.append(f"{exc.message}; WAL shipping waits until it is in WAL mode")
            elif e.kind == "tar":
                if plan.services:
                    select: set[str] | None = {f"services/{s}" for s in plan.services}
                    allowed = entry_sources(e) | (select or set())
                else:
                    select = None
                    allowed = entry_sources(e)
                await extract_stream(
                    self._decoded(plan, e),
                    dest,
                    codec=archive_codec(e),
                    allowed_top=allowed or None,
                    select_top=select,
                    durable=True,
                )
            elif e.kind == "images":
                await self._start_load(plan, e)
        except OSError as exc:
            raise disk_error(exc, staging) from None

    async def _start_load(self, plan: RestorePlan, e: ObjectEntry) -> None:
        """Stream the images archive into ``docker load``; return once all but its tail is in.

        Loading images changes live Docker state, so ``docker load`` must not finish before every
        object is verified and the swap is done; but it need not wait to start. It reads the archive
        now, in parallel with the other downloads, minus the last bytes (``TAIL_HOLD_BYTES``), which
        ``_apply`` sends after the swap. A damaged archive (its sha256 is known only at the end)
        or any failure before that kills it with nothing loaded.
        """
        from .docker import check_docker, load_images

        fed = asyncio.Event()
        source = decompress_stream(self._decoded(plan, e), e.codec, e.name)
        self._load = asyncio.create_task(load_images(source, commit=self._load_commit, fed=fed))
        # An engine that is down is reported now, before anything stops, in check_docker's words
        # (clearer than a failed load's). Asked while the load starts: on a small restore, waiting
        # for the answer first put ~0.1 s on the critical path. A failure here leaves the load to
        # run()'s clean-up, which kills it.
        await check_docker()
        waiter = asyncio.ensure_future(fed.wait())
        try:
            await asyncio.wait({waiter, self._load}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self._load.done():
            await self._load  # it ended early: raises docker's error

    async def _cancel_load(self) -> bool:
        """Kill a ``docker load`` that was not let finish (nothing of it is loaded).

        Returns whether a cancellation arrived meanwhile, for the caller to raise once its own
        clean-up is done.
        """
        load, self._load = self._load, None
        if load is None:
            return False
        cancelled = False
        if not load.done():
            load.cancel()
            _, cancelled = await through_cancel(asyncio.wait({load}))
        if not load.cancelled():
            load.exception()  # its error is moot now: the restore is failing for another reason
        return cancelled

    async def stage(self, plan: RestorePlan, staging: Path) -> list[StagedItem]:
        """Download, verify and unpack every object; each into its own directory, several at once."""
        self.progress.start("download + verify", sum(e.size for e in plan.entries))
        dirs = [staging / "parts" / str(n) for n in range(len(plan.entries))]
        for d in dirs:
            await asyncio.to_thread(d.mkdir, parents=True)
        sem = asyncio.Semaphore(STAGE_AT_ONCE)

        async def one(e: ObjectEntry, d: Path) -> None:
            async with sem:
                await self._stage_entry(plan, e, d, staging)

        # The images first (Docker's share of the work then overlaps everything else), then the
        # largest first, so one big archive does not start last and run alone.
        order = sorted(
            zip(plan.entries, dirs, strict=True), key=lambda ed: (ed[0].kind != "images", -ed[0].size)
        )
        try:
            async with asyncio.TaskGroup() as tg:
                for e, d in order:
                    tg.create_task(one(e, d))
        except BaseExceptionGroup as eg:
            # One clear error (the first of ours), not a group, reaches the user.
            first = next((x for x in eg.exceptions if isinstance(x, BackupError)), eg.exceptions[0])
            raise first from None
        finally:
            self.progress.finish()
        staged = []
        for rel in plan.items:
            found = None
            for d in dirs:
                if await asyncio.to_thread(os.path.lexists, d / rel):
                    found = d / rel
            if found is None and rel in CONFIG_DIRS:
                # An archive that lacked a config dir restores it as empty, like the guide's tar.
                found = dirs[0] / rel
                await asyncio.to_thread(found.mkdir, parents=True, exist_ok=True)
            if found is None:
                raise IntegrityError(f"the backup does not contain {rel}")
            staged.append(StagedItem(rel, found))
        return staged

    # ---- the whole restore ----------------------------------------------------------------

    async def run(
        self, ts: str, btype: str | None = None, services: list[str] | None = None
    ) -> RestoreResult:
        # before any download: over a half-swapped root a restore would mix two states for good
        await asyncio.to_thread(check_not_interrupted, self.root)
        plan = await self.plan(ts, btype, services)
        if plan.ref.manifest.encrypted and self.decryptor is None:
            raise EncryptionError(
                f"backup {ts} is encrypted and no identity is configured",
                "set `encryption.identity_file` to your age private key",
            )
        if plan.unverified:
            msg = "guide-made backup: it has no checksums, so its objects are UNVERIFIED (sizes only)"
            self.warnings.append(msg)
            log.warning("restore_unverified", backup=f"{plan.ref.type}/{ts}")
        log.info("restore_started", backup=f"{plan.ref.type}/{ts}", items=plan.items)
        await asyncio.to_thread(self.root.parent.mkdir, parents=True, exist_ok=True)
        staging = self._staging_dir()
        await asyncio.to_thread(staging.mkdir, mode=0o700)
        try:
            items = await self.stage(plan, staging)
            # On disk before anything live is renamed: after a power cut the root then holds the
            # old items or complete new ones, never new names over files the cut left empty.
            t0 = time.monotonic()
            try:
                await asyncio.to_thread(sync_filesystem, staging)
            except OSError as exc:
                raise disk_error(exc, staging) from None
            synced = round(time.monotonic() - t0, 3)
            log.info("restore_staged", backup=f"{plan.ref.type}/{ts}", items=len(items), sync_s=synced)
            if self.confirm is not None and not await self.confirm(plan):
                raise RestoreError("restore cancelled; nothing was changed", "")
            return await self._apply(plan, items)
        finally:
            cancelled = await self._cancel_load()
            _, late = await through_cancel(asyncio.to_thread(shutil.rmtree, staging, True))
            if cancelled or late:
                raise asyncio.CancelledError

    async def _apply(self, plan: RestorePlan, items: list[StagedItem]) -> RestoreResult:
        swap = Swap(self.root, f"{plan.ref.type}/{plan.ref.timestamp}")
        loaded: list[str] = []
        integrity = "not restored"
        if self._load is not None and self._load.done():
            await self._load  # docker ended while waiting for its tail: its error, before the stop
        try:
            aside = await swap_in(swap, items, self.tinyserved)
        except OSError as exc:
            log.error("restore_failed_rolled_back", error=str(exc))
            raise disk_error(exc, self.root) from None
        interrupted = False
        try:
            if "state.db" in plan.items:
                # Checked in place before tinyserved starts, so a bad result can still roll back.
                # (to its end: its connection must be closed before any rollback moves the file)
                integrity, interrupted = await through_cancel(
                    asyncio.to_thread(integrity_check, self.root / "state.db")
                )
                if interrupted:
                    raise asyncio.CancelledError
                if integrity != "ok":
                    raise IntegrityError(f"restored state.db fails integrity_check: {integrity}")
            if self._load is not None:
                self._load_commit.set()
                # Docker has the whole archive now and may be registering images: there is no
                # clean way back from here, so a cancellation lets it and the restore finish.
                loaded, interrupted = await through_cancel(self._load)
        except BaseException as exc:
            log.error("restore_failed_rolling_back", error=getattr(exc, "message", type(exc).__name__))
            try:
                await self._cancel_load()
            finally:
                await _undo(swap, self.tinyserved)
            if isinstance(exc, OSError):
                raise disk_error(exc, self.root) from None
            raise
        _, late = await through_cancel(asyncio.to_thread(swap.commit, loaded))
        interrupted = interrupted or late
        cancelled = await start_on_new_state(swap, self.tinyserved)
        # From here the restore stands, whatever interrupts: what was done is kept for the caller
        # to report, so "interrupted" is never read as "nothing happened".
        self.completed = self._result(plan, loaded, integrity, "not checked (interrupted)", aside)
        if interrupted or cancelled:
            log.warning("restore_finished_despite_cancel", backup=f"{plan.ref.type}/{plan.ref.timestamp}")
            raise asyncio.CancelledError
        ok, status = await self.tinyserved.wait_ready()
        if not ok:
            self.warnings.append(f"tinyserve status reports a problem: {status[-200:]}")
        log.info(
            "restore_finished",
            backup=f"{plan.ref.type}/{plan.ref.timestamp}",
            restored=plan.items,
            images=len(loaded),
        )
        self.completed = self._result(plan, loaded, integrity, status, aside)
        return self.completed

    def _result(
        self, plan: RestorePlan, loaded: list[str], integrity: str, status: str, aside: list[str]
    ) -> RestoreResult:
        return RestoreResult(
            type=plan.ref.type,
            timestamp=plan.ref.timestamp,
            restored=plan.items,
            images_loaded=loaded,
            unverified=plan.unverified,
            integrity=integrity,
            tinyserve_status=status,
            warnings=self.warnings,
            kept_aside=aside,
        )


# Exactly the names this tool gives what it leaves (secrets.token_hex(4), a pid), so a clean-up
# never takes a user's file, or the staging of another root whose name merely starts alike.
_ROOT_LEFTOVER = re.compile(
    rf"({re.escape(TRASH_PREFIX)}|{re.escape(UNDONE_PREFIX)}){_HEX8}"
    rf"|\.state\.db\.pitr-\d+(-wal|-shm|-journal)?|\.\.state\.db\.pitr-\d+\.pitr-{_HEX8}(\.download|\.age)?"
)


def restore_leftovers(root: Path) -> list[Path]:
    """What earlier restores left: the replaced items kept as ``*.pre-restore`` (at the top of the
    root and under services/), and what an interrupted restore could not remove (the trash of a
    previous restore's leftovers, a staging directory beside the root, a staged point-in-time db).
    The root itself may be a symlink (restores work through it); services/ may not.
    """
    found: list[Path] = []
    for d in (root, root / "services"):
        if d.is_dir() and (d == root or not d.is_symlink()):
            for p in sorted(d.iterdir()):
                if p.name.endswith(PRE) or (d == root and _ROOT_LEFTOVER.fullmatch(p.name)):
                    found.append(p)
    staging = staging_re(root.name)
    if root.parent.is_dir():
        found += sorted(p for p in root.parent.iterdir() if staging.fullmatch(p.name))
    return found


def tree_bytes(path: Path) -> int:
    """Bytes under ``path`` (links not followed)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def remove_leftovers(paths: list[Path]) -> None:
    """Delete ``paths`` (links themselves, never what they point to); a failure says what is gone."""
    done: list[str] = []
    try:
        for p in paths:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
            done.append(p.name)
    except OSError as exc:
        raise RestoreError(
            f"could not remove {exc.filename or p}: {exc.strerror or exc}"
            + (f" (removed before it: {', '.join(done)})" if done else ""),
            "check its owner and permissions (files written by a container may belong to another "
            "user; sudo rm them), then run --clean-up again",
        ) from None
    finally:
        sync_renames(sorted({p.parent for p in paths}))


async def swap_database(
    cfg: Config,
    staged_db: Path,
    tinyserved: Tinyserved | None = None,
    *,
    swapped: Callable[[list[str]], None] | None = None,
    backup: str = "point-in-time",
) -> list[str]:
    """Replace the live state.db with an already verified file (used by point-in-time restore).

    ``swapped`` is told what was kept aside as soon as the new database is in place: a
    cancellation after that point ends the command, not the restore, and the caller reports it.
    ``backup`` names what was restored in the record `restore --undo` reads.
    """
    ts = tinyserved or Tinyserved.from_config(cfg)
    swap = Swap(cfg.root, backup)
    aside = await swap_in(swap, [StagedItem("state.db", staged_db)], ts)
    if swapped is not None:
        swapped(aside)
    _, late = await through_cancel(asyncio.to_thread(swap.commit))
    if await start_on_new_state(swap, ts) or late:
        log.warning("restore_finished_despite_cancel", backup="point-in-time")
        raise asyncio.CancelledError
    return aside
