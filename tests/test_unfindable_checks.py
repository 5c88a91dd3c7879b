"""Each `unfindable` entry carries the check of its key (index version 5): damage that moves an
entry off a doomed ref (a flipped bit of its key) or changes its value is found. A backup's
look-up by locality then answers its batch through `ids` alone (never a neighbour near the
damaged entry), and verify reports the table as damage and gc refuses to trust it, both naming
the table and `rebuild-index`."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import cli
from repo_engine.maintenance import gc as local_gc
from repo_engine.maintenance.gc import gc
from repo_engine.repository.index_records import REF_KEY
from repo_engine.repository.repo import Repository
from test_locality import BLOCK, CHANGED, back_up, first_backup_then_changed, map_refs, restored

# how the entry listing the doomed ref is damaged: a flipped bit of its key (the entry lands on
# a neighbouring ref, the doomed one is listed no more) or of its value
DAMAGE = {"key bit 0": (0, None), "key bit 3": (3, None), "key bit 9": (9, None),
          "value bit 5": (None, 5)}


def damage_entry(repo: Repository, ref: int, key_bit: int | None,
                 value_bit: int | None) -> None:
    """Flip one bit of the `unfindable` entry of `ref`, in its key or in its value."""
    index = repo.index
    with index.write() as txn:
        key = REF_KEY.pack(ref)
        value = bytearray(txn.pop(key, db=index.unfindable))
        if key_bit is not None:
            key = REF_KEY.pack(ref ^ 1 << key_bit)
        else:
            value = value or bytearray(8)  # (an index without checks: empty values)
            value[value_bit // 8] ^= 1 << value_bit % 8
        txn.put(key, bytes(value), db=index.unfindable)


@pytest.fixture
def marked(tmp_path):
    """A repository whose gc stopped after its mark: the doomed ref is listed in `unfindable`
    and `ids` no longer names it, while its neighbours are findable."""
    path = tmp_path / "repo"
    repo = Repository.init(path, block_size=BLOCK)
    model, doomed, kept = first_backup_then_changed(repo, tmp_path)
    local_gc.settle_dead_maps(repo)
    assert doomed in local_gc._mark(repo).candidates
    yield repo, path, model, doomed
    repo.close()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_locality_answers_nothing_near_a_damaged_unfindable_entry(marked, tmp_path, damage):
    repo, _path, model, doomed = marked
    damage_entry(repo, doomed, *DAMAGE[damage])
    again = back_up(repo, "b", model)
    refs = map_refs(repo, again)
    assert doomed not in refs.tolist() and refs[CHANGED] != doomed
    assert again.counters["new_chunks"] == 1  # the doomed chunk, stored again
    assert restored(repo, again.id, tmp_path) == bytes(model.content)


@pytest.mark.parametrize("damage", list(DAMAGE) + ["key bit 40"])
def test_verify_reports_a_damaged_unfindable_entry_and_gc_refuses(marked, capsys, damage):
    """Wherever damage moved the entry (bit 40: far from the doomed ref, where no look-up by
    locality near the ref meets it), verify and gc, which read the whole table, find it."""
    repo, path, _model, doomed = marked
    damage_entry(repo, doomed, *DAMAGE.get(damage, (40, None)))
    repo.close()
    checked = cli(capsys, "verify", path)
    assert checked.code == 3, checked.err
    assert "unfindable table fail their check" in checked.out + checked.err
    assert "rebuild-index" in checked.out + checked.err
    collected = cli(capsys, "gc", path)
    assert collected.code == 3
    assert collected.err.startswith("repo-engine: error: ") and collected.err.count("\n") == 1
    assert "unfindable table fail their check" in collected.err
    assert "rebuild-index" in collected.err
    rebuilt = cli(capsys, "rebuild-index", path)
    assert rebuilt.code == 0, rebuilt.err
    assert cli(capsys, "verify", path).code == 0


def test_sound_entries_pass_and_a_gc_sweeps_them(marked, tmp_path):
    repo, _path, model, doomed = marked
    again = back_up(repo, "b", model)
    assert doomed not in map_refs(repo, again).tolist()
    assert again.counters["new_chunks"] == 1 and again.counters["dup_blocks"] == len(
        map_refs(repo, again)) - 1
    gc(repo)
    assert restored(repo, again.id, tmp_path) == bytes(model.content)


@pytest.mark.parametrize("offset, trusted", [(-1025, True), (-1024, False), (0, False),
                                             (1024, False), (1025, True)])
def test_a_failing_entry_turns_locality_off_within_1024_refs_of_the_window(tmp_path, offset,
                                                                           trusted):
    """A window [start, stop) is read only when every `unfindable` entry from start - 1024 to
    stop + 1023 passes its check (`offset`: from start when negative, else from stop - 1)."""
    repo = Repository.init(tmp_path / "repo", block_size=BLOCK)
    start, stop = 5000, 5032
    bad = start + offset if offset < 0 else stop - 1 + offset
    try:
        with repo.index.write() as txn:
            txn.put(REF_KEY.pack(bad), bytes(8), db=repo.index.unfindable)  # fails its check
        with repo.index.reader() as reader:
            assert (reader.places_between(start, stop) is not None) == trusted
    finally:
        repo.close()


def test_gc_gives_no_ids_entry_back_to_a_listed_ref_whose_place_record_is_malformed(tmp_path,
                                                                                   capsys):
    """A ref `unfindable` lists that a count holds gets its `ids` entry back from its place
    record: a record of another size (damage) names no chunk, so the ref stays listed (verify
    reports the record); gc neither fails on it nor puts a piece of it in `ids`."""
    path = tmp_path / "repo"
    repo = Repository.init(path, block_size=BLOCK)
    _model, doomed, _kept = first_backup_then_changed(repo, tmp_path)
    counted, index = doomed - 1, repo.index
    key = REF_KEY.pack(counted)
    with index.write() as txn:
        index.hide(txn, np.array([counted], np.uint64))  # as a gc killed after its mark left it
        txn.put(key, txn.get(key, db=index.refs)[:20], db=index.refs)
    repo.close()
    collected = cli(capsys, "gc", path)
    assert collected.code in (0, 3), collected.err
    assert collected.err.count("\n") <= 1 and "Traceback" not in collected.err
    with Repository.open(path) as repo, repo.index.env.begin() as txn:
        assert txn.get(key, db=repo.index.unfindable) is not None
        named = list(txn.cursor(db=repo.index.ids))
        assert {len(k) for k, _ in named} == {32} and REF_KEY.pack(counted)[::-1] not in {
            v for _, v in named}
