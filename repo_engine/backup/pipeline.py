"""The threaded read -> hash -> dedup lookup -> compress stage of a backup.

A reader thread pulls batches from the C read loop (GIL released while it reads); a pool of
workers hashes every non-zero block (keyed BLAKE3), looks its id up in the index and compresses
only chunks the index lacks (BLAKE3 and zstd release the GIL). Results come back in disk order to
the caller's thread, which alone writes packs. Memory is bounded by the queue depth: at most
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
from .source import Batch, BlockDevice

BATCH_BYTES = 4 << 20
# a VDDK disk keeps up to 16 requests of 1 MiB in flight only if a batch holds that many: over a
# network each batch otherwise waits several round trips (bench/README.md, queue depth table)
REMOTE_BATCH_BYTES = 16 << 20
_END = object()


@dataclass
class BlockResult:
    """One batch, hashed: per block its id (None if zero) and, when the index lacked the id and
    `encode` was asked, the stored form."""

    blocks: np.ndarray
    ids: list[bytes | None]
    refs: list[int | None]
    blobs: list[tuple[bytes, int, int] | None]  # (blob, codec, raw length)
    # index hits refused because the ids and refs tables disagreed (stored again instead)
    mismatched: int = 0


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
        zero = bytes(batch.zero)
        count = batch.count
        ids: list[bytes | None] = [None] * count
        refs: list[int | None] = [0] * count
        blobs: list[tuple[bytes, int, int] | None] = [None] * count
        new: list[int] = []
        mismatched = 0
        with self._index.reader() as lookup:
            for k in range(count):
                if zero[k]:
                    continue
                chunk_id = ids[k] = self._codec.chunk_id(batch.block(k))
                if not encode:
                    refs[k] = None
                    continue
                refs[k], wrong = lookup.dedup_ref(chunk_id)
                mismatched += wrong
                if refs[k] is None:
                    new.append(k)
        views = [batch.block(k) for k in new]
        for k, view, (blob, codec) in zip(new, views, self._codec.encode_many(views)):
            blobs[k] = (blob, codec, len(view))
        return BlockResult(blocks, ids, refs, blobs, mismatched)

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
