"""The `tinyserve-backup` command line.

Every failure a user can cause or meet ends as one line on stderr that names the problem and the
fix, and a non-zero exit code; tracebacks go to the log file only.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import structlog

from . import __version__
from .config import Config, edit_config, load_config, resolve_config_path
from .errors import BackupError, ConfigError, CredentialsError, UsageError
from .logs import setup_logging
from .status import human_size

T = TypeVar("T")
log = structlog.get_logger(__name__)


@dataclass
class Ctx:
    config_path: Path
    verbose: bool
    _cfg: Config | None = None

    def config(self, *, missing_ok: bool = False) -> Config:
        if self._cfg is None:
            self._cfg = load_config(self.config_path, missing_ok=missing_ok)
            setup_logging(
                file=self._cfg.logging.file,
                level=self._cfg.logging.level,
                max_bytes=self._cfg.logging.max_bytes,
                backups=self._cfg.logging.backups,
                console_level=console_level(self.verbose),
            )
        return self._cfg


def console_level(verbose: bool) -> str | None:
    """Readable warnings on a terminal; nothing extra when piped (the log file has it all)."""
    if verbose:
        return "debug"
    return "warning" if sys.stderr.isatty() else None


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine; Ctrl-C and SIGTERM cancel it (as often as they come).

    A cancelled job cleans up on its way out: uploads are aborted, a restore's swap is waited for
    and undone. asyncio.run's own Ctrl-C handling would raise KeyboardInterrupt on the second press,
    in the middle of that clean-up, and SIGTERM would kill the process outright.
    """
    signals: list[int] = []

    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal(signum: int) -> None:
            signals.append(signum)
            if len(signals) > 1:
                log.warning("signal_while_stopping", signal=signal.Signals(signum).name)
            task.cancel()

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        try:
            return await fn()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if signals:
            raise KeyboardInterrupt from None
        raise


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Config file (default: $TINYSERVE_BACKUP_CONFIG, then ~/.config/tinyserve-backup/config.yaml).",
)
@click.option("-v", "--verbose", is_flag=True, help="Show debug logs on stderr.")
@click.version_option(__version__, prog_name="tinyserve-backup")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, verbose: bool) -> None:
    """Backups of a tinyserve installation to S3-compatible storage."""
    ctx.obj = Ctx(config_path=resolve_config_path(config_file), verbose=verbose)


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


