"""A quarantine on a shared repository reaches every host: `scrub --repair` on one host finds a
chunk damaged and publishes it (a journal `quarantine` op; a checkpoint's `QUAR` records), so
that no host deduplicates against the damaged chunk any more, the next backup of that content
on any host stores a good copy, and the heal it makes clears the quarantine everywhere. Run on a
local shared repository and on S3 (SeaweedFS)."""

from __future__ import annotations

from helpers import attach_shared, stopped_before_commit
from repo_engine.maintenance.rebuild import rebuild_cache
from repo_engine.maintenance.scrub import scrub
from repo_engine.maintenance.verify import verify
from repo_engine.repository.checkpoint import (HEADER, checkpoint_object, load_checkpoint,
                                               write_checkpoint)
from repo_engine.repository.index_records import REF_KEY, REF_REC
from repo_engine.repository.repo import Repository
from test_locality import (CHANGED, back_up, disk_model, map_refs, restored,  # noqa: F401
                           shared_hosts)
from test_locality_review import flip_chunk


def quarantined(repo: Repository) -> set[int]:
    repo.refresh()
    with repo.index.env.begin() as txn:
        return {REF_KEY.unpack(k)[0] for k in
                txn.cursor(db=repo.index.quarantine).iternext(keys=True, values=False)}


def found_by_id(repo: Repository, ref: int) -> int | None:
    """The ref `ids` names for the chunk of `ref` (None: no backup deduplicates against it)."""
    with repo.index.reader() as lookup:
        return lookup.ref_of(bytes(lookup.chunk_id_of(ref)))


def pack_of(repo: Repository, ref: int) -> str:
    with repo.index.env.begin() as txn:
        number = REF_REC.unpack(txn.get(REF_KEY.pack(ref), db=repo.index.refs))[1]
    return repo.index.pack_info(number).name


def damaged_backup(a: Repository, tmp_path) -> tuple:
    """Host a backs up a disk, then one of its chunks is damaged in its pack: the disk, the
    point and the damaged ref."""
    model = disk_model(tmp_path, "a", 1)
    first = back_up(a, "a", model)
    damaged = int(map_refs(a, first)[CHANGED])
    flip_chunk(a, damaged)
    return model, first, damaged


def everything_restores(hosts: list[Repository], contents: dict, tmp_path) -> None:
    """Every host catalogues exactly the points of `contents`, none marked damaged, and
    restores each byte-identical."""
    for host in hosts:
        host.refresh()
        assert {p.id for p in host.points()} == set(contents)
        assert not any(p.damage for p in host.points())
        for point_id, content in contents.items():
            assert restored(host, point_id, tmp_path) == content


def test_a_quarantine_on_one_host_makes_another_store_a_good_copy_that_heals(
        shared_hosts, tmp_path):
    """a and b both use chunk r (b deduplicated against a's); r is damaged; a's scrub
    quarantines it. b's next backup of that content must store a good copy (not deduplicate
    against r), which heals r: every point, on every host and a fresh one, restores whole."""
    a, b = shared_hosts
    model, first, damaged = damaged_backup(a, tmp_path)
    content = bytes(model.content)
    second = back_up(b, "b", model)
    assert second.counters["new_chunks"] == 0
    bad_pack = pack_of(a, damaged)
    found = scrub(a, repair=True)
    assert [d["ref"] for d in found.damaged] == [damaged]
    assert found.repair.points_marked_damaged == 2
    assert quarantined(b) == {damaged} and found_by_id(b, damaged) is None
    third = back_up(b, "c", model)
    assert third.counters["new_chunks"] == 1  # the good copy, in a new pack
    copy = int(map_refs(b, third)[CHANGED])
    assert copy != damaged and pack_of(b, copy) != bad_pack
    assert found_by_id(b, damaged) == copy
    # b's backup healed r from its copy: r is placed in a new pack on every host
    for host in (a, b):
        assert quarantined(host) == set() and pack_of(host, damaged) != bad_pack
    fresh = attach_shared(a.store, tmp_path / "cache-fresh")
    try:
        everything_restores([a, b, fresh], {p.id: content for p in (first, second, third)},
                            tmp_path)
        assert quarantined(fresh) == set()
    finally:
        fresh.close()


