"""A 64 TiB disk (sparse, a few MiB of data at its start, middle and end): every command that
reads block maps runs in bounded memory, whatever the disk's size, and restores its bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, write_extents

TIB = 1 << 40
CAPACITY = 64 * TIB
PEAK_RSS = 200 * MIB
DATA = 3 * MIB  # bytes at each of the three places
PLACES = [0, CAPACITY // 2 + 5 * 65536, CAPACITY - DATA]


@pytest.fixture
def huge(tmp_path):
    """A directory whose filesystem holds a 64 TiB sparse file (ext4 stops at 16 TiB: tmpfs
    does not)."""
    for base in (tmp_path, Path("/dev/shm")):
        if not base.is_dir() or not os.access(base, os.W_OK):
            continue
        where = Path(tempfile.mkdtemp(dir=base, prefix="huge-"))
        try:
            with open(where / "probe", "wb") as probe:
                probe.truncate(CAPACITY)
        except OSError:
            shutil.rmtree(where)
            continue
        try:
            yield where
        finally:
            shutil.rmtree(where)
        return
    pytest.skip("no filesystem here holds a 64 TiB sparse file")


# runs the CLI and, at exit, writes the process's peak RSS (VmHWM: the high-water mark of this
# process's own memory; ru_maxrss of a child would include the forking test process's)
PEAK_OF = """
import atexit, runpy, sys
def peak(path=sys.argv[1]):
    with open("/proc/self/status") as status, open(path, "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM:")).split()[1])