@cli.command("config")
@click.option("--bucket", help="S3 bucket name.")
@click.option("--prefix", help="Key prefix inside the bucket (may contain {hostname}).")
@click.option("--endpoint", help="S3 endpoint URL (omit for AWS).")
@click.option("--region", help="Region, e.g. us-east-1 (R2: auto).")
@click.option("--access-key", help="Access key id.")
@click.option("--secret-key", help="Secret key (prefer the prompt or --secret-key-stdin).")
@click.option("--secret-key-stdin", is_flag=True, help="Read the secret key from standard input.")
@click.option("--profile", help="Use this AWS profile instead of stored keys.")
@click.option("--path-style", is_flag=True, default=None, help="Use path-style addressing (MinIO).")
@click.option("--local", "local_dir", type=click.Path(file_okay=False), help="Back up to a local folder.")
@click.option("--root", type=click.Path(file_okay=False), help="The tinyserve root to protect.")
@click.option("--no-check", is_flag=True, help="Do not test access to the destination.")
@click.option("--show", is_flag=True, help="Print the effective config and exit.")
@click.option("--init", is_flag=True, help="Create the config from the example if none exists.")
@click.pass_obj
def config_cmd(
    obj: Ctx,
    bucket: str | None,
    prefix: str | None,
    endpoint: str | None,
    region: str | None,
    access_key: str | None,
    secret_key: str | None,
    secret_key_stdin: bool,
    profile: str | None,
    path_style: bool | None,
    local_dir: str | None,
    root: str | None,
    no_check: bool,
    show: bool,
    init: bool,
) -> None:
    """Write or update the config file and store credentials."""
    path = obj.config_path
    if init:
        from .config import example_config_text, write_private

        if path.exists():
            load_config(path)  # fail early and clearly if it is broken
            click.echo(f"Using config {path}.")
        else:
            write_private(path, example_config_text())
            click.echo(f"Created config {path} from the example; edit it to set your destination.")
        return
    if show:
        cfg = obj.config(missing_ok=True)  # no file yet: the defaults are what is in effect
        data = cfg.model_dump(mode="json")
        data["config_file"] = str(path)
        echo_json(data)
        return
    if bucket and local_dir:
        raise UsageError("--bucket and --local name two different destinations", "choose one")
    if secret_key_stdin:
        secret_key = sys.stdin.readline().strip()
        if not secret_key:
            raise CredentialsError("no secret key on standard input", "pipe the secret key in")
    if access_key and not secret_key:
        if not sys.stdin.isatty():
            raise CredentialsError(
                "--access-key needs a secret key", "pass --secret-key-stdin and pipe the secret in"
            )
        secret_key = click.prompt("Secret key", hide_input=True)
    if secret_key and not access_key:
        raise UsageError("a secret key needs its --access-key", "pass --access-key too")

    updates: dict[str, Any] = {}
    if bucket:
        existing = _existing_prefix(path) if prefix is None else None
        pfx = prefix if prefix is not None else (existing or "tinyserve-backups")
        updates["destination.url"] = f"s3://{bucket}/{pfx.strip('/')}".rstrip("/")
    elif prefix is not None:
        raise UsageError("--prefix needs --bucket", "pass --bucket too")
    local = Path(local_dir).expanduser().resolve() if local_dir else None
    if local is not None:
        updates["destination.url"] = f"file://{local}"
    if endpoint is not None:
        updates["destination.endpoint"] = endpoint or None
    if region is not None:
        updates["destination.region"] = region or None
    if profile is not None:
        updates["destination.profile"] = profile or None
    if path_style:
        updates["destination.addressing_style"] = "path"
    if root:
        updates["root"] = str(Path(root).expanduser())
    cfg = edit_config(path, updates)
    setup_logging(file=cfg.logging.file, level=cfg.logging.level, console_level=console_level(obj.verbose))
    if access_key and secret_key:
        from .keychain import load_credentials, store_secret
        from .logs import register_secret

        register_secret(secret_key)
        try:
            old = load_credentials()
        except CredentialsError:
            old = None  # unreadable: it is replaced below all the same
        if old is not None and old.access_key_id != access_key:
            # One key pair is stored per user, shared by every config without a profile: a second
            # destination's keys would silently cut the first one off.
            click.echo(
                f"warning: replacing the stored key {old.access_key_id} with {access_key}; every "
                "config without `destination.profile` now uses the new one (give another "
                "destination its own AWS profile instead)",
                err=True,
            )
        where = store_secret(access_key, secret_key)
        click.echo(f"Credentials stored in {where}.")
    click.echo(f"Config written to {path}.")
    if local is not None and not local.exists() and local.parent.is_dir() and not _mount_point_dir(local):
        # Named just now, so made now; a missing parent is more likely a disk not mounted, which
        # the access check below then reports.
        try:
            local.mkdir(mode=0o700)
        except OSError as exc:
            from .errors import StorageError

            raise StorageError(
                f"cannot create {local}: {exc.strerror or exc} (the config was saved all the same)",
                "create the folder yourself, or choose another with `config --local DIR`",
            ) from None
        click.echo(f"Created {local}.")
    if not no_check:
        try:
            run_async(lambda: _check_access(cfg))
        except BackupError as exc:
            # Both are written by now: say so, or a user fixing the bucket may think the bad
            # secret was never stored.
            saved = "the config and the key were saved" if access_key else "the config was saved"
            raise type(exc)(f"{exc.message} ({saved} all the same)", exc.fix) from None
        click.echo(f"Destination {cfg.destination.resolved_url} is reachable.")


def _mount_point_dir(p: Path) -> bool:
    """``p`` would be a disk's own mount point (/Volumes/X, /media/X, /media/USER/X, /mnt/X,
    /run/media/USER/X): missing, its disk is not mounted, and making it would write backups to the
    system disk instead."""
    parts = p.parts
    return (
        (len(parts) == 3 and parts[1] in ("Volumes", "media", "mnt"))
        or (len(parts) == 4 and parts[1] == "media")
        or (len(parts) == 5 and parts[1:3] == ("run", "media"))
    )


def _existing_prefix(path: Path) -> str | None:
    try:
        cfg = load_config(path)
    except ConfigError:
        return None
    return (
        cfg.destination.url[5:].split("/", 1)[1]
        if cfg.destination.scheme == "s3" and "/" in cfg.destination.url[5:]
        else None
    )


async def _check_access(cfg: Config) -> None:
    from .storage import storage_from_config

    async with storage_from_config(cfg) as st:
        try:
            await asyncio.wait_for(st.check_access(), timeout=60)
        except TimeoutError:
            from .errors import EndpointUnreachableError

            raise EndpointUnreachableError("the storage endpoint did not answer within 60 s") from None


# --------------------------------------------------------------------------------------------
# list
# --------------------------------------------------------------------------------------------


