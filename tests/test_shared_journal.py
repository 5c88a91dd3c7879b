"""The journal of a shared repository: damage and unknown operations refused, checkpoints that
let a fresh or stale host rebuild without the entries gc deleted, rebuild-index reading no pack
and no map, and the gc operations (plan, waits, sweep) as the cache applies them."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import blake3
import numpy as np
import pytest

from helpers import MIB, DiskModel, attach_shared, move_clocks, shared_repo
from repo_engine.backup.job import BackupOptions, backup_vm
from repo_engine.errors import CommitStalled, DamageError, FormatError, RepoError
from repo_engine.maintenance.shared_gc import swept_op
from repo_engine.maintenance.rebuild import rebuild_cache
from repo_engine.repository import checkpoint
from repo_engine.repository.blockmap import BlockMap
from repo_engine.repository.checkpoint import (checkpoint_object, load_checkpoint,
                                               write_checkpoint)
from repo_engine.repository.envelope import seal
from repo_engine.repository.formats import JOURNAL
from repo_engine.repository.journal import (HEAD_LEN, Entry, PlanOp, SweepOp, WaitsOp,
                                            entry_object, entry_seqs, manifest_key,
                                            new_plan_id)
from repo_engine.repository.packs import FinishedPack, pack_object
from repo_engine.repository.points import point_object
from repo_engine.repository.store.local import LocalStore
from repo_engine.restore.restorer import restore_disk
from repo_engine.sources.image import ImageDisk, image_snapshot


@pytest.fixture
def shared(tmp_path):
    repo = shared_repo(tmp_path / "repo", tmp_path / "cache-a")
    yield repo
    repo.close()


def back_up(repo, tmp_path: Path, vm: str, seed: int) -> tuple:
    model = DiskModel(tmp_path / f"{vm}-{seed}.img", 2 * MIB, np.random.default_rng(seed))
    model.random_changes(6)
    point = backup_vm(repo, image_snapshot(vm, [ImageDisk("d", model.path)]), BackupOptions())
    return point, model.copy_of_content()


def restores(repo, point, content: bytes, tmp_path: Path) -> bool:
    target = tmp_path / f"r-{point.id}.img"
    target.unlink(missing_ok=True)
    restore_disk(repo, next(p for p in repo.points() if p.id == point.id), "d", target)
    return target.read_bytes() == content


def fresh_host(tmp_path: Path, name: str = "cache-new"):
    return attach_shared(LocalStore(tmp_path / "repo"), tmp_path / name)


def test_a_moved_entry_is_damage(shared, tmp_path):
    back_up(shared, tmp_path, "vm", 1)
    root = tmp_path / "repo"
    first, second, spare = (root / entry_object(seq) for seq in (1, 2, 99))
    first.rename(spare)
    second.rename(first)
    spare.rename(second)
    with pytest.raises(DamageError, match="moved or tampered"):
        fresh_host(tmp_path).refresh()


def test_a_damaged_entry_is_damage(shared, tmp_path):
    back_up(shared, tmp_path, "vm", 1)
    path = tmp_path / "repo" / entry_object(1)
    data = bytearray(path.read_bytes())
    data[40] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DamageError, match="checksum"):
        fresh_host(tmp_path).refresh()


def test_an_unknown_operation_asks_for_an_upgrade(shared, tmp_path):
    header = json.dumps({"seq": 1, "time": "", "host": "h", "pid": 1,
                         "ops": [{"op": "teleport", "to": "mars"}]}).encode()
    LocalStore(tmp_path / "repo").put(entry_object(1), seal(JOURNAL, HEAD_LEN.pack(len(header))
                                                             + header), if_absent=True)
    with pytest.raises(FormatError, match="'teleport' is unknown.*upgrade repo-engine"):
        shared.refresh()
    assert shared.index.journal_seq == 0  # nothing of it applied


def test_replay_applies_each_entry_once_in_order(shared, tmp_path):
    point, _ = back_up(shared, tmp_path, "vm", 2)
    entry = Entry.new(99, [])
    with pytest.raises(DamageError, match="holds journal entries up to"):
        shared.index.apply_entry(entry)
    other = fresh_host(tmp_path)
    head = other.refresh()
    assert head == shared.index.journal_seq
    assert not other.index.apply_entry(Entry.new(head, []))  # applied already: no-op
    other.close()


@pytest.mark.parametrize("batch", [1 << 16, 5])
def test_checkpoint_and_deleted_entries_a_fresh_host_still_rebuilds(shared, tmp_path,
                                                                   monkeypatch, batch):
    monkeypatch.setattr(checkpoint, "BATCH", batch)  # 5: many records of each kind
    monkeypatch.setattr(checkpoint, "RECORDS_BATCH", min(batch, 1))
    store = LocalStore(tmp_path / "repo")
    kept = [back_up(shared, tmp_path, "vm1", 3), back_up(shared, tmp_path, "vm2", 4)]
    swept, pending = new_plan_id(), new_plan_id()
    shared.commit_journal(lambda _seq: [
        PlanOp(swept, "t", np.zeros(0, np.uint64), [], ["ab" * 32], []),
        SweepOp(swept, np.zeros(0, np.uint64), [], ["ab" * 32]),
        PlanOp(pending, "t", np.array([2**40], np.uint64), ["cd" * 32], ["ef" * 32], ["x/y"]),
        WaitsOp(pending, ["l.lease"])])
    shared.refresh()
    seq = write_checkpoint(store, shared.index)
    store.delete(entry_object(s) for s in range(1, seq + 1))
    kept.append(back_up(shared, tmp_path, "vm1", 5))  # entries after the checkpoint
    host = fresh_host(tmp_path)
    assert host.refresh() == shared.index.journal_seq
    assert [p.id for p in host.points()] == [p.id for p in shared.points()]
    assert host.index.counters() == shared.index.counters()
    assert [plan_fields(p) for p in host.index.pending_plans()] == \
        [(pending, "t", [2**40], ["cd" * 32], ["ef" * 32], ["x/y"], ["l.lease"])]
    assert host.index.doomed_maps({"ab" * 32, "ef" * 32, "12" * 32}) == {"ab" * 32, "ef" * 32}
    for point, content in kept:
        assert restores(host, point, content, tmp_path)
    # it deduplicates against what it loaded from the checkpoint
    again, _ = back_up(host, tmp_path, "vm3", 3)
    assert again.counters["new_chunks"] == 0
    host.close()


def test_compaction_waits_for_the_checkpoint_to_age(shared, tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "repo")
    back_up(shared, tmp_path, "vm", 14)
    assert not checkpoint.checkpoint_due(store, shared.index, every=100)
    assert checkpoint.checkpoint_due(store, shared.index, every=1)
    seq = write_checkpoint(store, shared.index)
    assert not checkpoint.checkpoint_due(store, shared.index, every=1)
    assert checkpoint.compact(store, shared.index, grace=0) == 0  # younger than STALE_AFTER
    move_clocks(monkeypatch, checkpoint.STALE_AFTER + 1, wall=())
    # younger than the grace
    assert checkpoint.compact(store, shared.index, grace=7 * 86400) == 0
    assert checkpoint.compact(store, shared.index, grace=0) == seq
    assert sorted(entry_seqs(store)) == []
    host = fresh_host(tmp_path)
    assert host.refresh() == seq
    host.close()


def plan_fields(plan) -> tuple:
    op = plan.op
    return op.plan, op.time, op.refs.tolist(), op.packs, op.maps, op.objects, plan.leases


def test_a_stale_host_loads_the_newer_checkpoint(shared, tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "repo")
    back_up(shared, tmp_path, "vm1", 6)
    stale = fresh_host(tmp_path, "cache-stale")
    stale.refresh()
    point, content = back_up(shared, tmp_path, "vm2", 7)
    shared.refresh()
    seq = write_checkpoint(store, shared.index)
    store.delete(entry_object(s) for s in range(1, seq + 1))
    move_clocks(monkeypatch, checkpoint.STALE_AFTER + 1, wall=())  # refreshed long ago
    assert stale.refresh() == seq
    assert restores(stale, point, content, tmp_path)
    stale.close()


def test_a_damaged_checkpoint_leaves_the_cache_as_it_was(shared, tmp_path):
    store = LocalStore(tmp_path / "repo")
    back_up(shared, tmp_path, "vm", 8)
    seq = write_checkpoint(store, shared.index)
    path = tmp_path / "repo" / checkpoint_object(seq)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    host = fresh_host(tmp_path)
    with pytest.raises(DamageError, match="checkpoint"):
        load_checkpoint(store, host.index, seq)
    assert host.index.journal_seq == 0 and host.points() == []
    host.close()


class CountingStore(LocalStore):
    """A local store that counts reads by the first part of the object name."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: Counter = Counter()

    def get(self, name, *, limit):
        self.reads[name.split("/")[0]] += 1
        return super().get(name, limit=limit)

    def get_range(self, name, offset, length):
        self.reads[name.split("/")[0]] += 1
        return super().get_range(name, offset, length)

    def get_start(self, name, length):
        self.reads[name.split("/")[0]] += 1
        return super().get_start(name, length)


