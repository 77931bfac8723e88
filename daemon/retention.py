"""Retention: which backups to keep, and `prune`, which deletes the rest.

Rules per type are restic-style: a complete backup is kept when it matches ANY rule (age, last N,
newest per day/week/month for N periods).  The newest complete backup of each type is always kept,
whatever the rules say.  Incomplete prefixes (no manifest) and unfinished multipart uploads older
than ``retention.incomplete_after_hours`` are removed too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import structlog

from .config import Config, RetentionRule
from .manifest import TYPES, BackupRef, scan
from .storage import Storage

log = structlog.get_logger(__name__)


@dataclass
class Decision:
    ref: BackupRef
    keep: bool
    reasons: list[str]


def decide(
    refs: list[BackupRef], rule: RetentionRule, now: datetime, tz: tzinfo | None = None
) -> list[Decision]:
    """Apply one type's rule to its complete backups (any order in, newest first out)."""
    ordered = sorted(refs, key=lambda r: r.timestamp, reverse=True)
    reasons: dict[str, list[str]] = {r.timestamp: [] for r in ordered}
    if not ordered:
        return []
    reasons[ordered[0].timestamp].append("newest")
    no_rules = all(
        v is None
        for v in (rule.max_age_days, rule.keep_last, rule.keep_daily, rule.keep_weekly, rule.keep_monthly)
    )
    if no_rules:
        for r in ordered:
            reasons[r.timestamp].append("no retention rule")
    if rule.max_age_days is not None:
        cutoff = now - timedelta(days=rule.max_age_days)
        for r in ordered:
            if r.when >= cutoff:
                reasons[r.timestamp].append(f"younger than {rule.max_age_days:g} days")
    if rule.keep_last:
        for r in ordered[: rule.keep_last]:
            reasons[r.timestamp].append(f"last {rule.keep_last}")

    def bucketed(n: int | None, key: Callable[[datetime], Any], label: str) -> None:
        if not n:
            return
        seen: list[Any] = []
        for r in ordered:
            k = key(r.when.astimezone(tz) if tz else r.when.astimezone())
            if k in seen:
                continue
            if len(seen) >= n:
                break
            seen.append(k)
            reasons[r.timestamp].append(f"{label} {len(seen)}/{n}")

    bucketed(rule.keep_daily, lambda d: d.date(), "daily")
    bucketed(rule.keep_weekly, lambda d: tuple(d.isocalendar())[:2], "weekly")
    bucketed(rule.keep_monthly, lambda d: (d.year, d.month), "monthly")
    return [Decision(r, bool(reasons[r.timestamp]), reasons[r.timestamp]) for r in ordered]


@dataclass
class PruneReport:
    deleted: list[str] = field(default_factory=list)  # "type/TS"
    kept: list[str] = field(default_factory=list)
    incomplete_deleted: list[str] = field(default_factory=list)
    uploads_aborted: list[str] = field(default_factory=list)
    wal: dict[str, Any] = field(default_factory=dict)
    objects_deleted: int = 0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "deleted": self.deleted,
            "kept": self.kept,
            "incomplete_deleted": self.incomplete_deleted,
            "uploads_aborted": self.uploads_aborted,
            "objects_deleted": self.objects_deleted,
            "wal": self.wal,
        }


async def prune(
    cfg: Config,
    storage: Storage,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    types: tuple[str, ...] = TYPES,
) -> PruneReport:
    now = now or datetime.now(UTC)
    report = PruneReport(dry_run=dry_run)
    tz = None
    if cfg.schedule.timezone:
        from zoneinfo import ZoneInfo

        tz = ZoneInfo(cfg.schedule.timezone)
    catalog = await scan(storage, types)
    doomed_keys: list[str] = []
    for btype in types:
        refs = [r for r in catalog.complete if r.type == btype]
        rule: RetentionRule = getattr(cfg.retention, btype)
        for d in decide(refs, rule, now, tz):
            name = f"{btype}/{d.ref.timestamp}"
            if d.keep:
                report.kept.append(name)
                continue
            report.deleted.append(name)
            log.info("prune_backup", backup=name, dry_run=dry_run)
    if report.deleted:
        listings = await asyncio.gather(*(storage.list(n + "/") for n in report.deleted))
        for objs in listings:
            # Delete the manifest first: a half-deleted backup must never look complete.
            keys = sorted((o.key for o in objs), key=lambda k: not k.endswith("/manifest.json"))
            doomed_keys.extend(keys)
    cutoff = now - timedelta(hours=cfg.retention.incomplete_after_hours)
    for btype, ts, newest, keys in catalog.incomplete:
        if btype in types and newest < cutoff:
            report.incomplete_deleted.append(f"{btype}/{ts}")
            doomed_keys.extend(keys)
            log.info("prune_incomplete", backup=f"{btype}/{ts}", dry_run=dry_run)
    uploads = [u for u in await storage.list_multipart_uploads() if u.initiated < cutoff]
    report.uploads_aborted = [u.key for u in uploads]
    report.objects_deleted = len(doomed_keys)
    if not dry_run:
        manifests = [k for k in doomed_keys if k.endswith("/manifest.json")]
        if manifests:
            await storage.delete_many(manifests)
        rest = [k for k in doomed_keys if not k.endswith("/manifest.json")]
        if rest:
            await storage.delete_many(rest)
        for u in uploads:
            await storage.abort_multipart(u.key, u.upload_id)
            log.info("prune_upload_aborted", key=u.key)
    if cfg.wal.enabled:
        from .wal import prune_wal

        wal_keys = await prune_wal(
            storage, window=timedelta(hours=cfg.wal.retention_hours), now=now, dry_run=dry_run
        )
        report.wal = {"objects_deleted": len(wal_keys)}
    log.info(
        "prune_finished",
        deleted=len(report.deleted),
        incomplete=len(report.incomplete_deleted),
        uploads_aborted=len(report.uploads_aborted),
        dry_run=dry_run,
    )
    return report
