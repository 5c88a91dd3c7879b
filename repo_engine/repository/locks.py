"""Repository locks: `locks/<host>-<pid>-<rand>.lock`, one file per holder.

A lock file is an envelope (magic LOCK) holding JSON {kind, host, pid, time, command}. `shared`
locks (backups, restores) coexist; an `exclusive` lock excludes every other lock; a `maintenance`
lock (forget, gc, repair) coexists with shared locks but excludes other maintenance and exclusive
locks. A lock file is written under a temporary name, flocked, then linked into place, so a lock
file that can be listed always carries its holder's flock. The holder keeps
an flock on its own file, so a lock of this host whose flock can be taken belongs to a dead process:
it is stale and is removed. Locks of other hosts are never guessed stale; `unlock` removes them.

A lock file that cannot be read (torn: empty or cut short by a crash of its writer's machine) names
no holder: when its flock is free it is stale whatever host wrote it, else it counts as an
exclusive lock. An entry of `locks/` that is not a regular file (a symlink, FIFO, device) is never
opened for reading nor followed; it is not a lock, and `unlock` removes it.

A VM lock (`locks/vm-<hash of the VM name>.lock`, a shared lock file like the others) is held by a
backup for the whole backup of that VM. It is created under its fixed name only if absent (a link,
not a rename), so of two backups of one VM, on one host or on two hosts sharing the repository,
exactly one gets it; the other is refused with the holder's host, pid and start time. On a
shared repository this file is in each host's own directory, so the backup also takes the VM lock
in the store (leases.py), refused in the same words. A VM lock conflicts with no other lock (its
backup holds a shared lock too): other lockers leave it alone even when stale, as the next backup
of the VM learns from a stale one that the store's VM lock of the same pid is a dead holder's.

On a read-only filesystem (read-only media, a read-only snapshot) nobody can write, so a shared
lock is not needed: taking one is a no-op with a note; any other lock is refused there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import blake3

from ..errors import DamageError, FormatError, LockedError, RepoError
from .envelope import seal, unseal
from .formats import LOCK
from .points import now_iso
from .safefile import FILE_MODE, LOCK_MAX, is_regular, open_regular, read_limited

SHARED, EXCLUSIVE, MAINTENANCE = "shared", "exclusive", "maintenance"
TORN_HOST = "?"  # the holder of a lock file that cannot be read
_VM_LOCK = re.compile(r"vm-[0-9a-f]{32}\.lock")


@dataclass(frozen=True)
class LockInfo:
    kind: str
    host: str
    pid: int
    time: str
    command: str


def _read_info(path: Path) -> LockInfo | None:
    """The holder named in a lock file; None when it is gone or not a regular file."""
    if not is_regular(path):
        return None
    try:
        info = LockInfo(**json.loads(unseal(LOCK, read_limited(path, LOCK_MAX), str(path))))
    except FileNotFoundError:
        return None
    except (DamageError, FormatError, TypeError, ValueError):
        return LockInfo(EXCLUSIVE, TORN_HOST, -1, "", "unreadable (torn) lock file")
    if not isinstance(info.pid, int) or not all(isinstance(v, str) for v in
                                                 (info.kind, info.host, info.time, info.command)):
        return LockInfo(EXCLUSIVE, TORN_HOST, -1, "", "unreadable (torn) lock file")
    return info


def _may_be_stale(info: LockInfo) -> bool:
    """Only locks of this host, or torn ones naming no host, are tested by their flock."""
    return info.host in (socket.gethostname(), TORN_HOST)


def is_stale(path: Path, info: LockInfo) -> bool:
    """True when the holder is a dead process on this host (its flock is free)."""
    return _stale(path, info, remove=False)


def remove_if_stale(path: Path, info: LockInfo) -> bool:
    """Remove `path` when its holder is dead (see is_stale); True when it is gone. The file is
    removed while we hold its flock and only if the name still denotes the file we tested, so a
    lock another process creates under the same name meanwhile (a VM lock) is never removed."""
    return _stale(path, info, remove=True)


def _stale(path: Path, info: LockInfo, *, remove: bool) -> bool:
    if not _may_be_stale(info):
        return False
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return True
    except DamageError:  # replaced by something that is not a lock: not ours to judge
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if remove and os.path.samestat(os.fstat(fd), os.lstat(path)):
            path.unlink()
        return True
    except BlockingIOError:
        return False
    except FileNotFoundError:
        return True
    finally:
        os.close(fd)


def list_locks(locks_dir: Path) -> list[tuple[Path, LockInfo]]:
    found = []
    for path in sorted(locks_dir.glob("*.lock")):
        info = _read_info(path)
        if info is not None:
            found.append((path, info))
    return found


def strays(locks_dir: Path) -> list[Path]:
    """Entries named like locks that are not regular files (never a lock: nothing flocks them)."""
    return [path for path in sorted(locks_dir.glob("*.lock"))
            if not is_regular(path) and not path.is_dir()]


def _create_flocked(path: Path, content: bytes) -> int:
    """Create `path` holding `content` with our flock already on it when it appears: an unnamed
    file (O_TMPFILE) linked into place, else a `.new` name linked into place."""
    try:
        fd = os.open(path.parent, os.O_TMPFILE | os.O_RDWR, FILE_MODE)
    except (AttributeError, OSError):
        fd = -1
    tmp = path.parent / f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}.new"
    named = fd < 0
    if named:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, content)
        os.fsync(fd)
        if named:
            _link_named(tmp, path)
        else:
            _link_unnamed(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _link_named(tmp: Path, path: Path) -> None:
    """A link, not a rename: a name that exists already (a VM lock) is not replaced."""
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink()


def _link_unnamed(fd: int, path: Path) -> None:
    # linkat(AT_SYMLINK_FOLLOW) on the /proc link names the unnamed file (a dir fd forces
    # CPython to call linkat rather than link)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=dir_fd, follow_symlinks=True)
    finally:
        os.close(dir_fd)


def remove_stale_partials(locks_dir: Path) -> None:
    """Remove half-created lock files (`*.new`) of dead processes of this host (a few seconds
    old: a live creator takes its flock right after creating the file)."""
    host = socket.gethostname()
    for path in locks_dir.glob(f"{host}-*.new"):
        try:
            young = time.time() - path.lstat().st_mtime < 5
        except FileNotFoundError:
            continue
        if not young and is_stale(path, LockInfo(SHARED, host, -1, "", "")):
            path.unlink(missing_ok=True)


def vm_key(vm: str) -> str:
    """The VM's part of its lock names (any VM name, fixed length, no path characters)."""
    return blake3.blake3(vm.encode()).hexdigest()[:32]


