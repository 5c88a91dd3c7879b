"""Which blocks of a disk a backup reads, and against which parent map."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import ChainBroken, DamageError, SourceError
from ..repository.blockmap import BlockMap, holds, nonzero_entries, sorted_unique
from ..memory import available as meminfo_available, require
from ..repository.points import MAX_CAPACITY, DiskRecord, PointRecord
from ..repository.repo import Repository
from ..units import format_size, shown
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
    # the parent's maps, as planned: the parent's content stays readable through them if a
    # forget removes it before the commit (gc waits for the backup to delete them)
    parent_chain: list[tuple[str, int]] | None
    read: np.ndarray         # sorted block numbers to read
    mode: str
    note: str = ""
    # blocks read although the change list calls them unchanged: `scrub --repair` found the
    # chunks they held damaged (cleared once the point is committed)
    rereads: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    # the parent's content the new map is built from, resolved while planning (its chain's maps
    # are read whole once, before the disk is, so that one found unreadable still leaves a
    # first backup's read): a DELTA's refs of `delta_blocks`, or a FULL map's non-ZERO
    # (blocks, refs) below the disk's end
    before: np.ndarray | None = None
    parent_entries: tuple[np.ndarray, np.ndarray] | None = None

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

    def map_bytes(self, count: int, last: bool) -> int:
        """The real byte length of `count` non-ZERO blocks of this disk (`last`: the disk's
        last block, which may be short, is one of them)."""
        return count * self.block_size - (self.nblocks * self.block_size - self.capacity
                                          if last else 0)

    def as_full_read(self, note: str) -> "DiskPlan":
        _check_full_read(self)
        return replace(self, read=np.arange(self.nblocks, dtype=np.uint64), mode=FULL_READ,
                       note=note, before=None)

    def delta_on_parent(self, max_chain: int) -> bool:
        """Whether the new map is a DELTA on the parent (else a FULL map)."""
        return self.parent_disk is not None and self.parent_disk.links + 1 <= max_chain

    def delta_blocks(self) -> np.ndarray:
        """The blocks whose parent refs a DELTA needs: those read and the disk's last one,
        whose ref the logical size needs."""
        ends = bool(len(self.read)) and int(self.read[-1]) == self.nblocks - 1
        return (self.read if ends or not self.nblocks else
                np.append(self.read, np.uint64(self.nblocks - 1)))

    def settled(self) -> "DiskPlan":
        """The plan as kept until the commit, without the parent's content read for its map
        (memory: a commit that finds the parent forgotten resolves it again)."""
        return replace(self, before=None, parent_entries=None)


# memory a read of every block takes per block: the block list, the refs read, the new map's
# entries (a read of the changed or allocated blocks takes it per block read)
FULL_READ_BYTES = 32


def _check_full_read(plan: DiskPlan) -> None:
    """Refuse, before reading anything, a read of every block whose block list would not fit
    in half the memory available (an out-of-memory kill would stop the backup anyway)."""
    need = plan.nblocks * FULL_READ_BYTES
    free = available_memory()
    if need > free // 2:
        raise SourceError(
            f"disk {plan.key}: reading all {plan.nblocks} blocks of this "
            f"{format_size(plan.capacity)} disk needs {format_size(need)} of memory for its "
            f"block list, more than half the {format_size(free)} available; give the disk's "
            "changed or allocated extents (--changed), or back it up into a repository with a "
            "larger --block-size")


def available_memory() -> int:
    """Bytes of memory available to this process (Linux MemAvailable, else free pages)."""
    available = meminfo_available()
    return available if available is not None else (
        os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_capacity(key: str, capacity: int) -> None:
    """Refuse a disk larger than a restore point may record, before reading it."""
    if capacity > MAX_CAPACITY:
        raise SourceError(f"disk {key}: its capacity of {capacity} bytes "
                          f"({format_size(capacity)}) is more than the "
                          f"{format_size(MAX_CAPACITY)} a disk may have; leave it out of the "
                          "backup")


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
    """What to read of `disk`, with the parent's content its map needs read now: a map of the
    parent's chain found missing or damaged before the disk is read turns the plan into a first
    backup's, where after the read it could only fail the backup."""
    plan = _with_rereads(repo, vm, _plan_disk(repo, vm, disk, device))
    if plan.parent is None:
        return plan
    try:
        return _with_parent_content(repo, plan)
    except DamageError as exc:  # ChainBroken included: a full map owes nothing to the chain
        why = _broken_chain(plan.parent, exc)
        return _with_rereads(repo, vm, _without_parent(disk, plan.block_size, plan.nblocks, why))


