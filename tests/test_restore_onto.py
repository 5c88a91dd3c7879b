"""`restore --onto` writes only what differs from --base, so it must refuse a target that cannot
hold --base's image; --force turns it into a full restore."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import MIB, DiskModel, cli


@pytest.fixture
def two_points(tmp_path, capsys):
    """Points A and B of one disk (B changed), and the bytes of each."""
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "64KiB").code == 0
    model = DiskModel(tmp_path / "d.img", 2 * MIB, np.random.default_rng(11))
    model.random_changes(6)
    args = ["backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}", "--json"]
    a = cli(capsys, *args).json()["point"]["id"]
    content_a = model.copy_of_content()
    model.random_changes(3)
    b = cli(capsys, *args).json()["point"]["id"]
    return repo, (a, content_a), (b, model.copy_of_content()), model


@pytest.mark.parametrize("size", [0, 1000, 2 * MIB - 1, 2 * MIB + 1, 8 * MIB])
def test_onto_a_file_of_another_size_is_refused_and_left_alone(tmp_path, capsys, two_points,
                                                              size):
    repo, (a, _), (b, _), _ = two_points
    target = tmp_path / "other.img"
    original = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    target.write_bytes(original)
    result = cli(capsys, "restore", repo, b, "--disk", "d", "--onto", target, "--base", a)
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repo-engine: error: "), result.err
    for fragment in (f"is {size} bytes", f"{2 * MIB} bytes", a[:8], "--force"):
        assert fragment in lines[0], lines[0]
    assert target.read_bytes() == original


def test_onto_with_force_is_a_full_restore(tmp_path, capsys, two_points):
    repo, (a, _), (b, content_b), _ = two_points
    target = tmp_path / "other.img"
    target.write_bytes(b"\xff" * 1000)
    result = cli(capsys, "restore", repo, b, "--disk", "d", "--onto", target, "--base", a,
                 "--force")
    assert result.code == 0, result.err
    assert target.read_bytes() == content_b


def test_onto_the_base_image_writes_only_the_difference(tmp_path, capsys, two_points):
    repo, (a, content_a), (b, content_b), _ = two_points
    target = tmp_path / "a.img"
    target.write_bytes(content_a)
    result = cli(capsys, "restore", repo, b, "--disk", "d", "--onto", target, "--base", a,
                 "--json")
    assert result.code == 0, result.err
    assert target.read_bytes() == content_b
    assert 0 < result.json()["blocks_written"] < 2 * MIB // (64 * 1024)


@pytest.mark.parametrize("grown_already", [False, True])
def test_onto_for_a_grown_disk(tmp_path, capsys, two_points, grown_already):
    """The base's size, or the new point's size when the image was grown already, are both right."""
    repo, (a, content_a), _, model = two_points
    with open(model.path, "r+b") as f:
        f.truncate(3 * MIB)
    model.content.extend(bytes(MIB))
    model.write(2 * MIB + 4096, b"grown" * 1000)
    c = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
            "--json").json()["point"]["id"]
    target = tmp_path / "a.img"
    target.write_bytes(content_a + (bytes(MIB) if grown_already else b""))
    result = cli(capsys, "restore", repo, c, "--disk", "d", "--onto", target, "--base", a)
    assert result.code == 0, result.err
    assert target.read_bytes() == bytes(model.content)
