"""Steps 5-7 of a restore (see the package doc): read, check, decompress, write, collect damage."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import vddk_ext

from ..backup.extents import blocks_to_extents
from ..errors import (ChainBroken, DamageError, LockedError, PointNotFound, RepoError,
                      UsageError)
from ..pause import pause_point
from ..repository.blockmap import SEGMENT_BLOCKS, window_starts, zip_windows
from ..repository.packs import pack_object
from ..repository.locks import SHARED
from ..repository.points import DiskRecord, PointRecord
from ..repository.repo import Repository
from ..repository.atomic import fsync_dir
from ..repository.safefile import kind_of
from ..repository.store import ObjectDamaged, ObjectMissing, RangeReader, ShortRead
from ..units import format_size, plural
from .plan import ReadRequest, ReadRun, ReadSettings, RestorePlan, plan_restore

Progress = Callable[[int], None]
WRITEBACK_BYTES = 32 << 20
WRITE_BATCH = 2 << 20  # decoded bytes a worker hands the block writer at once (at most)
DIRECT_WRITERS = 4  # writes in flight at once to a target written past the page cache
KEPT_WINDOW_BYTES = 16 << 20  # resolved map windows a restore keeps from its first pass
SHOWN_RANGES = 4  # damaged byte ranges a restore error lists (then a count of the others)
SHOWN_PACKS = 2  # damaged packs it describes
TARGET_LOCK_WAIT = 5.0  # seconds a restore waits for its target's flock (`_flock_soon`)
_REPAIR = ("'repo-engine scrub --repair' finds all damage and heals what the next backup reads "
           "again")


@dataclass
class RestoreSummary:
    point: str
    disk: str
    target: str
    capacity: int
    blocks_written: int
    zero_blocks: int
    chunks_read: int
    bytes_written: int
    seconds: float


def _disk_of(point: PointRecord, key: str) -> DiskRecord:
    disk = point.disk(key)
    if disk is None:
        keys = ", ".join(d.key for d in point.disks)
        raise PointNotFound(f"point {point.id[:8]} has no disk {key!r} (its disks: {keys})")
    return disk


def _target_kind(target: Path) -> str:
    """What a restore target is: "new" (nothing there), "file" (a regular file) or "device" (a
    block device, or a symlink to one such as /dev/disk/by-id/...). Anything else is refused:
    restore never writes through another symlink (a dangling one would create a file elsewhere),
    and never replaces a FIFO, socket, character device or directory."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return "new"
    if stat.S_ISLNK(mode):
        try:
            mode = os.stat(target).st_mode
        except FileNotFoundError:
            raise UsageError(f"{target} is a symlink to nothing; restore does not write through "
                             "symlinks: give the path of a new file") from None
        if stat.S_ISBLK(mode):
            return "device"
        raise UsageError(f"{target} is a symlink; restore writes through a symlink only to a "
                         "block device: give the real path")
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISBLK(mode):
        return "device"
    raise UsageError(f"{target} is {kind_of(mode)}; restore writes only to a new file, an "
                     "existing regular file (with --force) or a block device")


def _open_target(target: Path, capacity: int, *, onto: bool,
                 force: bool) -> tuple[vddk_ext.Disk, Path | None]:
    """The open target, and the temporary file a new image is written to (renamed over
    `target` when complete; None when the target is written in place)."""
    kind = _target_kind(target)
    if kind == "device":
        device = vddk_ext.open_local(str(target), writable=True, direct=True)
        if device.capacity < capacity:
            device.close()
            raise UsageError(f"{target} holds {device.capacity} bytes; the disk needs {capacity}")
        return device, None
    if onto:
        if kind != "file":
            raise UsageError(f"--onto target {target} does not exist")
        os.truncate(target, capacity)
        return vddk_ext.open_local(str(target), writable=True, direct=True), None
    if kind == "file" and not force:
        raise UsageError(f"{target} already exists; use --force to replace it")
    staged = target.with_name(f".{target.name}.restore-{os.getpid()}-{os.urandom(4).hex()}")
    return (vddk_ext.open_local(str(staged), writable=True, create_size=capacity, direct=True),
            staged)


