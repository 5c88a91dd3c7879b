"""Garbage collection: reclaim chunks, maps, manifests and packs no catalogued point uses, while
backups keep running (they hold only shared locks; gc holds the maintenance lock).

Reference counts (index.py): `mapuse` counts the catalogued disk records naming each map file;
`refcount` counts, per ref, the in-use map files containing it. A catalog commit moves both in the
same transaction, so a ref with a count > 0 is used by a catalogued point and is never a candidate.
A map whose use drops to 0 owes decrements (`deadmaps`), which gc applies by reading the map; refs
reaching 0 are queued in `gcq`. Work is proportional to what was forgotten (plus the packs written
since the last gc, whose refs may never have been counted: a crashed backup's). `gc --full`
recomputes every count from the catalog (mark) and queues every uncounted ref (sweep), and reports
how far the kept counts were off.

The counts gc trusts are sealed (repository/seals.py). Before an incremental run trusts them, gc
checks every seal of mapuse, refcount, deadmaps and packlive (all rows at once): a value lowered
or a key moved by damage fails its check, and a decrement that finds no count to take from is
damage too. Either makes the run a full one: it recounts from the catalog before it deletes
anything, and reports the damage (`counts_damaged`). gcq and deadpacks need no seal: a queued
ref is dropped only when it has no count (a flipped gcq key names a ref no point uses, or none),
and a queued pack file is deleted only when its name is not listed in `packnames`. An
`unfindable` entry that fails its check (seals.py) stops gc before anything is done
(rebuild-index): a doomed ref may have lost its listing.

A run, each step crash-safe (a rerun finishes it):

0. Refuse, before anything is done, while a catalogued point's chain is broken (an ancestor not
   catalogued: its manifest lost, then the index rebuilt): the lost
   ancestor's map is counted by no record, so the chunks only it holds would look unused, yet
   the map and those chunks are what mends the chain once its record is put back.
1. Finish removals a forget left marked (forget.py).
2. Apply owed decrements (incremental) or recount (full). Candidates = `gcq`. When the dead maps
   far outnumber the maps in use (a forget of most points: the first prune of a long history),
   an incremental run recounts too (`_live_side_cheaper`): reading the maps in use and the
   `refs` table costs less than reading every dead map and every trailer indexed since the last
   gc, and leaves the same counts, candidates and live counts when the kept counts are sound.
   Then what a gc killed between its mark and its sweep left out is given back: a ref
   `unfindable` lists that a count holds (a backup that had looked it up before that mark
   committed since, which took it out of `gcq`) gets its `ids` entry back as step 5 would have
   given it (`_give_back_counted`), else every later backup would store it again.
3. Make candidates unfindable: delete their `ids` entries and list their refs in `unfindable`
   (which a backup's look-up by locality reads), so a backup looking a chunk up from now on
   stores a fresh copy. List unused map files, manifests not catalogued, pack files not indexed,
   and the temporary files and pack spool files dead processes of this host left (the listing
   of the object directories finds them: `inventory.list_store`, `inventory.dead_writes`).
4. Wait until every session that held a lock at that moment has ended: a backup that started
   before step 3 may have looked up a candidate, or may be about to commit a map or a manifest or
   a pack we listed; a restore, verify, scrub or read-only command may be reading what we are
   about to delete. Sessions that start later cannot reach any of them.
5. In one transaction re-check: a candidate whose count rose (a waited-for backup committed a
   point using it) gets its `ids` entry back and leaves `unfindable` (unless quarantined); the
   rest are dropped from the index; listed files still unused are deleted (by the command's
   Deleter, deleter.py, while the candidates are dropped; map files are gone before the
   transaction commits: a backup's commit checks its maps exist inside its own transaction, and
   rewrites one gc removed). Packs with no live chunk leave the index and are queued in
   `deadpacks`.
6. Repack packs whose unused share exceeds `max_unused`: copy their live chunks (each checked
   against its id) into new packs, made durable, then move the refs to them in one transaction;
   the old packs are queued in `deadpacks`.
7. Wait for the sessions running now (restores may hold places in queued packs), then delete the
   queued pack files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import numpy as np

from ..errors import ChainBroken, DamageError, LockedError, RepoError
from ..repository.store import ObjectDamaged, ObjectMissing
from ..pause import pause_point
from ..repository.index import CHECK_FAILED, PRESENT, U64, WRONG_SIZE, Index, lacks
from ..repository.index_records import (LIVE_REC, PACK_KEY, PACK_REC, REF_KEY, REF_REC,
                                         REF_REC_DTYPE, pack_fields, ref_keys, refs_found)
from ..repository.lmdbfile import sized_batches
from ..repository.locks import MAINTENANCE, SHARED
from ..repository.blockmap import map_object
from ..repository.packs import PackWriter, blob_bytes, pack_object
from ..repository.points import point_object
from ..repository.repo import Repository
from ..repository.seals import KEY, CountDamaged, seal_rows
from . import forget
from .deleter import Deleter
from .forget import ForgetReport
from .inventory import (chain_gap, count_damage, dead_tmp_files, dead_writes, list_store,
                        remove_files, scan_sealed, sessions, trusted_unfindable, wait_for)
from .tally import ROWS, RefTable, Tally, read_ref_table, ref_rows, sealed_batches

Tick = Callable[[str], None]
GIVE_BACK_BATCH = 1 << 16  # refs looked up at once when counted refs are made findable again
Placed = Callable[[int], "np.ndarray | None"]  # the refs that may place chunks in a pack
SETTLE_REFS = 1 << 20  # refs of dead maps settled in one transaction (about 100 MiB)
# Decrements one dead map can owe: one each time its use fell to 0 before gc settled it. More
# is damage, as a decrement larger than the count is; and owed amounts summed per ref in int64
# must not overflow.
MAX_OWED = 1 << 32
TRAILER_REFS = 1 << 22  # refs of the trailers queue_uncounted read that the sweep reuses (32 MiB)


@dataclass
class GcReport:
    mode: str = "incremental"
    dry_run: bool = False
    forgets_finished: int = 0
    maps_settled: int = 0
    candidates: int = 0
    resurrected: int = 0
    chunks_dropped: int = 0
    stored_bytes_dropped: int = 0
    maps_deleted: int = 0
    manifests_deleted: int = 0
    orphan_packs_deleted: int = 0
    tmp_files_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    packs_deleted: int = 0
    freed_bytes: int = 0
    damaged_packs_skipped: list[str] = field(default_factory=list)
    recount: dict = field(default_factory=dict)
    counts_damaged: list[str] = field(default_factory=list)
    waited_seconds: float = 0.0
    seconds: float = 0.0


@dataclass
class _Listed:
    candidates: list[int]
    maps: list[str]  # names
    manifests: list[str]  # point ids
    packs: dict[str, int]  # name: size
    tmp: list[Path]  # spool files
    temps: list[str]  # temporary files of writes killed, by object name
    pack_sizes: dict[str, int]  # every pack file listed: name: size


def gc(repo: Repository, *, full: bool = False, dry_run: bool = False, max_unused: float = 10.0,
       wait_timeout: float | None = None, tick: Tick | None = None,
       grace: float | None = None, repack: bool = False) -> GcReport:
    """`grace`: a shared repository's grace period in seconds (shared_gc.py; None: its default);
    `repack`: a shared repository's gc rewrites partly used packs (otherwise reports the cost;
    this gc always repacks)."""
    if repo.config.shared:  # many hosts, no counts: plan, wait for leases, sweep
        from .shared_gc import DEFAULT_GRACE, gc as shared_gc

        return shared_gc(repo, grace=DEFAULT_GRACE if grace is None else grace, dry_run=dry_run,
                         max_unused=max_unused, repack=repack, tick=tick)
    started = time.monotonic()
    report = GcReport(mode="full" if full else "incremental", dry_run=dry_run)
    if dry_run:
        with repo.lock(SHARED, "gc --dry-run"):  # a reader: the maps it reads stay
            refuse_broken_chains(repo)  # as gc would: the lost map's chunks look unused
            _dry_run(repo, report, max_unused)
        report.seconds = round(time.monotonic() - started, 3)
        return report
    with repo.lock(MAINTENANCE, "gc") as lock, Deleter(repo.store) as deleter:
        collect(repo, lock.path, deleter, report, full=full, max_unused=max_unused,
                wait_timeout=wait_timeout, tick=tick)
    report.waited_seconds = round(report.waited_seconds, 3)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def forget_and_collect(repo: Repository, ids: list[str], *,
                       tick: Callable[[int], None] | None = None) -> tuple[ForgetReport, GcReport]:
    """`forget_points(ids)` then `gc`, under one maintenance lock: the manifests the forget
    deletes and gc's own deletions go to one Deleter, so they overlap gc's counting and sweep
    instead of waiting for one another. A shared repository forgets, then collects."""
    if repo.config.shared:
        return forget.forget_points(repo, ids, tick=tick), gc(repo)
    report = GcReport()
    with repo.lock(MAINTENANCE, "forget --prune") as lock, Deleter(repo.store) as deleter:
        # before the forget, judged as after it: a forget whose prune gc refuses is not done
        refuse_broken_chains(repo, leaving=set(ids))
        forgotten = forget.forget_locked(repo, ids, tick=tick, deleter=deleter)
        started_gc = time.monotonic()
        collect(repo, lock.path, deleter, report)
    report.waited_seconds = round(report.waited_seconds, 3)
    report.seconds = round(time.monotonic() - started_gc, 3)
    return forgotten, report


def collect(repo: Repository, lock_path: Path, deleter: Deleter, report: GcReport, *,
            full: bool = False, max_unused: float = 10.0, wait_timeout: float | None = None,
            tick: Tick | None = None) -> None:
    """A gc run (steps 1 to 7) for a caller holding the maintenance lock (its file:
    `lock_path`), its deletions through `deleter`."""
    placed: Placed = _no_places
    refuse_broken_chains(repo)
    report.forgets_finished = len(forget.finish_pending(repo, deleter).removed)
    with repo.index.env.begin() as txn:
        trusted_unfindable(repo.index, txn)  # a doomed ref may have lost its listing
        report.counts_damaged = count_damage(repo.index, txn)
    recounted = None
    if not full and not report.counts_damaged and repo.index.counts_valid():
        recounted = _count_from_live_maps(repo, report) if _live_side_cheaper(repo) else None
        if recounted is None:
            report.maps_settled = settle_dead_maps(repo)
            placed = queue_uncounted(repo).get
        else:
            placed = recounted.placed
    report.counts_damaged += repo.index.damage_seen  # reported once
    repo.index.damage_seen.clear()
    if recounted is None and (full or report.counts_damaged
                              or not repo.index.counts_valid()):
        report.mode = "full"
        report.recount = recount(repo)
    report.resurrected = _give_back_counted(repo)
    listed = _mark(repo, deleter.given)
    report.candidates = len(listed.candidates)
    report.waited_seconds += wait_for(repo, sessions(repo, lock_path), timeout=wait_timeout,
                                      tick=tick)
    repo.check_locks()  # the waits counted on our lock: another gc may hold one now
    _sweep(repo, listed, report, placed, deleter)
    _repack(repo, max_unused, report, tick)
    if _any_dead_pack(repo):
        report.waited_seconds += wait_for(repo, sessions(repo, lock_path),
                                          timeout=wait_timeout, tick=tick)
        repo.check_locks()
        _delete_dead_packs(repo, report, listed.pack_sizes, deleter)


# -- step 0: chains whole ----------------------------------------------------------------------
GC_ADVICE = ("gc deletes nothing while a chain is broken (chunks only the lost ancestor's map "
             "holds would look unused): put its manifest back and run 'repo-engine "
             "rebuild-index', or forget the points whose chain is broken ('repo-engine verify' "
             "lists them)")


def refuse_broken_chains(repo: Repository, leaving: Collection[str] = ()) -> None:
    """ChainBroken when a catalogued point's chain lacks an ancestor (a manifest lost, then
    the index rebuilt without it): that ancestor's map is no longer counted, and its chunks,
    which the point still needs, would be collected. A map in use that cannot be read needs
    no refusal: its counts stay (`gc --full`, which would recount without it, refuses). One
    pass over the catalog, as the mark's. The points `leaving` (a forget's, before it runs)
    are not judged: forgetting every broken point is how the user mends the chains."""
    points = repo.points()
    catalog = {p.id: p for p in points}
    for point in points:
        if point.id in leaving:
            continue
        for disk in point.disks:
            gap = chain_gap(catalog, point, disk.key)
            if gap is not None:
                cause = (f"has no disk {disk.key!r}" if gap in catalog else
                         "is not in the catalog (its manifest is missing or damaged)")
                raise ChainBroken(point.id, disk.key, gap, cause, GC_ADVICE)


# -- step 2: counts -----------------------------------------------------------------------------
def settle_dead_maps(repo: Repository) -> int:
    """Apply the decrements owed by maps whose use dropped to 0; returns maps settled. A damaged
    count met on the way distrusts the counts (Index.add_refs), and gc recounts. The maps are
    settled in few transactions (SETTLE_REFS refs each): a forget of thousands of points
    leaves thousands of dead maps, and a commit each would cost a sync each."""
    index = repo.index
    with index.env.begin() as txn:
        owed = [k for k, _ in txn.cursor(db=index.deadmaps)]
    settled, batch, held = 0, [], 0
    for key in owed:
        try:
            refs = repo.map_refs(key.hex())
        except RepoError:
            continue  # counts stay high: a leak, never a loss; verify reports the map
        batch.append((key, refs))
        held += len(refs)
        if held >= SETTLE_REFS:
            settled += _settle(index, batch)
            batch, held = [], 0
    return settled + _settle(index, batch)


def _settle(index: Index, batch: list[tuple[bytes, np.ndarray]]) -> int:
    """Settle the dead maps of `batch` (key, unique refs) in one transaction. Their decrements
    are summed per ref and applied in one call: a ref many of the maps hold is looked up,
    checked and sealed once, and a sum taking a count below 0 is damage as a lone decrement
    would be."""
    settled = 0
    refs, owed = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
    with index.write() as txn:
        for key, map_refs in batch:
            try:
                raw = index.get_sealed(txn, "deadmaps", key)
            except CountDamaged as exc:
                index.distrust_counts(txn, exc)
                continue
            if raw is None:
                continue
            owes = U64.unpack(raw)[0]
            if owes > MAX_OWED:
                index.distrust_counts(txn, CountDamaged("deadmaps", key,
                                                        f"{owes} decrements owed"))
                continue
            refs.append(map_refs)
            owed.append(np.full(len(map_refs), owes, np.int64))
            txn.delete(key, db=index.deadmaps)
            settled += 1
        unique, sums = _sum_by_ref(np.concatenate(refs), np.concatenate(owed))
        if len(unique):
            index.add_refs(txn, unique, -sums)
    return settled


def _sum_by_ref(refs: np.ndarray, amounts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct refs sorted, the sum of `amounts` of each)."""
    order = np.argsort(refs, kind="stable")
    refs, amounts = refs[order], amounts[order]
    if not len(refs):
        return refs, amounts
    starts = np.flatnonzero(np.concatenate(([True], refs[1:] != refs[:-1])))
    return refs[starts], np.add.reduceat(amounts, starts)


