"""Touching files inside the repository without trusting what is there.

The repository directory may hold anything a damaged disk or another local user put there: a
symlink to a file elsewhere, a FIFO, a device node, a file far larger than its format allows. Every
read, directory creation and deletion inside the repository goes through here, so that:

- a symlink is never followed (O_NOFOLLOW; directories are checked with lstat),
- opening never blocks (O_NONBLOCK: a FIFO without a writer, a device) and only a regular file is
  read (fstat after opening),
- a read is bounded by the size limit of its format (a lock, the config, a manifest, a map), so
  neither a planted huge file nor a device like /dev/zero can exhaust memory,
- a file is removed only from a real directory of the repository, never through a symlink.

Anything else is damage (exit 3) with a one-line message naming the path.

Files and directories are created owner-only (FILE_MODE, DIR_MODE): packs hold the data of the
disks and `config` holds the chunk-id key. The modes are passed at creation, so the process umask
can only narrow them.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import DamageError

FILE_MODE = 0o600
DIR_MODE = 0o700
# size limits of the small formats (a real file is far smaller; a larger one is not ours)
LOCK_MAX = 64 << 10
CONFIG_MAX = 1 << 20
MANIFEST_MAX = 64 << 20
MAP_MAX = 16 << 30
JOURNAL_MAX = 1 << 30  # a sweep of millions of refs is 8 bytes each

_KINDS = ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a file"))


def kind_of(mode: int) -> str:
    """What a file is, in words ("a symlink", "a FIFO", ..., "a file")."""
    return next((word for test, word in _KINDS if test(mode)), "not a regular file")


def _not_ours(path: Path, mode: int, expected: str) -> DamageError:
    return DamageError(f"{path} is {kind_of(mode)}, not {expected}: the repository is damaged or "
                       "was tampered with; remove it or put back what belongs there")


def open_regular(path: Path) -> int:
    """A read-only descriptor of the regular file `path` (never through a symlink, never blocking
    on a FIFO or device). FileNotFoundError when it is missing; DamageError when it is not a
    regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the last component is a symlink
            raise _not_ours(path, stat.S_IFLNK, "a regular file") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_ours(path, mode, "a regular file")
    return fd


def read_limited(path: Path, limit: int) -> bytes:
    """All bytes of the regular file `path`, refusing one larger than `limit` (the format's
    bound) as damage."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise DamageError(f"{path} holds {size} bytes, more than such a file can hold "
                              f"({limit}): the repository is damaged or was tampered with")
        parts = []
        while size > 0:
            part = os.read(fd, min(size, 64 << 20))
            if not part:
                break
            parts.append(part)
            size -= len(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def is_name(value: object, length: int) -> bool:
    """True when `value` is `length` lowercase hex digits: the only names the repository gives
    its files."""
    return (isinstance(value, str) and len(value) == length
            and not value.strip("0123456789abcdef"))   # per-character test in C


def checked_name(value: object, length: int, what: str) -> str:
    """`value` when it is a name (is_name), else DamageError: a name read from disk becomes a
    path, and `../x` must never."""
    if not is_name(value, length):
        raise DamageError(f"{what}: {value!r} is not a valid name ({length} hex digits); "
                          "the metadata is damaged")
    return value


def check_dir(path: Path) -> None:
    """Refuse (as damage) a repository directory that is not a real directory."""
    mode = os.lstat(path).st_mode
    if not stat.S_ISDIR(mode):
        raise _not_ours(path, mode, "a directory")


def make_dir(path: Path) -> None:
    """Create the owner-only directory `path`, or check that it already is a real directory."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        check_dir(path)


def is_regular(path: Path) -> bool:
    """True when `path` is a regular file (not following a symlink); False when it is anything
    else or gone."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def unlink_from(directory: Path, names: list[str]) -> bool:
    """Delete the files `names` from `directory`, which must be a real directory (a symlinked
    directory would make the deletions land outside the repository); returns whether the
    directory is there. The directory is opened once, without following a symlink, and each name
    is unlinked relative to that descriptor, so it cannot be swapped for a symlink in between. A
    symlink among `names` is removed itself, never what it points to. No directory, no file:
    nothing to do (a damaged index may name a pack whose directory never existed). The caller
    makes the deletions durable (sync_dir) whenever the directory is there, even if every name
    was already gone: an earlier delete may have unlinked them and died before its fsync."""
    fd = _open_dir(directory)
    if fd is None:
        return False
    try:
        for name in names:
            try:
                os.unlink(name, dir_fd=fd)
            except FileNotFoundError:
                continue
    finally:
        os.close(fd)
    return True


def sync_dir(directory: Path) -> None:
    """Make the deletions from the real directory `directory` durable."""
    fd = _open_dir(directory)
    if fd is not None:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_dir(directory: Path) -> int | None:
    """A descriptor of the real directory `directory` (never through a symlink); None when it is
    missing; DamageError when it is anything else."""
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise _not_ours(directory, os.lstat(directory).st_mode, "a directory") from None
