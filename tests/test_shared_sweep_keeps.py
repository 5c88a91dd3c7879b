"""A ref a shared gc's plan dooms and its sweep keeps (a backup on another host counted it
meanwhile) is found again by every host, as a local gc gives a candidate counted meanwhile its
`ids` entry back: later backups of the same data store no new chunk. Not a quarantined one: a
damaged chunk stays out of deduplication, so the next backup stores a good copy and heals it.
Run on a local shared repository and on S3 (SeaweedFS)."""

from __future__ import annotations

import pytest

from helpers import attach_shared, stopped_before_commit
from repo_engine.maintenance.forget import forget_points
from repo_engine.maintenance.scrub import scrub
from repo_engine.maintenance.shared_gc import gc
from test_locality import (BLOCKS, CHANGED, back_up, disk_model, map_refs,  # noqa: F401
                           restored, shared_hosts)
from test_locality_review import flip_chunk
from test_shared_quarantine import everything_restores, found_by_id, quarantined


@pytest.mark.parametrize("damaged", [False, True], ids=["whole", "one-quarantined"])
def test_a_ref_a_sweep_keeps_is_deduplicated_against_again_on_every_host(
        shared_hosts, tmp_path, monkeypatch, damaged):
    """b's backup deduplicates against a's chunks; a forgets its point and gc plans them before
    b commits (gc waits for b's lease); b commits, the sweep keeps them. Then a backup of the
    same data on each host stores no new chunk (with `damaged`: but the one chunk scrub
    quarantined before the sweep, whose good copy heals it)."""
    a, b = shared_hosts
    model = disk_model(tmp_path, "a", 1)
    content = bytes(model.content)
    first = back_up(a, "a", model)
    refs = map_refs(a, first)
    with stopped_before_commit(lambda: back_up(b, "b", model), tmp_path, monkeypatch) as done:
        forget_points(a, [first.id])
        assert gc(a, grace=0).plans_pending == 1  # b's lease is waited for
    [second] = done
    assert second.counters["new_chunks"] == 0 and (map_refs(b, second) == refs).all()
    for host in (a, b):
        host.refresh()
        assert found_by_id(host, int(refs[0])) is None  # doomed: out of deduplication
    bad = int(refs[CHANGED])
    if damaged:
        flip_chunk(a, bad)
        assert scrub(a, repair=True).repair.quarantined == 1
    swept = gc(a, grace=0)
    assert swept.plans_swept == 1 and swept.resurrected == BLOCKS and swept.chunks_dropped == 0
    for host in (a, b):
        host.refresh()
        assert all(found_by_id(host, int(r)) == r for r in refs if not damaged or r != bad)
        assert (found_by_id(host, bad) is None) == damaged
        assert quarantined(host) == ({bad} if damaged else set())
    points = {second.id: content}
    for host, vm in ((a, "c"), (b, "d")):
        again = back_up(host, vm, model)
        assert again.counters["new_chunks"] == (1 if damaged and vm == "c" else 0)
        points[again.id] = content
    fresh = attach_shared(a.store, tmp_path / "cache-fresh")
    try:
        everything_restores([a, b, fresh], points, tmp_path)
        assert quarantined(fresh) == set()
    finally:
        fresh.close()
