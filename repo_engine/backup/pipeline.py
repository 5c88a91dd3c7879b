"""The threaded read -> hash -> dedup lookup -> compress stage of a backup.

A reader thread pulls batches from the C read loop (GIL released while it reads); a pool of
workers hashes every non-zero block (keyed BLAKE3), looks its id up in the index (duplicates in
runs, by locality: repository/locality.py) and compresses only chunks the index lacks (BLAKE3
and zstd release the GIL). Results come back in disk order to the caller's thread, which alone
writes packs. Memory is bounded by the queue depth: at most
`depth` batches are in flight.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import SourceError
from ..repository.chunks import ChunkCodec
from ..repository.index import Index
from ..repository.locality import dedup_refs
from .source import Batch, BlockDevice

BATCH_BYTES = 4 << 20
# a VDDK disk keeps up to 16 requests of 1 MiB in flight only if a batch holds that many: over a
# network each batch otherwise waits several round trips (bench/README.md, queue depth table)
REMOTE_BATCH_BYTES = 16 << 20
_END = object()


@dataclass
class BlockResult:
    """One batch, hashed: per block its id (None if zero) and `zero` (True if zero: the Nones as
    a mask); with `encode`, per block the ref of the index's copy (0 when zero or not indexed),
    and the non-zero blocks the index lacks (`missing`, in disk order) with their stored forms
    (`blobs`, aligned with `missing`)."""

    blocks: np.ndarray
    ids: list[bytes | None]
    zero: np.ndarray
    refs: np.ndarray
    missing: list[int]
    blobs: list[tuple[bytes | memoryview, int, int]]  # (blob, codec, raw length)
    # index hits refused because the ids and refs tables disagreed (stored again instead)
    mismatched: int = 0

    @property
    def zeros(self) -> int:
        return int(self.zero.sum())


def _reader_thread(device: BlockDevice, block_size: int, blocks: np.ndarray, out: queue.Queue,
                   stop: threading.Event, describe: str) -> None:
    try:
        batch_bytes = REMOTE_BATCH_BYTES if device.kind == "vddk" else BATCH_BYTES
        for batch in device.reader(block_size, blocks, batch_bytes=max(batch_bytes, block_size)):
            while not stop.is_set():
                try:
                    out.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        out.put(_END)
    except OSError as exc:
        out.put(SourceError(f"reading {describe} failed: {exc.strerror or exc}"))
    except BaseException as exc:  # handed to the consumer, which re-raises it
        out.put(exc)


class BlockPipeline:
    def __init__(self, codec: ChunkCodec, index: Index, *, workers: int | None = None) -> None:
        self._codec = codec
        self._index = index
        self._workers = workers or max(2, os.cpu_count() or 2)

    def _hash_batch(self, batch: Batch, encode: bool) -> BlockResult:
        blocks = np.frombuffer(batch.blocks, dtype=np.uint64).copy()
        count = batch.count
        zero = np.frombuffer(batch.zero, dtype=np.uint8)[:count] != 0
        nonzero = np.flatnonzero(~zero).tolist()
        chunk_id, block = self._codec.chunk_id, batch.block
        ids: list[bytes | None] = [None] * count
        for k in nonzero:
            ids[k] = chunk_id(block(k))
        refs = np.zeros(count, dtype=np.uint64)
        if not encode:
            return BlockResult(blocks, ids, zero, refs, [], [])
        missing, hit_at, hit_refs, mismatched = self._lookup(ids, nonzero)
        refs[hit_at] = hit_refs
        views = [block(k) for k in missing]
        blobs = [(blob, codec, len(view))
                 for view, (blob, codec) in zip(views, self._codec.encode_many(views))]
        return BlockResult(blocks, ids, zero, refs, missing, blobs, mismatched)

    def _lookup(self, ids: list[bytes | None], nonzero: list[int]
                ) -> tuple[list[int], list[int], list[int], int]:
        """(blocks the index lacks, blocks it holds, their refs, refused hits) of `nonzero`."""
        missing: list[int] = []
        hit_at: list[int] = []
        hit_refs: list[int] = []
        with self._index.reader() as lookup:
            # ids the id filter says the index surely lacks cost no index page (idfilter.py)
            absent = lookup.surely_absent([ids[k] for k in nonzero])  # type: ignore[misc]
            skips = absent.tolist() if absent is not None else [False] * len(nonzero)
            asked = [k for k, skip in zip(nonzero, skips) if not skip]
            # duplicates found in runs of neighbouring refs, in this one read transaction
            refs, mismatched = dedup_refs(lookup, [ids[k] for k in asked])  # type: ignore[misc]
        found = dict(zip(asked, refs))
        for k in nonzero:
            ref = found.get(k)
            if ref is None:
                missing.append(k)
            else:
                hit_at.append(k)
                hit_refs.append(ref)
        return missing, hit_at, hit_refs, mismatched

    def run(self, device: BlockDevice, block_size: int, blocks: np.ndarray, *, encode: bool,
            describe: str, progress: Callable[[int], None] | None = None) -> Iterator[BlockResult]:
        """Yield hashed batches of `blocks` in order."""
        depth = self._workers * 2
        batches: queue.Queue = queue.Queue(maxsize=depth)
        stop = threading.Event()
        thread = threading.Thread(
            target=_reader_thread, args=(device, block_size, blocks, batches, stop, describe),
            daemon=True)
        pending: deque[Future[BlockResult]] = deque()
        thread.start()
        try:
            with ThreadPoolExecutor(self._workers) as pool:
                yield from self._drive(pool, batches, pending, depth, encode, block_size, progress)
        finally:
            stop.set()
            for fut in pending:
                fut.cancel()
            thread.join()

    def _drive(self, pool: ThreadPoolExecutor, batches: queue.Queue,
               pending: deque[Future[BlockResult]], depth: int, encode: bool, block_size: int,
               progress: Callable[[int], None] | None) -> Iterator[BlockResult]:
        while True:
            item = batches.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            pending.append(pool.submit(self._hash_batch, item, encode))
            del item
            while len(pending) >= depth or (pending and pending[0].done()):
                yield _finished(pending.popleft(), block_size, progress)
        while pending:
            yield _finished(pending.popleft(), block_size, progress)


def _finished(future: Future[BlockResult], block_size: int,
              progress: Callable[[int], None] | None) -> BlockResult:
    result = future.result()
    if progress:
        progress(len(result.blocks) * block_size)
    return result
