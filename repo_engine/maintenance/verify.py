"""verify: the repository's metadata is consistent (no chunk data is read; that is scrub).

Checks, against one consistent snapshot of the index:
1. every catalog record passes its check, and every catalogued point has its manifest,
   undamaged, of the catalog's generation and saying what the catalog record says;
2. every disk's chain resolves: parents catalogued, map files present and undamaged;
3. every ref a map in use names is in the index and not quarantined;
4. every index entry points into an indexed pack whose file exists and whose trailer lists the
   same ref with the same id, offset, lengths and codec;
5. the index's tables agree with each other: each `ids` entry names a ref whose place record
   holds the same id (else a backup could deduplicate a block to another chunk) and that
   `unfindable` does not list (else it could deduplicate against a doomed or damaged chunk),
   every `unfindable` entry passes its check,
   `packs` and `packnames` map names and numbers both ways;
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

from ..errors import ChainBroken, RepoError
from ..pause import pause_point
from ..repository.blockmap import holds
from ..repository.index import Index
from ..repository.index_records import PACK_KEY, DamagedRecord, pack_fields, ref_keys, refs_found
from ..repository.locks import SHARED
from ..repository.points import PointRecord
from ..repository.repo import Repository
from .gc import tally_drift
from .inventory import (Affected, affected_by, chain_gap, chain_maps, count_damage,
                        objects_under, scan_u64_keys, sealed_u64, unfindable_refs)
from .tally import (REF_ROW, RefTable, Tally, batches, fingerprints, read_ref_table,
                    ref_rows)

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
    """What verify holds of the index snapshot `txn` (the tables it streams are read from
    `txn` itself, a batch at a time: tally.py)."""

    txn: lmdb.Transaction
    catalog: dict[str, PointRecord]
    bad_records: list[str]
    forgetting: set[str]
    table: RefTable
    packnames: dict[str, int]
    packs: dict[int, tuple[str, int, int]]
    deadpacks: set[str]
    quarantine: np.ndarray
    mapuse: dict[str, int]
    deadmaps: dict[str, int]
    counts_valid: bool
    count_damage: list[str]


def _snapshot(repo: Repository, txn: lmdb.Transaction) -> _Snapshot:
    index = repo.index
    catalog, bad_records = _catalog(index, txn)
    return _Snapshot(
        txn=txn,
        catalog=catalog,
        bad_records=bad_records,
        forgetting={k.decode() for k, _ in txn.cursor(db=index.forgetting)},
        table=read_ref_table(txn, index, prints=True),
        packnames={k.hex(): PACK_KEY.unpack(v)[0] if len(v) == PACK_KEY.size else -1
                   for k, v in txn.cursor(db=index.packnames)},
        packs={PACK_KEY.unpack(k)[0]: pack_fields(v) for k, v in txn.cursor(db=index.packs)},
        deadpacks={k.hex() for k, _ in txn.cursor(db=index.deadpacks)},
        quarantine=scan_u64_keys(txn, index.quarantine),
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
    before we end (it waits for every session that held a lock when it changed the index).
    verify reads every table of the index whole: it maps the index for scans."""
    with repo.lock(SHARED, "verify"), repo.scanning():
        return _verify(repo, tick)


def _verify(repo: Repository, tick: Callable[[int], None] | None) -> VerifyReport:
    started = time.monotonic()
    with repo.index.env.begin() as txn:
        snap = _snapshot(repo, txn)
        pause_point("verify.snapshot")
        report = _checked(repo, snap, tick)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _checked(repo: Repository, snap: _Snapshot,
             tick: Callable[[int], None] | None) -> VerifyReport:
    report = VerifyReport(points=len(snap.catalog), refs=len(snap.table), packs=len(snap.packs))
    bad_points: set[str] = set()
    report.errors += snap.bad_records
    _check_manifests(repo, snap, report, bad_points)
    _check_tables(repo.index, snap, report)
    used = {d.map for p in snap.catalog.values() for d in p.disks}
    report.maps = len(used)
    tally = Tally(snap.table)
    tally.add_maps(repo, used)
    live = _Live(snap.table, tally.counts > 0, tally.extra()[0])
    bad_maps = _check_chains(snap, tally.errors, report, bad_points)
    bad_refs = _check_refs(snap, live, report)
    bad_refs = np.union1d(bad_refs, _check_packs(repo, snap, report, tick))
    report.errors += [f"{damage}: gc would not trust the counts; run 'repo-engine gc --full' "
                      "(or 'repo-engine rebuild-index')" for damage in snap.count_damage]
    if snap.counts_valid:
        _check_counts(repo, snap, tally, report)
    elif not repo.config.shared:  # a shared repository's caches keep no counts (gc recounts)
        report.warnings.append("reference counts are not maintained yet; run 'gc --full'")
    _orphans(repo, snap, report)
    live_bad = bad_refs[live.holds(bad_refs)]
    if len(live_bad) or bad_maps:
        report.affected = affected_by(repo, live_bad, bad_maps, list(snap.catalog.values()))
    elif len(bad_refs):
        report.warnings.append(f"{len(bad_refs)} damaged index entries or chunks are not used "
                               "by any point (gc removes them)")
    bad_points |= {a.point for a in report.affected}
    report.damaged_points = sorted(bad_points)
    return report


