"""Garbage collection of a shared repository: plan, wait for leases and a grace period, sweep.

Hosts sharing a repository cannot see each other's locks, and their backups keep no counts, so
gc cannot ask "who may still use this chunk?" directly. It asks the journal and the leases
(repository/leases.py) instead, in two phases some time apart (docs/FORMAT.md, "Journal"):

1. **Plan.** A full mark: the refs of every map a catalogued point names (all maps read). The
   refs no point uses, the packs none of whose chunks is used (whole packs only), the map objects
   no point names and the objects of the store the cache does not know (packs not indexed,
   manifests not catalogued) are *doomed* by a `plan` journal entry. Replaying it removes the
   doomed refs' `ids` entries and lists them in `unfindable` on every host: a backup that
   refreshes after the plan never deduplicates against a doomed chunk (by id or by
   locality), and a map a writer would name like a doomed one is written salted (repo.py).
   Then gc lists `leases/` and commits a `waits` entry: the sessions (other than its own) that
   may have looked a doomed chunk up before they saw the plan. A backup writes its lease before
   it refreshes, so one that did not see the plan is on that list.
2. **Sweep**, in a later run (or the same one, with `--grace 0` and nothing to wait for): a plan is
   ready when its time plus the grace period has passed and each waited lease is gone or ended
   (`_Seen`, `_ended`: measured on this host's clock, from when it first saw the plan or the
   lease as it is, so that a holder whose clock runs behind is never taken for expired; a lease
   by that alone, so that a dead one whose clock ran ahead is not waited for longer). gc
   marks again (a waited backup may have committed a point using a doomed chunk: that chunk is
   live again and kept, and so is its pack), commits the `sweep` entry first (conditional on
   the head: a commit meanwhile makes gc catch up and mark again), and only then deletes the
   objects, in batches, checking its leases before each. The entry names every object deleted
   (`swept_op`): a writer that stalled past its lease, caught up, refuses to commit one.

**Repack** (`repack=True`, `gc --repack`; otherwise only its cost is reported): on object
storage a rewrite costs egress and PUTs, while dropping whole dead packs costs one batched
DELETE, so gc rewrites partly used packs only when asked, and only those whose unused share
exceeds `max_unused` percent. Their live chunks (not doomed by a pending plan) are read back with
coalesced range GETs, checked against their ids and written into new packs, which are made
durable before a `pack` entry moves their refs (the same refs: block maps and other hosts' dedup
stay valid). The old packs then place no used chunk: the plan of the same run dooms them with
the rest, and a sweep deletes them after the grace period and the waits, like any dead pack (a
host that resolved a ref to an old pack before the move still finds it meanwhile). A crash
before the `pack` entry leaves a new pack the cache does not know, which the next plan dooms;
after it, old packs that the next plan dooms.

**Memory**: a few bytes a chunk (`Marker`). The refs table is read a batch at a time
(tally.py) and never held: a mark keeps its refs (8 bytes each, sorted) and whether a map in
use holds each (1 byte), and every decision streams the table again in the mark's read
transaction, aligned with those marks. Maps are read one at a time, each once a run: a later
mark carries the marks over to the table as it is then (a mark after a map left the catalog
reads every map again). A repack reads the rows of the chunks it copies (or, for its cost,
would copy) a group of packs at a time (GROUP_ROWS).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import lmdb
import numpy as np

from ..errors import DamageError, RepoError
from ..pause import pause_point
from ..repository import sightings
from ..repository.blockmap import find_sorted, holds, map_object
from ..repository.checkpoint import checkpoint_due, compact, write_checkpoint
from ..repository.index import Index
from ..repository.index_records import PACK_KEY, REF_KEY, REF_REC, pack_fields
from ..repository.journal import (NothingToCommit, PackOp, PendingPlan, PlanOp, SweepOp,
                                   WaitsOp, manifest_key, new_plan_id)
from ..repository.leases import SESSION, Found, LeaseInfo, iso, list_leases, now, sighted
from ..repository.locks import MAINTENANCE, SHARED
from ..repository.packs import (FinishedPack, PackWriter, blob_bytes, pack_object,
                                 read_spans)
from ..repository.points import point_object
from ..repository.store import ObjectMissing, TempFile
from ..repository.repo import Repository
from .gc import GcReport
from .inventory import dead_tmp_files, dead_writes, list_store, refs_in_packs, remove_files
from .tally import ROWS, batches, per_pack, ref_rows, summed

DEFAULT_GRACE = 24 * 3600.0
TEMPS_SEEN_KEY = b"temps_seen"  # meta of this host's cache: when it first saw each temporary file
UPLOADS_SEEN_KEY = b"uploads_seen"  # ... and each unfinished multipart upload
DELETE_BATCH = 1000  # names per Store.delete: one DeleteObjects request on S3
# a repack's reads: two live chunks of a pack at most MAX_GAP apart are read with one range GET
# of at most MAX_REQUEST bytes (a larger chunk alone); IN_FLIGHT GETs at once. The gap is small:
# on S3's price list a GET costs as much as some 5 KB of egress, so reading a dead chunk to save
# a request costs more than the request (a restore, which waits on each round trip, reads
# across far larger gaps)
MAX_GAP = 4 << 10
MAX_REQUEST = 8 << 20
IN_FLIGHT = 8
# the rows of the chunks a repack copies are read a group of packs at a time, each group one
# read of the refs table holding at most GROUP_ROWS rows or a GROUPS-th of them all (a larger
# pack alone): a few bytes a chunk held, in at most about GROUPS reads
GROUP_ROWS = 1 << 20
GROUPS = 16


@dataclass
class SharedGcReport(GcReport):
    mode: str = "shared"
    grace_seconds: float = DEFAULT_GRACE
    plans_swept: int = 0
    plans_pending: int = 0
    planned_packs: int = 0
    planned_maps: int = 0
    planned_objects: int = 0
    packs_kept_live: int = 0
    repack_packs: int = 0
    repack_read_bytes: int = 0
    repack_write_bytes: int = 0
    repack_requests: int = 0
    repack_reclaims_bytes: int = 0
    repacked_read_bytes: int = 0
    repacked_written_bytes: int = 0
    repacked_requests: int = 0
    repacked_old_bytes: int = 0
    checkpoint: int = 0
    entries_compacted: int = 0
    uploads_aborted: int = 0


@dataclass(frozen=True)
class Mark:
    """What the catalog uses, as one read transaction of the cache sees it: the maps its
    records name, its points, and which rows of the refs table (in ref order) those maps use."""

    maps: frozenset[str]
    catalogued: frozenset[str]  # point ids
    used: np.ndarray  # bool, one per row of the refs table (the marker's: until its next mark)

    def rows(self, txn: lmdb.Transaction,
             index: Index) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The refs table `txn` (the mark's) sees, a batch at a time: (refs, REF_ROW rows,
        used)."""
        at = 0
        for refs, rows in ref_rows(txn, index):
            yield refs, rows, self.used[at:at + len(refs)]
            at += len(refs)


