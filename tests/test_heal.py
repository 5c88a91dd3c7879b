"""`scrub --repair`, then one backup, leaves the repository clean: every point that used a damaged
chunk whose content the backup read again restores whole, scrub and verify exit 0, and each
step's output says what happened and what is left to do."""

from __future__ import annotations

import pytest

from helpers import cli, restore_bytes, write_extents
from repo_engine.repository.locks import MAINTENANCE, RepoLock
from test_maint_damage import damaged_setup, place_of_block  # noqa: F401 (a fixture)


@pytest.fixture
def chain(damaged_setup):
    """VM a's disk sda and its three points (block 0 the same in all; block 5 written by the
    second, block 6 by the third), and the bytes of each point."""
    repo, models, expected = damaged_setup
    return repo, models["a"], {p: content for p, (vm, content) in expected.items() if vm == "a"}


def flip_byte(repo, point: str, block: int) -> None:
    pack, offset, stored = place_of_block(repo, point, block)
    with open(pack, "r+b") as f:
        f.seek(offset + stored // 2)
        byte = f.read(1)
        f.seek(offset + stored // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def backup_unchanged(capsys, repo, model, tmp_path):
    """A backup whose change list says nothing changed (only repair re-reads are read)."""
    none = write_extents(tmp_path / "none.json", [])
    return cli(capsys, "backup", "image", repo, "--vm", "a", "--disk", f"sda={model.path}",
               "--changed", f"sda={none}")


def _newest(capsys, repo) -> str:
    return cli(capsys, "points", repo, "--vm", "a", "--json").json()["points"][-1]["id"]


def assert_all_restore(capsys, repo, expected, tmp_path, ids=None):
    for point in ids or expected:
        got = restore_bytes(capsys, repo, point[:12], "sda", tmp_path / "out.img")
        assert got == expected[point], point


def assert_clean(capsys, repo):
    for command in ("scrub", "verify"):
        result = cli(capsys, command, repo)
        assert result.code == 0, result.out + result.err
        assert "damaged" not in result.out, result.out
    assert not any(p["damage"] for p in cli(capsys, "points", repo, "--json").json()["points"])


def test_one_backup_after_repair_heals_every_point(tmp_path, capsys, chain):
    repo, model, expected = chain
    points = list(expected)
    flip_byte(repo, points[0], 0)   # block 0: one chunk shared by every point

    repair = cli(capsys, "scrub", repo, "--repair")
    assert repair.code == 3
    assert "repair: quarantined 1 damaged chunk" in repair.out
    assert "the next backup of VM a disk sda re-reads 1 block" in repair.out
    assert "3 points stay marked damaged until then" in repair.out
    assert "{" not in repair.out, "no Python reprs"
    assert "left 1 damaged chunk used by 3 points" in repair.err

    backup = backup_unchanged(capsys, repo, model, tmp_path)
    assert backup.code == 0, backup.err
    assert "note: healed 1 damaged chunk from good copies; 3 points restore whole again" \
        in backup.out
    expected[_newest(capsys, repo)] = model.copy_of_content()

    assert_clean(capsys, repo)
    assert_all_restore(capsys, repo, expected, tmp_path)
    # the healed place is a pack entry of its own ref: the index rebuilt from packs agrees
    assert cli(capsys, "rebuild-index", repo).code == 0
    assert_clean(capsys, repo)
    assert cli(capsys, "gc", repo, "--max-unused", "0").code == 0
    assert_clean(capsys, repo)
    assert_all_restore(capsys, repo, expected, tmp_path)


def test_content_the_source_no_longer_holds_stays_damaged_and_is_named(tmp_path, capsys, chain):
    """Block 5 of the first point was overwritten by the second: no backup can provide that
    content again. Block 0 heals; the first point stays marked."""
    repo, model, expected = chain
    points = list(expected)
    flip_byte(repo, points[0], 0)
    flip_byte(repo, points[0], 5)
    repair = cli(capsys, "scrub", repo, "--repair", "--json")
    assert repair.code == 3
    assert repair.json()["repair"]["quarantined"] == 2

    backup = backup_unchanged(capsys, repo, model, tmp_path)
    assert backup.code == 0, backup.err
    assert "note: healed 1 damaged chunk from good copies; 3 points restore whole again" \
        not in backup.out, "the first point is not whole"
    assert "note: healed 1 damaged chunk" in backup.out
    assert "1 point stays marked damaged (no backup is due to read their content again): " \
        f"{points[0][:8]}" in backup.out
    expected[_newest(capsys, repo)] = model.copy_of_content()

    scrub = cli(capsys, "scrub", repo, "--json")
    assert scrub.code == 3
    assert {a["point"] for a in scrub.json()["affected"]} == {points[0]}
    assert cli(capsys, "verify", repo).code == 3
    marked = {p["id"] for p in cli(capsys, "points", repo, "--json").json()["points"] if p["damage"]}
    assert marked == {points[0]}
    assert_all_restore(capsys, repo, expected, tmp_path, ids=list(expected)[1:])
    result = cli(capsys, "restore", repo, points[0][:12], "--disk", "sda", "--to",
                 tmp_path / "x.img")
    assert result.code == 3 and "cannot be restored whole" in result.err


def test_heal_waits_for_the_maintenance_lock_and_the_next_backup_does_it(tmp_path, capsys,
                                                                         chain):
    repo, model, expected = chain
    flip_byte(repo, list(expected)[0], 0)
    assert cli(capsys, "scrub", repo, "--repair").code == 3
    with RepoLock(repo / "locks", MAINTENANCE, "gc"):
        backup = backup_unchanged(capsys, repo, model, tmp_path)
    assert backup.code == 0, backup.err
    assert "not healed yet (repository is locked (maintenance) by 'gc'" in backup.out
    assert "the next backup or 'repo-engine scrub --repair' heals them" in backup.out
    assert cli(capsys, "verify", repo).code == 3

    # the next backup reads nothing for the repair, yet heals from the copy stored before
    again = backup_unchanged(capsys, repo, model, tmp_path)
    assert again.code == 0, again.err
    assert "note: healed 1 damaged chunk" in again.out
    for p in cli(capsys, "points", repo, "--vm", "a", "--json").json()["points"][3:]:
        expected[p["id"]] = model.copy_of_content()
    assert_clean(capsys, repo)
    assert_all_restore(capsys, repo, expected, tmp_path)


def test_backup_without_damage_says_nothing_of_repairs(tmp_path, capsys, chain):
    repo, model, _ = chain
    backup = cli(capsys, "backup", "image", repo, "--vm", "a", "--disk", f"sda={model.path}",
                 "--json")
    assert backup.code == 0 and backup.json()["point"]["notes"] == []


def test_a_heal_pack_damaged_and_healed_again_from_the_same_copy_stays_whole_after_gc(
        tmp_path, capsys, chain):
    """A heal's pack is named by its bytes: its copy damaged in turn and healed from the same
    good copy is the same pack again, which gc must not take for a pack left unused."""
    repo, model, expected = chain
    points = list(expected)
    flip_byte(repo, points[0], 0)
    assert cli(capsys, "scrub", repo, "--repair").code == 3
    assert backup_unchanged(capsys, repo, model, tmp_path).code == 0
    expected[_newest(capsys, repo)] = model.copy_of_content()
    flip_byte(repo, points[0], 0)  # the healed copy, in the heal's pack
    repair = cli(capsys, "scrub", repo, "--repair")
    assert "healed 1" in repair.out, repair.out + repair.err
    assert cli(capsys, "gc", repo, "--max-unused", "0").code == 0
    assert_clean(capsys, repo)
    assert_all_restore(capsys, repo, expected, tmp_path)
