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
a. quarantine each damaged ref: note it in `quarantine` and delete its `ids` entry, so backups no
   longer deduplicate against it and store the next copy they read afresh;
b. heal each quarantined ref for which a good copy of the same chunk id exists (another ref, e.g.
   stored by a backup since): copy it into a new pack under the damaged ref, then point the ref
   there in one transaction; every point using the ref restores again;
c. ask the next backup of each affected disk to re-read, from the source, the blocks that hold a
   still-quarantined chunk in the disk's newest point (`reread`: the block list the backup plan
   adds to the changed extents even though the change list calls them unchanged); after that
   backup, a later repair heals older points whose chunk content is unchanged (step b);
d. mark points that still use quarantined chunks as damaged (their manifest's `damage`), and
   clear the mark of points healed. Nothing is deleted.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..backup.extents import extents_to_blocks
from ..errors import DamageError, RepoError, UsageError
from ..repository.index import REF_KEY, REF_REC, U64, PackInfo
from ..repository.locks import MAINTENANCE, SHARED
from ..repository.packs import pack_path, read_trailer
from ..repository.repo import Repository
from .gc import less_live
from .inventory import Affected, affected_by, scan_refs, scan_u64_keys


@dataclass
class ScrubReport:
    packs_total: int = 0
    packs_scrubbed: int = 0
    packs_never_scrubbed: int = 0
    chunks_checked: int = 0
    bytes_read: int = 0
    raw_bytes: int = 0
    seconds: float = 0.0
    mb_per_s: float = 0.0
    stopped_early: bool = False
    damaged: list[dict] = field(default_factory=list)
    affected: list[Affected] = field(default_factory=list)
    repair: dict = field(default_factory=dict)

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
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match:
        n, t = int(match.group(1)), int(match.group(2))
        if not 1 <= n <= t:
            raise UsageError(f"subset {text!r}: n/t needs 1 <= n <= t")
        return "slice", n, t
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%?\s*", text)
    if not match or not 0 < float(match.group(1)) <= 100:
        raise UsageError(f"subset {text!r}: give PERCENT (0-100, e.g. 10%) or n/t (e.g. 1/7)")
    return "percent", float(match.group(1)), 0


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)")


def parse_duration(text: str | None) -> float | None:
    """`90s`, `30m`, `2h`, `1h30m`, `1d` -> seconds."""
    if not text:
        return None
    clean = text.strip().lower()
    if not clean or _DURATION_RE.sub("", clean).strip():
        raise UsageError(f"not a duration: {text!r} (examples: 90s, 30m, 2h, 1h30m)")
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in _DURATION_RE.findall(clean))


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
    path = pack_path(repo.packs_dir, pack.name)
    try:
        entries = read_trailer(path)
        with open(path, "rb") as f:
            data = f.read()
    except (DamageError, OSError) as exc:
        result.unreadable = str(exc)
        return result
    result.bytes_read = len(data)
    view = memoryview(data)
    with repo.index.env.begin() as txn:
        places = [txn.get(REF_KEY.pack(int(ref)), db=repo.index.refs)
                  for ref in entries["ref"].tolist()]
    decode = repo.codec.decode
    for e, rec in zip(entries, places):
        if rec is None:
            continue
        ref, offset = int(e["ref"]), int(e["offset"])
        chunk_id, number, off, stored, raw, codec = REF_REC.unpack(rec)
        if number != pack.number or off != offset:
            continue
        try:
            decode(view[offset:offset + stored], codec, raw, chunk_id,
                   f"pack {pack.name} chunk ref {ref}")
        except DamageError as exc:
            result.damaged[ref] = str(exc)
        result.checked += 1
        result.raw += raw
    return result


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
    limit = parse_duration(max_duration) if isinstance(max_duration, str) else max_duration
    deadline = started + limit if limit is not None else None
    packs = select_packs(repo, subset)
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
            table = scan_refs(repo.index, txn)
        for number, reason in unreadable.items():
            for ref in table["ref"][table["pack"] == number].tolist():
                damaged.setdefault(int(ref), reason)
    report.damaged = [{"ref": r, "reason": damaged[r]} for r in sorted(damaged)]
    if damaged:
        report.affected = affected_by(repo, np.array(sorted(damaged), dtype=np.uint64))
    with repo.index.env.begin() as txn:
        report.packs_never_scrubbed = sum(
            1 for p in repo.index.all_packs()
            if txn.get(bytes.fromhex(p.name), db=repo.index.scrubbed) is None)
    report.seconds = round(time.monotonic() - started, 3)
    report.mb_per_s = round(report.raw_bytes / max(report.seconds, 1e-9) / 1e6, 1)
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
        with repo.index.env.begin(write=True) as txn:
            txn.put(bytes.fromhex(result.pack.name), U64.pack(int(time.time())),
                    db=repo.index.scrubbed)
    if tick:
        tick(result.pack.size)


# -- repair ---------------------------------------------------------------------------------
def _quarantined(repo: Repository) -> np.ndarray:
    with repo.index.env.begin() as txn:
        return scan_u64_keys(txn, repo.index.quarantine)


