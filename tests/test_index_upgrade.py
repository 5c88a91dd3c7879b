"""An index of version 3 or 4 is upgraded only when no other process holds a lock on the
repository: a process of an earlier repo-engine that opened it at version 3 keeps taking refs out
of deduplication without listing them in `unfindable`, so meanwhile this process uses the index
as that build does (no `unfindable` table, no locality, duplicates found through `ids` alone);
one that opened it at version 4 lists them without checks, so meanwhile this process reads the
entries unchecked, as that build does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from repo_engine.maintenance import gc as local_gc
from repo_engine.maintenance.gc import gc
from repo_engine.maintenance.inventory import count_damage, trusted_unfindable
from repo_engine.maintenance.scrub import _quarantine
from repo_engine.repository import seals
from repo_engine.repository.formats import INDEX_VERSION
from repo_engine.repository.index import Index
from repo_engine.repository.index_records import REF_KEY
from repo_engine.repository.locality import dedup_refs
from repo_engine.repository.repo import Repository
from test_index_damage import downgrade
from test_locality import BLOCK, back_up, first_backup_then_changed, map_refs, restored

HOLDER = """
import sys
from pathlib import Path
from repo_engine.repository.locks import SHARED, RepoLock
with RepoLock(Path(sys.argv[1]), SHARED, "backup (an earlier repo-engine)"):
    print("held", flush=True)
    sys.stdin.read()