@dataclass
class _Live:
    """The refs the maps in use hold: those of the table marked, those it lacks (`missing`)."""

    table: RefTable
    marks: np.ndarray
    missing: np.ndarray

    def holds(self, refs: np.ndarray) -> np.ndarray:
        refs = np.asarray(refs, np.uint64)
        pos, found = self.table.find(refs)
        marked = found & (self.marks[pos] if len(self.marks) else False)
        return marked | holds(self.missing, refs)  # `missing` is sorted and unique


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


def _check_tables(index: Index, snap: _Snapshot, report: VerifyReport) -> None:
    """The index's tables against each other: ids -> refs (each entry's id against the
    fingerprint of the id its ref's place record holds, and its ref not unfindable), packs <->
    packnames."""
    disagree = hidden = 0
    unfindable, damage = unfindable_refs(index, snap.txn)
    if damage:
        report.errors.append(damage)
    for keys, values in batches(snap.txn, index.ids, sized=("ids", 8)):
        ids = np.frombuffer(keys, "V32")
        refs = np.frombuffer(values, "<u8")
        pos, found = snap.table.find(refs)
        agree = found & (snap.table.id_prints[pos] == fingerprints(ids) if len(snap.table)
                         else False)
        disagree += int((~agree).sum())
        hidden += int(holds(unfindable, refs.astype(np.uint64)).sum())
    if disagree:
        report.errors.append(f"{disagree} entries of the index's ids table name a "
                             "chunk ref whose place record holds another chunk id (a backup "
                             f"could deduplicate to the wrong chunk); {REBUILD}")
    if hidden:
        report.errors.append(f"{hidden} entries of the index's ids table name a chunk ref "
                             "taken out of deduplication (unfindable: doomed by gc or "
                             "quarantined as damaged; a backup could deduplicate against it); "
                             f"{REBUILD}")
    by_name = {name: number for number, (name, _size, _count) in snap.packs.items()}
    if by_name != snap.packnames:
        wrong = len(set(by_name.items()) ^ set(snap.packnames.items()))
        report.errors.append(f"the index's packs and packnames tables disagree ({wrong} "
                             f"entries); {REBUILD}")


def _check_chains(snap: _Snapshot, errors: dict[str, str], report: VerifyReport,
                  broken: set[str]) -> set[str]:
    """Every disk's chain resolves; `errors`: the maps in use that cannot be read. The points
    whose chain lacks an ancestor are added to `broken`."""
    bad_maps: set[str] = set()
    for point in snap.catalog.values():
        for disk in point.disks:
            gap = chain_gap(snap.catalog, point, disk.key)
            if gap is not None:
                cause = (f"has no disk {disk.key!r}" if gap in snap.catalog else
                         "is not in the catalog (its manifest is missing or damaged)")
                report.errors.append(str(ChainBroken(point.id, disk.key, gap, cause)))
                broken.add(point.id)
                continue
            bad_maps.update(name for name in chain_maps(snap.catalog, point, disk.key)
                            if name in errors)
    for name in sorted(bad_maps):
        report.errors.append(f"block map {name}: {errors[name]}")
    return bad_maps