def queue_uncounted(repo: Repository) -> dict[int, np.ndarray]:
    """Queue live refs without a count in packs indexed since the last gc (a crashed or running
    backup's chunks; a running backup's come back in step 5). Returns the refs of the trailers
    read, by pack number (up to TRAILER_REFS in all): a pack this run empties is checked
    against them (`_unplaced`) instead of being read again (packs are immutable)."""
    index = repo.index
    mark, end = index.meta_u64("gc_mark"), index.meta_u64("next_pack")
    found = []
    trailers: dict[int, np.ndarray] = {}
    held = 0
    with index.env.begin() as txn:
        for number, raw in _packs_from(txn, index, mark, end):
            name = PACK_REC.unpack(raw)[0].hex()
            try:
                entries = repo.read_trailer(name)
            except RepoError:
                continue
            found += _uncounted_in(txn, index, number, entries)
            if held + len(entries) <= TRAILER_REFS:
                trailers[number] = entries["ref"].astype(np.uint64)
                held += len(entries)
    with index.write() as txn:
        for key in found:
            if txn.get(key, db=index.refcount) is None:
                txn.put(key, b"", db=index.gcq)
        txn.put(b"gc_mark", U64.pack(end), db=index.meta)
    return trailers


def _uncounted_in(txn: lmdb.Transaction, index: Index, number: int,
                  entries: np.ndarray) -> list[bytes]:
    """The keys of the refs of pack `number`'s trailer `entries` that have no count and that
    the index places at that pack and offset: two batched look-ups for the pack (most of its
    refs are counted), not two per chunk."""
    refs = entries["ref"].astype(np.uint64)
    todo = lacks(txn, index.refcount, refs)
    if not todo.any():
        return []
    offsets = dict(zip(refs[todo].tolist(), entries["offset"][todo].tolist()))
    found = []
    for key, rec in txn.cursor(db=index.refs).getmulti(ref_keys(refs[todo])):
        _, pack, off, *_ = REF_REC.unpack(rec)
        if pack == number and off == offsets[REF_KEY.unpack(key)[0]]:
            found.append(key)
    return found


