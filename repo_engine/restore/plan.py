"""Steps 1-4 of a restore (see the package doc): what to write and in which order to read it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from ..repository.index import IndexReader
from ..repository.index_records import LOCATION_DTYPE
from ..repository.packs import read_spans
from ..units import MIB


@dataclass(frozen=True)
class ReadSettings:
    """How a restore reads packs. On object storage each request costs a round trip of
    milliseconds and a share of both sides' CPU: requests are coalesced and long, several are
    outstanding at once, and a worker decodes a request's chunks as they arrive, a run at a
    time, so that memory does not grow with the request; a local store reads the same way (a
    pread per run, several threads)."""

    in_flight: int = 8  # requests outstanding at once (one thread each)
    max_request: int = 64 * MIB  # bytes one request may span (one chunk larger than this: alone)
    # bytes of a request a worker holds at once: a run (or one chunk); reading a piece takes
    # twice that for a moment (the HTTP client's buffer and its copy)
    max_read: int = 2 * MIB
    # two chunks of a pack separated by at most this many bytes are read with one request: the
    # gap costs less than another round trip (on object storage some 30 ms, in which a
    # connection brings a few MB; a local store's reader passes over the gap without reading it)
    max_gap: int = 1 * MIB
    # runs decoded (opened, decompressed, hashed) at once: that is CPU work, and more threads at
    # it than cores only contend for the GIL; the other requests in flight wait with their data
    decoders: int = field(default_factory=lambda: os.cpu_count() or 2)
    # bytes of runs read and whose chunks are not checked yet, counting for each request in
    # flight its largest run; with the defaults every worker may hold a run of the largest size
    memory: int = 32 * MIB
    # decoded bytes handed to the writer and not yet written (on top of `memory`)
    write_queue: int = 8 * MIB
    # blocks planned at once: a plan takes some 200 bytes per block at its peak (chunk
    # locations, sorting), so this bounds it whatever the disk's size
    plan_blocks: int = 1 << 17

    def __post_init__(self) -> None:
        if (min(self.in_flight, self.max_request, self.max_read, self.plan_blocks,
                self.write_queue, self.decoders) < 1 or self.max_gap < 0):
            raise UsageError(f"restore reads: need in_flight, max_request, max_read, plan_blocks, "
                             f"write_queue and decoders >= 1 and max_gap >= 0 (got {self})")
        if self.memory < min(self.max_read, self.max_request):
            raise UsageError(f"restore reads: the memory cap ({self.memory} bytes) must hold one "
                             f"run of the smaller of max_read and max_request ({self.max_read}, "
                             f"{self.max_request} bytes)")


@dataclass(frozen=True)
class ReadRun:
    """Chunks of one pack read at once, bytes [start, end) of it: `chunks` rows of
    LOCATION_DTYPE, which are the plan's chunks `first_chunk`, `first_chunk + 1`, ... (their
    blocks: `RestorePlan.bounds`)."""

    pack: int
    start: int
    end: int
    chunks: np.ndarray
    first_chunk: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ReadRequest:
    """Runs of one pack read with one request, in order; the gaps between them are read and
    dropped."""

    pack: int
    runs: list[ReadRun]

    @property
    def start(self) -> int:
        return self.runs[0].start

    @property
    def size(self) -> int:
        return self.runs[-1].end - self.start

    @property
    def held(self) -> int:
        """The most bytes of the request its reader holds at once: its largest run."""
        return max(run.size for run in self.runs)


@dataclass(frozen=True)
class RestorePlan:
    zero_blocks: np.ndarray       # blocks to make zero (holes or zero writes)
    locations: np.ndarray         # unique chunks, sorted by (pack, offset)
    blocks_by_chunk: np.ndarray   # block numbers grouped by chunk, in `locations` order
    bounds: np.ndarray            # chunk i fills blocks_by_chunk[bounds[i]:bounds[i+1]]
    requests: list[ReadRequest]

    @property
    def data_blocks(self) -> int:
        return len(self.blocks_by_chunk)

    def blocks_of(self, chunks: np.ndarray) -> np.ndarray:
        """The blocks that the plan's chunks numbered `chunks` fill, sorted."""
        hit = np.zeros(len(self.locations), dtype=bool)
        hit[chunks] = True
        return np.sort(self.blocks_by_chunk[np.repeat(hit, np.diff(self.bounds))])


def plan_restore(refs: np.ndarray, todo: np.ndarray, lookup: IndexReader,
                 reads: ReadSettings, first: int = 0) -> RestorePlan:
    """Plan writing `todo` blocks of the resolved map window `refs`, which starts at block
    `first`."""
    todo_refs = refs[(todo - np.uint64(first)).astype(np.int64)]
    is_zero = todo_refs == 0
    data_blocks, data_refs = todo[~is_zero], todo_refs[~is_zero]
    unique, inverse = np.unique(data_refs, return_inverse=True)
    locations = lookup.locate(unique) if len(unique) else np.empty(0, LOCATION_DTYPE)
    order = np.lexsort((locations["offset"], locations["pack"]))
    locations = locations[order]
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    chunk_of_block = rank[inverse]
    grouping = np.argsort(chunk_of_block, kind="stable")
    counts = np.bincount(chunk_of_block, minlength=len(locations))
    bounds = np.concatenate(([0], np.cumsum(counts)))
    return RestorePlan(todo[is_zero], locations, data_blocks[grouping], bounds,
                       read_requests(locations, reads))


def read_requests(locations: np.ndarray, reads: ReadSettings) -> list[ReadRequest]:
    """Cut chunks sorted by (pack, offset) into requests (`packs.read_spans`): a request stays
    within one pack, spans no gap larger than `max_gap` and at most `max_request` bytes (or one
    chunk); then each request into runs of at most `max_read` bytes (or one chunk)."""
    packs = locations["pack"].astype(np.int64)
    starts = locations["offset"].astype(np.int64)
    ends = starts + locations["stored"]
    requests = []
    for first, last in read_spans(packs, starts, ends, reads.max_gap, reads.max_request):
        pieces = read_spans(packs[first:last], starts[first:last], ends[first:last],
                            reads.max_gap, reads.max_read)
        runs = [ReadRun(int(packs[first]), int(starts[first + lo]), int(ends[first + hi - 1]),
                        locations[first + lo:first + hi], first + lo) for lo, hi in pieces]
        requests.append(ReadRequest(int(packs[first]), runs))
    return requests
