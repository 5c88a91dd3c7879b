"""A gc killed (SIGKILL) between its mark and its sweep leaves its candidates out of
deduplication (`ids` entries deleted, refs listed in `unfindable`). A backup that had looked
such a candidate up before the mark commits afterwards and counts it again, which takes it out
of `gcq`: the next gc must give it its `ids` entry back, as the killed run's sweep would have,
or every later backup of the same data stores it again (the chunk stays safe, dedup is lost).
A quarantined candidate stays out."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from helpers import cli
from race import Command
from repo_engine.maintenance import gc as gc_module
from repo_engine.maintenance.scrub import _quarantine
from repo_engine.repository.index_records import REF_KEY
from repo_engine.repository.repo import Repository
from test_races import _assert_restores, _assert_verifies, _backup, _backup_args, _init, _model


def _chunks(path) -> int:
    with Repository.open(path) as repo:
        return repo.index.counters()["chunks"]


def _hidden_refs(path) -> set[int]:
    with Repository.open(path) as repo, repo.index.env.begin() as txn:
        return {REF_KEY.unpack(k)[0] for k, _ in txn.cursor(db=repo.index.unfindable)}


@pytest.mark.parametrize("candidate", ["uncounted", "forgotten", "quarantined"])
def test_a_candidate_counted_after_a_killed_gc_is_deduplicated_again(tmp_path, capsys,
                                                                    monkeypatch, candidate):
    """`uncounted`: the chunks a paused backup stored (gc queues them: no count yet);
    `forgotten`: the chunks of a forgotten point that a paused backup found by id; `quarantined`:
    as `uncounted`, one of them quarantined after the kill (it stays out of `ids`). The next gc
    gives them back a few at a time (GIVE_BACK_BATCH)."""
    repo = _init(capsys, tmp_path / "repo")
    model = _model(tmp_path, "a", 1)
    expected = {}
    if candidate == "forgotten":
        first = _backup(capsys, repo, "a", model)
    else:
        expected[_backup(capsys, repo, "a", model)] = model.copy_of_content()
        model.write(0, np.random.default_rng(2).bytes(len(model.content)))  # all new chunks
    backup = Command(tmp_path, *_backup_args(repo, "b", model), pauses=("backup.before_commit",))
    assert backup.reached("backup.before_commit")  # its look-ups and chunks done, no commit
    if candidate == "forgotten":
        assert cli(capsys, "forget", repo, first[:12]).code == 0
    gc = Command(tmp_path, "gc", repo, pauses=("gc.waiting",))
    assert gc.reached("gc.waiting")  # marked: it waits for the backup
    gc.proc.send_signal(signal.SIGKILL)
    assert gc.finish().code == -signal.SIGKILL
    hidden = _hidden_refs(repo)
    assert hidden  # the killed run's candidates
    backup.release("backup.before_commit")
    done = backup.finish()
    assert done.code == 0, done.err
    expected[done.json()["point"]["id"]] = model.copy_of_content()
    damaged = min(hidden)
    if candidate == "quarantined":
        with Repository.open(repo) as opened:
            _quarantine(opened, {damaged: "test: damaged"})

    monkeypatch.setattr(gc_module, "GIVE_BACK_BATCH", 3)
    collected = cli(capsys, "gc", repo, "--json")
    assert collected.code == 0, collected.err
    assert collected.json()["chunks_dropped"] == 0  # every candidate is counted by now
    assert _hidden_refs(repo) == ({damaged} if candidate == "quarantined" else set())
    before = _chunks(repo)
    again = cli(capsys, *_backup_args(repo, "c", model))
    assert again.code == 0, again.err
    stored = 1 if candidate == "quarantined" else 0  # the damaged chunk, stored again
    assert again.json()["point"]["counters"]["new_chunks"] == stored
    assert _chunks(repo) == before + stored
    expected[again.json()["point"]["id"]] = model.copy_of_content()
    _assert_restores(capsys, repo, tmp_path, expected)
    if candidate != "quarantined":  # verify reports the quarantined chunk the points use
        _assert_verifies(capsys, repo)
