"""What a damaged or hostile bucket may hold about a quarantine: a journal `quarantine` op or a
checkpoint's `QUAR` records whose reasons are not texts the cache can keep. Every host refuses
them as damage (DamageError: one line, exit 3), names the object and changes nothing; what is
well formed but odd (a long reason, a ref no cache places) is kept within bounds. Run on a
local shared repository and on S3 (SeaweedFS)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import attach_shared
from repo_engine.errors import DamageError
from repo_engine.repository import checkpoint
from repo_engine.repository.checkpoint import load_checkpoint, write_checkpoint
from repo_engine.repository.journal import QuarantineOp, append
from repo_engine.repository.repo import Repository
from test_locality import CHANGED, back_up, disk_model, map_refs, shared_hosts  # noqa: F401
from test_shared_quarantine import found_by_id, quarantined

NOT_TEXTS = {
    "a lone surrogate": ["\ud800 found damaged"],
    "a number": [7],
    "one reason short": [],
    "a mapping": {"reason": "x"},
}


def _publish(repo: Repository, op: QuarantineOp) -> int:
    """Write `op` as the journal's next entry, as a writer that does not check it would, without
    applying it here; returns its seq."""
    return append(repo.store, repo.refresh, lambda _seq: [op]).seq


@pytest.mark.parametrize("reasons", NOT_TEXTS.values(), ids=NOT_TEXTS.keys())
def test_a_quarantine_op_whose_reasons_are_not_texts_is_damage_on_every_host(
        shared_hosts, tmp_path, reasons):
    a, b = shared_hosts
    point = back_up(a, "a", disk_model(tmp_path, "a", 1))
    ref = int(map_refs(a, point)[CHANGED])
    b.refresh()
    before = b.index.journal_seq
    seq = _publish(a, QuarantineOp(np.array([ref], np.uint64), reasons))
    with pytest.raises(DamageError, match=rf"{seq:016d}\.jnl: journal entry is malformed"):
        b.refresh()
    assert b.index.journal_seq == before and found_by_id(b, ref) == ref


def test_a_long_reason_is_kept_cut_and_a_ref_no_cache_places_is_passed_over(
        shared_hosts, tmp_path):
    a, b = shared_hosts
    point = back_up(a, "a", disk_model(tmp_path, "a", 1))
    ref = int(map_refs(a, point)[CHANGED])
    _publish(a, QuarantineOp(np.array([ref, 1 << 40], np.uint64), ["é" * 100_000, "never"]))
    assert quarantined(b) == {ref} and found_by_id(b, ref) is None
    with b.index.env.begin() as txn:
        from repo_engine.repository.index_records import REF_KEY
        note = txn.get(REF_KEY.pack(ref), db=b.index.quarantine)
    assert 0 < len(note) <= 1000


@pytest.mark.parametrize("reasons", NOT_TEXTS.values(), ids=NOT_TEXTS.keys())
def test_a_checkpoint_whose_quarantine_reasons_are_not_texts_is_damage(
        shared_hosts, tmp_path, monkeypatch, reasons):
    """The checkpoint's footer checks out (its writer hashed what it wrote): only the QUAR
    record's reasons are wrong. Loading it leaves the cache as it was."""
    a, _b = shared_hosts
    point = back_up(a, "a", disk_model(tmp_path, "a", 1))
    ref = int(map_refs(a, point)[CHANGED])
    with a.index.write() as txn:
        a.index.quarantine_ref(txn, ref, "test: damaged")
    real = checkpoint._Writer.record

    def record(self, tag, doc, binary=b""):
        real(self, tag, reasons if tag == b"QUAR" else doc, binary)

    monkeypatch.setattr(checkpoint._Writer, "record", record)
    seq = write_checkpoint(a.store, a.index)
    monkeypatch.undo()
    fresh = attach_shared(a.store, tmp_path / "cache-fresh")
    try:
        with pytest.raises(DamageError, match=rf"{seq:016d}\.ckpt: checkpoint.* malformed"):
            load_checkpoint(fresh.store, fresh.index, seq)
        assert fresh.index.journal_seq == 0
    finally:
        fresh.close()


@pytest.mark.parametrize("notes", [1, 3000], ids=["fewer notes than the pack", "more notes"])
def test_a_replayed_pack_op_ends_the_quarantine_of_the_refs_it_places_alone(tmp_path, notes):
    """Whichever side the replay reads (the notes, or the pack op's refs looked up in them),
    a new pack placing a quarantined ref ends its quarantine, and no other note changes."""
    import os

    from repo_engine.repository.index import Index
    from repo_engine.repository.index_records import REF_KEY
    from repo_engine.repository.journal import Entry, PackOp
    from repo_engine.repository.packs import ENTRY_DTYPE

    def pack_op(refs: list[int]) -> PackOp:
        rows = np.zeros(len(refs), ENTRY_DTYPE)
        rows["ref"] = refs
        rows["id"] = [os.urandom(32) for _ in refs]
        rows["stored"] = rows["raw"] = 10
        rows["offset"] = np.arange(len(refs)) * 10
        return PackOp(os.urandom(32).hex(), 10 * len(refs), rows)

    index = Index(tmp_path / "index", create=True)
    damaged = list(range(1, notes + 1))
    index.apply_entry(Entry(1, [pack_op(damaged + [notes + 1, notes + 2])]))
    with index.write() as txn:
        for ref in damaged:
            index.quarantine_ref(txn, ref, "test: damaged")
    index.apply_entry(Entry(2, [pack_op([1, notes + 1])]))  # a heal of ref 1, and another ref
    with index.env.begin() as txn:
        left = {REF_KEY.unpack(k)[0] for k in
                txn.cursor(db=index.quarantine).iternext(keys=True, values=False)}
    index.close()
    assert left == set(damaged[1:])


def test_a_large_quarantine_is_committed_in_bounded_entries_and_reaches_every_host(
        shared_hosts, tmp_path, monkeypatch):
    """Each `quarantine` entry names at most QUARANTINE_BATCH refs (every host downloads and
    decodes an entry whole, and refuses one past JOURNAL_MAX); together they name every
    damaged ref, and the other host quarantines them all."""
    from repo_engine.maintenance import scrub as scrub_module
    from repo_engine.repository.journal import read_entry
    from test_locality_review import flip_chunk

    a, b = shared_hosts
    point = back_up(a, "a", disk_model(tmp_path, "a", 1))
    damaged = [int(r) for r in map_refs(a, point)[CHANGED:CHANGED + 5]]
    assert len(set(damaged)) == 5
    for ref in damaged:
        flip_chunk(a, ref)
    a.refresh()
    before = a.index.journal_seq
    monkeypatch.setattr(scrub_module, "QUARANTINE_BATCH", 2)
    scrub_module.scrub(a, repair=True)
    ops = [op for seq in range(before + 1, a.index.journal_seq + 1)
           for op in read_entry(a.store, seq).ops if isinstance(op, QuarantineOp)]
    assert [len(op.refs) for op in ops] == [2, 2, 1]
    assert sorted(int(r) for op in ops for r in op.refs) == sorted(damaged)
    assert quarantined(b) == set(damaged)
    assert all(found_by_id(b, ref) is None for ref in damaged)


def test_a_scrub_that_dies_between_its_quarantine_entries_leaves_a_part_the_next_completes(
        shared_hosts, tmp_path, monkeypatch):
    """The first entry is committed, the process dies before the second: every host holds the
    first entry's refs quarantined (out of deduplication), the rest as before; the next
    `scrub --repair` finds them all again and quarantines the rest."""
    from repo_engine.maintenance import scrub as scrub_module
    from test_locality_review import flip_chunk

    class Died(BaseException):
        pass

    a, b = shared_hosts
    point = back_up(a, "a", disk_model(tmp_path, "a", 1))
    damaged = sorted(int(r) for r in map_refs(a, point)[CHANGED:CHANGED + 3])
    for ref in damaged:
        flip_chunk(a, ref)
    monkeypatch.setattr(scrub_module, "QUARANTINE_BATCH", 2)
    real, commits = Repository.commit_journal, []

    def commit_journal(self, build):
        if commits:
            raise Died()
        commits.append(real(self, build))
        return commits[-1]

    monkeypatch.setattr(Repository, "commit_journal", commit_journal)
    with pytest.raises(Died):
        scrub_module.scrub(a, repair=True)
    monkeypatch.setattr(Repository, "commit_journal", real)
    assert quarantined(b) == set(damaged[:2]) and found_by_id(b, damaged[2]) == damaged[2]
    report = scrub_module.scrub(a, repair=True)
    assert sorted(d["ref"] for d in report.damaged) == damaged
    assert quarantined(b) == set(damaged) and all(found_by_id(b, r) is None for r in damaged)


def test_a_reason_holding_a_path_that_is_not_utf8_is_published_readable(
        shared_hosts, tmp_path):
    """A damage's text can name a path decoded with surrogate escapes (bytes that are not
    UTF-8): the quarantine stores it readable, on this host and every other, instead of
    publishing an entry no host can apply."""
    from repo_engine.maintenance.scrub import repair_damage

    a, b = shared_hosts
    point = back_up(a, "a", disk_model(tmp_path, "a", 1))
    ref = int(map_refs(a, point)[CHANGED])
    repair_damage(a, {ref: "pack x: [Errno 5] Input/output error: '/mnt/b\udcffckup/p'"})
    assert quarantined(a) == quarantined(b) == {ref}
    assert found_by_id(b, ref) is None


def test_a_heal_pack_damaged_and_healed_again_from_the_same_copy_ends_the_quarantine(
        shared_hosts, tmp_path):
    """A heal's pack is named by its bytes: when its copy of r is damaged in turn, the next
    heal from the same good copy writes the very same pack again (the store's object is
    whole again). Its `pack` op names a pack every cache knows: r's quarantine ends all the
    same, on every host, and every point restores."""
    from test_locality_review import flip_chunk
    from test_shared_quarantine import damaged_backup, everything_restores, pack_of
    from repo_engine.maintenance.scrub import scrub

    a, b = shared_hosts
    model, first, damaged = damaged_backup(a, tmp_path)
    scrub(a, repair=True)
    healing = back_up(b, "b", model)  # stores a good copy and heals r into a new pack
    assert quarantined(a) == quarantined(b) == set()
    healed_in = pack_of(a, damaged)
    flip_chunk(a, damaged)
    report = scrub(a, repair=True)
    assert [d["ref"] for d in report.damaged] == [] and report.repair.healed == 1
    assert pack_of(a, damaged) == pack_of(b, damaged) == healed_in
    assert quarantined(a) == quarantined(b) == set()
    everything_restores([a, b], {first.id: bytes(model.content),
                                 healing.id: bytes(model.content)}, tmp_path)