class Marker:
    """The marks of one gc run, a few bytes a chunk: the refs table's refs (sorted, 8 bytes
    each) and whether a map in use holds each (1 byte), carried over from one mark to the next
    as the cache changes, so that each map is read once a run (a mark after a map left the
    catalog reads every map again: the refs only it held may be unused now)."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.maps: frozenset[str] = frozenset()  # the maps marked
        self.refs = np.zeros(0, np.uint64)  # the refs table's refs as last read (sorted)
        self.used = np.zeros(0, bool)  # aligned with the table's refs
        self.extra = np.zeros(0, np.uint64)  # refs marked maps hold that the table lacks

    def mark(self, txn: lmdb.Transaction) -> Mark:
        """A full mark of the cache as `txn` sees it (maps marked already are not read again).
        A map in use that cannot be read stops gc: its chunks would look unused."""
        index = self.repo.index
        records = [index.record(k, v) for k, v in txn.cursor(db=index.points)]
        names = frozenset(d["map"] for r in records for d in r["disks"])
        if self.maps - names:
            self.maps, self.extra = frozenset(), np.zeros(0, np.uint64)
            self.used = np.zeros(len(self.refs), bool)
        self._realign(txn)
        errors = {}
        for name in sorted(names - self.maps):
            try:
                self._add(self.repo.map_refs(name))
            except RepoError as exc:
                errors[name] = str(exc)
        self.maps = names - errors.keys()
        if errors:
            raise DamageError(f"{len(errors)} block maps in use cannot be read (first: "
                              f"{next(iter(errors.values()))}); gc deletes nothing while their "
                              "chunks cannot be told apart: run 'repo-engine verify'")
        return Mark(names, frozenset(r["id"] for r in records), self.used)

    def _realign(self, txn: lmdb.Transaction) -> None:
        """Carry the marks over to the refs table `txn` sees, read a batch at a time: a used
        ref it no longer holds goes to `extra`, a ref of `extra` it holds now is marked. A
        table that only lost rows (a sweep's) is compacted in place; one that gained rows is
        built anew (its arrays beside the old ones for a while)."""
        seen = np.zeros(len(self.refs), bool)
        fresh = False  # the table holds a ref the marks do not
        for part in self._keys(txn):
            pos, found = find_sorted(self.refs, part)
            seen[pos[found]] = True
            fresh = fresh or not found.all()
        self.extra = np.union1d(self.extra, self.refs[self.used & ~seen]).astype(np.uint64)
        if fresh:
            self._rebuild(txn)
        elif not seen.all():
            self.refs, self.used = _compact(self.refs, seen), _compact(self.used, seen)

    def _rebuild(self, txn: lmdb.Transaction) -> None:
        count = txn.stat(self.repo.index.refs)["entries"]  # the rows `txn` sees: those read
        refs, used = np.empty(count, np.uint64), np.zeros(count, bool)
        at = 0
        for part in self._keys(txn):
            pos, found = find_sorted(self.refs, part)
            used[at:at + len(part)] = holds(self.extra, part)
            used[at:at + len(part)][found] |= self.used[pos[found]]
            refs[at:at + len(part)] = part
            at += len(part)
        self.refs, self.used = refs, used

    def _keys(self, txn: lmdb.Transaction) -> Iterator[np.ndarray]:
        """The refs table's refs `txn` sees, a batch at a time."""
        for keys, _ in batches(txn, self.repo.index.refs, values=False):
            yield np.frombuffer(keys, ">u8").astype(np.uint64)

    def _add(self, refs: np.ndarray) -> None:
        """Mark the refs of one map, a batch at a time (a map may hold most of the chunks)."""
        for start in range(0, len(refs), ROWS):
            part = refs[start:start + ROWS]
            pos, found = find_sorted(self.refs, part)
            self.used[pos[found]] = True
            if not found.all():
                self.extra = np.union1d(self.extra, part[~found]).astype(np.uint64)

    def holds(self, refs: np.ndarray) -> np.ndarray:
        """Whether the last mark found each of `refs` (rows of the refs table) used."""
        pos, found = find_sorted(self.refs, refs)
        return found & self.used[pos]


def _compact(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """`values[keep]`, written over the start of `values` a batch at a time (no copy of it
    made beside it): a view of `values`."""
    at = 0
    for start in range(0, len(values), ROWS):
        piece = values[start:start + ROWS][keep[start:start + ROWS]]
        values[at:at + len(piece)] = piece
        at += len(piece)
    return values[:at]


def _pending_refs(plans: list[PendingPlan]) -> np.ndarray:
    """The refs the pending `plans` doom, sorted and unique."""
    return np.unique(np.concatenate([p.op.refs for p in plans] or [np.zeros(0, np.uint64)])
                     ).astype(np.uint64)


def gc(repo: Repository, *, grace: float = DEFAULT_GRACE, dry_run: bool = False,
       max_unused: float = 10.0, repack: bool = False,
       tick: Callable[[str], None] | None = None) -> SharedGcReport:
    """Sweep the ready plans, repack (with `repack`), plan what is unused now, report the cost
    of a repack of what is left."""
    started = time.monotonic()
    report = SharedGcReport(dry_run=dry_run, grace_seconds=grace)
    marker = Marker(repo)
    if dry_run:
        with repo.lock(SHARED, "gc --dry-run"):
            _dry_run(repo, marker, report, max_unused)
    else:
        with repo.lock(MAINTENANCE, "gc"):
            _run(repo, marker, report, grace, max_unused, repack, tick)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _run(repo: Repository, marker: Marker, report: SharedGcReport, grace: float,
         max_unused: float, repack: bool, tick: Callable[[str], None] | None) -> None:
    _sweep_ready(repo, marker, report, grace, tick)
    if repack:  # before the plan: the old packs it leaves wholly unused are doomed with the rest
        _repack(repo, _partly_used(repo, marker, max_unused), report, tick)
    listed = _Listed.read(repo)
    if _plan(repo, marker, report, listed) and grace <= 0:
        _sweep_ready(repo, marker, report, grace, tick)
    _repack_cost(repo, marker, report, max_unused)
    report.plans_pending = len(repo.index.pending_plans())
    _checkpoint(repo, grace, report)
    _abort_stale_uploads(repo, grace, report, listed)
    report.tmp_files_deleted += remove_files(dead_tmp_files(repo, shared=True))


def _abort_stale_uploads(repo: Repository, grace: float, report: SharedGcReport,
                         listed: _Listed) -> None:
    """Abort the multipart uploads a process that died left behind, and delete the temporary files
    `listed` (before the plan) whose writer is gone (a local directory's;
    inventory.dead_writes): those this host first saw (an upload by its id; a file begun, or
    last written, before) longer ago than the grace period and a lease's duration (a live
    backup's write of one object takes neither; an upload aborted all the same fails its put,
    and that backup stores no point), and at once those of this host's dead processes. The
    server's and the writer's times are of other clocks: a host whose clock runs ahead of them
    would take a live write for an old one."""
    repo.check_leases()
    at = now()
    before = at - timedelta(seconds=max(grace, repo.lease_seconds))
    looked = sightings.monotonic()
    uploads = {f"{u.name} {u.upload_id}": u for u in repo.store.pending_uploads()}
    seen = repo.index.first_seen(UPLOADS_SEEN_KEY, list(uploads), at.timestamp(),
                                 listed=looked)
    stale = [uploads[key] for key, when in seen.items() if when <= before.timestamp()]
    for upload in stale:
        repo.store.abort_upload(upload)
    report.uploads_aborted = len(stale)
    temps = listed.temps
    seen = repo.index.first_seen(TEMPS_SEEN_KEY, [temp.name for temp in temps], at.timestamp(),
                                 listed=listed.looked)
    dead = [temp.name for temp in dead_writes(temps, before.timestamp(), seen)]
    _delete(repo, dead)
    report.tmp_files_deleted = len(dead)


@dataclass(frozen=True)
class _Packs:
    """The packs of the cache: number -> (name, size, chunk count)."""

    names: dict[int, tuple[str, int, int]]

    @classmethod
    def read(cls, txn: lmdb.Transaction, index: Index) -> "_Packs":
        return cls({int.from_bytes(k, "big"): pack_fields(v) for k, v in
                    txn.cursor(db=index.packs)})

    def by_name(self) -> dict[str, int]:
        return {name: number for number, (name, _size, _count) in self.names.items()}


# -- phase 1: plan -----------------------------------------------------------------------------
@dataclass
class _Listed:
    packs: dict[str, int]  # name -> size, in the store
    maps: set[str]
    points: set[str]
    temps: list[TempFile]  # temporary files of writes, of every directory
    looked: float  # sightings.monotonic before the listing: the temps were seen up to then

    @classmethod
    def read(cls, repo: Repository) -> "_Listed":
        """The store's packs, maps and manifests: listed BEFORE the plan's catch-up, so that an
        object whose commit lands in between is known to the cache the plan is built from."""
        looked = sightings.monotonic()
        listing = list_store(repo)
        return cls({n: i.size for n, i in listing.packs.items()}, set(listing.maps),
                   set(listing.points), listing.temps, looked)


def _plan(repo: Repository, marker: Marker, report: SharedGcReport, listed: _Listed) -> bool:
    """Commit the plan of what is unused now and its waits (False: nothing to plan); `listed`:
    the store as listed before (_Listed.read)."""
    try:
        entry = repo.commit_journal(lambda _seq: [_plan_op(repo, marker, listed)])
    except NothingToCommit:
        return False
    op = entry.ops[0]
    assert isinstance(op, PlanOp)
    _count_plan(report, op)
    _commit_waits(repo, op)
    return True


def _count_plan(report: SharedGcReport, op: PlanOp) -> None:
    report.candidates += len(op.refs)
    report.planned_packs += len(op.packs)
    report.planned_maps += len(op.maps)
    report.planned_objects += len(op.objects)


def _plan_op(repo: Repository, marker: Marker, listed: _Listed) -> PlanOp:
    """The plan of what is unused in the caught-up cache and not doomed by a pending plan."""
    index = repo.index
    pending = index.pending_plans()
    doomed = _pending_refs(pending)
    dead_refs, live_packs = [], set()
    with index.env.begin() as txn:
        mark = marker.mark(txn)
        for refs, rows, used in mark.rows(txn, index):
            dead = refs[~used]
            dead_refs.append(dead[~holds(doomed, dead)])
            live_packs.update(np.unique(rows["pack"][used]).tolist())
        packs = _Packs.read(txn, index)
    refs = np.concatenate(dead_refs or [np.zeros(0, np.uint64)])
    taken = {name for p in pending for name in (*p.op.packs, *p.op.maps, *p.op.objects)}
    dead_packs = sorted(name for number, (name, _, _) in packs.names.items()
                        if number not in live_packs and name not in taken)
    indexed = packs.by_name()
    maps = sorted(n for n in listed.maps if n not in mark.maps and n not in taken)
    objects = sorted({pack_object(n) for n in listed.packs if n not in indexed}
                     | {point_object(i) for i in listed.points if i not in mark.catalogued}
                     - taken)
    if not (len(refs) or dead_packs or maps or objects):
        raise NothingToCommit()
    return PlanOp(new_plan_id(), iso(now()), refs.astype(np.uint64, copy=False), dead_packs,
                  maps, objects)


def _commit_waits(repo: Repository, plan: PlanOp) -> PendingPlan:
    """The sessions that may have seen the cache before the plan: every lease now in the store
    but this process's own (listed after the plan's commit)."""
    own = {lease.name for held in repo.held for lease in held.leases}
    names = sorted(f.name for f in list_leases(repo.store)
                   if f.info.kind == SESSION and f.name not in own)
    repo.commit_journal(lambda _seq: [WaitsOp(plan.plan, names)])
    return PendingPlan(plan, names)


# -- phase 2: sweep ----------------------------------------------------------------------------
PLANS_SEEN_KEY = b"plans_seen"  # meta of this host's cache: when it first saw each pending plan


@dataclass(frozen=True)
class _Seen:
    """When this host first saw, on its own clock, each pending plan and each lease in its
    present state (leases.sighted: a renewal is a new state). A lease's times are of its
    holder's clock, a plan's of its planner's: judged against this host's clock alone, a
    holder whose clock runs behind would look expired while it still renews, and gc would
    delete the packs it uploaded and is about to commit (its own checks, on its own clock,
    pass). Measured from when this host saw them, each wait compares two times of one clock."""

    plans: dict[str, datetime]
    leases: dict[str, datetime]

    @classmethod
    def note(cls, index: Index, plans: list[PendingPlan], leases: list[Found],
             at: datetime, listed: float) -> "_Seen":
        """The first sightings noted in the cache's meta, those new now at `at`, seen up to
        `listed` (sightings.monotonic before the listings); the notes of plans and leases gone
        are dropped."""
        seen = index.first_seen(PLANS_SEEN_KEY, [p.op.plan for p in plans], at.timestamp(),
                                listed=listed)
        return cls({plan: datetime.fromtimestamp(when, timezone.utc)
                    for plan, when in seen.items()}, sighted(index, leases, at, listed))


def ready(plan: PendingPlan, leases: dict[str, LeaseInfo], seen: _Seen, grace: float,
          at: datetime) -> bool:
    """Whether `plan` may be swept at `at`: its waits are known, its time plus `grace` has
    passed (on its planner's clock and since this host first saw it), and each waited lease
    is gone or ended (`_ended`)."""
    if plan.leases is None:
        return False
    since = max(datetime.fromisoformat(plan.op.time), seen.plans[plan.op.plan])
    if since + timedelta(seconds=grace) > at:
        return False
    return all(name not in leases or _ended(leases[name], seen.leases[name], grace, at)
               for name in plan.leases)


def _ended(lease: LeaseInfo, seen: datetime, grace: float, at: datetime) -> bool:
    """Whether this host has seen `lease` unchanged since `seen` for its span and `grace`
    (LeaseInfo.ends): a holder still renewing changes it every quarter of its duration, one that
    stopped finds its lease lost before it commits again. Its expiry, of its holder's clock, is
    not asked: a clock running ahead would keep gc waiting for a dead holder that much longer."""
    end = lease.ends(seen, grace)
    return end is not None and end <= at


def _sweep_ready(repo: Repository, marker: Marker, report: SharedGcReport, grace: float,
                 tick: Callable[[str], None] | None) -> None:
    listed = sightings.monotonic()
    plans = repo.index.pending_plans()
    if not plans:
        return
    found = list_leases(repo.store)
    leases = {f.name: f.info for f in found}
    at = now()
    seen = _Seen.note(repo.index, plans, found, at, listed)
    for plan in plans:
        if plan.leases is None:  # a gc died between plan and waits: wait for everyone now
            plan = _commit_waits(repo, plan.op)
        if ready(plan, leases, seen, grace, at):
            if tick:
                tick(f"sweeping plan {plan.op.plan}")
            _sweep(repo, marker, plan, report)


@dataclass
class _Doomed:
    """What a sweep deletes, decided with the cache caught up to the sweep's seq."""

    op: SweepOp  # lists the objects below too: `swept_op`
    packs: list[str]  # indexed packs
    maps: list[str]
    objects: list[str]  # doomed store objects the cache still does not know
    freed: int  # bytes of the indexed packs deleted
    kept_refs: int
    kept_packs: int
    stored: int  # stored bytes of the refs swept

    def names(self) -> list[str]:
        return ([pack_object(n) for n in self.packs] + [map_object(n) for n in self.maps]
                + self.objects)


def swept_op(plan: str, refs: np.ndarray, packs: list[str], maps: list[str],
             objects: list[str]) -> SweepOp:
    """The `sweep` entry of a sweep deleting `packs` (indexed), `maps` and the store `objects`
    no cache knows (packs and manifests): it lists every pack it deletes in `packs` and every
    manifest, as journal.manifest_key, in `maps`. Every cache notes them all as swept, so a
    writer that stalled past its lease, caught up, refuses to commit a pack entry or a point
    naming one (Repository.pack_ops, _point_ops) instead of naming an object gc deleted; a
    repo-engine that knows no such notes drops the packs it does not place (none) and notes the
    manifests as maps no writer names."""
    orphans = [_stem(o) for o in objects if o.startswith("packs/")]
    manifests = [manifest_key(_stem(o)) for o in objects if o.startswith("points/")]
    return SweepOp(plan, refs, packs + orphans, maps + manifests)


def _sweep(repo: Repository, marker: Marker, plan: PendingPlan,
           report: SharedGcReport) -> None:
    decided: list[_Doomed] = []

    def build(_seq: int) -> list:
        decided[:] = [_sweep_op(repo, marker, plan.op)]
        return [decided[0].op]

    repo.commit_journal(build)
    doomed = decided[0]
    orphans = [o for o in doomed.objects if o.startswith("packs/")]
    orphan_bytes = sum(_size(repo, o) for o in orphans)
    pause_point("gc.sweep")  # committed, nothing deleted yet: what dies here, a later gc deletes
    _delete(repo, doomed.names())
    report.plans_swept += 1
    report.chunks_dropped += len(doomed.op.refs)
    report.stored_bytes_dropped += doomed.stored
    report.resurrected += doomed.kept_refs
    report.packs_kept_live += doomed.kept_packs
    report.packs_deleted += len(doomed.packs)
    report.maps_deleted += len(doomed.maps)
    report.manifests_deleted += sum(o.startswith("points/") for o in doomed.objects)
    report.orphan_packs_deleted += len(orphans)
    report.freed_bytes += doomed.freed + orphan_bytes


def _size(repo: Repository, name: str) -> int:
    try:
        return repo.store.size(name)
    except ObjectMissing:
        return 0


def _sweep_op(repo: Repository, marker: Marker, plan: PlanOp) -> _Doomed:
    """The sweep of `plan` against the cache caught up now: a doomed ref used again is kept
    (and every pack placing a kept or undoomed chunk), a doomed map named again is kept, a doomed
    object the cache now knows is kept."""
    index = repo.index
    planned = np.unique(plan.refs)
    swept, placing, kept_refs, stored = [], set(), 0, 0
    with index.env.begin() as txn:
        mark = marker.mark(txn)
        for refs, rows, used in mark.rows(txn, index):
            doomed = holds(planned, refs)
            gone = doomed & ~used
            swept.append(refs[gone])
            placing.update(np.unique(rows["pack"][~gone]).tolist())
            kept_refs += int((doomed & used).sum())
            stored += int(rows["stored"][gone].astype(np.int64).sum())
        packs = _Packs.read(txn, index)
    indexed = packs.by_name()
    gone_packs = [n for n in plan.packs if indexed.get(n) not in placing]
    maps = [n for n in plan.maps if n not in mark.maps]
    objects = [o for o in plan.objects if not _known(o, indexed, mark)]
    refs = np.concatenate(swept or [np.zeros(0, np.uint64)]).astype(np.uint64, copy=False)
    return _Doomed(swept_op(plan.plan, refs, gone_packs, maps, objects), gone_packs, maps,
                   objects,
                   freed=sum(packs.names[indexed[n]][1] for n in gone_packs if n in indexed),
                   kept_refs=kept_refs, kept_packs=len(plan.packs) - len(gone_packs),
                   stored=stored)


def _known(name: str, indexed: dict[str, int], mark: Mark) -> bool:
    """Whether the cache now knows a store object a plan found unknown."""
    stem = _stem(name)
    if name.startswith("packs/"):
        return stem in indexed
    if name.startswith("points/"):
        return stem in mark.catalogued
    return True  # not a kind a plan lists: never deleted


def _stem(name: str) -> str:
    """The pack name or point id of a store object's name."""
    return name.rsplit("/", 1)[-1].split(".", 1)[0]


def _delete(repo: Repository, names: list[str]) -> None:
    """Delete in batches, each after checking that this gc still holds its leases."""
    for start in range(0, len(names), DELETE_BATCH):
        repo.check_leases()
        repo.store.delete(names[start:start + DELETE_BATCH])


# -- repack -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Partly:
    """The partly used packs a repack rewrites (in `numbers`, with the rows each holds to copy
    in `counts`), and how to tell the chunks it copies from them: those `marker`'s last mark
    found used by a catalogued point, and not `doomed` by a pending plan."""

    packs: _Packs
    numbers: list[int]
    counts: list[int]
    marker: Marker
    doomed: np.ndarray

    def groups(self, index: Index) -> Iterator[tuple[list[int], np.ndarray]]:
        """The packs, a group at a time (GROUP_ROWS), with the rows of the chunks to copy from
        them (REF_TABLE rows sorted by pack, then offset)."""
        budget = max(GROUP_ROWS, -(-sum(self.counts) // GROUPS))
        group: list[int] = []
        held = 0
        for number, count in zip(self.numbers, self.counts):
            if group and held + count > budget:
                yield group, self._rows(index, group)
                group, held = [], 0
            group.append(number)
            held += count
        if group:
            yield group, self._rows(index, group)

    def _rows(self, index: Index, numbers: list[int]) -> np.ndarray:
        with index.env.begin() as txn:
            rows = refs_in_packs(index, txn, numbers)
        rows = rows[self.marker.holds(rows["ref"]) & ~holds(self.doomed, rows["ref"])]
        return rows[np.lexsort((rows["offset"], rows["pack"]))]


def _rows_of(rows: np.ndarray, number: int) -> np.ndarray:
    """The rows of pack `number` of `rows` (sorted by pack)."""
    packs = rows["pack"]
    return rows[np.searchsorted(packs, number):np.searchsorted(packs, number, "right")]


def _partly_used(repo: Repository, marker: Marker, max_unused: float) -> _Partly:
    """The packs whose unused share of chunk bytes exceeds `max_unused` percent and that hold a
    chunk to copy (a pack without one dies whole: a plan dooms it)."""
    sealed = bool(repo.config.encryption)

    def mostly_unused(_name: str, size: int, count: int, used: int) -> bool:
        data = max(blob_bytes(size, count, sealed), 1)
        return bool(size) and (1 - used / data) * 100 > max_unused

    return _to_copy(repo, marker, mostly_unused)


def _to_copy(repo: Repository, marker: Marker, choose: Callable[[str, int, int, int], bool]
             ) -> _Partly:
    """The packs holding a chunk to copy (used by a catalogued point, not doomed by a pending
    plan) that `choose(name, size, chunk count, bytes of the chunks to copy)` picks: the refs
    table read a batch at a time to sum what each pack holds to copy (its rows are read again
    for the packs picked, `_Partly.groups`)."""
    index = repo.index
    doomed = _pending_refs(index.pending_plans())
    sums = (np.zeros(0, np.int64),) * 3  # pack numbers, rows to copy, their stored bytes
    with index.env.begin() as txn:
        mark = marker.mark(txn)
        for refs, rows, used in mark.rows(txn, index):
            live = used & ~holds(doomed, refs)
            sums = summed(sums, per_pack(rows["pack"][live], rows["stored"][live]))
        packs = _Packs.read(txn, index)
    chosen = [(number, count) for number, count, kept in zip(*(a.tolist() for a in sums))
              if choose(*packs.names.get(number, ("", 0, 0)), kept)]
    return _Partly(packs, [n for n, _ in chosen], [c for _, c in chosen], marker, doomed)


def _span(rows: np.ndarray) -> int:
    """The bytes one range GET of the chunks `rows` (sorted by offset) reads."""
    return int(rows["offset"][-1]) + int(rows["stored"][-1]) - int(rows["offset"][0])


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """The range GETs that read the chunks `rows` of one pack (sorted by offset): [first,
    stop) row slices, each spanning at most MAX_REQUEST bytes (or one chunk) with gaps of at
    most MAX_GAP."""
    starts = rows["offset"].astype(np.int64)
    return read_spans(np.zeros(len(rows), np.int64), starts, starts + rows["stored"], MAX_GAP,
                      MAX_REQUEST)


def _repack_cost(repo: Repository, marker: Marker, report: SharedGcReport,
                 max_unused: float) -> None:
    """What a repack of the packs over `max_unused` would cost: their live bytes read back
    (coalesced range GETs) and written again into new packs (one PUT each), and one DELETE
    batch for the old ones; and what it would free."""
    partly = _partly_used(repo, marker, max_unused)
    if not partly.numbers:
        return
    kept = read = requests = 0
    for numbers, rows in partly.groups(repo.index):
        kept += int(rows["stored"].astype(np.int64).sum())
        for pack in (_rows_of(rows, number) for number in numbers):
            runs = _runs(pack)
            read += sum(_span(pack[first:stop]) for first, stop in runs)
            requests += len(runs)
    report.repack_packs = len(partly.numbers)
    report.repack_read_bytes = read
    report.repack_write_bytes = kept
    report.repack_reclaims_bytes = sum(partly.packs.names[n][1] for n in partly.numbers) - kept
    puts = -(-kept // repo.config.pack_size)
    report.repack_requests = requests + puts + -(-len(partly.numbers) // DELETE_BATCH)


def repack_packs(repo: Repository, report: SharedGcReport, names: set[str],
                 tick: Callable[[str], None] | None = None) -> None:
    """Copy the used chunks of the packs `names` into new packs (the caller holds the
    maintenance lock); a plan then dooms the old packs like any dead pack."""
    partly = _to_copy(repo, Marker(repo), lambda name, _size, _count, _used: name in names)
    _repack(repo, partly, report, tick)


def collect(repo: Repository, report: SharedGcReport, grace: float,
            tick: Callable[[str], None] | None = None) -> None:
    """gc without a repack, for a caller that holds the maintenance lock."""
    _run(repo, Marker(repo), report, grace, 10.0, False, tick)


def _repack(repo: Repository, partly: _Partly, report: SharedGcReport,
            tick: Callable[[str], None] | None) -> None:
    """Copy the chunks to keep of the packs `partly` picked into new packs of at most the pack
    size (`_Output`)."""
    out = _Output(repo, report)
    try:
        with ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="repack-read") as pool:
            for i, (number, rows) in enumerate(_by_pack(partly, repo.index)):
                if tick:
                    tick(f"repacking {i + 1}/{len(partly.numbers)}")
                name, size, _count = partly.packs.names[number]
                try:
                    blobs = _read_live(repo, pool, name, rows, report)
                except DamageError as exc:
                    report.damaged_packs_skipped.append(str(exc))
                    continue
                for row, blob in zip(rows, blobs):
                    out.add(name, row, blob)
                report.packs_repacked += 1
                report.repacked_old_bytes += size
        out.publish()
    finally:
        out.abort()


def _by_pack(partly: _Partly, index: Index) -> Iterator[tuple[int, np.ndarray]]:
    """Each pack `partly` picked with the rows of the chunks to copy from it."""
    for numbers, rows in partly.groups(index):
        for number in numbers:
            yield number, _rows_of(rows, number)


class _Output:
    """The new packs of a repack: a chunk that would take the current one past the pack size
    starts the next; each full one is published (`_publish`)."""

    def __init__(self, repo: Repository, report: SharedGcReport) -> None:
        self.repo, self.report = repo, report
        self.writer: PackWriter | None = None
        self.sources: set[str] = set()  # the old packs whose chunks the writer holds

    def add(self, source: str, row: np.void, blob: bytes) -> None:
        if (self.writer is not None and self.writer.entries
                and self.writer.size + len(blob) > self.repo.config.pack_size):
            self.publish()
        self.writer = self.writer or self.repo.pack_writer()
        self.sources.add(source)
        self.writer.add(int(row["ref"]), row["id"].tobytes(), blob, int(row["raw"]),
                        int(row["codec"]))

    def publish(self) -> None:
        writer, sources = self.writer, self.sources
        self.writer, self.sources = None, set()
        if writer is not None:
            _publish(self.repo, writer, sources, self.report)

    def abort(self) -> None:
        """Drop the spool file of a pack not published (a run that stopped early)."""
        if self.writer is not None:
            self.writer.abort()


def _read_live(repo: Repository, pool: ThreadPoolExecutor, name: str, rows: np.ndarray,
               report: SharedGcReport) -> list[bytes]:
    """The stored bytes of the chunks `rows` of pack `name`, read with coalesced range GETs,
    IN_FLIGHT at once, each chunk checked against its id (DamageError when one is bad)."""
    runs = [rows[first:stop] for first, stop in _runs(rows)]
    blobs = [blob for run in pool.map(lambda run: _read_run(repo, name, run), runs)
             for blob in run]
    report.repacked_requests += len(runs)
    report.repacked_read_bytes += sum(map(_span, runs))
    return blobs


def _read_run(repo: Repository, name: str, rows: np.ndarray) -> list[bytes]:
    start = int(rows["offset"][0])
    end = start + _span(rows)
    try:
        data = repo.read_chunk_range(name, start, end - start)
    except ObjectMissing:
        raise DamageError(f"pack {name} is missing from the store; run 'repo-engine "
                          "verify'") from None
    if len(data) != end - start:
        raise DamageError(f"pack {name} is shorter than the index says; run 'repo-engine "
                          "scrub'")
    out, check = [], repo.chunk_checker(name)
    for row in rows:
        at = int(row["offset"]) - start
        out.append(check(start + at, row["id"].tobytes(), data[at:at + int(row["stored"])],
                         int(row["codec"]), int(row["raw"]), int(row["ref"])))
    return out


def _publish(repo: Repository, writer: PackWriter, old: set[str],
             report: SharedGcReport) -> None:
    """The new pack durable in the store first, then the `pack` entry that moves its refs out
    of the `old` packs."""
    finished = writer.finish()
    pause_point("gc.repacked")  # a new pack no entry names: the next plan dooms it
    repo.commit_journal(lambda _seq: [_move(repo, finished, old)])
    report.packs_written += 1
    report.repacked_written_bytes += finished.size
    report.repacked_requests += 2  # the pack's PUT and its journal entry


def _move(repo: Repository, finished: FinishedPack, old: set[str]) -> PackOp:
    """The `pack` op of a repacked pack, checked against the cache caught up: each of its refs
    is still placed in one of the `old` packs (only this gc, under the maintenance lock, moves
    or drops refs, so anything else is an index that changed under it)."""
    index = repo.index
    with index.env.begin() as txn:
        for e in finished.entries:
            rec = txn.get(REF_KEY.pack(e.ref), db=index.refs)
            place = None if rec is None else txn.get(PACK_KEY.pack(REF_REC.unpack(rec)[1]),
                                                        db=index.packs)
            if place is None or pack_fields(place)[0] not in old:
                raise RepoError(f"chunk ref {e.ref} moved while gc repacked it; nothing was "
                                "lost: run 'repo-engine gc' again")
    return PackOp.of(finished)


# -- checkpoints -------------------------------------------------------------------------------
def _checkpoint(repo: Repository, grace: float, report: SharedGcReport) -> None:
    """Write a checkpoint when one is due (checkpoint.py); delete the journal entries the newest
    checkpoint covers once it is older than the grace period (and the staleness bound)."""
    repo.refresh()
    if checkpoint_due(repo.store, repo.index):
        repo.check_leases()
        report.checkpoint = write_checkpoint(repo.store, repo.index, repo.sealer)
    repo.check_leases()
    report.entries_compacted = compact(repo.store, repo.index, grace)


# -- dry run -----------------------------------------------------------------------------------
def _dry_run(repo: Repository, marker: Marker, report: SharedGcReport,
             max_unused: float) -> None:
    """What a plan would doom now, committing nothing."""
    _dry_plan(repo, marker, report)
    report.plans_pending = len(repo.index.pending_plans())
    _repack_cost(repo, marker, report, max_unused)


def _dry_plan(repo: Repository, marker: Marker, report: SharedGcReport) -> None:
    listed = _Listed.read(repo)
    try:
        op = _plan_op(repo, marker, listed)
    except NothingToCommit:
        return
    _count_plan(report, op)
