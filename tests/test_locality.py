"""Duplicates found by locality (repository/locality.py): a backup of a disk seen before finds
its chunks in runs of neighbouring refs, and never a ref some writer took out of deduplication
(a local gc's marked candidate, a shared repository's plan, a quarantined chunk): such a
neighbour is stored again, exactly as a look-up in `ids` would have it."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import KIB, DiskModel, attach_shared, stopped_before_commit
from repo_engine.backup.job import BackupOptions, backup_vm
from repo_engine.maintenance import gc as local_gc
from repo_engine.maintenance.deleter import Deleter
from repo_engine.maintenance.forget import forget_points
from repo_engine.maintenance.gc import GcReport, gc
from repo_engine.maintenance.scrub import _quarantine
from repo_engine.repository.formats import INDEX_VERSION
from repo_engine.repository.index import IndexReader
from repo_engine.repository.index_records import REF_KEY
from repo_engine.repository.locality import dedup_refs
from repo_engine.repository.repo import Repository
from repo_engine.restore.restorer import restore_disk
from repo_engine.sources.image import ImageDisk, image_snapshot

BLOCK = 16 * KIB
BLOCKS = 96
CHANGED = 40  # the block whose first chunk becomes a doomed neighbour


def disk_model(tmp_path, name: str, seed: int) -> DiskModel:
    """A disk of BLOCKS distinct random blocks: one run of refs when first backed up."""
    model = DiskModel(tmp_path / f"{name}.img", BLOCKS * BLOCK, np.random.default_rng(seed))
    model.write(0, model.rng.integers(1, 256, BLOCKS * BLOCK, dtype=np.uint8).tobytes())
    return model


def back_up(repo: Repository, vm: str, model: DiskModel):
    return backup_vm(repo, image_snapshot(vm, [ImageDisk("d", model.path)]), BackupOptions())


def restored(repo: Repository, point_id: str, tmp_path) -> bytes:
    target = tmp_path / f"restore-{point_id}.img"
    target.unlink(missing_ok=True)
    restore_disk(repo, next(p for p in repo.points() if p.id == point_id), "d", target)
    return target.read_bytes()


def map_refs(repo: Repository, point) -> np.ndarray:
    return repo.read_map(point.disks[0].map).refs


def counted_lookups(monkeypatch) -> list[int]:
    """Counts the look-ups through `ids` (IndexReader.dedup_ref) from now on."""
    calls = [0]
    original = IndexReader.dedup_ref

    def counting(self, chunk_id):
        calls[0] += 1
        return original(self, chunk_id)

    monkeypatch.setattr(IndexReader, "dedup_ref", counting)
    return calls


def first_backup_then_changed(repo: Repository, tmp_path) -> tuple[DiskModel, int, object]:
    """VM `a` backed up, block CHANGED rewritten and backed up again, then the first point
    forgotten: the first chunk of block CHANGED (ref `doomed`) is used by no point while its
    neighbours are. Returns the disk as first backed up, that ref and the kept point."""
    model = disk_model(tmp_path, "a", 1)
    first = back_up(repo, "a", model)
    doomed = int(map_refs(repo, first)[CHANGED])
    original = bytes(model.content)
    model.write(CHANGED * BLOCK, bytes(range(256)) * (BLOCK // 256))
    kept = back_up(repo, "a", model)
    forget_points(repo, [first.id])
    model.write(0, original)  # the disk as the first point had it: its chunks, in ref order
    return model, doomed, kept


@pytest.fixture
def local(tmp_path):
    repo = Repository.init(tmp_path / "repo", block_size=BLOCK)
    yield repo
    repo.close()


def test_a_disk_seen_before_is_found_in_runs_with_few_ids_lookups(local, tmp_path, monkeypatch):
    model = disk_model(tmp_path, "a", 1)
    first = back_up(local, "a", model)
    lookups = counted_lookups(monkeypatch)
    again = back_up(local, "b", model)  # another VM: no parent, every block read and looked up
    assert again.counters["dup_blocks"] == BLOCKS and again.counters["new_chunks"] == 0
    assert (map_refs(local, again) == map_refs(local, first)).all()
    assert lookups[0] <= 2 * (BLOCKS * BLOCK // (4 << 20) + 1)  # about one a batch, not a block
    assert restored(local, again.id, tmp_path) == bytes(model.content)


@pytest.mark.parametrize("taken_out_by", ["gc mark", "quarantine"])
def test_a_neighbour_taken_out_of_dedup_is_stored_again(local, tmp_path, monkeypatch,
                                                        taken_out_by):
    """gc marks the doomed ref (or scrub quarantines it); a backup started after that reads the
    same disk: the run around the ref is found by locality, the ref itself is stored again; gc
    then sweeps before that backup commits (it was not waited for), and the backup restores
    whole. A neighbourhood confirmed by `refs` alone would have named the swept (or damaged)
    chunk."""
    model, doomed, kept = first_backup_then_changed(local, tmp_path)
    if taken_out_by == "gc mark":
        local_gc.settle_dead_maps(local)
        listed = local_gc._mark(local)
        assert doomed in listed.candidates
        sweep = lambda: local_gc._sweep(local, listed, GcReport(), {},  # noqa: E731
                                        Deleter(local.store))
    else:
        _quarantine(local, {doomed: "test: damaged"})
        sweep = lambda: None  # noqa: E731
    lookups = counted_lookups(monkeypatch)
    with stopped_before_commit(lambda: back_up(local, "b", model), tmp_path, monkeypatch) as done:
        sweep()
    [again] = done
    refs = map_refs(local, again)
    assert doomed not in refs.tolist() and refs[CHANGED] != doomed
    assert again.counters["new_chunks"] == 1 and again.counters["dup_blocks"] == BLOCKS - 1
    assert lookups[0] < BLOCKS // 4  # the rest of the run still came from its neighbourhood
    assert restored(local, again.id, tmp_path) == bytes(model.content)
    gc(local)
    assert restored(local, again.id, tmp_path) == bytes(model.content)
    assert restored(local, kept.id, tmp_path)[CHANGED * BLOCK:][:256] == bytes(range(256))


def test_dedup_refs_answers_placed_refs_never_unfindable_and_all_ids_finds(local, tmp_path):
    """Against the look-up by id, over ids in many orders: every answer of `dedup_refs` is a
    placed ref holding that id and not unfindable, and every id `ids` finds is found."""
    model, doomed, _kept = first_backup_then_changed(local, tmp_path)
    local_gc.settle_dead_maps(local)
    local_gc._mark(local)
    with local.index.reader() as reader:
        ids = [bytes(i) for i in _placed_ids(local)]
        rng = np.random.default_rng(3)
        orders = [np.arange(len(ids)), np.arange(len(ids))[::-1], rng.permutation(len(ids))]
        orders += [np.sort(rng.choice(len(ids), len(ids) // 2, replace=False))
                   for _ in range(5)]
        for order in orders:
            asked = [ids[i] for i in order.tolist()]
            answers, _ = dedup_refs(reader, asked)
            for chunk_id, ref in zip(asked, answers):
                by_id, _ = reader.dedup_ref(chunk_id)
                assert by_id is None or ref is not None
                if ref is not None:  # placed with that id, and not unfindable
                    assert ref != doomed
                    assert reader.places_between(ref, ref + 1) == {chunk_id: ref}


def _placed_ids(repo: Repository) -> list[bytes]:
    with repo.index.env.begin() as txn:
        return [raw[:32] for _k, raw in txn.cursor(db=repo.index.refs)]


@pytest.fixture(params=["local", "s3"])
def shared_hosts(request, tmp_path):
    """Two hosts of one shared repository, in a local directory or on S3."""
    from helpers import shared_repo
    from repo_engine.repository.store.local import LocalStore

    if request.param == "local":
        first = shared_repo(tmp_path / "repo", tmp_path / "cache-a", block_size=BLOCK)
        store = LocalStore(tmp_path / "repo")
    else:
        from repo_engine.repository.config import RepoConfig
        from repo_engine.repository.store.s3 import S3Store
        from test_store_s3 import settings_for

        seaweedfs, bucket = request.getfixturevalue("seaweedfs"), request.getfixturevalue(
            "s3_bucket")
        request.getfixturevalue("monkeypatch").setattr("tempfile.tempdir", str(tmp_path))
        store = S3Store(f"s3://{bucket}/repo", settings_for(seaweedfs.endpoint))
        first = Repository.create(store, tmp_path / "cache-a",
                                  RepoConfig.new(shared=True, block_size=BLOCK))
    second = attach_shared(store, tmp_path / "cache-b")
    yield first, second
    first.close()
    second.close()


def test_a_neighbour_a_plan_dooms_is_stored_again_on_a_shared_repository(
        shared_hosts, tmp_path, monkeypatch):
    """gc's plan dooms the ref (pending: the grace period); host b backs up the same disk after
    it: the neighbours are found by locality, the doomed ref is stored again; gc sweeps the
    plan before b commits (b's lease came after the plan: not waited for), and b's point
    commits and restores whole on a fresh host. Deduplicating against the doomed neighbour would
    have failed that commit (a swept ref) or, committed before the sweep, kept a chunk gc
    had to recount."""
    a, b = shared_hosts
    model, doomed, kept = first_backup_then_changed(a, tmp_path)
    # b backs up before the plan, as a busy host does: its id filter holds the doomed id (the
    # filter keeps the bits of removed ids), so only the index can refuse it
    back_up(b, "w", disk_model(tmp_path, "w", 9))
    planned = gc(a, grace=3600)
    assert planned.plans_pending == 1
    [plan] = a.index.pending_plans()
    assert doomed in plan.op.refs.tolist()
    lookups = counted_lookups(monkeypatch)
    with stopped_before_commit(lambda: back_up(b, "b", model), tmp_path, monkeypatch) as done:
        assert gc(a, grace=0).plans_swept == 1
    [again] = done
    refs = map_refs(b, again)
    assert not np.isin(refs, plan.op.refs).any()
    assert again.counters["new_chunks"] == 1 and again.counters["dup_blocks"] == BLOCKS - 1
    assert lookups[0] < BLOCKS // 4
    fresh = attach_shared(a.store, tmp_path / "cache-fresh")
    try:
        fresh.refresh()
        assert restored(fresh, again.id, tmp_path) == bytes(model.content)
        assert restored(fresh, kept.id, tmp_path)[CHANGED * BLOCK:][:256] == bytes(range(256))
    finally:
        fresh.close()


def test_a_cache_loaded_from_a_checkpoint_hides_the_refs_of_pending_plans(shared_hosts,
                                                                          tmp_path):
    """A host whose cache starts from a checkpoint taken while a plan is pending knows the
    plan's refs as unfindable, as a host that replayed the plan does."""
    from repo_engine.repository.checkpoint import write_checkpoint

    a, _b = shared_hosts
    _model, doomed, _kept = first_backup_then_changed(a, tmp_path)
    gc(a, grace=3600)
    a.refresh()
    write_checkpoint(a.store, a.index)
    fresh = attach_shared(a.store, tmp_path / "cache-fresh")
    try:
        fresh.refresh()
        with fresh.index.env.begin() as txn:
            assert txn.get(REF_KEY.pack(doomed), db=fresh.index.unfindable) is not None
            assert txn.get(REF_KEY.pack(doomed), db=fresh.index.refs) is not None
    finally:
        fresh.close()


def test_an_index_of_version_3_gets_the_unfindable_table_on_open(tmp_path):
    """Made by an earlier repo-engine, a gc stopped between its mark and its sweep and a chunk
    quarantined: opened, the index lists both refs as unfindable (version 4), and a backup of
    the same disk stores both chunks again while it finds the rest by locality."""
    from test_index_damage import downgrade

    path = tmp_path / "repo"
    repo = Repository.init(path, block_size=BLOCK)
    model, doomed, _kept = first_backup_then_changed(repo, tmp_path)
    local_gc.settle_dead_maps(repo)
    local_gc._mark(repo)  # the gc stops here
    damaged = doomed + 1
    _quarantine(repo, {damaged: "test: damaged"})
    repo.close()
    downgrade(path, 3)
    repo = Repository.open(path)
    try:
        with repo.index.env.begin() as txn:
            assert repo.index.meta_u64("version") == INDEX_VERSION
            hidden = {REF_KEY.unpack(k)[0] for k, _ in txn.cursor(db=repo.index.unfindable)}
        assert {doomed, damaged} <= hidden
        again = back_up(repo, "b", model)
        refs = map_refs(repo, again).tolist()
        assert doomed not in refs and damaged not in refs
        assert again.counters["new_chunks"] == 2
        gc(repo)
        assert restored(repo, again.id, tmp_path) == bytes(model.content)
    finally:
        repo.close()

