"""Durable file writes: every file the repository keeps is written through here.

Write order (docs/FORMAT.md, "Write and read ordering"): data goes to a temporary file in the
destination's directory, is fsynced, renamed over the final name, and the directory is fsynced, so a
crash leaves either the old state or the complete new file, never a torn one. Files are created
owner-only (safefile.FILE_MODE).

A temporary file is named `.tmp-<host>-<pid>-<8 hex>-<final name>` (`temp_name`): a process killed
before its rename leaves it behind, and its name tells gc whether its writer may still be at work
(`temp_owner`). Names of earlier versions, `.tmp-<pid>-<8 hex>-<final name>`, name no host.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import blake3

from ..pause import pause_point
from .safefile import FILE_MODE

T = TypeVar("T")
BATCH_THREADS = 8  # fsyncs `write_batch` waits on at once
TEMP_PREFIX = ".tmp-"  # a write in progress (or a killed one's leftover), never a file of its own
HOST_HEX = 16  # hex digits of the host in a temporary name
_TEMP = re.compile(rf"\.tmp-(?:([0-9a-f]{{{HOST_HEX}}})-)?([0-9]+)-[0-9a-f]{{8}}-.+", re.DOTALL)
MAX_PID = 2**31 - 1  # the largest pid_t: a greater "pid" is no process's (os.kill refuses it)
SPOOL_DIR = "repo-engine-spool-"  # a private spool directory's name starts so
SPOOL_KINDS = ("pack", "ckpt")  # what a store's spool directory holds while it is built
_SPOOL_DIR_NAME = re.compile(rf"{SPOOL_DIR}([0-9a-f]{{{HOST_HEX}}})-([0-9]+)-.+", re.DOTALL)
_SPOOL = re.compile(rf"(?:{'|'.join(SPOOL_KINDS)})-(?:([0-9a-f]{{{HOST_HEX}}})-)?([0-9]+)-"
                    r"[0-9a-f]{12}\.tmp")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def host_id() -> str:
    """This host in temporary names: the start of the BLAKE3 of its name, the name locks and
    leases give their holder's host by (a fixed length, whatever the name holds), and of its
    pid namespace. A pid is alive or dead only in its own namespace: a container that shares
    the host's name but not its pids (host networking) would otherwise take the host's live
    writers for dead ones, and the host the container's."""
    return blake3.blake3(f"{socket.gethostname()}\0{pid_namespace()}".encode()
                         ).hexdigest()[:HOST_HEX]


def pid_namespace() -> str:
    """This process's pid namespace (Linux: `pid:[inode]`); empty where there is none to read."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def temp_name(final: Path) -> Path:
    return final.with_name(f"{TEMP_PREFIX}{host_id()}-{os.getpid()}-{os.urandom(4).hex()}-"
                           f"{final.name}")


@dataclass(frozen=True)
class TempOwner:
    """The writer a temporary file's name gives."""

    host: str | None  # its host_id(); None: a name of an earlier version, which gives no host
    pid: int


def temp_owner(file_name: str) -> TempOwner | None:
    """The writer of the temporary file `file_name` (a name without directory); None when it is
    not a name `temp_name` gives or gave (a pid no process can have included)."""
    return _owner(_TEMP.fullmatch(file_name))


def spool_name(kind: str) -> str:
    """A new spool file's name (`kind` of SPOOL_KINDS): its writer's host and pid, as in a
    temporary name, so that gc can tell a killed writer's leftover from a live one's file."""
    return f"{kind}-{host_id()}-{os.getpid()}-{os.urandom(6).hex()}.tmp"


def spool_owner(file_name: str) -> TempOwner | None:
    """The writer of the spool file `file_name`, as `temp_owner` (an earlier version's name,
    `pack-<pid>-<12 hex>.tmp`, gives no host)."""
    return _owner(_SPOOL.fullmatch(file_name))


def spool_dir_prefix() -> str:
    """The start of a private spool directory's name (one per process, under the system's temp
    directory): `repo-engine-spool-<host>-<pid>-`, so that a killed process's can be told."""
    return f"{SPOOL_DIR}{host_id()}-{os.getpid()}-"


def dead_spool_dirs(parent: Path) -> list[Path]:
    """The private spool directories in `parent` of this host's processes that are gone."""
    return [path for path in parent.glob(f"{SPOOL_DIR}{host_id()}-*")
            if writer_gone(_owner(_SPOOL_DIR_NAME.fullmatch(path.name)), legacy_ours=False)]


def of_this_host(owner: TempOwner, *, legacy_ours: bool) -> bool:
    """Whether `owner` is a process of this host (and pid namespace), whose pid tells here
    whether it lives; `legacy_ours`: whether a name of an earlier version, which gives no host,
    counts as this host's (on a repository of one writer it can be no other's)."""
    return owner.host == host_id() or (owner.host is None and legacy_ours)


def writer_gone(owner: TempOwner | None, *, legacy_ours: bool) -> bool:
    """Whether `owner` (None: no name the repository gives) is a process of this host that is
    gone (`of_this_host`)."""
    return (owner is not None and of_this_host(owner, legacy_ours=legacy_ours)
            and not alive(owner.pid))


def alive(pid: int) -> bool:
    """Whether process `pid` of this pid namespace exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def _owner(found: re.Match[str] | None) -> TempOwner | None:
    if found is None or int(found[2]) > MAX_PID:
        return None
    return TempOwner(found[1], int(found[2]))


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_atomic(final: Path, data: bytes, *, overwrite: bool = True) -> None:
    """Write `data` to `final` durably and atomically."""
    tmp = temp_name(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    pause_point("atomic.written")
    publish(tmp, final, overwrite=overwrite)


def publish(tmp: Path, final: Path, *, overwrite: bool = True) -> None:
    """Rename an fsynced temporary file to its final name and make the rename durable."""
    try:
        if overwrite:
            os.replace(tmp, final)
        else:
            os.link(tmp, final)
            tmp.unlink()
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def write_batch(files: Sequence[tuple[Path, bytes | memoryview]]) -> None:
    """`write_atomic` of each (final path, data), made durable together: every temporary file is
    written, then all are fsynced (by a few threads: their waits overlap and share the
    filesystem's journal commits), then renamed, then each directory is fsynced once. As with
    `write_atomic`, a crash leaves each file absent or whole under its name (a file is renamed
    only once its data is durable); which of them are there is certain only once this returns,
    so whatever names them is committed after it (FORMAT.md, "Write and read ordering")."""
    temps = [temp_name(final) for final, _ in files]
    with ThreadPoolExecutor(max(1, min(BATCH_THREADS, len(files)))) as pool:
        try:
            _write_synced(pool, temps, [data for _, data in files])
            pause_point("atomic.written")
            for tmp, (final, _) in zip(temps, files):
                os.replace(tmp, final)
        except BaseException:
            for tmp in temps:
                tmp.unlink(missing_ok=True)  # one renamed already is whole under its name
            raise
        _each(pool, fsync_dir, {final.parent for final, _ in files})


def _write_synced(pool: ThreadPoolExecutor, temps: list[Path],
                  datas: list[bytes | memoryview]) -> None:
    """Write each new file of `temps` with its data, then fsync them all at once."""
    fds: list[int] = []
    try:
        for tmp, data in zip(temps, datas):
            fds.append(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
            write_all(fds[-1], data)
        _each(pool, os.fsync, fds)
    finally:
        for fd in fds:
            os.close(fd)


def _each(pool: ThreadPoolExecutor, fn: Callable[[T], object], items: Collection[T]) -> None:
    for _ in pool.map(fn, items):
        pass
