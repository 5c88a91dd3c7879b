"""Helpers of the restore tests: a store that watches the reads a restore issues, backups and
restores through the Python API, and the disk byte ranges a damaged pack must cost a restore
(worked out from the index, apart from the restore's own bookkeeping)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from repo_engine.backup.extents import blocks_to_extents
from repo_engine.backup.job import BackupOptions, backup_vm
from repo_engine.repository.packs import pack_object
from repo_engine.repository.points import PointRecord
from repo_engine.repository.repo import Repository
from repo_engine.repository.store import RangeReader, Store
from repo_engine.sources.image import ImageDisk, image_snapshot


class TrackedBytes(bytes):
    """Bytes a watched store returned; they tell the store when they are freed (CPython frees
    an object as its last reference goes), so the store knows the read bytes still held."""

    watcher: "WatchedStore"

    def __del__(self) -> None:
        self.watcher.freed(len(self))


class WatchedStore:
    """A store whose reads (`get_range` calls and `open_range` range reads) count the most
    outstanding at once and the most bytes returned that are still held by the reader. The
    first `gather` reads wait until that many are outstanding together: a restore that does not
    issue that many at once fails (BrokenBarrierError after `timeout`) instead of passing by
    luck of the scheduler. `before_read(n)` runs before the n-th read (1, 2, ...), to inject
    faults mid-restore."""

    def __init__(self, inner: Store, *, gather: int = 1, timeout: float = 30.0,
                 before_read: Callable[[int], None] | None = None) -> None:
        self.inner = inner
        self.calls = self.outstanding = self.most_outstanding = 0
        self.held = self.most_held = 0
        self._lock = threading.Lock()
        self._gather, self._barrier = gather, threading.Barrier(gather, timeout=timeout)
        self._before_read = before_read

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        self._opened()
        try:
            return self.track(self.inner.get_range(name, offset, length))
        finally:
            self.closed()

    def open_range(self, name: str, offset: int, length: int) -> "WatchedRange":
        """A range read counts as outstanding from its opening to its closing."""
        self._opened()
        try:
            return WatchedRange(self, self.inner.open_range(name, offset, length))
        except BaseException:
            self.closed()
            raise

    def _opened(self) -> None:
        with self._lock:
            self.calls += 1
            call = self.calls
            self.outstanding += 1
            self.most_outstanding = max(self.most_outstanding, self.outstanding)
        if self._before_read:
            self._before_read(call)
        if call <= self._gather:
            self._barrier.wait()

    def closed(self) -> None:
        with self._lock:
            self.outstanding -= 1

    def track(self, data: bytes) -> TrackedBytes:
        tracked = TrackedBytes(data)
        tracked.watcher = self
        self.hold(len(tracked))
        return tracked

    def hold(self, nbytes: int) -> None:
        with self._lock:
            self.held += nbytes
            self.most_held = max(self.most_held, self.held)

    def freed(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes


class WatchedRange:
    """A range read of a WatchedStore: the bytes it returns are tracked; so is the largest
    buffer read into, as held until the range is closed (the reader's buffer for it)."""

    def __init__(self, store: WatchedStore, inner: RangeReader) -> None:
        self.store, self.inner = store, inner
        self._buffer = 0

    @property
    def position(self) -> int:
        return self.inner.position

    def read(self, n: int) -> bytes:
        return self.store.track(self.inner.read(n))

    def read_into(self, view: memoryview) -> None:
        self.inner.read_into(view)
        buffer = memoryview(view.obj).nbytes
        if buffer > self._buffer:
            self.store.hold(buffer - self._buffer)
            self._buffer = buffer

    def skip(self, n: int) -> None:
        self.inner.skip(n)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None
            self.store.freed(self._buffer)
            self.store.closed()

    def __enter__(self) -> "WatchedRange":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def backup_image(repo: Repository, vm: str, image: Path, changed: Path | None = None
                 ) -> PointRecord:
    return backup_vm(repo, image_snapshot(vm, [ImageDisk("sda", image, changed)]),
                     BackupOptions())


def pack_of_block(repo: Repository, point: PointRecord, block: int) -> str:
    """The name of the pack holding block `block` of disk sda of `point`."""
    with repo.index.reader() as lookup:
        ref = repo.resolve(point, "sda")[block:block + 1]
        return repo.index.pack_info(int(lookup.locate(ref)[0]["pack"])).name


def _uses_of(repo: Repository, point: PointRecord, pack: str) -> tuple[np.ndarray, np.ndarray]:
    """The blocks of disk sda of `point` whose chunk is in `pack`, and those chunks'
    LOCATION_DTYPE rows (one per block)."""
    refs = repo.resolve(point, "sda")
    blocks = np.flatnonzero(refs)
    with repo.index.reader() as lookup:
        where = lookup.locate(refs[blocks])
    numbers = {int(n) for n in np.unique(where["pack"])
               if repo.index.pack_info(int(n)).name == pack}
    in_pack = np.isin(where["pack"], list(numbers))
    return blocks[in_pack], where[in_pack]


def damage_pack(kind: str, repo: Repository, store: Store, point: PointRecord,
                pack: str) -> list[list[int]]:
    """Damage `pack` in `store` ("delete" it, "truncate" it to half, "flip" a byte of one chunk
    that `point` uses) and return the byte ranges of disk sda of `point` this loses."""
    blocks, chunks = _uses_of(repo, point, pack)
    name = pack_object(pack)
    data = bytearray(store.get(name, limit=1 << 30))
    store.delete([name])
    if kind == "delete":
        lost = np.ones(len(chunks), dtype=bool)
    elif kind == "truncate":
        lost = chunks["offset"] + chunks["stored"] > len(data) // 2
        store.put(name, bytes(data[:len(data) // 2]))
    else:
        victim = chunks[len(chunks) // 2]
        data[int(victim["offset"]) + int(victim["stored"]) // 2] ^= 0xFF
        lost = chunks["ref"] == victim["ref"]
        store.put(name, bytes(data))
    disk = point.disk("sda")
    return blocks_to_extents(blocks[lost].astype(np.uint64), disk.block_size, disk.capacity)
