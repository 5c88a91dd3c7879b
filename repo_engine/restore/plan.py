"""Steps 1-4 of a restore (see the package doc): what to write and in which order to read it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..repository.index import LOCATION_DTYPE, IndexReader
from ..repository.packs import read_spans
from ..units import MIB


@dataclass(frozen=True)
class ReadSettings:
    """How a restore reads packs. On object storage each request costs a round trip of
    milliseconds: requests are coalesced and several are outstanding at once; a local store
    reads the same way (a pread per request, several threads)."""

    in_flight: int = 8  # requests outstanding at once (one thread each)
    max_request: int = 4 * MIB  # bytes one request may span (one chunk larger than this: alone)
    # two chunks of a pack separated by at most this many bytes are read with one request: the
    # gap costs less than another round trip
    max_gap: int = 256 << 10
    # bytes of requests issued whose chunks are not checked yet; with the defaults every
    # request in flight may be of the largest size
    memory: int = 32 * MIB
    # decoded bytes handed to the writer and not yet written (on top of `memory`)
    write_queue: int = 8 * MIB
    # blocks planned at once: a plan takes some 200 bytes per block at its peak (chunk
    # locations, sorting), so this bounds it whatever the disk's size
    plan_blocks: int = 1 << 17

    def __post_init__(self) -> None:
        if (min(self.in_flight, self.max_request, self.plan_blocks, self.write_queue) < 1
                or self.max_gap < 0):
            raise UsageError(f"restore reads: need in_flight, max_request, plan_blocks and "
                             f"write_queue >= 1 and max_gap >= 0 (got {self})")
        if self.memory < self.max_request:
            raise UsageError(f"restore reads: the memory cap ({self.memory} bytes) must hold one "
                             f"request of max_request ({self.max_request} bytes)")


@dataclass(frozen=True)
class ReadRun:
    """Chunks of one pack read with one request: `chunks` rows of LOCATION_DTYPE, which are the
    plan's chunks `first_chunk`, `first_chunk + 1`, ... (their blocks: `RestorePlan.bounds`)."""

    pack: int
    start: int
    end: int
    chunks: np.ndarray
    first_chunk: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class RestorePlan:
    zero_blocks: np.ndarray       # blocks to make zero (holes or zero writes)
    locations: np.ndarray         # unique chunks, sorted by (pack, offset)
    blocks_by_chunk: np.ndarray   # block numbers grouped by chunk, in `locations` order
    bounds: np.ndarray            # chunk i fills blocks_by_chunk[bounds[i]:bounds[i+1]]
    runs: list[ReadRun]

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
                       read_runs(locations, reads))


def read_runs(locations: np.ndarray, reads: ReadSettings) -> list[ReadRun]:
    """Cut chunks sorted by (pack, offset) into requests (`packs.read_spans`): a request stays
    within one pack, spans no gap larger than `max_gap` and at most `max_request` bytes (or one
    chunk)."""
    packs = locations["pack"].astype(np.int64)
    starts = locations["offset"].astype(np.int64)
    ends = starts + locations["stored"]
    return [ReadRun(int(packs[first]), int(starts[first]), int(ends[last - 1]),
                    locations[first:last], first)
            for first, last in read_spans(packs, starts, ends, reads.max_gap, reads.max_request)]