@contextmanager
def _exclusive(target: Path) -> Iterator[None]:
    """An flock on an existing target (a file or a device) for the whole restore: a second
    restore into it is refused instead of interleaving its blocks with ours, or its rename
    with ours. A new file has nothing to lock: it is written under a temporary name. A target
    this process may not open, or whose filesystem cannot flock it, is restored unlocked, as
    before there was a lock: the lock only guards against a second restore."""
    kind = _target_kind(target)
    fd = -1 if kind == "new" else _lockable(target, kind)
    if fd < 0:
        yield
        return
    try:
        _flock_soon(fd, target)
        yield
    finally:
        os.close(fd)


def _flock_soon(fd: int, target: Path) -> None:
    """Take the exclusive flock of `exclusive`, waiting up to TARGET_LOCK_WAIT seconds for a
    brief holder: udev holds a shared flock on a block device while it handles the event a
    close after writing raises (a restore just before this one), for a moment, not a restore's
    length. LockedError when it is still held."""
    deadline = time.monotonic() + TARGET_LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockedError(f"{target} is being written by another restore; wait for it "
                                  "to finish, or restore to another target") from None
            time.sleep(0.05)
        except OSError:  # ENOLCK, EOPNOTSUPP: a filesystem without flock
            return


def _lockable(target: Path, kind: str) -> int:
    """A descriptor of `target` to flock, -1 when it cannot be opened. A file is opened for
    writing where it may be: NFS emulates flock with byte-range locks, and grants an exclusive
    one only on a descriptor open for writing (EBADF otherwise). O_NONBLOCK: should the target
    have become a FIFO since it was checked, the open must not wait for a writer."""
    for flags in ((os.O_RDWR, os.O_RDONLY) if kind == "file" else (os.O_RDONLY,)):
        try:
            return os.open(target, flags | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY):
                raise
    return -1


def _publish(staged: Path, target: Path, *, replace: bool) -> None:
    """Replace `target` by the complete image in one rename (a failed restore leaves the old
    file as it was); the target may have become something else meanwhile: check again.
    Without `replace` (no --force) only a new name is made (`_link_new`)."""
    try:
        if _target_kind(target) == "device":
            raise UsageError(f"{target} became a block device during the restore; nothing was "
                             "written to it")
        if replace:
            os.replace(staged, target)
        else:
            _link_new(staged, target)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _link_new(staged: Path, target: Path) -> None:
    """Name the image `target` only if nothing has that name: a file another command (a second
    restore) created there while we wrote is not replaced. A filesystem without hard links
    gets the rename."""
    try:
        os.link(staged, target, follow_symlinks=False)
    except FileExistsError:
        raise RepoError(f"{target} was created by another command during this restore and is "
                        "left as it is; restore again with --force to replace it") from None
    except OSError:
        os.replace(staged, target)
        return
    staged.unlink()


def _onto_needs_whole(target: Path, base: PointRecord, disk: DiskRecord, force: bool) -> bool:
    """Check that an --onto file can hold BASE's image: its size must be the base disk's
    capacity (or the restored point's, for a disk that grew and was grown already). With
    `force`, a file of another size gets the whole disk written (True), as a full restore would.
    Devices and missing files are left to the target checks."""
    base_capacity = _disk_of(base, disk.key).capacity
    if not target.is_file() or target.stat().st_size in (base_capacity, disk.capacity):
        return False
    if force:
        return True
    size = target.stat().st_size
    raise UsageError(
        f"--onto target {target} is {size} bytes, but disk {disk.key} of base point "
        f"{base.id[:8]} is {base_capacity} bytes, so it cannot hold that point's image; check "
        f"--onto and --base, or add --force to write every block of the disk into it (a full "
        f"restore; the file becomes {disk.capacity} bytes)")


@dataclass
class _RunDone:
    """What a worker did with one request: blocks written, and the plan's chunks it could not
    restore with what is wrong with their pack."""

    pack: str
    blocks: int = 0
    damaged: list[int] = field(default_factory=list)
    cause: str | None = None