@cli.command("list")
@click.option("--type", "btype", type=click.Choice(["partial", "full", "services"]), help="Only this type.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_obj
def list_cmd(obj: Ctx, btype: str | None, as_json: bool) -> None:
    """List complete backups, oldest first."""
    cfg = obj.config()
    from .manifest import list_backups
    from .storage import storage_from_config

    async def go() -> list[Any]:
        async with storage_from_config(cfg) as st:
            return await list_backups(st, btype)

    refs = run_async(go)
    rows = [r.summary() for r in refs]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"No backups in {cfg.destination.resolved_url}.")
        return
    click.echo(f"{'TYPE':<9} {'TIMESTAMP':<21} {'SIZE':>10} {'OBJECTS':>7}  NOTE")
    for r in rows:
        note = []
        if r["type"] == "services" and r["services"]:
            # which services a services backup holds: what `restore --service` picks from
            note.append(", ".join(r["services"]))
        if r["guide"]:
            note.append("guide-made (unverified)")
        if r["encrypted"]:
            note.append("encrypted")
        if r["warnings"]:
            note.append(f"{r['warnings']} warnings")
        click.echo(
            f"{r['type']:<9} {r['timestamp']:<21} {human_size(r['size_bytes']):>10} {r['objects']:>7}  "
            + ", ".join(note)
        )


# --------------------------------------------------------------------------------------------
# create / prune
# --------------------------------------------------------------------------------------------


