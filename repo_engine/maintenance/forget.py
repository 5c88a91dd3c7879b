"""Forget: remove restore points, consolidating the chains that ran through them.

Removing the points of a set R (each step crash-safe; a rerun of forget or gc finishes an
interrupted job):

1. Mark R in the index's `forgetting` database (the intent survives a crash).
2. For every catalogued point C outside R with a disk built on a point of R, oldest first:
   compute a new map: a DELTA on that disk's nearest ancestor G outside R (`_delta_on(G, C)`,
   so C's entries win and resizes stay exact), or a FULL map when the chain reaches a full base
   first; all of them are made durable together once computed (`rebased`). Then commit the next
   generation of every such C (their manifests durable first, together, then their catalog
   records in ONE transaction, which moves the map use and chunk reference counts; a crash
   before it leaves manifests newer than the catalog, which the rerun writes again).
3. In one transaction, delete the catalog records of every point of R no catalogued point
   outside R names as a parent (a backup may have committed a new child meanwhile: that one
   goes back to 2), queue decrements for their maps and clear their marks. Then their
   manifests go to the command's Deleter (deleter.py; a leftover manifest is an orphan gc
   removes).

Every point keeps resolving to the same bytes at each step: C's old and new records both resolve
to C's content, and R stays catalogued until nothing outside it depends on it. The cost grows
with the points rewritten (each resolves its chain once) and one pass over the catalog, not with
removed points times catalogued points. Data is never deleted here; gc reclaims what the counts
free. `links` of C's descendants are left as they were (an upper bound).

On a shared repository the same consolidations are computed first (new maps written), then the
children's new records and the removals go into ONE journal entry (`_forget_shared`), so every
host sees the whole forget or none of it; P's manifest is left to gc (shared_gc.py).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar

import numpy as np

from ..errors import (ChainBroken, DamageError, LockedError, PointNotFound, RepoError,
                      UsageError)
from ..repository.blockmap import (BlockMap, MapBatch, delta_between, nonzero_entries,
                                   zip_windows)
from ..repository.locks import MAINTENANCE
from ..repository.points import DiskRecord, PointRecord, point_object
from ..repository.repo import Repository, commit_order
from ..repository.safefile import checked_name
from .deleter import Deleter
from .retention import Decision, Policy, PointInfo, apply_policy, parse_time

REBASE_THREADS = 4  # VMs whose points forget rebases at once on object storage (rebased)
T = TypeVar("T")


@dataclass
class ForgetReport:
    removed: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    decisions: list[dict] = field(default_factory=list)
    dry_run: bool = False


def policy_decisions(repo: Repository, policy: Policy, vm: str | None = None, *,
                     allow_remove_latest: bool = False) -> list[Decision]:
    """What `policy` keeps of the catalogued points (of `vm`); UsageError if it keeps nothing.
    A shared repository's cache is refreshed first (forget re-checks the choice under its lock)."""
    repo.refresh()
    catalog = Catalog({r["id"]: r for r in repo.index.points_records(vm)})
    records = [catalog.records[i] for i in sorted(catalog, key=catalog.order)]
    return apply_policy(each_read(_policy_info, records), policy,
                        allow_remove_latest=allow_remove_latest)


def _policy_info(record: dict) -> PointInfo:
    """What a policy reads of a catalog record (checked as read: Index.record), each field
    checked, without building the whole PointRecord (a policy reads every point)."""
    return PointInfo(checked_name(record["id"], 16, "point id"), _text(record["vm"]),
                     parse_time(_text(record["time"])),
                     tuple(_text(d["key"]) for d in record["disks"]),
                     tuple(map(_text, record.get("tags", ()))),
                     _protected(record))


MALFORMED = (AttributeError, KeyError, TypeError, ValueError)  # (a disk not a dict)


@contextmanager
def _malformed(record: dict) -> Iterator[None]:
    """A field of `record` read inside that is missing or of the wrong type is damage."""
    try:
        yield
    except MALFORMED as exc:
        raise DamageError(f"catalog record {str(record.get('id'))[:16]!r}: restore point "
                          f"record is malformed ({exc}); run 'repo-engine rebuild-index'") from None


def each_read(read: Callable[[dict], T], records: Iterable[dict]) -> list[T]:
    """`read` of each record, a record it finds malformed reported as `_malformed` does: the
    records are read in one pass without a context each (a forget reads every record of a
    long history), and read again one by one only to name the one that failed."""
    records = list(records)
    try:
        return [read(record) for record in records]
    except MALFORMED:
        for record in records:
            with _malformed(record):
                read(record)
        raise


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def forget_points(repo: Repository, ids: list[str], *,
                  tick: Callable[[int], None] | None = None) -> ForgetReport:
    """Remove the given points (full ids, which the caller found in the catalog), under the
    maintenance lock. One that a concurrent forget removed since the caller chose it is skipped:
    it is gone, as asked."""
    with repo.lock(MAINTENANCE, "forget"), Deleter(repo.store) as deleter:
        return forget_locked(repo, ids, tick=tick, deleter=deleter)


