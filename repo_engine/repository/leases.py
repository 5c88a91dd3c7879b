"""Leases: who is using a shared repository, as objects under `leases/` in the store.

Hosts sharing a repository cannot see each other's lock files or processes, so a command on a
shared repository also announces itself in the store, next to its local lock (locks.py):

- **Session lease** `leases/<host>-<pid>-<8 hex>.lease`: written when the command takes its lock,
  before it reads the journal; gc waits until every lease that may have seen a plan's doomed
  chunks has ended or expired.
- **Maintenance lock** `leases/maintenance-<16 hex generation>.lock`, taken by the commands that
  hold the local maintenance lock: forget, protect, unprotect, gc, the repairs. It is created with
  `put(if_absent)`; the holder is the one of the highest generation. It is free when that object
  is gone (released) or expired: the next taker then creates generation + 1, again only if absent,
  so of two takers exactly one wins.

Each is a sealed JSON record (envelope.py, magic LEASE): `kind` (`session` | `maintenance`),
`host`, `pid`, `command`, `started`, `expires` (ISO times, UTC, of the holder's clock: started or
last renewed + the lease's seconds) and `token` (random hex: a name reused after an `unlock --force`
is never taken for the holder's own). A daemon thread renews the record every quarter of its
duration, overwriting only its own object after reading back its token. A lease whose renewal
failed once, whose object is gone or replaced, or whose expiry passed on the holder's clock is lost:
`check()`, called before every journal commit and every batch of deletes, raises LeaseLost, and
the command stops before it writes anything more. A maintenance holder's `check()` also fails when
a higher generation exists (its lock expired and was taken over).

A lease that cannot be read counts as live and never expires: only `unlock --force` removes it.
The lease duration is LEASE_SECONDS unless the environment sets REPO_ENGINE_LEASE_SECONDS.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta, timezone

from ..errors import DamageError, FormatError, LockedError, RepoError
from .envelope import read_sealed, write_sealed
from .formats import LEASE
from .locks import MAINTENANCE, RepoLock
from .safefile import LOCK_MAX
from .store import ObjectExists, ObjectMissing, Store

PREFIX = "leases/"
LEASE_SECONDS = 600.0
SESSION, MAINT = "session", "maintenance"
UNREADABLE_HOST = "?"
_MAINT_NAME = re.compile(r"leases/maintenance-([0-9a-f]{16})\.lock")
_SESSION_NAME = re.compile(r"leases/[A-Za-z0-9_-]+-[0-9]+-[0-9a-f]{8}\.lease")


class LeaseLost(RepoError):
    """This command's lease or maintenance lock is no longer its own: it must stop writing."""


def lease_seconds() -> float:
    """How long a lease lasts without renewal (REPO_ENGINE_LEASE_SECONDS, else LEASE_SECONDS)."""
    text = os.environ.get("REPO_ENGINE_LEASE_SECONDS", "")
    try:
        seconds = float(text) if text else LEASE_SECONDS
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise RepoError(f"REPO_ENGINE_LEASE_SECONDS={text!r} is not a positive number of seconds")
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

    def expires_at(self) -> datetime | None:
        try:
            return datetime.fromisoformat(self.expires) if self.expires else None
        except ValueError:
            return None

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
        kind = MAINTENANCE if _MAINT_NAME.fullmatch(self.name) else "lease"
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
                                         info.expires, info.token)):
        return UNREADABLE
    return info


def write_lease(store: Store, name: str, info: LeaseInfo, *, if_absent: bool = False) -> None:
    write_sealed(store, name, LEASE, json.dumps(asdict(info)).encode(), if_absent=if_absent)


def list_leases(store: Store) -> list[Found]:
    """Every session lease and maintenance lock in the store (names of neither form are not
    leases: left alone), sorted by name, so maintenance locks by generation."""
    found = []
    for obj in store.list(PREFIX):
        if _MAINT_NAME.fullmatch(obj.name) or _SESSION_NAME.fullmatch(obj.name):
            info = read_lease(store, obj.name)
            if info is not None:
                found.append(Found(obj.name, info))
    return sorted(found, key=lambda f: f.name)


def maintenance_locks(store: Store) -> list[Found]:
    """The maintenance locks in the store, lowest generation first."""
    return [f for f in list_leases(store) if _MAINT_NAME.fullmatch(f.name)]


def generation_of(name: str) -> int:
    """The generation of a maintenance lock's name (0 for any other name)."""
    match = _MAINT_NAME.fullmatch(name)
    return int(match.group(1), 16) if match else 0


def maintenance_name(generation: int) -> str:
    return f"{PREFIX}maintenance-{generation:016x}.lock"


def session_name() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "_"
    return f"{PREFIX}{host}-{os.getpid()}-{os.urandom(4).hex()}.lease"


