"""Damaged repositories: verify and scrub find each kind of damage and name the points it
affects; repair and rebuild restore consistency; points the damage does not touch keep
restoring throughout."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import KIB, MIB, DiskModel, cli, disk_of, restore_bytes, write_extents
from repo_engine.repository.index_records import REF_KEY, REF_REC
from repo_engine.repository.packs import pack_object
from repo_engine.repository.repo import Repository

BS = 16 * KIB


@pytest.fixture
def damaged_setup(tmp_path, capsys):
    """VM a and VM b, three points each, random data (no chunk shared between the VMs)."""
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB", "--pack-size", "128KiB").code == 0
    rng = np.random.default_rng(3)
    models, expected = {}, {}
    for vm in ("a", "b"):
        model = models[vm] = DiskModel(tmp_path / f"{vm}.img", 1 * MIB, rng)
        model.write(0, rng.integers(0, 256, MIB, dtype=np.uint8).tobytes())
        for day in range(3):
            args = ["backup", "image", repo, "--vm", vm, "--disk", f"sda={model.path}", "--json"]
            if day:
                offset = (4 + day) * BS
                model.write(offset, rng.integers(0, 256, BS, dtype=np.uint8).tobytes())
                path = write_extents(tmp_path / f"{vm}{day}.json", [[offset, BS]])
                args += ["--changed", f"sda={path}"]
            result = cli(capsys, *args)
            assert result.code == 0, result.err
            expected[result.json()["point"]["id"]] = (vm, model.copy_of_content())
    return repo, models, expected


def points_of(expected, vm):
    return [p for p, (v, _) in expected.items() if v == vm]


def place_of_block(repo_path: Path, point_id: str, block: int) -> tuple[Path, int, int]:
    with Repository.open(repo_path) as repo:
        point = repo.find_point(point_id)
        ref = int(repo.resolve(point, "sda")[block])
        with repo.index.env.begin() as txn:
            _id, number, offset, stored, _raw, _codec = REF_REC.unpack(
                txn.get(REF_KEY.pack(ref), db=repo.index.refs))
        name = repo.index.pack_info(number).name
        return repo.store.path_of(pack_object(name)), offset, stored


def assert_restores(capsys, repo, expected, ids, tmp_path):
    for point in ids:
        got = restore_bytes(capsys, repo, point[:12], "sda", tmp_path / "out.img")
        assert got == expected[point][1], point


def test_flipped_bytes_found_by_scrub_and_healed(damaged_setup, tmp_path, capsys):
    repo, models, expected = damaged_setup
    a_points, b_points = points_of(expected, "a"), points_of(expected, "b")
    pack, offset, stored = place_of_block(repo, a_points[-1], 0)
    with open(pack, "r+b") as f:
        f.seek(offset + stored // 2)
        byte = f.read(1)
        f.seek(offset + stored // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert cli(capsys, "verify", repo).code == 0, "verify reads no chunk data"
    result = cli(capsys, "scrub", repo, "--json")
    assert result.code == 3
    doc = result.json()
    [damaged] = doc["damaged"]
    assert damaged["reason"] == (f"pack {pack.stem} chunk ref {damaged['ref']}: chunk content "
                                 "does not match its id (damaged data)")
    hit = {(a["point"], a["disk"]): a["extents"] for a in doc["affected"]}
    assert set(p for p, _ in hit) == set(a_points), "block 0 is shared by all of a's points"
    assert all(ext == [[0, BS]] for ext in hit.values())
    assert "affects point" in cli(capsys, "scrub", repo).out
    assert_restores(capsys, repo, expected, b_points, tmp_path)

    repair = cli(capsys, "scrub", repo, "--repair", "--json")
    assert repair.code == 3
    assert repair.json()["repair"]["reread_blocks"] == 1
    assert repair.json()["repair"]["points_marked_damaged"] == 3
    shown = cli(capsys, "points", repo, "--json").json()["points"]
    assert all(p["damage"] for p in shown if p["vm"] == "a")
    # the next backup re-reads block 0 although the change list says nothing changed
    empty = write_extents(tmp_path / "none.json", [])
    backup = cli(capsys, "backup", "image", repo, "--vm", "a", "--disk",
                 f"sda={models['a'].path}", "--changed", f"sda={empty}", "--json")
    assert backup.code == 0, backup.err
    assert disk_of(backup.json()["point"], "sda")["counters"]["blocks_read"] == 1
    expected[backup.json()["point"]["id"]] = ("a", models["a"].copy_of_content())
    # that backup healed the damaged chunk: no second repair is needed
    assert any("healed 1 damaged chunk" in n for n in backup.json()["point"]["notes"])
    assert not any(p["damage"] for p in cli(capsys, "points", repo, "--json").json()["points"])
    assert cli(capsys, "scrub", repo).code == 0
    assert cli(capsys, "verify", repo).code == 0
    again = cli(capsys, "scrub", repo, "--repair", "--json")
    assert again.code == 0 and again.json()["repair"]["healed"] == 0
    assert cli(capsys, "verify", repo).code == 0
    assert cli(capsys, "gc", repo, "--max-unused", "0").code == 0
    assert_restores(capsys, repo, expected, list(expected), tmp_path)
    assert cli(capsys, "verify", repo).code == 0


def test_gc_leaves_a_pack_holding_a_damaged_chunk_alone_and_names_it(damaged_setup, tmp_path,
                                                                     capsys):
    """The pack holding VM a's block 0 also held block 5 before day 1 changed it: once the
    first point is forgotten it is partly used, and its repack finds block 0 damaged."""
    repo, _models, expected = damaged_setup
    a_points = points_of(expected, "a")
    pack, offset, stored = place_of_block(repo, a_points[-1], 0)
    assert place_of_block(repo, a_points[0], 5)[0] == pack
    with open(pack, "r+b") as f:
        f.seek(offset + stored // 2)
        byte = f.read(1)
        f.seek(offset + stored // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert cli(capsys, "forget", repo, a_points[0][:12]).code == 0
    result = cli(capsys, "gc", repo, "--max-unused", "0", "--json")
    assert result.code == 0, result.err
    [skipped] = result.json()["damaged_packs_skipped"]
    assert skipped.startswith(f"pack {pack.stem} chunk ref ")
    assert skipped.endswith(": chunk content does not match its id (damaged data)")
    assert pack.exists() and place_of_block(repo, a_points[-1], 0)[0] == pack
    assert_restores(capsys, repo, expected, points_of(expected, "b"), tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_deleted_pack(damaged_setup, tmp_path, capsys, damage):
    repo, models, expected = damaged_setup
    a_points, b_points = points_of(expected, "a"), points_of(expected, "b")
    pack, _, _ = place_of_block(repo, a_points[0], 0)
    if damage == "truncate":
        os.truncate(pack, pack.stat().st_size // 2)
    else:
        pack.unlink()
    result = cli(capsys, "verify", repo, "--json")
    assert result.code == 3
    doc = result.json()
    assert any(pack.stem in e for e in doc["errors"])
    assert set(doc["damaged_points"]) == set(a_points)
    scrubbed = cli(capsys, "scrub", repo, "--json")
    assert scrubbed.code == 3
    assert {a["point"] for a in scrubbed.json()["affected"]} == set(a_points)
    assert_restores(capsys, repo, expected, b_points, tmp_path)

    assert cli(capsys, "scrub", repo, "--repair").code == 3
    empty = write_extents(tmp_path / "none.json", [])
    backup = cli(capsys, "backup", "image", repo, "--vm", "a", "--disk",
                 f"sda={models['a'].path}", "--changed", f"sda={empty}", "--json")
    assert backup.code == 0, backup.err
    expected[backup.json()["point"]["id"]] = ("a", models["a"].copy_of_content())
    cli(capsys, "scrub", repo, "--repair")
    # chunks of a's unchanged blocks healed from the re-read copies; the pack also held
    # first versions of blocks that later points overwrote: the points using those stay damaged
    final = cli(capsys, "scrub", repo, "--json")
    unhealed = {a["point"] for a in final.json()["affected"]}
    assert a_points[-1] not in unhealed
    assert (final.code == 3) == bool(unhealed)
    shown = {p["id"]: p for p in cli(capsys, "points", repo, "--json").json()["points"]}
    assert {p for p in shown if shown[p]["damage"]} == unhealed
    assert cli(capsys, "gc", repo, "--max-unused", "0").code == 0
    assert cli(capsys, "verify", repo).code == (3 if unhealed else 0)
    assert_restores(capsys, repo, expected, [p for p in expected if p not in unhealed], tmp_path)


def test_points_that_cannot_heal_are_marked_not_deleted(damaged_setup, tmp_path, capsys):
    repo, models, expected = damaged_setup
    a_points = points_of(expected, "a")
    # block 5 was overwritten by a's second point: its first content exists only in point 1
    pack, offset, stored = place_of_block(repo, a_points[0], 5)
    with open(pack, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * 16)
    assert cli(capsys, "scrub", repo, "--repair").code == 3
    backup = cli(capsys, "backup", "image", repo, "--vm", "a", "--disk",
                 f"sda={models['a'].path}", "--json")
    assert backup.code == 0
    result = cli(capsys, "scrub", repo, "--repair", "--json")
    assert result.code == 3
    assert {a["point"] for a in result.json()["affected"]} == {a_points[0]}
    shown = {p["id"]: p for p in cli(capsys, "points", repo, "--json").json()["points"]}
    assert shown[a_points[0]]["damage"] and "disk sda" in shown[a_points[0]]["damage"][0]
    assert not shown[a_points[1]]["damage"]
    assert_restores(capsys, repo, expected, a_points[1:], tmp_path)


def test_deleted_index_is_rebuilt(damaged_setup, tmp_path, capsys):
    repo, _models, expected = damaged_setup
    shutil.rmtree(repo / "index")
    result = cli(capsys, "verify", repo)
    assert result.code == 3 and "rebuild-index" in result.err
    rebuilt = cli(capsys, "rebuild-index", repo, "--json")
    assert rebuilt.code == 0, rebuilt.err
    assert rebuilt.json()["points"] == 6
    assert cli(capsys, "verify", repo).code == 0
    assert_restores(capsys, repo, expected, list(expected), tmp_path)
    full = cli(capsys, "gc", repo, "--full", "--json").json()
    assert full["recount"] == {"under_counted": 0, "over_counted": 0}
    assert full["chunks_dropped"] == 0


def test_corrupt_manifest(damaged_setup, tmp_path, capsys):
    repo, _models, expected = damaged_setup
    victim = points_of(expected, "b")[1]
    manifest = repo / "points" / f"{victim}.point"
    data = bytearray(manifest.read_bytes())
    data[40] ^= 0x55
    manifest.write_bytes(bytes(data))
    result = cli(capsys, "verify", repo, "--json")
    assert result.code == 3
    assert result.json()["damaged_points"] == [victim]
    assert any(victim in e for e in result.json()["errors"])
    assert_restores(capsys, repo, expected, list(expected), tmp_path)
    repaired = cli(capsys, "verify", repo, "--repair", "--json")
    assert repaired.code == 0, repaired.json()["errors"]
    assert repaired.json()["manifests_rewritten"] == [victim]
    shown = cli(capsys, "show", repo, victim[:12], "--json").json()["point"]
    assert any("manifest rebuilt" in n for n in shown["notes"])


def test_unlock_removes_stale_locks_and_refuses_live_ones(tmp_path, capsys):
    from repo_engine.repository.locks import SHARED, RepoLock

    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo).code == 0
    live = RepoLock(repo / "locks", SHARED, "backup test")
    refused = cli(capsys, "unlock", repo)
    assert refused.code == 1 and "live" in refused.err
    assert live.path.exists()
    forced = cli(capsys, "unlock", repo, "--force", "--json")
    assert forced.code == 0 and len(forced.json()["removed"]) == 1
    live.release()
    # a lock of a dead process of this host is stale
    dead = repo / "locks" / "x.lock"
    gone = RepoLock(repo / "locks", SHARED, "gone")
    shutil.copy(gone.path, dead)  # a copy carries no flock: its holder is "dead"
    gone.release()
    assert cli(capsys, "unlock", repo).code == 0
    assert not dead.exists()