def _packs_from(txn: lmdb.Transaction, index: Index, first: int,
                end: int) -> Iterator[tuple[int, bytes]]:
    """(number, record) of the listed packs numbered in [first, end): walks the table, not the
    range, so a damaged counter costs no endless loop."""
    cursor = txn.cursor(db=index.packs)
    if first >= 1 << 32 or not cursor.set_range(PACK_KEY.pack(first)):
        return
    for key, raw in cursor.iternext():
        number = PACK_KEY.unpack(key)[0]
        if number >= end:
            return
        yield number, raw


def recount(repo: Repository, attempts: int = 5, *, strict: bool = True) -> dict:
    """Recompute map use and ref counts from the catalog; queue every uncounted ref. `strict`:
    refuse when a map in use cannot be read (its chunks would look unused). The tables and maps
    are read a batch or a map at a time (tally.py): about 13 bytes a chunk are held."""
    done = _recounted(repo, attempts, strict=strict)
    if done is None:
        raise LockedError("the catalog kept changing during gc --full; run it again")
    return done.drift


class _Unreadable(DamageError):
    """A map in use cannot be read: a recount would take its chunks for unused."""


@dataclass
class _Recount:
    drift: dict  # the kept counts against the recount (tally_drift)
    dead_maps: int  # the maps owing decrements the recount made moot
    placed: "Placed"  # refs by the pack the recounted snapshot placed them in


def _recounted(repo: Repository, attempts: int, *, strict: bool,
               places: bool = False) -> _Recount | None:
    """The recount of `recount`, written; None when the catalog changed under every attempt.
    `places`: keep each ref's pack (4 bytes a chunk more) for the sweep (`_Placed`)."""
    index = repo.index
    for _ in range(attempts):
        with index.env.begin() as txn:
            catalog = {k: v for k, v in txn.cursor(db=index.points)}
            table = read_ref_table(txn, index, places=places)
            next_pack = index._get_u64(txn, b"next_pack", index.meta)
            dead_maps = txn.stat(index.deadmaps)["entries"]
            pause_point("gc.recount")
            use: dict[str, int] = {}
            for key, value in catalog.items():
                for disk in index.record(key, value)["disks"]:
                    use[disk["map"]] = use.get(disk["map"], 0) + 1
            tally = Tally(table)
            tally.add_maps(repo, use)
            if tally.errors and strict:
                raise _Unreadable(f"{len(tally.errors)} block maps in use cannot be read "
                                  f"(first: {next(iter(tally.errors.values()))}); run 'verify'")
            drift = tally_drift(index, txn, tally)
        if _replace_counts(index, catalog, use, tally, next_pack):
            placed = _Placed.of(table, next_pack).get if places else _no_places
            return _Recount(drift, dead_maps, placed)
    return None


# What a count costs, in microseconds as measured (repository of 10,000 points on a local disk):
# a map read (open, check, decompress, distinct refs), a byte of map file on top, a trailer
# read, a `refs` row recounted (read, tallied, its count written), a pack's live count written.
MAP_US, MAP_BYTE_US, TRAILER_US, ROW_US, PACK_US = 80, 0.01, 50, 2, 4


def _live_side_cheaper(repo: Repository) -> bool:
    """Whether counting the maps in use (a recount) costs less than settling the dead maps and
    reading the trailers of the packs indexed since the last gc: after a forget of most points
    (the first prune of a long history) the dead maps far outnumber the live ones. The live
    maps' sizes are looked up only when the counts alone leave the recount cheaper."""
    index = repo.index
    with index.env.begin() as txn:
        stat = {name: txn.stat(getattr(index, name))["entries"]
                for name in ("deadmaps", "mapuse", "refs", "packs")}
        fresh = index.meta_u64_in(txn, "next_pack") - index.meta_u64_in(txn, "gc_mark")
        settle = stat["deadmaps"] * MAP_US + min(max(fresh, 0), stat["packs"]) * TRAILER_US
        cost = stat["mapuse"] * MAP_US + stat["refs"] * ROW_US + stat["packs"] * PACK_US
        if cost >= settle:
            return False
        live = [key.hex() for key, _ in txn.cursor(db=index.mapuse)]
    return cost + sum(_map_size(repo, name) for name in live) * MAP_BYTE_US < settle


def _map_size(repo: Repository, name: str) -> int:
    """The stored size of map `name` for costing only: 0 when it is gone or not a regular file
    (the recount then meets it as a map it cannot read, and the dead maps are settled)."""
    try:
        return _size(repo, map_object(name))
    except ObjectDamaged:
        return 0


def _count_from_live_maps(repo: Repository, report: GcReport) -> _Recount | None:
    """Settle the counts by a recount from the catalog's maps instead of the dead maps' decrements
    (`_live_side_cheaper`): the same counts, map use, candidates, live counts and `gc_mark` the
    decrements and `queue_uncounted` leave when the kept counts are sound, from the ground truth
    `gc --full` uses. The kept counts are then at least the recount (a dead map's refs only
    raise them): a count found lower is damage, reported, and the recount already repaired it.
    None (the caller settles the dead maps) when a map in use cannot be read (the decrements
    need no such map; verify reports it) or the catalog kept changing."""
    try:
        done = _recounted(repo, 2, strict=True, places=True)
    except _Unreadable:
        return None
    if done is None:
        return None
    report.maps_settled = done.dead_maps
    if done.drift["under_counted"]:
        report.mode, report.recount = "full", done.drift
        report.counts_damaged.append(f"refcount: {done.drift['under_counted']} refs counted "
                                     "lower than the catalog's maps need (recounted)")
    return done


@dataclass
class _Placed:
    """The refs one snapshot of `refs` placed in each pack numbered below its `next_pack` (`end`),
    by pack: no later ref is placed in such a pack (a new chunk goes to a new pack, and only gc,
    which holds the maintenance lock, moves refs), so these are all the refs that may still place
    a chunk there. A later pack: None (its trailer says)."""

    rows: dict[int, tuple[int, int]]  # pack number: its refs' range in `refs`
    refs: np.ndarray  # by pack
    end: int

    @classmethod
    def of(cls, table: RefTable, end: int) -> "_Placed":
        order = np.argsort(table.places, kind="stable")
        numbers, first, count = np.unique(table.places[order], return_index=True,
                                          return_counts=True)
        rows = {n: (f, f + c) for n, f, c in zip(numbers.tolist(), first.tolist(),
                                                 count.tolist())}
        return cls(rows, table.refs[order], end)

    def get(self, number: int) -> np.ndarray | None:
        if number >= self.end:
            return None
        first, last = self.rows.get(number, (0, 0))
        return self.refs[first:last]


def _no_places(_number: int) -> None:
    return None


def tally_drift(index: Index, txn: lmdb.Transaction, tally: Tally) -> dict:
    """How many refs the refcount table `txn` sees (damaged rows as read) counts too low and
    too high against the recount `tally`, the table read a batch at a time."""
    under = over = 0
    seen = np.zeros(len(tally.counts), bool)
    extra = tally.extra()
    extra_seen = np.zeros(len(extra[0]), bool)
    for keys, payloads, _ok in sealed_batches(index, txn, "refcount"):
        refs = keys.copy().view(">u8")[:, 0].astype(np.uint64)
        old = payloads.copy().view("<u8")[:, 0].astype(np.int64)
        new, in_table, in_extra = tally.count_of(refs, extra)
        new = new.astype(np.int64)
        under, over = under + int((old < new).sum()), over + int((old > new).sum())
        seen[in_table] = True
        extra_seen[in_extra] = True
    for start in range(0, len(seen), ROWS):  # counted refs the table has no row for
        end = start + ROWS
        under += int(((tally.counts[start:end] > 0) & ~seen[start:end]).sum())
    under += int(((extra[1] > 0) & ~extra_seen).sum())
    return {"under_counted": under, "over_counted": over}


