"""One backup of a VM at a time: a second backup of a VM that is being backed up is refused with
the running one's host, pid and start time, on one host and across hosts sharing a repository."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import numpy as np
import pytest

from repo_engine.repository.envelope import seal
from repo_engine.repository.formats import LOCK

from helpers import MIB, DiskModel, cli

TIMEOUT = 120


def backup_cmd(repo: Path, vm: str, image: Path) -> list[str]:
    return [sys.executable, "-m", "repo_engine", "backup", "image", str(repo), "--vm", vm,
            "--disk", f"d={image}"]


def vm_lock_path(repo: Path, vm: str) -> Path:
    return repo / "locks" / f"vm-{blake3.blake3(vm.encode()).hexdigest()[:32]}.lock"


@pytest.fixture
def setup(tmp_path, capsys):
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo).code == 0
    small = DiskModel(tmp_path / "small.img", 2 * MIB, np.random.default_rng(1))
    small.random_changes(3)
    big = tmp_path / "big.img"  # random bytes: a backup of it takes a while
    big.write_bytes(np.random.default_rng(2).integers(0, 256, 96 * MIB, dtype=np.uint8).tobytes())
    return repo, small.path, big


def _stopped_backup(repo: Path, vm: str, image: Path) -> subprocess.Popen:
    """A real backup of `vm`, stopped (SIGSTOP) while it holds its VM lock."""
    return _stopped(backup_cmd(repo, vm, image), vm_lock_path(repo, vm).exists)


def _stopped(cmd: list[str], locked: Callable[[], bool]) -> subprocess.Popen:
    """The backup `cmd`, stopped (SIGSTOP) once `locked()` says it holds its VM lock."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not locked():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGSTOP)
    assert locked(), "the backup finished before it could be stopped"
    return proc


def test_second_backup_of_a_running_vm_is_refused(setup):
    repo, small, big = setup
    first = _stopped_backup(repo, "v", big)
    _second_refused(first, backup_cmd(repo, "v", small), backup_cmd(repo, "w", small))
    points = json.loads(subprocess.run([sys.executable, "-m", "repo_engine", "points", str(repo),
                                        "--json"], capture_output=True, text=True).stdout)
    listed = points["points"] if isinstance(points, dict) else points
    assert sorted(p["vm"] for p in listed) == ["v", "w"]
    assert not vm_lock_path(repo, "v").exists()
    again = subprocess.run(backup_cmd(repo, "v", small), capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr


def _second_refused(first: subprocess.Popen, second: list[str], other_vm: list[str]) -> None:
    """While the stopped backup `first` holds its VM lock, the backup `second` of its VM is
    refused in one line naming it, the backup `other_vm` of another VM is not held up; then
    `first` goes on and succeeds."""
    try:
        refused = subprocess.run(second, capture_output=True, text=True, timeout=TIMEOUT)
        other = subprocess.run(other_vm, capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _out, err = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, err
    assert refused.returncode == 1, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for fragment in ("error: VM 'v' is being backed up by 'backup v'", f"pid {first.pid}",
                     socket.gethostname(), "since 20"):
        assert fragment in lines[0], lines[0]
    assert other.returncode == 0, other.stderr


def test_lock_of_a_killed_backup_is_stale(setup):
    repo, small, big = setup
    first = _stopped_backup(repo, "v", big)
    first.kill()
    first.communicate(timeout=TIMEOUT)
    assert vm_lock_path(repo, "v").exists()
    result = subprocess.run(backup_cmd(repo, "v", small), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr


def test_backup_on_another_host_is_never_guessed_stale(setup):
    repo, small, _big = setup
    info = {"kind": "shared", "host": "other-host", "pid": 4242,
            "time": "2026-11-29T10:00:00.000000Z", "command": "backup v"}
    vm_lock_path(repo, "v").write_bytes(seal(LOCK, json.dumps(info).encode()))
    refused = subprocess.run(backup_cmd(repo, "v", small), capture_output=True, text=True,
                             timeout=TIMEOUT)
    assert refused.returncode == 1
    assert "pid 4242 on other-host since 2026-11-29T10:00:00" in refused.stderr, refused.stderr
    kept = subprocess.run([sys.executable, "-m", "repo_engine", "unlock", str(repo)],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert kept.returncode == 1 and vm_lock_path(repo, "v").exists()
    assert subprocess.run([sys.executable, "-m", "repo_engine", "unlock", str(repo), "--force"],
                          capture_output=True, timeout=TIMEOUT).returncode == 0
    assert subprocess.run(backup_cmd(repo, "v", small), capture_output=True,
                          timeout=TIMEOUT).returncode == 0


# separators, a name too long for a file (the longest name taken, 255 characters, in 4-byte
# UTF-8: 1,020 bytes), non-ASCII and a no-break space (a control character such as a newline,
# or a Unicode line separator, is refused at input)
@pytest.mark.parametrize("vm", ["../../escape", "a/b", "\U0001F600" * 255,
                                "\u00e9t\u00e9 \u00a0 vm"])
def test_any_vm_name_locks_inside_locks_dir(setup, capsys, vm):
    repo, small, _big = setup
    result = cli(capsys, "backup", "image", repo, "--vm", vm, "--disk", f"d={small}")
    assert result.code == 0, result.err
    assert sorted(p.name for p in repo.parent.iterdir()) == ["big.img", "repo", "small.img"]
    assert list((repo / "locks").iterdir()) == []


def test_release_never_removes_a_lock_that_replaced_ours(setup):
    """After `unlock --force` removed a running backup's VM lock and a new backup took the name,
    the first backup's release leaves the new lock in place."""
    from repo_engine.repository.repo import Repository
    repo, _small, _big = setup
    with Repository.open(repo) as opened:
        first = opened.vm_lock("v", "backup v")
        first.path.unlink()  # what unlock --force does
        second = opened.vm_lock("v", "backup v")
        first.release()
        assert second.path.exists()
        second.release()
        assert not second.path.exists()


def test_hosts_sharing_a_repository_never_back_up_one_vm_at_once(setup, tmp_path):
    """Each host keeps its local VM lock in its own cache directory; the VM lock in the store
    refuses the second host in the same words, and is gone once the first backup ends."""
    _repo, small, big = setup
    repo = tmp_path / "shared"
    assert subprocess.run([sys.executable, "-m", "repo_engine", "init", str(repo), "--shared"],
                          capture_output=True, timeout=TIMEOUT).returncode == 0

    def on(host: str, vm: str, image: Path) -> list[str]:
        return backup_cmd(repo, vm, image) + ["--cache-dir", str(tmp_path / f"cache-{host}")]

    leases = repo / "leases"
    first = _stopped(on("a", "v", big), lambda: any(leases.glob("vm-*.lock")))
    _second_refused(first, on("b", "v", small), on("b", "w", small))
    assert list(leases.iterdir()) == []
    again = subprocess.run(on("b", "v", small), capture_output=True, text=True, timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr
