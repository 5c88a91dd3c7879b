"""rebuild-index: recreate the LMDB index from pack trailers and point manifests alone, and
unlock: remove stale repository locks.

Rebuild, under an exclusive lock:
1. build a fresh index in `index.rebuild-*`: every pack whose trailer checks out is numbered and
   its chunks entered (a ref found in two packs — an interrupted repack — keeps the copy that
   decodes and matches its id). The trailers' entries are spilled to files by ref range (under
   the new index's directory, removed before the swap), then entered range by range in key
   order: memory is one range's entries, and each table is appended to, not inserted into at
   random places, so the cost grows with the chunks;
2. every manifest that checks out enters the catalog;
3. map use and reference counts are recounted from the catalog; unused chunks are queued for gc;
4. the old index directory is renamed away, the new one renamed into place, the old one removed.
A crash leaves either the old index or none ("run rebuild-index" again), and leftovers
(`index.rebuild-<pid>`, `index.old-<pid>`) the next rebuild removes first. Lost on the way: scrub
times, quarantine notes, re-read requests and forgets that were not finished (their points come
back, whole).

A shared repository's index is this host's cache of its journal (`rebuild_cache`): the new one is
the newest checkpoint plus the entries after it, swapped in the same way; it reads no pack and
no map.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LockedError, RepoError
from ..repository.checkpoint import catch_up
from ..repository.config import CONFIG_NAME, read_config
from ..repository.index import U64, Index
from ..repository.index_records import ref_keys
from ..repository.leases import Sightings, clear_leases
from ..repository.locks import (EXCLUSIVE, SHARED, TORN_HOST, LockInfo, RepoLock, is_stale,
                                list_locks, remove_if_stale, strays)
from ..repository.packs import PackEntry
from ..repository.points import read_point
from ..repository.safefile import make_dir
from ..repository.repo import Repository, check_layout, check_repository_directory
from ..repository.store import Store
from ..repository.store.local import LocalStore
from .gc import recount
from .inventory import objects_under
from .tally import REF_ROW


@dataclass
class RebuildReport:
    packs: int = 0
    chunks: int = 0
    points: int = 0
    duplicate_refs: int = 0
    unreadable_packs: list[str] = field(default_factory=list)
    unreadable_manifests: list[str] = field(default_factory=list)
    recount: dict = field(default_factory=dict)
    seconds: float = 0.0
    journal_seq: int = 0  # a shared repository: the journal entry the new cache holds


def rebuild_index(path: Path) -> RebuildReport:
    started = time.monotonic()
    check_repository_directory(path)
    store = LocalStore(path)
    config = read_config(store)
    check_layout(path)
    if config.shared:  # the journal is the truth: a manifest it never committed is no point
        repo = Repository(store, config, path)  # not attach: the old cache is never opened
        try:
            return rebuild_cache(repo)
        finally:
            repo.close()
    report = RebuildReport()
    with RepoLock(path / "locks", EXCLUSIVE, "rebuild-index"):
        work = path / f"index.rebuild-{os.getpid()}"
        remove_leftovers(path)
        index = Index(work, create=True)
        repo = Repository(store, config, path, index)
        try:
            _packs(repo, report, work / "spill")
            shutil.rmtree(work / "spill")
            _points(repo, report)
            report.recount = recount(repo, strict=False)
        finally:
            repo.close()
        _swap(path, work)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def rebuild_cache(repo: Repository) -> RebuildReport:
    """rebuild-index of a shared repository: this host's cache anew from the store's newest
    checkpoint and the journal entries after it, under this host's exclusive lock."""
    started = time.monotonic()
    report = RebuildReport()
    with RepoLock(repo.locks_dir, EXCLUSIVE, "rebuild-index"):
        work = repo.path / f"index.rebuild-{os.getpid()}"
        remove_leftovers(repo.path)
        index = Index(work, create=True)
        try:
            report.journal_seq = catch_up(repo.store, index, check=True, sealer=repo.sealer)
            report.packs = len(index.all_packs())
            report.chunks = index.counters()["chunks"]
            report.points = len(index.points_records())
        finally:
            index.close()
        repo.close_index()
        _swap(repo.path, work)
    report.seconds = round(time.monotonic() - started, 3)
    return report


