"""Block devices as backup sources and restore targets (loop devices; needs root)."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest

from helpers import MIB, cli, disk_of


@pytest.fixture
def loop_device(tmp_path):
    backing = tmp_path / "backing.img"
    backing.write_bytes(bytes(4 * MIB))
    made = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop devices here: {made.stderr.strip()}")
    device = made.stdout.strip()
    yield device, backing
    subprocess.run(["losetup", "-d", device], check=False)


def test_block_device_backup_and_restore_in_place(tmp_path, capsys, loop_device):
    device, backing = loop_device
    rng = np.random.default_rng(9)
    content = bytearray(4 * MIB)
    content[MIB:2 * MIB] = rng.integers(0, 256, MIB, dtype=np.uint8).tobytes()
    with open(device, "r+b") as f:
        f.write(content)
        os.fsync(f.fileno())
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo).code == 0
    result = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={device}", "--json")
    assert result.code == 0, result.err
    disk = disk_of(result.json()["point"], "d")
    assert disk["counters"]["blocks_read"] == 64, "a block device is read whole on a first backup"
    assert disk["read_mode"] == "full", "reading a device whole is not an allocated read"
    assert disk["counters"]["zero_blocks"] == 48

    # wreck the device, then restore the point onto it in place
    with open(device, "r+b") as f:
        f.write(rng.integers(0, 256, 4 * MIB, dtype=np.uint8).tobytes())
    result = cli(capsys, "restore", repo, "v@latest", "--disk", "d", "--to", device)
    assert result.code == 0, result.err
    with open(device, "rb") as f:
        assert f.read() == bytes(content), "zero blocks must be zeroed on a device, not skipped"