class RichProgress:
    """Bytes, rate and ETA per artifact on a terminal."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._p = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task: Any = None
        self._p.start()

    def start(self, name: str, total: int | None) -> None:
        self._task = self._p.add_task(name, total=total)

    def advance(self, n: int) -> None:
        if self._task is not None:
            self._p.advance(self._task, n)

    def finish(self) -> None:
        if self._task is not None:
            task = self._p.tasks[self._task] if isinstance(self._task, int) else None
            if task is not None and task.total is not None:
                self._p.update(self._task, total=task.completed)
            self._task = None

    def close(self) -> None:
        self._p.stop()


def make_progress(as_json: bool) -> Any:
    from .backup import LogProgress

    if not as_json and sys.stderr.isatty():
        return RichProgress()
    return LogProgress()


@cli.command("create")
@click.option("--partial", "btype", flag_value="partial", default=True, help="State + configs (default).")
@click.option("--full", "btype", flag_value="full", help="Partial + service data + Docker images.")
@click.option("--services", "btype", flag_value="services", help="One archive per service.")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def create_cmd(obj: Ctx, btype: str, names: tuple[str, ...], as_json: bool) -> None:
    """Create a backup now. With --services, NAME... limits it to those services."""
    cfg = obj.config()
    if names and btype != "services":
        raise UsageError("service names are only accepted with --services", "add --services")
    from .backup import BackupJob
    from .crypto import encryptor_from_config
    from .lock import root_lock
    from .storage import storage_from_config

    progress = make_progress(as_json)

    async def go() -> Any:
        async with (
            storage_from_config(cfg) as st,
            root_lock(cfg.root, f"create --{btype}", wait=cfg.schedule.lock_wait_seconds),
        ):
            job = BackupJob(cfg, st, progress=progress, encryptor=encryptor_from_config(cfg))
            return await job.run(btype, list(names) or None)

    try:
        result = run_async(go)
    finally:
        if hasattr(progress, "close"):
            progress.close()
    from .scheduler import note_manual_backup

    note_manual_backup(cfg, result)
    if as_json:
        echo_json(result.to_json())
        return
    click.echo(
        f"{btype} backup {result.timestamp} complete: {human_size(result.manifest.size_bytes)} in "
        f"{len(result.manifest.objects)} objects, {result.duration_s:.1f} s."
    )
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)


@cli.command("prune")
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def prune_cmd(obj: Ctx, dry_run: bool, as_json: bool) -> None:
    """Apply retention: delete old backups, leftovers of failed ones, stale uploads."""
    cfg = obj.config()
    from .lock import root_lock
    from .retention import prune
    from .storage import storage_from_config

    async def go() -> Any:
        async with (
            storage_from_config(cfg) as st,
            root_lock(cfg.root, "prune", wait=cfg.schedule.lock_wait_seconds),
        ):
            return await prune(cfg, st, dry_run=dry_run)

    report = run_async(go)
    if as_json:
        echo_json(report.to_json())
        return
    verb = "Would delete" if dry_run else "Deleted"
    for name in report.deleted:
        click.echo(f"{verb} {name}")
    for name in report.incomplete_deleted:
        click.echo(f"{verb} incomplete {name}")
    for key in report.uploads_aborted:
        click.echo(f"{'Would abort' if dry_run else 'Aborted'} unfinished upload {key}")
    wal = report.wal.get("objects_deleted") if report.wal else None
    wal_part = f"; {wal} WAL objects older than the point-in-time window" if wal is not None else ""
    click.echo(
        f"{verb} {len(report.deleted)} backups, {len(report.incomplete_deleted)} incomplete"
        f"{wal_part}; kept {len(report.kept)}."
    )


# --------------------------------------------------------------------------------------------
# restore / verify
# --------------------------------------------------------------------------------------------


def can_ask() -> bool:
    """A person is there to answer a question: stdin and stderr (where it is asked) are a terminal."""
    return sys.stdin.isatty() and sys.stderr.isatty()


@cli.command("restore")
@click.argument("timestamp", required=False)
@click.option("--full", "btype", flag_value="full", help="Restore the full backup with this timestamp.")
@click.option("--partial", "btype", flag_value="partial", help="Restore the partial backup.")
@click.option("--services", "btype", flag_value="services", help="Restore the services backup.")
@click.option("--service", "services", multiple=True, help="Restore only this service's data (repeatable).")
@click.option("--at", "at", help="Point-in-time restore of state.db to this RFC 3339 time.")
@click.option("--latest", is_flag=True, help="Point-in-time restore of state.db to the newest commit.")
@click.option(
    "--output", type=click.Path(dir_okay=False), help="With --at/--latest: write the database here."
)
@click.option(
    "--clean-up",
    "clean_up",
    is_flag=True,
    help="Delete the previous state kept as *.pre-restore (and what interrupted restores left).",
)
@click.option(
    "--undo",
    is_flag=True,
    help="Put back what the last restore replaced (or mend one that stopped half-way).",
)
@click.option("--yes", is_flag=True, help="Do not ask; required without a terminal.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def restore_cmd(
    obj: Ctx,
    timestamp: str | None,
    btype: str | None,
    services: tuple[str, ...],
    at: str | None,
    latest: bool,
    output: str | None,
    clean_up: bool,
    undo: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Restore backup TIMESTAMP (see `list`), or state.db to a point in time (--at/--latest)."""
    cfg = obj.config()
    if undo:
        if timestamp or btype or services or at or latest or output or clean_up:
            raise UsageError("--undo takes no backup, time, output or --clean-up", "run it on its own")
        _restore_undo(cfg, yes=yes, as_json=as_json)
        return
    if clean_up:
        if timestamp or btype or services or at or latest or output:
            raise UsageError("--clean-up takes no backup, time or output", "run it on its own")
        _restore_clean_up(cfg, yes=yes, as_json=as_json)
        return
    if at or latest:
        if timestamp or btype or services:
            raise UsageError("--at/--latest restore state.db from the WAL; they take no TIMESTAMP or type")
        _restore_pitr(cfg, at=at, output=output, yes=yes, as_json=as_json)
        return
    if not timestamp:
        raise UsageError("which backup?", "pass a TIMESTAMP from `tinyserve-backup list`, or --at/--latest")
    if output:
        raise UsageError("--output only goes with --at/--latest")
    interactive = can_ask()
    if not yes and not interactive:
        raise UsageError(
            "restore replaces live data and needs confirmation", "run it in a terminal or add --yes"
        )
    from .crypto import decryptor_from_config
    from .lock import root_lock
    from .restore import RestoreJob, RestorePlan
    from .storage import storage_from_config

    async def confirm(plan: RestorePlan) -> bool:
        if yes:
            return True
        click.echo(f"Verified. This will stop tinyserved and {plan.describe()} in {cfg.root}.", err=True)
        click.echo("The replaced files are kept as *.pre-restore.", err=True)
        return await asyncio.to_thread(click.confirm, "Continue?", default=False, err=True)

    progress = make_progress(as_json)
    jobs: list[RestoreJob] = []

    async def go() -> Any:
        async with (
            storage_from_config(cfg) as st,
            root_lock(cfg.root, f"restore {timestamp}", wait=cfg.schedule.lock_wait_seconds),
        ):
            job = RestoreJob(
                cfg, st, decryptor=decryptor_from_config(cfg), progress=progress, confirm=confirm
            )
            jobs.append(job)
            return await job.run(timestamp, btype, list(services) or None)

    try:
        result, interrupted = _run_restore(go, lambda: jobs[0].completed if jobs else None)
    finally:
        if hasattr(progress, "close"):
            progress.close()
    _print_restore(result, as_json, interrupted)
    _exit_if_interrupted(interrupted)


def _run_restore(go: Callable[[], Awaitable[T]], completed: Callable[[], T | None]) -> tuple[T, bool]:
    """``run_async(go)``; after a Ctrl-C past the restore's point of no return, what it completed.

    Returns (result, whether interrupted). An interrupt before that point propagates as usual.
    """
    try:
        return run_async(go), False
    except KeyboardInterrupt:
        done = completed()
        if done is None:
            raise
        return done, True


def _exit_if_interrupted(interrupted: bool, what: str = "restore") -> None:
    if interrupted:
        click.echo(f"interrupted after the point of no return: the {what} finished (above)", err=True)
        sys.exit(130)


