"""Duplicates by locality answer as a look-up through `ids` would where it matters: never a ref
that is placed and not in `unfindable` yet taken out of deduplication (a quarantine known only
by a checkpoint's row, or by an index of version 3 loaded from one), never a ref `ids` gives
back while it is damaged, and never a neighbouring copy of a quarantined chunk (the copy stored
again heals it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers import DiskModel, attach_shared, stopped_before_commit
from repo_engine.backup import pipeline
from repo_engine.maintenance import gc as local_gc
from repo_engine.maintenance.deleter import Deleter
from repo_engine.maintenance.forget import forget_points
from repo_engine.maintenance.gc import GcReport
from repo_engine.maintenance.scrub import _quarantine
from repo_engine.repository import idfilter
from repo_engine.repository.checkpoint import write_checkpoint
from repo_engine.repository.formats import INDEX_VERSION
from repo_engine.repository.index_records import REF_KEY
from repo_engine.repository.packs import pack_object
from repo_engine.repository.repo import Repository
from test_locality import (BLOCK, BLOCKS, CHANGED, back_up, disk_model, local,  # noqa: F401
                           map_refs, restored, shared_hosts)


def flip_chunk(repo: Repository, ref: int) -> None:
    """Damage the stored bytes of `ref` in its pack object (the index left as it is)."""
    with repo.index.reader() as lookup:
        [where] = lookup.locate(np.array([ref], np.uint64))
    name = pack_object(repo.index.pack_info(int(where["pack"])).name)
    data = bytearray(repo.store.get(name, limit=1 << 30))
    data[int(where["offset"]) + int(where["stored"]) // 2] ^= 0xFF
    repo.store.delete([name])
    repo.store.put(name, bytes(data))


def quarantined_then_checkpoint(a: Repository, tmp_path, monkeypatch) -> tuple[DiskModel, int]:
    """Host a backs up a disk, scrub finds one of its chunks damaged and quarantines it (in a's
    cache alone), then a writes a checkpoint; returns the disk and the damaged ref. The id
    filter is off from then on: it cannot say whenever another process of a host inserted ids
    meanwhile (and errs 1% of the time), so it is no guard."""
    model = disk_model(tmp_path, "a", 1)
    first = back_up(a, "a", model)
    damaged = int(map_refs(a, first)[CHANGED])
    flip_chunk(a, damaged)
    _quarantine(a, {damaged: "test: damaged"})
    a.refresh()
    write_checkpoint(a.store, a.index)
    monkeypatch.setattr(idfilter, "ENABLED", False)
    return model, damaged


def cache_of_version_3(a: Repository, tmp_path, monkeypatch) -> tuple[DiskModel, int, Path]:
    """`quarantined_then_checkpoint`, then another cache loaded from that checkpoint as a
    repo-engine of index version 3 left it (no `unfindable`); returns the disk, the damaged
    ref and that cache."""
    from test_index_damage import downgrade

    model, damaged = quarantined_then_checkpoint(a, tmp_path, monkeypatch)
    cache = tmp_path / "cache-fresh"
    loaded = attach_shared(a.store, cache)
    loaded.refresh()  # from the checkpoint
    loaded.close()
    downgrade(cache, 3)
    return model, damaged, cache


def stores_it_again(host: Repository, model: DiskModel, damaged: int, tmp_path) -> None:
    """A backup of `model` on `host` stores the damaged chunk again and restores whole."""
    again = back_up(host, "b", model)
    assert damaged not in map_refs(host, again).tolist()
    assert again.counters["new_chunks"] == 1 and again.counters["dup_blocks"] == BLOCKS - 1
    assert restored(host, again.id, tmp_path) == bytes(model.content)


def test_a_chunk_quarantined_on_the_host_that_wrote_a_checkpoint_is_not_found_by_locality(
        shared_hosts, tmp_path, monkeypatch):
    """Host a's scrub quarantines a damaged chunk (its cache alone: `ids` loses it, the ref is
    unfindable there), then a writes a checkpoint: its REFS row of that ref is not `indexed`. A
    host whose cache starts from that checkpoint backs up the same disk: through `ids` it
    would store the chunk again (the checkpoint left it out); its neighbourhood must not
    answer the damaged ref either, or the new point restores with the damage."""
    a, _b = shared_hosts
    model, damaged = quarantined_then_checkpoint(a, tmp_path, monkeypatch)
    fresh = attach_shared(a.store, tmp_path / "cache-fresh")
    try:
        fresh.refresh()
        with fresh.index.reader() as lookup:
            assert lookup.dedup_ref(bytes(lookup.chunk_id_of(damaged))) == (None, False)
        stores_it_again(fresh, model, damaged, tmp_path)
    finally:
        fresh.close()


def test_a_quarantined_candidate_counted_meanwhile_stays_out_of_ids(local, tmp_path,
                                                                      monkeypatch):
    """Backup x looks a chunk up, then scrub finds it damaged and quarantines it, the only point
    using it is forgotten and gc marks it; x commits (its count gives the candidate back). gc's
    sweep must not give a quarantined ref its `ids` entry back: the next backup of the same
    content would deduplicate against the damaged chunk through `ids` (and its locality would
    follow) instead of storing the good copy that heals x's point."""
    model = disk_model(tmp_path, "a", 1)
    first = back_up(local, "a", model)
    damaged = int(map_refs(local, first)[CHANGED])
    with stopped_before_commit(lambda: back_up(local, "x", model), tmp_path, monkeypatch) as done:
        flip_chunk(local, damaged)
        _quarantine(local, {damaged: "test: damaged"})
        forget_points(local, [first.id])
        local_gc.settle_dead_maps(local)
        listed = local_gc._mark(local)
        assert damaged in listed.candidates
    [x] = done
    assert damaged in map_refs(local, x).tolist()  # looked up before the quarantine
    with Deleter(local.store) as deleter:
        local_gc._sweep(local, listed, GcReport(), {}, deleter)
    with local.index.reader() as lookup:
        chunk_id = bytes(lookup.chunk_id_of(damaged))
        assert lookup.dedup_ref(chunk_id) == (None, False)
    again = back_up(local, "y", model)
    assert damaged not in map_refs(local, again).tolist()
    assert again.counters["new_chunks"] == 1
    assert restored(local, again.id, tmp_path) == bytes(model.content)
    assert restored(local, x.id, tmp_path) == bytes(model.content)  # healed by y's copy