# a trailer entry on its way into the new index: its pack's number, and `seq` the order in which
# entries are met (packs by name, entries in trailer order): what decides between copies
_ROW = np.dtype([("ref", "<u8"), ("seq", "<u8"), ("id", "V32"), ("pack", "<u4"),
                 ("offset", "<u8"), ("stored", "<u4"), ("raw", "<u4"), ("codec", "u1")])
_ID_ROW = np.dtype([("id", "V32"), ("seq", "<u8"), ("ref", "<u8")])
REF_SPAN = 1 << 17  # refs per spill file (about 9 MiB of rows read back at once)
ID_ROWS = 1 << 17  # ids per spill file, about (ids are uniform)


class _Spill:
    """Rows kept in files by bucket, read back a bucket at a time in bucket order: an external
    sort by key range, so the memory it needs is one bucket's whatever the repository holds."""

    def __init__(self, folder: Path, dtype: np.dtype) -> None:
        self.folder, self.dtype = folder, dtype
        make_dir(folder)

    def add(self, rows: np.ndarray, buckets: np.ndarray) -> None:
        order = np.argsort(buckets, kind="stable")
        rows, buckets = rows[order], buckets[order]
        keys, starts = np.unique(buckets, return_index=True)
        for key, start, end in zip(keys.tolist(), starts.tolist(),
                                   [*starts[1:].tolist(), len(rows)]):
            with open(self.folder / f"{key:016x}", "ab") as out:
                out.write(rows[start:end].tobytes())

    def __iter__(self) -> Iterator[np.ndarray]:
        for path in sorted(self.folder.iterdir()):
            rows = np.fromfile(path, self.dtype)
            path.unlink()
            yield rows


