"""`restore --undo`: the last restore undone exactly, and restores or undos cut short mended."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.backup import BackupJob
from daemon.config import Config, parse_config
from daemon.errors import RestoreError
from daemon.restore import RestoreJob, StagedItem, Swap
from daemon.restore_record import (
    DONE,
    SWAPPING,
    RestoreRecord,
    read_record,
    record_path,
    write_record,
)
from daemon.storage import S3Storage
from daemon.undo import plan_undo, undo_restore, undoing_record
from tests.conftest import run_cli
from tests.helpers.rootfactory import RootInfo, db_dump, tree_digest
from tests.helpers.s3server import MotoServer
from tests.helpers.tinyserved import DB_FILES, cfg_for, ctl_calls, tinyserve_root


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RootInfo:
    return tinyserve_root(tmp_path, monkeypatch, seed=5)


def state(root: Path) -> tuple[dict[str, object], list[str]]:
    """Everything in the root: files, modes, links, kept-aside items; the database by content
    (read from a copy, with its -wal: opening the live one would checkpoint it)."""
    tree = tree_digest(root, exclude=[*DB_FILES, "logs"])
    copy = root.parent / "db-copy"
    copy.mkdir(exist_ok=True)
    for n in DB_FILES:
        (copy / n).unlink(missing_ok=True)
        if (root / n).exists():
            (copy / n).write_bytes((root / n).read_bytes())
    return tree, db_dump(copy / "state.db")


def commit_and_crash(db: Path, value: int) -> None:
    """A writer that commits and dies without closing: the commit lives only in state.db-wal."""
    code = (
        "import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
        "c.execute('pragma wal_autocheckpoint=0'); "
        "c.execute('create table if not exists later(x)'); "
        "c.execute('insert into later values (?)', (int(sys.argv[2]),)); c.commit(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, str(db), str(value)], check=True, timeout=30)
    assert (db.parent / "state.db-wal").stat().st_size > 0


async def test_undo_puts_back_exactly_what_the_last_restore_replaced(
    root: RootInfo, s3_storage: S3Storage
) -> None:
    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("partial")
    # the live state moves on after the backup: a config edit, a commit only in the -wal, and
    # a *.pre-restore item left by some older restore
    (root.path / "generated" / "docker-compose.yml").write_text("services: {}\n")
    commit_and_crash(root.db_path, 42)
    (root.path / "traefik.pre-restore").mkdir()
    (root.path / "traefik.pre-restore" / "old.yml").write_text("older\n")
    live = state(root.path)

    await RestoreJob(cfg, s3_storage).run(res.timestamp)
    rec = read_record(root.path)
    assert rec is not None and rec.state == DONE and rec.backup == f"partial/{res.timestamp}"
    assert not (root.path / "state.db-wal").exists()
    restored = state(root.path)
    assert restored != live

    out = await undo_restore(cfg)
    assert out.state == DONE and out.undid == f"partial/{res.timestamp}"
    tree, dump = state(root.path)
    # The older restore's traefik.pre-restore went with the restore that replaced it; the rest
    # is exactly the live state, the commit that was only in the -wal included.
    want_tree = {k: v for k, v in live[0].items() if not k.startswith("traefik.pre-restore")}
    assert tree == {k: v for k, v in want_tree.items()} | {
        k: v for k, v in tree.items() if k.startswith(".restore-undone-")
    }
    assert dump == live[1] and any("42" in line for line in dump)
    # what the restore had put in place is kept, the database with nothing of the old -wal
    undone = root.path / str(out.undone_dir)
    assert out.undone_dir and undone.name.startswith(".restore-undone-")
    assert sorted(p.name for p in undone.iterdir()) == sorted(
        ["state.db", "backups", "cloudflared", "generated", "traefik"]
    )
    assert db_dump(undone / "state.db") == restored[1]
    assert read_record(root.path) is None
    assert ctl_calls() == [["stop"], ["start"], ["stop"], ["start"]]
    with pytest.raises(RestoreError, match="there is no restore to undo"):
        await undo_restore(cfg)


async def test_undo_refuses_a_root_changed_since_and_changes_nothing(
    root: RootInfo, s3_storage: S3Storage
) -> None:
    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("partial")
    await RestoreJob(cfg, s3_storage).run(res.timestamp)
    (root.path / "generated.pre-restore").rename(root.path.parent / "moved-away")
    before, calls = state(root.path), ctl_calls()
    with pytest.raises(RestoreError, match="no longer looks the way the last restore left it") as ei:
        await undo_restore(cfg)
    assert "generated.pre-restore is missing" in ei.value.message
    assert str(record_path(root.path)) in ei.value.fix
    assert state(root.path) == before and ctl_calls() == calls  # tinyserved never stopped


def _staged(root: Path, staging: Path) -> list[StagedItem]:
    """Two staged items, as a restore leaves them beside the root before its swap."""
    (staging / "generated").mkdir(parents=True)
    (staging / "generated" / "docker-compose.yml").write_text("services: {restored: {}}\n")
    db = staging / "state.db"
    c = sqlite3.connect(db)
    c.execute("pragma journal_mode=wal")  # as a restore leaves it
    c.execute("create table restored(x)")
    c.commit()
    c.close()
    return [StagedItem("state.db", db), StagedItem("generated", staging / "generated")]


@pytest.mark.parametrize("made", [0, 1, 3, 5, -1])
async def test_a_restore_cut_short_mid_swap_is_rolled_back_by_undo(
    made: int, root: RootInfo, tmp_path: Path
) -> None:
    """A crash (power cut, kill -9) after some of the swap's renames: nothing else may run over
    the half-swapped root, and --undo puts back the state from before that restore, the previous
    restore's record included."""
    cfg = cfg_for(root.path)
    commit_and_crash(root.db_path, 7)  # a -wal beside the live database: it moves too
    (root.path / "generated.pre-restore").mkdir()  # an older restore's, moved to the trash first
    previous = RestoreRecord(DONE, "full/2026-01-01T00-00-00Z", "2026-01-01T00:00:00Z")
    write_record(root.path, previous)
    staging = tmp_path / ".tinyserve.restore-0badcafe"
    before = state(root.path)
    staged_before, moves = _crash_mid_swap(root.path, staging, made)
    assert len(moves) == 7  # db, -wal, -shm aside; db in; old .pre-restore to trash; generated out, in

    # status says so; a new restore and a clean-up refuse to touch it
    st = run_cli("--config", _write(cfg, tmp_path), "status")
    assert "INTERRUPTED: a restore of partial/2026-11-26T10-00-00Z stopped half-way" in st.stdout
    with pytest.raises(RestoreError, match=r"left .* half-swapped"):
        await RestoreJob(cfg, S3StorageNever()).run("2026-11-26T10-00-00Z")
    with pytest.raises(RestoreError, match=r"left .* half-swapped"):  # nor is it backed up
        await BackupJob(cfg, S3StorageNever()).run("partial")  # type: ignore[arg-type]
    res = run_cli("--config", _write(cfg, tmp_path), "restore", "--clean-up", "--yes")
    assert res.returncode == 8 and "run `tinyserve-backup restore --undo` to put it back first" in res.stderr

    out = await undo_restore(cfg)
    assert out.state == SWAPPING and out.renames == (len(moves) if made < 0 else made)
    assert state(root.path) == before
    assert tree_digest(staging) == staged_before
    assert out.staging == str(staging)
    again = read_record(root.path)
    assert again is not None and again.to_dict() == previous.to_dict()  # the older one stands again
    # (with nothing to move back too: the cut-short restore had stopped it)
    assert ctl_calls() == [["stop"], ["start"]]
    assert not any(p.name.startswith(".restore-trash-") for p in root.path.iterdir())


