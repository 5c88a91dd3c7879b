"""The S3 server fails in the middle of a command, run as a real `repo-engine` process: its volume
server (SeaweedFS's data) is killed while a backup or a restore runs, and a gc loses its
connection to the server (tests/s3proxy.py) between committing a sweep and deleting. Each
command ends with one clear line (exit code 1, no damage claimed), a failed backup stores no
point, a failed restore leaves no file at its target, a later gc deletes what the failed backup
or gc left, and once the server is back the same command succeeds."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel
from race import Command
from s3cli import (Leftovers, assert_one_line_error, bucket_objects, in_process, leftovers,
                   s3_environment)
from s3proxy import FaultProxy
from s3server import new_bucket, start_server

DISK = 4 * MIB
LEASE_SECONDS = 3  # the leases and locks a failed command could not delete expire soon
SMALL_PACKS = "128KiB"  # many packs: a restore reads long enough to be stopped in the middle


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server of this module alone, its volume server a process that a test can kill."""
    s = start_server(tmp_path_factory.mktemp("seaweedfs-faults"), separate_volume=True)
    yield s
    s.stop()


@pytest.fixture
def bucket(server, tmp_path, monkeypatch) -> str:
    s3_environment(monkeypatch, tmp_path, server.endpoint)
    monkeypatch.setenv("REPO_ENGINE_LEASE_SECONDS", str(LEASE_SECONDS))
    yield new_bucket(server)
    if server.volume is None or server.volume.poll() is not None:
        server.restart_volume()  # a failed test leaves the server whole for the next one


@pytest.fixture
def repo(bucket) -> str:
    location = f"s3://{bucket}/repo"
    assert in_process("init", location, "--no-encryption").code == 0
    return location


def new_content(model: DiskModel) -> None:
    """Fill the disk with fresh random bytes: no chunk of it is in the repository yet."""
    model.write(0, model.rng.integers(0, 256, model.capacity, dtype=np.uint8).tobytes())


