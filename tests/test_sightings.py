"""First sightings (repository/sightings.py) are timed on a steady clock of one boot: a wait
never ends early because the wall clock was stepped, the host rebooted, or the notes are old or
damaged; each of those only starts the wait again."""

from __future__ import annotations

import json
import threading

import pytest

from repo_engine.repository import sightings
from repo_engine.repository.index import Index


@pytest.fixture
def clock(monkeypatch):
    """This host's steady clock and boot, set by the test."""
    state = {"reading": 5000.0, "boot": "boot-1"}
    monkeypatch.setattr(sightings, "monotonic", lambda: state["reading"])
    monkeypatch.setattr(sightings, "boot_id", lambda: state["boot"])
    return state


def test_a_name_seen_again_is_as_old_as_its_first_sight(clock):
    raw, seen = sightings.note(None, ["a"], "", clock["reading"])
    assert seen == {"a": 0.0}
    clock["reading"] += 250
    raw, seen = sightings.note(raw, ["a", "b"], "", clock["reading"])
    assert seen == {"a": 250.0, "b": 0.0}
    assert json.loads(raw) == {"format": 2, "boot": "boot-1", "at": 5250.0,
                               "seen": {"a": 5000.0, "b": 5250.0}}


def test_notes_of_another_boot_keep_only_the_time_seen_in_it(clock):
    """After a reboot the clock reads more than it did at the last note (a longer uptime):
    only the 100 s seen before count, not the difference of readings of two boots."""
    raw, _ = sightings.note(None, ["a"], "", clock["reading"])
    clock["reading"] += 100
    raw, _ = sightings.note(raw, ["a"], "", clock["reading"])
    clock["reading"], clock["boot"] = 9000.0, "boot-2"  # rebooted: this clock started again
    raw, seen = sightings.note(raw, ["a", "b"], "", clock["reading"])
    assert seen == {"a": 100.0, "b": 0.0}
    clock["reading"] += 5
    assert sightings.note(raw, ["a", "b"], "", clock["reading"])[1] == {"a": 105.0, "b": 5.0}


@pytest.mark.parametrize("uptime", [10.0, 9000.0])
def test_a_reboot_where_the_system_gives_no_boot_id_counts_no_more_than_was_seen(clock, uptime):
    """Without a boot id a reboot shows only as a clock behind the last note (then taken for
    another boot); one whose clock is past it reads as the same boot, and counts the new
    boot's uptime, which began after the last note, instead of the time between."""
    clock["boot"] = ""
    raw, _ = sightings.note(None, ["a"], "", clock["reading"])
    clock["reading"] += 100
    raw, _ = sightings.note(raw, ["a"], "", clock["reading"])
    clock["reading"] = uptime
    seen = sightings.note(raw, ["a"], "", clock["reading"])[1]["a"]
    assert seen <= 100 + uptime and seen == (100.0 if uptime < 5100 else uptime - 5000)


@pytest.mark.parametrize("raw", [
    json.dumps({"a": 1.0}).encode(),  # format 1: wall times of the host's clock
    b"{not json", b"[1, 2]",
    json.dumps({"format": 2, "boot": "boot-1", "at": 4000.0, "seen": [1]}).encode(),
    json.dumps({"format": 2, "boot": "boot-1", "at": 4000.0, "seen": {"a": "old"}}).encode(),
    json.dumps({"format": 2, "boot": "boot-1", "at": 4000.0, "seen": {"a": 4500.0}}).encode(),
    json.dumps({"format": 2, "boot": "boot-1", "seen": {"a": 1.0}}).encode(),
    # integers too large for a float, a bool, nesting deeper than the parser goes
    b'{"format": 2, "boot": "boot-1", "at": 1' + b"0" * 400 + b', "seen": {"a": 1.0}}',
    b'{"format": 2, "boot": "boot-1", "at": 4000.0, "seen": {"a": -1' + b"0" * 400 + b"}}",
    json.dumps({"format": 2, "boot": "boot-1", "at": 4000.0, "seen": {"a": True}}).encode(),
    b'{"format": 2, "boot": "boot-1", "at": 4000.0, "seen": {"a": ' + b"[" * 100000 + b"}}"])
