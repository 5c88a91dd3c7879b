"""The repository side of a backup: dedup against the chunks this run already wrote, hand new
chunks to a background pack writer that seals each full pack and hands it to a few upload
threads, which publish it; a thread of its own then commits published packs to the index (write
order steps 1 and 2), so that no upload waits for a commit's requests. Writing,
hashing and publishing packs overlap the reading; several packs upload at once (object storage
answers each PUT slowly, but many in parallel), at most UPLOADS of them, so the spool holds at
most UPLOADS + 1 pack files. Published packs are indexed INDEX_BATCH at a time, the rest when
the backup flushes: on a shared repository each index commit is a journal entry, a few
requests (lease checks, catch-up, the conditional PUT), so fewer commits mean fewer requests."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from ..pause import pause_point
from ..repository.packs import FinishedPack, PackWriter, SealedPack
from ..repository.repo import Repository

REF_RESERVATION = 4096
UPLOADS = 3  # packs published at once; the pack writer waits for a free slot
INDEX_BATCH = UPLOADS  # published packs indexed in one commit
# dicts of the packs handed over last: workers may have looked ids up before those packs'
# index commits (a miss here only costs a duplicate chunk, never correctness); not indexed yet
# are: one sealed waiting for a slot, UPLOADS being published, up to INDEX_BATCH - 1 waiting
# for their batch and a batch being committed (more only while a slow commit holds them up)
RECENT_PACKS = 1 + UPLOADS + 2 * INDEX_BATCH
# chunks queued for the pack writer: when uploads are what limits a backup, this queue is full
# and its bytes are resident, so it is kept small (the pack writer itself never waits long);
# each chunk compressed by zstd also keeps the whole output buffer of its batch resident
QUEUE_BYTES = 8 << 20
# chunks go to the pack writer in lists of about this many stored bytes: one queue hand-over
# (lock, notify, thread wake-up, all under the GIL) per list instead of per chunk
HANDOVER_BYTES = 1 << 20
_ROLL, _STOP = "roll", "stop"


class _Indexer:
    """Commits published packs to the index, INDEX_BATCH or more at a time (on a shared
    repository: one journal entry, a few requests), one commit at a time in a thread of its own:
    the upload thread that published the last pack of a batch goes on to the next pack instead
    of waiting for the commit; `commit` takes the rest. A failed commit is handed to `fail`."""

    def __init__(self, repo: Repository, fail: Callable[[BaseException], None]) -> None:
        self._repo, self._fail = repo, fail
        self._committing = threading.Lock()
        self._waiting = threading.Lock()
        self._published: list[FinishedPack] = []
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="pack-index")
        self._commits: list[Future] = []

    def add(self, pack: FinishedPack) -> None:
        """Note a published pack; have the packs waiting committed once there are INDEX_BATCH."""
        with self._waiting:
            self._published.append(pack)
            if len(self._published) < INDEX_BATCH:
                return
            self._commits = [f for f in self._commits if not f.done()]
            self._commits.append(self._thread.submit(self._commit_batch))

    def _commit_batch(self) -> None:
        try:
            self.commit()
        except BaseException as exc:  # re-raised in the backup's thread
            self._fail(exc)

    def wait(self) -> None:
        """Until the commits handed to the thread so far have ended."""
        with self._waiting:
            commits = list(self._commits)
        wait(commits)

    def shut_down(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)

    def commit(self) -> None:
        """Commit every pack noted and not indexed yet (a concurrent call may take some)."""
        with self._committing:
            with self._waiting:
                batch, self._published = self._published, []
            if batch:
                self._repo.index_packs(batch)


class _PackSink(threading.Thread):
    """Writes queued chunks into packs; on a roll request seals the pack and has it published
    and indexed by the upload threads."""

    def __init__(self, repo: Repository, depth: int) -> None:
        super().__init__(name="pack-writer", daemon=True)
        self._repo = repo
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.discard = False
        self._writer: PackWriter | None = None
        self._slots = threading.Semaphore(UPLOADS)
        self._uploads = ThreadPoolExecutor(UPLOADS, thread_name_prefix="pack-upload")
        self._pending: list[Future] = []
        self._indexer = _Indexer(repo, self._fail)

    def run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item == _STOP:
                    return
                if self.error is None and not self.discard:
                    self._handle(item)
            except BaseException as exc:  # re-raised in the backup's thread
                self._fail(exc)
                self._abort_pack()
            finally:
                self.queue.task_done()
                if item == _STOP:
                    self._abort_pack()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:  # the first failure is the cause; later ones follow from it
            self.error = exc

    def _handle(self, item: list[tuple] | str) -> None:
        if item == _ROLL:
            if self._writer is not None:
                writer, self._writer = self._writer, None
                self._submit(writer.seal())
            return
        if self._writer is None:
            self._writer = self._repo.pack_writer()
        for chunk in item:
            self._writer.add(*chunk)

    def _submit(self, sealed: SealedPack) -> None:
        self._slots.acquire()  # blocks while UPLOADS packs are being published
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._uploads.submit(self._publish, sealed))

    def _publish(self, sealed: SealedPack) -> None:
        """In an upload thread: the pack durable in the store, then noted for the index."""
        try:
            if self.error is not None or self.discard:
                sealed.discard()  # the backup failed or ends: no point will name it
                return
            published = sealed.publish(self._repo.store)
            # durable, and named by no journal entry yet: gc finds it in no cache
            pause_point("backup.packs_published")
            self._indexer.add(published)
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._slots.release()

    def wait_uploads(self) -> None:
        """Wait for every pack submitted so far to be published (or to fail), then index those
        not indexed yet; call with the pack writer idle (its queue joined)."""
        wait(self._pending)
        self._pending = []
        self._indexer.wait()
        if self.error is None:
            self._indexer.commit()

    def shut_down(self) -> None:
        """Stop the pack writer and the upload threads; packs not uploaded yet are dropped."""
        self.discard = True
        if self.is_alive():
            self.queue.put(_STOP)
            self.join()
        self._uploads.shutdown(wait=True)
        self._indexer.shut_down()

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

    def roll(self) -> None:
        """Hand the open pack to the uploads now (the next chunk starts a new one)."""
        if self._open:
            self._roll()

    def flush(self) -> None:
        """Publish the open pack; returns once every chunk handed over is durable and indexed."""
        self.roll()
        self._sink.queue.join()
        self._sink.wait_uploads()
        if self._sink.error is not None:
            raise self._sink.error

    def close(self) -> None:
        """Stop the pack writer; chunks not flushed are discarded."""
        self._sink.shut_down()
