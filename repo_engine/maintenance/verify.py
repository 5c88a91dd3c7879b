"""verify: the repository's metadata is consistent (no chunk data is read; that is scrub).

Checks, against one consistent snapshot of the index:
1. every catalog record passes its check, and every catalogued point has its manifest,
   undamaged, of the catalog's generation and saying what the catalog record says;
2. every disk's chain resolves: parents catalogued, map files present and undamaged;
3. every ref a map in use names is in the index and not quarantined;
4. every index entry points into an indexed pack whose file exists and whose trailer lists the
   same ref with the same id, offset, lengths and codec;
5. the index's tables agree with each other: each `ids` entry names a ref whose place record
   holds the same id (else a backup could deduplicate a block to another chunk), `packs` and
   `packnames` map names and numbers both ways;
6. the reference counts equal a recount (under-counting is an error: gc could lose data);
7. orphans are listed: pack files the index does not know, unused map files, manifests not in
   the catalog (a crash or a running backup leaves these; gc removes them).
Errors name the points, disks and byte ranges they affect.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import lmdb
import numpy as np

from ..errors import RepoError
from ..pause import pause_point
from ..repository.index import PACK_KEY, DamagedRecord, Index, pack_fields
from ..repository.locks import SHARED
from ..repository.points import PointRecord
from ..repository.repo import Repository
from .gc import count_drift
from .inventory import (Affected, MapCache, affected_by, chain_maps, count_damage, live_refs,
                        objects_under, scan_counts, scan_ids, scan_refs, scan_u64_keys,
                        sealed_u64)

REBUILD = "run 'repo-engine rebuild-index'"


@dataclass
class VerifyReport:
    points: int = 0
    maps: int = 0
    refs: int = 0
    packs: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    orphans: dict[str, list[str]] = field(default_factory=dict)
    affected: list[Affected] = field(default_factory=list)
    damaged_points: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class _Snapshot:
    catalog: dict[str, PointRecord]
    bad_records: list[str]
    forgetting: set[str]
    refs: np.ndarray
    ids: tuple[np.ndarray, np.ndarray]
    packnames: dict[str, int]
    packs: dict[int, tuple[str, int, int]]
    deadpacks: set[str]
    quarantine: np.ndarray
    counts: tuple[np.ndarray, np.ndarray]
    mapuse: dict[str, int]
    deadmaps: dict[str, int]
    counts_valid: bool
    count_damage: list[str]


def _snapshot(repo: Repository) -> _Snapshot:
    index = repo.index
    with index.env.begin() as txn:
        catalog, bad_records = _catalog(index, txn)
        return _Snapshot(
            catalog=catalog,
            bad_records=bad_records,
            forgetting={k.decode() for k, _ in txn.cursor(db=index.forgetting)},
            refs=scan_refs(index, txn),
            ids=scan_ids(index, txn),
            packnames={k.hex(): PACK_KEY.unpack(v)[0] if len(v) == PACK_KEY.size else -1
                       for k, v in txn.cursor(db=index.packnames)},
            packs={PACK_KEY.unpack(k)[0]: pack_fields(v) for k, v in txn.cursor(db=index.packs)},
            deadpacks={k.hex() for k, _ in txn.cursor(db=index.deadpacks)},
            quarantine=scan_u64_keys(txn, index.quarantine),
            counts=scan_counts(index, txn),
            mapuse=sealed_u64(index, txn, "mapuse"),
            deadmaps=sealed_u64(index, txn, "deadmaps"),
            count_damage=count_damage(index, txn),
            counts_valid=index._get_u64(txn, b"counts", index.meta) == 1,
        )


def _catalog(index: Index, txn: lmdb.Transaction) -> tuple[dict[str, PointRecord], list[str]]:
    """The catalog records that pass their check, and the errors of those that do not."""
    catalog, bad = {}, []
    for key, value in txn.cursor(db=index.points):
        try:
            catalog[key.decode()] = PointRecord.from_dict(index.record(key, value))
        except DamagedRecord as exc:
            bad.append(str(exc))
        except (TypeError, KeyError, ValueError) as exc:  # checked, yet not a point record
            bad.append(f"the catalog record {key!r} is not a point record ({exc}); {REBUILD}")
    return catalog, bad


def verify(repo: Repository, *, tick: Callable[[int], None] | None = None) -> VerifyReport:
    """Under a shared lock, taken before the snapshot: gc deletes nothing the snapshot names
    before we end (it waits for every session that held a lock when it changed the index)."""
    with repo.lock(SHARED, "verify"):
        return _verify(repo, tick)


def _verify(repo: Repository, tick: Callable[[int], None] | None) -> VerifyReport:
    started = time.monotonic()
    snap = _snapshot(repo)
    pause_point("verify.snapshot")
    report = VerifyReport(points=len(snap.catalog), refs=len(snap.refs), packs=len(snap.packs))
    bad_points: set[str] = set()
    report.errors += snap.bad_records
    _check_manifests(repo, snap, report, bad_points)
    _check_tables(snap, report)
    cache = MapCache(repo)
    bad_maps = _check_chains(snap, cache, report)
    used = {d.map for p in snap.catalog.values() for d in p.disks}
    report.maps = len(used)
    live, counts = live_refs(cache, used)
    bad_refs = _check_refs(snap, live, report)
    bad_refs = np.union1d(bad_refs, _check_packs(repo, snap, report, tick))
    report.errors += [f"{damage}: gc would not trust the counts; run 'repo-engine gc --full' "
                      "(or 'repo-engine rebuild-index')" for damage in snap.count_damage]
    if snap.counts_valid:
        _check_counts(snap, cache, used, live, counts, report)
    elif not repo.config.shared:  # a shared repository's caches keep no counts (gc recounts)
        report.warnings.append("reference counts are not maintained yet; run 'gc --full'")
    _orphans(repo, snap, report)
    live_bad = np.intersect1d(bad_refs, live)
    if len(live_bad) or bad_maps:
        report.affected = affected_by(repo, live_bad, bad_maps, list(snap.catalog.values()))
    elif len(bad_refs):
        report.warnings.append(f"{len(bad_refs)} damaged index entries or chunks are not used "
                               "by any point (gc removes them)")
    bad_points |= {a.point for a in report.affected}
    report.damaged_points = sorted(bad_points)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _check_manifests(repo: Repository, snap: _Snapshot, report: VerifyReport,
                     bad_points: set[str]) -> None:
    """Manifests against the catalog. A forget (which takes no notice of readers) may delete
    or rewrite a manifest after the snapshot: a finding about a point whose catalog record
    changed since is no finding (the next verify checks the new record)."""
    for point in snap.catalog.values():
        try:
            manifest = repo.load_point(point.id)
        except RepoError as exc:
            if _changed_since(repo, point):
                continue
            report.errors.append(f"point {point.id} ({point.vm}@{point.time}): {exc}")
            bad_points.add(point.id)
            continue
        if manifest.generation != point.generation and _changed_since(repo, point):
            continue
        if manifest.generation > point.generation:
            report.warnings.append(f"point {point.id}: manifest generation {manifest.generation} "
                                   f"is newer than the catalog's {point.generation} (an "
                                   "interrupted forget; run 'forget' or 'gc' again)")
        elif manifest.generation < point.generation or manifest.id != point.id:
            report.errors.append(f"point {point.id}: manifest does not match the catalog "
                                 f"(generation {manifest.generation} vs {point.generation})")
            bad_points.add(point.id)
        else:
            differ = _record_differences(point, manifest)
            if differ:
                report.errors.append(f"point {point.id}: the catalog record disagrees with the "
                                     f"manifest in {', '.join(differ)}; {REBUILD}")
                bad_points.add(point.id)
        if point.damage:
            report.warnings.append(f"point {point.id} is marked damaged: {'; '.join(point.damage)}")


def _changed_since(repo: Repository, point: PointRecord) -> bool:
    """Whether the catalog record of `point` (from the snapshot) is no longer the current one."""
    index = repo.index
    with index.env.begin() as txn:
        raw = txn.get(point.id.encode(), db=index.points)
        forgetting = txn.get(point.id.encode(), db=index.forgetting) is not None
    if forgetting or raw is None:
        return True
    return index.record(point.id.encode(), raw).get("generation") != point.generation


def _record_differences(record: PointRecord, manifest: PointRecord) -> list[str]:
    """Fields in which a catalog record differs from its manifest (notes aside: 'verify
    --repair' notes a rebuilt manifest)."""
    a, b = record.summary(), manifest.summary()
    return sorted(k for k in a.keys() | b.keys() if k != "notes" and a.get(k) != b.get(k))


def _check_tables(snap: _Snapshot, report: VerifyReport) -> None:
    """The index's tables against each other: ids -> refs, packs <-> packnames."""
    ids, refs = snap.ids
    table = snap.refs
    pos = np.minimum(np.searchsorted(table["ref"], refs), max(len(table) - 1, 0))
    agree = np.zeros(len(refs), bool)
    if len(table):
        agree = (table["ref"][pos] == refs) & (table["id"][pos] == ids)
    if not agree.all():
        report.errors.append(f"{int((~agree).sum())} entries of the index's ids table name a "
                             "chunk ref whose place record holds another chunk id (a backup "
                             f"could deduplicate to the wrong chunk); {REBUILD}")
    by_name = {name: number for number, (name, _size, _count) in snap.packs.items()}
    if by_name != snap.packnames:
        wrong = len(set(by_name.items()) ^ set(snap.packnames.items()))
        report.errors.append(f"the index's packs and packnames tables disagree ({wrong} "
                             f"entries); {REBUILD}")


def _check_chains(snap: _Snapshot, cache: MapCache, report: VerifyReport) -> set[str]:
    bad_maps: set[str] = set()
    for point in snap.catalog.values():
        for disk in point.disks:
            chain = chain_maps(snap.catalog, point, disk.key)
            if not chain:
                report.errors.append(f"point {point.id} disk {disk.key}: chain is broken "
                                     f"(parent {disk.parent} missing or lacks the disk)")
                continue
            for name in chain:
                if cache.get(name) is None:
                    bad_maps.add(name)
    for name in sorted(bad_maps):
        report.errors.append(f"block map {name}: {cache.errors[name]}")
    return bad_maps


def _check_refs(snap: _Snapshot, live: np.ndarray, report: VerifyReport) -> np.ndarray:
    missing = np.setdiff1d(live, snap.refs["ref"], assume_unique=True)
    if len(missing):
        report.errors.append(f"{len(missing)} chunk refs used by points are not in the index "
                             f"(first: {missing[:5].tolist()})")
    quarantined = np.intersect1d(live, snap.quarantine)
    if len(quarantined):
        report.errors.append(f"{len(quarantined)} chunks used by points are quarantined as "
                             f"damaged (first refs: {quarantined[:5].tolist()})")
    return np.union1d(missing, quarantined)


def _check_packs(repo: Repository, snap: _Snapshot, report: VerifyReport,
                 tick: Callable[[int], None] | None) -> np.ndarray:
    """Every index entry against its pack's trailer; returns the refs that do not match."""
    table = snap.refs
    order = np.argsort(table["pack"], kind="stable")
    table = table[order]
    numbers, starts = np.unique(table["pack"], return_index=True)
    bounds = list(starts) + [len(table)]
    bad: list[np.ndarray] = []
    rows_of = {int(n): table[bounds[i]:bounds[i + 1]] for i, n in enumerate(numbers)}
    for number in sorted(set(snap.packs) | set(rows_of)):
        rows = rows_of.get(number, table[:0])
        if tick:
            tick(1)
        if number not in snap.packs:
            report.errors.append(f"{len(rows)} index entries name pack number {number}, which the "
                                 "index does not list")
            bad.append(rows["ref"])
            continue
        name = snap.packs[number][0]
        try:
            entries = repo.read_trailer(name)
        except RepoError as exc:
            report.errors.append(f"{exc} ({len(rows)} chunks)")
            bad.append(rows["ref"])
            continue
        mismatched = _against_trailer(rows, entries)
        if len(mismatched):
            report.errors.append(f"pack {name}: {len(mismatched)} index entries disagree with "
                                 "its trailer")
            bad.append(mismatched)
    return np.unique(np.concatenate(bad)).astype(np.uint64) if bad else np.zeros(0, np.uint64)


def _against_trailer(rows: np.ndarray, entries: np.ndarray) -> np.ndarray:
    if not len(rows) or not len(entries):
        return rows["ref"]
    sorted_entries = entries[np.lexsort((entries["offset"], entries["ref"]))]
    keys = sorted_entries["ref"].astype(np.uint64)
    pos = np.minimum(np.searchsorted(keys, rows["ref"]), len(keys) - 1)
    found = sorted_entries[pos]
    ok = (keys[pos] == rows["ref"])
    # several trailer entries may share a ref; compare against the one at the right offset
    ok &= found["offset"] == rows["offset"]
    ok &= (found["stored"] == rows["stored"]) & (found["raw"] == rows["raw"])
    ok &= found["codec"] == rows["codec"]
    ok &= found["id"] == rows["id"]
    return rows["ref"][~ok]


def _check_counts(snap: _Snapshot, cache: MapCache, used: set[str], live: np.ndarray,
                  counts: np.ndarray, report: VerifyReport) -> None:
    parts, weights = [live], [counts]
    for name, owed in snap.deadmaps.items():
        refs = cache.get(name)
        if refs is not None:  # maps whose decrements gc still owes keep counting
            parts.append(refs)
            weights.append(np.full(len(refs), owed, np.uint64))
    all_refs = np.concatenate(parts)
    uniq, inverse = np.unique(all_refs, return_inverse=True)
    expected = np.bincount(inverse, weights=np.concatenate(weights).astype(np.float64),
                           minlength=len(uniq)).astype(np.int64)
    drift = count_drift(snap.counts[0], snap.counts[1], uniq, expected)
    if drift["under_counted"]:
        report.errors.append(f"{drift['under_counted']} chunk reference counts are too low (gc "
                             "could delete live data); run 'gc --full' to recount")
    if drift["over_counted"]:
        report.warnings.append(f"{drift['over_counted']} chunk reference counts are too high "
                               "(space leak); 'gc --full' recounts")
    use: dict[str, int] = {}
    for point in snap.catalog.values():
        for disk in point.disks:
            use[disk.map] = use.get(disk.map, 0) + 1
    if use != snap.mapuse:
        report.errors.append("map use counts disagree with the catalog; run 'gc --full'")


def _orphans(repo: Repository, snap: _Snapshot, report: VerifyReport) -> None:
    names = {v[0] for v in snap.packs.values()}
    skipped = report.warnings  # symlinks, FIFOs, ... where files belong: never followed
    packs = objects_under(repo, "packs", skipped)
    used_maps = (set(snap.mapuse) | set(snap.deadmaps)  # the counts may not be kept (shared)
                 | {d.map for p in snap.catalog.values() for d in p.disks})
    report.orphans = {
        "packs": sorted(set(packs) - names - snap.deadpacks),
        "maps": sorted(set(objects_under(repo, "maps", skipped)) - used_maps),
        "manifests": sorted(set(objects_under(repo, "points", skipped)) - set(snap.catalog)
                            - snap.forgetting),
        "awaiting_deletion": sorted(snap.deadpacks),
    }


def repair_manifests(repo: Repository) -> list[str]:
    """Rewrite missing or damaged manifests of catalogued points from their catalog records (the
    VM configuration, which only the manifest holds, is lost and noted). Returns the point ids."""
    fixed = []
    for point in repo.points():
        try:
            manifest = repo.load_point(point.id)
            if manifest.generation >= point.generation:
                continue
        except RepoError:
            pass
        point.notes = point.notes + ["manifest rebuilt from the index catalog by 'verify "
                                     "--repair': the VM configuration was lost"]
        repo.write_manifest(point)
        fixed.append(point.id)
    return fixed
