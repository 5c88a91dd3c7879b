"""Compare two restore points of a disk block by block."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backup.extents import blocks_to_extents
from ..repository.blockmap import zip_windows
from ..repository.points import PointRecord
from ..repository.repo import Repository


@dataclass
class DiskDiff:
    disk: str
    capacity_a: int | None
    capacity_b: int | None
    changed_blocks: int
    changed_bytes: int
    extents: list[list[int]]


def diff_points(repo: Repository, a: PointRecord, b: PointRecord) -> list[DiskDiff]:
    """Per disk key of either point: the blocks whose content differs from a to b."""
    keys = sorted({d.key for d in a.disks} | {d.key for d in b.disks})
    return [_diff_disk(repo, a, b, key) for key in keys]


def _diff_disk(repo: Repository, a: PointRecord, b: PointRecord, key: str) -> DiskDiff:
    da, db = a.disk(key), b.disk(key)
    bs = (db or da).block_size  # type: ignore[union-attr]
    capacity = max(d.capacity for d in (da, db) if d is not None)
    nblocks = max(d.nblocks for d in (da, db) if d is not None)
    # the maps are streamed in lockstep, one window each: memory does not grow with the disk
    windows = zip_windows(nblocks, *(repo.resolve_windows(p, key) if d else iter(())
                                     for p, d in ((a, da), (b, db))))
    changed = np.concatenate([np.zeros(0, np.uint64)] + [
        np.flatnonzero(old != new).astype(np.uint64) + np.uint64(first)
        for first, (old, new) in windows])
    extents = blocks_to_extents(changed, bs, capacity)
    return DiskDiff(key, da.capacity if da else None, db.capacity if db else None,
                    len(changed), sum(length for _, length in extents), extents)
