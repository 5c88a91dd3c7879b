"""The S3 server fails in the middle of a command: its volume server (SeaweedFS's data) is killed
while a backup, a restore or a gc runs, as real `repo-engine` processes. Each command ends with one
clear line (exit code 1, no damage claimed), a failed backup stores no point, a failed restore
leaves no file at its target, gc cleans up what the failed backup left, and once the server is
back the same command succeeds."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel
from race import Command
from s3cli import assert_one_line_error, repo_engine, s3_environment
from s3server import new_bucket, start_server

DISK = 8 * MIB
PACK_SIZE = "256KiB"  # many packs: a restore reads long enough to be stopped in the middle


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server of this module alone, its volume server a process that a test can kill."""
    s = start_server(tmp_path_factory.mktemp("seaweedfs-faults"), separate_volume=True)
    yield s
    s.stop()


@pytest.fixture
def bucket(server, tmp_path, monkeypatch) -> str:
    s3_environment(monkeypatch, tmp_path, server.endpoint)
    yield new_bucket(server)
    if server.volume is None or server.volume.poll() is not None:
        server.restart_volume()  # a failed test leaves the server whole for the next one


@pytest.fixture
def repo(bucket) -> str:
    location = f"s3://{bucket}/repo"
    assert repo_engine("init", location, "--pack-size", PACK_SIZE).code == 0
    return location


def new_content(model: DiskModel) -> None:
    """Fill the disk with fresh random bytes: no chunk of it is in the repository yet."""
    model.write(0, model.rng.integers(0, 256, model.capacity, dtype=np.uint8).tobytes())


def backup(repo: str, model: DiskModel) -> str:
    result = repo_engine("backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                         "--json")
    assert result.code == 0, result.err
    return result.json()["point"]["id"]


def restored(repo: str, point: str, target: Path) -> bytes:
    target.unlink(missing_ok=True)
    result = repo_engine("restore", repo, point, "--disk", "d", "--to", target)
    assert result.code == 0, result.err
    return target.read_bytes()


@pytest.fixture
def model(tmp_path) -> DiskModel:
    m = DiskModel(tmp_path / "d.img", DISK, np.random.default_rng(7))
    new_content(m)
    return m


def assert_server_failure(err: str, repo: str) -> None:
    """The line names the repository and says the server failed: not damage, not a bug."""
    said = ("kept failing", "cannot reach", "did not answer")
    assert repo in err and any(text in err for text in said), err
    assert "error: internal error" not in err and "damage" not in err, err


def test_restore_when_the_volume_server_dies(tmp_path, server, repo, model):
    point = backup(repo, model)
    target = tmp_path / "out.img"
    cmd = Command(tmp_path, "restore", repo, point, "--disk", "d", "--to", target)
    staged = _wait_for_staged_file(tmp_path, cmd)
    os.kill(cmd.proc.pid, signal.SIGSTOP)  # in the middle: the image is being written
    try:
        server.kill_volume()
    finally:
        os.kill(cmd.proc.pid, signal.SIGCONT)
    assert_server_failure(assert_one_line_error(cmd.finish()), repo)
    assert not target.exists() and not staged.exists()  # nothing half-written is left
    server.restart_volume()
    assert restored(repo, point, target) == model.copy_of_content()


def _wait_for_staged_file(folder: Path, cmd: Command) -> Path:
    """The temporary image a restore writes, once it exists."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and cmd.proc.poll() is None:
        found = list(folder.glob(".out.img.restore-*"))
        if found:
            return found[0]
        time.sleep(0.002)
    raise AssertionError(f"the restore never started writing: {cmd.finish()}")
