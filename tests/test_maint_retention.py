"""Retention policy as a pure function: table tests against hand-computed expectations."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from repo_engine.errors import UsageError
from repo_engine.maintenance.retention import (Policy, PointInfo, Within, apply_policy,
                                               parse_within)


def P(name: str, when: str, *, vm: str = "vm", tags=(), protected=False, disks=("sda",)):
    t = datetime.fromisoformat(when).replace(tzinfo=timezone.utc)
    return PointInfo(name, vm, t, tuple(disks), tuple(tags), protected)


def kept(points, policy):
    return sorted(d.id for d in apply_policy(points, policy) if d.keep)


# A week of nightly points plus a few extra the same day; 2026-11-23 is a Monday (ISO week 48).
DAYS = [
    P("sun22", "2026-11-22 23:00"), P("mon23a", "2026-11-23 01:00"),
    P("mon23b", "2026-11-23 13:00"), P("tue24", "2026-11-24 02:00"),
    P("wed25", "2026-11-25 02:00"), P("thu26", "2026-11-26 02:00"),
    P("fri27", "2026-11-27 02:00"), P("sat28", "2026-11-28 02:00"),
    P("sun29", "2026-11-29 23:59"), P("mon30", "2026-11-30 00:00"),
]

TABLE = [
    ("last 3", Policy(last=3), ["mon30", "sat28", "sun29"]),
    # newest per day: mon23b (13:00) wins over mon23a
    ("daily 3", Policy(daily=3), ["mon30", "sat28", "sun29"]),
    ("daily 8 keeps newest of each day", Policy(daily=8),
     ["fri27", "mon23b", "mon30", "sat28", "sun29", "thu26", "tue24", "wed25"]),
    # counts left after all buckets: the oldest point is kept too (restic >= 0.15)
    ("daily 20 keeps oldest", Policy(daily=20),
     ["fri27", "mon23b", "mon30", "sat28", "sun22", "sun29", "thu26", "tue24", "wed25"]),
    # ISO weeks run Monday..Sunday: sun29 23:59 is week 48, mon30 00:00 week 49, sun22 week 47
    ("weekly 2", Policy(weekly=2), ["mon30", "sun29"]),
    ("weekly 3", Policy(weekly=3), ["mon30", "sun22", "sun29"]),
    ("hourly 2", Policy(hourly=2), ["mon30", "sun29"]),
    ("monthly 1", Policy(monthly=1), ["mon30"]),
    ("monthly 2 reaches oldest", Policy(monthly=2), ["mon30", "sun22"]),
    ("yearly 1", Policy(yearly=1), ["mon30"]),
    # measured from the newest point (mon30 00:00), strictly newer than the cut
    ("within 2d", Policy(within=Within(days=2)), ["mon30", "sat28", "sun29"]),
    ("within 1d1h", Policy(within=Within(days=1, hours=1)), ["mon30", "sun29"]),
    ("rules are OR'd", Policy(last=1, weekly=3), ["mon30", "sun22", "sun29"]),
    ("last -1 keeps all", Policy(last=-1), sorted(p.id for p in DAYS)),
]


@pytest.mark.parametrize("name,policy,expected", TABLE, ids=[t[0] for t in TABLE])
def test_policy_table(name, policy, expected):
    assert kept(DAYS, policy) == sorted(expected)


def test_gaps_between_points():
    # a two-month gap: monthly buckets only count months that have points
    points = [P("jan", "2026-01-15 02:00"), P("jan2", "2026-01-20 02:00"),
              P("apr", "2026-04-02 02:00"), P("may", "2026-05-30 02:00")]
    assert kept(points, Policy(monthly=2)) == ["apr", "may"]
    assert kept(points, Policy(monthly=3)) == ["apr", "jan2", "may"]
    assert kept(points, Policy(daily=3)) == ["apr", "jan2", "may"]
    assert kept(points, Policy(within=Within(months=2))) == ["apr", "may"]
    assert kept(points, Policy(within=Within(months=4, days=15))) == ["apr", "jan2", "may"]


def test_tags_and_protected():
    points = [P("a", "2026-01-01 00:00", tags=("monthly",)), P("b", "2026-01-02 00:00"),
              P("c", "2026-01-03 00:00", protected=True), P("d", "2026-01-04 00:00")]
    decisions = {d.id: d for d in apply_policy(points, Policy(last=1, tags=("monthly",)))}
    assert {k for k, d in decisions.items() if d.keep} == {"a", "c", "d"}
    assert decisions["c"].reasons == ("protected",)
    assert decisions["a"].reasons == ("tag monthly",)
    # protected points use no bucket counts: last 2 keeps d and b besides c
    assert kept(points, Policy(last=2)) == ["b", "c", "d"]


def test_groups_by_vm_and_disk_set():
    points = [P("a1", "2026-01-01 00:00", vm="a"), P("a2", "2026-01-02 00:00", vm="a"),
              P("b1", "2026-01-01 00:00", vm="b"),
              P("a3", "2026-01-03 00:00", vm="a", disks=("sda", "sdb"))]
    assert kept(points, Policy(last=1)) == ["a2", "a3", "b1"]


def test_keep_within_is_relative_to_the_newest_point_of_the_group():
    points = [P("old1", "2020-01-01 00:00"), P("old2", "2020-01-03 00:00"),
              P("old3", "2020-01-05 00:00")]
    assert kept(points, Policy(within=Within(days=3))) == ["old2", "old3"]


def test_reasons_are_listed():
    reasons = {d.id: d.reasons for d in apply_policy(DAYS, Policy(last=1, daily=1))}
    assert reasons["mon30"] == ("last", "daily")
    assert reasons["sun22"] == ()


# Policies with no effective rule: zero counts and zero durations are no rules (restic: `0d`).
KEEPS_NOTHING = [
    ("empty", Policy()),
    ("zero counts", Policy(last=0, daily=0, yearly=0)),
    ("within 0h", Policy(within=Within())),
    ("within 0d0m", Policy(within=parse_within("0d0m"))),
    ("within 0y and zero counts", Policy(within=parse_within("0y"), weekly=0)),
]


@pytest.mark.parametrize("name,policy", KEEPS_NOTHING, ids=[t[0] for t in KEEPS_NOTHING])
def test_a_policy_that_keeps_nothing_is_refused(name, policy):
    assert policy.empty()
    for allow in (False, True):
        with pytest.raises(UsageError, match="keeps nothing"):
            apply_policy(DAYS, policy, allow_remove_latest=allow)


@pytest.mark.parametrize("bucket", ["last", "hourly", "daily", "weekly", "monthly", "yearly"])
def test_counts_below_minus_one_are_refused(bucket):
    with pytest.raises(UsageError, match=f"--keep-{bucket} -2"):
        apply_policy(DAYS, Policy(**{bucket: -2}))


def test_a_zero_duration_beside_a_real_rule_is_ignored():
    assert kept(DAYS, Policy(last=2, within=Within())) == ["mon30", "sun29"]
    reasons = {d.id: d.reasons for d in apply_policy(DAYS, Policy(last=1, within=Within()))}
    assert reasons["mon30"] == ("last",)


# Policies that would keep none of a group's points, or not its newest one.
LOSES_NEWEST = [
    ("tag only, newest untagged", Policy(tags=("monthly",))),
    ("tag nobody carries", Policy(tags=("nope",))),
]

GROUPS = [P("a1", "2026-01-01 00:00", vm="a", tags=("monthly",)),
          P("a2", "2026-01-02 00:00", vm="a"), P("a3", "2026-01-03 00:00", vm="a"),
          P("b1", "2026-01-01 00:00", vm="b"),
          P("b2", "2026-01-02 00:00", vm="b", tags=("monthly",)),
          P("c1", "2026-01-01 00:00", vm="a", disks=("sda", "sdb"))]
NEWEST_OF_EACH_GROUP = {"a3", "b2", "c1"}


@pytest.mark.parametrize("name,policy", LOSES_NEWEST, ids=[t[0] for t in LOSES_NEWEST])
def test_the_newest_point_of_each_group_is_kept_unless_allowed(name, policy):
    decisions = {d.id: d for d in apply_policy(GROUPS, policy)}
    strict = {d.id for d in apply_policy(GROUPS, policy, allow_remove_latest=True) if d.keep}
    assert NEWEST_OF_EACH_GROUP <= {i for i, d in decisions.items() if d.keep}
    assert {i for i, d in decisions.items() if d.keep} == strict | NEWEST_OF_EACH_GROUP
    for point_id in NEWEST_OF_EACH_GROUP - strict:
        assert decisions[point_id].reasons == ("newest of its VM and disk set",)
    assert not NEWEST_OF_EACH_GROUP <= strict, "the table should exercise the guard"


@pytest.mark.parametrize("name,policy,expected", TABLE, ids=[t[0] for t in TABLE])
def test_every_real_policy_keeps_the_newest_point(name, policy, expected):
    """No policy of the main table removes the newest point, with or without the guard."""
    for allow in (False, True):
        assert "mon30" in {d.id for d in apply_policy(DAYS, policy, allow_remove_latest=allow)
                           if d.keep}


def test_the_longest_durations_keep_everything_and_longer_ones_are_refused():
    for text in ("9999y", "119988mo", "3000000d", "12000m", "70000000h"):
        assert kept(DAYS, Policy(within=parse_within(text))) == sorted(p.id for p in DAYS)
    for text in ("10000y", "9999y1h", "99999999d", "999999999999h", "9" * 5000 + "d"):
        with pytest.raises(UsageError, match="the longest is 9999y|not a duration"):
            parse_within(text)


def test_parse_within():
    assert parse_within("1y2m3w4d5h") == Within(1, 2, 25, 5)
    assert parse_within("7d") == Within(days=7)
    assert Within(months=1).before(datetime(2026, 3, 31, tzinfo=timezone.utc)) == \
        datetime(2026, 2, 28, tzinfo=timezone.utc)
    for bad in ("", "7", "3x", "d7"):
        with pytest.raises(UsageError):
            parse_within(bad)