class _RunReader:
    """Worker side: read one request a run at a time, check each run's chunks and hand them to
    the writer. Damage is reported in the result, not raised, so that the restore goes on and
    names every damaged range."""

    def __init__(self, repo: Repository, plan: RestorePlan, writer: _BlockWriter,
                 decoders: int) -> None:
        self.repo, self.plan, self.writer = repo, plan, writer
        self._decoding = threading.BoundedSemaphore(decoders)

    def __call__(self, request: ReadRequest, name: str) -> _RunDone:
        done = _RunDone(name)
        # the runs are read into one buffer in turn (a fresh one of megabytes for every run
        # costs the kernel a page fault per page): the request's largest run, what its budget
        # counts
        buffer = memoryview(bytearray(request.held))
        with self.repo.read_chunk_stream(name, request.start, request.size) as opened:
            stream: RangeReader | None = opened
            for run in request.runs:
                if stream is not None:
                    try:
                        stream.skip(run.start - stream.position)
                        span: bytes | memoryview = buffer[:run.size]
                        stream.read_into(span)
                        whole, cause = len(run.chunks), None
                    except ObjectDamaged:  # the runs left are read one by one, to tell
                        stream = None      # exactly which chunks the damage costs; each
                        opened.close()     # holds its own bytes: the buffer is let go
                        buffer = memoryview(b"")
                if stream is None:
                    span, whole, cause = self._read_alone(run, name)
                done.cause = done.cause or cause
                with self._decoding:
                    self._check(run, name, span, whole, done)
        return done

    def _check(self, run: ReadRun, name: str, span: bytes | memoryview, whole: int,
               done: _RunDone) -> None:
        """Decode and check the first `whole` chunks of `run` from its bytes `span` and hand
        them to the writer (copies: `span` may be a buffer read into again afterwards); the
        others, and those that fail their check, are damaged."""
        done.damaged += range(run.first_chunk + whole, run.first_chunk + len(run.chunks))
        view, chunks = memoryview(span), run.chunks[:whole]
        # the run's columns as Python ints once: no numpy scalar per chunk and field
        columns = zip((chunks["offset"].astype(np.int64) - run.start).tolist(),
                      chunks["stored"].tolist(), chunks["codec"].tolist(), chunks["raw"].tolist(),
                      chunks["ref"].tolist(), range(0, 32 * whole, 32))
        ids, bounds = chunks["id"].tobytes(), self.plan.bounds
        open_blob, decode = self.repo.chunk_opener(name), self.repo.codec.decoder()
        batch = self.writer.batch()
        for c, (lo, stored, codec, raw, ref, at) in enumerate(columns, start=run.first_chunk):
            chunk_id, blob = ids[at:at + 32], view[lo:lo + stored]
            if batch.full(raw):
                self.writer.put(batch)
                batch = self.writer.batch()
            slot = batch.slot(raw)
            opened = open_blob(run.start + lo, chunk_id, blob)
            data = None if opened is None else decode(opened, codec, raw, chunk_id, slot)
            if data is None:  # damaged: the careful path says how (or finds it whole now)
                try:
                    data = self._decoded(name, run.start + lo, chunk_id, blob, codec, raw, ref,
                                         slot)
                except DamageError as exc:
                    done.damaged.append(c)
                    done.cause = done.cause or str(exc)
                    continue
            blocks = self.plan.blocks_by_chunk[bounds[c]:bounds[c + 1]]
            batch.add(blocks, data)
            done.blocks += len(blocks)
        self.writer.put(batch)

    def _decoded(self, name: str, offset: int, chunk_id: bytes, blob: memoryview, codec: int,
                 raw: int, ref: int, slot: memoryview | None) -> bytes | memoryview:
        what = f"pack {name} chunk ref {ref}"
        return self.repo.codec.decode(self.repo.open_chunk(name, offset, chunk_id, blob, what),
                                      codec, raw, chunk_id, what, slot)

    def _read_alone(self, run: ReadRun, name: str) -> tuple[bytes, int, str | None]:
        """The run's bytes with one request of its own, what of it is whole and why not."""
        try:
            return self.repo.read_chunk_range(name, run.start, run.size), len(run.chunks), None
        except ShortRead:
            return self._read_truncated(run, name)
        except ObjectDamaged as exc:
            return b"", 0, _pack_damage(name, exc)

    def _read_truncated(self, run: ReadRun, name: str) -> tuple[bytes, int, str]:
        """A truncated pack: read again the chunks of the run that lie wholly before its end."""
        try:
            size = self.repo.store.size(pack_object(name))
            ends = run.chunks["offset"].astype(np.int64) + run.chunks["stored"]
            whole = int(np.count_nonzero(ends <= size))  # a prefix: ends never fall in a run
            cause = f"pack {name} is truncated (it ends at byte {size})"
            if not whole:
                return b"", 0, cause
            return (self.repo.read_chunk_range(name, run.start, int(ends[whole - 1]) - run.start),
                    whole, cause)
        except ObjectDamaged as exc:  # changed again meanwhile
            return b"", 0, _pack_damage(name, exc)


