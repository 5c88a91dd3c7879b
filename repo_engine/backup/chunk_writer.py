"""The repository side of a backup: dedup against the chunks this run already wrote, hand new
chunks to a background pack writer that publishes each full pack and commits it to the index
(write order steps 1 and 2), so that writing, hashing and fsyncing packs overlaps the reading."""

from __future__ import annotations

import queue
import threading
from collections import deque

from ..repository.packs import PackWriter
from ..repository.repo import Repository

REF_RESERVATION = 4096
# dicts of the packs handed over last: workers may have looked ids up before those packs'
# index commits (a miss here only costs a duplicate chunk, never correctness)
RECENT_PACKS = 3
QUEUE_BYTES = 32 << 20
# chunks go to the pack writer in lists of about this many stored bytes: one queue hand-over
# (lock, notify, thread wake-up, all under the GIL) per list instead of per chunk
HANDOVER_BYTES = 1 << 20
_ROLL, _STOP = "roll", "stop"


class _PackSink(threading.Thread):
    """Writes queued chunks into packs; on a roll request publishes the pack and indexes it."""

    def __init__(self, repo: Repository, depth: int) -> None:
        super().__init__(name="pack-writer", daemon=True)
        self._repo = repo
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.discard = False
        self._writer: PackWriter | None = None

    def run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item == _STOP:
                    return
                if self.error is None and not self.discard:
                    self._handle(item)
            except BaseException as exc:  # re-raised in the backup's thread
                self.error = exc
                self._abort_pack()
            finally:
                self.queue.task_done()
                if item == _STOP:
                    self._abort_pack()

    def _handle(self, item: list[tuple] | str) -> None:
        if item == _ROLL:
            if self._writer is not None:
                writer, self._writer = self._writer, None
                self._repo.commit_pack(writer)
            return
        if self._writer is None:
            self._writer = self._repo.pack_writer()
        for chunk in item:
            self._writer.add(*chunk)

    def _abort_pack(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


class ChunkWriter:
    """Turns (id, encoded blob) into refs; one per backup run, called from one thread."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        # a list holds at most HANDOVER_BYTES plus one chunk
        self._sink = _PackSink(repo, max(4, QUEUE_BYTES // (HANDOVER_BYTES + repo.config.block_size)))
        self._sink.start()
        self._open: dict[bytes, int] = {}
        self._open_bytes = 0
        self._handover: list[tuple] = []  # chunks not handed to the pack writer yet
        self._handover_bytes = 0
        self._recent: deque[dict[bytes, int]] = deque(maxlen=RECENT_PACKS)
        self._refs = iter(())  # fresh refs reserved, not handed out yet
        self.new_chunks = self.new_raw = self.new_stored = self.packs = 0

    def known(self, chunk_id: bytes) -> int | None:
        """A ref for a chunk this run already wrote, else None."""
        ref = self._open.get(chunk_id)
        if ref is None:
            for recent in self._recent:
                ref = recent.get(chunk_id)
                if ref is not None:
                    break
        return ref

    def _allocate_ref(self) -> int:
        """The next fresh ref; reserved when this run stores its first new chunk (a shared
        repository claims its range through the journal) and whenever the range runs out."""
        ref = next(self._refs, None)
        if ref is None:
            self._refs = iter(self._repo.reserve_refs(REF_RESERVATION))
            ref = next(self._refs)
        return ref

    def _put(self, item: list[tuple] | str) -> None:
        if self._sink.error is not None:
            raise self._sink.error
        self._sink.queue.put(item)

    def add(self, chunk_id: bytes, blob: bytes | memoryview, codec: int, raw_len: int) -> int:
        """Store a new chunk; returns its ref."""
        ref = self._allocate_ref()
        self._handover.append((ref, chunk_id, blob, raw_len, codec))
        self._handover_bytes += len(blob)
        if self._handover_bytes >= HANDOVER_BYTES:
            self._hand_over()
        self._open[chunk_id] = ref
        self._open_bytes += len(blob)
        self.new_chunks += 1
        self.new_raw += raw_len
        self.new_stored += len(blob)
        if self._open_bytes >= self._repo.config.pack_size:
            self._roll()
        return ref

    def _hand_over(self) -> None:
        if self._handover:
            self._put(self._handover)
            self._handover, self._handover_bytes = [], 0

    def _roll(self) -> None:
        self._hand_over()
        self._put(_ROLL)
        self._recent.append(self._open)
        self._open, self._open_bytes = {}, 0
        self.packs += 1

    def flush(self) -> None:
        """Publish the open pack; returns once every chunk handed over is durable and indexed."""
        if self._open:
            self._roll()
        self._sink.queue.join()
        if self._sink.error is not None:
            raise self._sink.error

    def close(self) -> None:
        """Stop the pack writer; chunks not flushed are discarded."""
        if self._sink.is_alive():
            self._sink.discard = True
            self._sink.queue.put(_STOP)
            self._sink.join()
