"""Leases: who is using a shared repository, as objects under `leases/` in the store.

Hosts sharing a repository cannot see each other's lock files or processes, so a command on a
shared repository also announces itself in the store, next to its local lock (locks.py):

- **Session lease** `leases/<host>-<pid>-<8 hex>.lease`: written when the command takes its lock,
  before it reads the journal; gc waits until every lease that may have seen a plan's doomed
  chunks has ended or expired.
- **Maintenance lock** `leases/maintenance-<16 hex generation>.lock`, taken by the commands that
  hold the local maintenance lock: forget, protect, unprotect, gc, the repairs. It is created with
  `put(if_absent)`; the holder is the one of the highest generation. It is free when that object
  is gone (released) or over (below, "Clocks"): the next taker then creates generation + 1, again
  only if absent, so of two takers exactly one wins. Its holder is also known dead, and the lock
  taken over at once, when the taker replaced that holder's local maintenance lock as stale
  (same host, pid and cache: a command that crashed, or that kept its local lock file because it
  could not delete the store's), as for a VM lock.
- **VM lock** `leases/vm-<32 hex: hash of the VM name>-<16 hex generation>.lock`, taken by a
  backup of that VM besides its local VM lock (locks.py), so that two hosts never back up one VM
  at once: generations exactly as for the maintenance lock. Its holder is also known dead, and
  the lock taken over at once, when the taker replaced that holder's local VM lock as stale (same
  host and pid: a backup that crashed, or failed on a server fault and so kept its local VM lock
  file when it could not delete the store's). gc waits for session leases only (a backup holds
  one of those too).

Each is a sealed JSON record (envelope.py, magic LEASE, version 1.2): `kind` (`session` |
`maintenance` | `vm`), `host`, `pid`, `command`, `started`, `expires` (ISO times, UTC, of the
holder's clock: started or last renewed + the lease's seconds), `token` (random hex: a name reused
after an `unlock --force` is never taken for the holder's own), `seconds` (the lease's duration;
absent in version 1.0, whose records are read with expiry less start standing for it: at least
the duration) and `cache` (the holder's cache's random name bound to its boot and pid
namespace, Index.cache_id; absent
before version 1.2). A daemon thread renews the record every quarter of its duration, overwriting
only its own object after reading back its token. A lease whose renewal
failed once, whose object is gone or replaced, or whose expiry passed on the holder's clock (or
a duration since its last write began passed on its monotonic clock, which no setting of the
clock moves: set back, it would stretch the lease past other hosts' waits) is lost:
`check()`, called before every attempt at a journal commit and every batch of deletes, raises
LeaseLost (errors.py), and the command stops before it writes anything more. A maintenance
holder's `check()` also fails when a higher generation of its lock exists (its lock expired and
was taken over).

A lease that cannot be read counts as live and never expires: only `unlock --force` removes it.
The lease duration is LEASE_SECONDS unless the environment sets REPO_ENGINE_LEASE_SECONDS.

**Clocks.** A record's times are of its holder's clock, and hosts' clocks differ: a host whose
clock runs ahead of a holder's by more than a lease would see a lock renewed on time as expired
and take it (two forgets or gcs, or two backups of one VM, at once), and `unlock` there would
remove a live backup's lease (gc would then stop waiting for that backup and sweep the packs it
is about to commit). So no host judges another's record by the record's times. Each host notes in
its cache (meta SEEN_KEY, `sighted`) when, on its own clock, it first saw each record as it is
(name, token and expiry: every renewal changes the expiry, so starts a new sighting), and a
record is over for it once seen unchanged for its span (its `seconds`; `LeaseInfo.ends`). That is
safe whatever the clocks: a holder that still renews changes its record every quarter of its
duration, and one that stopped renewing sees, on its own clock, its lease expire no later than a
duration after its last renewal, which came before the taker's first sight, so it stops (`check`)
before the taker takes over (clocks differ in their setting, by any amount, not in their rate:
that differs by far less than a lease). A sighting is timed on a clock that no setting of this
host's clock moves (sightings.py): a clock stepped forward while a host waits does not end the
wait early. The cost: a crashed holder's lock is taken over, and its
lease removed by `unlock`, only one lease after a host first saw it so (a takeover refused says
when, on the taker's clock; `unlock` reports for how long it has watched each record it keeps,
and when to run it again), unless the dead holder is of this host: a lock as above, and `unlock`
removes at once the records of a pid whose local lock it found stale (unless a live local lock
holds that pid again: a pid reused). A record written through this host's own cache (its
`cache` and host name this host's) is also over once expired, as its times are of this very
clock; it is also the only record a stale local lock file of its pid is evidence against. A host
name and pid alone do not tell: machines cloned from one image keep its host name but not its
clock, and containers sharing a machine's name (host networking), each with its own cache and
pid namespace, repeat each other's pids. Nor does the cache's name alone: a cache copied with
its machine's disk, or into another container, keeps it, so the name a record carries is bound
to the boot and pid namespace it was written in (sightings.this_boot); a record this cache wrote
before a reboot is judged as another host's. gc's waits for leases
(maintenance/shared_gc.py) use the same sightings. The store's clock (S3 `Last-Modified` and a
response's `Date`, a file's modification time) could serve as the one clock of every host
instead, with no wait after a first sight, but not on every store: a shared directory's file
times are set by the writing client as often as by the file server, and S3-compatible servers
differ in what `Last-Modified` of an overwritten object says; a host's own clock and the notes in
its own cache hold everywhere and need no request.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Protocol

from ..errors import DamageError, FormatError, LeaseLost, LockedError, RepoError
from ..units import MAX_SECONDS
from .envelope import read_sealed, write_sealed
from .formats import LEASE
from .locks import MAINTENANCE, LockInfo, RepoLock, vm_busy, vm_key
from .safefile import LOCK_MAX
from . import sightings
from .sightings import monotonic
from .store import ObjectExists, ObjectMissing, Store

PREFIX = "leases/"
LEASE_SECONDS = 600.0
SESSION, MAINT, VM = "session", "maintenance", "vm"
UNREADABLE_HOST = "?"
# why a record naming this host is judged as another host's (LeaseInfo.elsewhere), in a message
ELSEWHERE = ("its record names this host but was written before its last boot, or on another "
             "machine or container of its name: its pid is not judged here")
# a lock taken by generations: `base` is "maintenance" or "vm-<hash of the VM name>"
_LOCK_NAME = re.compile(r"leases/(?P<base>maintenance|vm-[0-9a-f]{32})-(?P<gen>[0-9a-f]{16})\.lock")
_SESSION_NAME = re.compile(r"leases/[A-Za-z0-9_-]+-[0-9]+-[0-9a-f]{8}\.lease")
SEEN_KEY = b"leases_seen"  # meta of a host's cache: when it first saw each record as it is


def lease_seconds() -> float:
    """How long a lease lasts without renewal (REPO_ENGINE_LEASE_SECONDS, else LEASE_SECONDS)."""
    text = os.environ.get("REPO_ENGINE_LEASE_SECONDS", "")
    try:
        seconds = float(text) if text else LEASE_SECONDS
    except ValueError:
        seconds = 0.0
    if not 0 < seconds <= MAX_SECONDS:
        raise RepoError(f"REPO_ENGINE_LEASE_SECONDS={text!r} is not a positive number of seconds "
                        f"up to {MAX_SECONDS} (100 years); unset it for the default "
                        f"({LEASE_SECONDS:g})")
    return seconds


def now() -> datetime:
    return datetime.now(timezone.utc)


def iso(when: datetime) -> str:
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class LeaseInfo:
    kind: str
    host: str
    pid: int
    command: str
    started: str
    expires: str  # "" when the record cannot be read: it never expires
    token: str
    seconds: float = 0.0  # the holder's lease duration; 0 in a record of format 1.0
    cache: str = ""  # the holder's cache's name in its boot (Index.cache_id); "" before 1.2

    def expires_at(self) -> datetime | None:
        try:
            return datetime.fromisoformat(self.expires) if self.expires else None
        except ValueError:
            return None

    def span(self) -> timedelta | None:
        """How long the record lasts unrenewed: the holder's lease duration, or in a record of
        format 1.0 (which does not give it) expiry less start, both of the holder's clock, at
        least the duration (None when it cannot be read)."""
        try:
            if self.seconds:
                return timedelta(seconds=self.seconds)
            return datetime.fromisoformat(self.expires) - datetime.fromisoformat(self.started)
        except (OverflowError, TypeError, ValueError):
            return None

    def ends(self, seen: datetime, grace: float = 0.0) -> datetime | None:
        """When, on this host's clock, the record is over if it stays as this host first saw
        it at `seen` (module doc, "Clocks"): its span and `grace` later (None: never)."""
        span = self.span()
        if span is None:
            return None
        try:
            return seen + span + timedelta(seconds=grace)
        except OverflowError:
            return None

    def free_from(self, seen: datetime | None, cache: str) -> datetime | None:
        """When, on this host's clock, the record is over unless renewed (module doc, "Clocks"):
        its span after this host first saw it as it is (`seen`; None: not noted), or for a
        record written through this host's cache `cache`, whose times are of this very clock,
        at its expiry if that is sooner (None: never)."""
        ends = [self.ends(seen) if seen is not None else None,
                self.expires_at() if self.ours(cache) else None]
        return min((end for end in ends if end is not None), default=None)

    def of_dead(self, cache: str, dead: Collection[tuple[str, int]]) -> bool:
        """Whether the record is of one of the `dead` holders (host, pid) whose lock files in
        this host's cache `cache` were found stale: written through that cache only."""
        return self.ours(cache) and (self.host, self.pid) in dead

    def ours(self, cache: str) -> bool:
        """Whether a process of this host wrote the record through this host's cache `cache`
        (module doc, "Clocks": a host name and pid alone may be another machine's or another
        pid namespace's)."""
        return bool(self.cache) and self.cache == cache and self.host == socket.gethostname()

    def elsewhere(self, cache: str) -> bool:
        """Whether the record names this host but was written before its last boot, or on
        another machine or container of its name (not through this host's cache `cache`):
        judged as another host's, which a message must say (`ELSEWHERE`), as a user who finds
        no such process here would expect it over at once."""
        return self.host == socket.gethostname() and not self.ours(cache)

    def expired(self, at: datetime, grace: float = 0.0) -> bool:
        """Whether the lease ended more than `grace` seconds before `at`."""
        end = self.expires_at()
        return end is not None and end + timedelta(seconds=grace) <= at

    def holder(self) -> str:
        """The holder in a message."""
        if self.host == UNREADABLE_HOST:
            return "a holder whose record cannot be read"
        return f"{self.command!r}, pid {self.pid} on {self.host} since {self.started}"


