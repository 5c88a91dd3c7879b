"""A broken chain (an ancestor's manifest lost and the index rebuilt without it, or its block map
missing or damaged): gc refuses and deletes nothing, restore and verify name the point and the
ancestor (exit code 3), the points the damage does not reach keep restoring, and the VM's next
backup stores a point that owes nothing to the broken chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, restore_bytes, tree_digest, write_extents
from race import Command
from test_maint_damage import damaged_setup, points_of  # noqa: F401 (a fixture)
from repo_engine.repository.blockmap import map_object
from repo_engine.repository.repo import Repository
from repo_engine.repository.store import StoreError
from repo_engine.repository.store.local import LocalStore


def _map_file(repo: Path, point: str) -> Path:
    with Repository.open(repo) as opened:
        name = opened.find_point(point[:12]).disks[0].map
        return opened.store.path_of(map_object(name))


def _lose_manifest(capsys, repo: Path, point: str) -> None:
    """The manifest of `point` deleted, then the index rebuilt: the catalog lacks it."""
    (repo / "points" / f"{point}.point").unlink()
    assert cli(capsys, "rebuild-index", repo).code == 0


def _damage(capsys, repo: Path, point: str, how: str) -> None:
    if how == "manifest lost":
        _lose_manifest(capsys, repo, point)
        return
    path = _map_file(repo, point)
    if how == "map missing":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    # a byte of the magic, of the major version (after the 8-byte magic), or of the body
    data[{"map magic damaged": 0, "map version damaged": 8}.get(how, len(data) // 2)] ^= 0x55
    path.write_bytes(bytes(data))


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repo-engine: error: "), err
    return lines[0]


@pytest.mark.parametrize("full", [False, True], ids=["incremental", "full"])
def test_gc_refuses_a_broken_chain_and_deletes_nothing(damaged_setup, capsys, full):
    """The base's manifest lost and the index rebuilt: its map is counted by no record, so
    the chunks only it holds (most of VM b's) would be collected."""
    repo, _models, expected = damaged_setup
    base, child, _newest = points_of(expected, "b")
    _lose_manifest(capsys, repo, base)
    before = tree_digest(repo / "packs") | tree_digest(repo / "maps")
    result = cli(capsys, "gc", repo, *(["--full"] if full else []))
    assert result.code == 3
    line = _one_line(result.err)
    assert f"at point {child[:8]} is broken: its ancestor {base[:8]} is not in the " \
           "catalog" in line
    assert "gc deletes nothing while a chain is broken" in line
    assert tree_digest(repo / "packs") | tree_digest(repo / "maps") == before
    dry = cli(capsys, "gc", repo, "--dry-run")
    assert dry.code == 3, "a dry run says what gc would do: refuse, not drop b's chunks"
    assert _one_line(dry.err) == line
    forgotten = cli(capsys, "forget", repo, "--prune", points_of(expected, "a")[0][:12])
    assert forgotten.code == 3, "forget --prune collects too: refused the same way"
    assert tree_digest(repo / "packs") | tree_digest(repo / "maps") == before


def test_gc_runs_again_once_the_broken_points_are_forgotten(damaged_setup, tmp_path, capsys):
    repo, _models, expected = damaged_setup
    base, child, newest = points_of(expected, "b")
    _lose_manifest(capsys, repo, base)
    assert cli(capsys, "forget", repo, child[:12], newest[:12]).code == 0
    done = cli(capsys, "gc", repo, "--json")
    assert done.code == 0, done.err
    assert done.json()["chunks_dropped"] > 0  # b's chunks: no point uses them now
    assert cli(capsys, "verify", repo).code == 0
    for point in points_of(expected, "a"):
        assert restore_bytes(capsys, repo, point[:12], "sda", tmp_path / "r.img") \
            == expected[point][1]


@pytest.mark.parametrize("how", ["manifest lost", "map missing", "map damaged"])
def test_restore_names_the_point_and_the_broken_ancestor(damaged_setup, tmp_path, capsys, how):
    repo, _models, expected = damaged_setup
    base, child, newest = points_of(expected, "b")
    _damage(capsys, repo, base, how)
    target = tmp_path / "out.img"
    for point in (child, newest):
        result = cli(capsys, "restore", repo, point[:12], "--disk", "sda", "--to", target)
        assert result.code == 3, result.err
        line = _one_line(result.err)
        assert f"the chain of disk 'sda' at point {point[:8]} is broken: its ancestor " \
               f"{base[:8]} " in line
        assert f"restore a point older than {base[:8]} or on another chain" in line
        assert not target.exists()
    for point in points_of(expected, "a"):
        assert restore_bytes(capsys, repo, point[:12], "sda", target) == expected[point][1]


def test_verify_names_the_points_whose_ancestor_is_not_catalogued(damaged_setup, capsys):
    repo, _models, expected = damaged_setup
    base, child, newest = points_of(expected, "b")
    _lose_manifest(capsys, repo, base)
    result = cli(capsys, "verify", repo, "--json")
    assert result.code == 3
    report = result.json()
    assert report["damaged_points"] == sorted([child, newest])
    assert any(f"at point {newest[:8]} is broken: its ancestor {base[:8]} is not in the "
               "catalog" in e for e in report["errors"])
    text = cli(capsys, "verify", repo)
    assert _one_line(text.err).endswith(
        "affected points: " + ", ".join(sorted(p[:8] for p in (child, newest))))


@pytest.mark.parametrize("recount", [["rebuild-index"], ["verify", "--repair"]])
def test_a_recount_meeting_a_damaged_map_queues_nothing_for_gc(damaged_setup, tmp_path, capsys,
                                                                recount):
    """The recount cannot tell which chunks the damaged map holds: it counts them 0, yet must
    not queue them, or the next gc deletes what a fixed map would need."""
    repo, _models, expected = damaged_setup
    base = points_of(expected, "b")[0]
    _damage(capsys, repo, base, "map damaged")
    cli(capsys, recount[0], repo, *recount[1:])
    before = tree_digest(repo / "packs")
    done = cli(capsys, "gc", repo, "--json")
    assert done.code == 0, done.err
    assert done.json()["chunks_dropped"] == 0
    assert tree_digest(repo / "packs") == before
    for point in points_of(expected, "a"):
        assert restore_bytes(capsys, repo, point[:12], "sda", tmp_path / "r.img") \
            == expected[point][1]


@pytest.mark.parametrize("how", ["manifest lost", "map missing", "map damaged",
                                 "map magic damaged", "map version damaged"])
def test_a_backup_onto_a_broken_chain_stores_a_full_map(damaged_setup, tmp_path, capsys, how):
    """The VM's newest point's chain lost its base, or the base's map cannot be read: found
    while the backup plans, before it reads the disk, which it then reads as a first one would
    and stores as a full map owing nothing to the broken chain."""
    repo, models, expected = damaged_setup
    base, child, newest = points_of(expected, "b")
    _damage(capsys, repo, base, how)
    models["b"].random_changes(2)
    done = cli(capsys, "backup", "image", repo, "--vm", "b", "--disk",
               f"sda={models['b'].path}", "--json")
    assert done.code == 0, done.err
    disk = done.json()["point"]["disks"][0]
    assert disk["kind"] == "full" and disk["parent"] is None and disk["read_mode"] == "allocated"
    cause = "is not in the catalog" if how == "manifest lost" else \
        "has a block map that cannot be read"
    assert f"the chain of point {newest[:8]} is broken: point {base[:8]} {cause}" in disk["note"]
    assert disk["note"].endswith("the disk was read as on a first backup and stored as a full map")
    point = done.json()["point"]["id"]
    target = tmp_path / "r.img"
    assert restore_bytes(capsys, repo, point[:12], "sda", target) == models["b"].content
    broken = [child, newest] if how == "manifest lost" else [base, child, newest]
    assert cli(capsys, "verify", repo, "--json").json()["damaged_points"] == sorted(broken)
    assert cli(capsys, "forget", repo, *(p[:12] for p in broken)).code == 0
    collected = cli(capsys, "gc", repo, "--json")
    assert collected.code == 0, collected.err
    assert collected.json()["chunks_dropped"] > 0  # what only the forgotten points held
    assert cli(capsys, "verify", repo).code == 0
    assert restore_bytes(capsys, repo, point[:12], "sda", target) == models["b"].content
    for other in points_of(expected, "a"):
        assert restore_bytes(capsys, repo, other[:12], "sda", target) == expected[other][1]


def test_forget_prune_of_the_broken_points_themselves_runs(damaged_setup, tmp_path, capsys):
    """What gc's refusal advises, in one command: once the points it names are forgotten no
    chain is broken, so their forget --prune is not refused."""
    repo, _models, expected = damaged_setup
    base, child, newest = points_of(expected, "b")
    _lose_manifest(capsys, repo, base)
    done = cli(capsys, "forget", repo, "--prune", child[:12], newest[:12], "--json")
    assert done.code == 0, done.err
    assert cli(capsys, "verify", repo).code == 0
    assert {p["id"] for p in cli(capsys, "points", repo, "--json").json()["points"]} \
        == set(points_of(expected, "a"))
    for point in points_of(expected, "a"):
        assert restore_bytes(capsys, repo, point[:12], "sda", tmp_path / "r.img") \
            == expected[point][1]


def test_forget_prune_is_refused_while_a_point_it_keeps_stays_broken(damaged_setup, capsys):
    repo, _models, expected = damaged_setup
    base, child, newest = points_of(expected, "b")
    _lose_manifest(capsys, repo, base)
    before = tree_digest(repo / "packs") | tree_digest(repo / "maps")
    refused = cli(capsys, "forget", repo, "--prune", newest[:12])
    assert refused.code == 3
    assert f"at point {child[:8]} is broken" in _one_line(refused.err)
    assert tree_digest(repo / "packs") | tree_digest(repo / "maps") == before
    assert {p["id"] for p in cli(capsys, "points", repo, "--json").json()["points"]} \
        == set(expected) - {base}


def test_a_forget_that_cannot_rewrite_a_broken_child_leaves_no_mark(damaged_setup, tmp_path,
                                                                    capsys):
    """Forgetting the point a broken chain runs through, its child kept: the child cannot be
    rewritten. The forget fails (exit 3) saying what to forget instead, and leaves nothing
    marked, or every later forget, of any VM, would fail the same way."""
    repo, _models, expected = damaged_setup
    base, child, newest = points_of(expected, "b")
    _lose_manifest(capsys, repo, base)
    refused = cli(capsys, "forget", repo, child[:12])
    assert refused.code == 3
    line = _one_line(refused.err)
    assert f"its ancestor {base[:8]} is not in the catalog" in line
    assert "forget the points built on them too" in line
    assert {p["id"] for p in cli(capsys, "points", repo, "--json").json()["points"]} \
        == set(expected) - {base}
    a_first = points_of(expected, "a")[0]
    assert cli(capsys, "forget", repo, a_first[:12]).code == 0
    assert {p["id"] for p in cli(capsys, "points", repo, "--json").json()["points"]} \
        == set(expected) - {base, a_first}
    assert cli(capsys, "forget", repo, child[:12], newest[:12]).code == 0
    assert cli(capsys, "gc", repo).code == 0
    assert cli(capsys, "verify", repo).code == 0
    for point in points_of(expected, "a")[1:]:
        assert restore_bytes(capsys, repo, point[:12], "sda", tmp_path / "r.img") \
            == expected[point][1]


def test_a_map_damaged_while_a_backup_runs_fails_it_and_the_next_backup_runs(
        damaged_setup, tmp_path, capsys):
    """The chain was whole when the backup planned; before its commit the parent is forgotten
    (the new map must become a full one, built on the parent's chain) and the base's map
    damaged. Nothing is stored, the line says to back up again; done, that backup finds the
    damage while it plans and stores a full map."""
    repo, models, expected = damaged_setup
    base, _child, newest = points_of(expected, "b")
    models["b"].random_changes(2)
    backup = ["backup", "image", repo, "--vm", "b", "--disk", f"sda={models['b'].path}",
              "--json"]
    running = Command(tmp_path, *backup, pauses=("backup.before_commit",))
    assert running.reached("backup.before_commit")
    assert cli(capsys, "forget", repo, newest[:12]).code == 0
    _damage(capsys, repo, base, "map damaged")
    running.release("backup.before_commit")
    refused = running.finish()
    assert refused.code == 3
    line = _one_line(refused.err)
    assert f"its ancestor {base[:8]} has a block map that cannot be read" in line
    assert "no restore point was stored: the map was damaged while the backup ran; run the " \
           "backup again" in line
    assert {p["id"] for p in cli(capsys, "points", repo, "--json").json()["points"]} \
        == set(expected) - {newest}
    done = cli(capsys, *backup)
    assert done.code == 0, done.err
    disk = done.json()["point"]["disks"][0]
    assert disk["kind"] == "full" and f"point {base[:8]} has a block map" in disk["note"]
    assert restore_bytes(capsys, repo, done.json()["point"]["id"][:12], "sda",
                         tmp_path / "r.img") == models["b"].content


def test_a_backup_ending_a_chain_of_max_length_on_an_unreadable_map(tmp_path, capsys):
    """The chain is as long as --max-chain allows, so the new map is a full one built on the
    parent's content: its base's map found damaged while planning, the disk is read as on a
    first backup instead of the parent's content being copied from the chain."""
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB", "--max-chain", "2").code == 0
    model = DiskModel(tmp_path / "c.img", MIB, np.random.default_rng(5))
    model.random_changes(4)
    backup = ["backup", "image", repo, "--vm", "c", "--disk", f"sda={model.path}", "--json"]
    points = []
    for _ in range(2):
        done = cli(capsys, *backup, "--changed",
                   f"sda={write_extents(tmp_path / 'c.json', model.random_changes(2))}")
        assert done.code == 0, done.err
        points.append(done.json()["point"]["id"])
    _damage(capsys, repo, points[0], "map damaged")
    model.random_changes(2)
    done = cli(capsys, *backup)
    assert done.code == 0, done.err
    disk = done.json()["point"]["disks"][0]
    assert disk["kind"] == "full" and disk["read_mode"] == "allocated"
    assert f"the chain of point {points[1][:8]} is broken: point {points[0][:8]} has a block " \
           "map that cannot be read" in disk["note"]
    assert restore_bytes(capsys, repo, done.json()["point"]["id"][:12], "sda",
                         tmp_path / "r.img") == model.content


def test_a_store_failing_a_map_read_fails_the_backup_and_breaks_no_chain(tmp_path, capsys,
                                                                         monkeypatch):
    """A map read the store fails (what S3 answering 503 to the end of the retries becomes) is
    no damage: the backup fails storing nothing, instead of reading the disk as a first backup
    and storing a full map, and the next one is a delta on the same chain."""
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB").code == 0
    model = DiskModel(tmp_path / "d.img", MIB, np.random.default_rng(6))
    model.random_changes(4)
    backup = ["backup", "image", repo, "--vm", "d", "--disk", f"sda={model.path}", "--json"]
    first = cli(capsys, *backup)
    assert first.code == 0, first.err
    model.random_changes(2)
    get_start = LocalStore.get_start

    def failing(store: LocalStore, name: str, length: int) -> tuple[bytes, int]:
        if name.startswith("maps/"):
            raise StoreError(f"{store.location}: get {name}: the server kept failing (SlowDown)")
        return get_start(store, name, length)
    with monkeypatch.context() as patch:
        patch.setattr(LocalStore, "get_start", failing)
        refused = cli(capsys, *backup)
    assert refused.code == 1
    assert "the server kept failing (SlowDown); no restore point was stored" \
        in _one_line(refused.err)
    assert len(cli(capsys, "points", repo, "--json").json()["points"]) == 1
    done = cli(capsys, *backup)
    assert done.code == 0, done.err
    disk = done.json()["point"]["disks"][0]
    assert (disk["kind"], disk["parent"]) == ("delta", first.json()["point"]["id"])
    assert "broken" not in disk["note"]
    assert restore_bytes(capsys, repo, done.json()["point"]["id"][:12], "sda",
                         tmp_path / "r.img") == model.content
