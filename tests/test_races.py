"""Races between commands, each forced deterministically with pause points (tests/race.py): a
command that read the index must not write anything derived from that read after another command
changed the index, must not use an index that was replaced before it locked, and must not report
damage that a concurrent command's normal work made it see."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, restore_bytes
from race import Command


def _init(capsys, path: Path) -> Path:
    result = cli(capsys, "init", path, "--block-size", "16KiB", "--pack-size", "256KiB")
    assert result.code == 0, result.err
    return path


def _model(tmp: Path, name: str, seed: int) -> DiskModel:
    model = DiskModel(tmp / f"{name}.img", 4 * MIB, np.random.default_rng(seed))
    model.random_changes(30)
    return model


def _backup_args(repo: Path, vm: str, model: DiskModel) -> list[object]:
    return ["backup", "image", repo, "--vm", vm, "--disk", f"sda={model.path}", "--json"]


def _backup(capsys, repo: Path, vm: str, model: DiskModel) -> str:
    result = cli(capsys, *_backup_args(repo, vm, model))
    assert result.code == 0, result.err
    return result.json()["point"]["id"]


def _chain(capsys, repo: Path, model: DiskModel, count: int) -> list[str]:
    """`count` backups of VM `vm`, the disk changed after each; their point ids, oldest first."""
    ids = []
    for _ in range(count):
        ids.append(_backup(capsys, repo, "vm", model))
        model.random_changes(10)
    return ids


def _assert_restores(capsys, repo: Path, tmp: Path, expected: dict[str, bytes]) -> None:
    for point, content in expected.items():
        data = restore_bytes(capsys, repo, point[:12], "sda", tmp / "restored.img")
        assert hashlib.sha256(data).digest() == hashlib.sha256(content).digest(), point


def _assert_verifies(capsys, repo: Path) -> None:
    result = cli(capsys, "verify", repo, "--json")
    assert result.code == 0 and result.json()["ok"], result.out + result.err


@pytest.mark.parametrize("recounter", [("gc", "--full"), ("verify", "--repair")])
def test_recount_keeps_packs_a_backup_commits_after_its_snapshot(tmp_path, capsys, recounter):
    """A recount reads the index, a backup then indexes new packs and commits its point after the
    recount wrote its counts: the new packs must keep their live counts (a pack counted 0 is
    retired and deleted by this or the next gc)."""
    repo = _init(capsys, tmp_path / "repo")
    model = _model(tmp_path, "a", 1)
    first = _backup(capsys, repo, "vm", model)
    expected = {first: model.copy_of_content()}
    # gc pauses at `gc.waiting` once it waits for the backup: its counts are written by then
    counting = Command(tmp_path, recounter[0], repo, *recounter[1:], "--json",
                       pauses=("gc.recount", "gc.waiting"))
    assert counting.reached("gc.recount")
    model.random_changes(30)
    backup = Command(tmp_path, *_backup_args(repo, "vm", model), pauses=("backup.before_commit",))
    assert backup.reached("backup.before_commit")
    counting.release("gc.waiting")
    counting.release("gc.recount")
    counting.reached("gc.waiting")  # gc: waits for the backup; verify --repair: finishes
    backup.release("backup.before_commit")
    done = backup.finish()
    assert done.code == 0, done.err
    expected[done.json()["point"]["id"]] = model.copy_of_content()
    result = counting.finish()
    assert result.code == 0, result.out + result.err
    for _ in range(2):  # a later gc retires packs whose live count is 0
        assert cli(capsys, "gc", repo, "--max-unused", "0").code == 0
    _assert_restores(capsys, repo, tmp_path, expected)
    _assert_verifies(capsys, repo)


def test_backup_opening_while_rebuild_index_runs_commits_into_the_new_index(tmp_path, capsys):
    """A backup that opened the repository before rebuild-index replaced the index, and locks
    after, commits into the index in place (else its point is lost: gc deletes its manifest)."""
    repo = _init(capsys, tmp_path / "repo")
    model = _model(tmp_path, "a", 2)
    expected = {_backup(capsys, repo, "vm", model): model.copy_of_content()}
    model.random_changes(30)
    backup = Command(tmp_path, *_backup_args(repo, "vm", model),
                     pauses=("repository.before_lock",))
    assert backup.reached("repository.before_lock")
    assert cli(capsys, "rebuild-index", repo).code == 0
    backup.release("repository.before_lock")
    done = backup.finish()
    assert done.code == 0, done.err
    point = done.json()["point"]["id"]
    expected[point] = model.copy_of_content()
    listed = [p["id"] for p in cli(capsys, "points", repo, "--json").json()["points"]]
    assert point in listed
    assert cli(capsys, "gc", repo, "--full").code == 0
    _assert_restores(capsys, repo, tmp_path, expected)
    _assert_verifies(capsys, repo)


def test_forget_that_read_the_index_before_rebuild_index_writes_into_the_new_one(tmp_path,
                                                                                 capsys):
    """A command that read an index which was replaced before it locked must reopen it: its
    writes into the old one would be lost (here: the forgotten point comes back)."""
    repo = _init(capsys, tmp_path / "repo")
    model = _model(tmp_path, "a", 3)
    gone = _backup(capsys, repo, "vm", model)
    model.random_changes(30)
    kept = {_backup(capsys, repo, "vm", model): model.copy_of_content()}
    forget = Command(tmp_path, "forget", repo, gone[:12], pauses=("repository.before_lock",))
    assert forget.reached("repository.before_lock")
    assert cli(capsys, "rebuild-index", repo).code == 0
    forget.release("repository.before_lock")
    result = forget.finish()
    assert result.code == 0, result.err
    listed = [p["id"] for p in cli(capsys, "points", repo, "--json").json()["points"]]
    assert listed == list(kept)
    _assert_restores(capsys, repo, tmp_path, kept)
    _assert_verifies(capsys, repo)


@pytest.mark.parametrize("checker,prune", [("verify", True), ("verify", False),
                                           ("scrub", True)])
def test_checks_report_no_damage_while_forget_and_gc_remove_a_point(tmp_path, capsys, checker,
                                                                    prune):
    """verify (scrub) took its snapshot, then forget removed a point (manifest deleted) and gc
    reclaimed its maps and packs: what they removed must not be reported as damage."""
    repo = _init(capsys, tmp_path / "repo")
    gone = _backup(capsys, repo, "old", _model(tmp_path, "a", 4))
    other = _model(tmp_path, "b", 5)
    kept = {_backup(capsys, repo, "vm", other): other.copy_of_content()}
    verifying = Command(tmp_path, checker, repo, "--json", pauses=(f"{checker}.snapshot",))
    assert verifying.reached(f"{checker}.snapshot")
    args = ["forget", repo, gone[:12]] + (["--prune"] if prune else [])
    forget = Command(tmp_path, *args, pauses=("gc.waiting",))
    forget.release("gc.waiting")
    forget.reached("gc.waiting")  # gc waits for the check, or (no lock) finishes
    verifying.release(f"{checker}.snapshot")
    result = verifying.finish()
    assert result.code == 0, result.out + result.err
    assert result.json()["ok"]
    done = forget.finish()
    assert done.code == 0, done.err
    _assert_restores(capsys, repo, tmp_path, kept)
    _assert_verifies(capsys, repo)


def test_index_missing_while_rebuild_index_holds_its_lock_is_a_conflict_not_damage(tmp_path,
                                                                                   capsys):
    """rebuild-index swaps the index directory by two renames under its exclusive lock; a
    command opening the index between them must report the conflict (exit 1), not damage."""
    from repo_engine.repository.locks import EXCLUSIVE, RepoLock

    repo = _init(capsys, tmp_path / "repo")
    point = _backup(capsys, repo, "vm", _model(tmp_path, "a", 6))
    (repo / "index").rename(repo / "index.old")
    with RepoLock(repo / "locks", EXCLUSIVE, "rebuild-index"):
        result = cli(capsys, "forget", repo, point[:12])
    assert result.code == 1 and "rebuild-index is replacing the index" in result.err, result.err
    result = cli(capsys, "forget", repo, point[:12])
    assert result.code == 3 and "rebuild-index" in result.err, result.err  # no lock: damage
    (repo / "index.old").rename(repo / "index")
    assert cli(capsys, "forget", repo, point[:12]).code == 0


def test_a_manifest_gone_with_its_forgotten_point_is_not_damage(tmp_path, capsys):
    """A reader that found a point in the catalog, then read its manifest after a forget removed
    both, reports the point gone (exit 1), not damage; a catalogued point's missing manifest
    stays damage."""
    from repo_engine.errors import DamageError, PointNotFound
    from repo_engine.repository.repo import Repository

    repo = _init(capsys, tmp_path / "repo")
    gone = _backup(capsys, repo, "vm", _model(tmp_path, "a", 7))
    kept = _backup(capsys, repo, "other", _model(tmp_path, "b", 8))
    assert cli(capsys, "forget", repo, gone[:12]).code == 0
    (repo / "points" / f"{kept}.point").unlink()
    with Repository.open(repo) as repository:
        with pytest.raises(PointNotFound, match="forgotten meanwhile"):
            repository.load_catalogued(gone)
        with pytest.raises(DamageError, match="missing"):
            repository.load_catalogued(kept)


def test_a_point_forgotten_while_it_is_read_is_gone_not_broken(tmp_path, capsys):
    """A reader that found a point, then resolved its map after a forget removed it (and its
    parent), reports the point gone (what a concurrent restore may meet); while its chain is
    still catalogued it still resolves to its own content."""
    from repo_engine.errors import PointNotFound
    from repo_engine.repository.repo import Repository

    repo = _init(capsys, tmp_path / "repo")
    model = _model(tmp_path, "a", 10)
    ids = _chain(capsys, repo, model, 3)
    _backup(capsys, repo, "vm", model)
    with Repository.open(repo) as repository:
        stale = {p.id: p for p in repository.points()}
        before = repository.resolve(stale[ids[2]], "sda")
    assert cli(capsys, "forget", repo, ids[2][:12]).code == 0
    with Repository.open(repo) as repository:   # its parent is still catalogued
        assert np.array_equal(repository.resolve(stale[ids[2]], "sda"), before)
    assert cli(capsys, "forget", repo, ids[1][:12]).code == 0
    with Repository.open(repo) as repository:
        with pytest.raises(PointNotFound, match="a forget removed it while this command ran"):
            repository.resolve(stale[ids[2]], "sda")


def test_forget_whose_choice_another_forget_carried_out_meanwhile_succeeds(tmp_path, capsys):
    """Two forgets chose the same point before locking: the second to lock finds it gone and
    removes the rest of its choice (exit 0), not "not in the catalog"."""
    repo = _init(capsys, tmp_path / "repo")
    model = _model(tmp_path, "a", 9)
    old = _chain(capsys, repo, model, 3)
    kept = {_backup(capsys, repo, "vm", model): model.copy_of_content()}
    policy = Command(tmp_path, "forget", repo, "--keep-last", "1", "--json",
                     pauses=("repository.before_lock",))
    assert policy.reached("repository.before_lock")
    assert cli(capsys, "forget", repo, old[0][:12]).code == 0
    policy.release("repository.before_lock")
    result = policy.finish()
    assert result.code == 0, result.err
    assert sorted(result.json()["removed"]) == sorted(old[1:])
    assert [p["id"] for p in cli(capsys, "points", repo, "--json").json()["points"]] == list(kept)
    _assert_restores(capsys, repo, tmp_path, kept)
    _assert_verifies(capsys, repo)
