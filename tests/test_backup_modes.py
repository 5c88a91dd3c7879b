"""Capacity changes, the audit of change lists, several disks, tags and the inspection commands."""

from __future__ import annotations

import os

import numpy as np

from helpers import KIB, MIB, DiskModel, cli, disk_of, restore_bytes, write_extents


def _init(capsys, repo, *extra):
    assert cli(capsys, "init", repo, "--block-size", "16KiB", *extra).code == 0


def _backup(capsys, repo, *args):
    result = cli(capsys, "backup", "image", repo, "--vm", "v", "--json", *args)
    assert result.code == 0, result.err
    return result.json()["point"]


def test_grown_and_shrunk_disk_get_correct_maps(tmp_path, capsys):
    repo = tmp_path / "repo"
    _init(capsys, repo)
    rng = np.random.default_rng(2)
    model = DiskModel(tmp_path / "d.img", 1 * MIB + 1000, rng)
    model.random_changes(4, max_len=100 * KIB)
    _backup(capsys, repo, "--disk", f"d={model.path}")
    for capacity in (3 * MIB + 7, 2 * MIB, 2 * MIB + 12345, 512 * KIB):
        old = len(model.content)
        with open(model.path, "r+b") as f:
            f.truncate(capacity)
        model.capacity = capacity
        model.content = model.content[:capacity] + bytearray(max(0, capacity - old))
        extents = []
        if capacity > old:  # write into the grown tail without listing it: the tail is read anyway
            model.write(capacity - 5000, b"tail" * 1000)
        else:
            extents = model.random_changes(1, max_len=capacity // 4)
        summary = _backup(capsys, repo, "--disk", f"d={model.path}",
                          "--changed", f"d={write_extents(tmp_path / 'e.json', extents)}")
        assert "capacity changed" in disk_of(summary, "d")["note"]
        out = restore_bytes(capsys, repo, summary["id"], "d", tmp_path / "o.img")
        assert len(out) == capacity
        assert out == model.content


def test_audit_catches_a_wrong_change_list(tmp_path, capsys):
    repo = tmp_path / "repo"
    _init(capsys, repo)
    model = DiskModel(tmp_path / "d.img", 4 * MIB, np.random.default_rng(4))
    model.write(0, os.urandom(4 * MIB))
    _backup(capsys, repo, "--disk", f"d={model.path}")
    empty = write_extents(tmp_path / "none.json", [])
    clean = _backup(capsys, repo, "--disk", f"d={model.path}", "--changed", f"d={empty}",
                    "--audit", "50")
    assert disk_of(clean, "d")["counters"]["audit_blocks"] == 128
    assert disk_of(clean, "d")["counters"]["audit_mismatches"] == 0
    assert disk_of(clean, "d")["read_mode"] == "changed"
    # change every block behind the change list's back: any sample must see it
    model.write(0, os.urandom(4 * MIB))
    caught = _backup(capsys, repo, "--disk", f"d={model.path}", "--changed", f"d={empty}",
                     "--audit", "5")
    d = disk_of(caught, "d")
    assert d["counters"]["audit_mismatches"] == d["counters"]["audit_blocks"] > 0
    assert d["read_mode"] == "full" and "audit found" in d["note"]
    assert restore_bytes(capsys, repo, caught["id"], "d", tmp_path / "o.img") == model.content


def test_several_disks_tags_show_diff_stats(tmp_path, capsys):
    repo = tmp_path / "repo"
    _init(capsys, repo)
    rng = np.random.default_rng(8)
    a = DiskModel(tmp_path / "a.img", 2 * MIB, rng)
    b = DiskModel(tmp_path / "b.img", 1 * MIB, rng)
    a.write(0, b"same" * 8192)
    b.write(0, b"same" * 8192)  # identical blocks across disks are stored once
    first = _backup(capsys, repo, "--disk", f"a={a.path}", "--disk", f"b={b.path}", "--tag", "x")
    assert first["counters"]["new_chunks"] == 1
    a.write(5 * 16 * KIB + 10, b"changed")
    second = _backup(capsys, repo, "--disk", f"a={a.path}", "--disk", f"b={b.path}",
                     "--changed", f"a={write_extents(tmp_path / 'e.json', [[5 * 16 * KIB + 10, 7]])}")
    assert disk_of(second, "a")["counters"]["blocks_read"] == 1
    assert disk_of(second, "a")["read_mode"] == "changed"
    assert disk_of(second, "b")["read_mode"] == "full"

    shown = cli(capsys, "show", repo, first["id"][:6], "--json").json()["point"]
    assert shown["tags"] == ["x"] and [d["key"] for d in shown["disks"]] == ["a", "b"]
    text = cli(capsys, "show", repo, "v@latest").out
    assert "disk a:" in text and "delta on " + first["id"][:8] in text

    diff = {d["disk"]: d for d in cli(capsys, "diff", repo, first["id"], second["id"],
                                      "--json").json()["disks"]}
    assert diff["a"]["extents"] == [[5 * 16 * KIB, 16 * KIB]]
    assert diff["b"]["changed_blocks"] == 0

    stats = cli(capsys, "stats", repo, "--json").json()
    assert stats["points"] == 2 and stats["chunks"] == 2
    assert stats["logical_bytes"] == (2 + 2 + 3 + 2) * 16 * KIB  # non-zero blocks per point
    assert stats["dedup_ratio"] == round(stats["logical_bytes"] / stats["unique_raw_bytes"], 3)
    listing = cli(capsys, "points", repo, "--vm", "v", "--json").json()["points"]
    assert [p["id"] for p in listing] == [first["id"], second["id"]]
    assert cli(capsys, "points", repo, "--vm", "other", "--json").json()["points"] == []
