"""Forget: remove restore points, consolidating the chains that ran through them.

Removing point P (each step crash-safe; a rerun of forget or gc finishes an interrupted job):

1. Mark P in the index's `forgetting` database (the intent survives a crash).
2. For every catalogued child C (a disk of C names P as its parent), per such disk:
   resolve C's map, and write a new map durably: a DELTA on P's parent G (`delta_between(G, C)`,
   so C's entries win and resizes stay exact), or a FULL map when P's disk was a full base.
3. Write C's manifest durably (same id, generation + 1, new map/kind/parent/links), then commit the
   catalog record; the same transaction moves the map use and chunk reference counts.
4. In one transaction, if P has no children left (a backup may have committed a new child on P
   meanwhile: then go back to 2), delete P's catalog record, queue decrements for its maps and
   clear the mark. Then delete P's manifest (a leftover manifest is an orphan gc removes).

Every point keeps resolving to the same bytes at each step: C's old and new records both resolve
to C's content, and P stays catalogued until nothing depends on it. Data is never deleted here;
gc reclaims what the counts free. `links` of C's descendants are left as they were (an upper bound).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import PointNotFound, UsageError
from ..repository.blockmap import BlockMap, delta_between
from ..repository.locks import MAINTENANCE
from ..repository.points import PointRecord
from ..repository.repo import Repository
from .retention import Decision, Policy, PointInfo, apply_policy, parse_time


@dataclass
class ForgetReport:
    removed: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    decisions: list[dict] = field(default_factory=list)
    dry_run: bool = False


def policy_decisions(repo: Repository, policy: Policy, vm: str | None = None, *,
                     allow_remove_latest: bool = False) -> list[Decision]:
    """What `policy` keeps of the catalogued points (of `vm`); UsageError if it keeps nothing."""
    infos = [PointInfo(p.id, p.vm, parse_time(p.time), tuple(d.key for d in p.disks),
                       tuple(p.tags), p.protected) for p in repo.points(vm)]
    return apply_policy(infos, policy, allow_remove_latest=allow_remove_latest)


def forget_points(repo: Repository, ids: list[str], *,
                  tick: Callable[[int], None] | None = None) -> ForgetReport:
    """Remove the given points (full ids, which the caller found in the catalog), under the
    maintenance lock. One that a concurrent forget removed since the caller chose it is skipped:
    it is gone, as asked."""
    with repo.lock(MAINTENANCE, "forget"):
        catalog = {p.id: p for p in repo.points()}
        ids = [point_id for point_id in ids if point_id in catalog]
        for point_id in ids:
            if catalog[point_id].protected:
                raise UsageError(f"point {point_id[:8]} is protected; 'unprotect' it first")
        mark_forgetting(repo, ids)
        return finish_pending(repo, tick=tick)


def mark_forgetting(repo: Repository, ids: list[str]) -> None:
    index = repo.index
    with index.env.begin(write=True) as txn:
        for point_id in ids:
            txn.put(point_id.encode(), b"", db=index.forgetting)


def pending(repo: Repository) -> list[str]:
    index = repo.index
    with index.env.begin() as txn:
        return [k.decode() for k, _ in txn.cursor(db=index.forgetting)]


def finish_pending(repo: Repository, *,
                   tick: Callable[[int], None] | None = None) -> ForgetReport:
    """Complete every marked removal (the caller holds the maintenance lock)."""
    report = ForgetReport()
    todo = pending(repo)
    times = {p.id: p.time for p in repo.points()}
    for point_id in sorted(todo, key=lambda i: times.get(i, "")):
        report.rewritten += _forget_one(repo, point_id)
        report.removed.append(point_id)
        if tick:
            tick(1)
    return report


def _forget_one(repo: Repository, point_id: str) -> list[str]:
    rewritten: list[str] = []
    while True:
        catalog = {p.id: p for p in repo.points()}
        point = catalog.get(point_id)
        if point is None:
            _drop_mark(repo, point_id)
            break
        children = [p for p in catalog.values() if any(d.parent == point_id for d in p.disks)]
        for child in children:
            consolidate(repo, point, child, catalog)
            rewritten.append(child.id)
        if not children and repo.remove_point(point_id):
            break
    repo.delete_manifest(point_id)
    return rewritten


def consolidate(repo: Repository, point: PointRecord, child: PointRecord,
                catalog: dict[str, PointRecord]) -> PointRecord:
    """Rewrite `child` so that none of its disks depends on `point` any more."""
    disks = []
    for disk in child.disks:
        if disk.parent != point.id:
            disks.append(disk)
            continue
        content = repo.resolve(child, disk.key)
        base = point.disk(disk.key)
        grand = catalog.get(base.parent or "") if base is not None and base.kind != "full" else None
        grand_disk = grand.disk(disk.key) if grand is not None else None
        if grand is None or grand_disk is None:
            bmap, kind, parent, links = BlockMap.full(content), "full", None, 1
        else:
            bmap = delta_between(repo.resolve(grand, disk.key), content)
            kind, parent, links = "delta", grand.id, grand_disk.links + 1
        disks.append(replace(disk, map=repo.write_map(bmap), kind=kind, parent=parent, links=links))
    return repo.rewrite_point(child, disks=disks)


def _drop_mark(repo: Repository, point_id: str) -> None:
    index = repo.index
    with index.env.begin(write=True) as txn:
        txn.delete(point_id.encode(), db=index.forgetting)


def set_protected(repo: Repository, point: PointRecord, protected: bool) -> PointRecord:
    """Pin (or unpin) a point: no policy removes a protected point."""
    with repo.lock(MAINTENANCE, "protect"):
        current = {p.id: p for p in repo.points()}.get(point.id)
        if current is None:
            raise PointNotFound(f"point {point.id} is not in the catalog")
        if current.protected == protected:
            return current
        return repo.rewrite_point(current, protected=protected)
