"""LocalStore: the repository's objects as files under one local directory.

An object `a/b/c` is the file `ROOT/a/b/c`; the layout is the one repositories have always had,
so existing repositories open unchanged. Writes keep invariant 3's durability (atomic.py): a
temporary file in the destination directory, fsync, rename (or link, for `if_absent`), fsync of
the directory. Files and directories are created owner-only (safefile.FILE_MODE, DIR_MODE).

Nothing found under ROOT is trusted (safefile.py): a file is opened with O_NOFOLLOW|O_NONBLOCK and
must be regular, a whole read is bounded by the caller's limit, deletions happen only in real
directories, and `list` never follows a symlink (what is not a regular file is reported through
`skipped`, never yielded). The temporary files of writes (atomic.temp_name) are no objects: `list`
reports those it meets through `temps`, for gc to tell a killed writer's from a live one's.

Not objects, and never listed: the LMDB index (`index/`), the lock files (`locks/`) and the spool
directory of packs being written (`tmp/`) stay local files under `root`, which their modules use
directly.

`get_range` keeps the descriptors of the files it read open (up to FD_CACHE of them, until
`close`): a restore reads each pack in many ranges, and packs are immutable, so a cached
descriptor always reads the bytes its name was written with.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from ...errors import DamageError
from ..atomic import TEMP_PREFIX, publish, write_atomic, write_batch
from ..safefile import (kind_of, make_dir, open_regular, read_limited, sync_dir,
                       unlink_from)
from . import (ObjectDamaged, ObjectExists, ObjectInfo, ObjectMissing, PendingUpload, RangeReader,
               ShortRead, StoreError, TempFile, check_name)

T = TypeVar("T")
LOCAL_ONLY = ("index", "locks", "tmp")  # directories of local files, not objects
FD_CACHE = 256
DELETE_THREADS = 32  # files unlinked at once (delete): each unlink waits on the journal
DELETE_SLICE = 64  # fewest names of one directory a thread of delete takes
DELETE_SWITCH = 0.0005  # seconds: the interpreter's thread switch interval while delete runs


class LocalStore:
    leaves_temps = True  # a killed write's temporary file stays beside the objects
    reads_wait = False  # a read of a file just written comes from the page cache

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)
        self._fds: dict[str, int] = {}
        self._fds_lock = threading.Lock()

    def path_of(self, name: str) -> Path:
        """The file holding object `name` (for this store's own files and for tests)."""
        return self.root / check_name(name)

    # -- writing ----------------------------------------------------------------------------
    def put(self, name: str, data: bytes | memoryview, *, if_absent: bool = False) -> None:
        with self._writing(name) as path:
            write_atomic(path, data, overwrite=not if_absent)

    def put_many(self, items: Sequence[tuple[str, bytes | memoryview]]) -> None:
        """`put` of each (name, data), made durable together (atomic.write_batch): one round of
        fsyncs for the batch instead of two fsyncs per object, one after the other."""
        files = []
        for name, data in items:
            with self._writing(name) as path:
                files.append((path, data))
        write_batch(files)

    def put_file(self, name: str, path: Path, *, if_absent: bool = False) -> None:
        """Make the spool file `path` durable and rename it to `name` (same filesystem)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # cheap when the writer fsynced already; the guarantee is ours
        finally:
            os.close(fd)
        with self._writing(name) as final:
            publish(path, final, overwrite=not if_absent)

    def spool_dir(self) -> Path:
        """`ROOT/tmp`, on the objects' filesystem, so a spool file is published by a rename."""
        spool = self.root / "tmp"
        make_dir(spool)
        return spool

    @contextmanager
    def _writing(self, name: str) -> Iterator[Path]:
        """The path of `name`, its directories created owner-only (or checked to be real
        directories: ObjectDamaged otherwise); a name taken under `if_absent` is ObjectExists."""
        path = self.path_of(name)
        with _damage_as_object():
            parent = self.root
            for part in name.split("/")[:-1]:
                parent = parent / part
                make_dir(parent)
        try:
            yield path
        except FileExistsError:
            raise ObjectExists(f"{path} exists already; it was left as it was") from None

    # -- reading ----------------------------------------------------------------------------
    def get(self, name: str, *, limit: int) -> bytes:
        with self._reading(name) as path:
            return read_limited(path, limit)

    def get_start(self, name: str, length: int) -> tuple[bytes, int]:
        with self._reading(name) as path:
            fd = open_regular(path)
        try:
            size = os.fstat(fd).st_size
            return _pread_all(fd, min(length, size), 0), size
        finally:
            os.close(fd)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        data = self._reading_fd(name, lambda fd: _pread_all(fd, length, offset))
        self._check_length(name, offset, length, len(data))
        return data

    def get_range_into(self, name: str, offset: int, view: memoryview) -> None:
        """`get_range(name, offset, len(view))` read into `view`."""
        got = self._reading_fd(name, lambda fd: _preadv_all(fd, view, offset))
        self._check_length(name, offset, len(view), got)

    def _reading_fd(self, name: str, read: Callable[[int], T]) -> T:
        """`read(fd)` with a descriptor of `name`, closed afterwards unless cached."""
        fd, cached = self._fd(name)
        try:
            return read(fd)
        finally:
            if not cached:
                os.close(fd)

    def _check_length(self, name: str, offset: int, length: int, got: int) -> None:
        if got != length:
            raise ShortRead(f"{self.path_of(name)} is truncated: {length} bytes at offset "
                            f"{offset} asked, {got} there")

    def open_range(self, name: str, offset: int, length: int) -> RangeReader:
        return _PreadRange(self, name, offset, length)

    def _fd(self, name: str) -> tuple[int, bool]:
        """A descriptor of `name` and whether it stays cached (cached ones are closed only by
        `close`, so a concurrent reader never loses its descriptor)."""
        with self._fds_lock:
            fd = self._fds.get(name)
            if fd is not None:
                return fd, True
        with self._reading(name) as path:
            fd = open_regular(path)
        with self._fds_lock:
            if name not in self._fds and len(self._fds) < FD_CACHE:
                self._fds[name] = fd
                return fd, True
        return fd, False

    def size(self, name: str) -> int:
        with self._reading(name) as path:
            mode = os.lstat(path)
        if not stat.S_ISREG(mode.st_mode):
            raise ObjectDamaged(f"{path} is {kind_of(mode.st_mode)}, not a regular file: the "
                                "repository is damaged or was tampered with")
        return mode.st_size

    def exists(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self.path_of(name)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    @contextmanager
    def _reading(self, name: str) -> Iterator[Path]:
        """The path of `name`; a missing file is ObjectMissing, a file that is not what the
        repository wrote (safefile.py) ObjectDamaged."""
        path = self.path_of(name)
        try:
            with _damage_as_object():
                yield path
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectMissing(f"{path} is missing") from None

    # -- listing and deleting ---------------------------------------------------------------
    def list(self, prefix: str, skipped: list[str] | None = None,
             temps: list[TempFile] | None = None) -> Iterator[ObjectInfo]:
        """Objects whose names start with `prefix`: regular files only, temporary files of writes
        left out (and added to `temps`, those of every directory walked); a symlink (to a file
        or a directory), FIFO, socket or device is described in `skipped` and never followed."""
        for name, entry in self._entries(prefix, skipped, temps):
            try:
                size = entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # deleted since the directory was read: gone, as on S3
            yield ObjectInfo(name, size)

    def names(self, prefix: str, skipped: list[str] | None = None,
              temps: list[TempFile] | None = None) -> Iterator[str]:
        """The names `list` gives, without reading any file's metadata for its size (gc lists
        tens of thousands of maps and manifests for their names); a file deleted after its
        directory was read may be among them."""
        return (name for name, _entry in self._entries(prefix, skipped, temps))

    def _entries(self, prefix: str, skipped: list[str] | None,
                 temps: list[TempFile] | None) -> Iterator[tuple[str, os.DirEntry]]:
        check_name(prefix, prefix=True)
        base = prefix.rpartition("/")[0]
        top = self.root / base if base else self.root
        return ((name, entry) for name, entry in _walk(top, base, skipped, temps)
                if name.startswith(prefix))

    def delete(self, names: Iterable[str]) -> None:
        """Remove each named file (only from a real directory, never through a symlink), then
        make the removals durable (one fsync per directory, after all its removals). The names
        are removed, and the directories synced, by a few threads, a directory's names split
        among them: an unlink or fsync waits on the filesystem's journal with the GIL released,
        and gc deletes thousands of files from hundreds of directories (a forget's manifests all
        from one). Meanwhile the interpreter switches threads more often (`_QuickSwitches`)."""
        slices = self._delete_slices(names)
        with _damage_as_object():
            if len(slices) < 2:
                for directory, files in slices:
                    if unlink_from(directory, files):
                        sync_dir(directory)
                return
            with _quick_switches, ThreadPoolExecutor(min(DELETE_THREADS, len(slices))) as pool:
                present = list(pool.map(unlink_from, *zip(*slices)))
                there = {d for (d, _), is_there in zip(slices, present) if is_there}
                for _ in pool.map(sync_dir, there):
                    pass  # each directory once, after all its removals; their fsyncs overlap

    def _delete_slices(self, names: Iterable[str]) -> list[tuple[Path, list[str]]]:
        """(directory, file names) pairs covering `names`: each directory's names in up to
        DELETE_THREADS slices of at least DELETE_SLICE names."""
        by_dir: dict[str, list[str]] = {}
        for name in names:  # a Path per directory, not per name: gc deletes tens of thousands
            directory, _, file = check_name(name).rpartition("/")
            by_dir.setdefault(directory, []).append(file)
        slices = []
        for directory, files in by_dir.items():
            path = self.path_of(directory) if directory else self.root
            parts = min(DELETE_THREADS, -(-len(files) // DELETE_SLICE))
            slices += [(path, files[i::parts]) for i in range(parts)]
        return slices

    def pending_uploads(self) -> Iterator[PendingUpload]:
        """None: a local put is one rename. What a killed writer leaves, temporary files (which
        `list` reports) and spool files, is gc's to remove (maintenance/inventory.py)."""
        return iter(())

    def abort_upload(self, upload: PendingUpload) -> None:
        raise StoreError(f"{self.location}: a local directory has no upload {upload.upload_id}")

    def close(self) -> None:
        with self._fds_lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


class _QuickSwitches:
    """The interpreter's thread switch interval lowered to DELETE_SWITCH while a threaded delete
    runs (the last of overlapping ones puts it back). Each unlink gives up the GIL and must win
    it back to go on to the next name: with the command's thread computing meanwhile (gc counts
    and marks while a forget's manifests go), each of those waits lasted up to the default 5 ms,
    and 30,000 unlinks that take 1.2 s alone took 5-9 s beside a busy thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0  # deletes running with DELETE_SWITCH set
        self._saved = 0.0  # the interval they replaced

    def __enter__(self) -> None:
        with self._lock:
            if not self._users:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(DELETE_SWITCH, self._saved))
            self._users += 1

    def __exit__(self, *_exc: object) -> None:
        with self._lock:
            self._users -= 1
            if not self._users:
                sys.setswitchinterval(self._saved)


_quick_switches = _QuickSwitches()


@contextmanager
def _damage_as_object() -> Iterator[None]:
    """safefile.py's damage (a symlink, FIFO or device where the store's files belong) as the
    store's ObjectDamaged."""
    try:
        yield
    except ObjectDamaged:
        raise
    except DamageError as exc:
        raise ObjectDamaged(str(exc)) from None


def _walk(top: Path, base: str, skipped: list[str] | None,
          temps: list[TempFile] | None) -> Iterator[tuple[str, os.DirEntry]]:
    """(object name, entry) of every regular file below `top` (a real directory: a symlinked or
    missing one yields nothing; the root itself, `base` empty, may be a link, the path the user
    gave) but temporary files, which go to `temps`; what is neither a file nor a directory goes
    to `skipped`. The local-only directories at the top are not walked."""
    try:
        entries = list(os.scandir(top)) if not (base and top.is_symlink()) else []
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if not base and entry.name in LOCAL_ONLY:
            continue
        name = f"{base}/{entry.name}" if base else entry.name
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), name, skipped, temps)
        elif entry.is_file(follow_symlinks=False):
            if not entry.name.startswith(TEMP_PREFIX):
                yield name, entry
            elif temps is not None:
                _add_temp(temps, name, entry, skipped)
        elif skipped is not None:
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except FileNotFoundError:
                continue  # deleted since the directory was read
            skipped.append(f"{entry.path} is {kind_of(mode)}, not a regular file: left alone, "
                           "never read (remove it)")


def _add_temp(temps: list[TempFile], name: str, entry: os.DirEntry,
              skipped: list[str] | None) -> None:
    try:
        check_name(name)
    except StoreError:  # a stray file's name: `delete` would refuse it, and with it its batch
        if skipped is not None:
            skipped.append(f"{entry.path} is not a name the repository gives: left alone, never "
                           "read (remove it)")
        return
    try:
        found = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return  # renamed or removed since the directory was read
    temps.append(TempFile(name, found.st_mtime))


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    """`length` bytes at `offset`, fewer only at the end of the file."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        part = os.pread(fd, length - got, offset + got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _preadv_all(fd: int, view: memoryview, offset: int) -> int:
    """Read into `view` the bytes at `offset`; how many there were (fewer only at the end of
    the file)."""
    got = 0
    while got < len(view) and (part := os.preadv(fd, [view[got:]], offset + got)):
        got += part
    return got


class _PreadRange(RangeReader):
    """A range of a file: each piece is one pread of the store's cached descriptor."""

    def __init__(self, store: LocalStore, name: str, offset: int, length: int) -> None:
        super().__init__(offset, length)
        self._store, self._name = store, name

    def _fetch(self, n: int) -> bytes:
        return self._store.get_range(self._name, self.position, n)

    def _fetch_into(self, view: memoryview) -> None:
        self._store.get_range_into(self._name, self.position, view)