def _pack_damage(name: str, exc: ObjectDamaged) -> str:
    return f"pack {name} is missing" if isinstance(exc, ObjectMissing) else str(exc)


class _Budget:
    """Bytes held at once: taken before they are (a run's request issued, a batch handed to
    the writer), given back when they are written. One take larger than the whole cap is let
    through alone. Once closed, takes no longer wait (nothing gives back any more)."""

    def __init__(self, cap: int) -> None:
        self.cap, self.used, self.closed = cap, 0, False
        self._changed = threading.Condition()

    def take(self, nbytes: int) -> None:
        with self._changed:
            while self.used and self.used + nbytes > self.cap and not self.closed:
                self._changed.wait()
            self.used += nbytes

    def give(self, nbytes: int) -> None:
        with self._changed:
            self.used -= nbytes
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()


@dataclass
class _Batch:
    """Checked chunks a worker hands to the writer at once: each chunk's data and the blocks it
    fills, written in one call (`Disk.write_chunks`: one GIL round trip per batch). The chunks
    are decoded into the batch's buffer (aligned, from `_Buffers`), one block apart in the order
    they come: those of consecutive blocks lie there as on the disk, and a target written past
    the page cache gets them in one request straight from it (no copy; a chunk longer than a
    block, which its write refuses, is decoded into a buffer of its own). A chunk shorter than
    a block (the disk's short last block) is written as its bytes alone (`Disk.pwrite`): a
    device larger than the disk has a whole block there, which `write_chunks` would want."""

    buffer: memoryview
    block_size: int
    blocks: list[np.ndarray] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    data: list[bytes | memoryview] = field(default_factory=list)
    short: list[tuple[int, bytes | memoryview]] = field(default_factory=list)  # (block, data)
    nbytes: int = 0
    used: int = 0  # bytes of the buffer taken: a block per chunk decoded there

    @property
    def empty(self) -> bool:
        return not self.data and not self.short

    def full(self, raw: int) -> bool:
        """Whether the next chunk, of `raw` bytes, must go into the next batch."""
        return not self.empty and (self.nbytes + raw > len(self.buffer)
                                   or self.used + self.block_size > len(self.buffer))

    def slot(self, raw: int) -> memoryview | None:
        """Where the next chunk is decoded (None: into a buffer of its own)."""
        if raw > self.block_size or self.used + self.block_size > len(self.buffer):
            return None
        return self.buffer[self.used:self.used + self.block_size]

    def add(self, blocks: np.ndarray, data: bytes | memoryview) -> None:
        if isinstance(data, memoryview):  # decoded into the slot
            self.used += self.block_size
        self.nbytes += len(data)
        if len(data) < self.block_size:
            self.short += [(int(block), data) for block in blocks]
            return
        self.blocks.append(blocks)
        self.counts.append(len(blocks))
        self.data.append(data)

    def write(self, device: vddk_ext.Disk) -> None:
        if self.data:
            device.write_chunks(self.block_size, np.concatenate(self.blocks),
                                np.array(self.counts, dtype=np.uint64), self.data)
        for block, data in self.short:
            device.pwrite(block * self.block_size, data)