def _print_restore(result: Any, as_json: bool, interrupted: bool = False) -> None:
    if as_json:
        echo_json({**result.to_json(), "interrupted": interrupted})
    else:
        for w in result.warnings:
            click.echo(f"warning: {w}", err=True)
        click.echo(f"Restored {', '.join(result.restored)} from {result.type} backup {result.timestamp}.")
        if result.images_loaded:
            click.echo(f"Loaded images: {', '.join(result.images_loaded)}")
        if result.kept_aside:
            click.echo(f"Previous state kept as: {', '.join(result.kept_aside)}")
        click.echo(f"Database integrity: {result.integrity}")


def _restore_clean_up(cfg: Config, *, yes: bool, as_json: bool) -> None:
    """Delete what earlier restores kept aside; asks first (on a terminal) or needs --yes."""
    from .lock import root_lock
    from .restore import remove_leftovers, restore_leftovers, tree_bytes
    from .restore_record import check_not_interrupted, put_back_record, read_record

    interactive = can_ask()

    async def go() -> dict[str, Any]:
        # Under the root's lock: a restore in progress owns its staging directory and trash.
        async with root_lock(cfg.root, "restore --clean-up", wait=cfg.schedule.lock_wait_seconds):
            # A half-swapped root's *.pre-restore items may be all that is left of its old state.
            await asyncio.to_thread(check_not_interrupted, cfg.root)
            found = await asyncio.to_thread(restore_leftovers, cfg.root)
            sizes = [await asyncio.to_thread(tree_bytes, p) for p in found]
            names = [_relative_to_root(p, cfg.root) for p in found]
            if found and not yes:
                if not interactive:
                    total = human_size(sum(sizes))
                    raise UsageError(
                        f"this deletes {len(found)} item(s) kept by earlier restores ({total})",
                        "run it in a terminal or add --yes",
                    )
                click.echo(f"Kept by earlier restores in {cfg.root}:", err=True)
                for n, b in zip(names, sizes, strict=True):
                    click.echo(f"  {n}  {human_size(b)}", err=True)
                if not await asyncio.to_thread(click.confirm, "Delete them?", default=False, err=True):
                    from .errors import RestoreError

                    raise RestoreError("clean-up cancelled; nothing was deleted", "")
            last = await asyncio.to_thread(read_record, cfg.root)
            await asyncio.to_thread(remove_leftovers, found)
            kept = {cfg.root / k for i in last.items for k in i.get("kept", [])} if last else set()
            if kept & set(found):
                # what the last restore kept is gone, so there is nothing left to undo
                await asyncio.to_thread(put_back_record, cfg.root, None)
            if found:
                log.info("restore_leftovers_removed", items=names, size_bytes=sum(sizes))
            return {"root": str(cfg.root), "removed": names, "size_bytes": sum(sizes)}

    result = run_async(go)
    if as_json:
        echo_json(result)
    elif result["removed"]:
        click.echo(f"Removed {', '.join(result['removed'])} ({human_size(result['size_bytes'])} freed).")
    else:
        click.echo(f"Nothing kept by earlier restores in {cfg.root}.")


def _restore_undo(cfg: Config, *, yes: bool, as_json: bool) -> None:
    """`restore --undo`: asks first (on a terminal) or needs --yes, like a restore."""
    from .lock import root_lock
    from .undo import UndoPlan, undo_restore

    interactive = can_ask()
    if not yes and not interactive:
        raise UsageError("undoing a restore replaces live data and needs confirmation", "add --yes")

    async def confirm(plan: UndoPlan) -> bool:
        if yes:
            return True
        click.echo(f"This will stop tinyserved and {plan.describe(cfg.root)}.", err=True)
        return await asyncio.to_thread(click.confirm, "Continue?", default=False, err=True)

    finished: list[Any] = []

    async def go() -> Any:
        async with root_lock(cfg.root, "restore --undo", wait=cfg.schedule.lock_wait_seconds):
            return await undo_restore(cfg, confirm=confirm, done=finished.append)

    result, interrupted = _run_restore(go, lambda: finished[0] if finished else None)
    _print_undo(result, as_json, interrupted)
    _exit_if_interrupted(interrupted, "undo")


def _print_undo(result: Any, as_json: bool, interrupted: bool) -> None:
    if as_json:
        echo_json({**result.to_json(), "interrupted": interrupted})
        return
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if result.state == "swapping":
        click.echo(
            f"Rolled back the restore of {result.undid} that had stopped half-way "
            f"({result.renames} rename(s)); the root is as it was before it."
        )
        if result.staging:
            click.echo(
                f"What it had restored is back in {result.staging} "
                "(`tinyserve-backup restore --clean-up` removes it)."
            )
    elif result.state == "undoing":
        click.echo(f"Finished undoing the restore of {result.undid} ({result.renames} rename(s)).")
    else:
        back = ", ".join(result.put_back) or "nothing (all it restored was new)"
        click.echo(f"Undid the restore of {result.undid}: put back {back}.")
    if result.undone_dir:
        click.echo(
            f"What it had restored is kept in {result.undone_dir} "
            "(`tinyserve-backup restore --clean-up` removes it)."
        )
    if result.images_left_loaded:
        click.echo(f"Docker images it loaded stay loaded: {', '.join(result.images_left_loaded)}")