UNREADABLE = LeaseInfo(MAINT, UNREADABLE_HOST, -1, "unreadable lease record", "", "", "")


@dataclass(frozen=True)
class Found:
    """A lease or maintenance lock found in the store."""

    name: str  # object name
    info: LeaseInfo

    @property
    def generation(self) -> int:
        return generation_of(self.name)

    def doc(self) -> dict:
        """The record as `unlock` reports it (the fields of a lock, plus the object and expiry)."""
        match = _LOCK_NAME.fullmatch(self.name)
        kind = "lease" if match is None else MAINTENANCE if match["base"] == MAINT else VM
        return {"file": self.name, "kind": kind, "host": self.info.host, "pid": self.info.pid,
                "command": self.info.command, "since": self.info.started,
                "expires": self.info.expires}


def read_lease(store: Store, name: str) -> LeaseInfo | None:
    """The record of `name`; None when it is gone; UNREADABLE when it cannot be read."""
    try:
        payload = read_sealed(store, name, LEASE, LOCK_MAX)
        info = LeaseInfo(**json.loads(payload))
    except ObjectMissing:
        return None
    except (DamageError, FormatError, TypeError, ValueError):
        return UNREADABLE
    if not isinstance(info.pid, int) or not all(
            isinstance(v, str) for v in (info.kind, info.host, info.command, info.started,
                                         info.expires, info.token, info.cache)):
        return UNREADABLE
    if (not isinstance(info.seconds, (int, float)) or isinstance(info.seconds, bool)
            or not math.isfinite(info.seconds) or info.seconds < 0):
        return UNREADABLE
    return info