def repair_damage(repo: Repository, damaged: dict[int, str]) -> dict:
    """Quarantine, heal from good copies, ask for re-reads, mark damaged points (steps a-d)."""
    _quarantine(repo, damaged)
    healed = _heal(repo)
    left = _quarantined(repo)
    affected = affected_by(repo, left) if len(left) else []
    rereads = _request_rereads(repo, affected)
    marked, cleared = _mark_points(repo, affected)
    return {"quarantined": len(damaged), "healed": healed, "still_damaged": len(left),
            "reread_blocks": rereads, "points_marked_damaged": marked,
            "points_cleared": cleared}


def _quarantine(repo: Repository, damaged: dict[int, str]) -> None:
    index = repo.index
    with index.env.begin(write=True) as txn:
        for ref, reason in damaged.items():
            key = REF_KEY.pack(ref)
            txn.put(key, reason.encode()[:1000], db=index.quarantine)
            rec = txn.get(key, db=index.refs)
            if rec is not None and txn.get(rec[:32], db=index.ids) == U64.pack(ref):
                txn.delete(rec[:32], db=index.ids)


def read_chunk(repo: Repository, ref: int) -> tuple[bytes, bytes, int, int] | None:
    """(id, stored blob, raw length, codec) of a ref, checked; None if missing or damaged."""
    with repo.index.env.begin() as txn:
        rec = txn.get(REF_KEY.pack(ref), db=repo.index.refs)
    if rec is None:
        return None
    chunk_id, number, offset, stored, raw, codec = REF_REC.unpack(rec)
    try:
        path = pack_path(repo.packs_dir, repo.index.pack_info(number).name)
        with open(path, "rb") as f:
            blob = os.pread(f.fileno(), stored, offset)
        repo.codec.decode(blob, codec, raw, chunk_id, f"ref {ref}")
    except (RepoError, OSError):
        return None
    return chunk_id, blob, raw, codec


def _heal(repo: Repository) -> int:
    index = repo.index
    good: list[tuple[int, bytes, bytes, int, int]] = []
    with index.env.begin() as txn:
        todo = []
        for key, _ in txn.cursor(db=index.quarantine):
            rec = txn.get(key, db=index.refs)
            if rec is None:
                continue
            other = txn.get(rec[:32], db=index.ids)
            ref = REF_KEY.unpack(key)[0]
            if other is not None and U64.unpack(other)[0] != ref:
                todo.append((ref, U64.unpack(other)[0]))
    for ref, donor in todo:
        chunk = read_chunk(repo, donor)
        if chunk is not None:
            good.append((ref, *chunk))
    if not good:
        return 0
    writer = repo.pack_writer()
    for ref, chunk_id, blob, raw, codec in good:
        writer.add(ref, chunk_id, blob, raw, codec)
    finished = writer.finish()
    with index.env.begin(write=True) as txn:
        number = index.new_pack_number(txn)
        stored_total = 0
        for e in finished.entries:
            key = REF_KEY.pack(e.ref)
            old = txn.get(key, db=index.refs)
            if old is not None:
                _, old_pack, _, old_stored, *_ = REF_REC.unpack(old)
                less_live(txn, index, old_pack, old_stored)
            txn.put(key, REF_REC.pack(e.chunk_id, number, e.offset, e.stored, e.raw, e.codec),
                    db=index.refs)
            txn.delete(key, db=index.quarantine)
            stored_total += e.stored
        count = len(finished.entries)
        index.put_pack_record(txn, number, bytes.fromhex(finished.name), finished.size, count,
                              count, stored_total)
    return len(good)


def _request_rereads(repo: Repository, affected: list[Affected]) -> int:
    """For each (VM, disk) whose newest point uses a quarantined chunk: re-read those blocks."""
    points = repo.points()
    catalog = {p.id: p for p in points}
    newest: dict[tuple[str, str], str] = {}
    for point in points:
        for disk in point.disks:
            newest[(point.vm, disk.key)] = point.id
    total = 0
    for a in affected:
        if newest.get((a.vm, a.disk)) != a.point:
            continue
        disk = catalog[a.point].disk(a.disk)
        assert disk is not None
        blocks = extents_to_blocks(np.array(a.extents, dtype=np.int64), disk.block_size)
        repo.index.add_reread(a.vm, a.disk, blocks)
        total += len(blocks)
    return total


def _mark_points(repo: Repository, affected: list[Affected]) -> tuple[int, int]:
    damage: dict[str, list[str]] = {}
    for a in affected:
        ranges = ", ".join(f"{o}+{n}" for o, n in a.extents[:20])
        more = f" and {len(a.extents) - 20} more" if len(a.extents) > 20 else ""
        damage.setdefault(a.point, []).append(
            f"disk {a.disk}: {a.blocks} blocks unreadable at bytes {ranges}{more}")
    marked = cleared = 0
    for point in repo.points():
        want = damage.get(point.id, [])
        if want == point.damage:
            continue
        repo.rewrite_point(point, damage=want)
        marked += bool(want)
        cleared += not want
    return marked, cleared