def _relative_to_root(p: Path, root: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)  # beside the root (a staging directory)


def _restore_pitr(cfg: Config, *, at: str | None, output: str | None, yes: bool, as_json: bool) -> None:
    """Point-in-time restore of state.db: to a file (`--output`), or in place like a backup restore."""
    from .crypto import decryptor_from_config
    from .lock import root_lock
    from .pitr import parse_rfc3339, restore_point_in_time
    from .restore import swap_database
    from .service import Tinyserved
    from .storage import storage_from_config

    target = parse_rfc3339(at) if at else None
    finished: list[dict[str, Any]] = []  # the in-place restore, once its new state.db is in
    out_path = Path(output).expanduser() if output else None
    interactive = can_ask()
    if output is None and not yes and not interactive:
        raise UsageError(
            "restoring state.db in place needs confirmation",
            "run it in a terminal, add --yes, or use --output FILE",
        )
    if output is None:
        from .restore_record import check_not_interrupted

        check_not_interrupted(cfg.root)  # before downloading anything
    if out_path is not None:
        _check_pitr_output(out_path, cfg.root, yes=yes, interactive=interactive)
    decryptor = decryptor_from_config(cfg)

    async def go() -> dict[str, Any]:
        async with storage_from_config(cfg) as st:
            if out_path is not None:
                res = await restore_point_in_time(st, target, out_path, decryptor)
                return res.as_dict()
            async with root_lock(cfg.root, "restore --at", wait=cfg.schedule.lock_wait_seconds):
                await asyncio.to_thread(cfg.root.mkdir, parents=True, exist_ok=True)
                staged = cfg.root / f".state.db.pitr-{os.getpid()}"
                try:
                    res = await restore_point_in_time(st, target, staged, decryptor)
                    if not yes:
                        click.echo(
                            f"Verified: state.db as of {res.as_dict()['restored_to']}. This stops tinyserved "
                            f"and replaces {cfg.root / 'state.db'} (kept as state.db.pre-restore).",
                            err=True,
                        )
                        if not await asyncio.to_thread(click.confirm, "Continue?", default=False, err=True):
                            from .errors import RestoreError

                            raise RestoreError("restore cancelled; nothing was changed", "")

                    def swapped(aside: list[str]) -> None:
                        out = str(cfg.root / "state.db")
                        finished.append({**res.as_dict(), "output": out, "kept_aside": aside})

                    when = res.as_dict()["restored_to"]
                    await swap_database(cfg, staged, swapped=swapped, backup=f"point-in-time {when}")
                finally:
                    await asyncio.to_thread(staged.unlink, True)
                # Like a backup restore: is tinyserved up on the restored database?
                ok, status = await Tinyserved.from_config(cfg).wait_ready()
                finished[0]["tinyserve_status"] = status
                if not ok:
                    click.echo(f"warning: tinyserve status reports a problem: {status[-200:]}", err=True)
                return finished[0]

    result, interrupted = _run_restore(go, lambda: finished[0] if finished else None)
    _print_pitr(result, as_json, interrupted)
    _exit_if_interrupted(interrupted)


def _check_pitr_output(out: Path, root: Path, *, yes: bool, interactive: bool) -> None:
    """`--output` writes a plain file: never the live database, and a file there only if asked."""
    from .restore import DB_SIDE_FILES

    for name in ("state.db", *DB_SIDE_FILES):
        live = root / name
        same = out.resolve() == live.resolve()
        if not same and out.exists() and live.exists():
            same = os.path.samefile(out, live)  # a hard link
        if same:
            raise UsageError(
                f"--output {out} is the live {name}",
                "leave --output out to restore in place (that stops tinyserved and keeps the old one)",
            )
    if not out.exists():
        return
    if out.is_dir():
        raise UsageError(f"--output {out} is a directory", "name a file")
    if yes:
        return
    if interactive and click.confirm(f"{out} exists. Replace it?", default=False, err=True):
        return
    raise UsageError(f"{out} exists", "choose another --output, or add --yes to replace it")


def _print_pitr(result: dict[str, Any], as_json: bool, interrupted: bool = False) -> None:
    if as_json:
        # (in place, the result says whether a Ctrl-C came; to a file there is nothing to say)
        echo_json({**result, "interrupted": interrupted} if "kept_aside" in result else result)
    else:
        click.echo(
            f"state.db restored to {result['restored_to']} (generation {result['generation']}, "
            f"{result['commits_applied']} commits replayed) -> {result['output']}"
        )
        target, newest = result.get("target"), result.get("last_available_at")
        if target and newest and datetime.fromisoformat(target) > datetime.fromisoformat(newest):
            click.echo(f"(nothing later was shipped: the newest commit in the bucket is at {newest})")