def test_a_backup_that_chose_the_ref_before_the_quarantine_commits_and_the_heal_covers_it(
        shared_hosts, tmp_path, monkeypatch):
    """b's backup deduplicated against r before a's scrub quarantined it, and commits after:
    its point names r, as before; verify on b reports r used while quarantined; the next backup
    of the content (on a) stores a good copy and heals r, and every point restores whole."""
    a, b = shared_hosts
    model, first, damaged = damaged_backup(a, tmp_path)
    content = bytes(model.content)
    with stopped_before_commit(lambda: back_up(b, "b", model), tmp_path, monkeypatch) as done:
        scrub(a, repair=True)
    [second] = done
    assert int(map_refs(b, second)[CHANGED]) == damaged
    assert quarantined(b) == {damaged}
    report = verify(b)
    assert any("quarantined" in e for e in report.errors), report.errors
    third = back_up(a, "c", model)
    assert third.counters["new_chunks"] == 1
    assert quarantined(a) == quarantined(b) == set()
    everything_restores([a, b], {p.id: content for p in (first, second, third)}, tmp_path)
    assert not verify(b).errors


def test_a_checkpoint_and_a_rebuilt_cache_carry_the_quarantine(shared_hosts, tmp_path):
    """A host whose cache starts from a checkpoint written after the quarantine, and one that
    rebuilds its cache, know the chunk is damaged: the first's backup stores a good copy and
    heals it; a checkpoint written after the heal holds no quarantine (format version 1)."""
    a, b = shared_hosts
    model, first, damaged = damaged_backup(a, tmp_path)
    content = bytes(model.content)
    scrub(a, repair=True)
    seq = write_checkpoint(a.store, a.index)
    assert major_of(a, seq) == 2
    rebuild_cache(b)
    assert quarantined(b) == {damaged} and found_by_id(b, damaged) is None
    fresh = attach_shared(a.store, tmp_path / "cache-fresh")
    try:
        assert quarantined(fresh) == {damaged} and found_by_id(fresh, damaged) is None
        healing = back_up(fresh, "b", model)
        assert healing.counters["new_chunks"] == 1
        assert quarantined(fresh) == quarantined(a) == quarantined(b) == set()
        everything_restores([a, b, fresh], {first.id: content, healing.id: content}, tmp_path)
        fresh.refresh()
        assert major_of(fresh, write_checkpoint(fresh.store, fresh.index)) == 1
    finally:
        fresh.close()


def major_of(repo: Repository, seq: int) -> int:
    return HEADER.unpack(repo.store.get_range(checkpoint_object(seq), 0, HEADER.size))[1]


def test_a_host_keeps_its_own_quarantine_note_a_checkpoint_does_not_hold_while_in_place(
        shared_hosts, tmp_path):
    """A quarantine note only this host's cache holds (an earlier repo-engine kept it to its
    host) survives the load of a checkpoint whose writer knows nothing of it, as long as the
    checkpoint places the ref in the same pack; the note of a ref the checkpoint places in
    another pack than the note's (a heal or a repack moved it) is dropped."""
    a, b = shared_hosts
    first = back_up(a, "a", disk_model(tmp_path, "a", 1))
    other = back_up(a, "w", disk_model(tmp_path, "w", 9))
    refs = map_refs(a, first)
    kept, moved = int(refs[CHANGED]), int(refs[CHANGED + 1])
    b.refresh()
    index = b.index
    [elsewhere] = [p.number for p in index.all_packs()
                   if p.name == pack_of(b, int(map_refs(b, other)[CHANGED]))]
    with index.write() as txn:
        for ref in (kept, moved):
            index.quarantine_ref(txn, ref, "test: found damaged by an earlier repo-engine")
        rec = bytearray(txn.get(REF_KEY.pack(moved), db=index.refs))
        rec[32:36] = elsewhere.to_bytes(4, "little")  # b's note is of a place in pack `other`
        txn.put(REF_KEY.pack(moved), bytes(rec), db=index.refs)
    back_up(a, "x", disk_model(tmp_path, "x", 7))  # the checkpoint is ahead of b's cache
    a.refresh()
    seq = write_checkpoint(a.store, a.index)
    assert major_of(a, seq) == 1
    load_checkpoint(a.store, index, seq)
    assert quarantined(b) == {kept}
    assert found_by_id(b, kept) is None and found_by_id(b, moved) == moved
