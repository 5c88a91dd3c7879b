"""`ids` never names a ref listed in `unfindable`: whatever writes an `ids` entry (a replayed
`pack` entry of a heal or a repack, a checkpoint loaded into a cache that knows more, the
upgrade of an index of version 3) leaves out a ref some writer took out of deduplication, so a
backup deduplicates neither against a chunk a pending plan dooms nor against one this host found
damaged; verify reports an entry that breaks the rule."""

from __future__ import annotations

import numpy as np

from helpers import attach_shared, move_clocks, stopped_before_commit
from repo_engine.backup import job
from repo_engine.maintenance.gc import gc
from repo_engine.maintenance.scrub import _quarantine, scrub
from repo_engine.repository.checkpoint import STALE_AFTER, write_checkpoint
from repo_engine.repository.index import U64
from repo_engine.repository.index_records import REF_KEY
from repo_engine.repository.repo import Repository
from test_locality import (BLOCK, CHANGED, back_up, disk_model,  # noqa: F401
                           first_backup_then_changed, local, map_refs, restored, shared_hosts)
from test_locality_review import flip_chunk


def ids_naming_unfindable(repo: Repository) -> list[int]:
    """The refs that both `ids` names and `unfindable` lists."""
    index = repo.index
    with index.env.begin() as txn:
        named = {U64.unpack(v)[0] for _k, v in txn.cursor(db=index.ids)}
        hidden = {REF_KEY.unpack(k)[0] for k, _v in txn.cursor(db=index.unfindable)}
    return sorted(named & hidden)


def chunk_of(repo: Repository, ref: int) -> bytes:
    with repo.index.reader() as lookup:
        return bytes(lookup.chunk_id_of(ref))


def test_a_heal_replayed_on_another_host_gives_no_ids_entry_to_a_ref_a_plan_dooms(
        shared_hosts, tmp_path, monkeypatch):
    """Host b's `ids` names ref r of chunk x; host a's scrub finds r damaged and quarantines it,
    and a backup on a stores x again (r2; its heal postponed: the maintenance lock was taken).
    gc's plan dooms r (no point uses it): b's `ids` loses x. Then a heals r from r2: the `pack`
    entry of the healed copy, replayed on b, must not give x back to r. Else b's next backup
    deduplicates against r, gc sweeps r before that backup commits (it started after the plan,
    so gc does not wait for it), and the backup fails with its chunk gone."""
    a, b = shared_hosts
    model, doomed, _kept = first_backup_then_changed(a, tmp_path)
    b.refresh()
    with b.index.reader() as lookup:  # b never scrubbed: its `ids` names the damaged ref
        assert lookup.dedup_ref(chunk_of(b, doomed)) == (doomed, False)
    flip_chunk(a, doomed)
    _quarantine(a, {doomed: "test: damaged"})
    other = disk_model(tmp_path, "c", 2)
    other.write(BLOCK, model.content[CHANGED * BLOCK:(CHANGED + 1) * BLOCK])
    with monkeypatch.context() as busy:  # the heal after the backup is postponed
        busy.setattr(job, "_heal", lambda *_args, **_kw: None)
        copy = back_up(a, "c", other)
    donor = int(map_refs(a, copy)[1])
    assert donor != doomed
    gc(a, grace=3600)
    [plan] = a.index.pending_plans()
    assert doomed in plan.op.refs.tolist() and donor not in plan.op.refs.tolist()
    assert scrub(a, repair=True).repair.healed == 1
    b.refresh()
    assert ids_naming_unfindable(b) == [] and ids_naming_unfindable(a) == []
    with b.index.reader() as lookup:
        assert lookup.dedup_ref(chunk_of(b, doomed))[0] != doomed
    with stopped_before_commit(lambda: back_up(b, "b", model), tmp_path, monkeypatch) as done:
        assert gc(a, grace=0).plans_swept == 1
    [again] = done
    assert doomed not in map_refs(b, again).tolist()
    fresh = attach_shared(a.store, tmp_path / "cache-fresh")
    try:
        fresh.refresh()
        assert restored(fresh, again.id, tmp_path) == bytes(model.content)
        assert restored(fresh, copy.id, tmp_path) == bytes(other.content)
    finally:
        fresh.close()


def test_a_checkpoint_loaded_by_a_host_that_quarantined_a_chunk_gives_it_no_ids_entry(
        shared_hosts, tmp_path, monkeypatch):
    """Host b's scrub quarantines ref r of chunk x (b's cache alone: its `ids` loses x); host a,
    which knows nothing of it, writes a checkpoint whose row of r is `indexed`. b, stale, catches
    up from that checkpoint: its `ids` must not name r again (r stays quarantined there). Else b's
    next backup of x deduplicates against the damaged chunk instead of storing the good copy,
    and the new point restores with the damage."""
    a, b = shared_hosts
    model = disk_model(tmp_path, "a", 1)
    first = back_up(a, "a", model)
    damaged = int(map_refs(a, first)[CHANGED])
    b.refresh()
    flip_chunk(b, damaged)
    _quarantine(b, {damaged: "test: damaged"})
    back_up(a, "w", disk_model(tmp_path, "w", 9))  # the checkpoint is ahead of b's cache
    a.refresh()
    seq = write_checkpoint(a.store, a.index)
    move_clocks(monkeypatch, STALE_AFTER + 1, wall=())  # stale: b loads the newest checkpoint
    assert b.refresh() == seq
    assert ids_naming_unfindable(b) == []
    with b.index.reader() as lookup:
        assert lookup.dedup_ref(chunk_of(b, damaged)) == (None, False)
    again = back_up(b, "b", model)
    assert damaged not in map_refs(b, again).tolist()
    assert again.counters["new_chunks"] == 1
    assert restored(b, again.id, tmp_path) == bytes(model.content)
    assert restored(b, first.id, tmp_path) == bytes(model.content)  # healed by b's copy


