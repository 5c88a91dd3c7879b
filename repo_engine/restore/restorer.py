"""Steps 5-6 of a restore (see the package doc): read, verify, decompress and write."""

from __future__ import annotations

import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import vddk_ext

from ..backup.extents import blocks_to_extents
from ..errors import DamageError, PointNotFound, UsageError
from ..repository.blockmap import resize
from ..repository.locks import SHARED
from ..repository.points import DiskRecord, PointRecord
from ..repository.repo import Repository
from ..repository.atomic import fsync_dir
from ..repository.safefile import kind_of
from ..repository.store import ObjectMissing
from .plan import ReadRun, RestorePlan, plan_restore

Progress = Callable[[int], None]
WRITEBACK_BYTES = 256 << 20


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
        device = vddk_ext.open_local(str(target), writable=True)
        if device.capacity < capacity:
            device.close()
            raise UsageError(f"{target} holds {device.capacity} bytes; the disk needs {capacity}")
        return device, None
    if onto:
        if kind != "file":
            raise UsageError(f"--onto target {target} does not exist")
        os.truncate(target, capacity)
        return vddk_ext.open_local(str(target), writable=True), None
    if kind == "file" and not force:
        raise UsageError(f"{target} already exists; use --force to replace it")
    staged = target.with_name(f".{target.name}.restore-{os.getpid()}-{os.urandom(4).hex()}")
    return vddk_ext.open_local(str(staged), writable=True, create_size=capacity), staged


def _publish(staged: Path, target: Path) -> None:
    """Replace `target` by the complete image in one rename (a failed restore leaves the old
    file as it was); the target may have become something else meanwhile: check again."""
    try:
        if _target_kind(target) == "device":
            raise UsageError(f"{target} became a block device during the restore; nothing was "
                             "written to it")
        os.replace(staged, target)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


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


class _RunWriter:
    """Worker side: read one run, check and write its chunks."""

    def __init__(self, repo: Repository, plan: RestorePlan, device: vddk_ext.Disk,
                 block_size: int) -> None:
        self.repo, self.plan, self.device, self.bs = repo, plan, device, block_size
        self._names: dict[int, str] = {}

    def pack_name(self, number: int) -> str:
        name = self._names.get(number)
        if name is None:
            name = self._names[number] = self.repo.index.pack_info(number).name
        return name

    def __call__(self, run: ReadRun, name: str) -> int:
        try:  # one read per run: the planner coalesced it (plan.py)
            span = self.repo.read_chunk_range(name, run.start, run.end - run.start)
        except ObjectMissing:
            raise DamageError(f"pack {name} is missing; {len(run.chunks)} chunks of this "
                              "disk cannot be restored") from None
        view = memoryview(span)
        written = 0
        for i, chunk in enumerate(run.chunks):
            lo = int(chunk["offset"]) - run.start
            blob = view[lo:lo + int(chunk["stored"])]
            data = self.repo.codec.decode(blob, int(chunk["codec"]), int(chunk["raw"]),
                                          chunk["id"].tobytes(),
                                          f"pack {name} chunk ref {int(chunk['ref'])}")
            c = run.first_chunk + i
            blocks = self.plan.blocks_by_chunk[self.plan.bounds[c]:self.plan.bounds[c + 1]]
            self.device.write_blocks(self.bs, blocks, data)
            written += len(blocks)
        return written


def _bounded(pool: ThreadPoolExecutor, fn: Callable, items: list, limit: int) -> Iterator:
    """pool.map with at most `limit` tasks in flight (bounded memory)."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, *item))
        if len(pending) >= limit:
            yield pending.popleft().result()
    for fut in pending:
        yield fut.result()


def restore_disk(repo: Repository, point: PointRecord, key: str, target: Path, *,
                 base: PointRecord | None = None, force: bool = False,
                 progress: Callable[[int], Progress] | None = None) -> RestoreSummary:
    """Restore disk KEY of POINT to a new file, a block device, or (with `base`) onto a file that
    holds BASE's image, writing only the blocks that differ."""
    disk = _disk_of(point, key)
    with repo.lock(SHARED, f"restore {point.vm}"):
        refs = repo.resolve(point, key)
        todo = None
        if base is not None and not _onto_needs_whole(target, base, disk, force):
            base_refs = resize(repo.resolve(base, _disk_of(base, key).key), len(refs))
            todo = np.flatnonzero(refs != base_refs).astype(np.uint64)
        device, staged = _open_target(target, disk.capacity, onto=base is not None, force=force)
        try:
            summary = _restore_through(repo, point, disk, refs, device, todo,
                                       fresh=staged is not None, target=str(target),
                                       progress=progress)
        except BaseException:
            if staged is not None:  # a half-written new image must not pass for a restore
                staged.unlink(missing_ok=True)
            raise
        finally:
            device.close()
        if staged is not None:
            _publish(staged, target)
        return summary