class _Buffers:
    """The aligned buffers batches decode into (anonymous maps: page-aligned), each taken back
    once its batch is written: a fresh one of megabytes for every batch would cost the kernel
    a page fault per page. As many exist as batches are held at once, which the budgets bound."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()

    def take(self) -> memoryview:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return memoryview(mmap.mmap(-1, self.size))

    def give(self, buffer: memoryview) -> None:
        self._free.put(buffer)


class _BlockWriter:
    """The threads that write the target. Workers decode and check chunks in parallel and hand
    them over in batches. Through the page cache one thread writes: several threads writing one
    file contend for its lock (and the GIL on every return) and cost more CPU than the writes
    themselves, while one writer, one call per batch, keeps the target's writes flowing and the
    disk busy (`_Writeback`). A target written past the page cache (`Disk.direct`) waits for
    the disk at every write instead: DIRECT_WRITERS threads, each with a handle of its own,
    keep that many writes in flight. The decoded bytes handed over and not yet written stay
    under `cap`, plus a batch for each writer thread after the first. A failed write is raised
    to the worker handing over the next batch (the restore stops) and again by `close`."""

    def __init__(self, device: vddk_ext.Disk, block_size: int, writeback: _Writeback,
                 cap: int) -> None:
        self._bs, self._writeback = block_size, writeback
        self._buffers = _Buffers(max(WRITE_BATCH, block_size))
        self._handles = _writer_handles(device)
        # each writer thread but one holds a batch it writes: as many wait as with one writer
        self._budget = _Budget(cap + WRITE_BATCH * (len(self._handles) - 1))
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, args=(handle,),
                                          name="restore-writer", daemon=True)
                         for handle in self._handles]
        for thread in self._threads:
            thread.start()

    def batch(self) -> _Batch:
        """A new batch, its buffer taken from those written already."""
        return _Batch(self._buffers.take(), self._bs)

    def put(self, batch: _Batch) -> None:
        """Hand `batch` over (an empty one only gives its buffer back)."""
        if batch.empty:
            self._buffers.give(batch.buffer)
            return
        if self._error is not None:
            raise self._error
        self._budget.take(batch.nbytes)
        if not self._budget.closed:  # a worker the failed restore left running: drop it
            self._queue.put(batch)

    def _run(self, device: vddk_ext.Disk) -> None:
        while (batch := self._queue.get()) is not None:
            try:
                if self._error is None:
                    batch.write(device)
                    self._writeback.wrote(batch.nbytes, device)
                    self._buffers.give(batch.buffer)  # written: nothing refers to it now
            except BaseException as exc:  # noqa: BLE001 - raised again by put and close
                self._error = exc
            finally:
                self._budget.give(batch.nbytes)

    def close(self) -> None:
        """Write what was handed over, stop the threads; raise the write that failed."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        for handle in self._handles[1:]:
            handle.close()
        self._budget.close()
        if self._error is not None:
            raise self._error


def _writer_handles(device: vddk_ext.Disk) -> list[vddk_ext.Disk]:
    """`device`, and when it is written past the page cache, up to DIRECT_WRITERS - 1 more
    handles on it (one a writer thread): fewer when the system gives no more."""
    handles = [device]
    try:
        while device.direct and len(handles) < DIRECT_WRITERS:
            handles.append(device.reopen())
    except vddk_ext.DiskError:
        pass
    return handles


def _completed(pool: ThreadPoolExecutor, fn: Callable, work: Iterable[tuple[int, tuple]],
               budget: _Budget) -> Iterator:
    """`fn(*args)` for each `(nbytes, args)` of `work`, results in the order they complete;
    a task holds `nbytes` of `budget` from before it is submitted until it ends, so the
    bytes held at once never pass the cap whatever the number of tasks."""
    done: queue.SimpleQueue[Future] = queue.SimpleQueue()
    outstanding = 0

    def task(nbytes: int, args: tuple) -> object:
        try:
            return fn(*args)
        finally:
            budget.give(nbytes)

    try:
        for nbytes, args in work:
            budget.take(nbytes)
            pool.submit(task, nbytes, args).add_done_callback(done.put)
            outstanding += 1
            while not done.empty():
                outstanding -= 1
                yield done.get().result()
        for _ in range(outstanding):
            yield done.get().result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # stop queued runs: the restore failed
        raise