"""


class Holder:
    """Another live process of this host holding a shared lock on `locks_dir` until released."""

    def __init__(self, locks_dir: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(locks_dir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "held\n"

    def release(self) -> None:
        self.proc.communicate("")
        assert self.proc.returncode == 0


def raw_tables(path: Path) -> tuple[int, bool, list[bytes]]:
    """The index's version, whether it has an `unfindable` table, and its main database's keys
    (named tables only: a write to a table that is not there must not land in it)."""
    env = lmdb.open(str(path / "index"), max_dbs=32, map_size=1 << 40, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            names = [key for key, _ in txn.cursor()]
            version = int.from_bytes(txn.get(b"version", db=env.open_db(b"meta", txn=txn)),
                                     "little")
        return version, b"unfindable" in names, names
    finally:
        env.close()


def test_a_version_3_index_is_upgraded_only_when_no_other_process_holds_a_lock(tmp_path):
    path = tmp_path / "repo"
    repo = Repository.init(path, block_size=BLOCK)
    model, doomed, _kept = first_backup_then_changed(repo, tmp_path)
    local_gc.settle_dead_maps(repo)
    local_gc._mark(repo)  # an earlier gc stopped after its mark: `ids` no longer names `doomed`
    repo.close()
    downgrade(path, 3)
    _version, _has, names_before = raw_tables(path)

    holder = Holder(path / "locks")
    try:
        repo = Repository.open(path)
        try:
            again = back_up(repo, "b", model)  # a writer: opens the index writable
            assert repo.index.unfindable is None
            assert doomed not in map_refs(repo, again).tolist()
            assert again.counters["new_chunks"] == 1  # the doomed chunk, stored again
            # the writers that take refs out of deduplication, as the earlier build wrote
            damaged = int(map_refs(repo, again)[0])
            _quarantine(repo, {damaged: "test: damaged"})
            local_gc._mark(repo)
            assert restored(repo, again.id, tmp_path) == bytes(model.content)
        finally:
            repo.close()
        assert raw_tables(path) == (3, False, names_before)
    finally:
        holder.release()

    repo = Repository.open(path)
    try:
        back_up(repo, "c", model)  # opens the index under its own lock: that one does not count
        with repo.index.env.begin() as txn:
            assert repo.index.meta_u64("version") == INDEX_VERSION
            hidden = {REF_KEY.unpack(k)[0] for k, _ in txn.cursor(db=repo.index.unfindable)}
        assert {doomed, damaged} <= hidden
        gc(repo)
        assert restored(repo, again.id, tmp_path) == bytes(model.content)
    finally:
        repo.close()
    assert raw_tables(path)[:2] == (INDEX_VERSION, True)


def test_a_cache_of_version_3_is_upgraded_only_when_no_other_process_of_the_host_holds_a_lock(
        tmp_path, monkeypatch):
    """The same rule for a shared repository's cache, by this host's locks: loaded from a
    checkpoint whose row of a quarantined chunk is not `indexed`, a cache kept at version 3
    finds the chunk through `ids` alone (not there: stored again); upgraded later, it lists it."""
    from helpers import attach_shared, shared_repo
    from test_locality_review import cache_of_version_3, stores_it_again

    a = shared_repo(tmp_path / "repo", tmp_path / "cache-a", block_size=BLOCK)
    try:
        model, damaged, cache = cache_of_version_3(a, tmp_path, monkeypatch)
        holder = Holder(cache / "locks")
        try:
            fresh = attach_shared(a.store, cache)
            try:
                stores_it_again(fresh, model, damaged, tmp_path)
                assert fresh.index.unfindable is None
            finally:
                fresh.close()
            assert raw_tables(cache)[:2] == (3, False)
        finally:
            holder.release()
        fresh = attach_shared(a.store, cache)
        try:
            fresh.refresh()
            with fresh.index.env.begin() as txn:
                assert fresh.index.meta_u64("version") == INDEX_VERSION
                assert txn.get(REF_KEY.pack(damaged), db=fresh.index.unfindable) is not None
        finally:
            fresh.close()
    finally:
        a.close()


def unfindable_values(path: Path) -> dict[int, bytes]:
    env = lmdb.open(str(path / "index"), max_dbs=32, map_size=1 << 40, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {REF_KEY.unpack(k)[0]: v for k, v in
                    txn.cursor(db=env.open_db(b"unfindable", txn=txn))}
    finally:
        env.close()


def stopped_after_mark(tmp_path: Path, version: int) -> tuple[Path, object, int]:
    """A repository whose gc stopped after its mark (`unfindable` lists the doomed ref), its
    index rewritten as `version` wrote it: (path, the disk's model, the doomed ref)."""
    path = tmp_path / "repo"
    repo = Repository.init(path, block_size=BLOCK)
    model, doomed, _kept = first_backup_then_changed(repo, tmp_path)
    local_gc.settle_dead_maps(repo)
    local_gc._mark(repo)
    repo.close()
    downgrade(path, version)
    return path, model, doomed


def test_a_version_4_index_gets_checked_entries_only_when_no_other_process_holds_a_lock(
        tmp_path):
    """Kept at version 4 meanwhile, read unchecked: a look-up by locality still skips the
    listed ref (writable or read-only open); upgraded later, every entry holds its check."""
    path, model, doomed = stopped_after_mark(tmp_path, 4)
    assert unfindable_values(path) == {doomed: b""}

    holder = Holder(path / "locks")
    try:
        repo = Repository.open(path)
        try:
            again = back_up(repo, "b", model)
            assert not repo.index.listed
            assert doomed not in map_refs(repo, again).tolist()
            assert again.counters["new_chunks"] == 1  # the doomed chunk, stored again
        finally:
            repo.close()
        assert raw_tables(path)[0] == 4
        index = Index(path / "index", read_only=True)
        try:
            with index.reader() as reader:
                ids = [reader.chunk_id_of(r) for r in range(doomed - 5, doomed + 5)]
                found, _ = dedup_refs(reader, ids)
            assert doomed not in found and None not in found  # the doomed id: its new copy
        finally:
            index.env.close()
    finally:
        holder.release()

    repo = Repository.open(path)
    try:
        assert repo.index.listed and repo.index.meta_u64("version") == INDEX_VERSION
        with repo.index.env.begin() as txn:
            assert list(txn.cursor(db=repo.index.unfindable)) == [
                (REF_KEY.pack(doomed), seals.mark("unfindable", REF_KEY.pack(doomed)))]
        gc(repo)
        assert restored(repo, again.id, tmp_path) == bytes(model.content)
    finally:
        repo.close()


def test_the_batched_upgrade_of_a_cache_lists_exactly_the_refs_ids_does_not_name(tmp_path,
                                                                                 monkeypatch):
    """The upgrade of a shared repository's cache from version 3 looks the ids of its refs up a
    batch at a time (in id order, answers matched back): it lists what one look-up a ref lists,
    across batches (made small here), with ids that differ only in trailing NUL bytes, copies
    of one id at several refs, an `ids` value of the wrong size, queued refs with and without a
    place."""
    import numpy as np

    from repo_engine.repository import index_upgrade
    from repo_engine.repository.index import U64
    from repo_engine.repository.index_records import REF_REC

    monkeypatch.setattr(index_upgrade, "UPGRADE_ROWS", 7)
    rng = np.random.default_rng(5)
    path = tmp_path / "index"
    index = Index(path, create=True)
    chunk_ids = [rng.bytes(32) for _ in range(40)]
    chunk_ids += [b"\x01" * 30 + b"\0\0", b"\x01" * 30 + b"\0\x02", b"\x01" * 31 + b"\0"]
    with index.write() as txn:
        for ref, chunk_id in enumerate(chunk_ids * 2, 1):  # every id at two refs
            txn.put(REF_KEY.pack(ref), REF_REC.pack(chunk_id, 0, ref, 1, 1, 0), db=index.refs)
            choice = ref % 5
            if choice == 0:  # the id's entry names this ref
                txn.put(chunk_id, U64.pack(ref), db=index.ids)
            elif choice == 1 and txn.get(chunk_id, db=index.ids) is None:  # another ref
                txn.put(chunk_id, U64.pack(ref + 1000), db=index.ids)
            elif choice == 2:
                txn.put(chunk_id, U64.pack(ref)[:7], db=index.ids)  # damaged
        for ref in (3, 5, 500):  # queued: placed, or not (500)
            txn.put(REF_KEY.pack(ref), b"", db=index.gcq)
        txn.put(b"journal_seq", U64.pack(1), db=index.meta)
        txn.put(b"version", U64.pack(3), db=index.meta)
        txn.drop(index.unfindable, delete=True)
        expected = {REF_KEY.unpack(key)[0] for key, raw in txn.cursor(db=index.refs)
                    if txn.get(raw[:32], db=index.ids) != U64.pack(REF_KEY.unpack(key)[0])}
    index.close()
    assert 0 < len(expected) < len(chunk_ids) * 2

    index = Index(path)
    try:
        with index.env.begin() as txn:
            listed = {REF_KEY.unpack(k)[0]: v for k, v in txn.cursor(db=index.unfindable)}
        assert set(listed) == expected | {500}
        assert all(v == seals.mark("unfindable", REF_KEY.pack(r)) for r, v in listed.items())
    finally:
        index.close()


OPENER = """
import sys
from pathlib import Path
from repo_engine.repository.repo import Repository
Repository.open(Path(sys.argv[1])).index.close()
"""


@pytest.mark.parametrize("version", [2, 3, 4])
def test_two_processes_opening_an_older_index_at_once_upgrade_it_once(tmp_path, monkeypatch,
                                                                      version):
    """This process reads the version, then another process upgrades the index before this one
    takes its first step: each step checks, in its write transaction, that the index is still at
    the version it upgrades (the counts sealed twice were taken for damage, and every later
    open refused the index)."""
    path, model, doomed = stopped_after_mark(tmp_path, version)
    write = Index.write

    def upgraded_meanwhile(self):  # the first write of the open: its first upgrade step
        if not called:
            called.append(version)
            subprocess.run([sys.executable, "-c", OPENER, str(path)], check=True)
        return write(self)

    monkeypatch.setattr(Index, "write", upgraded_meanwhile)
    called = []
    repo = Repository.open(path)
    try:
        assert repo.index.meta_u64("version") == INDEX_VERSION and repo.index.listed
        assert called == [version]  # the other process upgraded it in between
        again = back_up(repo, "b", model)
        assert doomed not in map_refs(repo, again).tolist()
        with repo.index.env.begin() as txn:
            assert not count_damage(repo.index, txn)
            assert list(trusted_unfindable(repo.index, txn)) == [doomed]
        gc(repo)
        assert restored(repo, again.id, tmp_path) == bytes(model.content)
    finally:
        repo.close()


@pytest.mark.parametrize("upgrade", [True, False], ids=["upgraded", "kept-at-3"])
def test_only_a_read_only_index_has_counts_without_seals(tmp_path, capsys, upgrade):
    """Counts without seals (version 2; 1 too) are read as such only through a read-only index:
    opened writable, the index seals them on open, also when it is kept at version 3 for an
    earlier build holding a lock (upgrade=False). So gc, which writes the counts, always meets
    them sealed (its sweep keeps no path for unsealed ones)."""
    from test_index_damage import Chain
    from repo_engine.repository.seals import CHECK_SIZE, PAYLOAD

    chain = Chain(tmp_path, capsys)
    downgrade(chain.repo, 2)  # (`downgrade` to 1 opens the repository: it upgrades it)
    reader = Index(chain.repo / "index", read_only=True)
    try:
        assert not reader.sealed
    finally:
        reader.close()
    index = Index(chain.repo / "index", upgrade=upgrade)
    try:
        assert index.sealed and not index.read_only
        assert index.meta_u64("version") == (INDEX_VERSION if upgrade else 3)
        with index.env.begin() as txn:
            for table, size in PAYLOAD.items():
                widths = {len(v) for _, v in txn.cursor(db=getattr(index, table))}
                assert widths <= {size + CHECK_SIZE}, table
            assert len(list(txn.cursor(db=index.mapuse))) > 0
    finally:
        index.close()
