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

On a shared repository the same consolidations are computed first (new maps written), then the
children's new records and the removals go into ONE journal entry (`_forget_shared`), so every
host sees the whole forget or none of it; P's manifest is left to gc (shared_gc.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

from ..errors import LockedError, PointNotFound, RepoError, UsageError
from ..repository.blockmap import BlockMap, delta_between
from ..repository.locks import MAINTENANCE
from ..repository.points import DiskRecord, PointRecord
from ..repository.repo import Repository, commit_order
from .retention import Decision, Policy, PointInfo, apply_policy, parse_time


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
        if repo.config.shared:
            return _forget_shared(repo, ids, tick)
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
    disks, _maps = consolidated_disks(repo, point, child, catalog)
    return repo.rewrite_point(child, disks=disks)


def consolidated_disks(repo: Repository, point: PointRecord, child: PointRecord,
                       catalog: dict[str, PointRecord]) -> tuple[list[DiskRecord],
                                                                 dict[str, BlockMap]]:
    """The disks of `child` with none depending on `point`, and the maps written for them (by
    name): a disk on `point` gets a map of its content as a delta on `point`'s parent, or a full
    map when `point`'s disk was a full base. `catalog`: the points as they will be (the parent
    looked up there)."""
    disks, maps = [], {}
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
        name = repo.write_map(bmap)
        maps[name] = bmap
        disks.append(replace(disk, map=name, kind=kind, parent=parent, links=links))
    return disks, maps


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
        catalog = {p.id: p for p in repo.points()}
        gone = [point_id for point_id in ids if point_id in catalog]
        rewrites, maps = _consolidated_children(repo, catalog, gone, tick)
        try:
            repo.commit_forget([repo.next_generation(catalog[c.id], disks=c.disks)
                                for c in rewrites], gone, partial(_no_new_child, set(catalog),
                                                                  set(gone)), maps)
        except _ChildAppeared:
            continue
        return ForgetReport(removed=gone, rewritten=[c.id for c in rewrites])
    raise LockedError("backups kept adding points onto the points being forgotten; run forget "
                      "again")


def _consolidated_children(repo: Repository, catalog: dict[str, PointRecord], gone: list[str],
                           tick: Callable[[int], None] | None
                           ) -> tuple[list[PointRecord], dict[str, BlockMap]]:
    """The children of the `gone` points as they become (each forgotten point's changes merged
    into them, oldest forgotten point first), and the maps written for them."""
    working = dict(catalog)
    rewritten: dict[str, PointRecord] = {}
    maps: dict[str, BlockMap] = {}
    for point_id in sorted(gone, key=lambda i: commit_order(catalog[i])):
        point = working.pop(point_id)
        for child in [p for p in working.values() if any(d.parent == point_id for d in p.disks)]:
            disks, written = consolidated_disks(repo, point, child, working)
            maps.update(written)
            working[child.id] = rewritten[child.id] = replace(child, disks=disks)
        if tick:
            tick(1)
    return [p for i, p in rewritten.items() if i not in gone], maps


def _no_new_child(known: set[str], gone: set[str], records: list[dict]) -> None:
    """Raise _ChildAppeared when a point committed since `known` was read builds on `gone`."""
    for record in records:
        if record["id"] not in known and any(d.get("parent") in gone for d in record["disks"]):
            raise _ChildAppeared(f"point {record['id'][:8]} was committed onto a forgotten point")


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