class Sightings(Protocol):
    """Where a host notes when it first saw something (the cache's index: Index.first_seen)."""

    def first_seen(self, key: bytes, names: Collection[str], at: float, scope: str = "",
                   listed: float | None = None) -> dict[str, float]: ...

    def cache_id(self) -> str: ...


def sighted(watch: Sightings, found: Iterable[Found], at: datetime, listed: float,
            scope: str = PREFIX) -> dict[str, datetime]:
    """When this host first saw each record of `found` as it is now (same token and expiry: a
    renewal, or a name taken again, is a new sighting), `at` for those new now, each seen
    unchanged up to `listed` (the reading of `monotonic` taken before `found` was listed:
    Index.first_seen); noted in its cache's meta SEEN_KEY, where the notes of records under
    `scope` that `found` lacks (gone from the listing) are dropped."""
    states = {f.name: f"{f.name} {f.info.token} {f.info.expires}" for f in found}
    seen = watch.first_seen(SEEN_KEY, list(states.values()), at.timestamp(), scope, listed)
    return {name: datetime.fromtimestamp(seen[state], timezone.utc)
            for name, state in states.items()}


def on_this_clock(when: datetime) -> str:
    """A time of this host's clock in a message."""
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def write_lease(store: Store, name: str, info: LeaseInfo, *, if_absent: bool = False) -> None:
    write_sealed(store, name, LEASE, json.dumps(asdict(info)).encode(), if_absent=if_absent)


