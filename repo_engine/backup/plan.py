"""Which blocks of a disk a backup reads, and against which parent map."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..repository.blockmap import fit
from ..repository.points import DiskRecord, PointRecord
from ..repository.repo import Repository
from .extents import as_extents, extents_to_blocks
from .source import BlockDevice, Parent, SourceDisk

ALLOCATED, CHANGED, FULL_READ = "allocated", "changed", "full"


@dataclass(frozen=True)
class DiskPlan:
    key: str
    capacity: int
    block_size: int
    parent: PointRecord | None
    parent_disk: DiskRecord | None
    base: np.ndarray | None  # the parent's resolved map, resized to this capacity
    read: np.ndarray         # sorted block numbers to read
    mode: str
    note: str = ""
    # blocks read although the change list calls them unchanged: `scrub --repair` found the
    # chunks they held damaged (cleared once the point is committed)
    rereads: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    @property
    def nblocks(self) -> int:
        return -(-self.capacity // self.block_size)

    def bytes_of(self, blocks: np.ndarray) -> int:
        """The real byte length of sorted `blocks` (the disk's last block may be short)."""
        if not len(blocks):
            return 0
        size = len(blocks) * self.block_size
        if int(blocks[-1]) == self.nblocks - 1:
            size -= self.nblocks * self.block_size - self.capacity
        return size

    def map_bytes(self, refs: np.ndarray) -> int:
        """The real byte length of the non-ZERO blocks of a full map of this disk."""
        size = int(np.count_nonzero(refs)) * self.block_size
        if len(refs) and refs[-1]:
            size -= self.nblocks * self.block_size - self.capacity
        return size

    def as_full_read(self, note: str) -> "DiskPlan":
        return replace(self, read=np.arange(self.nblocks, dtype=np.uint64), mode=FULL_READ,
                       note=note)


def join_notes(*notes: str) -> str:
    """Notes joined with "; ", empty ones left out."""
    return "; ".join(filter(None, notes))


def _blocks_in(extents: np.ndarray, block_size: int, nblocks: int) -> np.ndarray:
    blocks = extents_to_blocks(extents, block_size)
    return blocks[blocks < nblocks]


def _resize_blocks(device: BlockDevice, old_capacity: int, capacity: int,
                   block_size: int) -> np.ndarray:
    """Blocks a resize forces us to read: allocated data past the old end, and the old and the
    new last block (their length, or their bytes past the old end, changed). Either capacity may
    be 0 or not a multiple of the block size."""
    nblocks = -(-capacity // block_size)
    old_nblocks = -(-old_capacity // block_size)
    parts = [np.array([n - 1 for n in (old_nblocks, nblocks) if 0 < n <= nblocks], dtype=np.uint64)]
    if nblocks > old_nblocks:
        tail = extents_to_blocks(as_extents(device.allocated_extents()), block_size)
        parts.append(tail[tail >= max(old_nblocks - 1, 0)])
    return np.unique(np.concatenate(parts)).astype(np.uint64)


def plan_disk(repo: Repository, vm: str, disk: SourceDisk, device: BlockDevice) -> DiskPlan:
    return _with_rereads(repo, vm, _plan_disk(repo, vm, disk, device))


def _with_rereads(repo: Repository, vm: str, plan: DiskPlan) -> DiskPlan:
    """Add the blocks a repair asked to re-read (a full read covers them already)."""
    extra = repo.index.reread_blocks(vm, plan.key)
    extra = extra[extra < plan.nblocks]
    if not len(extra):
        return plan
    if plan.mode == FULL_READ:
        return replace(plan, rereads=extra)
    note = f"re-read {len(extra)} blocks whose stored chunks were damaged"
    return replace(plan, read=np.union1d(plan.read, extra).astype(np.uint64), rereads=extra,
                   note=join_notes(plan.note, note))


def _plan_disk(repo: Repository, vm: str, disk: SourceDisk, device: BlockDevice) -> DiskPlan:
    bs = repo.config.block_size
    nblocks = -(-disk.capacity // bs)
    parent = repo.latest_with_disk(vm, disk.key)
    if parent is None:
        report = disk.allocated()
        plan = DiskPlan(disk.key, disk.capacity, bs, None, None, None,
                        np.zeros(0, np.uint64), ALLOCATED, report.note)
        if report.extents is None:
            return plan.as_full_read(report.note or "first backup, allocation unknown")
        return replace(plan, read=_blocks_in(report.extents, bs, nblocks))
    parent_disk = parent.disk(disk.key)
    assert parent_disk is not None
    base = fit(repo.resolve(parent, disk.key), nblocks)
    report = disk.changes(Parent(parent_disk.cursor, parent_disk.capacity,
                                 lambda: repo.load_catalogued(parent.id).config))
    plan = DiskPlan(disk.key, disk.capacity, bs, parent, parent_disk, base,
                    np.zeros(0, np.uint64), CHANGED, report.note)
    if report.extents is None:
        return plan.as_full_read(report.note or "no change list: read everything, store only new")
    changed = _blocks_in(report.extents, bs, nblocks)
    if parent_disk.capacity != disk.capacity:
        extra = _resize_blocks(device, parent_disk.capacity, disk.capacity, bs)
        changed = np.union1d(changed, extra[extra < nblocks]).astype(np.uint64)
        note = f"capacity changed from {parent_disk.capacity} to {disk.capacity} bytes"
        plan = replace(plan, note=join_notes(report.note, note))
    return replace(plan, read=changed)


def audit_sample(plan: DiskPlan, percent: float, rng: np.random.Generator) -> np.ndarray:
    """A random `percent` share of the blocks the change list calls unchanged."""
    old_nblocks = min(plan.nblocks, plan.parent_disk.nblocks if plan.parent_disk else 0)
    unchanged = np.setdiff1d(np.arange(old_nblocks, dtype=np.uint64), plan.read,
                             assume_unique=True)
    count = int(round(len(unchanged) * percent / 100))
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    return np.sort(rng.choice(unchanged, size=count, replace=False)).astype(np.uint64)