def _check_refs(snap: _Snapshot, live: _Live, report: VerifyReport) -> np.ndarray:
    missing = live.missing
    if len(missing):
        report.errors.append(f"{len(missing)} chunk refs used by points are not in the index "
                             f"(first: {missing[:5].tolist()})")
    quarantined = snap.quarantine[live.holds(snap.quarantine)]
    if len(quarantined):
        report.errors.append(f"{len(quarantined)} chunks used by points are quarantined as "
                             f"damaged (first refs: {quarantined[:5].tolist()})")
    return np.union1d(missing, quarantined)


def _check_packs(repo: Repository, snap: _Snapshot, report: VerifyReport,
                 tick: Callable[[int], None] | None) -> np.ndarray:
    """Every index entry against its pack's trailer; returns the refs that do not match. A
    pack's entries are looked up by the refs its trailer lists; those its trailer does not
    list (damage only) are found by one more pass over the table."""
    bad: list[np.ndarray] = []
    unmatched: dict[int, np.ndarray] = {}  # pack: refs of its entries that matched an entry
    for number in sorted(set(snap.packs) | set(snap.table.packs.tolist())):
        count = snap.table.rows_in(number)
        if tick:
            tick(1)
        if number not in snap.packs:
            report.errors.append(f"{count} index entries name pack number {number}, which the "
                                 "index does not list")
            unmatched[number] = np.zeros(0, np.uint64)
            continue
        name = snap.packs[number][0]
        try:
            entries = repo.read_trailer(name)
        except RepoError as exc:
            report.errors.append(f"{exc} ({count} chunks)")
            unmatched[number] = np.zeros(0, np.uint64)
            continue
        mismatched, placed = _against_trailer(repo.index, snap.txn, number, entries)
        wrong = len(mismatched) + count - len(placed)
        if wrong:
            report.errors.append(f"pack {name}: {wrong} index entries disagree with its trailer")
            bad.append(mismatched)
        if count > len(placed):
            unmatched[number] = placed
    if unmatched:
        bad.append(_entries_of(repo.index, snap.txn, unmatched))
    return np.unique(np.concatenate(bad)).astype(np.uint64) if bad else np.zeros(0, np.uint64)


def _entries_of(index: Index, txn: lmdb.Transaction,
                packs: dict[int, np.ndarray]) -> np.ndarray:
    """The refs of the entries placed in `packs` but not among the refs given for each."""
    numbers = np.array(sorted(packs), np.int64)
    out = []
    for refs, rows in ref_rows(txn, index):
        pack = rows["pack"].astype(np.int64)
        hit = np.isin(pack, numbers)
        for number in np.unique(pack[hit]).tolist():
            mine = refs[pack == number]
            out.append(mine[~np.isin(mine, packs[number])])
    return np.concatenate(out) if out else np.zeros(0, np.uint64)


def _against_trailer(index: Index, txn: lmdb.Transaction, number: int,
                     entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(refs of the entries placed in pack `number` that disagree with its trailer, refs of
    all its entries its trailer lists). Several trailer entries may share a ref: the one at
    the lowest offset is compared."""
    if not len(entries):
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    firsts = entries[np.lexsort((entries["offset"], entries["ref"]))]
    keys = firsts["ref"].astype(np.uint64)
    unique = np.ones(len(keys), bool)
    unique[1:] = keys[1:] != keys[:-1]
    firsts, keys = firsts[unique], keys[unique]
    found = [(k, v) for k, v in txn.cursor(db=index.refs).getmulti(ref_keys(keys))
             if len(v) == REF_ROW.itemsize]
    refs = refs_found(found)
    rows = np.frombuffer(b"".join(v for _, v in found), REF_ROW)
    mine = rows["pack"] == number
    refs, rows = refs[mine], rows[mine]
    found_entries = firsts[np.searchsorted(keys, refs)]
    ok = found_entries["offset"] == rows["offset"]
    ok &= (found_entries["stored"] == rows["stored"]) & (found_entries["raw"] == rows["raw"])
    ok &= found_entries["codec"] == rows["codec"]
    ok &= found_entries["id"] == rows["id"]
    return refs[~ok], refs


def _check_counts(repo: Repository, snap: _Snapshot, tally: Tally,
                  report: VerifyReport) -> None:
    for name, owed in snap.deadmaps.items():  # maps whose decrements gc still owes count
        tally.add_maps(repo, [name], {name: owed})
    drift = tally_drift(repo.index, snap.txn, tally)
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