def forget_locked(repo: Repository, ids: list[str], *, deleter: Deleter,
                  tick: Callable[[int], None] | None = None) -> ForgetReport:
    """`forget_points` for a caller holding the maintenance lock; the manifests of the points
    removed go to `deleter`."""
    catalog = vm_catalog(repo, ids)
    ids = [point_id for point_id in ids if point_id in catalog]
    for point_id in ids:
        if catalog.protected(point_id):
            raise UsageError(f"point {point_id[:8]} is protected; 'unprotect' it first")
    if repo.config.shared:
        return _forget_shared(repo, ids, tick)
    marked = set(ids) - set(pending(repo))
    mark_forgetting(repo, ids)
    try:
        return finish_pending(repo, deleter, tick=tick, catalog=catalog)
    except ChainBroken as exc:
        # left marked, the points would make every later forget (of any VM) and gc fail the
        # same way; unmarked, those not removed yet stay catalogued, and every point keeps
        # resolving as it did (a rewritten child resolves to the same content)
        unmark_forgetting(repo, marked)
        raise ChainBroken(exc.point, exc.key, exc.ancestor, exc.cause, FORGET_ADVICE) from None


FORGET_ADVICE = ("a point built on the points being forgotten cannot be rewritten without "
                 "them, so they stay: forget the points built on them too, or put the lost "
                 "ancestor's manifest back and run 'repo-engine rebuild-index' ('repo-engine "
                 "verify' lists the points whose chain is broken)")


def mark_forgetting(repo: Repository, ids: Iterable[str]) -> None:
    index = repo.index
    with index.write() as txn:
        for point_id in ids:
            txn.put(point_id.encode(), b"", db=index.forgetting)


def unmark_forgetting(repo: Repository, ids: Iterable[str]) -> None:
    index = repo.index
    with index.write() as txn:
        for point_id in ids:
            txn.delete(point_id.encode(), db=index.forgetting)


def pending(repo: Repository) -> list[str]:
    index = repo.index
    with index.env.begin() as txn:
        return [k.decode() for k, _ in txn.cursor(db=index.forgetting)]


def finish_pending(repo: Repository, deleter: Deleter, *,
                   tick: Callable[[int], None] | None = None,
                   catalog: Catalog | None = None) -> ForgetReport:
    """Complete every marked removal (the caller holds the maintenance lock): the points built
    on marked ones are rewritten first (one commit), then every marked point no
    catalogued point depends on leaves the catalog in one transaction, and their manifests go
    to `deleter`. A point a backup built on a marked one meanwhile is rewritten on the next
    round. Each round reads the points of the marked points' VMs only (`vm_catalog`);
    `catalog`: those the caller read under the lock, used when it holds every marked point
    (and so every point of their VMs)."""
    report = ForgetReport()
    for _round in range(10):
        todo = set(pending(repo))
        if not todo:
            return report
        if catalog is None or not todo <= catalog.keys():
            catalog = vm_catalog(repo, todo)
        rewrites, maps = rebased(repo, catalog, todo)
        repo.rewrite_points([(catalog[p.id], p.disks) for p in rewrites], maps)
        report.rewritten += [p.id for p in rewrites]
        repo.check_locks()
        removed = repo.index.remove_childless(todo)
        deleter.submit([point_object(i) for i in removed])
        report.removed += sorted(removed, key=lambda i: catalog.order(i)
                                 if i in catalog else (0, "", i))
        if tick:
            tick(len(removed))
        catalog = None  # the next round (points a backup built meanwhile) reads it again
    raise LockedError("backups kept adding points onto the points being forgotten; run forget "
                      "again")


def vm_catalog(repo: Repository, ids: Iterable[str]) -> Catalog:
    """The catalogued points of the VMs of those of `ids` catalogued, by id: a disk's chain
    never leaves its VM, so that is all a forget of `ids` reads (`Index.catalog_of_vms`: the
    whole catalog for many ids)."""
    return Catalog(repo.index.catalog_of_vms(set(ids)))


