"""Two restores into one target (an existing file, a device): the second is refused while the
first writes, so their blocks never interleave."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest

from helpers import cli
from race import Command
from repo_engine.restore import restorer
from test_lock_taken import _repo_with_point


def test_two_restores_into_one_target_never_interleave(tmp_path, capsys, monkeypatch):
    """The first restore holds an flock on the target (an existing file replaced with --force,
    or one written in place with --onto): a second one into it is refused (once it waited
    as for a brief holder), and the first writes its image whole."""
    monkeypatch.setattr(restorer, "TARGET_LOCK_WAIT", 0.3)
    repo, model, expected = _repo_with_point(tmp_path, capsys)
    (point, content), = expected.items()
    target = tmp_path / "target.img"
    for how in (["--to", target, "--force"], ["--onto", target, "--base", point[:12]]):
        target.write_bytes(content if how[0] == "--onto" else b"old")
        first = Command(tmp_path, "restore", repo, point[:12], "--disk", "sda", *how,
                        pauses=("restore.writing",))
        assert first.reached("restore.writing")
        second = cli(capsys, "restore", repo, point[:12], "--disk", "sda", *how)
        assert second.code == 1, second.err
        assert second.err.strip() == f"repo-engine: error: {target} is being written by " \
            "another restore; wait for it to finish, or restore to another target"
        first.release("restore.writing")
        done = first.finish()
        assert done.code == 0, done.err
        assert target.read_bytes() == content
        assert [p.name for p in tmp_path.glob(".target.img.restore-*")] == []


def test_a_new_target_another_restore_created_meanwhile_is_not_replaced(tmp_path, capsys):
    """Without --force a restore writes only a new file: one that appeared under the target's
    name while it wrote its image (another restore's) is left as it is, and it fails."""
    repo, model, expected = _repo_with_point(tmp_path, capsys)
    (point, content), = expected.items()
    target = tmp_path / "new.img"
    first = Command(tmp_path, "restore", repo, point[:12], "--disk", "sda", "--to", target,
                    pauses=("restore.writing",))
    assert first.reached("restore.writing")
    target.write_bytes(b"another restore's image")
    first.release("restore.writing")
    done = first.finish()
    assert done.code == 1, done.err
    assert done.err.strip() == f"repo-engine: error: {target} was created by another command " \
        "during this restore and is left as it is; restore again with --force to replace it"
    assert target.read_bytes() == b"another restore's image"
    assert [p.name for p in tmp_path.glob(".new.img.restore-*")] == []
    forced = cli(capsys, "restore", repo, point[:12], "--disk", "sda", "--to", target, "--force")
    assert forced.code == 0, forced.err
    assert target.read_bytes() == content


def _nfs_flock(real):
    """flock as NFS emulates it (byte-range locks): an exclusive lock only on a descriptor
    open for writing, EBADF otherwise."""
    def flock(fd: int, operation: int) -> None:
        if operation & fcntl.LOCK_EX and \
                fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        real(fd, operation)
    return flock


def _no_flock(real, target):
    """flock on a filesystem that has none, where `target` is (the repository's has one)."""
    def flock(fd: int, operation: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(target):
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        real(fd, operation)
    return flock


@pytest.mark.parametrize("flock", ["nfs", "none"])
def test_a_target_on_a_filesystem_with_other_flock_rules_is_restored(tmp_path, capsys,
                                                                     monkeypatch, flock):
    """An existing target on NFS (a datastore), or on a filesystem that cannot flock at all,
    is restored (--force, --onto) as before the lock, the lock taken where it can be."""
    repo, _model, expected = _repo_with_point(tmp_path, capsys)
    (point, content), = expected.items()
    target = tmp_path / "target.img"
    monkeypatch.setattr(fcntl, "flock", _nfs_flock(fcntl.flock) if flock == "nfs"
                        else _no_flock(fcntl.flock, target))
    for how in (["--to", target, "--force"], ["--onto", target, "--base", point[:12]]):
        target.write_bytes(bytes(4096) + content[4096:] if how[0] == "--onto" else b"old")
        done = cli(capsys, "restore", repo, point[:12], "--disk", "sda", *how)
        assert done.code == 0, done.err
        assert target.read_bytes() == content


def test_a_brief_holder_of_the_targets_flock_is_waited_for(tmp_path, capsys, monkeypatch):
    """udev holds a shared flock on a block device for a moment after each write to it (a
    restore just before): a restore into it waits that moment out instead of being refused as
    if another restore wrote it."""
    repo, _model, expected = _repo_with_point(tmp_path, capsys)
    (point, content), = expected.items()
    target = tmp_path / "target.img"
    target.write_bytes(b"old")
    real, refusals = fcntl.flock, [3]

    def briefly_held(fd: int, operation: int) -> None:
        if refusals[0] and os.readlink(f"/proc/self/fd/{fd}") == str(target):
            refusals[0] -= 1
            raise BlockingIOError(errno.EWOULDBLOCK, os.strerror(errno.EWOULDBLOCK))
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", briefly_held)
    done = cli(capsys, "restore", repo, point[:12], "--disk", "sda", "--to", target, "--force")
    assert done.code == 0, done.err
    assert refusals == [0]
    assert target.read_bytes() == content