def restore_to_device(repo: Repository, point: PointRecord, key: str, device: vddk_ext.Disk, *,
                      blocks: np.ndarray | None = None, fresh: bool = False, target: str = "",
                      progress: Callable[[int], Progress] | None = None) -> RestoreSummary:
    """Write disk KEY of POINT through an already open `device` (a VDDK disk of a VM, ...):
    the given `blocks`, else every non-zero block when the device reads zero (`fresh`), else
    every block (zero blocks as zeroes). The caller opens, checks and closes the device."""
    disk = _disk_of(point, key)
    with repo.lock(SHARED, f"restore {point.vm}"):
        refs = repo.resolve(point, key)
        todo = None if blocks is None else np.asarray(blocks, dtype=np.uint64)
        return _restore_through(repo, point, disk, refs, device, todo, fresh=fresh,
                                target=target or device.path, progress=progress)


def _restore_through(repo: Repository, point: PointRecord, disk: DiskRecord, refs: np.ndarray,
                     device: vddk_ext.Disk, todo: np.ndarray | None, *, fresh: bool, target: str,
                     progress: Callable[[int], Progress] | None) -> RestoreSummary:
    """Write `todo` blocks (default: every non-ZERO block on a `fresh` zeroed target, else every
    block) of the resolved map `refs`, then flush."""
    started = time.monotonic()
    if todo is None:
        todo = (np.flatnonzero(refs) if fresh else np.arange(len(refs))).astype(np.uint64)
    try:
        with repo.index.reader() as lookup:
            plan = plan_restore(refs, todo, lookup)
        written = _write(repo, plan, device, disk, progress)
    except DamageError as exc:
        raise DamageError(f"{exc}; disk {disk.key} of point {point.id[:8]} cannot be restored "
                          "whole: 'repo-engine scrub --repair' finds all damage and heals what "
                          "the next backup reads again") from None
    device.flush()
    return RestoreSummary(point.id, disk.key, target, disk.capacity, written,
                          len(plan.zero_blocks), len(plan.locations),
                          written * disk.block_size, round(time.monotonic() - started, 3))


def _write(repo: Repository, plan: RestorePlan, device: vddk_ext.Disk, disk: DiskRecord,
           progress: Callable[[int], Progress] | None) -> int:
    for offset, length in blocks_to_extents(plan.zero_blocks, disk.block_size, disk.capacity):
        device.write_zeroes(offset, length)
    tick = progress(plan.data_blocks * disk.block_size) if progress else None
    writer = _RunWriter(repo, plan, device, disk.block_size)
    work = [(run, writer.pack_name(run.pack)) for run in plan.runs]
    workers = max(2, os.cpu_count() or 2)
    written = 0
    with ThreadPoolExecutor(workers) as pool, _Writeback(device) as writeback:
        for count in _bounded(pool, writer, work, workers * 2):
            written += count
            writeback.wrote(count * disk.block_size)
            if tick:
                tick(count * disk.block_size)
    return written


class _Writeback:
    """Starts writing dirty pages of a local target to disk while the restore goes on, so the
    final flush finds little left: an fdatasync on a second descriptor of the same file, run in
    the background every WRITEBACK_BYTES (never two at once)."""

    def __init__(self, device: vddk_ext.Disk) -> None:
        self._fd = os.open(device.path, os.O_RDONLY) if device.kind != "vddk" else -1
        self._pool = ThreadPoolExecutor(1)
        self._pending = 0
        self._running: Future | None = None

    def wrote(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._fd < 0 or self._pending < WRITEBACK_BYTES:
            return
        if self._running is None or self._running.done():
            self._running = self._pool.submit(os.fdatasync, self._fd)
            self._pending = 0

    def __enter__(self) -> "_Writeback":
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)

