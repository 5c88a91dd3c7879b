"""Disks whose capacity changes between backups, including to and from 0 bytes, sizes below one
block and sizes that are not a multiple of the block size: every point restores to the exact
bytes the disk held when it was backed up, whole and onto the point before it (hypothesis over
capacity sequences)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import cli

BS = 16 * 1024
# the edges: empty, under one block, around block multiples, odd sizes
CAPACITIES = [0, 1, 511, BS - 1, BS, BS + 1, 2 * BS - 7, 2 * BS, 3 * BS + 4097, 5 * BS]


@st.composite
def histories(draw):
    """Backups of one disk: per step a capacity, some writes inside it, and how the backup
    learns what changed: an extents file listing every write, one listing only what was written
    inside the previous capacity (a grown tail must then be found by the backup), or none."""
    steps = []
    for _ in range(draw(st.integers(2, 5))):
        capacity = draw(st.sampled_from(CAPACITIES))
        writes = []
        for _ in range(draw(st.integers(0, 3)) if capacity else 0):
            offset = draw(st.integers(0, capacity - 1))
            length = draw(st.integers(1, capacity - offset))
            writes.append((offset, length, draw(st.integers(1, 255))))
        steps.append((capacity, writes, draw(st.sampled_from(["all", "old", None]))))
    return steps


def _apply(image: Path, capacity: int, writes: list[tuple[int, int, int]]) -> bytes:
    with open(image, "r+b") as f:
        f.truncate(capacity)
        for offset, length, fill in writes:
            f.seek(offset)
            f.write(bytes([fill]) * length)
    return image.read_bytes()


def _listed(writes: list[tuple[int, int, int]], below: int) -> list[list[int]]:
    """The writes as extents, cut at `below` bytes."""
    return [[o, min(o + ln, below) - o] for o, ln, _ in writes if o < below]


def _backup(capsys, repo: Path, image: Path, changed: Path | None) -> str:
    args = ["backup", "image", repo, "--vm", "vm", "--disk", f"sda={image}", "--json"]
    if changed is not None:
        args += ["--changed", f"sda={changed}"]
    result = cli(capsys, *args)
    assert result.code == 0, result.err
    return result.json()["point"]["id"]


@given(histories())
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_point_restores_exactly_across_resizes(capsys, history):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo, image = root / "repo", root / "sda.img"
        assert cli(capsys, "init", repo, "--block-size", "16KiB", "--max-chain", "3").code == 0
        image.write_bytes(b"")
        expected: dict[str, bytes] = {}
        previous = 0
        for n, (capacity, writes, listed) in enumerate(history):
            content = _apply(image, capacity, writes)
            changed = None
            if listed:
                changed = root / f"changed-{n}.json"
                changed.write_text(json.dumps(_listed(writes, capacity if listed == "all"
                                                      else min(previous, capacity))))
            previous = capacity
            expected[_backup(capsys, repo, image, changed)] = content
        _assert_restores(capsys, repo, root, expected)


def _assert_restores(capsys, repo: Path, root: Path, expected: dict[str, bytes]) -> None:
    """Each point restored whole (`--to`), and onto the image of the point before it (`--onto`,
    writing only the blocks that differ, across the resize)."""
    target, previous = root / "restored.img", None
    for point, content in expected.items():
        if target.exists():
            os.unlink(target)
        result = cli(capsys, "restore", repo, point[:12], "--disk", "sda", "--to", target)
        assert result.code == 0, result.err
        assert target.read_bytes() == content, f"point {point[:8]} restored wrong bytes"
        if previous is not None:
            onto = root / "onto.img"
            onto.write_bytes(expected[previous])
            result = cli(capsys, "restore", repo, point[:12], "--disk", "sda", "--onto", onto,
                         "--base", previous[:12])
            assert result.code == 0, result.err
            assert onto.read_bytes() == content, f"point {point[:8]} onto {previous[:8]} wrong"
        previous = point
