"""`restore --undo`: put back what the last restore replaced, or mend an interrupted one.

It works from the restore's record (``restore_record``), never from whatever ``*.pre-restore``
items happen to lie around: only the last restore's own, and the database always with its own
``-wal``/``-shm``. Nothing is deleted. What the undone restore put in place moves to
``.restore-undone-<hex>`` in the root, where ``restore --clean-up`` finds it.

Three cases, by the record's state:
  - ``done``: the restore finished; its items go to the undone directory, the kept ones back;
  - ``swapping``: a restore stopped half-way (a crash); the renames it made are reversed;
  - ``undoing``: an undo stopped half-way; the renames it planned are finished.
Every rename is worked out and checked against the disk before the first one is made: when the
root does not look the way the record says (an item missing, or in the way), nothing changes.
Like a restore, it stops tinyserved first (and waits for state.db to be let go) and starts it after.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from .cancel import through_cancel
from .config import Config
from .errors import RestoreError
from .restore import (
    DB_SIDE_FILES,
    PRE,
    TRASH_PREFIX,
    UNDONE_PREFIX,
    Move,
    Swap,
    now_rfc3339,
    remove_empty_dirs,
    staging_re,
    start_on_new_state,
    swap_with_tinyserved_stopped,
)
from .restore_record import (
    DONE,
    SWAPPING,
    UNDOING,
    RestoreRecord,
    put_back_record,
    read_record,
    record_path,
)
from .service import Tinyserved

log = structlog.get_logger(__name__)


@dataclass
class UndoPlan:
    record: RestoreRecord
    moves: list[Move]
    # what the root will hold again afterwards, and where the undone restore's items go
    put_back: list[str] = field(default_factory=list)
    undone_dir: Path | None = None

    def describe(self, root: Path) -> str:
        r = self.record
        if r.state == SWAPPING:
            return (
                f"roll back the restore of {r.backup} that stopped half-way ({r.at}): "
                f"{len(self.moves)} rename(s) in {root}"
            )
        if r.state == UNDOING:
            return f"finish the undo of the restore of {r.backup}: {len(self.moves)} rename(s) in {root}"
        back = ", ".join(self.put_back) or "nothing (everything it restored was new)"
        where = self.undone_dir.name if self.undone_dir else "?"
        return (
            f"undo the restore of {r.backup} ({r.at}): put back {back}; what it restored moves to "
            f"{where} in {root}"
        )


class _Disk:
    """Which paths exist, as a sequence of renames would leave them (nothing moved for real).
    ``hidden`` paths count as absent whatever is on disk."""

    def __init__(self, hidden: frozenset[Path] = frozenset()) -> None:
        self.gone: set[Path] = set(hidden)
        self.there: set[Path] = set()

    def exists(self, p: Path) -> bool:
        return p in self.there or (p not in self.gone and os.path.lexists(p))

    def move(self, src: Path, dst: Path) -> None:
        self.gone.add(src)
        self.there.discard(src)
        self.there.add(dst)
        self.gone.discard(dst)


def _rebaser(rec: RestoreRecord, root: Path) -> Callable[[str], Path]:
    """The record's paths in the root moved onto ``root`` as spelled now (the record is found by
    the resolved root; a symlink and its target are the same root). Paths outside it, such as the
    staging directory beside the spelling the restore used, are still valid as recorded."""
    old = Path(rec.root) if rec.root else root

    def rebase(s: str) -> Path:
        p = Path(s)
        return root / p.relative_to(old) if p.is_relative_to(old) else p

    return rebase


def _moves(rec: RestoreRecord, root: Path) -> list[Move]:
    rebase = _rebaser(rec, root)
    return [(rebase(a), rebase(b)) for a, b in rec.moves]


def _staged(rec: RestoreRecord, root: Path) -> set[Path]:
    rebase = _rebaser(rec, root)
    return {rebase(s) for s in rec.staged}


def _differs(root: Path, why: str) -> RestoreError:
    return RestoreError(
        f"{root} no longer looks the way the last restore left it ({why}); nothing was changed",
        f"put it right by hand (README: going back by hand), then delete the record {record_path(root)}",
    )


def _after(moves: list[Move], k: int, hidden: frozenset[Path], optional: set[Path]) -> bool:
    """Whether the disk looks like the first ``k`` of ``moves`` were made and none of the others:
    each made one can be reversed in turn, and each other one can still be made in turn (except
    that an ``optional`` source may be gone: a failed restore removes its staging)."""
    back = _Disk(hidden)
    for src, dst in reversed(moves[:k]):
        if back.exists(src) or not back.exists(dst):
            return False
        back.move(dst, src)
    ahead = _Disk(hidden)
    for src, dst in moves[k:]:
        if src in optional and not ahead.exists(src) and not ahead.exists(dst):
            continue  # a staged item not moved in yet, its staging removed since
        if not ahead.exists(src) or ahead.exists(dst):
            return False
        ahead.move(src, dst)
    return True


def _made(root: Path, moves: list[Move], fits: Any) -> int:
    """How many of ``moves`` were made. They are made strictly in order, so it is a prefix (a
    rollback cut short shortens it again); the only question is how long, and exactly one length
    must fit what is on disk. (A path can be both a move's source and a later one's destination,
    as the live state.db is, so no single move can be judged on its own.)"""
    ks = [k for k in range(len(moves) + 1) if fits(k)]
    if len(ks) != 1:
        raise _differs(root, "its items are neither where it left them nor where it meant to put them")
    return ks[0]


def _checked(root: Path, moves: list[Move]) -> list[Move]:
    """``moves`` if each can be made in turn on the disk as it is (source there, destination free)."""
    disk = _Disk()
    for src, dst in moves:
        if not disk.exists(src):
            raise _differs(root, f"{src} is missing")
        if disk.exists(dst):
            raise _differs(root, f"{dst} is in the way")
        disk.move(src, dst)
    return moves


def _rollback_moves(root: Path, rec: RestoreRecord) -> list[Move]:
    """An interrupted restore: the renames it made, reversed, newest first.

    Once the restored database was renamed in, something may have opened it since (tinyserved
    at the next boot) and left a -wal/-shm beside it that no rename planned: those belong to the
    restored database and leave with it, never to be read with the old one.
    """
    moves = _moves(rec, root)
    live_db = root / "state.db"
    sides = frozenset(root / n for n in DB_SIDE_FILES)
    db_in = next((i for i, (_, dst) in enumerate(moves) if dst == live_db), None)
    staged = _staged(rec, root)

    def fits(k: int) -> bool:
        return _after(moves, k, sides if db_in is not None and k > db_in else frozenset(), staged)

    made = _made(root, moves, fits)
    out: list[Move] = []
    for src, dst in reversed(moves[:made]):
        if dst == live_db:
            found = [p for p in sorted(sides) if os.path.lexists(p)]
            out += [(p, Path(f"{src}{p.name[len('state.db') :]}")) for p in found]
        out.append((dst, src))
    return _checked(root, out)


def _remaining_moves(root: Path, rec: RestoreRecord) -> list[Move]:
    """An interrupted undo: the planned renames it had not made yet, in order."""
    moves = _moves(rec, root)
    made = _made(root, moves, lambda k: _after(moves, k, frozenset(), set()))
    return _checked(root, moves[made:])


def _undo_moves(root: Path, rec: RestoreRecord, undone: Path) -> tuple[list[Move], list[str]]:
    """A finished restore: its items aside, what it kept back in their place."""
    moves: list[Move] = []
    put_back: list[str] = []
    for item in rec.items:
        rel = str(item["rel"])
        live = [root / rel]
        if rel == "state.db":
            # the database now in place goes with its own -wal/-shm, never leaving them to the old one
            live += [root / n for n in DB_SIDE_FILES]
        moves += [(p, undone / p.relative_to(root)) for p in live if os.path.lexists(p)]
        for k in map(str, item.get("kept", [])):
            if not k.endswith(PRE):
                raise _differs(root, f"{root / k} is missing")
            moves.append((root / k, root / k[: -len(PRE)]))
            put_back.append(k[: -len(PRE)])
    return _checked(root, moves), put_back


def plan_undo(root: Path, undone: Path | None = None) -> UndoPlan:
    """What --undo would do now. ``undone``: the directory for a finished restore's items (the
    same one when planned again after tinyserved stopped)."""
    rec = read_record(root)
    if rec is None:
        raise RestoreError(
            f"there is no restore to undo in {root}",
            "restores record what they replace for --undo; going back from older ones is by hand "
            "(README: going back by hand)",
        )
    if rec.state == SWAPPING:
        return UndoPlan(rec, _rollback_moves(root, rec))
    if rec.state == UNDOING:
        where = _rebaser(rec, root)(rec.undone_dir) if rec.undone_dir else None
        return UndoPlan(rec, _remaining_moves(root, rec), undone_dir=where)
    undone = undone or root / f"{UNDONE_PREFIX}{secrets.token_hex(4)}"
    moves, put_back = _undo_moves(root, rec, undone)
    return UndoPlan(rec, moves, put_back, undone)


def undoing_record(plan: UndoPlan, root: Path) -> RestoreRecord | None:
    """What to write before the first rename of ``plan``, so a crash half-way is finished by the
    next --undo; None when the record on disk already says what to do (a rollback or a finish)."""
    rec = plan.record
    if rec.state != DONE:
        return None
    return RestoreRecord(
        UNDOING,
        rec.backup,
        now_rfc3339(),
        moves=[[str(a), str(b)] for a, b in plan.moves],
        images=rec.images,
        undone_dir=str(plan.undone_dir),
        root=str(root),
    )


def _in_trash(root: Path, p: Path) -> bool:
    return p.is_relative_to(root) and p.relative_to(root).parts[0].startswith(TRASH_PREFIX)


def _where_db_goes(root: Path, moves: list[Move]) -> Path | None:
    """Where the live state.db goes, when the renames move it."""
    live = root / "state.db"
    return next((dst for src, dst in moves if src == live), None)


@dataclass
class UndoResult:
    undid: str  # the restore's backup
    state: str  # the record's state it started from: done, swapping, undoing
    renames: int
    put_back: list[str]
    undone_dir: str | None
    images_left_loaded: list[str]
    warnings: list[str]
    staging: str | None = None  # a rolled-back restore's items: back in its staging, beside the root

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


async def undo_restore(
    cfg: Config,
    *,
    tinyserved: Tinyserved | None = None,
    confirm: Any = None,
    done: Callable[[UndoResult], None] | None = None,
) -> UndoResult:
    """Undo the last restore of ``cfg.root`` (the caller holds the root's lock).

    ``done`` is told the result as soon as the renames are made: a cancellation after that point
    ends the command, not the undo, and the caller reports what was done.
    """
    root = cfg.root
    ts = tinyserved or Tinyserved.from_config(cfg)
    first = await asyncio.to_thread(plan_undo, root)
    rec = first.record
    if confirm is not None and not await confirm(first):
        raise RestoreError("undo cancelled; nothing was changed", "")
    swap = Swap(root, rec.backup)
    final: list[UndoPlan] = []

    def apply() -> list[str]:
        # Planned again now that tinyserved has stopped: a clean stop removes its -wal/-shm, so
        # the renames worked out while it ran would look for files that are gone.
        plan = plan_undo(root, first.undone_dir)
        final.append(plan)
        swap.run(plan.moves, undoing_record(plan, root), plan.record)
        return []

    # An interrupted restore or undo had stopped tinyserved: it is started again even when no
    # rename is left to make.
    restart = bool(first.moves) or rec.interrupted
    if restart:
        await swap_with_tinyserved_stopped(swap, ts, apply, _where_db_goes(root, first.moves), "undo")
    plan = final[0] if final else first
    result = UndoResult(
        undid=rec.backup,
        state=rec.state,
        renames=len(plan.moves),
        put_back=plan.put_back,
        undone_dir=None,
        images_left_loaded=rec.images,
        warnings=[],
    )
    cancelled = False
    try:
        # Done: this record has nothing left to undo. A rolled-back restore leaves the one before
        # it in force again (its *.pre-restore items were put back with everything else).
        after = rec.previous if rec.state == SWAPPING else None
        try:
            _, cancelled = await through_cancel(asyncio.to_thread(put_back_record, root, after))
        except (OSError, ValueError, TypeError) as exc:
            # The renames stand; a stale record is reported by status and the next --undo.
            log.warning("restore_record_not_updated", error=str(exc))
            result.warnings.append(f"the restore record could not be updated ({exc}); see `status`")
        undone = plan.undone_dir
        if undone is not None and undone.is_relative_to(root):
            kept, c = await through_cancel(asyncio.to_thread(os.path.lexists, undone))
            cancelled = cancelled or c
            result.undone_dir = str(undone.relative_to(root)) if kept else None
        if rec.state == SWAPPING:
            result.staging = _staging_of(rec, root)
        if done is not None:
            done(result)
    finally:
        # whatever happened since the renames, tinyserved runs again
        if restart:
            c = await start_on_new_state(swap, ts)
            cancelled = cancelled or c
    if rec.state == SWAPPING:
        # the trash the cut-short restore made for an older restore's leftovers, emptied now
        moved = _moves(rec, root)
        for d in {root / dst.relative_to(root).parts[0] for _, dst in moved if _in_trash(root, dst)}:
            _, c = await through_cancel(asyncio.to_thread(remove_empty_dirs, d))
            cancelled = cancelled or c
    log.info("restore_undone", backup=rec.backup, state=rec.state, renames=len(plan.moves))
    if cancelled:
        raise asyncio.CancelledError
    if restart:
        ok, status = await ts.wait_ready()
        if not ok:
            result.warnings.append(f"tinyserve status reports a problem: {status[-200:]}")
    return result


def _staging_of(rec: RestoreRecord, root: Path) -> str | None:
    """Where a rolled-back restore's items went back to: its staging directory (beside the root
    as the restore spelled it) or, for a point-in-time restore, its staged file in the root."""
    staging = staging_re()
    tops = {next((d for d in p.parents if staging.fullmatch(d.name)), p) for p in _staged(rec, root)}
    return str(sorted(tops)[0]) if tops else None