def vm_busy(vm: str, command: str, pid: int, host: str, since: str, remedy: str) -> LockedError:
    """The refusal of a second backup of `vm`: who holds its lock, and `remedy` if it is gone."""
    return LockedError(f"VM {vm!r} is being backed up by {command!r}, pid {pid} on {host} since "
                       f"{since}; wait for it to finish (if that process is gone, {remedy})")


def _holder(kind: str, command: str) -> LockInfo:
    return LockInfo(kind, socket.gethostname(), os.getpid(), now_iso(), command)


class RepoLock:
    """A held lock; release it with `release()` or by leaving the `with` block."""

    def __init__(self, locks_dir: Path, kind: str, command: str) -> None:
        self.kind = kind
        # (VM or maintenance lock) the dead holder of this host whose lock of the kind it
        # replaced: the store's lock of the same pid is that holder's (leases.py)
        self.stale: LockInfo | None = None
        info = _holder(kind, command)
        self.path = locks_dir / f"{info.host}-{info.pid}-{os.urandom(4).hex()}.lock"
        self.note = ""
        self._content = seal(LOCK, json.dumps(asdict(info)).encode())
        try:
            self._fd = _create_flocked(self.path, self._content)
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            if kind != SHARED:
                raise RepoError(f"the repository at {locks_dir.parent} is on a read-only "
                                f"filesystem; {command!r} needs to write to it") from None
            self._fd = -1
            self.note = "read-only filesystem: no lock taken (nobody can write there)"
            return
        try:
            self._check_conflicts(locks_dir)
        except BaseException:
            self.release()
            raise

    @classmethod
    def for_vm(cls, locks_dir: Path, vm: str, command: str) -> "RepoLock":
        """Take the VM lock of `vm` (module doc); LockedError naming the backup that holds it."""
        path = locks_dir / f"vm-{vm_key(vm)}.lock"
        content = seal(LOCK, json.dumps(asdict(_holder(SHARED, command))).encode())
        stale = None
        for _attempt in range(3):
            try:
                fd = _create_flocked(path, content)
            except FileExistsError:
                info = _read_info(path)
                if info is None and os.path.lexists(path):
                    raise DamageError(f"{path} is not a lock file; remove it (or run "
                                      "'repo-engine unlock')") from None
                if info is None:
                    continue
                if remove_if_stale(path, info):
                    stale = info
                    continue
                raise vm_busy(vm, info.command, info.pid, info.host, info.time,
                              "run 'repo-engine unlock'") from None
            held = cls.__new__(cls)
            held.kind, held.path, held._fd, held.note, held.stale = SHARED, path, fd, "", stale
            held._content = content
            return held
        raise LockedError(f"the lock of VM {vm!r} ({path}) keeps changing; try again")

    def _check_conflicts(self, locks_dir: Path) -> None:
        remove_stale_partials(locks_dir)
        for path, info in list_locks(locks_dir):
            # a VM lock conflicts with no lock (its backup holds a shared one too), and is left
            # to `for_vm` even when stale: it names the dead holder of the store's VM lock
            if path == self.path or _VM_LOCK.fullmatch(path.name):
                continue
            if remove_if_stale(path, info):
                if info.kind == self.kind == MAINTENANCE:
                    self.stale = info
                continue
            if info.host == TORN_HOST:
                raise LockedError(f"repository is locked: lock file {path} cannot be read and "
                                  "its holder is alive (a lock being written, or a holder on "
                                  "another host); try again, or if no other repo-engine runs, "
                                  "'repo-engine unlock --force'")
            if EXCLUSIVE in (self.kind, info.kind) or self.kind == info.kind == MAINTENANCE:
                raise LockedError(
                    f"repository is locked ({info.kind}) by {info.command!r}, pid {info.pid} on "
                    f"{info.host} since {info.time}; if that process is gone, run "
                    "'repo-engine unlock'"
                )

    def check(self) -> None:
        """LockedError unless our lock file is still in place (`_in_place`): an
        'unlock --force' removes it, and a command that took a conflicting lock since may be
        writing what we are about to (a gc that no longer waits for us deletes what we would
        commit). Called before each commit, so the holder fails instead of both writing."""
        if self._fd < 0:
            return  # released, or none taken (read-only filesystem)
        if not self._in_place():
            raise LockedError(f"the lock of this command ({self.path.name}) was removed while "
                              "it ran ('repo-engine unlock --force'); it stopped before "
                              "committing anything more: run it again")

    def _in_place(self) -> bool:
        """Whether our lock file still has its name: the file we flocked, or a file under that
        name holding what we wrote. A name of ours is never made again once removed, and some
        filesystems give one file other inode numbers from one look-up to the next (SMB mounted
        without the server's inode numbers): the same inode alone would fail a live lock."""
        try:
            if os.path.samestat(os.fstat(self._fd), os.lstat(self.path)):
                return True
            return read_limited(self.path, LOCK_MAX) == self._content
        except (FileNotFoundError, DamageError):  # gone, or no longer a regular file
            return False

    @property
    def holding(self) -> bool:
        """Whether this lock is held: a lock file with our flock, not released yet."""
        return self._fd >= 0

    def release(self, keep_file: bool = False) -> None:
        """Drop the lock; `keep_file`: leave the file, stale (see leases.SharedLock.release)."""
        if self._fd >= 0:
            # only our own file: after an `unlock --force`, the name may be another holder's
            try:
                if not keep_file and os.path.samestat(os.fstat(self._fd), os.lstat(self.path)):
                    self.path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "RepoLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