def test_rebuild_index_of_a_shared_repository_reads_no_pack_and_no_map(shared, tmp_path):
    store = LocalStore(tmp_path / "repo")
    points = [back_up(shared, tmp_path, "vm", seed) for seed in (9, 10)]
    shared.refresh()
    write_checkpoint(store, shared.index)
    points.append(back_up(shared, tmp_path, "vm", 11))
    counting = CountingStore(tmp_path / "repo")
    host = attach_shared(counting, tmp_path / "cache-b")
    (tmp_path / "cache-b" / "index" / "data.mdb").write_bytes(b"damaged")
    report = rebuild_cache(host)
    assert set(counting.reads) <= {"journal", "config"} and counting.reads["journal"] > 0
    assert report.points == 3 and report.journal_seq == shared.index.journal_seq
    for point, content in points:
        assert restores(host, point, content, tmp_path)
    host.close()


def test_plan_makes_refs_unfindable_and_sweep_removes_them(shared, tmp_path):
    point, content = back_up(shared, tmp_path, "vm", 12)
    bmap = shared.read_map(point.disks[0].map)
    refs = np.unique(bmap.refs[bmap.refs != 0])
    doomed = refs[:3]
    plan = new_plan_id()
    shared.commit_journal(lambda _seq: [PlanOp(plan, "2026-01-01T00:00:00", doomed, [],
                                               ["ab" * 32], [])])
    host = fresh_host(tmp_path)
    host.refresh()
    for repo in (shared, host):
        with repo.index.reader() as lookup:
            assert all(lookup.chunk_id_of(int(r)) is not None for r in doomed)  # still placed
            assert all(lookup.ref_of(lookup.chunk_id_of(int(r))) is None for r in doomed)
        assert [p.op.plan for p in repo.index.pending_plans()] == [plan]
        assert repo.index.doomed_maps({"ab" * 32, "cd" * 32}) == {"ab" * 32}
    shared.commit_journal(lambda _seq: [WaitsOp(plan, ["h-1-00000000.lease"])])
    host.refresh()
    assert host.index.pending_plans()[0].leases == ["h-1-00000000.lease"]
    chunks = host.index.counters()["chunks"]
    shared.commit_journal(lambda _seq: [SweepOp(plan, doomed, [], [point.disks[0].map])])
    host.refresh()
    assert host.index.pending_plans() == []
    assert host.index.counters()["chunks"] == chunks - 3
    assert list(host.index.missing_refs(refs)) == list(doomed)
    # a new point naming the swept map gets a salted copy; naming swept refs: the backup stalled
    assert host.write_map(bmap) != point.disks[0].map
    stalled = point.__class__(**{**vars(point), "id": "0" * 16, "disks": list(point.disks)})
    with pytest.raises(RepoError, match="stalled past its lease"):
        host.commit_point(stalled, {point.disks[0].map: bmap})
    host.close()


