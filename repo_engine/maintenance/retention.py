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
6. Rules are OR'd; a point no rule keeps is removed.
7. The newest point of each group is always kept ("newest of its VM and disk set"), unless the
   caller allows it to go (`allow_remove_latest`): a policy never silently leaves a VM with no
   recent point.

A policy with no effective rule is refused (UsageError), as it would keep nothing: a count of 0
and a duration of zero (`0h`, as restic treats `0d`) are no rules. Counts below -1 are refused.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from ..errors import UsageError
from ..units import MAX_DIGITS, cut

BUCKETS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class Within:
    """A calendar duration: `1y2m3w4d5h` (years, months, weeks, days, hours)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def before(self, when: datetime) -> datetime:
        """`when` minus this duration (the earliest time there is, when it reaches further)."""
        month = when.year * 12 + (when.month - 1) - self.years * 12 - self.months
        year, month0 = divmod(month, 12)
        try:
            day = min(when.day, calendar.monthrange(year, month0 + 1)[1])
            return when.replace(year=year, month=month0 + 1, day=day) - timedelta(
                days=self.days, hours=self.hours)
        except (ValueError, OverflowError):   # before year 1: every point is within
            return datetime.min.replace(tzinfo=when.tzinfo)

    def is_zero(self) -> bool:
        return not (self.years or self.months or self.days or self.hours)

    def __str__(self) -> str:
        parts = [(self.years, "y"), (self.months, "mo"), (self.days, "d"), (self.hours, "h")]
        return "".join(f"{n}{u}" for n, u in parts if n) or "0h"


_WITHIN_RE = re.compile(r"(\d+)(mo|[ymwdh])")
# the longest --keep-within, as restic's: past it every date there is is within
MAX_WITHIN_YEARS = 9999
_HOURS = {"y": 12 * 31 * 24, "mo": 31 * 24, "w": 7 * 24, "d": 24, "h": 1}


def parse_within(text: str) -> Within:
    """Parse `2y`, `6mo`, `3w`, `10d`, `12h` or combinations such as `1y6mo` (`m` is months
    too: the CLI refuses it before, as ambiguous)."""
    clean = text.strip().lower()
    found = _WITHIN_RE.findall(clean)
    if not clean or _WITHIN_RE.sub("", clean) or any(len(n) > MAX_DIGITS for n, _ in found):
        raise UsageError(f"--keep-within: not a duration: {cut(text)!r} (examples: 7d, 2w, 6mo, "
                         "1y6mo, 36h)")
    total = {"y": 0, "mo": 0, "w": 0, "d": 0, "h": 0}
    for number, unit in found:
        total["mo" if unit == "m" else unit] += int(number)
    if sum(n * _HOURS[u] for u, n in total.items()) > MAX_WITHIN_YEARS * _HOURS["y"]:
        raise UsageError(f"--keep-within {cut(text)}: the longest is {MAX_WITHIN_YEARS}y")
    return Within(total["y"], total["mo"], total["d"] + 7 * total["w"], total["h"])


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

    def rules(self) -> list[str]:
        """The rules that can keep a point, as the CLI spells them (zero counts and a zero
        duration keep nothing, so they are left out)."""
        out = [f"--keep-{b} {getattr(self, b)}" for b in BUCKETS if getattr(self, b)]
        if self.within is not None and not self.within.is_zero():
            out.append(f"--keep-within {self.within}")
        return out + [f"--keep-tag {t}" for t in self.tags]

    def empty(self) -> bool:
        return not self.rules()

    def check(self) -> None:
        """Refuse a policy that would keep nothing, or a count that means nothing."""
        for bucket in BUCKETS:
            if getattr(self, bucket) < -1:
                raise UsageError(f"--keep-{bucket} {getattr(self, bucket)}: a count is a number "
                                 "of points to keep, or -1 for no limit")
        if self.empty():
            raise UsageError("the policy keeps nothing (a count of 0 or a duration of 0 is no "
                             "rule): give at least one --keep-* rule, or name the points to "
                             "remove")


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


NEWEST = "newest of its VM and disk set"


def apply_policy(points: list[PointInfo], policy: Policy, *,
                 allow_remove_latest: bool = False) -> list[Decision]:
    """Keep/remove decisions for every point, newest first within each group, groups by name.
    Raises UsageError for a policy that keeps nothing (see `Policy.check`)."""
    policy.check()
    groups: dict[tuple[str, tuple[str, ...]], list[PointInfo]] = {}
    for point in points:
        groups.setdefault(point.group, []).append(point)
    decisions: list[Decision] = []
    for key in sorted(groups):
        group = _decide_group(sorted(groups[key], key=lambda p: p.time, reverse=True), policy)
        decisions += group if allow_remove_latest else _keep_newest(group)
    return decisions


def _keep_newest(newest_first: list[Decision]) -> list[Decision]:
    """The group's newest point stays, whatever the rules said."""
    first = newest_first[0]
    if first.keep:
        return newest_first
    return [replace(first, keep=True, reasons=(NEWEST,))] + newest_first[1:]


def _decide_group(newest_first: list[PointInfo], policy: Policy) -> list[Decision]:
    counts = {b: getattr(policy, b) for b in BUCKETS}
    last_bucket: dict[str, object] = {b: None for b in BUCKETS}
    within = None if policy.within is None or policy.within.is_zero() else policy.within
    since = within.before(newest_first[0].time) if within else None
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
            reasons.append(f"within {within}")
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
