"""When this host first saw what other hosts wrote (a lease record as it is, a multipart upload,
a plan, a checkpoint), timed on a clock that no setting of this host's clock moves.

A wait for another host's record is timed from this host's first sight of it, never by the
times in it (hosts' clocks differ: leases.py, "Clocks"). The wall clock would not do for the
wait either: stepped forward while a host waits (an NTP correction after boot, a VM resumed
from a snapshot), it would make a record just seen look watched for hours, and a live holder's
lock be taken. So a sighting is a reading of CLOCK_BOOTTIME, which only runs forward and
counts the time the host was suspended, together with the boot it was read in.

Across a reboot (or in a cache copied to another machine) the readings do not compare. Starting
every sighting again there would make a wait last forever on a host rebooted more often than
it (gc's grace is a day by default); instead a sighting keeps the seconds it had been seen by
the last note of its boot and counts on from the first look in the new one: the time between
is not counted (nor known: the wall clock is not trusted), so a wait only gets longer. Those
seconds are a lower bound of the time the name has existed since its first sight, whatever
happened in between, as that last note was made before this look. Where the system gives no
boot id, a note ahead of this clock is taken for one of another boot; a reboot whose clock has
run past the last note reads as the same boot, and counts the new boot's uptime instead of the
time between (less than passed: the clock started at zero after the last note).

The notes of one meta key are a JSON object: {"format": 2, "boot": the boot id, "at": the
reading when they were written, "seen": {name: the reading of its first sight, moved on to
this boot}}. A value of another form (format 1 held wall times; a damaged one) counts as no
notes: every sighting starts now.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from .atomic import pid_namespace

FORMAT = 2
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def monotonic() -> float:
    """Seconds on a clock that no setting of this host's clock moves, counting the time the
    host was suspended too (a lease runs on while its holder sleeps)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def boot_id() -> str:
    """This boot's id ("" where the system gives none: module doc)."""
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""


def this_boot(name: str) -> str:
    """`name` (a cache's random name) bound to this boot and pid namespace, the scope in which
    this host's clock readings and pids mean what they meant when a record naming it was
    written. A copy of the cache on another machine (cloned from one image: same host name),
    in another container, or run after a reboot gives another: a record of any of those is
    judged as another host's, never by a pid alive here or an expiry on this clock."""
    return hashlib.sha256(f"{name} {boot_id()} {pid_namespace()}".encode()).hexdigest()[:16]


def stamp() -> bytes:
    """A note of now (`age` reads it): {"format": 2, "boot": the boot id, "at": the
    CLOCK_BOOTTIME reading}."""
    return json.dumps({"format": FORMAT, "boot": boot_id(), "at": monotonic()}).encode()


def age(raw: bytes | None) -> float | None:
    """Seconds since the note `raw` (`stamp`) was made; None when that is not known: no note,
    one of another form or of another boot, or no boot id (unlike a sighting's, an age must
    not come out short: a reboot that went unseen would)."""
    noted, boot, reading = _read(raw), boot_id(), monotonic()
    if noted is None or not boot or noted.boot != boot or not 0 <= noted.at <= reading:
        return None
    return reading - noted.at


@dataclass(frozen=True)
class _Note:
    """A note of the current form (module doc), its sightings those well formed and not after
    it."""

    boot: str | None
    at: float
    seen: dict[str, float]


def _read(raw: bytes | None) -> _Note | None:
    """The note `raw`; None for none, or one of another form or damaged."""
    try:
        noted = json.loads(raw) if raw else {}
        at = _reading(noted["at"]) if noted.get("format") == FORMAT else None
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None  # RecursionError: a value nested deeper than the parser goes
    if at is None:
        return None
    seen = noted.get("seen")
    readings = ({name: _reading(when) for name, when in seen.items()}
                if isinstance(seen, dict) else {})
    seen = {name: when for name, when in readings.items()
            if isinstance(name, str) and when is not None and when <= at}
    boot = noted.get("boot")
    return _Note(boot if isinstance(boot, str) else None, at, seen)


def _reading(value: object) -> float | None:
    """`value` as a finite clock reading; None for anything else (a string, a bool, an
    integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        reading = float(value)
    except OverflowError:
        return None
    return reading if math.isfinite(reading) else None


def _notes(raw: bytes | None, boot: str, reading: float) -> dict[str, float]:
    """The sightings of `raw` as readings of this boot's clock, which reads `reading`: those
    of another boot moved to keep the seconds seen by its last note (module doc)."""
    noted = _read(raw)
    if noted is None:
        return {}
    moved = 0.0 if noted.boot == boot and noted.at <= reading else reading - noted.at
    return {name: when + moved for name, when in noted.seen.items()}


def note(raw: bytes | None, names: Collection[str], scope: str,
         listed: float) -> tuple[bytes, dict[str, float]]:
    """The notes `raw` with each of `names` noted (those new now: seen now), and for how many
    seconds this host had seen each of `names` when it listed them (`listed`, a reading of
    `monotonic` taken before that listing). The notes kept are those of `names` and those
    outside `scope` (a prefix: the names a partial listing could not have seen). Called in
    the write transaction of the notes. What a listing found was there, unchanged, from its
    first sight until the listing, but not necessarily after: the time the listing took, a
    suspend after it or a wait for the transaction (another process of this host holding it)
    is no time it was seen; a name noted meanwhile, by that process, counts as seen for no
    time."""
    boot, reading = boot_id(), monotonic()
    noted = _notes(raw, boot, reading)
    seen = {name: noted.get(name, reading) for name in names}
    kept = {name: when for name, when in noted.items() if not name.startswith(scope)}
    value = {"format": FORMAT, "boot": boot, "at": reading, "seen": {**kept, **seen}}
    return json.dumps(value).encode(), {name: max(0.0, listed - when)
                                        for name, when in seen.items()}