class S3StorageNever:
    """A destination that must not be reached: the refusal comes first."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the restore touched storage ({name}) over a half-swapped root")


def _write(cfg: Config, tmp_path: Path) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(
        f"root: {cfg.root}\ndestination:\n  url: file://{tmp_path}\n"
        "tinyserved:\n  stop: [tinyserved-ctl, stop]\n  start: [tinyserved-ctl, start]\n"
    )
    return str(p)


@pytest.mark.parametrize("made", [1, 4, -1])
async def test_an_undo_cut_short_is_finished_by_the_next(
    made: int, root: RootInfo, s3_storage: S3Storage
) -> None:
    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("partial")
    (root.path / "generated" / "docker-compose.yml").write_text("services: {}\n")
    commit_and_crash(root.db_path, 9)
    live = state(root.path)
    await RestoreJob(cfg, s3_storage).run(res.timestamp)

    # What undo_restore does, stopped after `made` renames
    plan = plan_undo(root.path)
    record = undoing_record(plan, root.path)
    assert record is not None
    write_record(root.path, record)
    for src, dst in plan.moves[: len(plan.moves) if made < 0 else made]:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
    with pytest.raises(RestoreError, match="interrupted undo of a restore") as ei:
        await RestoreJob(cfg, s3_storage).run(res.timestamp)
    assert ei.value.fix == "run `tinyserve-backup restore --undo` to finish it first"

    out = await undo_restore(cfg)
    assert out.renames == (0 if made < 0 else len(plan.moves) - made)
    assert ctl_calls()[-2:] == [["stop"], ["start"]]  # started again, even with nothing left to do
    tree, dump = state(root.path)
    assert dump == live[1]
    assert {k: v for k, v in tree.items() if not k.startswith(".restore-undone-")} == live[0]
    assert read_record(root.path) is None


def test_undo_via_cli_asks_reports_and_cleans_up(
    tmp_path: Path, s3_server: MotoServer, bucket: str, root: RootInfo
) -> None:
    cfgp = tmp_path / "cfg.yaml"
    cfgp.write_text(
        f"root: {root.path}\n"
        f"destination:\n  url: s3://{bucket}/undo\n  endpoint: {s3_server.endpoint}\n  addressing_style: path\n"
        "tinyserved:\n  stop: [tinyserved-ctl, stop]\n  start: [tinyserved-ctl, start]\n"
    )
    cli = ["--config", str(cfgp)]
    res = run_cli(*cli, "restore", "--undo", "--yes")
    assert res.returncode == 8 and res.stderr.startswith("error: there is no restore to undo in ")
    ts = json.loads(run_cli(*cli, "create", "--partial", "--json").stdout)["timestamp"]
    (root.path / "generated" / "docker-compose.yml").write_text("services: {}\n")
    live = state(root.path)
    assert run_cli(*cli, "restore", ts, "--yes").returncode == 0
    assert f"last restore: partial/{ts}" in run_cli(*cli, "status").stdout

    res = run_cli(*cli, "restore", "--undo")
    assert res.returncode == 2 and "needs confirmation" in res.stderr  # no terminal, no --yes
    res = run_cli(*cli, "restore", "--undo", ts, "--yes")
    assert res.returncode == 2 and "--undo takes no backup" in res.stderr
    res = run_cli(*cli, "restore", "--undo", "--yes", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["undid"] == f"partial/{ts}" and out["state"] == "done"
    sides = {"state.db-wal", "state.db-shm"}  # the live database's, as they were beside it
    assert set(out["put_back"]) - sides == {"state.db", "backups", "cloudflared", "generated", "traefik"}
    tree, dump = state(root.path)
    assert dump == live[1]
    assert {k: v for k, v in tree.items() if not k.startswith(".restore-undone-")} == live[0]
    assert "last restore" not in run_cli(*cli, "status").stdout

    res = run_cli(*cli, "restore", "--clean-up", "--yes", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["removed"] == [out["undone_dir"]]
    assert not any(p.name.startswith(".restore-undone-") for p in root.path.iterdir())


def _crash_mid_swap(
    root: Path, staging: Path, made: int, *, through: Path | None = None
) -> tuple[dict[str, object], list[tuple[Path, Path]]]:
    """What Swap.apply does, cut short after ``made`` renames (-1: all of them, -2: all but the
    last), with
    the root spelled ``through`` (a symlink) if given. Returns the staging tree as it was before
    the swap, and the planned renames."""
    items = _staged(root, staging)
    staged = tree_digest(staging)
    root = through or root
    swap = Swap(root, "partial/2026-11-26T10-00-00Z")
    moves = swap.plan(items)
    before = read_record(root)
    record = RestoreRecord(
        SWAPPING,
        swap.backup,
        swap.at,
        moves=[[str(a), str(b)] for a, b in moves],
        previous=before.to_dict() if before else None,
        root=str(root),
        staged=[str(i.staged) for i in items],
    )
    write_record(root, record)
    for src, dst in moves[: len(moves) + made + 1 if made < 0 else made]:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, dst)
    return staged, moves


@pytest.mark.parametrize("old_wal", [True, False])
async def test_a_restored_database_written_after_the_crash_keeps_its_wal_away_from_the_old(
    old_wal: bool, root: RootInfo, tmp_path: Path
) -> None:
    """Cut short after the restored database was renamed in; tinyserved then started on it at the
    next boot and left a -wal of its own. The rollback must not leave that -wal to the old one."""
    cfg = cfg_for(root.path)
    if old_wal:
        commit_and_crash(root.db_path, 7)
    before = state(root.path)
    staging = tmp_path / ".tinyserve.restore-0badcafe"
    _crash_mid_swap(root.path, staging, -1)
    commit_and_crash(root.db_path, 987654321)  # "tinyserved" on the restored database
    out = await undo_restore(cfg)
    assert out.state == SWAPPING
    assert state(root.path) == before  # the old database, whole, with only its own -wal
    assert not any("987654321" in line for line in state(root.path)[1])
    # the restored one kept its commit, its -wal beside it in the staging directory
    copy = tmp_path / "restored-copy"
    copy.mkdir()
    for n in DB_FILES:
        if (staging / n).exists():
            (copy / n).write_bytes((staging / n).read_bytes())
    assert any("987654321" in line for line in db_dump(copy / "state.db"))
    assert out.staging == str(staging)


async def test_a_rollback_cut_short_after_its_staging_was_removed_is_finished_by_undo(
    root: RootInfo, tmp_path: Path
) -> None:
    """A failed restore whose rollback stopped half-way (a disk error) and whose staging was then
    removed: --undo finishes the rollback, as the error promised."""
    cfg = cfg_for(root.path)
    before = state(root.path)
    staging = tmp_path / ".tinyserve.restore-0badcafe"
    _, moves = _crash_mid_swap(root.path, staging, -1)
    for src, dst in reversed(moves[-2:]):  # the rollback made two moves back, then failed
        os.rename(dst, src)
    shutil.rmtree(staging)  # RestoreJob.run's clean-up
    out = await undo_restore(cfg)
    assert out.renames == len(moves) - 2
    assert state(root.path) == before
    assert read_record(root.path) is None


async def test_undo_stops_tinyserved_before_planning_the_database_moves(
    root: RootInfo, s3_storage: S3Storage, tmp_path: Path
) -> None:
    """tinyserved running on the restored database has a -wal/-shm; its clean stop checkpoints and
    deletes them. Renames planned before the stop would look for files that are gone."""
    db = root.db_path
    # tinyserved's clean stop: its last connection reads, closes (checkpointing, removing the
    # -wal), and the process is gone
    stop = tmp_path / "stop.py"
    stop.write_text(
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1]); c.execute('select 1 from sqlite_master'); c.close()\n"
        "os.execvp('tinyserved-ctl', ['tinyserved-ctl', 'stop'])\n"
    )
    cfg = parse_config(
        f"root: {root.path}\ncompression:\n  threads: 0\n"
        f"tinyserved:\n  stop: [{sys.executable}, {stop}, {db}]\n  start: [tinyserved-ctl, start]\n"
    )
    res = await BackupJob(cfg, s3_storage).run("partial")
    live = state(root.path)
    await RestoreJob(cfg, s3_storage).run(res.timestamp)
    commit_and_crash(db, 123456789)  # tinyserved at work on the restored database
    assert (root.path / "state.db-wal").exists()
    out = await undo_restore(cfg)
    assert out.state == DONE
    assert state(root.path)[1] == live[1]
    undone = root.path / str(out.undone_dir)
    assert any("123456789" in line for line in db_dump(undone / "state.db"))  # checkpointed by the stop
    assert not (undone / "state.db-wal").exists()


async def test_undo_through_another_spelling_of_the_root(
    root: RootInfo, s3_storage: S3Storage, tmp_path: Path
) -> None:
    """Restored through a symlink to the root, undone through the root itself (one record)."""
    link = tmp_path / "link-to-root"
    link.symlink_to(root.path)
    res = await BackupJob(cfg_for(root.path), s3_storage).run("partial")
    (root.path / "generated" / "docker-compose.yml").write_text("services: {}\n")
    live = state(root.path)
    await RestoreJob(cfg_for(link), s3_storage).run(res.timestamp)
    plan = plan_undo(root.path)
    write_record(root.path, undoing_record(plan, link))  # an undo through the link, cut short at once
    out = await undo_restore(cfg_for(root.path))
    assert out.undone_dir is not None and out.undone_dir.startswith(".restore-undone-")
    tree, dump = state(root.path)
    assert dump == live[1]
    assert {k: v for k, v in tree.items() if not k.startswith(".restore-undone-")} == live[0]


@pytest.mark.parametrize("made", [1, -2, -1])
async def test_a_restore_cut_short_that_brought_new_items_is_rolled_back(
    made: int, root: RootInfo, tmp_path: Path
) -> None:
    """Items the root did not have (a service deleted since the backup, a restore into an empty
    root): their one rename reads the same whether it was made or not, unless the staging says so."""
    cfg = cfg_for(root.path)
    shutil.rmtree(root.path / "generated")  # restored, but new to this root
    before = state(root.path)
    staging = tmp_path / ".tinyserve.restore-0badcafe"
    staged_before, _ = _crash_mid_swap(root.path, staging, made)
    out = await undo_restore(cfg)
    assert out.state == SWAPPING
    assert state(root.path) == before
    assert tree_digest(staging) == staged_before
    assert ctl_calls() == [["stop"], ["start"]]


async def test_a_restore_cut_short_through_a_symlink_elsewhere_is_rolled_back_through_the_root(
    root: RootInfo, tmp_path: Path
) -> None:
    """Restored through ~/ts -> /data/tinyserve (its staging beside the link), undone through the
    root's own path: the staging stays where the restore put it."""
    home = tmp_path / "users" / "me"
    home.mkdir(parents=True)
    link = home / "ts"
    link.symlink_to(root.path)
    before = state(root.path)
    staging = home / ".ts.restore-0badcafe"
    staged_before, _ = _crash_mid_swap(root.path, staging, -1, through=link)
    out = await undo_restore(cfg_for(root.path))
    assert state(root.path) == before
    assert tree_digest(staging) == staged_before
    assert out.staging == str(staging)
    assert not (tmp_path / ".tinyserve.restore-0badcafe").exists()


async def test_tinyserved_runs_again_even_when_the_record_cannot_be_updated(
    root: RootInfo, s3_storage: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (or any error) after the undo's renames must not leave tinyserved stopped."""
    import daemon.undo as undo_mod

    cfg = cfg_for(root.path)
    res = await BackupJob(cfg, s3_storage).run("partial")
    live = state(root.path)
    await RestoreJob(cfg, s3_storage).run(res.timestamp)

    def disk_full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(undo_mod, "put_back_record", disk_full)
    out = await undo_restore(cfg)
    assert state(root.path)[1] == live[1]
    assert ctl_calls()[-2:] == [["stop"], ["start"]]
    assert any("could not be updated" in w for w in out.warnings)
