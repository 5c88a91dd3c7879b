"""A shared lock asked for while the same Repository holds a lock of an unshared repository (the
engine's inside the CLI's) is that lock, not a second lock file: it still excludes
rebuild-index and keeps gc waiting until the outer lock is released."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from repo_engine.cli.main import run
from repo_engine.repository.locks import MAINTENANCE, SHARED, list_locks
from repo_engine.repository.repo import Repository

from helpers import MIB, DiskModel, cli, stopped_before_commit


VM_LOCK = re.compile(r"vm-[0-9a-f]{32}\.lock")


def holders(repo: Path) -> list[str]:
    """The commands named by the lock files in `repo/locks`, VM locks left out."""
    return sorted(info.command for path, info in list_locks(repo / "locks")
                  if not VM_LOCK.fullmatch(path.name))


def test_one_lock_file_per_backup_and_it_still_excludes_rebuild(tmp_path: Path, capsys,
                                                                 monkeypatch) -> None:
    repo = tmp_path / "repo"
    disk = DiskModel(tmp_path / "disk.img", 2 * MIB, np.random.default_rng(3))
    disk.random_changes(4)
    assert cli(capsys, "init", repo).code == 0
    backup = ["backup", "image", str(repo), "--vm", "v", "--disk", f"sda={disk.path}"]
    with stopped_before_commit(lambda: run(backup), tmp_path, monkeypatch) as done:
        assert holders(repo) == ["backup v"]
        assert len([p for p in (repo / "locks").iterdir() if VM_LOCK.fullmatch(p.name)]) == 1
        assert run(["rebuild-index", str(repo)]) == 1
        assert "repository is locked (shared) by 'backup v'" in capsys.readouterr().err
    assert done == [0]
    assert list((repo / "locks").iterdir()) == []
    assert cli(capsys, "points", repo, "--json").json()["points"][0]["vm"] == "v"


def test_nested_shared_lock_is_the_outer_one(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    try:
        with repo.lock(SHARED, "outer"):
            with repo.lock(SHARED, "inner"):
                assert holders(repo.path) == ["outer"]
            assert holders(repo.path) == ["outer"]   # leaving the inner one releases nothing
            with repo.lock(MAINTENANCE, "repair"):   # other kinds are always taken
                assert holders(repo.path) == ["outer", "repair"]
        assert holders(repo.path) == []
        with repo.lock(SHARED, "later"):             # a lock after the outer one is its own
            assert holders(repo.path) == ["later"]
        assert holders(repo.path) == []
    finally:
        repo.close()
