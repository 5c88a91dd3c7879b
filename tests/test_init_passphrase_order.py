"""`init` of an encrypted repository asks for the passphrase only once the location is known to
be usable: a user at a terminal never types a new passphrase twice to then hear the directory or
prefix is taken."""

from __future__ import annotations

import pytest

from repo_engine.cli import passphrase
from s3cli import s3_environment
from test_encryption_cli import failure, ok, small_kdf  # noqa: F401 (fixture)


@pytest.fixture
def terminal(monkeypatch) -> list[str]:
    """A terminal on which every prompt is recorded (and answered)."""
    asked: list[str] = []

    def hidden(text: str) -> str:
        asked.append(text)
        return "typed"
    monkeypatch.setattr(passphrase, "on_terminal", lambda: True)
    monkeypatch.setattr("click.termui.hidden_prompt_func", hidden)
    return asked


def test_a_taken_or_unreachable_directory_is_refused_before_the_passphrase(tmp_path, capsys,
                                                                           terminal):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_bytes(b"x")
    assert "already exists and is not an empty directory" in failure(
        capsys, 2, "init", taken, "--encryption")
    assert "does not exist" in failure(capsys, 2, "init", tmp_path / "no" / "repo",
                                       "--encryption")
    assert terminal == []
    ok(capsys, "init", tmp_path / "repo", "--encryption")
    assert len(terminal) == 2  # asked, and asked again to confirm


def test_a_used_prefix_is_refused_before_the_passphrase(tmp_path, capsys, monkeypatch, terminal,
                                                        seaweedfs, s3_bucket):
    s3_environment(monkeypatch, tmp_path, seaweedfs.endpoint)
    repo = f"s3://{s3_bucket}/used"
    ok(capsys, "init", repo, "--no-encryption")
    assert "already holds a repository" in failure(capsys, 2, "init", repo)
    assert terminal == []


def test_a_refused_passphrase_leaves_no_directory(tmp_path, capsys):
    empty = tmp_path / "empty.pass"
    empty.write_bytes(b"")
    repo = tmp_path / "repo"
    assert "empty" in failure(capsys, 2, "init", repo, "--encryption", "--passphrase-file", empty)
    assert not repo.exists()
