"""rebuild-index: recreate the LMDB index from pack trailers and point manifests alone, and
unlock: remove stale repository locks.

Rebuild, under an exclusive lock:
1. build a fresh index in `index.rebuild-*`: every pack whose trailer checks out is numbered and
   its chunks entered (a ref found in two packs — an interrupted repack — keeps the copy that
   decodes and matches its id);
2. every manifest that checks out enters the catalog;
3. map use and reference counts are recounted from the catalog; unused chunks are queued for gc;
4. the old index directory is renamed away, the new one renamed into place, the old one removed.
A crash leaves either the old index or none ("run rebuild-index" again). Lost on the way: scrub
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
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LockedError, RepoError
from ..repository.checkpoint import catch_up
from ..repository.config import CONFIG_NAME, read_config
from ..repository.index import Index
from ..repository.leases import clear_leases
from ..repository.locks import (EXCLUSIVE, SHARED, TORN_HOST, LockInfo, RepoLock, is_stale,
                                list_locks, remove_if_stale, strays)
from ..repository.packs import FinishedPack, PackEntry
from ..repository.points import read_point
from ..repository.repo import Repository, check_layout
from ..repository.store import Store
from ..repository.store.local import LocalStore
from .gc import recount
from .inventory import objects_under
from .scrub import read_chunk


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
        shutil.rmtree(work, ignore_errors=True)
        index = Index(work, create=True)
        repo = Repository(store, config, path, index)
        try:
            _packs(repo, report)
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
        shutil.rmtree(work, ignore_errors=True)
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


def _packs(repo: Repository, report: RebuildReport) -> None:
    seen: set[int] = set()
    skipped = report.unreadable_packs  # symlinks, FIFOs, ...: never read
    for name, info in sorted(objects_under(repo, "packs", skipped).items()):
        try:
            entries = repo.read_trailer(name)
        except RepoError as exc:
            report.unreadable_packs.append(str(exc))
            continue
        chosen = []
        for e in entries:
            ref = int(e["ref"])
            entry = PackEntry(ref, e["id"].tobytes(), int(e["offset"]), int(e["stored"]),
                              int(e["raw"]), int(e["codec"]))
            if ref in seen:
                report.duplicate_refs += 1
                if _decodes(repo, name, entry) and read_chunk(repo, ref) is None:
                    chosen.append(entry)
                continue
            seen.add(ref)
            chosen.append(entry)
        repo.index.commit_pack(FinishedPack(name, info.size, chosen))
        report.packs += 1
        report.chunks += len(chosen)


def _decodes(repo: Repository, name: str, e: PackEntry) -> bool:
    try:
        blob = repo.read_chunk_range(name, e.offset, e.stored)
        blob = repo.open_chunk(name, e.offset, e.chunk_id, blob, f"pack {name}")
        repo.codec.decode(blob, e.codec, e.raw, e.chunk_id, f"pack {name}")
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
    Also the leases and maintenance locks in the store (a shared repository's) that expired; all
    of them with force. Live leases of other hosts are running commands, no reason to refuse."""
    store = LocalStore(path)
    if not store.exists(CONFIG_NAME):  # a damaged config does not stop unlock; none does
        read_config(store)  # raises NotARepository (or damage: not a regular file)
    check_layout(path)
    return _unlock(path / "locks", store, force)


def unlock_shared(repo: Repository, *, force: bool = False) -> UnlockReport:
    """`unlock` of a shared repository in any store: this host's stale locks (in its cache
    directory) and the expired leases of every host (all of both with force)."""
    return _unlock(repo.locks_dir, repo.store, force)


def _unlock(locks_dir: Path, store: Store, force: bool) -> UnlockReport:
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
    for lock_path, info in list_locks(locks_dir):
        doc = {"file": lock_path.name, "kind": info.kind, "host": info.host, "pid": info.pid,
               "command": info.command, "since": info.time}
        if force:
            lock_path.unlink(missing_ok=True)
        if force or remove_if_stale(lock_path, info):
            report.removed.append(doc)
        else:
            report.kept.append(doc)
    live_locks = list(report.kept)
    cleared = clear_leases(store, force=force)
    report.removed += [found.doc() for found in cleared.removed]
    report.kept += [found.doc() for found in cleared.kept]
    if live_locks and not force:
        first = live_locks[0]
        holder = (f"{first['command']!r}, pid {first['pid']} on {first['host']}"
                  if first["host"] != TORN_HOST else
                  f"{first['file']}, which cannot be read: a lock being written, or one held on "
                  "another host")
        raise LockedError(f"{len(live_locks)} locks are held by live processes (e.g. {holder}); "
                          "use --force only if you are sure they are gone")
    return report