def list_leases(store: Store) -> list[Found]:
    """Every session lease, maintenance lock and VM lock in the store (names of no such form
    are not leases: left alone), sorted by name, so each lock's generations in order."""
    return _listed(store, PREFIX)


def _listed(store: Store, prefix: str) -> list[Found]:
    found = []
    for obj in store.list(prefix):
        if _LOCK_NAME.fullmatch(obj.name) or _SESSION_NAME.fullmatch(obj.name):
            info = read_lease(store, obj.name)
            if info is not None:
                found.append(Found(obj.name, info))
    return sorted(found, key=lambda f: f.name)


def generations(store: Store, base: str) -> list[Found]:
    """The generations of the lock `base` in the store, lowest first."""
    return [f for f in _listed(store, f"{PREFIX}{base}-") if base_of(f.name) == base]


def maintenance_locks(store: Store) -> list[Found]:
    """The maintenance locks in the store, lowest generation first."""
    return generations(store, MAINT)


def base_of(name: str) -> str:
    """The lock a generation's name belongs to ("" for any other name)."""
    match = _LOCK_NAME.fullmatch(name)
    return match["base"] if match else ""


def generation_of(name: str) -> int:
    """The generation of a lock's name (0 for any other name)."""
    match = _LOCK_NAME.fullmatch(name)
    return int(match["gen"], 16) if match else 0


def lock_name(base: str, generation: int) -> str:
    return f"{PREFIX}{base}-{generation:016x}.lock"


def maintenance_name(generation: int) -> str:
    return lock_name(MAINT, generation)


def vm_base(vm: str) -> str:
    return f"vm-{vm_key(vm)}"


def session_name() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "_"
    return f"{PREFIX}{host}-{os.getpid()}-{os.urandom(4).hex()}.lease"