def _replace_counts(index: Index, catalog: dict, use: dict[str, int], tally: Tally,
                    next_pack: int) -> bool:
    """Write the recount, unless the catalog changed since it was read (returns False).

    Everything written here was derived from the snapshot read before, so it covers exactly what
    the snapshot saw: map use and ref counts (from its catalog, checked unchanged), candidates
    (refs it listed), live counts (packs numbered below its `next_pack`). Packs and refs indexed
    since then, by a running backup, are left as they are: `gc_mark` = the snapshot's
    `next_pack` has the next gc check them."""
    with index.write() as txn:
        now = {k: v for k, v in txn.cursor(db=index.points)}
        if now != catalog:
            return False
        for db in (index.mapuse, index.refcount, index.deadmaps, index.gcq):
            txn.drop(db, delete=False)
        names = sorted(use)
        _put_sealed_rows(txn, index, "mapuse", b"".join(map(bytes.fromhex, names)),
                         np.array([use[n] for n in names], "<u8"))
        for refs, counts in tally.live():
            _put_sealed_rows(txn, index, "refcount", refs.astype(">u8").tobytes(), counts)
        # a map that could not be read (a recount that tolerates it: rebuild-index, verify
        # --repair) may hold any ref counted 0: none is a candidate until a recount reads all
        with txn.cursor(db=index.gcq) as cur:
            for dead in () if tally.errors else tally.dead():
                cur.putmulti(((key, b"") for key in ref_keys(dead)), append=True)
        _write_packlive(txn, index, tally.table, next_pack)
        txn.put(b"counts", U64.pack(1), db=index.meta)
        txn.put(b"gc_mark", U64.pack(next_pack), db=index.meta)
    return True


def _put_sealed_rows(txn: lmdb.Transaction, index: Index, table: str, keys: bytes,
                     counts: np.ndarray) -> None:
    """Append rows of u64 counts, sealed, to an emptied table (`keys` concatenated, sorted)."""
    rows = np.frombuffer(keys, np.uint8).reshape(-1, KEY[table])
    sealed = seal_rows(table, rows, np.asarray(counts, "<u8").view(np.uint8).reshape(-1, 8))
    size, width, values = rows.shape[1], sealed.shape[1], sealed.tobytes()
    with txn.cursor(db=getattr(index, table)) as cur:
        cur.putmulti(((keys[i * size:(i + 1) * size], values[i * width:(i + 1) * width])
                      for i in range(len(counts))), append=True)


def _write_packlive(txn: lmdb.Transaction, index: Index, table: RefTable,
                    next_pack: int) -> None:
    """Live counts of the packs the snapshot `table` saw (numbers below its `next_pack`).
    Packs indexed since (a running backup's) keep theirs: the snapshot knows none of their
    chunks, and a count of 0 would get them retired and deleted. Damaged rows and rows of
    unlisted packs go."""
    numbers, counts, stored = table.packs, table.pack_rows, table.pack_stored
    rows = scan_sealed(index, txn, "packlive")
    for key, ok in zip(map(bytes, rows.keys), rows.ok.tolist()):
        # kept: sound counts of listed packs indexed since the snapshot
        if not ok or PACK_KEY.unpack(key)[0] < next_pack or txn.get(key, db=index.packs) is None:
            txn.delete(key, db=index.packlive)
    listed = np.array([PACK_KEY.unpack(k)[0] for k, _ in txn.cursor(db=index.packs)], np.int64)
    listed = np.union1d(listed[listed < next_pack], numbers)
    live = np.zeros((len(listed), 2), "<u8")  # a listed pack no ref places a chunk in: 0, 0
    at = np.searchsorted(listed, numbers)
    live[at, 0], live[at, 1] = counts, stored
    keys = listed.astype(">u4").view(np.uint8).reshape(-1, 4)
    values = seal_rows("packlive", keys, live.view(np.uint8).reshape(-1, 16))
    for key, value in zip(keys, values):
        txn.put(key.tobytes(), value.tobytes(), db=index.packlive)


def _give_back_counted(repo: Repository) -> int:
    """Step 2's last part (the module docstring): make findable again each ref `unfindable`
    lists that a count holds, unless quarantined; returns how many. The counts are settled (or
    recounted) by now, and under the maintenance lock no other gc is between its mark and its
    sweep, so such a ref is no candidate of a run still going."""
    index = repo.index
    with index.write() as txn:
        hidden = trusted_unfindable(index, txn)
        counted = hidden[~lacks(txn, index.refcount, hidden)]
        shown = 0
        for at in range(0, len(counted), GIVE_BACK_BATCH):  # a gc killed after its mark
            batch = ref_keys(counted[at:at + GIVE_BACK_BATCH])  # of millions lists them all
            shown += index.unhide(txn, txn.cursor(db=index.refs).getmulti(batch))
        return shown


# -- step 3: mark ---------------------------------------------------------------------------
def _mark(repo: Repository, deleting: Collection[str] = ()) -> _Listed:
    """`deleting`: object names handed to a Deleter already (not listed again)."""
    index = repo.index
    listing = list_store(repo)
    maps, manifests = listing.maps, listing.points
    sizes = {n: info.size for n, info in listing.packs.items()}
    tmp = dead_tmp_files(repo, shared=False)
    temps = [temp.name for temp in dead_writes(listing.temps, None)]
    with index.write() as txn:
        candidates, hidden = [], []
        for key, _ in txn.cursor(db=index.gcq):
            candidates.append(REF_KEY.unpack(key)[0])
            rec = txn.get(key, db=index.refs)
            if rec is not None and txn.get(key, db=index.refcount) is None:
                chunk_id = rec[:32]
                if txn.get(chunk_id, db=index.ids) == U64.pack(REF_KEY.unpack(key)[0]):
                    txn.delete(chunk_id, db=index.ids)
                hidden.append(key)
        # by ref too (another copy may hold `ids`): a backup's locality skips it
        index.hide_keys(txn, hidden)
        # a file is deleted only when two tables agree it is unused: one damaged table (mapuse,
        # packnames) must not cost data
        named = {d["map"] for k, v in txn.cursor(db=index.points)
                 for d in index.record(k, v)["disks"]}
        listed = {pack_fields(v)[0] for _, v in txn.cursor(db=index.packs)}
        maps = [n for n in maps if n not in named and not _map_used(txn, index, n)]
        manifests = [i for i in manifests
                     if point_object(i) not in deleting and not _point_known(txn, index, i)]
        packs = {n: size for n, size in sizes.items()
                 if n not in listed and not _pack_known(txn, index, n)}
    return _Listed(candidates, maps, manifests, packs, tmp, temps, sizes)


