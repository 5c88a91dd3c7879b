"""Retention policy: which restore points a policy keeps, as a pure function (no I/O).

Semantics follow restic's `forget`:

1. Points are grouped by VM and disk set (the sorted disk keys); each group is decided alone.
2. Within a group, points are walked newest first. Each bucket rule (`last`, `hourly`, `daily`,
   `weekly`, `monthly`, `yearly`) with a count left keeps a point whose bucket (the hour, day, ISO
   week, month or year of its UTC time; `last`: every point is its own bucket) differs from the
   bucket of the point that rule kept before, and uses up one count. A count of -1 means "no
   limit". As in restic >= 0.15, the oldest point of the group is also kept by every rule that
   still has counts left (so a short history is not thinned further than asked).
3. `within` keeps every point strictly newer than the group's newest point minus the duration
   (years and months are calendar months, clamped to the month's last day).
4. `tags` keeps every point carrying one of the tags.
5. Protected points are always kept and do not use up bucket counts.
6. Rules are OR'd; a point no rule keeps is removed. An empty policy keeps everything (the CLI
   refuses to run one).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from ..errors import UsageError

BUCKETS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class Within:
    """A calendar duration: `1y2m3w4d5h` (years, months, weeks, days, hours)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def before(self, when: datetime) -> datetime:
        """`when` minus this duration."""
        month = when.year * 12 + (when.month - 1) - self.years * 12 - self.months
        year, month0 = divmod(month, 12)
        day = min(when.day, calendar.monthrange(year, month0 + 1)[1])
        return when.replace(year=year, month=month0 + 1, day=day) - timedelta(
            days=self.days, hours=self.hours)

    def __str__(self) -> str:
        parts = [(self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h")]
        return "".join(f"{n}{u}" for n, u in parts if n) or "0h"


_WITHIN_RE = re.compile(r"(\d+)([ymwdh])")


def parse_within(text: str) -> Within:
    """Parse `2y`, `6m`, `3w`, `10d`, `12h` or combinations such as `1y6m` (m = months)."""
    text = text.strip().lower()
    if not text or _WITHIN_RE.sub("", text):
        raise UsageError(f"not a duration: {text!r} (examples: 7d, 2w, 6m, 1y6m, 36h)")
    total = {"y": 0, "m": 0, "w": 0, "d": 0, "h": 0}
    for number, unit in _WITHIN_RE.findall(text):
        total[unit] += int(number)
    return Within(total["y"], total["m"], total["d"] + 7 * total["w"], total["h"])


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Within | None = None
    tags: tuple[str, ...] = ()

    def empty(self) -> bool:
        return not any(getattr(self, b) for b in BUCKETS) and self.within is None and not self.tags


@dataclass(frozen=True)
class PointInfo:
    """What the policy looks at in a point."""

    id: str
    vm: str
    time: datetime
    disks: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    protected: bool = False

    @property
    def group(self) -> tuple[str, tuple[str, ...]]:
        return self.vm, tuple(sorted(self.disks))


@dataclass(frozen=True)
class Decision:
    id: str
    vm: str
    time: datetime
    keep: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)


def parse_time(text: str) -> datetime:
    """A point's UTC ISO time (`...Z`) as an aware datetime."""
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


_BUCKETERS: dict[str, Callable[[datetime, int], object]] = {
    "last": lambda t, nr: nr,
    "hourly": lambda t, nr: (t.year, t.month, t.day, t.hour),
    "daily": lambda t, nr: (t.year, t.month, t.day),
    "weekly": lambda t, nr: t.isocalendar()[:2],
    "monthly": lambda t, nr: (t.year, t.month),
    "yearly": lambda t, nr: t.year,
}


def apply_policy(points: list[PointInfo], policy: Policy) -> list[Decision]:
    """Keep/remove decisions for every point, newest first within each group, groups by name."""
    groups: dict[tuple[str, tuple[str, ...]], list[PointInfo]] = {}
    for point in points:
        groups.setdefault(point.group, []).append(point)
    decisions: list[Decision] = []
    for key in sorted(groups):
        decisions += _decide_group(sorted(groups[key], key=lambda p: p.time, reverse=True), policy)
    return decisions


def _decide_group(newest_first: list[PointInfo], policy: Policy) -> list[Decision]:
    if policy.empty():
        return [Decision(p.id, p.vm, p.time, True, ("no policy",)) for p in newest_first]
    counts = {b: getattr(policy, b) for b in BUCKETS}
    last_bucket: dict[str, object] = {b: None for b in BUCKETS}
    since = policy.within.before(newest_first[0].time) if policy.within else None
    ordinary = [p for p in newest_first if not p.protected]
    oldest = ordinary[-1].id if ordinary else None
    out = []
    nr = 0
    for point in newest_first:
        reasons: list[str] = []
        if point.protected:
            out.append(Decision(point.id, point.vm, point.time, True, ("protected",)))
            continue
        reasons += [f"tag {t}" for t in policy.tags if t in point.tags]
        if since is not None and point.time > since:
            reasons.append(f"within {policy.within}")
        for rule in BUCKETS:
            if counts[rule] == 0:
                continue
            bucket = _BUCKETERS[rule](point.time, nr)
            if bucket != last_bucket[rule]:
                reasons.append(rule)
            elif point.id == oldest:
                reasons.append(f"{rule} (oldest point, counts left)")
            else:
                continue
            last_bucket[rule] = bucket
            if counts[rule] > 0:
                counts[rule] -= 1
        nr += 1
        out.append(Decision(point.id, point.vm, point.time, bool(reasons), tuple(reasons)))
    return out
