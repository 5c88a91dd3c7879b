"""Index rows of the wrong size (an LMDB value cut short or extended by damage): each command
that parses the table reports damage in one line naming the table and rebuild-index (exit code
3), never an internal error; rebuild-index mends it and every point restores."""

from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, restore_bytes


@pytest.fixture
def repo_with_points(tmp_path, capsys) -> tuple[Path, dict[str, bytes]]:
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB", "--pack-size", "128KiB").code == 0
    model = DiskModel(tmp_path / "a.img", MIB, np.random.default_rng(8))
    expected = {}
    for _ in range(2):
        model.random_changes(10)
        done = cli(capsys, "backup", "image", repo, "--vm", "a", "--disk", f"sda={model.path}",
                   "--json")
        assert done.code == 0, done.err
        expected[done.json()["point"]["id"]] = model.copy_of_content()
    return repo, expected


def _resize_a_row(repo: Path, table: str, change: int) -> None:
    env = lmdb.open(str(repo / "index"), max_dbs=64, map_size=1 << 30)
    with env.begin(write=True) as txn:
        db = env.open_db(table.encode(), txn=txn)
        rows = list(txn.cursor(db=db))
        key, value = rows[len(rows) // 2]
        txn.put(key, value[:change] if change < 0 else value + bytes(change), db=db)
    env.close()


@pytest.mark.parametrize("change", [-1, 3], ids=["cut", "extended"])
@pytest.mark.parametrize("table, size, commands", [
    ("refs", 53, [["verify"], ["scrub"], ["gc", "--full"]]),
    ("packs", 44, [["verify"], ["scrub"], ["gc"], ["restore"]]),
    ("ids", 8, [["verify"]]),
])
def test_a_row_of_the_wrong_size_is_damage(repo_with_points, tmp_path, capsys, table, size,
                                           commands, change):
    repo, expected = repo_with_points
    _resize_a_row(repo, table, change)
    point = next(iter(expected))
    for command in commands:
        args = [command[0], repo, *command[1:]]
        if command == ["restore"]:
            args += [point[:12], "--disk", "sda", "--to", tmp_path / "out.img"]
        result = cli(capsys, *args)
        lines = result.err.strip().splitlines()
        assert result.code == 3, (command, result.err)
        assert len(lines) == 1 and f"the index's {table} table holds a row of " \
            f"{size + change} bytes where {size} belong" in lines[0], (command, result.err)
        assert "run 'repo-engine rebuild-index'" in lines[0]
    assert cli(capsys, "rebuild-index", repo).code == 0
    assert cli(capsys, "verify", repo).code == 0
    for point, content in expected.items():
        assert restore_bytes(capsys, repo, point[:12], "sda", tmp_path / "r.img") == content
