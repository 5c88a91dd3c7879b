"""scrub: read chunk data back and check it; `--repair` heals what it can.

1. Choose packs: all, or a budget (`PERCENT%`: the least recently scrubbed packs holding that
   share of the bytes; `n/t`: the n-th of t fixed slices of the packs, by name), least recently
   scrubbed first, so repeated budgeted runs cover every pack over time.
2. Worker threads each read one pack sequentially, check its trailer, and decompress and re-hash
   (keyed BLAKE3) every chunk the index places there against its id. zstd and BLAKE3 release the
   GIL. `max_duration` stops starting new packs once spent.
3. The time each pack was fully checked is kept in the index (`scrubbed`).
4. Damaged chunks are reported as the points, disks and byte ranges they affect (exit code 3).

Repair (under the maintenance lock):
a. quarantine each damaged ref: note it in `quarantine` and `unfindable` and delete its `ids`
   entry, so backups no longer deduplicate against it and store the next copy they read afresh
   (a healed ref stays in `unfindable`, `ids` naming its donor, until a gc finds it counted
   and gives it back). On a shared repository this is a journal `quarantine` op that every
   host applies, and a heal's `pack` op ends it on every host (docs/FORMAT.md, "Damage on a
   shared repository");
b. heal each quarantined ref for which a good copy of the same chunk id exists (another ref, e.g.
   stored by a backup since): copy it into a new pack under the damaged ref, then point the ref
   there in one transaction; every point using the ref restores again (a pack is named by its
   bytes: the same copies healed again make the same pack, written again whole over a damaged
   one, whose refs are then healed where they are);
c. ask the next backup of each affected disk to re-read, from the source, the blocks that hold a
   still-quarantined chunk in the disk's newest point (`reread`: the block list the backup plan
   adds to the changed extents even though the change list calls them unchanged);
d. mark points that still use quarantined chunks as damaged (their manifest's `damage`), and
   clear the mark of points healed. Nothing is deleted.

Heal after a backup (`heal_after_backup`): a backup that stored a chunk again whose damaged copy
is quarantined (the re-read of step c, or any backup that read the same content) runs steps b
and d before it commits its point, so every older point using the damaged ref restores whole
again without another repair. The good copy is written into a new pack under the damaged ref,
not shared by pointing the ref at the backup's copy: every ref's place stays a pack trailer entry
of that ref (`rebuild-index` recreates it) and every place has one ref (gc's live counts and
repacking stay exact); the copies are only the damaged chunks. It needs the maintenance lock and
is postponed to the next backup or repair when another maintenance command holds it.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3
import lmdb
import numpy as np

from ..backup.extents import extents_to_blocks
from ..errors import DamageError, RepoError, UsageError
from ..pause import pause_point
from ..repository.index import U64, Index, PackInfo
from ..repository.index_records import PACK_KEY, REF_KEY, REF_REC
from ..repository.journal import PackOp, QuarantineOp
from ..repository.locks import MAINTENANCE, SHARED
from ..repository.packs import FinishedPack
from ..repository.repo import Repository
from ..units import MAX_DIGITS, cut, mib_per_s, parse_seconds, plural
from .gc import less_live
from .inventory import Affected, affected_by, refs_in_packs, scan_u64_keys

REASON_CHARS = 300  # of a damage's description, kept with a quarantine in the journal
# refs a journal `quarantine` entry names at most: with their reasons some 20 MB, which every
# host downloads and decodes whole (a lost store's million refs in one entry took 1 GB of
# memory to replay, and past some 3.5 million refs the entry outgrew what a host reads)
QUARANTINE_BATCH = 65536


@dataclass
class RepairReport:
    """What a repair (`scrub --repair`, or the heal step of a backup) did, and what is left."""

    quarantined: int = 0            # damaged chunks taken out of deduplication by this run
    healed: int = 0                 # quarantined chunks given a good copy again
    still_damaged: int = 0          # chunks that stay quarantined
    reread_blocks: int = 0          # blocks the next backups re-read from their sources
    rereads: list[dict] = field(default_factory=list)   # per disk: vm, disk, blocks
    points_marked_damaged: int = 0  # points newly marked damaged
    points_cleared: int = 0         # points whose damage mark was cleared
    damaged_points: list[str] = field(default_factory=list)   # points that stay damaged
    cleared_points: list[str] = field(default_factory=list)
    postponed: str = ""             # why the heal could not run now

    def summary(self) -> list[str]:
        """What happened and what is left to do, in sentences a user reads."""
        lines = []
        if self.quarantined:
            lines.append(f"quarantined {plural(self.quarantined, 'damaged chunk')}: no backup "
                         "deduplicates against it any more")
        if self.healed:
            lines.append(f"healed {plural(self.healed, 'damaged chunk')} from good copies"
                         + (f"; {plural(self.points_cleared, 'point')} "
                            f"{_verb(self.points_cleared, 'restore')} whole again: "
                            f"{_ids(self.cleared_points)}" if self.points_cleared else ""))
        if self.postponed:
            lines.append(f"damaged chunks this backup stored again were not healed yet "
                         f"({self.postponed}); the next backup or 'repo-engine scrub --repair' "
                         "heals them")
        for r in self.rereads:
            lines.append(f"the next backup of VM {r['vm']} disk {r['disk']} re-reads "
                         f"{plural(r['blocks'], 'block')} from the source and heals the points "
                         "whose data the disk still holds")
        if self.damaged_points:
            what = ("until then" if self.rereads else
                    "(no backup is due to read their content again)")
            n = len(self.damaged_points)
            lines.append(f"{plural(n, 'point')} {_verb(n, 'stay')} marked damaged "
                         f"{what}: {_ids(self.damaged_points)}; restoring their damaged disks fails "
                         "until they heal; 'forget' those not needed")
        return lines


def _verb(n: int, verb: str) -> str:
    return f"{verb}s" if n == 1 else verb


def _ids(points: list[str], limit: int = 10) -> str:
    more = f" and {len(points) - limit} more" if len(points) > limit else ""
    return ", ".join(p[:8] for p in points[:limit]) + more


@dataclass
class ScrubReport:
    packs_total: int = 0
    packs_scrubbed: int = 0
    packs_never_scrubbed: int = 0
    chunks_checked: int = 0
    bytes_read: int = 0
    raw_bytes: int = 0
    seconds: float = 0.0
    mib_per_s: float = 0.0
    stopped_early: bool = False
    damaged: list[dict] = field(default_factory=list)
    affected: list[Affected] = field(default_factory=list)
    repair: RepairReport | None = None

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.affected


@dataclass
class _PackResult:
    pack: PackInfo
    checked: int = 0
    bytes_read: int = 0
    raw: int = 0
    damaged: dict[int, str] = field(default_factory=dict)
    unreadable: str = ""


def parse_subset(text: str | None) -> tuple[str, float, int] | None:
    """`25%` or `25` -> ("percent", 25, 0); `2/7` -> ("slice", 2, 7)."""
    if not text:
        return None
    match = re.fullmatch(rf"\s*(\d{{1,{MAX_DIGITS}}})\s*/\s*(\d{{1,{MAX_DIGITS}}})\s*", text)
    if match:
        n, t = int(match.group(1)), int(match.group(2))
        if not 1 <= n <= t:
            raise UsageError(f"subset {text!r}: n/t needs 1 <= n <= t")
        return "slice", n, t
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%?\s*", text)
    if not match or not 0 < float(match.group(1)) <= 100:
        raise UsageError(f"subset {cut(text)!r}: give PERCENT (0-100, e.g. 10%) or n/t (e.g. 1/7)")
    return "percent", float(match.group(1)), 0


def select_packs(repo: Repository, subset: tuple[str, float, int] | None) -> list[PackInfo]:
    index = repo.index
    packs = index.all_packs()
    with index.env.begin() as txn:
        last = {p.number: U64.unpack(txn.get(bytes.fromhex(p.name), db=index.scrubbed) or
                                     U64.pack(0))[0] for p in packs}
    packs.sort(key=lambda p: (last[p.number], p.name))
    if subset is None:
        return packs
    kind, a, b = subset
    if kind == "slice":
        return [p for p in packs if int(p.name[:8], 16) % b == a - 1]
    budget = sum(p.size for p in packs) * a / 100
    chosen, total = [], 0
    for pack in packs:
        if total >= budget:
            break
        chosen.append(pack)
        total += pack.size
    return chosen


def _scrub_pack(repo: Repository, pack: PackInfo) -> _PackResult:
    result = _PackResult(pack)
    try:
        entries = repo.read_trailer(pack.name)
        data = repo.read_pack(pack.name, pack.size)
    except (DamageError, OSError) as exc:
        result.unreadable = str(exc)
        return result
    result.bytes_read = len(data)
    view, refs = memoryview(data), entries["ref"].tolist()
    index = repo.index
    with index.env.begin() as txn:
        places = [txn.get(REF_KEY.pack(ref), db=index.refs) for ref in refs]
    check = repo.chunk_checker(pack.name)
    for ref, offset, rec in zip(refs, entries["offset"].tolist(), places):
        if rec is None:
            continue
        chunk_id, number, off, stored, raw, codec = REF_REC.unpack(rec)
        if number != pack.number or off != offset:
            continue
        try:
            check(offset, chunk_id, view[offset:offset + stored], codec, raw, ref)
        except DamageError as exc:
            result.damaged[ref] = str(exc)
        result.checked += 1
        result.raw += raw
    if not result.damaged and blake3.blake3(data).hexdigest() != pack.name:
        result.damaged.update(_unlisted(repo, pack, entries))
    return result


def _unlisted(repo: Repository, pack: PackInfo, entries: np.ndarray) -> dict[int, str]:
    """The refs the index places in `pack` that its trailer does not list at that offset.
    Asked of a pack whose bytes do not hash to its name though every chunk it lists that the
    index places there is whole: another pack put in its place lists none of them (a pack that
    merely holds a damaged chunk no point uses any more lists them all)."""
    with repo.index.env.begin() as txn:
        placed = refs_in_packs(repo.index, txn, [pack.number])
    listed = set(zip(entries["ref"].tolist(), entries["offset"].tolist()))
    why = (f"pack {pack.name}: its bytes do not hash to its name and its trailer does not list "
           "this chunk (another pack was put in its place)")
    return {ref: why for ref, offset in zip(placed["ref"].tolist(), placed["offset"].tolist())
            if (ref, offset) not in listed}


def scrub(repo: Repository, *, subset: str | None = None, max_duration: str | float | None = None,
          repair: bool = False, workers: int | None = None,
          tick: Callable[[int], None] | None = None) -> ScrubReport:
    kind = MAINTENANCE if repair else SHARED
    with repo.lock(kind, "scrub --repair" if repair else "scrub"):
        report = _scrub(repo, parse_subset(subset), max_duration, workers, tick)
        if repair:
            report.repair = repair_damage(repo, {d["ref"]: d["reason"] for d in report.damaged})
            left = _quarantined(repo)
            report.damaged = [d for d in report.damaged if d["ref"] in set(left.tolist())]
            report.affected = affected_by(repo, left)
    return report


def _scrub(repo: Repository, subset: tuple[str, float, int] | None,
           max_duration: str | float | None, workers: int | None,
           tick: Callable[[int], None] | None) -> ScrubReport:
    started = time.monotonic()
    limit = (parse_seconds(max_duration, "--max-duration") if isinstance(max_duration, str)
             else max_duration)
    deadline = started + limit if limit is not None else None
    packs = select_packs(repo, subset)
    pause_point("scrub.snapshot")
    report = ScrubReport(packs_total=len(repo.index.all_packs()))
    workers = workers or max(2, os.cpu_count() or 2)
    damaged: dict[int, str] = {}
    unreadable: dict[int, str] = {}
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[_PackResult]] = deque()
        for pack in packs:
            if deadline is not None and time.monotonic() > deadline:
                report.stopped_early = True
                break
            pending.append(pool.submit(_scrub_pack, repo, pack))
            while len(pending) >= workers * 2:
                _collect(repo, pending.popleft().result(), report, damaged, unreadable, tick)
        for fut in pending:
            _collect(repo, fut.result(), report, damaged, unreadable, tick)
    if unreadable:
        with repo.index.env.begin() as txn:
            table = refs_in_packs(repo.index, txn, unreadable)
        for ref, number in zip(table["ref"].tolist(), table["pack"].tolist()):
            damaged.setdefault(ref, unreadable[number])
    report.damaged = [{"ref": r, "reason": damaged[r]} for r in sorted(damaged)]
    if damaged:
        report.affected = affected_by(repo, np.array(sorted(damaged), dtype=np.uint64))
    with repo.index.env.begin() as txn:
        report.packs_never_scrubbed = sum(
            1 for p in repo.index.all_packs()
            if txn.get(bytes.fromhex(p.name), db=repo.index.scrubbed) is None)
    report.seconds = round(time.monotonic() - started, 3)
    report.mib_per_s = mib_per_s(report.raw_bytes, report.seconds)
    return report


def _collect(repo: Repository, result: _PackResult, report: ScrubReport, damaged: dict[int, str],
             unreadable: dict[int, str], tick: Callable[[int], None] | None) -> None:
    report.packs_scrubbed += 1
    report.chunks_checked += result.checked
    report.bytes_read += result.bytes_read
    report.raw_bytes += result.raw
    damaged.update(result.damaged)
    if result.unreadable:
        unreadable[result.pack.number] = result.unreadable
    if not repo.index.read_only:  # read-only media: checked, though the time is not kept
        with repo.index.write() as txn:
            txn.put(bytes.fromhex(result.pack.name), U64.pack(int(time.time())),
                    db=repo.index.scrubbed)
    if tick:
        tick(result.pack.size)


# -- repair ---------------------------------------------------------------------------------
def _quarantined(repo: Repository) -> np.ndarray:
    with repo.index.env.begin() as txn:
        return scan_u64_keys(txn, repo.index.quarantine)


def repair_damage(repo: Repository, damaged: dict[int, str]) -> RepairReport:
    """Quarantine, heal from good copies, ask for re-reads, mark damaged points (steps a-d)."""
    _quarantine(repo, damaged)
    report = RepairReport(quarantined=len(damaged), healed=_heal(repo))
    _settle(repo, report, rereads=True)
    return report


def heal_after_backup(repo: Repository, command: str, reread: bool) -> RepairReport | None:
    """Steps b and d once a backup's chunks are indexed, when it stored again a chunk whose damaged
    copy is quarantined. After a backup that re-read blocks for a repair (`reread`), also what
    stays damaged. None when there is nothing to say (the usual case costs one look-up)."""
    if not _donors(repo):
        if not reread or not len(_quarantined(repo)):
            return None
        report = RepairReport()
        _left(repo, report)   # read-only: the marks already say this
        return report if report.damaged_points else None
    try:
        with repo.lock(MAINTENANCE, command):
            report = RepairReport(healed=_heal(repo))
            _settle(repo, report, rereads=False)
            return report
    except RepoError as exc:  # the lock is taken (or a point's marks could not be rewritten):
        return RepairReport(postponed=str(exc).split(";")[0])  # the backup itself goes on


def _left(repo: Repository, report: RepairReport) -> list[Affected]:
    """The chunks that stay quarantined and the points using them, into `report`."""
    left = _quarantined(repo)
    affected = affected_by(repo, left) if len(left) else []
    report.still_damaged = len(left)
    report.damaged_points = sorted({a.point for a in affected})
    return affected


def _settle(repo: Repository, report: RepairReport, *, rereads: bool) -> None:
    """Steps c (when `rereads`) and d, and what is left, into `report`."""
    affected = _left(repo, report)
    if rereads:
        report.rereads = _request_rereads(repo, affected)
        report.reread_blocks = sum(r["blocks"] for r in report.rereads)
    marked, cleared = _mark_points(repo, affected)
    report.points_marked_damaged, report.points_cleared = len(marked), len(cleared)
    report.cleared_points = cleared


def _quarantine(repo: Repository, damaged: dict[int, str]) -> None:
    """Step a (on a shared repository `_publish_quarantine`)."""
    refs = sorted(damaged)
    reasons = {ref: _storable(reason) for ref, reason in damaged.items()}
    if repo.config.shared:
        _publish_quarantine(repo, refs, reasons)
        return
    index = repo.index
    with index.write() as txn:
        for ref in refs:
            index.quarantine_ref(txn, ref, reasons[ref])


def _publish_quarantine(repo: Repository, refs: list[int], reasons: dict[int, str]) -> None:
    """A shared repository's quarantine is journal commits (`quarantine` ops of at most
    QUARANTINE_BATCH refs each), so that every host takes the refs out of deduplication: a
    host that still found a damaged chunk would deduplicate against it and never store the
    good copy a heal needs. Refs this host holds quarantined already are committed again (a
    note an earlier repo-engine kept to this host reaches the others so; the replay of one
    they know changes nothing)."""
    for start in range(0, len(refs), QUARANTINE_BATCH):
        part = refs[start:start + QUARANTINE_BATCH]
        op = QuarantineOp(np.array(part, np.uint64), [reasons[r] for r in part])
        repo.commit_journal(lambda _seq, op=op: [op])


def _storable(reason: str) -> str:
    """`reason` cut to REASON_CHARS, in UTF-8 (an error's text may name a path decoded with
    surrogate escapes: each byte that is not UTF-8 becomes '?'; an entry holding one could
    be applied by no host)."""
    return reason[:REASON_CHARS].encode("utf-8", "replace").decode()


def read_chunk(repo: Repository, ref: int) -> tuple[bytes, bytes, int, int] | None:
    """(id, stored blob, raw length, codec) of a ref, checked; None if missing or damaged."""
    with repo.index.env.begin() as txn:
        rec = txn.get(REF_KEY.pack(ref), db=repo.index.refs)
    if rec is None:
        return None
    chunk_id, number, offset, stored, raw, codec = REF_REC.unpack(rec)
    try:
        name = repo.index.pack_info(number).name
        blob = repo.checked_chunk(name, offset, chunk_id,
                                  repo.read_chunk_range(name, offset, stored), codec, raw,
                                  f"ref {ref}")
    except (RepoError, OSError):
        return None
    return chunk_id, blob, raw, codec


def _donors(repo: Repository) -> list[tuple[int, int]]:
    """(quarantined ref, ref of a good copy of the same chunk id) for each ref that can heal."""
    index = repo.index
    todo = []
    with index.env.begin() as txn:
        for key, _ in txn.cursor(db=index.quarantine):
            rec = txn.get(key, db=index.refs)
            other = txn.get(rec[:32], db=index.ids) if rec is not None else None
            ref = REF_KEY.unpack(key)[0]
            if other is not None and U64.unpack(other)[0] != ref:
                todo.append((ref, U64.unpack(other)[0]))
    return todo


def _heal(repo: Repository) -> int:
    """Step b: copy a good copy of each healable quarantined chunk into a new pack under the
    damaged ref and point the ref there; returns how many refs healed."""
    good = []
    for ref, donor in _donors(repo):
        chunk = read_chunk(repo, donor)
        if chunk is not None:
            good.append((ref, *chunk))
    if not good:
        return 0
    writer = repo.pack_writer()
    for ref, chunk_id, blob, raw, codec in good:
        writer.add(ref, chunk_id, blob, raw, codec)
    finished = writer.finish()
    return (_heal_shared if repo.config.shared else _heal_local)(repo, finished)


def _heal_local(repo: Repository, finished: FinishedPack) -> int:
    """Point each healed ref to its copy in the new pack, in one transaction. Refs healed or
    dropped meanwhile are left out (their copies stay unused in the pack, for gc). A pack the
    index knows by that name is the same bytes written again whole (a heal's pack damaged in
    turn, healed from the same copy): its refs are healed where they are, under its one record
    (a second record of the name would leave the first one unused, and gc would delete the
    object both name)."""
    index = repo.index
    with index.write() as txn:
        known = txn.get(bytes.fromhex(finished.name), db=index.packnames)
        if known is not None:
            return _healed_in_place(index, txn, PACK_KEY.unpack(known)[0], finished)
        number = index.new_pack_number(txn)
        healed = stored_total = 0
        for e in finished.entries:
            key = REF_KEY.pack(e.ref)
            old = txn.get(key, db=index.refs)
            # healed or dropped meanwhile: this copy stays unused in the pack, for gc
            if old is None or txn.get(key, db=index.quarantine) is None:
                continue
            _, old_pack, _, old_stored, *_ = REF_REC.unpack(old)
            less_live(txn, index, old_pack, old_stored)
            txn.put(key, REF_REC.pack(e.chunk_id, number, e.offset, e.stored, e.raw, e.codec),
                    db=index.refs)
            txn.delete(key, db=index.quarantine)
            healed += 1
            stored_total += e.stored
        count = len(finished.entries)
        index.put_pack_record(txn, number, bytes.fromhex(finished.name), finished.size, count,
                              healed, stored_total)
    return healed


def _healed_in_place(index: Index, txn: lmdb.Transaction, number: int,
                     finished: FinishedPack) -> int:
    """The quarantined refs of `finished` that pack `number` (of the same name) places: whole
    again where they are (their live counts never changed)."""
    healed = 0
    for e in finished.entries:
        key = REF_KEY.pack(e.ref)
        rec = txn.get(key, db=index.refs)
        if (rec is not None and REF_REC.unpack(rec)[1] == number
                and txn.delete(key, db=index.quarantine)):
            healed += 1
    return healed


def _heal_shared(repo: Repository, finished: FinishedPack) -> int:
    """A shared repository's heal is a journal commit: the `pack` op of the healed pack, whose
    replay on every host places the healed refs in it (a replayed pack entry replaces a ref's
    place) and ends their quarantine, so that every host reads the good copy and gc knows the
    pack. Refs healed or dropped meanwhile are left out (their copies stay unused in the pack,
    for gc)."""
    index = repo.index
    with index.env.begin() as txn:
        keys = [REF_KEY.pack(e.ref) for e in finished.entries]
        healed = [e for e, key in zip(finished.entries, keys)
                  if txn.get(key, db=index.refs) is not None
                  and txn.get(key, db=index.quarantine) is not None]
    if healed:  # its replay, here too, takes the healed refs out of `quarantine`
        pack = FinishedPack(finished.name, finished.size, healed)
        repo.commit_journal(lambda _seq: [PackOp.of(pack)])
    return len(healed)


def _request_rereads(repo: Repository, affected: list[Affected]) -> list[dict]:
    """For each (VM, disk) whose newest point uses a quarantined chunk: re-read those blocks."""
    points = repo.points()
    catalog = {p.id: p for p in points}
    newest: dict[tuple[str, str], str] = {}
    for point in points:
        for disk in point.disks:
            newest[(point.vm, disk.key)] = point.id
    out = []
    for a in affected:
        if newest.get((a.vm, a.disk)) != a.point:
            continue
        disk = catalog[a.point].disk(a.disk)
        assert disk is not None
        blocks = extents_to_blocks(np.array(a.extents, dtype=np.int64), disk.block_size)
        repo.index.add_reread(a.vm, a.disk, blocks)
        out.append({"vm": a.vm, "disk": a.disk, "blocks": len(blocks)})
    return out


def _mark_points(repo: Repository, affected: list[Affected]) -> tuple[list[str], list[str]]:
    """Set each point's damage mark to what `affected` says; returns the ids newly marked and
    cleared."""
    damage: dict[str, list[str]] = {}
    for a in affected:
        ranges = ", ".join(f"{o}+{n}" for o, n in a.extents[:20])
        more = f" and {len(a.extents) - 20} more" if len(a.extents) > 20 else ""
        damage.setdefault(a.point, []).append(
            f"disk {a.disk}: {a.blocks} blocks unreadable at bytes {ranges}{more}")
    marked, cleared = [], []
    for point in repo.points():
        want = damage.get(point.id, [])
        if want == point.damage:
            continue
        repo.rewrite_point(point, damage=want)
        (marked if want else cleared).append(point.id)
    return marked, cleared
