"""A lock taken from its holder ('unlock --force' while it runs, then another command locks):
the holder notices before its next commit and fails in one line, instead of both writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, restore_bytes
from race import Command
from repo_engine.errors import LockedError
from repo_engine.repository import locks
from repo_engine.repository.locks import MAINTENANCE
from repo_engine.repository.repo import Repository


def _repo_with_point(tmp_path: Path, capsys) -> tuple[Path, DiskModel, dict[str, bytes]]:
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB", "--pack-size", "256KiB").code == 0
    model = DiskModel(tmp_path / "a.img", 2 * MIB, np.random.default_rng(5))
    model.random_changes(20)
    done = cli(capsys, "backup", "image", repo, "--vm", "a", "--disk", f"sda={model.path}",
               "--json")
    assert done.code == 0, done.err
    return repo, model, {done.json()["point"]["id"]: model.copy_of_content()}


def _assert_lock_taken(result) -> None:
    lines = result.err.strip().splitlines()
    assert result.code == 1, result.err
    assert len(lines) == 1 and "was removed while it ran ('repo-engine unlock --force'); it " \
        "stopped before committing anything more: run it again" in lines[0], result.err


def test_backup_whose_lock_was_forced_away_commits_nothing(tmp_path, capsys):
    """Its lock gone, a gc no longer waits for it and collects the chunks it stored but has not
    committed yet: the backup must not commit a point naming them."""
    repo, model, expected = _repo_with_point(tmp_path, capsys)
    model.random_changes(20)
    backup = Command(tmp_path, "backup", "image", repo, "--vm", "a", "--disk",
                     f"sda={model.path}", "--json", pauses=("backup.before_commit",))
    assert backup.reached("backup.before_commit")
    assert cli(capsys, "unlock", repo, "--force").code == 0
    collected = cli(capsys, "gc", repo, "--json")
    assert collected.code == 0, collected.err
    assert collected.json()["chunks_dropped"] > 0  # the backup's new chunks
    backup.release("backup.before_commit")
    _assert_lock_taken(backup.finish())
    points = cli(capsys, "points", repo, "--json").json()["points"]
    assert [p["id"] for p in points] == list(expected)
    assert cli(capsys, "verify", repo).code == 0
    for point, content in expected.items():
        assert restore_bytes(capsys, repo, point[:12], "sda", tmp_path / "r.img") == content


def test_gc_whose_lock_was_forced_away_stops_before_its_sweep(tmp_path, capsys):
    repo, model, expected = _repo_with_point(tmp_path, capsys)
    first = Command(tmp_path, "gc", repo, "--full", pauses=("gc.recount",))
    assert first.reached("gc.recount")
    assert cli(capsys, "unlock", repo, "--force").code == 0
    assert cli(capsys, "gc", repo).code == 0  # took the maintenance lock: none was left
    first.release("gc.recount")
    _assert_lock_taken(first.finish())
    assert cli(capsys, "verify", repo).code == 0
    for point, content in expected.items():
        assert restore_bytes(capsys, repo, point[:12], "sda", tmp_path / "r.img") == content



def test_a_lock_in_place_is_ours_where_inode_numbers_change(tmp_path, monkeypatch):
    """On a filesystem that gives a file other inode numbers from one look-up to the next (SMB
    without the server's inode numbers) the lock file under our name, holding what we wrote,
    is still ours: a long backup or gc is not failed as if 'unlock --force' had run. Removed,
    it is not."""
    repo = Repository.init(tmp_path / "repo")
    try:
        with repo.lock(MAINTENANCE, "gc") as lock:
            monkeypatch.setattr(locks.os.path, "samestat", lambda a, b: False)
            repo.check_locks()
            lock.path.unlink()
            with pytest.raises(LockedError, match="was removed while it ran"):
                repo.check_locks()
    finally:
        repo.close()
