"""A long chain of backups of changing sparse images: every point restores byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import (KIB, MIB, DiskModel, assert_sparse_where_zero, cli, disk_of, restore_bytes,
                     write_extents)


@pytest.fixture
def repo(tmp_path, capsys):
    path = tmp_path / "repo"
    result = cli(capsys, "init", path, "--block-size", "16KiB", "--max-chain", "6",
                 "--pack-size", "1MiB")
    assert result.code == 0, result.err
    return path


def test_forty_point_chain_restores_every_point(tmp_path, capsys, repo):
    rng = np.random.default_rng(7)
    disks = {"sda": DiskModel(tmp_path / "sda.img", 4 * MIB + 5000, rng),
             "sdb": DiskModel(tmp_path / "sdb.img", 2 * MIB, rng)}
    for model in disks.values():
        model.random_changes(6)
    expected: list[tuple[str, dict[str, bytes]]] = []
    for day in range(40):
        args = ["backup", "image", repo, "--vm", "vm1", "--json"]
        for key, model in disks.items():
            args += ["--disk", f"{key}={model.path}"]
            if day:
                extents = model.random_changes(int(rng.integers(0, 5)))
                args += ["--changed", f"{key}={write_extents(tmp_path / f'{key}-{day}.json', extents)}"]
        result = cli(capsys, *args)
        assert result.code == 0, result.err
        summary = result.json()
        expected.append((summary["point"]["id"],
                         {k: m.copy_of_content() for k, m in disks.items()}))
    points = cli(capsys, "points", repo, "--json").json()["points"]
    assert [p["id"] for p in points] == [p for p, _ in expected]
    links = [d["links"] for p in points for d in p["disks"]]
    assert max(links) == 6 and links.count(1) > 2, "synthetic fulls must cut the chains"
    for point, contents in expected:
        for key, content in contents.items():
            target = tmp_path / "out.img"
            assert restore_bytes(capsys, repo, point[:8], key, target) == content, (point, key)
    assert_sparse_where_zero(tmp_path / "out.img", 16 * KIB, expected[-1][1]["sdb"])

    # --onto: rolling an image of point A forward or back to point B gives B's bytes
    for _ in range(8):
        a, b = rng.choice(len(expected), size=2, replace=False)
        (pa, ca), (pb, cb) = expected[a], expected[b]
        image = tmp_path / "rollback.img"
        image.write_bytes(ca["sda"])
        result = cli(capsys, "restore", repo, pb, "--disk", "sda", "--onto", image, "--base", pa)
        assert result.code == 0, result.err
        assert image.read_bytes() == cb["sda"]


def test_unchanged_second_backup_stores_nothing_new(tmp_path, capsys, repo):
    model = DiskModel(tmp_path / "d.img", 3 * MIB, np.random.default_rng(1))
    model.random_changes(10)
    first = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}", "--json")
    second = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}", "--json")
    assert first.code == second.code == 0
    assert first.json()["backup"]["new_chunks"] > 0
    assert second.json()["backup"]["new_chunks"] == 0
    assert second.json()["backup"]["dedup_ratio"] is None, "no ratio when nothing new is stored"
    assert disk_of(second.json()["point"], "d")["read_mode"] == "full"
    assert second.json()["backup"]["bytes_read"] == 3 * MIB
    assert restore_bytes(capsys, repo, "v@latest", "d", tmp_path / "o.img") == model.content