def test_an_index_of_version_3_opened_lists_in_unfindable_no_ref_ids_names(tmp_path):
    """A version 3 index holding a queued gc candidate no gc has marked yet (`ids` names it: it
    is found by id until a mark takes it out) and a quarantined chunk an earlier sweep gave its
    `ids` entry back: on open, the first stays findable both ways, the second leaves `ids` too
    (a backup must store the damaged chunk again, not deduplicate against it)."""
    from repo_engine.maintenance import gc as local_gc
    from test_index_damage import downgrade

    path = tmp_path / "repo"
    repo = Repository.init(path, block_size=BLOCK)
    model, queued, _kept = first_backup_then_changed(repo, tmp_path)
    local_gc.settle_dead_maps(repo)  # queued in gcq, not marked: `ids` still names it
    damaged = queued + 1
    _quarantine(repo, {damaged: "test: damaged"})
    with repo.index.write() as txn:  # as a sweep of an earlier repo-engine gave it back
        txn.put(chunk_of(repo, damaged), U64.pack(damaged), db=repo.index.ids)
    repo.close()
    downgrade(path, 3)
    repo = Repository.open(path)
    try:
        assert ids_naming_unfindable(repo) == []
        with repo.index.reader() as lookup:
            assert lookup.dedup_ref(chunk_of(repo, queued)) == (queued, False)
            assert lookup.dedup_ref(chunk_of(repo, damaged)) == (None, False)
        again = back_up(repo, "b", model)
        refs = map_refs(repo, again).tolist()
        assert queued in refs and damaged not in refs
        assert again.counters["new_chunks"] == 1
    finally:
        repo.close()


def test_verify_reports_an_ids_entry_naming_an_unfindable_ref_as_damage(local, tmp_path):
    """A chunk quarantined (out of `ids`, in `unfindable`) verifies without that error; an
    `ids` entry naming it again (a damaged index, or a writer breaking the rule) is damage."""
    from repo_engine.maintenance.verify import verify

    first = back_up(local, "a", disk_model(tmp_path, "a", 1))
    damaged = int(map_refs(local, first)[CHANGED])
    _quarantine(local, {damaged: "test: damaged"})
    assert not [e for e in verify(local).errors if "unfindable" in e]
    with local.index.write() as txn:
        txn.put(chunk_of(local, damaged), U64.pack(damaged), db=local.index.ids)
    errors = [e for e in verify(local).errors if "unfindable" in e]
    assert errors == ["1 entries of the index's ids table name a chunk ref taken out of "
                      "deduplication (unfindable: doomed by gc or quarantined as damaged; a "
                      "backup could deduplicate against it); run 'repo-engine rebuild-index'"]


def test_a_repack_moving_a_ref_a_sweep_kept_gives_it_no_ids_entry(shared_hosts, tmp_path,
                                                                   monkeypatch):
    """Refs d1 and d2 are used by no point; backup x (started before gc's plan) deduplicates
    against d1 and commits after the plan dooms both: the sweep keeps d1 (x uses it; it stays
    unfindable, out of `ids`) and drops d2. A repack then moves d1 with the other live chunks of
    its pack: the replayed `pack` entry must leave `ids` as it is, on every host."""
    a, b = shared_hosts
    model = disk_model(tmp_path, "a", 1)
    first = back_up(a, "a", model)
    d1, d2 = (int(r) for r in map_refs(a, first)[CHANGED:CHANGED + 2])
    original = bytes(model.content)
    model.write(CHANGED * BLOCK, bytes(range(256)) * (2 * BLOCK // 256))
    back_up(a, "a", model)  # uses every chunk of the first point but d1 and d2
    gc(a, grace=0)  # nothing to doom yet: no plan pending
    model.write(0, original)
    model.write((CHANGED + 1) * BLOCK, bytes(range(255, -1, -1)) * (BLOCK // 256))
    with stopped_before_commit(lambda: back_up(b, "x", model), tmp_path, monkeypatch) as done:
        from repo_engine.maintenance.forget import forget_points
        forget_points(a, [first.id])
        gc(a, grace=3600)
        [plan] = a.index.pending_plans()
        assert {d1, d2} <= set(plan.op.refs.tolist())
    [x] = done
    assert d1 in map_refs(b, x).tolist()
    assert gc(a, grace=0).plans_swept == 1  # keeps d1 (and x's own new chunk), drops d2
    assert a.index.missing_refs(np.array([d1, d2], np.uint64)).tolist() == [d2]
    repacked = gc(a, grace=0, repack=True, max_unused=0.5)
    assert repacked.packs_written >= 1
    b.refresh()
    assert ids_naming_unfindable(a) == [] and ids_naming_unfindable(b) == []
    fresh = attach_shared(a.store, tmp_path / "cache-fresh")
    try:
        fresh.refresh()
        assert restored(fresh, x.id, tmp_path) == bytes(model.content)
    finally:
        fresh.close()