def restore_disk(repo: Repository, point: PointRecord, key: str, target: Path, *,
                 base: PointRecord | None = None, force: bool = False,
                 progress: Callable[[int], Progress] | None = None,
                 reads: ReadSettings = ReadSettings()) -> RestoreSummary:
    """Restore disk KEY of POINT to a new file, a block device, or (with `base`) onto a file that
    holds BASE's image, writing only the blocks that differ."""
    disk = _disk_of(point, key)
    with repo.lock(SHARED, f"restore {point.vm}"), _exclusive(target):
        onto = base if base is not None and not _onto_needs_whole(target, base, disk, force) \
            else None
        if onto is not None:
            _disk_of(onto, key)  # the base point has the disk
        device, staged = _open_target(target, disk.capacity, onto=base is not None, force=force)
        pause_point("restore.writing")
        try:
            work = _Work(repo, point, disk, fresh=staged is not None, onto=onto)
            summary = _restore_through(repo, point, disk, work, device, target=str(target),
                                       progress=progress, reads=reads)
        except BaseException:
            if staged is not None:  # a half-written new image must not pass for a restore
                staged.unlink(missing_ok=True)
            raise
        finally:
            device.close()
        if staged is not None:
            _publish(staged, target, replace=force)
        return summary


def restore_to_device(repo: Repository, point: PointRecord, key: str, device: vddk_ext.Disk, *,
                      blocks: np.ndarray | None = None, fresh: bool = False, target: str = "",
                      progress: Callable[[int], Progress] | None = None,
                      reads: ReadSettings = ReadSettings()) -> RestoreSummary:
    """Write disk KEY of POINT through an already open `device` (a VDDK disk of a VM, ...):
    the given `blocks`, else every non-zero block when the device reads zero (`fresh`), else
    every block (zero blocks as zeroes). The caller opens, checks and closes the device."""
    disk = _disk_of(point, key)
    with repo.lock(SHARED, f"restore {point.vm}"):
        todo = None if blocks is None else np.unique(np.asarray(blocks, dtype=np.uint64))
        work = _Work(repo, point, disk, fresh=fresh, todo=todo)
        return _restore_through(repo, point, disk, work, device, target=target or device.path,
                                progress=progress, reads=reads)


