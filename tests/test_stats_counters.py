"""Counters damage made wrong: a decrement that would take one below 0 keeps it at 0 (gc
finishes instead of failing), stats shows such a counter as 0 and names it in
`damaged_counters`, and rebuild-index counts them anew."""

from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np

from helpers import MIB, DiskModel, cli
from repo_engine.repository.index import U64


def _set_counter(repo: Path, name: str, value: int) -> None:
    env = lmdb.open(str(repo / "index"), max_dbs=64, map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(name.encode(), U64.pack(value), db=env.open_db(b"meta", txn=txn))
    env.close()


def test_counters_damage_took_below_zero_are_clamped_and_named(tmp_path, capsys):
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB").code == 0
    ids = []
    for vm, seed in (("a", 1), ("b", 2)):
        model = DiskModel(tmp_path / f"{vm}.img", MIB, np.random.default_rng(seed))
        model.random_changes(10)
        done = cli(capsys, "backup", "image", repo, "--vm", vm, "--disk", f"sda={model.path}",
                   "--json")
        assert done.code == 0, done.err
        ids.append(done.json()["point"]["id"])
    sound = cli(capsys, "stats", repo, "--json").json()
    assert sound["damaged_counters"] == []
    _set_counter(repo, "chunks", 1)  # lowered by damage: gc drops more than it holds
    _set_counter(repo, "pack_bytes", (1 << 64) - 5)  # a past decrement below 0, as stored
    assert cli(capsys, "forget", repo, ids[0][:12], "--allow-remove-latest").code == 0
    collected = cli(capsys, "gc", repo, "--json")
    assert collected.code == 0, collected.err
    assert collected.json()["chunks_dropped"] > 1
    stats = cli(capsys, "stats", repo, "--json").json()
    assert stats["chunks"] == 0 and stats["pack_bytes"] == 0
    assert stats["damaged_counters"] == ["chunks", "pack_bytes"]
    text = cli(capsys, "stats", repo)
    assert text.code == 0
    assert "damaged counters (shown at 0 where they went below it): chunks, pack_bytes; " \
        "'repo-engine rebuild-index' counts them anew" in text.out
    assert cli(capsys, "rebuild-index", repo).code == 0
    rebuilt = cli(capsys, "stats", repo, "--json").json()
    assert rebuilt["damaged_counters"] == []
    assert 0 < rebuilt["chunks"] < sound["chunks"] and 0 < rebuilt["pack_bytes"]
