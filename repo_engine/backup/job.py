"""One backup of one VM: plan each disk, read and store its blocks, write its block map, then
commit the restore point (write order: packs -> index -> maps + manifest -> catalog)."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import (ChainBroken, CommitStalled, DamageError, LeaseLost, RepoError,
                      SourceError)
from ..pause import pause_point
from ..repository.blockmap import BlockMap
from ..repository.index import ParentGone
from ..repository.locks import SHARED
from ..repository.points import DiskRecord, PointRecord, new_point_id, now_iso
from ..repository.repo import Repository
from ..repository.store import StoreError
from .chunk_writer import ChunkWriter
from .pipeline import BlockPipeline, BlockResult
from .plan import (DiskPlan, audit_sample, delta_map, full_map, join_notes, parent_refs,
                   plan_disk)
from .source import BlockDevice, SourceDisk, VmSnapshot

if TYPE_CHECKING:
    from ..maintenance.scrub import RepairReport

Progress = Callable[[int], None]


@dataclass
class BackupOptions:
    tags: list[str] = field(default_factory=list)
    audit_percent: float = 0.0
    # called once per disk with (disk key, bytes to read); returns the per-chunk progress callback
    progress: Callable[[str, int], Progress] | None = None
    seed: int | None = None


@dataclass
class DiskCounters:
    bytes_read: int = 0
    blocks_read: int = 0
    zero_blocks: int = 0
    dup_blocks: int = 0
    new_chunks: int = 0
    new_raw_bytes: int = 0
    new_stored_bytes: int = 0
    audit_blocks: int = 0
    audit_mismatches: int = 0
    index_mismatches: int = 0


class _DiskBackup:
    """Backs up one disk into a shared ChunkWriter."""

    def __init__(self, repo: Repository, pipeline: BlockPipeline, writer: ChunkWriter,
                 options: BackupOptions) -> None:
        self.repo, self.pipeline, self.writer, self.options = repo, pipeline, writer, options
        # per disk: its plan and the refs of the blocks it read (to turn a delta into a full map
        # if its parent is forgotten before the commit) and the blocks read because `scrub
        # --repair` asked for them
        self.stored: dict[str, tuple[DiskPlan, np.ndarray]] = {}
        self.rereads: dict[str, np.ndarray] = {}
        self.maps: dict[str, BlockMap] = {}  # written this run, by name: not read back at commit

    def run(self, vm: str, disk: SourceDisk, last: bool = False) -> DiskRecord:
        """Back up `disk`; the `last` disk of the backup hands its open pack to the uploads
        before its map is written, so that the two overlap."""
        try:
            device = disk.open()
        except OSError as exc:
            raise SourceError(f"disk {disk.key}: {exc.strerror or exc}") from None
        try:
            counters = DiskCounters()
            plan = plan_disk(self.repo, vm, disk, device)
            plan = self._audit(plan, device, counters, disk)
            refs = self._store(plan, device, counters, disk)
            if last:
                self.writer.roll()
            self.rereads[disk.key] = plan.rereads
            return self._record(plan, disk, refs, counters)
        finally:
            device.close()

    def _progress(self, key: str, nbytes: int) -> Progress | None:
        return self.options.progress(key, nbytes) if self.options.progress else None

    def _audit(self, plan: DiskPlan, device: BlockDevice, counters: DiskCounters,
               disk: SourceDisk) -> DiskPlan:
        if self.options.audit_percent <= 0 or plan.parent is None or plan.mode != "changed":
            return plan
        sample = audit_sample(plan, self.options.audit_percent,
                              np.random.default_rng(self.options.seed))
        counters.audit_blocks = len(sample)
        before = parent_refs(self.repo, plan, sample)
        mismatched = 0
        pos = 0
        with self.repo.index.reader() as lookup:
            for result in self.pipeline.run(device, plan.block_size, sample, encode=False,
                                             describe=disk.description):
                for k, chunk_id in enumerate(result.ids):
                    ref = int(before[pos + k])
                    expected = lookup.chunk_id_of(ref) if ref else None
                    mismatched += expected != chunk_id
                pos += len(result.blocks)
        counters.bytes_read += plan.bytes_of(sample)
        counters.audit_mismatches = mismatched
        if not mismatched:
            return plan
        return plan.as_full_read(f"audit found {mismatched} of {len(sample)} sampled blocks "
                                 "changed outside the change list: read the whole disk")

    def _store(self, plan: DiskPlan, device: BlockDevice, counters: DiskCounters,
               disk: SourceDisk) -> np.ndarray:
        refs = np.zeros(len(plan.read), dtype=np.uint64)
        pos = 0
        progress = self._progress(disk.key, len(plan.read) * plan.block_size)
        for result in self.pipeline.run(device, plan.block_size, plan.read, encode=True,
                                         describe=disk.description, progress=progress):
            count = len(result.blocks)
            counters.index_mismatches += result.mismatched
            counters.zero_blocks += result.zeros
            counters.dup_blocks += count - result.zeros - len(result.missing)
            out = refs[pos:pos + count]
            out[:] = result.refs
            out[result.missing] = self._store_missing(result, counters)
            pos += count
        counters.blocks_read += len(plan.read)
        counters.bytes_read += plan.bytes_of(plan.read)
        return refs

    def _store_missing(self, result: BlockResult, counters: DiskCounters) -> list[int]:
        """Refs of the blocks the index lacked: a chunk this run already wrote, else a new one
        (only these blocks cost Python work per block)."""
        writer, refs = self.writer, []
        for k, blob in zip(result.missing, result.blobs):
            chunk_id = result.ids[k]
            assert chunk_id is not None, "missing blocks are non-zero"
            ref = writer.known(chunk_id)
            if ref:
                counters.dup_blocks += 1
            else:
                ref = writer.add(chunk_id, *blob)
                counters.new_chunks += 1
                counters.new_raw_bytes += blob[2]
                counters.new_stored_bytes += len(blob[0])
            refs.append(ref)
        return refs

    def _record(self, plan: DiskPlan, disk: SourceDisk, refs: np.ndarray,
                counters: DiskCounters) -> DiskRecord:
        # no map is held whole: a delta reads the parent's map only where blocks were read, a
        # full map holds the disk's non-ZERO entries (maps are 8 bytes a block of the disk)
        parent, parent_disk = plan.parent, plan.parent_disk
        if parent is None or parent_disk is None or \
                not plan.delta_on_parent(self.repo.config.max_chain):
            bmap, logical = full_map(self.repo, plan, refs)
            kind, links, parent_id = "full", 1, None
        else:
            bmap, logical = delta_map(self.repo, plan, refs)
            kind, links, parent_id = "delta", parent_disk.links + 1, parent.id
        self.stored[disk.key] = (plan.settled(), refs)
        name = self.repo.write_map(bmap)
        self.maps[name] = bmap
        note = plan.note
        if counters.index_mismatches:
            note = join_notes(note, f"{counters.index_mismatches} index lookups named a chunk "
                              "with another id (damaged index): those blocks were stored again; "
                              "run 'repo-engine verify'")
        return DiskRecord(
            key=disk.key, capacity=plan.capacity, block_size=plan.block_size,
            map=name, kind=kind, parent=parent_id, links=links,
            cursor=disk.cursor, read_mode=plan.mode, note=note, logical_bytes=logical,
            counters=vars(counters).copy())


def backup_vm(repo: Repository, snapshot: VmSnapshot, options: BackupOptions, *,
              vm_locked: bool = False) -> PointRecord:
    """Store one restore point of `snapshot`; nothing becomes visible unless all of it is stored.
    `vm_locked`: the caller already holds the VM lock (`repo.vm_lock`), taken before it froze
    the VM (a source that snapshots the VM must not touch a VM another backup is reading)."""
    started = time.monotonic()
    when = now_iso()
    repo.require_writable(f"backup {snapshot.vm}")
    command = f"backup {snapshot.vm}"
    vm_lock = nullcontext() if vm_locked else repo.vm_lock(snapshot.vm, command)
    with vm_lock, repo.lock(SHARED, command):  # the VM lock is released if this lock fails
        writer = ChunkWriter(repo)
        pipeline = BlockPipeline(repo.codec, repo.index)
        committing = ""  # the id of the point once its commit began
        try:
            step = _DiskBackup(repo, pipeline, writer, options)
            records = [step.run(snapshot.vm, disk, last=k == len(snapshot.disks) - 1)
                       for k, disk in enumerate(snapshot.disks)]
            for disk in snapshot.disks:
                if disk.check is not None:
                    disk.check()
            writer.flush()
            healed = _heal(repo, f"backup {snapshot.vm}: heal damaged chunks",
                           reread=any(len(b) for b in step.rereads.values()))
            point = PointRecord(
                id=new_point_id(snapshot.vm, when), vm=snapshot.vm, time=when,
                source=snapshot.source, disks=records, tags=sorted(set(options.tags)),
                consistency=snapshot.consistency, config=snapshot.config,
                notes=list(snapshot.notes) + (healed.summary() if healed else []),
                counters=_totals(records, writer, started))
            pause_point("backup.before_commit")
            committing = point.id
            _commit(repo, point, step.stored, step.maps)
        except (LeaseLost, CommitStalled) as exc:
            raise _stalled(exc, snapshot.vm) from None
        except ChainBroken as exc:  # a map the plan read whole was damaged since (a race)
            raise ChainBroken(exc.point, exc.key, exc.ancestor, exc.cause,
                              BACKUP_ADVICE) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise RepoError(f"the repository's filesystem is full ({exc.strerror}); "
                                f"{_not_stored(repo, '')}") from None
            raise
        except StoreError as exc:
            if isinstance(exc, DamageError):  # not a server fault: reported as damage
                raise
            raise type(exc)(f"{exc}; {_not_stored(repo, committing)}") from None
        finally:
            writer.close()
    for key, blocks in step.rereads.items():
        if len(blocks):
            repo.index.clear_reread(snapshot.vm, key, blocks)
    return point


BACKUP_ADVICE = ("no restore point was stored: the map was damaged while the backup ran; run the "
                 "backup again, which finds it before reading the disk and reads it as a first "
                 "backup does ('repo-engine verify' lists the points whose chain is broken)")


def _stalled(exc: LeaseLost | CommitStalled, vm: str) -> RepoError:
    """The one line of a backup that lost its lease, or whose commit found that gc swept what
    it wrote: a shared repository's gc took it for dead (a process stopped, a VM paused, a long
    hang) and may have deleted its packs, so nothing was committed that names them."""
    if isinstance(exc, CommitStalled):
        return CommitStalled(exc.what, f"the backup of {vm!r} stalled past its lease: "
                             f"{exc.what}; no restore point was stored: run the backup again")
    return LeaseLost(f"the backup of {vm!r} stalled past its lease ({exc.reason}): gc may have "
                     "deleted what it wrote, so no restore point was stored: run the backup "
                     "again", exc.reason)


def _not_stored(repo: Repository, committing: str) -> str:
    """What a backup that failed leaves: no point (or, when the store failed while the point was
    being committed, none unless the store kept that last write), and what gc reclaims."""
    stored = ("no restore point was stored" if not committing else
              f"no restore point was stored unless 'repo-engine points {repo.location}' lists "
              f"{committing} (the store failed while it was being committed)")
    return f"{stored}; 'repo-engine gc {repo.location}' frees what this backup wrote"


def _heal(repo: Repository, command: str, reread: bool) -> RepairReport | None:
    """`heal_after_backup`, imported only when some chunk is quarantined: with none there is
    nothing to heal or report, and a backup need not load the maintenance modules (gc,
    forget, inventory: a tenth of an incremental's start-up)."""
    with repo.index.env.begin() as txn:
        if not txn.stat(repo.index.quarantine)["entries"]:
            return None
    from ..maintenance.scrub import heal_after_backup
    return heal_after_backup(repo, command, reread)


def _commit(repo: Repository, point: PointRecord, stored: dict[str, tuple[DiskPlan, np.ndarray]],
            maps: dict[str, BlockMap]) -> None:
    """Commit the point; a disk whose parent a concurrent forget removed becomes a full map (of
    the parent's map, still stored, and the blocks read: no data is read again)."""
    while True:
        try:
            repo.commit_point(point, maps)
            return
        except ParentGone as gone:
            for disk in point.disks:
                if disk.parent in gone.parents:
                    full = full_map(repo, *stored[disk.key])[0]
                    disk.map = repo.write_map(full)
                    maps[disk.map] = full
                    disk.kind, disk.parent, disk.links = "full", None, 1
                    disk.note = join_notes(
                        disk.note, "parent point was forgotten during the backup: full map")


def _totals(records: list[DiskRecord], writer: ChunkWriter, started: float) -> dict[str, float]:
    totals: dict[str, float] = {}
    for record in records:
        for name, value in record.counters.items():
            totals[name] = totals.get(name, 0) + value
    totals["packs"] = writer.packs
    totals["seconds"] = round(time.monotonic() - started, 3)
    return totals