def test_a_cache_of_version_3_loaded_from_a_checkpoint_hides_the_rows_ids_lacks_on_open(
        shared_hosts, tmp_path, monkeypatch):
    """As above, but the cache was loaded from that checkpoint by a repo-engine of index
    version 3 (no `unfindable` table): on open, the upgrade must list the rows `ids` does not
    name, since nothing else in the cache says that the writing host quarantined one."""
    a, _b = shared_hosts
    model, damaged, cache = cache_of_version_3(a, tmp_path, monkeypatch)
    fresh = attach_shared(a.store, cache)
    try:
        assert fresh.index.meta_u64("version") == INDEX_VERSION
        stores_it_again(fresh, model, damaged, tmp_path)
    finally:
        fresh.close()


def test_a_backup_reading_a_quarantined_chunk_again_heals_it_though_another_copy_is_near(
        local, tmp_path, monkeypatch):
    """Chunk x is stored twice: at ref r (VM a's disk), which `ids` names, and at r2 by VM c's
    backup, which looked x up before a's pack was indexed (two backups at once). Scrub finds r
    damaged and quarantines it: `ids` loses x, so through `ids` the next backup reading x stores
    it again, and that copy heals r (heal_after_backup takes its donor from `ids`). c's disk
    backed up again must do the same: a neighbourhood answering x with r2 stores nothing, `ids`
    keeps lacking x, and a's point stays damaged though the repository holds a good copy."""
    model = disk_model(tmp_path, "a", 1)
    first = back_up(local, "a", model)
    damaged = int(map_refs(local, first)[CHANGED])
    other = disk_model(tmp_path, "c", 2)
    other.write(BLOCK, model.content[CHANGED * BLOCK:(CHANGED + 1) * BLOCK])
    with monkeypatch.context() as racing:  # c looks every id up before a's pack is indexed
        racing.setattr(pipeline, "dedup_refs", lambda _reader, ids: ([None] * len(ids), 0))
        copy = back_up(local, "c", other)
    second = int(map_refs(local, copy)[1])
    assert second != damaged
    flip_chunk(local, damaged)
    _quarantine(local, {damaged: "test: damaged"})
    again = back_up(local, "d", other)
    assert restored(local, again.id, tmp_path) == bytes(other.content)
    assert restored(local, first.id, tmp_path) == bytes(model.content)  # healed
    with local.index.env.begin() as txn:
        assert txn.get(REF_KEY.pack(damaged), db=local.index.quarantine) is None