@cli.command("verify")
@click.argument("timestamp", required=False)
@click.option("--all", "all_", is_flag=True, help="Verify every complete backup.")
@click.option("--type", "btype", type=click.Choice(["partial", "full", "services"]))
@click.option("--deep", is_flag=True, help="Also restore into a temporary directory and compare.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def verify_cmd(
    obj: Ctx, timestamp: str | None, all_: bool, btype: str | None, deep: bool, as_json: bool
) -> None:
    """Download and check backups against their manifests (default: the newest one)."""
    cfg = obj.config()
    from .crypto import decryptor_from_config
    from .manifest import find_backup, list_backups
    from .storage import storage_from_config
    from .verify import raise_if_damaged, verify_backup

    async def go() -> list[Any]:
        async with storage_from_config(cfg) as st:
            if timestamp:
                refs = [await find_backup(st, timestamp, btype)]
            else:
                refs = await list_backups(st, btype)
                if not all_:
                    refs = refs[-1:]
            if not refs:
                from .errors import BackupNotFoundError

                raise BackupNotFoundError(
                    "there are no backups to verify", "create one with `tinyserve-backup create`"
                )
            dec = decryptor_from_config(cfg)
            return [await verify_backup(st, r, decryptor=dec, deep=deep, live_root=cfg.root) for r in refs]

    checks = run_async(go)
    if as_json:
        echo_json([c.to_json() for c in checks])
    else:
        for c in checks:
            sealed = any(o.sealed for o in c.objects)
            state = (
                ("OK (stored bytes only: set encryption.identity_file to check contents)" if sealed else "OK")
                if c.ok
                else "NOT CHECKED (key)"
                if all(o.ok or o.key_problem for o in c.objects)
                else "DAMAGED"
            )
            click.echo(f"{c.type} {c.timestamp}: {state}")
            for o in c.objects:
                mark = ("ok~" if o.sealed else "ok ") if o.ok else "KEY" if o.key_problem else "BAD"
                note = "" if o.verified else " (unverified: no checksum in a guide-made manifest)"
                click.echo(f"  [{mark}] {o.name}: {o.detail}{note}")
            if c.deep:
                d = c.deep
                click.echo(
                    f"  deep: {d['restored_entries']} entries restored; vs live root: {d['differ']} differ, "
                    f"{d['only_in_backup']} only in backup, {d['only_live']} only live"
                )
    raise_if_damaged(checks)


# --------------------------------------------------------------------------------------------
# keygen
# --------------------------------------------------------------------------------------------


@cli.command("keygen")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the private key (default: age-identity.txt beside the config file). "
    "Never overwritten.",
)
@click.pass_obj
def keygen_cmd(obj: Ctx, output: str | None) -> None:
    """Create an age key pair for encrypting backups (prints the public recipient)."""
    from .crypto import generate_keypair, write_new_identity

    path = Path(output).expanduser() if output else obj.config_path.parent / "age-identity.txt"
    path = path.absolute()
    kp = generate_keypair()
    write_new_identity(path, kp)
    click.echo(f"Wrote a new age private key to {path} (mode 0600).")
    click.echo("")
    click.echo("Public recipient (not secret; backups are encrypted to it):")
    click.echo(f"    {kp.recipient}")
    click.echo("")
    click.echo(
        "IMPORTANT: store this private key somewhere other than this machine: a password manager\n"
        "or another computer. Only it can decrypt the backups; if it exists only here and this\n"
        "machine is lost, every encrypted backup is lost with it. Making backups needs only the\n"
        "public recipient: once the key is copied away you may delete it here, unless you run\n"
        f"`restore` or `verify` on this machine. (Show it with: cat {path})"
    )
    click.echo("")
    click.echo(f"Add to the config file ({obj.config_path}):")
    click.echo("")
    click.echo("encryption:")
    click.echo("  recipients:")
    click.echo(f"    - {kp.recipient}")
    click.echo(f"  identity_file: {path}")


# --------------------------------------------------------------------------------------------
# logs
# --------------------------------------------------------------------------------------------


@cli.command("logs")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON lines.")
@click.option("--level", type=click.Choice(["debug", "info", "warning", "error"]), default="debug")
@click.option("--event", help="Only events matching this glob, e.g. 'wal_*'.")
@click.option("-n", "--lines", default=50, show_default=True, help="How many past lines to show.")
@click.pass_obj
def logs_cmd(obj: Ctx, follow: bool, as_json: bool, level: str, event: str | None, lines: int) -> None:
    """Show the daemon's structured log."""
    from .logs import read_log_lines

    cfg = obj.config(missing_ok=True)
    path = cfg.logging.file
    if not path.exists() and not follow:
        click.echo(f"No log yet at {path}.", err=True)
        return
    try:
        for line in read_log_lines(
            path, follow=follow, level=level, event=event, raw_json=as_json, tail=lines
        ):
            click.echo(line)
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------------------------
# run / status / schedule (the daemon: daemon/runner.py, daemon/status.py, daemon/scheduler.py)
# --------------------------------------------------------------------------------------------