class Lease:
    """A lease (or maintenance lock) this process holds, renewed by a daemon thread until
    `release()`."""

    def __init__(self, store: Store, name: str, info: LeaseInfo, seconds: float,
                 written: float | None = None) -> None:
        self.store, self.name, self.info, self.seconds = store, name, info, seconds
        self.lost = ""  # why the lease is lost; "" while it holds
        # when its record was last written (begun), on a clock that no setting of this host's
        # clock moves: other hosts time their wait from their first sight of that write
        self._written = monotonic() if written is None else written
        self._renewing = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"lease {name}")

    @classmethod
    def write(cls, store: Store, name: str, kind: str, command: str, seconds: float,
              cache: str) -> "Lease":
        """Create the object `name` (only if absent: ObjectExists otherwise), written through
        the cache named `cache`, and renew it from now on."""
        started = now()
        info = LeaseInfo(kind, socket.gethostname(), os.getpid(), command, iso(started),
                         iso(started + timedelta(seconds=seconds)), os.urandom(8).hex(),
                         seconds, cache)
        written = monotonic()
        write_lease(store, name, info, if_absent=True)
        lease = cls(store, name, info, seconds, written)
        lease._thread.start()
        return lease

    # -- renewal ----------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 4) and not self.lost:
            self.renew()

    def renew(self) -> None:
        """Push the expiry forward; on any failure the lease is lost for good (the holder cannot
        know whether gc already judged it expired)."""
        with self._renewing:
            if self.lost or self._stop.is_set():
                return
            try:
                # read before the checks: a holder stopped between them and the write (the
                # check's GET hung, the process or its VM stopped) renews its record after gc
                # may have judged it ended and swept what it wrote; timed from this reading, the
                # lease counts as written before the stop, so the next check finds it expired
                written = monotonic()
                self._unexpired(written)  # a holder suspended past its expiry resumes: gc may
                self._still_ours()  # have swept what it wrote, renewing would hide that
                renewed = replace(self.info, expires=iso(now() + timedelta(seconds=self.seconds)))
                write_lease(self.store, self.name, renewed)
                self.info, self._written = renewed, written
            except LeaseLost as exc:
                self.lost = str(exc)
            except (RepoError, OSError) as exc:
                self.lost = f"{self._what()} could not be renewed ({exc})"

    def _still_ours(self, current: LeaseInfo | None = None) -> None:
        """LeaseLost unless the record (`current` as just read, else read now) is ours."""
        current = current or read_lease(self.store, self.name)
        if current is None or current.token != self.info.token:
            raise LeaseLost(f"{self._what()} was removed (by 'repo-engine unlock --force', or "
                            "as expired)")

    def _unexpired(self, at: float | None = None) -> None:
        """LeaseLost when the lease expired on this host's clock, or a duration passed since
        its last write began by `at` (a reading of `monotonic`; None: now)."""
        at = monotonic() if at is None else at
        if self.info.expired(now()) or at - self._written >= self.seconds:
            raise LeaseLost(f"{self._what()} expired at {self.info.expires} on this host's "
                            f"clock, or {self.seconds:g} s after its last renewal, before it "
                            "could be renewed")

    def _what(self) -> str:
        return f"the {self.info.kind} lease {self.store.location}/{self.name}"

    # -- checks -----------------------------------------------------------------------------
    def check(self) -> None:
        """LeaseLost unless the lease is still ours and unexpired (see the module doc)."""
        try:
            with self._renewing:
                if self.lost:
                    raise LeaseLost(self.lost)
                self._unexpired()
                # the more telling reason first; its listing read our record already
                self._still_ours(self._still_highest() if base_of(self.name) else None)
        except LeaseLost as exc:
            self.lost = str(exc)
            raise LeaseLost(f"{exc}; this {self.info.command!r} stops before it writes anything "
                            "more: run it again", str(exc)) from None

    def _still_highest(self) -> LeaseInfo | None:
        """LeaseLost when a higher generation of the lock exists; else our record as listed
        (None when the listing held no generation)."""
        locks = generations(self.store, base_of(self.name))
        if locks and locks[-1].name != self.name:
            raise LeaseLost(f"the {self.info.kind} lock was taken over by "
                            f"{locks[-1].info.holder()} after ours ({self.name}) expired")
        return locks[-1].info if locks else None

    # -- release ----------------------------------------------------------------------------
    def release(self) -> bool:
        """Stop renewing and remove the object, if it is still ours; False when the store
        failed and it is left to expire (unlock removes it then)."""
        with self._renewing:
            self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            current = read_lease(self.store, self.name)
            if current is not None and current.token == self.info.token:
                self.store.delete([self.name])
        except (RepoError, OSError):
            return False
        return True


def take_session(store: Store, watch: Sightings, command: str, seconds: float) -> Lease:
    return Lease.write(store, session_name(), SESSION, command, seconds, watch.cache_id())


def take_maintenance(store: Store, watch: Sightings, command: str, seconds: float,
                     dead: LockInfo | None = None) -> Lease:
    """The store's maintenance lock, or LockedError naming its holder. `dead`: the holder of
    this host's local maintenance lock we found stale; a store lock of the same host and pid is
    its, taken over at once."""
    return take_lock(store, watch, MAINT, MAINT, command, seconds, partial(_held_by, store),
                     partial(_held_by_dead, dead, watch.cache_id()))