@dataclass
class _Packs:
    """The readable packs by number (the order they are met: by name), and per pack the
    entries chosen into it and their stored bytes."""

    names: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    chosen: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    stored: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def _packs(repo: Repository, report: RebuildReport, spill_dir: Path) -> None:
    """Enter every readable pack's chunks: the trailers are read once, their entries spilled
    by ref range, then written in ref order (refs) and in id order (ids), each table appended
    to in key order (an insert at a random place of a growing tree costs a page each)."""
    packs, rows_met = _Packs(), 0
    make_dir(spill_dir)
    spill = _Spill(spill_dir / "refs", _ROW)
    skipped = report.unreadable_packs  # symlinks, FIFOs, ...: never read
    for name, info in sorted(objects_under(repo, "packs", skipped).items()):
        try:
            entries = repo.read_trailer(name)
        except RepoError as exc:
            report.unreadable_packs.append(str(exc))
            continue
        rows = np.zeros(len(entries), _ROW)
        for field_name in ("ref", "id", "offset", "stored", "raw", "codec"):
            rows[field_name] = entries[field_name]
        rows["pack"] = len(packs.names)
        rows["seq"] = np.arange(rows_met, rows_met + len(rows), dtype=np.uint64)
        rows_met += len(rows)
        spill.add(rows, rows["ref"] // REF_SPAN)
        packs.names.append(name)
        packs.sizes.append(info.size)
    packs.chosen = np.zeros(len(packs.names), np.int64)
    packs.stored = np.zeros(len(packs.names), np.int64)
    id_bits = min(16, max(0, (rows_met // ID_ROWS).bit_length()))
    ids = _Spill(spill_dir / "ids", _ID_ROW)
    for rows in spill:
        chosen, final = _choose(repo, packs, rows, report)
        _put_refs(repo.index, final)
        packs.chosen += np.bincount(chosen["pack"], minlength=len(packs.names))
        packs.stored += np.bincount(chosen["pack"], weights=chosen["stored"].astype(np.float64),
                                    minlength=len(packs.names)).astype(np.int64)
        by_id = np.zeros(len(chosen), _ID_ROW)
        for field_name in ("id", "seq", "ref"):
            by_id[field_name] = chosen[field_name]
        prefix = np.ascontiguousarray(chosen["id"]).view(np.uint8).reshape(-1, 32)[:, :2]
        ids.add(by_id, (prefix[:, 0].astype(np.int64) << 8 | prefix[:, 1]) >> (16 - id_bits))
        report.chunks += len(chosen)
    for rows in ids:
        _put_ids(repo.index, rows)
    _put_packs(repo.index, packs)
    report.packs = len(packs.names)


def _choose(repo: Repository, packs: _Packs, rows: np.ndarray,
            report: RebuildReport) -> tuple[np.ndarray, np.ndarray]:
    """Of the entries of one ref range: (those entered, in the order met; the place each ref
    keeps, in ref order). A ref met again (an interrupted repack) counts as a duplicate; its
    later copy is entered, and placed, when it decodes and the copy placed so far in an
    earlier pack does not."""
    rows = rows[np.lexsort((rows["seq"], rows["ref"]))]
    first = np.ones(len(rows), bool)
    first[1:] = rows["ref"][1:] != rows["ref"][:-1]
    starts = np.flatnonzero(first)
    if len(starts) == len(rows):
        return rows, rows
    ends = [*starts[1:].tolist(), len(rows)]
    entered, placed = first.copy(), starts.copy()
    for group, (start, end) in enumerate(zip(starts.tolist(), ends)):
        report.duplicate_refs += end - start - 1
        for later in range(start + 1, end):
            indexed = [k for k in range(start, later)
                       if entered[k] and rows["pack"][k] < rows["pack"][later]]
            if _decodes(repo, packs.names[rows["pack"][later]], _entry(rows[later])) and (
                    not indexed or not _decodes(repo, packs.names[rows["pack"][indexed[-1]]],
                                                _entry(rows[indexed[-1]]))):
                entered[later] = True
                placed[group] = later
    chosen = rows[entered]
    return chosen[np.argsort(chosen["seq"], kind="stable")], rows[placed]


def _entry(row: np.void) -> PackEntry:
    return PackEntry(int(row["ref"]), row["id"].tobytes(), int(row["offset"]),
                     int(row["stored"]), int(row["raw"]), int(row["codec"]))


def _put_refs(index: Index, rows: np.ndarray) -> None:
    """Append the place records of `rows` (sorted by ref, above every ref entered before) and
    count their chunks."""
    if not len(rows):
        return
    values = np.zeros(len(rows), REF_ROW)
    for name in REF_ROW.names:
        values[name] = rows[name]
    values = values.tobytes()
    width = REF_ROW.itemsize
    with index.write() as txn:
        with txn.cursor(db=index.refs) as cursor:
            cursor.putmulti(zip(ref_keys(rows["ref"]),
                                (values[i * width:(i + 1) * width] for i in range(len(rows)))),
                            append=True)
        for name, delta in (("chunks", len(rows)),
                            ("raw_bytes", int(rows["raw"].astype(np.int64).sum())),
                            ("stored_bytes", int(rows["stored"].astype(np.int64).sum()))):
            index._add(txn, name, delta)
        top = int(rows["ref"][-1])
        if index._get_u64(txn, b"next_ref", index.meta) <= top:
            txn.put(b"next_ref", U64.pack(top + 1), db=index.meta)


def _put_ids(index: Index, rows: np.ndarray) -> None:
    """Append the ids of one id range: each id names the first ref entered with it."""
    words = np.ascontiguousarray(rows["id"]).view(">u8").reshape(-1, 4)
    rows = rows[np.lexsort((rows["seq"], words[:, 3], words[:, 2], words[:, 1], words[:, 0]))]
    first = np.ones(len(rows), bool)
    first[1:] = rows["id"][1:] != rows["id"][:-1]
    rows = rows[first]
    packed = rows["id"].tobytes()
    ids = [packed[i:i + 32] for i in range(0, len(packed), 32)]
    refs = rows["ref"].astype("<u8").tobytes()
    with index.write() as txn:
        with txn.cursor(db=index.ids) as cursor:
            cursor.putmulti(((chunk_id, refs[i * 8:i * 8 + 8]) for i, chunk_id in enumerate(ids)),
                            append=True)
        index.id_filter.inserted(txn, ids)


def _put_packs(index: Index, packs: _Packs) -> None:
    """List the packs, numbered in the order met from 0 (the numbers their refs name)."""
    with index.write() as txn:
        for i, (name, size) in enumerate(zip(packs.names, packs.sizes)):
            count, stored = int(packs.chosen[i]), int(packs.stored[i])
            index.put_pack_record(txn, index.new_pack_number(txn), bytes.fromhex(name), size,
                                  count, count, stored)


def _decodes(repo: Repository, name: str, e: PackEntry) -> bool:
    try:
        repo.checked_chunk(name, e.offset, e.chunk_id,
                           repo.read_chunk_range(name, e.offset, e.stored), e.codec, e.raw,
                           f"pack {name}")
        return True
    except (RepoError, OSError):
        return False


def _points(repo: Repository, report: RebuildReport) -> None:
    skipped = report.unreadable_manifests
    for point_id, info in sorted(objects_under(repo, "points", skipped).items()):
        try:
            point = read_point(repo.store, info.name, repo.sealer)
        except RepoError as exc:
            report.unreadable_manifests.append(str(exc))
            continue
        if point.id != point_id:
            report.unreadable_manifests.append(f"{repo.store.location}/{info.name}: names "
                                               f"point {point.id}")
            continue
        repo.index.put_point(point.id, point.summary())
        report.points += 1


def remove_leftovers(path: Path) -> None:
    """Remove what an interrupted rebuild left in `path`: its half-built index
    (`index.rebuild-<pid>`, with its spill files) and the index it was replacing
    (`index.old-<pid>`), each as large as an index. The caller holds the exclusive lock, so
    none is a running rebuild's."""
    for leftover in sorted([*path.glob("index.rebuild-*"), *path.glob("index.old-*")]):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        else:
            leftover.unlink(missing_ok=True)


def _swap(path: Path, work: Path) -> None:
    final = path / "index"
    old = path / f"index.old-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(work, final)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class UnlockReport:
    removed: list[dict] = field(default_factory=list)
    kept: list[dict] = field(default_factory=list)


def unlock(path: Path, *, force: bool = False) -> UnlockReport:
    """Remove stale locks (holder dead on this host); live ones or other hosts' only with force.
    Leases and store locks in the directory only with force: with no cache of this host's to
    time them on, none is known to be over (a shared repository's go through unlock_shared).
    Live leases of other hosts are running commands, no reason to refuse."""
    check_repository_directory(path)
    store = LocalStore(path)
    if not store.exists(CONFIG_NAME):  # a damaged config does not stop unlock; none does
        read_config(store)  # raises NotARepository (or damage: not a regular file)
    check_layout(path)
    return _unlock(path / "locks", store, None, force)


def unlock_shared(repo: Repository, *, force: bool = False) -> UnlockReport:
    """`unlock` of a shared repository in any store: this host's stale locks (in its cache
    directory) and the leases of every host that this host has seen unchanged for their span
    (leases.py, "Clocks"; all of both with force)."""
    return _unlock(repo.locks_dir, repo.store, repo.index, force)


def _unlock(locks_dir: Path, store: Store, watch: Sightings | None,
            force: bool) -> UnlockReport:
    report = UnlockReport()
    # half-created lock files carry no readable holder: test their flock as if they were ours
    this_host = LockInfo(SHARED, socket.gethostname(), -1, "", "")
    for lock_path in locks_dir.glob("*.new"):
        if is_stale(lock_path, this_host):
            lock_path.unlink(missing_ok=True)
    for stray in strays(locks_dir):  # a symlink, FIFO, ...: never a lock, never followed
        stray.unlink(missing_ok=True)
        report.removed.append({"file": stray.name, "kind": "stray", "host": "?", "pid": -1,
                               "command": "not a lock file", "since": ""})
    dead, alive = set(), set()  # the pids of this host's lock holders (a torn file names none)
    for lock_path, info in list_locks(locks_dir):
        doc = {"file": lock_path.name, "kind": info.kind, "host": info.host, "pid": info.pid,
               "command": info.command, "since": info.time}
        if force:
            lock_path.unlink(missing_ok=True)
        stale = force or remove_if_stale(lock_path, info)
        (report.removed if stale else report.kept).append(doc)
        if info.host == this_host.host:
            (dead if stale else alive).add(info.pid)
    live_locks = list(report.kept)
    # a dead holder's pid that a live one holds again is no evidence of the end of its records
    cleared = clear_leases(store, watch, {(this_host.host, pid) for pid in dead - alive},
                           force=force)
    report.removed += [found.doc() for found in cleared.removed]
    report.kept += [kept.doc(cleared.at) for kept in cleared.kept]
    if live_locks and not force:
        first = live_locks[0]
        holder = (f"{first['command']!r}, pid {first['pid']} on {first['host']}"
                  if first["host"] != TORN_HOST else
                  f"{first['file']}, which cannot be read: a lock being written, or one held on "
                  "another host")
        raise LockedError(f"{len(live_locks)} locks are held by live processes (e.g. {holder}); "
                          "use --force only if you are sure they are gone")
    return report