@cli.command("run")
@click.pass_obj
def run_cmd(obj: Ctx) -> int:
    """Run the daemon in the foreground (what launchd and systemd start)."""
    from .runner import run_daemon

    cfg = obj.config()
    level = console_level(obj.verbose) if obj.verbose or not sys.stderr.isatty() else "info"
    if level != console_level(obj.verbose):
        lg = cfg.logging
        setup_logging(
            file=lg.file, level=lg.level, max_bytes=lg.max_bytes, backups=lg.backups, console_level=level
        )
    return run_daemon(obj.config_path, cfg, console_level=level)


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_obj
def status_cmd(obj: Ctx, as_json: bool) -> int:
    """Is the daemon running; last backups, next runs, WAL lag and spool, last error."""
    from .status import status_command

    text, code = status_command(obj.config(missing_ok=True), as_json)
    click.echo(text)
    return code


@cli.command("schedule")
@click.option("--partial-daily", is_flag=True, help='Partial backup 03:00 Monday-Saturday ("0 3 * * 1-6").')
@click.option("--full-weekly", is_flag=True, help='Full backup 03:00 Sunday ("0 3 * * 0").')
@click.option("--services-daily", is_flag=True, help='Per-service archives 03:30 daily ("30 3 * * *").')
@click.option("--partial", "partial_cron", metavar="CRON", help="Partial backup on this cron string.")
@click.option("--full", "full_cron", metavar="CRON", help="Full backup on this cron string.")
@click.option("--services", "services_cron", metavar="CRON", help="Per-service archives on this cron string.")
@click.option(
    "--off", multiple=True, type=click.Choice(["partial", "full", "services"]), help="Turn a job off."
)
@click.option("--wal-continuous/--no-wal", "wal", default=None, help="Continuous WAL shipping on or off.")
@click.option("--timezone", help='Time zone of the cron strings, e.g. Europe/Berlin ("" = local).')
@click.pass_obj
def schedule_cmd(
    obj: Ctx,
    partial_daily: bool,
    full_weekly: bool,
    services_daily: bool,
    partial_cron: str | None,
    full_cron: str | None,
    services_cron: str | None,
    off: tuple[str, ...],
    wal: bool | None,
    timezone: str | None,
) -> None:
    """Show or edit the schedule in the config file (comments are kept)."""
    from .scheduler import render_schedule, schedule_updates
    from .status import describe, read_status, status_path

    updates = schedule_updates(
        presets={"partial": partial_daily, "full": full_weekly, "services": services_daily},
        crons={"partial": partial_cron, "full": full_cron, "services": services_cron},
        off=off,
        wal=wal,
        timezone=timezone,
    )
    cfg = edit_config(obj.config_path, updates) if updates else load_config(obj.config_path, missing_ok=True)
    if updates:
        click.echo(f"Schedule written to {obj.config_path}.")
    click.echo(render_schedule(cfg))
    if updates:
        path = status_path(cfg.root)
        d = describe(read_status(path), path)
        if d.get("running"):
            click.echo(f"The running daemon (pid {d.get('pid')}) picks this up within a few seconds.")
        else:
            click.echo("The daemon is not running: start it with `tinyserve-backup run`.")


def _add_agent_commands() -> None:
    from .agent import agent_cli

    cli.add_command(agent_cli, "agent")


_add_agent_commands()


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    from .runtime import tune_allocator

    tune_allocator()
    try:
        rv = cli.main(args=argv, prog_name="tinyserve-backup", standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except BackupError as exc:
        click.echo(f"error: {exc.one_line()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # the last line of defence: never a traceback on the terminal
        try:
            log.exception("internal_error", error_type=type(exc).__name__)
        except Exception:
            pass
        click.echo(
            f"error: internal error ({type(exc).__name__}) — this is a bug; details are in the log "
            f"file, please report it",
            err=True,
        )
        sys.exit(70)
    sys.exit(0)


def entry() -> None:
    """The installed command: ``main()``, then leave without tearing the interpreter down.

    Once a command has finished, flushed its output and closed its log, the interpreter's own exit
    (module teardown, a garbage collection of botocore's object graph) only costs time: ~150 ms
    per command measured here, a tenth of a small restore. Any thread still alive gets the normal
    exit, which waits for it.
    """
    import logging
    import threading

    try:
        main()
        code: str | int | None = 0
    except SystemExit as exc:
        code = exc.code
    if not isinstance(code, int) or threading.active_count() > 1:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
            pass
    logging.shutdown()
    os._exit(code)