def _with_parent_content(repo: Repository, plan: DiskPlan) -> DiskPlan:
    """`plan` with the parent's content its map is built from: reading it reads (and checks)
    every map of the chain, which building the map needs anyway."""
    if plan.delta_on_parent(repo.config.max_chain):
        return replace(plan, before=parent_refs(repo, plan, plan.delta_blocks()))
    return replace(plan, parent_entries=_parent_entries(repo, plan))


def _broken_chain(parent: PointRecord, exc: DamageError) -> str:
    """The note of a disk read as on a first backup because its parent's chain cannot be
    resolved: which point breaks it, and how."""
    if isinstance(exc, ChainBroken):
        ancestor, cause = exc.ancestor, exc.cause
    else:  # the parent's own map (an ancestor's is ChainBroken)
        ancestor, cause = parent.id, f"has a block map that cannot be read ({exc})"
    return (f"the chain of point {parent.id[:8]} is broken: point {ancestor[:8]} {cause}; the "
            "disk was read as on a first backup and stored as a full map")


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
    check_capacity(disk.key, disk.capacity)
    bs = repo.config.block_size
    nblocks = -(-disk.capacity // bs)
    parent = repo.latest_with_disk(vm, disk.key)
    if parent is None:
        return _without_parent(disk, bs, nblocks, "")
    try:
        chain = repo.chain(parent, disk.key)
    except ChainBroken as exc:  # a full map owes nothing to the lost ancestor
        return _without_parent(disk, bs, nblocks, _broken_chain(parent, exc))
    parent_disk = parent.disk(disk.key)
    assert parent_disk is not None
    report = disk.changes(Parent(parent_disk.cursor, parent_disk.capacity,
                                 lambda: repo.load_catalogued(parent.id).config))
    plan = DiskPlan(disk.key, disk.capacity, bs, parent, parent_disk, chain,
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


def _without_parent(disk: SourceDisk, bs: int, nblocks: int, why: str) -> DiskPlan:
    """The plan of a disk backed up as if for the first time: its allocated blocks, else
    every block; `why` it has no parent, when it has a point."""
    report = disk.allocated()
    note = join_notes(why, report.note) if why else report.note
    plan = DiskPlan(disk.key, disk.capacity, bs, None, None, None, np.zeros(0, np.uint64),
                    ALLOCATED, note)
    if report.extents is None:
        return plan.as_full_read(note or "first backup, allocation unknown")
    return replace(plan, read=_blocks_in(report.extents, bs, nblocks))


# the bytes a block costs an audit: listing the disk (8 bytes a block), the unchanged ones and
# the drawn permutation, as numpy's set operations copy them; or, for a small share, the draws
def _require_audit(plan: DiskPlan, count: int, old_nblocks: int, percent: float) -> None:
    need = 40 * old_nblocks if count * 4 > old_nblocks else 64 * count
    require(need, f"--audit {percent:g} of disk {shown(plan.key)} ({count} blocks)",
            "give a smaller --audit percentage")


def audit_sample(plan: DiskPlan, percent: float, rng: np.random.Generator) -> np.ndarray:
    """A random `percent` share of the blocks the change list calls unchanged. A small share
    of a large disk is drawn without listing the disk's blocks (8 bytes a block)."""
    old_nblocks = min(plan.nblocks, plan.parent_disk.nblocks if plan.parent_disk else 0)
    read = plan.read[plan.read < old_nblocks]
    count = int(round((old_nblocks - len(read)) * percent / 100))
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    _require_audit(plan, count, old_nblocks, percent)
    if count * 4 > old_nblocks:
        unchanged = np.setdiff1d(np.arange(old_nblocks, dtype=np.uint64), read,
                                 assume_unique=True)
    else:  # at least 3/4 of the disk is unchanged: draws hit it, a few rounds find enough
        unchanged = np.zeros(0, np.uint64)
        while len(unchanged) < count:
            drawn = rng.integers(0, old_nblocks, size=2 * count, dtype=np.uint64)
            unchanged = sorted_unique(np.sort(np.concatenate([unchanged, drawn])))
            unchanged = unchanged[~holds(read, unchanged)]
    return np.sort(rng.choice(unchanged, size=count, replace=False)).astype(np.uint64)


# -- the new map: built from the blocks read and, where needed, the parent's map ---------------
def parent_refs(repo: Repository, plan: DiskPlan, blocks: np.ndarray) -> np.ndarray:
    """The parent's refs of sorted `blocks` (ZERO without a parent or past its end): only the
    parent's map ranges that hold them are decompressed."""
    if plan.parent is None:
        return np.zeros(len(blocks), np.uint64)
    return repo.refs_at(plan.parent, plan.key, blocks, chain=plan.parent_chain)


def full_map(repo: Repository, plan: DiskPlan, refs: np.ndarray) -> tuple[BlockMap, int]:
    """The FULL map (sparse: its non-ZERO entries) of the parent's content with the blocks read
    (`refs` of `plan.read`) stored over it, and its logical bytes. The parent's map is streamed
    range by range: memory grows with the disk's used blocks, not its size."""
    blocks, values = plan.read, refs
    if plan.parent is not None:
        old_blocks, old_refs = (_parent_entries(repo, plan) if plan.parent_entries is None
                                else plan.parent_entries)
        kept = ~holds(plan.read, old_blocks)
        blocks = np.concatenate([old_blocks[kept], plan.read])
        values = np.concatenate([old_refs[kept], refs])
        order = np.argsort(blocks, kind="stable")
        blocks, values = blocks[order], values[order]
    bmap = BlockMap.sparse_full(plan.nblocks, blocks, values)
    assert bmap.blocks is not None
    last = bool(len(bmap.blocks)) and int(bmap.blocks[-1]) == plan.nblocks - 1
    return bmap, plan.map_bytes(len(bmap.refs), last)


def _parent_entries(repo: Repository, plan: DiskPlan) -> tuple[np.ndarray, np.ndarray]:
    """The parent's non-ZERO (blocks, refs) below the disk's end, its map streamed."""
    return nonzero_entries((first, window[:max(plan.nblocks - first, 0)])
                           for first, window in _parent_windows(repo, plan))


def delta_map(repo: Repository, plan: DiskPlan, refs: np.ndarray) -> tuple[BlockMap, int]:
    """The DELTA on the parent of the blocks read (`refs` of `plan.read`) and the new content's
    logical bytes: the parent's map is read only where blocks were read (and at the disk's
    last block), so the cost grows with the change, not the disk."""
    ends = bool(len(plan.read)) and int(plan.read[-1]) == plan.nblocks - 1
    asked = plan.delta_blocks()
    before_all = parent_refs(repo, plan, asked) if plan.before is None else plan.before
    assert len(before_all) == len(asked), "resolved for another read"
    before = before_all[:len(plan.read)]
    differs = before != refs
    count = (_parent_count(repo, plan) - int(np.count_nonzero(before))
             + int(np.count_nonzero(refs)))
    last_nonzero = bool(refs[-1]) if ends else bool(len(asked) and before_all[-1])
    return (BlockMap.delta(plan.nblocks, plan.read[differs], refs[differs]),
            plan.map_bytes(count, last_nonzero))


def _parent_count(repo: Repository, plan: DiskPlan) -> int:
    """The parent's non-ZERO blocks below this disk's end: from its record's logical bytes when
    the disk did not shrink, else counted on its map (streamed)."""
    parent = plan.parent_disk
    assert parent is not None and plan.parent is not None
    if plan.nblocks >= parent.nblocks and parent.logical_bytes:
        return -(-parent.logical_bytes // parent.block_size)
    return sum(int(np.count_nonzero(window[:max(plan.nblocks - first, 0)]))
               for first, window in _parent_windows(repo, plan))


def _parent_windows(repo: Repository, plan: DiskPlan) -> Iterator[tuple[int, np.ndarray]]:
    assert plan.parent is not None
    return repo.resolve_windows(plan.parent, plan.key, chain=plan.parent_chain)