def test_a_sweeps_notes_of_an_unindexed_pack_and_a_manifest_reach_every_host(shared, tmp_path):
    """A sweep that deleted a pack no cache indexed and a manifest no point named (a backup's
    that stalled past its lease) notes both on every host, through the journal and through a
    checkpoint: there a pack entry naming that pack, or the point's commit, is refused."""
    point, content = back_up(shared, tmp_path, "vm", 14)
    pack, late = "ef" * 32, replace(point, id="1" * 16, disks=list(point.disks))
    objects = [pack_object(pack), point_object(late.id)]
    plan = new_plan_id()
    shared.commit_journal(lambda _seq: [PlanOp(plan, "t", np.zeros(0, np.uint64), [], [],
                                               objects)])
    shared.commit_journal(lambda _seq: [swept_op(plan, np.zeros(0, np.uint64), [], [],
                                                 objects)])
    replayed = fresh_host(tmp_path, "cache-replayed")
    replayed.refresh()
    write_checkpoint(shared.store, shared.index)
    loaded = fresh_host(tmp_path, "cache-loaded")
    loaded.refresh()  # an empty cache loads the newest checkpoint
    assert loaded.index.journal_seq == replayed.index.journal_seq
    for host in (shared, replayed, loaded):
        assert host.index.swept({pack, manifest_key(late.id), "ab" * 32}) == {
            pack, manifest_key(late.id)}
        with pytest.raises(CommitStalled, match=f"gc deleted pack {pack}, uploaded and not"):
            host.index_packs([FinishedPack(pack, 0, [])])
        with pytest.raises(CommitStalled, match=f"gc deleted the manifest of point {late.id}"):
            host.commit_point(late)
        assert [p.id for p in host.points()] == [point.id]
        assert restores(host, point, content, tmp_path)
    replayed.close()
    loaded.close()