def _map_used(txn: lmdb.Transaction, index: Index, name: str) -> bool:
    try:
        key = bytes.fromhex(name)
    except ValueError:
        return True  # not ours: leave it alone
    return (txn.get(key, db=index.mapuse) is not None
            or txn.get(key, db=index.deadmaps) is not None)


def _pack_known(txn: lmdb.Transaction, index: Index, name: str) -> bool:
    try:
        key = bytes.fromhex(name)
    except ValueError:
        return True
    return (txn.get(key, db=index.packnames) is not None
            or txn.get(key, db=index.deadpacks) is not None)


def _point_known(txn: lmdb.Transaction, index: Index, point_id: str) -> bool:
    """Catalogued, or being forgotten (a forget deletes the manifest itself when done)."""
    key = point_id.encode()
    return (txn.get(key, db=index.points) is not None
            or txn.get(key, db=index.forgetting) is not None)


# -- step 5: sweep ----------------------------------------------------------------------------
def _sweep(repo: Repository, listed: _Listed, report: GcReport, placed: Placed,
           deleter: Deleter) -> None:
    """`placed(number)`: the refs that may place a chunk in pack `number`, known earlier in this
    run (a trailer read, or the recount's snapshot), or None. The listed files still unused
    are deleted while the candidates are dropped, and are gone before the transaction commits
    (a backup's commit checks that its maps exist inside its own transaction)."""
    index = repo.index
    with index.write() as txn:
        deleted = _delete_unused(txn, index, listed, report, deleter)
        touched = _drop_candidates(txn, index, listed.candidates, report)
        emptied = _lower_lives(txn, index, touched)
        _retire_packs(txn, index, _unplaced(repo, txn, emptied, placed))
        deleted.result()
    report.tmp_files_deleted += remove_files(listed.tmp)


def _delete_unused(txn: lmdb.Transaction, index: Index, listed: _Listed, report: GcReport,
                   deleter: Deleter) -> Future:
    """Hand the listed files still unused (as `txn` sees it) to `deleter`."""
    maps = [map_object(n) for n in listed.maps if not _map_used(txn, index, n)]
    manifests = [point_object(i) for i in listed.manifests if not _point_known(txn, index, i)]
    packs = {n: size for n, size in listed.packs.items() if not _pack_known(txn, index, n)}
    report.maps_deleted += len(maps)
    report.manifests_deleted += len(manifests)
    report.orphan_packs_deleted += len(packs)
    report.tmp_files_deleted += len(listed.temps)
    report.freed_bytes += sum(packs.values())
    return deleter.submit(maps + manifests + [pack_object(n) for n in packs] + listed.temps)


def _drop_candidates(txn: lmdb.Transaction, index: Index, candidates: list[int],
                     report: GcReport) -> dict[int, list[int]]:
    """Drop each candidate still unused from the index (one a waited-for backup counted is
    findable again); returns, per pack, [chunks dropped, stored bytes dropped]."""
    touched: dict[int, list[int]] = {}
    dropped = [0, 0, 0]  # chunks, raw bytes, stored bytes: the index's counters, put once
    for ref in candidates:
        key = REF_KEY.pack(ref)
        rec = txn.get(key, db=index.refs)
        txn.delete(key, db=index.gcq)
        if rec is None:
            continue
        chunk_id, pack, _off, stored, raw, _codec = REF_REC.unpack(rec)
        if txn.get(key, db=index.refcount) is not None:
            index.unhide(txn, [(key, rec)])  # unless quarantined
            report.resurrected += 1
            continue
        txn.delete(key, db=index.refs)
        txn.delete(key, db=index.quarantine)
        index.show_key(txn, key)
        if txn.get(chunk_id, db=index.ids) == U64.pack(ref):
            txn.delete(chunk_id, db=index.ids)
        in_pack = touched.setdefault(pack, [0, 0])
        in_pack[0], in_pack[1] = in_pack[0] + 1, in_pack[1] + stored
        dropped = [dropped[0] + 1, dropped[1] + raw, dropped[2] + stored]
    for name, amount in zip(("chunks", "raw_bytes", "stored_bytes"), dropped):
        index._add(txn, name, -amount)
    report.chunks_dropped += dropped[0]
    report.stored_bytes_dropped += dropped[2]
    return touched


def less_live(txn: lmdb.Transaction, index: Index, pack: int, stored: int,
              chunks: int = 1) -> None:
    """`chunks` chunks of `stored` bytes in all in `pack` are no longer live there (dropped or
    moved). A damaged live count is left for the next gc's recount."""
    key = PACK_KEY.pack(pack)
    try:
        raw = index.get_sealed(txn, "packlive", key)
    except CountDamaged as exc:
        index.distrust_counts(txn, exc)
        return
    if raw is None:
        return
    count, size = LIVE_REC.unpack(raw)
    index.put_sealed(txn, "packlive", key,
                     LIVE_REC.pack(max(count - chunks, 0), max(size - stored, 0)))


def _lower_lives(txn: lmdb.Transaction, index: Index, touched: dict[int, list[int]]) -> list[int]:
    """less_live for each pack of `touched` ({number: [chunks, stored bytes]}) at once, the checks
    of their counts computed together (a forget of thousands of points empties thousands of
    packs); returns the packs whose live count is 0 now, in number order. A damaged count is
    left for the next gc's recount, and its pack in the index. The counts are sealed: a
    writable index seals those of an earlier version on open (Index._check_version)."""
    numbers = sorted(touched)
    keys = np.frombuffer(b"".join(PACK_KEY.pack(n) for n in numbers), np.uint8).reshape(
        len(numbers), PACK_KEY.size)
    payloads, status = index.sealed_rows(txn, "packlive", keys)
    for i in np.flatnonzero(status == WRONG_SIZE).tolist():
        index.distrust_counts(txn, CountDamaged("packlive", keys[i].tobytes()))
    rows = np.flatnonzero((status == PRESENT) | (status == CHECK_FAILED))
    if not len(rows):
        return []
    live = payloads[rows].copy().view("<u8")  # (count, stored) of each row
    gone = np.array([touched[numbers[i]] for i in rows.tolist()], "<u8")
    left = np.where(live > gone, live - gone, 0).astype("<u8")
    sealed = seal_rows("packlive", keys[rows], left.view(np.uint8).reshape(-1, LIVE_REC.size))
    emptied = []
    for j, i in enumerate(rows.tolist()):
        key = keys[i].tobytes()
        if status[i] == CHECK_FAILED:
            index.distrust_counts(txn, CountDamaged("packlive", key))
            continue
        txn.put(key, sealed[j].tobytes(), db=index.packlive)
        if left[j, 0] == 0:
            emptied.append(numbers[i])
    return emptied


