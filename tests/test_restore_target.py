"""What `restore --to` may replace: a new file; an existing regular file with --force (replaced
in one rename, so a failed restore leaves it as it was); a block device, written in place. A
symlink (except to a block device), FIFO, socket, character device or directory is refused with a
one-line reason and left as it was."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import repo_with_point

TIMEOUT = 60


@pytest.fixture
def setup(tmp_path, capsys):
    return repo_with_point(tmp_path, capsys, 11)


def restore_to(repo: Path, target: Path, *extra: str) -> subprocess.CompletedProcess:
    """In a child process: a restore that blocks on a FIFO fails the test instead of hanging."""
    return subprocess.run([sys.executable, "-m", "repo_engine", "restore", str(repo), "v@latest",
                           "--disk", "d", "--to", str(target), *extra],
                          capture_output=True, text=True, timeout=TIMEOUT)


def _chardev(path: Path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    except PermissionError:
        pytest.skip("creating a device node needs root")


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()


def _dangling(path: Path) -> None:
    path.symlink_to(path.parent / "elsewhere" / "new.img")
    (path.parent / "elsewhere").mkdir()


def _to_file(path: Path) -> None:
    (path.parent / "victim").write_bytes(b"keep me")
    path.symlink_to(path.parent / "victim")


def _to_chardev(path: Path) -> None:
    path.symlink_to("/dev/null")


REFUSED = {
    "chardev": (_chardev, "is a character device"),
    "fifo": (os.mkfifo, "is a FIFO"),
    "socket": (_socket, "is a socket"),
    "directory": (os.mkdir, "is a directory"),
    "dangling-symlink": (_dangling, "symlink to nothing"),
    "symlink-to-file": (_to_file, "is a symlink"),
    "symlink-to-chardev": (_to_chardev, "is a symlink"),
}


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_restore_refuses_targets_it_must_not_replace(tmp_path, setup, kind, force):
    repo, _model = setup
    target = tmp_path / "target"
    make, why = REFUSED[kind]
    make(target)
    before = {p.name: (os.lstat(p).st_mode, os.lstat(p).st_ino) for p in tmp_path.iterdir()}
    elsewhere = sorted((tmp_path / "elsewhere").iterdir()) if kind == "dangling-symlink" else []
    result = restore_to(repo, target, *(["--force"] if force else []))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0] and str(target) in lines[0], lines
    after = {p.name: (os.lstat(p).st_mode, os.lstat(p).st_ino) for p in tmp_path.iterdir()}
    assert after == before  # the node is untouched, nothing new next to it
    if kind == "dangling-symlink":
        assert sorted((tmp_path / "elsewhere").iterdir()) == elsewhere == []
    if kind == "symlink-to-file":
        assert (tmp_path / "victim").read_bytes() == b"keep me"


def test_new_file_and_forced_replace(tmp_path, setup):
    repo, model = setup
    target = tmp_path / "out.img"
    assert restore_to(repo, target).returncode == 0
    assert target.read_bytes() == bytes(model.content)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    target.write_bytes(b"old")
    refused = restore_to(repo, target)
    assert refused.returncode == 2 and "use --force" in refused.stderr
    assert target.read_bytes() == b"old"
    assert restore_to(repo, target, "--force").returncode == 0
    assert target.read_bytes() == bytes(model.content)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_forced_restore_leaves_the_old_file(tmp_path, setup):
    repo, _model = setup
    target = tmp_path / "out.img"
    target.write_bytes(b"precious old image")
    for pack in (repo / "packs").rglob("*.pack"):
        pack.unlink()  # every chunk is gone: the restore fails part way
    result = restore_to(repo, target, "--force")
    assert result.returncode == 3, result.stderr
    assert target.read_bytes() == b"precious old image"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
