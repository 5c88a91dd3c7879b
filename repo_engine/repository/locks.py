"""Repository locks: `locks/<host>-<pid>-<rand>.lock`, one file per holder.

A lock file is an envelope (magic LOCK) holding JSON {kind, host, pid, time, command}. `shared`
locks (backups, restores) coexist; an `exclusive` lock excludes every other lock; a `maintenance`
lock (forget, gc, repair) coexists with shared locks but excludes other maintenance and exclusive
locks. A lock file is written under a temporary name, flocked, then renamed into place, so a lock
file that can be listed always carries its holder's flock. The holder keeps
an flock on its own file, so a lock of this host whose flock can be taken belongs to a dead process:
it is stale and is removed. Locks of other hosts are never guessed stale; `unlock` removes them.
On a read-only filesystem (read-only media, a read-only snapshot) nobody can write, so a shared
lock is not needed: taking one is a no-op with a note; any other lock is refused there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import DamageError, FormatError, LockedError, RepoError
from .envelope import seal, unseal
from .formats import LOCK
from .points import now_iso

SHARED, EXCLUSIVE, MAINTENANCE = "shared", "exclusive", "maintenance"


@dataclass(frozen=True)
class LockInfo:
    kind: str
    host: str
    pid: int
    time: str
    command: str


def _read_info(path: Path) -> LockInfo | None:
    try:
        return LockInfo(**json.loads(unseal(LOCK, path.read_bytes(), str(path))))
    except FileNotFoundError:
        return None
    except (DamageError, FormatError, TypeError, ValueError):
        # a lock file being written right now looks torn; treat it as held
        return LockInfo("exclusive", "?", -1, "", "unreadable lock file")


def is_stale(path: Path, info: LockInfo) -> bool:
    """True when the holder is a dead process on this host (its flock is free)."""
    if info.host != socket.gethostname():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def list_locks(locks_dir: Path) -> list[tuple[Path, LockInfo]]:
    found = []
    for path in sorted(locks_dir.glob("*.lock")):
        info = _read_info(path)
        if info is not None:
            found.append((path, info))
    return found


def _create_flocked(path: Path, content: bytes) -> int:
    """Create `path` holding `content` with our flock already on it when it appears: an unnamed
    file (O_TMPFILE) linked into place, else a `.new` name renamed into place."""
    try:
        fd = os.open(path.parent, os.O_TMPFILE | os.O_RDWR, 0o644)
    except (AttributeError, OSError):
        fd = -1
    tmp = path.with_suffix(".new")
    named = fd < 0
    if named:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, content)
    os.fsync(fd)
    if named:
        os.rename(tmp, path)
    else:
        # linkat(AT_SYMLINK_FOLLOW) on the /proc link names the unnamed file (a dir fd forces
        # CPython to call linkat rather than link)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=dir_fd, follow_symlinks=True)
        finally:
            os.close(dir_fd)
    return fd


def remove_stale_partials(locks_dir: Path) -> None:
    """Remove half-created lock files (`*.new`) of dead processes of this host (a few seconds
    old: a live creator takes its flock right after creating the file)."""
    host = socket.gethostname()
    for path in locks_dir.glob(f"{host}-*.new"):
        try:
            young = time.time() - path.stat().st_mtime < 5
        except FileNotFoundError:
            continue
        if not young and is_stale(path, LockInfo(SHARED, host, -1, "", "")):
            path.unlink(missing_ok=True)


class RepoLock:
    """A held lock; release it with `release()` or by leaving the `with` block."""

    def __init__(self, locks_dir: Path, kind: str, command: str) -> None:
        self.kind = kind
        info = LockInfo(kind, socket.gethostname(), os.getpid(), now_iso(), command)
        self.path = locks_dir / f"{info.host}-{info.pid}-{os.urandom(4).hex()}.lock"
        self.note = ""
        try:
            self._fd = _create_flocked(self.path, seal(LOCK, json.dumps(asdict(info)).encode()))
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

    def _check_conflicts(self, locks_dir: Path) -> None:
        remove_stale_partials(locks_dir)
        for path, info in list_locks(locks_dir):
            if path == self.path:
                continue
            if is_stale(path, info):
                path.unlink(missing_ok=True)
                continue
            if EXCLUSIVE in (self.kind, info.kind) or self.kind == info.kind == MAINTENANCE:
                raise LockedError(
                    f"repository is locked ({info.kind}) by {info.command!r}, pid {info.pid} on "
                    f"{info.host} since {info.time}; if that process is gone, run "
                    "'repo-engine unlock'"
                )

    def release(self) -> None:
        if self._fd >= 0:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "RepoLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