def _unplaced(repo: Repository, txn: lmdb.Transaction, numbers: list[int],
              placed: Placed = _no_places) -> list[int]:
    """The packs of `numbers` no ref record places a chunk in any more, which may leave the
    index: a damaged live count must not retire a pack that holds live data. The refs that may
    place a chunk in a pack are those its trailer lists, or `placed(number)` when this run knows
    them already, and all packs' refs are looked up in one batch. A ref record placing one of
    a pack's refs in a pack no record lists keeps the pack too: a damaged `packs` key may have
    moved this pack's record away from the number its refs name. A pack whose trailer cannot
    be read goes (its chunks are lost anyway: verify and scrub report them)."""
    index = repo.index
    owners, counts, refs = [], [], []
    for number in numbers:
        raw = txn.get(PACK_KEY.pack(number), db=index.packs)
        if raw is None:
            continue  # not listed: nothing to keep
        some = placed(number)
        if some is None:
            try:
                some = repo.read_trailer(PACK_REC.unpack(raw)[0].hex())["ref"]
            except RepoError:
                continue
        owners.append(number)
        counts.append(len(some))
        refs.append(some)
    if not refs:
        return numbers
    owner = np.repeat(np.array(owners, np.int64), counts)  # one pass, not an array a pack
    ref = np.concatenate(refs).astype(np.uint64, copy=False)
    place = _places_of(txn, index, ref)
    unlisted = [p for p in np.unique(place[place >= 0]).tolist()
                if txn.get(PACK_KEY.pack(p), db=index.packs) is None]
    keeps = (place == owner) | (place == UNREADABLE) | np.isin(place, unlisted)
    kept = set(np.unique(owner[keeps]).tolist())
    return [number for number in numbers if number not in kept]


UNREADABLE = -2  # _places_of: a ref record of another size (damaged)


def _places_of(txn: lmdb.Transaction, index: Index, refs: np.ndarray) -> np.ndarray:
    """The pack each ref's record places its chunk in (int64), looked up in one batch: -1 for a
    ref without a record, UNREADABLE for a record that does not parse."""
    unique = np.unique(refs)
    found = txn.cursor(db=index.refs).getmulti(ref_keys(unique))
    place = np.full(len(unique), -1, np.int64)
    at = np.searchsorted(unique, refs_found(found))  # getmulti keeps the keys' (sorted) order
    sound = np.array([len(rec) == REF_REC.size for _, rec in found], bool)
    records = b"".join(rec for (_, rec), ok in zip(found, sound.tolist()) if ok)
    place[at[sound]] = np.frombuffer(records, REF_REC_DTYPE)["pack"]
    place[at[~sound]] = UNREADABLE
    return place[np.searchsorted(unique, refs)]


def _retire_packs(txn: lmdb.Transaction, index: Index, numbers: list[int]) -> None:
    """Take packs out of the index; their files are deleted after a wait (deadpacks)."""
    retired, freed = 0, 0
    for number in numbers:
        key = PACK_KEY.pack(number)
        raw = txn.get(key, db=index.packs)
        if raw is None:
            continue
        name, size, _count = PACK_REC.unpack(raw)
        txn.delete(key, db=index.packs)
        txn.delete(key, db=index.packlive)
        txn.delete(name, db=index.packnames)
        txn.put(name, b"", db=index.deadpacks)
        retired, freed = retired + 1, freed + size
    index._add(txn, "packs", -retired)
    index._add(txn, "pack_bytes", -freed)


# -- step 6: repack ---------------------------------------------------------------------------
def repack_candidates(repo: Repository, max_unused: float) -> list[int]:
    """Packs whose unused share of chunk bytes exceeds `max_unused` percent, in number order:
    the live counts that pass their check (gc checked them all before; one damaged since is not
    acted on) joined with the `packs` table as arrays (a repository of 10,000 packs). A `packs`
    row of the wrong size is left alone."""
    index = repo.index
    with index.env.begin() as txn:
        numbers, live = _live_rows(index, txn)
        listed, records = _pack_rows(txn, index)
    at = np.minimum(np.searchsorted(numbers, listed), max(len(numbers) - 1, 0))
    known = (numbers[at] == listed) if len(numbers) else np.zeros(len(listed), bool)
    listed, records, live = listed[known], records[known], live[at[known]]
    # float64 as Python's true division: exact below 2^53 bytes
    data = np.maximum(blob_bytes(records["size"].astype(np.float64),
                                 records["count"].astype(np.float64),
                                 bool(repo.config.encryption)), 1.0)
    unused = (1 - live[:, 1].astype(np.float64) / data) * 100 > max_unused
    return listed[(live[:, 0] > 0) & unused].tolist()


PACK_ROW = np.dtype([("name", "V32"), ("size", "<u8"), ("count", "<u4")])  # PACK_REC
assert PACK_ROW.itemsize == PACK_REC.size


def _live_rows(index: Index, txn: lmdb.Transaction) -> tuple[np.ndarray, np.ndarray]:
    """(pack numbers sorted, (live count, live stored bytes) u8 rows) of the packlive rows that
    pass their check."""
    rows = scan_sealed(index, txn, "packlive")
    numbers = rows.keys[rows.ok].copy().view(">u4")[:, 0].astype(np.int64)
    return numbers, rows.payloads[rows.ok].copy().view("<u8").reshape(-1, 2)


def _pack_rows(txn: lmdb.Transaction, index: Index) -> tuple[np.ndarray, np.ndarray]:
    """(numbers sorted, PACK_ROW records) of the `packs` rows of the right sizes."""
    numbers, records = [np.zeros(0, np.int64)], [np.zeros(0, PACK_ROW)]
    for keys, values, fits in sized_batches(txn, index.packs, PACK_KEY.size, PACK_REC.size,
                                            ROWS):
        numbers.append(np.frombuffer(keys, ">u4")[fits].astype(np.int64))
        records.append(np.frombuffer(values, PACK_ROW)[fits])
    return np.concatenate(numbers), np.concatenate(records)


