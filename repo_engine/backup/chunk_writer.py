"""The repository side of a backup: dedup against the index and the open packs, write new chunks
to packs, publish each full pack and commit it to the index (write order steps 1 and 2)."""

from __future__ import annotations

from ..repository.packs import PackWriter
from ..repository.repo import Repository

REF_RESERVATION = 4096


class ChunkWriter:
    """Turns (id, encoded blob) into refs; one per backup run, used from one thread."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self._writer: PackWriter | None = None
        self._open: dict[bytes, int] = {}
        # chunks of the pack published last: workers looked them up before its index commit
        self._recent: dict[bytes, int] = {}
        self._next_ref = self._ref_limit = 0
        self.new_chunks = self.new_raw = self.new_stored = self.packs = 0

    def known(self, chunk_id: bytes) -> int | None:
        """A ref for a chunk this run already wrote, else None."""
        ref = self._open.get(chunk_id)
        return ref if ref is not None else self._recent.get(chunk_id)

    def _allocate_ref(self) -> int:
        if self._next_ref == self._ref_limit:
            self._next_ref = self._repo.index.reserve_refs(REF_RESERVATION)
            self._ref_limit = self._next_ref + REF_RESERVATION
        ref = self._next_ref
        self._next_ref += 1
        return ref

    def add(self, chunk_id: bytes, blob: bytes, codec: int, raw_len: int) -> int:
        """Store a new chunk; returns its ref."""
        if self._writer is None:
            self._writer = self._repo.pack_writer()
        ref = self._allocate_ref()
        self._writer.add(ref, chunk_id, blob, raw_len, codec)
        self._open[chunk_id] = ref
        self.new_chunks += 1
        self.new_raw += raw_len
        self.new_stored += len(blob)
        if self._writer.size >= self._repo.config.pack_size:
            self.flush()
        return ref

    def flush(self) -> None:
        """Publish the open pack and commit it to the index."""
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        self._repo.commit_pack(writer)
        self._recent, self._open = self._open, {}
        self.packs += 1

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