def test_old_or_damaged_notes_start_again(clock, raw):
    new, seen = sightings.note(raw, ["a"], "", clock["reading"])
    assert seen == {"a": 0.0}
    assert json.loads(new)["seen"] == {"a": 5000.0}


def test_notes_outside_the_scope_are_kept_and_those_inside_not_listed_dropped(clock):
    raw, _ = sightings.note(None, ["leases/x", "leases/y", "uploads/z"], "", clock["reading"])
    clock["reading"] += 5
    raw, seen = sightings.note(raw, ["leases/x"], "leases/", clock["reading"])
    assert seen == {"leases/x": 5.0}
    assert set(json.loads(raw)["seen"]) == {"leases/x", "uploads/z"}


def test_the_boot_id_is_read_from_the_system():
    assert len(sightings.boot_id()) == 36  # a UUID, as Linux gives it


def test_a_wait_for_the_cache_is_not_time_seen(clock, tmp_path, monkeypatch):
    """The names were listed before first_seen waits for the cache's write transaction, which
    another process of this host may hold for minutes (loading a checkpoint): a renewal made
    meanwhile went unseen, so that wait is no time the record was seen unchanged (before, it
    counted: a live holder's lock taken once the wait outlasted three quarters of a lease)."""
    index = Index(tmp_path / "index", create=True)
    assert index.first_seen(b"seen", ["a"], 1000.0) == {"a": 1000.0}
    clock["reading"] += 100  # listed again, then the transaction is busy for ten minutes
    listed = threading.Event()
    reading = sightings.monotonic
    monkeypatch.setattr(sightings, "monotonic", lambda: (listed.set(), reading())[1])
    result: list[dict[str, float]] = []
    with index.write():
        waiting = threading.Thread(target=lambda: result.append(
            index.first_seen(b"seen", ["a", "b"], 2000.0)))
        waiting.start()
        listed.wait(2)
        clock["reading"] += 600
    waiting.join()
    assert result == [{"a": 1900.0, "b": 2000.0}]
    clock["reading"] += 1
    assert index.first_seen(b"seen", ["a", "b"], 3000.0) == {"a": 3000.0 - 701, "b": 2999.0}


def test_a_stamp_has_an_age_in_its_boot_only(clock):
    stamp = sightings.stamp()
    clock["reading"] += 30
    assert sightings.age(stamp) == 30.0
    assert sightings.age(None) is None and sightings.age(b"\0" * 8) is None
    clock["reading"], clock["boot"] = 9000.0, "boot-2"
    assert sightings.age(stamp) is None


@pytest.mark.parametrize("at", [b"1" + b"0" * 400, b"true", b"[" * 100000])
def test_a_damaged_stamp_has_no_age(clock, at):
    raw = b'{"format": 2, "boot": "boot-1", "at": ' + at + b"}"
    assert sightings.age(raw) is None


def test_a_stamp_has_no_age_where_the_system_gives_no_boot_id(clock):
    """A reboot whose clock ran past the stamp would read as a short age: a cache refreshed
    before it taken for fresh."""
    clock["boot"] = ""
    stamp = sightings.stamp()
    clock["reading"] += 30
    assert sightings.age(stamp) is None


def test_a_host_rebooted_more_often_than_a_wait_still_ends_it(clock):
    """gc's default grace is a day: a host rebooted every night (a workstation, a spot VM) must
    still end a wait of a day once it has seen the name that long over several boots (before,
    each reboot started every sighting again: that host never swept, compacted or aborted
    anything). The time between two looks across a reboot does not count."""
    raw, _ = sightings.note(None, ["plan"], "", clock["reading"])
    for boot in range(2, 5):
        clock["reading"] += 10 * 3600
        raw, _ = sightings.note(raw, ["plan"], "", clock["reading"])
        clock["boot"], clock["reading"] = f"boot-{boot}", 60.0  # rebooted overnight
        raw, seen = sightings.note(raw, ["plan"], "", clock["reading"])
    assert seen == {"plan": 30 * 3600.0}