def _retire_empty(repo: Repository) -> None:
    """Packs left with no live chunk (by a sweep, a heal or an earlier repack) leave the index."""
    index = repo.index
    with index.write() as txn:
        numbers, live = _live_rows(index, txn)
        _retire_packs(txn, index, _unplaced(repo, txn, numbers[live[:, 0] == 0].tolist()))


def _repack(repo: Repository, max_unused: float, report: GcReport, tick: Tick | None) -> None:
    _retire_empty(repo)
    numbers = repack_candidates(repo, max_unused)
    writer: PackWriter | None = None
    moved: list[int] = []
    for i, number in enumerate(numbers):
        if tick:
            tick(f"repacking {i + 1}/{len(numbers)}")
        try:
            chunks = _live_chunks(repo, number)
        except DamageError as exc:
            report.damaged_packs_skipped.append(str(exc))
            continue
        if writer is None:
            writer = repo.pack_writer()
        for ref, chunk_id, blob, raw, codec in chunks:
            writer.add(ref, chunk_id, blob, raw, codec)
        moved.append(number)
        if writer.size >= repo.config.pack_size:
            _swap(repo, writer, moved, report)
            writer, moved = None, []
    if writer is not None:
        _swap(repo, writer, moved, report)


def _live_chunks(repo: Repository, number: int) -> list[tuple[int, bytes, bytes, int, int]]:
    """The live chunks of a pack, each checked against its id (DamageError if one is bad)."""
    info = repo.index.pack_info(number)
    entries = repo.read_trailer(info.name)
    data = repo.read_pack(info.name, info.size)
    out, check = [], repo.chunk_checker(info.name)
    with repo.index.env.begin() as txn:
        for e in entries:
            ref, offset = int(e["ref"]), int(e["offset"])
            rec = txn.get(REF_KEY.pack(ref), db=repo.index.refs)
            if rec is None:
                continue
            _, pack, off, *_ = REF_REC.unpack(rec)
            if pack != number or off != offset:
                continue
            chunk_id = e["id"].tobytes()
            blob = check(offset, chunk_id, data[offset:offset + int(e["stored"])],
                         int(e["codec"]), int(e["raw"]), ref)
            out.append((ref, chunk_id, blob, int(e["raw"]), int(e["codec"])))
    return out


def _swap(repo: Repository, writer: PackWriter, old: list[int], report: GcReport) -> None:
    """New pack durable first, then one transaction moves the refs and retires the old packs."""
    finished = writer.finish()
    index = repo.index
    repo.check_locks()
    with index.write() as txn:
        number = index.new_pack_number(txn)
        live = stored = 0
        for e in finished.entries:
            key = REF_KEY.pack(e.ref)
            rec = txn.get(key, db=index.refs)
            if rec is None or REF_REC.unpack(rec)[1] not in old:
                continue
            txn.put(key, REF_REC.pack(e.chunk_id, number, e.offset, e.stored, e.raw, e.codec),
                    db=index.refs)
            live, stored = live + 1, stored + e.stored
        index.put_pack_record(txn, number, bytes.fromhex(finished.name), finished.size,
                              len(finished.entries), live, stored)
        _retire_packs(txn, index, old)
    report.packs_written += 1
    report.packs_repacked += len(old)
    report.freed_bytes -= finished.size


# -- step 7: delete retired packs -------------------------------------------------------------
def _any_dead_pack(repo: Repository) -> bool:
    """Whether packs are queued for deletion (which of them to delete is read after the wait:
    `_dead_packs`)."""
    with repo.index.env.begin() as txn:
        return txn.stat(repo.index.deadpacks)["entries"] > 0


def _dead_packs(repo: Repository) -> list[bytes]:
    """Queued packs whose name is not listed (a damaged deadpacks key must not name a live one)."""
    index = repo.index
    with index.env.begin() as txn:
        return [k for k, _ in txn.cursor(db=index.deadpacks)
                if txn.get(k, db=index.packnames) is None]


def _delete_dead_packs(repo: Repository, report: GcReport, sizes: dict[str, int],
                       deleter: Deleter) -> None:
    """Delete the queued pack objects in one batch, then forget them in the index (a crash in
    between leaves them queued: a rerun deletes nothing twice, since a missing name is fine).
    `sizes`: pack files' sizes as listed before (a pack is never changed; one not listed is
    looked up)."""
    index = repo.index
    names = _dead_packs(repo)
    report.freed_bytes += sum(sizes[n] if (n := name.hex()) in sizes else
                              _size(repo, pack_object(n)) for name in names)
    deleter.submit([pack_object(name.hex()) for name in names]).result()
    with index.write() as txn:
        for name in names:
            txn.delete(name, db=index.deadpacks)
            txn.delete(name, db=index.scrubbed)
    report.packs_deleted += len(names)


def _size(repo: Repository, obj: str) -> int:
    """The stored size of object `obj`, 0 when it is gone already."""
    try:
        return repo.store.size(obj)
    except ObjectMissing:
        return 0


# -- dry run ----------------------------------------------------------------------------------
def _dry_run(repo: Repository, report: GcReport, max_unused: float) -> None:
    """What a full gc would reclaim now, read-only (chunks of running backups count as unused;
    killed writers' temporary and spool files as gc would judge them now)."""
    index = repo.index
    with index.env.begin() as txn:
        catalog = [index.record(k, v) for k, v in txn.cursor(db=index.points)]
        table = read_ref_table(txn, index)
        tally = Tally(table)
        tally.add_maps(repo, {d["map"] for r in catalog for d in r["disks"]})
        live = np.zeros(len(table.packs), bool)
        stored = start = 0
        for refs, rows in ref_rows(txn, index):
            dead = tally.counts[start:start + len(refs)] == 0
            start += len(refs)
            stored += int(rows["stored"][dead].astype(np.int64).sum())
            live[np.searchsorted(table.packs, rows["pack"][~dead].astype(np.int64))] = True
    report.mode = "full"
    report.candidates = report.chunks_dropped = int((tally.counts == 0).sum())
    report.stored_bytes_dropped = stored
    report.packs_deleted = int((~live).sum())
    report.packs_repacked = len(repack_candidates(repo, max_unused))
    report.tmp_files_deleted = (len(dead_writes(list_store(repo).temps, None))
                                + len(dead_tmp_files(repo, shared=False)))
