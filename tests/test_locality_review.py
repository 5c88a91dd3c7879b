"""Duplicates by locality never reach a chunk that a look-up through `ids` would not: the cases
where a ref is placed, unlisted in `unfindable`, and yet taken out of deduplication (or about to
be), found by attacking every writer of `ids`, `refs` and `unfindable`."""

from __future__ import annotations

import numpy as np

from helpers import attach_shared
from repo_engine.maintenance.scrub import _quarantine
from repo_engine.repository import idfilter
from repo_engine.repository.checkpoint import write_checkpoint
from repo_engine.repository.packs import pack_object
from repo_engine.repository.repo import Repository
from test_locality import (BLOCKS, CHANGED, back_up, disk_model, map_refs, restored,  # noqa: F401
                           shared_hosts)


def flip_chunk(repo: Repository, ref: int) -> None:
    """Damage the stored bytes of `ref` in its pack object (the index left as it is)."""
    with repo.index.reader() as lookup:
        [where] = lookup.locate(np.array([ref], np.uint64))
    name = pack_object(repo.index.pack_info(int(where["pack"])).name)
    data = bytearray(repo.store.get(name, limit=1 << 30))
    data[int(where["offset"]) + int(where["stored"]) // 2] ^= 0xFF
    repo.store.delete([name])
    repo.store.put(name, bytes(data))


def test_a_chunk_quarantined_on_the_host_that_wrote_a_checkpoint_is_not_found_by_locality(
        shared_hosts, tmp_path, monkeypatch):
    """Host a's scrub quarantines a damaged chunk (its cache alone: `ids` loses it, the ref is
    unfindable there), then a writes a checkpoint: its REFS row of that ref is not `indexed`. A
    host whose cache starts from that checkpoint backs up the same disk: through `ids` it
    would store the chunk again (the checkpoint left it out); its neighbourhood must not
    answer the damaged ref either, or the new point restores with the damage. The id filter
    is off: it cannot say whenever another process of the host inserted ids meanwhile (and it
    errs 1% of the time), so it is no guard."""
    a, _b = shared_hosts
    model = disk_model(tmp_path, "a", 1)
    first = back_up(a, "a", model)
    damaged = int(map_refs(a, first)[CHANGED])
    flip_chunk(a, damaged)
    _quarantine(a, {damaged: "test: damaged"})
    a.refresh()
    write_checkpoint(a.store, a.index)
    monkeypatch.setattr(idfilter, "ENABLED", False)
    fresh = attach_shared(a.store, tmp_path / "cache-fresh")
    try:
        fresh.refresh()
        with fresh.index.reader() as lookup:
            assert lookup.dedup_ref(bytes(lookup.chunk_id_of(damaged))) == (None, False)
        again = back_up(fresh, "b", model)
        assert damaged not in map_refs(fresh, again).tolist()
        assert again.counters["new_chunks"] == 1 and again.counters["dup_blocks"] == BLOCKS - 1
        assert restored(fresh, again.id, tmp_path) == bytes(model.content)
    finally:
        fresh.close()