class Catalog(Mapping[str, PointRecord]):
    """Catalogued points by id, from their catalog records (checked as read: Index.record), a
    record made a PointRecord (every field checked) only when first asked for: a forget of
    most points of a long history passes over every record of their VMs, and uses few whole
    (the points it rewrites and their ancestors). What the passes read of the others is
    checked here as it is read."""

    def __init__(self, records: dict[str, dict]) -> None:
        self.records = records
        self._points: dict[str, PointRecord] = {}

    def __getitem__(self, point_id: str) -> PointRecord:
        point = self._points.get(point_id)
        if point is None:
            point = self._points[point_id] = PointRecord.from_dict(self.records[point_id])
        return point

    def __iter__(self) -> Iterator[str]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, point_id: object) -> bool:
        return point_id in self.records

    def order(self, point_id: str) -> tuple[int, str, str]:
        """`commit_order` of the point (sorts read it of every point of a VM: the fields are
        checked without a context manager first, which only reports a malformed one)."""
        record = self.records[point_id]
        seq, time, ident = record.get("seq", 0), record.get("time"), record.get("id")
        if isinstance(seq, int) and isinstance(time, str) and isinstance(ident, str):
            return seq, time, ident
        with _malformed(record):
            return _order(record)

    def protected(self, point_id: str) -> bool:
        record = self.records[point_id]
        with _malformed(record):
            return _protected(record)

    def link(self, point_id: str, key: str) -> tuple[str, str | None] | None:
        """(kind, parent) of the point's disk `key`, None when it has none: what a walk down a
        chain through removed points reads of each (not made a PointRecord)."""
        record = self.records[point_id]
        with _malformed(record):
            for disk in record["disks"]:
                if _text(disk["key"]) == key:
                    parent = disk.get("parent")
                    return _text(disk["kind"]), None if parent is None else _text(parent)
        return None

    def built_on(self, gone: set[str]) -> dict[str, list[str]]:
        """The points outside `gone` with a disk built on a point in it (they are rewritten),
        by VM, in commit order: one pass over the records, which reads the VM and commit order
        of each."""
        def read(record: dict) -> tuple[str, tuple[int, str, str], bool]:
            return (_text(record["vm"]), _order(record), record["id"] not in gone
                    and any(d.get("parent") in gone for d in record["disks"]))

        vms: dict[str, list[tuple[int, str, str]]] = {}
        for vm, order, rebuilt in each_read(read, self.records.values()):
            if rebuilt:
                vms.setdefault(vm, []).append(order)
        return {vm: [point_id for _, _, point_id in sorted(orders)]
                for vm, orders in vms.items()}


def _protected(record: dict) -> bool:
    """The record's flag (a value not a boolean, which a listing shows as protected, is not
    taken for False: TypeError)."""
    value = record.get("protected", False)
    if not isinstance(value, bool):
        raise TypeError(f"protected {value!r} is not a boolean")
    return value


def _order(record: dict) -> tuple[int, str, str]:
    """`commit_order` of a record, each field checked (TypeError, KeyError)."""
    return _number(record.get("seq", 0)), _text(record["time"]), _text(record["id"])


def _number(value: object) -> int:
    if not isinstance(value, int):
        raise TypeError(f"{value!r} is not a number")
    return value


def rebased(repo: Repository, catalog: Catalog, gone: set[str]
            ) -> tuple[list[PointRecord], dict[str, BlockMap]]:
    """The catalogued points outside `gone` with a disk built on a point in it, that disk
    rewritten: a delta on its nearest ancestor outside `gone` (of the content between the two),
    or a full map when the chain reaches a full base (or a point without the disk) first; and
    the maps written for them, by name. Points are taken oldest first (and returned so), so an
    ancestor is rewritten before its descendants. The maps are streamed window by window:
    memory does not grow with the disk (a full map holds the disk's non-ZERO entries).

    Each map is computed from catalogued records (`Repository.chain` resolves a rewritten
    ancestor through its catalogued chain, to the same content), never from a map written
    here, so the maps are made durable together once all are computed (a MapBatch: one round of
    fsyncs, not two per map), before the commit that names them. A chain never leaves its VM,
    so the VMs are worked on by up to REBASE_THREADS threads at once where map reads wait
    (`Store.reads_wait`: object storage); a local store's are one thread's work, which holds the
    interpreter throughout (threads only took turns at it: a first prune of 10,000 points
    rebased in 1.4 s on four threads, 0.9 s on one)."""
    todo = list(catalog.built_on(gone).values())
    batch = repo.map_batch()
    if len(todo) < 2 or not repo.store.reads_wait:
        parts = [_rebased_vm(repo, batch, catalog, gone, ids) for ids in todo]
    else:
        with ThreadPoolExecutor(min(REBASE_THREADS, len(todo))) as pool:
            parts = list(pool.map(partial(_rebased_vm, repo, batch, catalog, gone), todo))
    batch.write()
    rewrites = sorted((point for points, _ in parts for point in points), key=commit_order)
    return rewrites, {name: bmap for _, maps in parts for name, bmap in maps.items()}