def take_vm_lock(store: Store, watch: Sightings, vm: str, command: str, seconds: float,
                 dead: LockInfo | None = None) -> Lease:
    """The store's lock of VM `vm`, or LockedError naming the backup that holds it (worded as
    the local VM lock's refusal). `dead`: the holder of the local VM lock we found stale; a store
    lock of the same host and pid is its, taken over at once."""
    def held_by(top: Found, free: str | None) -> LockedError:
        if free is None:
            return LockedError(f"the lock of VM {vm!r}, {store.location}/{top.name}, cannot be "
                               f"read; if no backup of {vm!r} runs on any host, run "
                               "'repo-engine unlock --force'")
        return vm_busy(vm, top.info.command, top.info.pid, top.info.host, top.info.started,
                       f"its lock is {free}, or run 'repo-engine unlock --force'")
    return take_lock(store, watch, vm_base(vm), VM, command, seconds, held_by,
                     partial(_held_by_dead, dead, watch.cache_id()))


def _held_by_dead(dead: LockInfo | None, cache: str, top: Found) -> bool:
    """Whether `top` is the store lock of `dead`, a holder whose lock file in the cache named
    `cache` was found stale."""
    return dead is not None and top.info.of_dead(cache, {(dead.host, dead.pid)})


def take_lock(store: Store, watch: Sightings, base: str, kind: str, command: str,
              seconds: float, held_by: Callable[[Found, str | None], LockedError],
              gone: Callable[[Found], bool] = lambda _top: False) -> Lease:
    """The lock `base` taken by generations (module doc), or `held_by(its holder, when it is free
    unless renewed: `_when_free`, None for never)`. A holder is over when its record is
    (LeaseInfo.free_from, its sightings noted in `watch`: module doc, "Clocks"), or when `gone`
    says so. A listing is not a snapshot: one that read the directory before a takeover wrote
    g + 1 and looked at g after it was deleted holds no generation, so only a second empty
    listing means the lock is free."""
    for _attempt in range(5):
        listed = sightings.monotonic()
        locks = generations(store, base) or generations(store, base)
        top = locks[-1] if locks else None
        if top is not None and not gone(top):
            at = now()
            seen = sighted(watch, [top], at, listed, f"{PREFIX}{base}-")[top.name]
            free = top.info.free_from(seen, watch.cache_id())
            if free is None or free > at:
                raise held_by(top, None if free is None else
                              _when_free(top.info, free, watch.cache_id()))
        try:
            lease = Lease.write(store, lock_name(base, top.generation + 1 if top else 1), kind,
                                command, seconds, watch.cache_id())
        except ObjectExists:
            continue  # another taker won this generation: look again
        try:  # the generations below ours are over (released or expired): clear them away
            ours = generation_of(lease.name)
            store.delete(f.name for f in generations(store, base) if f.generation < ours)
        except BaseException:
            lease.release()
            raise
        return lease
    raise LockedError(f"the {kind} lock of {store.location} keeps changing hands; try again")


def _when_free(info: LeaseInfo, free: datetime, cache: str) -> str:
    """When a lock held by `info` is free, as a refusal says it; for a record of this host's
    name judged as another host's, why (a user who finds no such process here would expect
    the lock taken at once)."""
    when = f"free from {on_this_clock(free)} on this host's clock unless renewed"
    return f"{when} ({ELSEWHERE})" if info.elsewhere(cache) else when


def _held_by(store: Store, top: Found, free: str | None) -> LockedError:
    if free is None:
        return LockedError(f"repository is locked (maintenance): {store.location}/{top.name} "
                           "cannot be read; if no forget, gc or repair runs on any host, run "
                           "'repo-engine unlock --force'")
    return LockedError(f"repository is locked (maintenance) by {top.info.holder()}; wait for it "
                       f"to finish (if that process is gone, the lock is {free}, or run "
                       "'repo-engine unlock --force')")