class Lease:
    """A lease (or maintenance lock) this process holds, renewed by a daemon thread until
    `release()`."""

    def __init__(self, store: Store, name: str, info: LeaseInfo, seconds: float) -> None:
        self.store, self.name, self.info, self.seconds = store, name, info, seconds
        self.lost = ""  # why the lease is lost; "" while it holds
        self._renewing = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"lease {name}")

    @classmethod
    def write(cls, store: Store, name: str, kind: str, command: str,
              seconds: float) -> "Lease":
        """Create the object `name` (only if absent: ObjectExists otherwise) and renew it from
        now on."""
        started = now()
        info = LeaseInfo(kind, socket.gethostname(), os.getpid(), command, iso(started),
                         iso(started + timedelta(seconds=seconds)), os.urandom(8).hex())
        write_lease(store, name, info, if_absent=True)
        lease = cls(store, name, info, seconds)
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
                self._unexpired()  # a holder suspended past its expiry resumes: gc may have
                self._still_ours()  # swept what it wrote, renewing would hide that
                renewed = replace(self.info, expires=iso(now() + timedelta(seconds=self.seconds)))
                write_lease(self.store, self.name, renewed)
                self.info = renewed
            except LeaseLost as exc:
                self.lost = str(exc)
            except (RepoError, OSError) as exc:
                self.lost = f"{self._what()} could not be renewed ({exc})"

    def _still_ours(self) -> None:
        current = read_lease(self.store, self.name)
        if current is None or current.token != self.info.token:
            raise LeaseLost(f"{self._what()} was removed (by 'repo-engine unlock --force', or "
                            "as expired)")

    def _unexpired(self) -> None:
        if self.info.expired(now()):
            raise LeaseLost(f"{self._what()} expired at {self.info.expires} before it could be "
                            "renewed")

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
                if self.info.kind == MAINT:  # the more telling reason first
                    self._still_highest()
                self._still_ours()
        except LeaseLost as exc:
            self.lost = str(exc)
            raise LeaseLost(f"{exc}; this {self.info.command!r} stops before it writes anything "
                            "more: run it again") from None

    def _still_highest(self) -> None:
        locks = maintenance_locks(self.store)
        if locks and locks[-1].name != self.name:
            raise LeaseLost(f"the maintenance lock was taken over by {locks[-1].info.holder()} "
                            f"after ours ({self.name}) expired")

    # -- release ----------------------------------------------------------------------------
    def release(self) -> None:
        """Stop renewing and remove the object, if it is still ours."""
        with self._renewing:
            self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            current = read_lease(self.store, self.name)
            if current is not None and current.token == self.info.token:
                self.store.delete([self.name])
        except (RepoError, OSError):
            pass  # left to expire: unlock removes it then


def take_session(store: Store, command: str, seconds: float) -> Lease:
    return Lease.write(store, session_name(), SESSION, command, seconds)


def take_maintenance(store: Store, command: str, seconds: float) -> Lease:
    """The store's maintenance lock, or LockedError naming its holder."""
    for _attempt in range(5):
        locks = maintenance_locks(store)
        top = locks[-1] if locks else None
        if top is not None and not top.info.expired(now()):
            raise _held_by(store, top)
        try:
            lease = Lease.write(store, maintenance_name(top.generation + 1 if top else 1), MAINT,
                                command, seconds)
        except ObjectExists:
            continue  # another taker won this generation: look again
        try:  # the generations below ours are over (released or expired): clear them away
            ours = generation_of(lease.name)
            store.delete(f.name for f in maintenance_locks(store) if f.generation < ours)
        except BaseException:
            lease.release()
            raise
        return lease
    raise LockedError(f"the maintenance lock of {store.location} keeps changing hands; try again")


def _held_by(store: Store, top: Found) -> LockedError:
    if top.info.host == UNREADABLE_HOST:
        return LockedError(f"repository is locked (maintenance): {store.location}/{top.name} "
                           "cannot be read; if no forget, gc or repair runs on any host, run "
                           "'repo-engine unlock --force'")
    return LockedError(f"repository is locked (maintenance) by {top.info.holder()} "
                       f"(until {top.info.expires} unless renewed); wait for it to finish (if that "
                       "process is gone, the lock expires then, or run 'repo-engine unlock')")


class SharedLock:
    """A local lock (locks.py) together with the leases a shared repository needs: the session
    lease, and for a maintenance lock the store's maintenance lock. Released in reverse order."""

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
        for lease in reversed(self.leases):
            lease.release()
        self.leases = []
        self.local.release()

    def __enter__(self) -> "SharedLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def with_leases(store: Store, local: RepoLock, command: str, seconds: float,
                held: list[SharedLock]) -> SharedLock:
    """`local` plus a session lease (and the maintenance lock when `local` is one), registered
    in `held` until released; on a conflict everything taken is released again."""
    leases: list[Lease] = []
    try:
        leases.append(take_session(store, command, seconds))
        if local.kind == MAINTENANCE:
            leases.append(take_maintenance(store, command, seconds))
    except BaseException:
        for lease in reversed(leases):
            lease.release()
        local.release()
        raise
    return SharedLock(local, leases, held)


@dataclass
class Cleared:
    removed: list[Found]
    kept: list[Found]


def clear_leases(store: Store, *, force: bool = False) -> Cleared:
    """Remove expired leases and maintenance locks (all of them with `force`)."""
    at = now()
    found = list_leases(store)
    removed = [f for f in found if force or f.info.expired(at)]
    store.delete(f.name for f in removed)
    return Cleared(removed, [f for f in found if f not in removed])