def _rebased_vm(repo: Repository, batch: MapBatch, catalog: Catalog, gone: set[str],
                ids: list[str]) -> tuple[list[PointRecord], dict[str, BlockMap]]:
    """`rebased` for the points `ids` of one VM (built on points of `gone`, in commit order),
    its maps added to `batch`. A chain never leaves its VM, so the rebases of several VMs
    share `catalog` (each thread puts its rewrites in its own `working` map)."""
    working: ChainMap[str, PointRecord] = ChainMap({}, catalog)  # rewritten ones first
    rewrites: list[PointRecord] = []
    maps: dict[str, BlockMap] = {}
    for point_id in ids:
        point = catalog[point_id]
        disks = []
        for disk in point.disks:
            if disk.parent not in gone:
                disks.append(disk)
                continue
            base = _kept_ancestor(working, catalog, gone, disk)
            if base is None:
                bmap = BlockMap.sparse_full(
                    disk.nblocks, *nonzero_entries(repo.resolve_windows(point, disk.key)))
                kind, parent, links = "full", None, 1
            else:
                bmap = _delta_on(repo, point, base, disk)
                kind, parent, links = "delta", base.id, base.disk(disk.key).links + 1
            name = batch.add(bmap)
            maps[name] = bmap
            disks.append(replace(disk, map=name, kind=kind, parent=parent, links=links))
        working[point.id] = replace(point, disks=disks)
        rewrites.append(working[point.id])
    return rewrites, maps


def _delta_on(repo: Repository, point: PointRecord, base: PointRecord,
              disk: DiskRecord) -> BlockMap:
    """The DELTA from `base`'s content of the disk to `point`'s (catalogued records: a
    rewritten ancestor resolves to the same content), both streamed in lockstep."""
    windows = zip_windows(disk.nblocks, repo.resolve_windows(point, disk.key),
                          repo.resolve_windows(base, disk.key))
    blocks, refs = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
    for first, (new, old) in windows:
        part = delta_between(old, new)
        blocks.append(part.blocks + np.uint64(first))  # type: ignore[operator]
        refs.append(part.refs)
    return BlockMap.delta(disk.nblocks, np.concatenate(blocks), np.concatenate(refs))


def _kept_ancestor(working: Mapping[str, PointRecord], catalog: Catalog, gone: set[str],
                   disk: DiskRecord) -> PointRecord | None:
    """The nearest point outside `gone` on the chain of `disk` (built on a point in `gone`), or
    None when the chain reaches a full base or a point without the disk first. `working`: the
    points outside `gone`, those rewritten already as rewritten; the points of `gone` are
    walked through their links in `catalog` (a removed point is never rewritten)."""
    parent = disk.parent
    while parent in gone:
        above = catalog.link(parent, disk.key) if parent in catalog else None
        if above is None or above[0] == "full":
            return None
        parent = above[1]
    found = working.get(parent or "")
    return found if found is not None and found.disk(disk.key) is not None else None


# -- a shared repository ----------------------------------------------------------------------
class _ChildAppeared(RepoError):
    """A backup committed a point on a point being forgotten while forget prepared its entry."""


def _forget_shared(repo: Repository, ids: list[str],
                   tick: Callable[[int], None] | None) -> ForgetReport:
    """Forget in a shared repository: consolidate the children of the forgotten points onto new
    maps (written first), then ONE journal entry with the rewritten children and the removals,
    so every host sees the whole forget or none of it. When a backup commits a child of a
    forgotten point meanwhile, the work is done again on the new catalog. Manifests of the
    forgotten points are left to gc (a host may still be reading one)."""
    for _attempt in range(10):
        catalog = Catalog({r["id"]: r for r in repo.index.points_records()})
        gone = [point_id for point_id in ids if point_id in catalog]
        rewrites, maps = rebased(repo, catalog, set(gone))
        try:
            repo.commit_forget([repo.next_generation(catalog[c.id], disks=c.disks)
                                for c in rewrites], gone, partial(_no_new_child, set(catalog),
                                                                  set(gone)), maps)
        except _ChildAppeared:
            continue
        if tick:
            tick(len(gone))
        return ForgetReport(removed=gone, rewritten=[c.id for c in rewrites])
    raise LockedError("backups kept adding points onto the points being forgotten; run forget "
                      "again")


def _no_new_child(known: set[str], gone: set[str], records: list[dict]) -> None:
    """Raise _ChildAppeared when a point committed since `known` was read builds on `gone`."""
    for record in records:
        if record["id"] not in known and any(d.get("parent") in gone for d in record["disks"]):
            raise _ChildAppeared(f"point {record['id'][:8]} was committed onto a forgotten point")


def set_protected(repo: Repository, point: PointRecord, protected: bool) -> PointRecord:
    """Pin (or unpin) a point: no policy removes a protected point."""
    with repo.lock(MAINTENANCE, "protect"):
        current = {p.id: p for p in repo.points()}.get(point.id)
        if current is None:
            raise PointNotFound(f"point {point.id} is not in the catalog")
        if current.protected == protected:
            return current
        return repo.rewrite_point(current, protected=protected)