class SharedLock:
    """A local lock (locks.py) together with the leases a shared repository needs: the session
    lease, and for a maintenance lock the store's maintenance lock; for a VM lock the store's VM
    lock. Released in reverse order."""

    def __init__(self, local: RepoLock, leases: list[Lease], held: list["SharedLock"]) -> None:
        self.local, self.leases, self._held = local, leases, held
        self.kind, self.path, self.note = local.kind, local.path, local.note
        held.append(self)

    def check(self) -> None:
        for lease in self.leases:
            lease.check()

    def release(self) -> None:
        if self in self._held:
            self._held.remove(self)
        removed = [lease.release() for lease in reversed(self.leases)]
        self.leases = []
        # a store lock left behind keeps its local lock file, stale once we exit: this host's
        # next taker of a VM lock learns from it that the store's VM lock is a dead holder's
        self.local.release(keep_file=not all(removed))

    def __enter__(self) -> "SharedLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def with_leases(store: Store, watch: Sightings, local: RepoLock, command: str,
                seconds: float, held: list[SharedLock]) -> SharedLock:
    """`local` plus a session lease (and the maintenance lock when `local` is one), registered
    in `held` until released; on a conflict everything taken is released again."""
    takers = [partial(take_session, store, watch, command, seconds)]
    if local.kind == MAINTENANCE:
        takers.append(partial(take_maintenance, store, watch, command, seconds, local.stale))
    return _joined(local, takers, held)


def with_vm_lease(store: Store, watch: Sightings, local: RepoLock, vm: str, command: str,
                  seconds: float, held: list[SharedLock]) -> SharedLock:
    """`local` (the local VM lock of `vm`) plus the store's VM lock, registered in `held` until
    released (so a backup checks it before each journal commit)."""
    return _joined(local, [partial(take_vm_lock, store, watch, vm, command, seconds,
                                   local.stale)], held)


def _joined(local: RepoLock, takers: list[Callable[[], Lease]],
            held: list[SharedLock]) -> SharedLock:
    """`local` and the leases the `takers` take, in order; on a conflict everything taken is
    released again."""
    leases: list[Lease] = []
    try:
        for take in takers:
            leases.append(take())
    except BaseException:
        for lease in reversed(leases):
            lease.release()
        local.release()
        raise
    return SharedLock(local, leases, held)


@dataclass(frozen=True)
class Kept:
    """A record `unlock` left: it may still be live."""

    found: Found
    seen: datetime | None  # since when this host has seen it as it is (None: no cache)
    free: datetime | None  # from when it is over unless renewed (None: never)
    elsewhere: bool  # LeaseInfo.elsewhere: it names this host, its pid not judged here

    def doc(self, at: datetime) -> dict:
        """The record as `unlock` reports it, with how long it was seen unchanged, when it can
        be removed ("" for never: only `unlock --force` removes it) and whether it names this
        host but was written elsewhere (LeaseInfo.elsewhere)."""
        seen_for = 0.0 if self.seen is None else round((at - self.seen).total_seconds(), 3)
        free = "" if self.free is None else iso(self.free)
        return {**self.found.doc(), "seen_seconds": seen_for, "free_from": free,
                "elsewhere": self.elsewhere}


@dataclass
class Cleared:
    removed: list[Found]
    kept: list[Kept]
    at: datetime  # this host's clock when it judged them


def clear_leases(store: Store, watch: Sightings | None,
                 dead: Collection[tuple[str, int]] = (), *, force: bool = False) -> Cleared:
    """Remove the leases and locks that are over (LeaseInfo.free_from, their sightings noted in
    `watch`: module doc, "Clocks"; None: no cache to note them in) and those of the `dead`
    holders (host, pid) of this host whose local locks in `watch`'s cache were found stale
    (records written through that cache only); all of them with `force`."""
    listed = sightings.monotonic()  # before the listing: what it found was there since
    found = list_leases(store)
    at = now()  # after the listing: a record renewed while it ran is first seen at its end
    seen = sighted(watch, found, at, listed) if watch is not None else {}
    cache = watch.cache_id() if watch is not None else ""
    removed, kept = [], []
    for f in found:
        free = f.info.free_from(seen.get(f.name), cache)
        if force or f.info.of_dead(cache, dead) or (free is not None and free <= at):
            removed.append(f)
        else:
            kept.append(Kept(f, seen.get(f.name), free, f.info.elsewhere(cache)))
    store.delete(f.name for f in removed)
    return Cleared(removed, kept, at)
