"""An image that changes while it is backed up: grown, shrunk or replaced (another file renamed
over it), between disks or while its blocks are read. The backup fails with a one-line error naming
the disk and what happened, and stores no point; a short read is an error, never zeros. Sources
that are not regular files or block devices (a FIFO with no writer above all) are refused at once,
never waited on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import vddk_ext

from helpers import KIB, cli
from repo_engine.backup.job import BackupOptions, backup_vm
from repo_engine.errors import SourceError
from repo_engine.repository.repo import Repository
from repo_engine.sources.image import ImageDisk, image_snapshot

SIZE = 256 * KIB


def _image(path: Path, seed: int, size: int = SIZE) -> bytes:
    data = np.random.default_rng(seed).integers(1, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return data


def _grow(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\x01" * 100_000)


def _shrink(path: Path) -> None:
    os.truncate(path, SIZE // 2 - 1000)


def _replace(path: Path) -> None:
    other = path.with_suffix(".new")
    _image(other, 99)   # same size, other bytes: only the identity tells them apart
    os.replace(other, path)


# each change and what the error says about it
CHANGES = {
    "grow": (_grow, f"grew from {SIZE} to {SIZE + 100_000} bytes"),
    "shrink": (_shrink, f"shrank from {SIZE} to {SIZE // 2 - 1000} bytes"),
    "replace": (_replace, "was replaced by another file"),
}


@pytest.fixture
def setup(tmp_path, capsys):
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB").code == 0
    disks = {"sda": tmp_path / "a.img", "sdb": tmp_path / "b.img"}
    content = {key: _image(path, n) for n, (key, path) in enumerate(disks.items())}
    return repo, disks, content


def _snapshot(disks: dict[str, Path]):
    return image_snapshot("vm", [ImageDisk(k, p) for k, p in disks.items()])


class _ChangesOnRead:
    """An open disk that runs `action` (once) when its blocks start to be read."""

    def __init__(self, device, action) -> None:
        self._device, self._action = device, action

    def reader(self, *args, **kwargs):
        self._action()
        return self._device.reader(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._device, name)


def _on_read(disk, action) -> None:
    opened, done = disk.open, []
    disk.open = lambda: _ChangesOnRead(opened(), lambda: done or done.append(action()))


def _assert_refused(repo: Path, snapshot, message: str) -> None:
    with Repository.open(repo) as r:
        with pytest.raises(SourceError) as ei:
            backup_vm(r, snapshot, BackupOptions())
        assert r.points() == [], "a point was stored from a disk that changed"
    text = str(ei.value)
    assert "\n" not in text and message in text, text


@pytest.mark.parametrize("change", CHANGES)
def test_second_disk_changes_after_its_size_was_read(setup, change):
    """Reading the first disk is the pause: the second one changes before it is opened."""
    repo, disks, _ = setup
    snapshot = _snapshot(disks)
    action, what = CHANGES[change]
    _on_read(snapshot.disks[0], lambda: action(disks["sdb"]))
    _assert_refused(repo, snapshot, f"disk sdb: {disks['sdb']} {what} during the backup; "
                                    "no restore point was stored")


@pytest.mark.parametrize("change", CHANGES)
def test_disk_changes_while_its_blocks_are_read(setup, change):
    """A shrink under the reader is a short read (an error, not zeros); a grow or a replace is
    caught by the check before the commit."""
    repo, disks, _ = setup
    snapshot = _snapshot(disks)
    action, what = CHANGES[change]
    _on_read(snapshot.disks[1], lambda: action(disks["sdb"]))
    expected = (f"unexpected end of file at offset {SIZE // 2 - 1000} of {disks['sdb']}"
                if change == "shrink" else f"disk sdb: {disks['sdb']} {what} during the backup")
    _assert_refused(repo, snapshot, expected)


@pytest.mark.parametrize("change", CHANGES)
def test_disk_changes_between_probe_and_backup(setup, change):
    repo, disks, _ = setup
    snapshot = _snapshot(disks)
    action, what = CHANGES[change]
    action(disks["sda"])
    _assert_refused(repo, snapshot, f"disk sda: {disks['sda']} {what} during the backup")


def test_a_stable_source_backs_up_after_a_refused_run(setup, capsys, tmp_path):
    repo, disks, content = setup
    snapshot = _snapshot(disks)
    _grow(disks["sdb"])
    _assert_refused(repo, snapshot, CHANGES["grow"][1])
    content["sdb"] = disks["sdb"].read_bytes()
    args = [a for k, p in disks.items() for a in ("--disk", f"{k}={p}")]
    result = cli(capsys, "backup", "image", repo, "--vm", "vm", *args, "--json")
    assert result.code == 0, result.err
    for key in disks:
        target = tmp_path / f"{key}.out"
        result = cli(capsys, "restore", repo, "vm@latest", "--disk", key, "--to", target)
        assert result.code == 0, result.err
        assert target.read_bytes() == content[key]


def test_short_read_is_an_error_not_zeros(tmp_path):
    path = tmp_path / "s.img"
    _image(path, 5)
    with vddk_ext.open_local(str(path)) as disk:
        os.truncate(path, SIZE // 2)
        with pytest.raises(OSError, match="unexpected end of file"):
            for _ in disk.reader(16 * KIB, np.arange(SIZE // (16 * KIB), dtype=np.uint64)):
                pass


def _special_files(tmp_path: Path) -> dict[str, str]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    return {"FIFO": str(fifo), "socket": str(sock_path), "character device": "/dev/null",
            "directory": str(tmp_path)}


def test_special_files_are_refused_without_waiting(tmp_path):
    """In a child process with a timeout: a FIFO with no writer must not hang the backup."""
    repo = tmp_path / "repo"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = [sys.executable, "-m", "repo_engine"]
    assert subprocess.run([*run, "init", repo], env=env, timeout=60).returncode == 0
    for kind, path in _special_files(tmp_path).items():
        result = subprocess.run([*run, "backup", "image", repo, "--vm", "vm", "--disk",
                                 f"sda={path}"], env=env, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 1, result.stderr
        assert result.stderr == (f"repo-engine: error: disk sda: {path} is a {kind}; only "
                                 "regular files and block devices can be backed up\n")


@pytest.mark.parametrize("writable", [False, True])
def test_vddk_ext_opens_a_fifo_without_blocking(tmp_path, writable):
    """The C open itself does not wait for a writer (the Python check can lose a race)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code = (f"import vddk_ext\ntry:\n    vddk_ext.open_local({str(fifo)!r}, writable={writable})\n"
            "except OSError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert f"cannot open {fifo}: it is a FIFO, not a regular file or block device" in result.stdout
