"""rebuild-index removes what an interrupted run of it left: the half-built index with its
spill files, and the index it was replacing."""

from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, restore_bytes


@pytest.mark.parametrize("index_kept", [True, False], ids=["before-swap", "mid-swap"])
def test_rebuild_removes_an_interrupted_rebuilds_leftovers(tmp_path, capsys, index_kept):
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB").code == 0
    model = DiskModel(tmp_path / "a.img", MIB, np.random.default_rng(4))
    model.random_changes(10)
    done = cli(capsys, "backup", "image", repo, "--vm", "a", "--disk", f"sda={model.path}",
               "--json")
    assert done.code == 0, done.err
    dead = 2 ** 22 + 17  # a pid no process has: the interrupted run's
    half = repo / f"index.rebuild-{dead}"
    (half / "spill" / "refs").mkdir(parents=True)
    (half / "spill" / "refs" / "0000000000000000").write_bytes(os.urandom(4096))
    (half / "data.mdb").write_bytes(os.urandom(4096))
    if not index_kept:  # killed between its two renames: no index in place
        os.rename(repo / "index", repo / f"index.old-{dead}")
    rebuilt = cli(capsys, "rebuild-index", repo, "--json")
    assert rebuilt.code == 0, rebuilt.err
    assert sorted(p.name for p in repo.iterdir() if p.name.startswith("index")) == ["index"]
    assert cli(capsys, "verify", repo).code == 0
    point = done.json()["point"]["id"]
    assert restore_bytes(capsys, repo, point[:12], "sda", tmp_path / "r.img") \
        == model.copy_of_content()