@dataclass
class _Work:
    """What a restore writes, one window of the disk's map at a time: the given blocks
    (`todo`), else those that differ from `onto`'s image, else the non-ZERO blocks on a
    `fresh` target (which reads zero), else every block."""

    repo: Repository
    point: PointRecord
    disk: DiskRecord
    fresh: bool = False
    todo: np.ndarray | None = None
    onto: PointRecord | None = None
    # the windows `data_bytes` resolved, while they hold at most KEPT_WINDOW_BYTES: `windows`
    # then does not read the maps again (a request and a decryption each)
    _kept: list[tuple[int, np.ndarray, np.ndarray]] | None = field(default=None, init=False,
                                                                   repr=False)

    def windows(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(first block, the window's refs, the window's blocks to write) of each window with
        blocks to write, in block order; the maps are streamed (one window in memory), or
        read once by `data_bytes` for a small disk."""
        if self._kept is not None:
            kept, self._kept = self._kept, None
            yield from kept
            return
        yield from self._resolved()

    def _resolved(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        nblocks, key = self.disk.nblocks, self.disk.key
        if self.todo is not None:
            refs = self.repo.resolve_windows(self.point, key, self.todo)
            for first, (window, _) in zip_windows(nblocks, refs, window_starts(self.todo)):
                lo, hi = np.searchsorted(self.todo, [first, first + len(window)])
                yield first, window, self.todo[lo:hi]
            return
        refs = self.repo.resolve_windows(self.point, key)
        if self.onto is not None:
            below = self.repo.resolve_windows(self.onto, key)
            for first, (window, old) in zip_windows(nblocks, refs, below):
                yield first, window, np.flatnonzero(window != old).astype(np.uint64) + first
        elif self.fresh:
            for first, window in refs:
                yield first, window, np.flatnonzero(window).astype(np.uint64) + first
        else:
            yield from every_window(nblocks, refs)

    def data_bytes(self) -> int:
        """The bytes of non-ZERO blocks to write: a pass over the maps, which also finds a
        damaged map before anything is written; the windows are kept for `windows` while they
        are small."""
        kept: list[tuple[int, np.ndarray, np.ndarray]] | None = []
        held = blocks = 0
        for first, window, todo in self._resolved():
            blocks += int(np.count_nonzero(window[todo - first]))
            held += window.nbytes + todo.nbytes
            kept = kept if kept is not None and held <= KEPT_WINDOW_BYTES else None
            if kept is not None:
                kept.append((first, window, todo))
        self._kept = kept
        return blocks * self.disk.block_size


def every_window(nblocks: int, refs: Iterator[tuple[int, np.ndarray]]
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first block, refs, every block) of each window of a disk of `nblocks` blocks, from the
    `refs` windows of `Repository.resolve_windows`, those the maps do not store too (their
    blocks are ZERO)."""
    every = window_starts(np.arange(0, nblocks, SEGMENT_BLOCKS, dtype=np.uint64))
    for first, (window, _) in zip_windows(nblocks, refs, every):
        yield first, window, np.arange(first, first + len(window), dtype=np.uint64)


def _restore_through(repo: Repository, point: PointRecord, disk: DiskRecord, work: _Work,
                     device: vddk_ext.Disk, *, target: str,
                     progress: Callable[[int], Progress] | None,
                     reads: ReadSettings) -> RestoreSummary:
    """Write the blocks of `work`, window by window, then flush. The blocks are planned and
    written `reads.plan_blocks` at a time, so that the plan's memory does not grow with the
    disk (a chunk that blocks of two slices share is read twice)."""
    started = time.monotonic()
    with _naming(point, disk.key):
        data_bytes = work.data_bytes()
    tick = progress(data_bytes) if progress else None
    with _naming(point, disk.key), _Writeback(device) as writeback:
        blocks = _BlockWriter(device, disk.block_size, writeback, reads.write_queue)
        try:
            writer = _Writer(repo, device, disk, reads, blocks, tick)
            for first, window, todo in work.windows():
                for lo in range(0, len(todo), reads.plan_blocks):
                    with repo.index.reader() as lookup:
                        plan = plan_restore(window, todo[lo:lo + reads.plan_blocks], lookup,
                                            reads, first)
                    writer.write(plan)
        finally:
            blocks.close()
    device.flush()  # also on damage: a device or --onto target keeps every block written
    if writer.damage.blocks:
        raise writer.damage.error(point, disk)
    return RestoreSummary(point.id, disk.key, target, disk.capacity, writer.written,
                          writer.zero_blocks, writer.chunks_read,
                          writer.written * disk.block_size,
                          round(time.monotonic() - started, 3))


@contextmanager
def _naming(point: PointRecord, key: str) -> Iterator[None]:
    """Damage met (a missing block map, an index entry, ...) also names the point and disk."""
    try:
        yield
    except ChainBroken:
        raise  # names the point and disk already, and what to do instead
    except DamageError as exc:
        raise DamageError(f"{exc}; disk {key} of point {point.id[:8]} cannot be restored "
                          f"whole: {_REPAIR}") from None


class _Writer:
    """Main side: plans the runs of one disk's restore, has the workers read and check them and
    the block writer write them, and adds up what was written and the damage met."""

    def __init__(self, repo: Repository, device: vddk_ext.Disk, disk: DiskRecord,
                 reads: ReadSettings, blocks: _BlockWriter, tick: Progress | None) -> None:
        self.repo, self.device, self.disk, self.reads = repo, device, disk, reads
        self.blocks, self.tick = blocks, tick
        self.written = self.zero_blocks = self.chunks_read = 0
        self.damage = _Damage()
        self._names: dict[int, str] = {}

    def write(self, plan: RestorePlan) -> None:
        bs = self.disk.block_size
        for offset, length in blocks_to_extents(plan.zero_blocks, bs, self.disk.capacity):
            self.device.write_zeroes(offset, length)
        reader = _RunReader(self.repo, plan, self.blocks, self.reads.decoders)
        work = [(request.held, (request, self._pack_name(request.pack)))
                for request in _longest_first(plan.requests)]
        damaged: list[int] = []
        with ThreadPoolExecutor(self.reads.in_flight) as pool:
            for done in _completed(pool, reader, work, _Budget(self.reads.memory)):
                self.written += done.blocks
                damaged += done.damaged
                if done.cause:
                    self.damage.causes.setdefault(done.pack, done.cause)
                if self.tick:
                    self.tick(done.blocks * bs)
        if damaged:
            self.damage.blocks.append(plan.blocks_of(np.asarray(damaged, dtype=np.int64)))
        self.zero_blocks += len(plan.zero_blocks)
        self.chunks_read += len(plan.locations)

    def _pack_name(self, number: int) -> str:
        name = self._names.get(number)
        if name is None:
            name = self._names[number] = self.repo.index.pack_info(number).name
        return name


def _longest_first(requests: list[ReadRequest]) -> list[ReadRequest]:
    """`requests` (in pack and offset order) to issue: the packs whose longest request is
    longer first, so that those that end the restore are short (not one long request read and
    decoded by one thread while the other cores idle); each pack's requests in offset order,
    the first one reading the pack's key header with it (begun by a later one, the header
    would cost requests of its own)."""
    longest: dict[int, int] = {}
    for request in requests:
        longest[request.pack] = max(longest.get(request.pack, 0), request.size)
    return sorted(requests, key=lambda r: -longest[r.pack])  # stable: offset order kept


@dataclass
class _Damage:
    """The blocks a restore could not write, and what is wrong with each pack they are in."""

    blocks: list[np.ndarray] = field(default_factory=list)
    causes: dict[str, str] = field(default_factory=dict)

    def error(self, point: PointRecord, disk: DiskRecord) -> RestoreDamaged:
        """One line: the point, the disk, the byte ranges of the disk hit (a few, and a
        count) and the damaged packs."""
        extents = blocks_to_extents(np.sort(np.concatenate(self.blocks)), disk.block_size,
                                    disk.capacity)
        ranges = ", ".join(f"[{o}, {o + n})" for o, n in extents[:SHOWN_RANGES])
        if len(extents) > SHOWN_RANGES:
            ranges += f" and {len(extents) - SHOWN_RANGES} more"
        causes = "; ".join(list(self.causes.values())[:SHOWN_PACKS])
        if len(self.causes) > SHOWN_PACKS:
            causes += f"; and {plural(len(self.causes) - SHOWN_PACKS, 'more damaged pack')}"
        lost = sum(n for _, n in extents)
        return RestoreDamaged(
            f"disk {disk.key} of point {point.id[:8]} ({point.vm}@{point.time}) cannot be "
            f"restored whole: {format_size(lost)} of it in {plural(len(extents), 'byte range')} "
            f"cannot be read, at disk bytes {ranges} ({causes}); {_REPAIR}",
            point.id, disk.key, extents)


class RestoreDamaged(DamageError):
    """Damaged or missing pack data met by a restore; the byte ranges of the disk it hits
    (`[offset, length]` pairs) are in `extents`."""

    def __init__(self, message: str, point: str, disk: str, extents: list[list[int]]) -> None:
        super().__init__(message)
        self.point, self.disk, self.extents = point, disk, extents


class _Writeback:
    """Keeps the disk writing while the restore goes on, so that the final flush finds little
    left and the image does not crowd out the page cache: every WRITEBACK_BYTES written,
    POSIX_FADV_DONTNEED on a second descriptor of a local target starts writing its dirty pages
    back without waiting for them (fdatasync would wait, and flush the disk's cache each time)
    and drops the pages written back already. In the background, never two at once. A target
    written past the page cache (`Disk.direct`: the restore's big writes) has no such pages:
    nothing to do while it is."""

    def __init__(self, device: vddk_ext.Disk) -> None:
        self._fd = os.open(device.path, os.O_RDONLY) if device.kind != "vddk" else -1
        self._pool = ThreadPoolExecutor(1)
        self._pending = 0
        self._running: Future | None = None

    def wrote(self, nbytes: int, handle: vddk_ext.Disk) -> None:
        """`nbytes` more were written through `handle`: asked whether it writes past the page
        cache, not another writer's handle, whose lock is held through that writer's write."""
        self._pending += nbytes
        if self._fd < 0 or self._pending < WRITEBACK_BYTES or handle.direct:
            return
        if self._running is None or self._running.done():
            self._running = self._pool.submit(self._start)
            self._pending = 0

    def _start(self) -> None:
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def __enter__(self) -> "_Writeback":
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)