atexit.register(peak)
sys.argv = ["repo-engine", *sys.argv[2:]]
runpy.run_module("repo_engine", run_name="__main__")
"""


def run(*args: object, code: int = 0) -> tuple[subprocess.CompletedProcess, int]:
    """`repo-engine ARGS` in a child process (which must exit with `code`), and the child's
    peak RSS in bytes."""
    with tempfile.NamedTemporaryFile("r") as peak:
        result = subprocess.run([sys.executable, "-c", PEAK_OF, peak.name, *map(str, args)],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=600)
        kib = peak.read()
    assert result.returncode == code, (args[0], result.stderr)
    return result, int(kib) * 1024


def _write(path: Path, rng: np.random.Generator, places: list[int], size: int) -> dict[int, bytes]:
    out = {}
    with open(path, "r+b") as f:
        for offset in places:
            data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            os.pwrite(f.fileno(), data, offset)
            out[offset] = data
    return out


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), size, offset)


def test_64_tib_disk_in_bounded_memory(huge):
    rng = np.random.default_rng(64)
    image = huge / "disk.img"
    image.touch()
    os.truncate(image, CAPACITY)
    content = _write(image, rng, PLACES, DATA)
    repo = huge / "repo"
    peaks = {}
    run("init", repo, "--block-size", "64KiB", "--max-chain", "2")
    disk = ["--vm", "vm", "--disk", f"sda={image}", "--json"]

    _, peaks["first backup"] = run("backup", "image", repo, *disk)
    changes = []
    for step in ("incremental", "synthetic full"):
        offset = CAPACITY // 4 + len(changes) * 7 * MIB
        content.update(_write(image, rng, [offset], MIB))
        changes.append([offset, MIB])
        extents = write_extents(huge / f"changed-{step[0]}.json", [changes[-1]])
        # the incremental also audits a sample of the blocks called unchanged
        audit = ["--audit", "0.0001"] if step == "incremental" else []
        result, peaks[step] = run("backup", "image", repo, *disk, "--changed",
                                  f"sda={extents}", *audit)
    points = json.loads(run("points", repo, "--json")[0].stdout)["points"]
    kinds = [p["disks"][0]["kind"] for p in points]
    assert kinds == ["full", "delta", "full"]  # max-chain 2: the third is a synthetic full
    audited = points[1]["disks"][0]["counters"]
    unchanged = (CAPACITY - MIB) // (64 << 10)  # blocks the change list calls unchanged
    assert audited["audit_blocks"] == round(unchanged * 0.0001 / 100)
    assert audited["audit_mismatches"] == 0
    logical = [p["disks"][0]["logical_bytes"] for p in points]
    assert logical == [3 * DATA, 3 * DATA + MIB, 3 * DATA + 2 * MIB]

    target = huge / "restored.img"
    _, peaks["restore"] = run("restore", repo, points[2]["id"], "--disk", "sda", "--to", target)
    assert target.stat().st_size == CAPACITY
    for offset, data in content.items():
        assert _read(target, offset, len(data)) == data, offset
    for hole in (DATA, CAPACITY // 3, CAPACITY // 2 - MIB, CAPACITY - DATA - MIB):
        assert _read(target, hole, MIB) == bytes(MIB), hole
    assert target.stat().st_blocks * 512 < 64 * MIB  # the holes stayed holes
    target.unlink()

    result, peaks["diff"] = run("diff", repo, points[0]["id"], points[2]["id"], "--json")
    assert json.loads(result.stdout)["disks"][0]["extents"] == changes

    # forgetting the first point rebases the second (a delta on it) as a full map
    _, peaks["forget"] = run("forget", repo, points[0]["id"])
    points = json.loads(run("points", repo, "--json")[0].stdout)["points"]
    assert [p["disks"][0]["kind"] for p in points] == ["full", "full"]
    _, peaks["restore after forget"] = run("restore", repo, points[0]["id"], "--disk", "sda",
                                          "--to", target)
    for offset in PLACES + [changes[0][0]]:
        assert _read(target, offset, MIB) == content[offset][:MIB], offset
    assert _read(target, changes[1][0], MIB) == bytes(MIB)  # written after that point
    _, peaks["verify"] = run("verify", repo)
    over = {step: peak for step, peak in peaks.items() if peak > PEAK_RSS}
    assert not over, over


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("repo-engine: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("capacity", [(1 << 63) - (1 << 16), 2 << 50])
def test_disk_beyond_the_largest_is_refused_before_reading(huge, capacity):
    """A disk of 2^63 bytes (the largest file: 2^63 - 64 KiB) or of 2 PiB: one line, nothing
    stored; before, the point was committed and the catalog could no longer be read."""
    image = huge / "disk.img"
    with open(image, "wb") as f:
        f.truncate(capacity)
    repo = huge / "repo"
    run("init", repo)
    result, peak = run("backup", "image", repo, "--vm", "vm", "--disk", f"sda={image}", code=1)
    _one_line_error(result, "disk sda", f"capacity of {capacity} bytes", "1024.0 TiB",
                    "leave it out")
    assert peak < PEAK_RSS
    assert json.loads(run("points", repo, "--json")[0].stdout)["points"] == []


def test_read_of_every_block_that_cannot_fit_is_refused(huge):
    """1 PiB at 16 KiB blocks is 2^36 blocks: a backup without a change list would read every
    block, whose list alone needs terabytes: one line naming the way out, no OOM kill."""
    image = huge / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 50)
    repo = huge / "repo"
    run("init", repo, "--block-size", "16KiB")
    disk = ["--vm", "vm", "--disk", f"sda={image}"]
    run("backup", "image", repo, *disk)  # the first reads the allocated extents: none
    result, peak = run("backup", "image", repo, *disk, code=1)
    _one_line_error(result, "disk sda: reading all 68719476736 blocks", "--changed",
                    "larger --block-size")
    assert peak < PEAK_RSS
    assert len(json.loads(run("points", repo, "--json")[0].stdout)["points"]) == 1


def test_chains_across_map_windows(tmp_path):
    """A 40 GiB sparse disk at 16 KiB blocks spans three map windows (2^20 blocks each), with
    data and changes in each: forgetting the middle point of full -> delta -> delta rebases the
    last as a delta on the first, window by window; restore, --onto, diff and the block-by-block
    compare of an in-place vSphere restore see every window."""
    bs, capacity = 16 << 10, 40 << 30
    rng = np.random.default_rng(40)
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(capacity)
    window = bs << 20
    content = _write(image, rng, [0, window - bs, 2 * window + 4 * MIB, capacity - DATA], DATA)
    repo = tmp_path / "repo"
    run("init", repo, "--block-size", "16KiB")
    disk = ["--vm", "vm", "--disk", f"sda={image}", "--json"]
    run("backup", "image", repo, *disk)
    snapshots = [dict(content)]
    for round_ in range(2):
        places = [window + (4 + 2 * round_) * MIB, 2 * window - MIB // 2 + round_ * MIB]
        content.update(_write(image, rng, places, MIB))
        extents = write_extents(tmp_path / f"c{round_}.json", [[p, MIB] for p in places])
        run("backup", "image", repo, *disk, "--changed", f"sda={extents}")
        snapshots.append(dict(content))
    ids = [p["id"] for p in json.loads(run("points", repo, "--json")[0].stdout)["points"]]
    changed = [window + 4 * MIB, window + 6 * MIB, 2 * window - MIB // 2, 2 * window + MIB // 2]
    assert _compared(repo, ids[0], image).tolist() == [
        b for start in changed for b in range(start // bs, (start + MIB) // bs)]
    run("restore", repo, ids[0], "--disk", "sda", "--to", tmp_path / "first.img")
    run("forget", repo, ids[1])
    [_first, last] = json.loads(run("points", repo, "--json")[0].stdout)["points"]
    assert last["disks"][0]["kind"] == "delta" and last["disks"][0]["parent"] == ids[0]
    run("restore", repo, ids[2], "--disk", "sda", "--to", tmp_path / "last.img")
    run("restore", repo, ids[2], "--disk", "sda", "--onto", tmp_path / "first.img", "--base",
        ids[0])
    for name in ("last.img", "first.img"):
        for offset, data in snapshots[2].items():
            assert _read(tmp_path / name, offset, len(data)) == data, (name, offset)
        assert _read(tmp_path / name, window + 3 * MIB, MIB) == bytes(MIB)
    diff = json.loads(run("diff", repo, ids[0], ids[2], "--json")[0].stdout)
    assert diff["disks"][0]["extents"] == [[window + 4 * MIB, MIB], [window + 6 * MIB, MIB],
                                           [2 * window - MIB // 2, 2 * MIB]]


def _compared(repo: Path, point_id: str, image: Path) -> np.ndarray:
    """The blocks of `image` whose content is not point `point_id`'s, as an in-place vSphere
    restore finds them when CBT cannot say (every block read and compared, window by window)."""
    import vddk_ext
    from repo_engine.repository.repo import Repository
    from repo_engine.restore.vsphere import _differing

    opened = Repository.open(repo)
    try:
        point = next(p for p in opened.points() if p.id == point_id)
        with vddk_ext.open_local(image) as device:
            return _differing(opened, point, point.disks[0], device)
    finally:
        opened.close()