def test_a_commit_naming_a_doomed_map_writes_it_salted(shared, tmp_path):
    point, content = back_up(shared, tmp_path, "vm", 13)
    name = point.disks[0].map
    shared.commit_journal(lambda _seq: [PlanOp(new_plan_id(), "t", np.zeros(0, np.uint64), [],
                                               [name], [])])
    rewritten = shared.rewrite_point(point, tags=["kept"])
    assert rewritten.disks[0].map != name
    assert shared.read_map(rewritten.disks[0].map).refs.tolist() == \
        shared.read_map(name).refs.tolist()
    host = fresh_host(tmp_path)
    host.refresh()
    assert host.points()[0].disks[0].map == rewritten.disks[0].map
    assert restores(host, point, content, tmp_path)
    host.close()


def test_salted_map_reads_like_the_unsalted_one(tmp_path):
    from repo_engine.repository.blockmap import read_map, write_map

    store = LocalStore(tmp_path)
    bmap = BlockMap.full(np.arange(5, dtype=np.uint64))
    names = {write_map(store, bmap), write_map(store, bmap, salted=True),
             write_map(store, bmap, salted=True)}
    assert len(names) == 3
    for name in names:
        back = read_map(store, name)  # a FULL map read back holds its non-ZERO entries
        assert (back.nblocks, back.blocks.tolist(), back.refs.tolist()) == (5, [1, 2, 3, 4],
                                                                           [1, 2, 3, 4])


def test_catch_up_without_a_checkpoint_and_an_empty_journal(shared):
    assert shared.refresh() == 0
    assert checkpoint.newest_checkpoint(shared.store) is None


def test_a_read_only_index_of_an_earlier_version_still_opens(tmp_path, monkeypatch):
    """An index written before the journal's tables existed, on read-only media, opens (the
    tables a shared cache alone uses are absent)."""
    from repo_engine.repository import index as index_module
    from repo_engine.repository.index import Index

    old = Index(tmp_path / "index", create=True)
    with old.env.begin(write=True) as txn:
        for name in ("plans", "sweptmaps"):
            txn.drop(getattr(old, name), delete=True)
    old.close()
    monkeypatch.setattr(index_module.os, "access", lambda path, mode: False)
    again = Index(tmp_path / "index")
    assert again.read_only and again.plans is None and again.points_records() == []
    again.close()


def test_a_backup_never_writes_a_map_under_a_name_gc_doomed(shared, tmp_path):
    from repo_engine.repository.blockmap import encode, map_object

    bmap = BlockMap.full(np.arange(1, 9, dtype=np.uint64))
    doomed = blake3.blake3(encode(bmap)).hexdigest()
    shared.commit_journal(lambda _seq: [PlanOp(new_plan_id(), "t", np.zeros(0, np.uint64), [],
                                               [doomed], [])])
    name = shared.write_map(bmap)
    assert name != doomed and not shared.store.exists(map_object(doomed))
    assert shared.read_map(name).refs.tolist() == list(range(1, 9))


def test_a_rewrite_and_a_forget_in_one_entry(shared, tmp_path):
    """What forget commits: the consolidated child and the removal of its parent, at once."""
    from dataclasses import replace

    model = DiskModel(tmp_path / "d.img", 2 * MIB, np.random.default_rng(15))
    model.random_changes(4)
    snapshot = image_snapshot("vm", [ImageDisk("d", model.path)])
    parent = backup_vm(shared, snapshot, BackupOptions())
    model.random_changes(2)
    child = backup_vm(shared, snapshot, BackupOptions())
    full = BlockMap.full(shared.resolve(child, "d"))
    disk = replace(child.disks[0], map=shared.write_map(full), kind="full", parent=None, links=1)
    merged = replace(child, disks=[disk], generation=child.generation + 1)
    entry = shared.commit_forget([merged], [parent.id], lambda records: None, {disk.map: full})
    assert [type(op).__name__ for op in entry.ops] == ["PointOp", "ForgetOp"]
    host = fresh_host(tmp_path)
    host.refresh()
    [only] = host.points()
    assert (only.id, only.seq, only.disks[0].kind) == (child.id, child.seq, "full")
    assert host.load_point(child.id).generation == child.generation + 1
    assert restores(host, child, model.copy_of_content(), tmp_path)
    host.close()


def test_listing_the_journal_while_compaction_deletes_entries(tmp_path):
    """A local store's listing skips a file deleted after its directory was read (a refresh
    looks for checkpoints while gc deletes the entries they cover)."""
    store = LocalStore(tmp_path)
    for seq in (1, 2, 3):
        store.put(entry_object(seq), b"x")
    listing = store.list("journal/")
    first = next(listing)
    store.delete(entry_object(seq) for seq in (1, 2, 3) if entry_object(seq) != first.name)
    assert list(listing) == []