def backup(repo: str, model: DiskModel) -> str:
    result = in_process("backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                         "--json")
    assert result.code == 0, result.err
    return result.json()["point"]["id"]


def restored(repo: str, point: str, target: Path) -> bytes:
    target.unlink(missing_ok=True)
    result = in_process("restore", repo, point, "--disk", "d", "--to", target)
    assert result.code == 0, result.err
    return target.read_bytes()


def point_ids(repo: str) -> list[str]:
    result = in_process("points", repo, "--json")
    assert result.code == 0, result.err
    return [p["id"] for p in result.json()["points"]]


@pytest.fixture
def model(tmp_path) -> DiskModel:
    m = DiskModel(tmp_path / "d.img", DISK, np.random.default_rng(7))
    new_content(m)
    return m


def reclaim(repo: str, failed_at: float) -> None:
    """gc, once the lease (or maintenance lock) the command that failed at `failed_at` could not
    delete has expired and `unlock` removed it: with no grace and no lease to wait for, it plans
    and sweeps (a lease left in place it would wait for until it has seen it unchanged for its
    span)."""
    time.sleep(max(0.0, failed_at + LEASE_SECONDS + 0.2 - time.monotonic()))
    assert in_process("unlock", repo).code == 0
    result = in_process("gc", repo, "--grace", "0s")
    assert result.code == 0, result.err


def assert_server_failure(err: str, repo: str) -> None:
    """The line names the repository and says the server failed: not damage, not a bug."""
    said = ("kept failing", "cannot reach", "did not answer")
    assert repo in err and any(text in err for text in said), err
    assert "error: internal error" not in err and "damage" not in err, err


def test_backup_when_the_volume_server_dies(tmp_path, server, bucket, repo, model):
    first = backup(repo, model)
    before = set(bucket_objects(server, bucket, "repo/packs/"))
    new_content(model)
    cmd = Command(tmp_path, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                  pauses=("backup.before_commit",))
    assert cmd.reached("backup.before_commit")  # its packs and maps are in the bucket
    server.kill_volume()
    cmd.release("backup.before_commit")
    err = assert_one_line_error(cmd.finish())
    assert_server_failure(err, repo)
    # the server failed while the point was being committed: whether it kept that last write
    # only the journal can tell
    assert_reclaimed_by_gc(err, repo, f"no restore point was stored unless 'repo-engine points "
                                      f"{repo}' lists ")
    failed_at = time.monotonic()
    server.restart_volume()
    left = set(bucket_objects(server, bucket, "repo/packs/")) - before
    assert left, "the failed backup uploaded nothing: the fault came too early"
    assert point_ids(repo) == [first]  # no point stored

    new_content(model)  # what the failed backup stored is used by no point
    second = backup(repo, model)  # a rerun succeeds
    reclaim(repo, failed_at)
    assert not left & set(bucket_objects(server, bucket, "repo/packs/"))
    assert leftovers(repo, tmp_path / "check") == Leftovers([], [], [])
    assert restored(repo, second, tmp_path / "out.img") == model.copy_of_content()
    assert point_ids(repo) == [first, second]


def test_backup_when_the_connection_is_cut_while_packs_upload(tmp_path, server, bucket):
    repo = f"s3://{bucket}/repo"
    assert in_process("init", repo, "--no-encryption", "--pack-size", SMALL_PACKS).code == 0
    model = DiskModel(tmp_path / "big.img", 4 * DISK, np.random.default_rng(8))
    new_content(model)  # many packs: the backup uploads long enough to be stopped in the middle
    proxy = FaultProxy(server.ports["s3.port"])
    try:
        cmd = Command(tmp_path, "backup", "image", repo, "--vm", "v", "--disk",
                      f"d={model.path}", "--endpoint", proxy.endpoint)
        deadline = time.monotonic() + 60
        while not bucket_objects(server, bucket, "repo/packs/"):
            assert cmd.proc.poll() is None, cmd.finish()
            assert time.monotonic() < deadline, "the backup uploaded no pack"
        os.kill(cmd.proc.pid, signal.SIGSTOP)  # in the middle: packs are being uploaded
        try:
            assert cmd.proc.poll() is None, "the backup finished before it could be stopped"
            proxy.arm("reset", 1_000_000)  # the server is gone for this backup
        finally:
            os.kill(cmd.proc.pid, signal.SIGCONT)
        err = assert_one_line_error(cmd.finish())
        failed_at = time.monotonic()
    finally:
        proxy.close()
    assert repo in err and "error: internal error" not in err and "damage" not in err, err
    assert_reclaimed_by_gc(err, repo, "; no restore point was stored; ")
    assert point_ids(repo) == []
    backup(repo, model)  # at once: the VM lock it could not delete was a dead holder's
    reclaim(repo, failed_at)  # gc frees what it uploaded, as the message says
    assert leftovers(repo, tmp_path / "check") == Leftovers([], [], [])


def assert_reclaimed_by_gc(err: str, repo: str, stored: str) -> None:
    """The line says whether a point was stored, and that gc frees what the backup wrote."""
    assert stored in err, err
    assert err.rstrip().endswith(f"'repo-engine gc {repo}' frees what this backup wrote"), err


def test_gc_when_the_connection_is_cut(tmp_path, server, bucket, repo, model):
    first = backup(repo, model)
    forgotten = set(bucket_objects(server, bucket, "repo/packs/"))
    new_content(model)
    second = backup(repo, model)
    assert in_process("forget", repo, first).code == 0  # its packs are used by no point now
    proxy = FaultProxy(server.ports["s3.port"])
    try:
        cmd = Command(tmp_path, "gc", repo, "--grace", "0s", "--endpoint", proxy.endpoint,
                      pauses=("gc.sweep",))
        assert cmd.reached("gc.sweep")  # the sweep is committed, nothing deleted yet
        proxy.arm("reset", 10_000)  # the server is gone for this gc, whatever it sends
        cmd.release("gc.sweep")
        err = assert_one_line_error(cmd.finish())
        failed_at = time.monotonic()
    finally:
        proxy.close()
    assert repo in err and "error: internal error" not in err and "damage" not in err, err
    assert forgotten <= set(bucket_objects(server, bucket, "repo/packs/"))  # none deleted
    reclaim(repo, failed_at)  # a later gc cleans up
    assert not forgotten & set(bucket_objects(server, bucket, "repo/packs/"))
    assert leftovers(repo, tmp_path / "check") == Leftovers([], [], [])
    assert point_ids(repo) == [second]
    assert restored(repo, second, tmp_path / "out.img") == model.copy_of_content()


def test_restore_when_the_volume_server_dies(tmp_path, server, bucket, model):
    repo = f"s3://{bucket}/repo"
    assert in_process("init", repo, "--no-encryption", "--pack-size", SMALL_PACKS).code == 0
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
