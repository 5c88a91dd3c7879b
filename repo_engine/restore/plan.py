"""Steps 1-4 of a restore (see the package doc): what to write and in which order to read it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..repository.index import LOCATION_DTYPE, IndexReader

RUN_BYTES = 8 << 20
# read across a gap between two chunks of a pack rather than seek, when it is this small
MAX_GAP = 256 << 10


@dataclass(frozen=True)
class ReadRun:
    """Chunks of one pack read with one pread: `chunks` rows of LOCATION_DTYPE, which are the
    plan's chunks `first_chunk`, `first_chunk + 1`, ... (their blocks: `RestorePlan.bounds`)."""

    pack: int
    start: int
    end: int
    chunks: np.ndarray
    first_chunk: int


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


def plan_restore(refs: np.ndarray, todo: np.ndarray, lookup: IndexReader) -> RestorePlan:
    """Plan writing `todo` blocks of the resolved map `refs`."""
    todo_refs = refs[todo]
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
                       _read_runs(locations))


def _read_runs(locations: np.ndarray) -> list[ReadRun]:
    runs: list[ReadRun] = []
    if not len(locations):
        return runs
    packs = locations["pack"].astype(np.int64)
    starts = locations["offset"].astype(np.int64)
    ends = starts + locations["stored"]
    first = 0
    for i in range(1, len(locations) + 1):
        if (i == len(locations) or packs[i] != packs[first]
                or ends[i] - starts[first] > RUN_BYTES or starts[i] - ends[i - 1] > MAX_GAP):
            runs.append(ReadRun(int(packs[first]), int(starts[first]), int(ends[i - 1]),
                                locations[first:i], first))
            first = i
    return runs
