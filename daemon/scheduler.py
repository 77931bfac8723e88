"""Cron parsing for the schedule keys (the daemon's run loop builds on this)."""

from __future__ import annotations

from datetime import tzinfo

from apscheduler.triggers.cron import CronTrigger

from .errors import ConfigError

_DOW_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_DOW_INDEX = {n: i for i, n in enumerate(_DOW_NAMES)}


def _dow_value(token: str, expr: str) -> int:
    t = token.strip().lower()
    if t in _DOW_INDEX:
        return _DOW_INDEX[t]
    if t.isdigit() and 0 <= int(t) <= 7:
        return int(t) % 7
    raise ConfigError(f"invalid day of week {token!r} in cron {expr!r}", "use 0-7 (0 and 7 are Sunday) or sun-sat")


def cron_dow_to_apscheduler(field: str, expr: str) -> str:
    """Translate a cron day-of-week field to APScheduler names.

    APScheduler 3's ``from_crontab`` reads 0 as Monday; cron users mean Sunday (and 7 too), so we
    expand the field ourselves into explicit day names.
    """
    if field == "*":
        return "*"
    days: set[int] = set()
    for part in field.split(","):
        step = 1
        if "/" in part:
            part, step_s = part.split("/", 1)
            if not step_s.isdigit() or int(step_s) == 0:
                raise ConfigError(f"invalid step in cron {expr!r}", "write the day of week like 1-5 or */2")
            step = int(step_s)
        if part == "*":
            lo, hi = 0, 6
        elif "-" in part:
            a, b = part.split("-", 1)
            lo, hi = _dow_value(a, expr), _dow_value(b, expr)
            if b.strip() == "7":
                hi = 7
            if hi < lo:
                hi += 7
        else:
            lo = hi = _dow_value(part, expr)
        days.update(d % 7 for d in range(lo, hi + 1, step))
    return ",".join(_DOW_NAMES[d] for d in sorted(days))


def parse_cron(expr: str, tz: tzinfo | str | None) -> CronTrigger:
    fields = expr.split()
    if len(fields) != 5:
        raise ConfigError(
            f"invalid cron string {expr!r}: expected 5 fields (minute hour day month weekday)",
            'write it like "0 3 * * 1-6"',
        )
    minute, hour, day, month, dow = fields
    try:
        return CronTrigger(
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=cron_dow_to_apscheduler(dow, expr),
            timezone=tz,
        )
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid cron string {expr!r}: {exc}", 'write it like "0 3 * * 1-6"') from None
