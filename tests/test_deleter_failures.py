"""A deletion of dead objects failing while a maintenance command runs (a file it may not
remove, a store error): the command fails with one line (exit 1), deletes nothing a kept point
uses, and releases its lock once the deletions it handed over are done, so the next gc finishes
the work."""

from __future__ import annotations

import pytest

from helpers import cli, restore_bytes
from test_prune_review import _chain
from repo_engine.repository.repo import Repository
from repo_engine.repository.store import local


@pytest.mark.parametrize("command", [["forget"], ["forget", "--prune"], ["gc"]])
def test_a_failing_deletion_fails_the_command_in_one_line_and_keeps_every_kept_point(
        tmp_path, capsys, monkeypatch, command):
    repo, contents = _chain(tmp_path, capsys)
    ids = list(contents)
    if command == ["gc"]:
        assert cli(capsys, "forget", repo, *ids[:5]).code == 0
        args = ["gc", repo]
    else:
        args = [*command[:1], repo, *ids[:5], *command[1:]]

    def refused(directory, files):
        raise PermissionError(13, "Permission denied", str(directory))

    with monkeypatch.context() as patched:
        patched.setattr(local, "unlink_from", refused)
        result = cli(capsys, *args)
    assert result.code == 1, result.err
    assert result.err.startswith("repo-engine: error: permission denied: ")
    assert result.err.count("\n") == 1 and "Traceback" not in result.err
    done = cli(capsys, "gc", repo)  # the lock is free, the work is finished
    assert done.code == 0, done.err
    with Repository.open(repo) as opened:
        kept = [p.id for p in opened.points()]
    assert kept == ids[5:]
    for point in kept:
        assert restore_bytes(capsys, repo, point, "sda", tmp_path / "out.img") == contents[point]
    assert cli(capsys, "verify", repo).code == 0
