"""A backup of an S3 repository stopped (SIGSTOP: a stopped process, a paused VM, a long hang)
after uploading a pack and before any journal entry names it, while gc on another host, with a
cache of its own, waits out its lease and sweeps that pack: resumed, the backup fails with one
line saying it stalled past its lease and stored no point, and a host that never saw the
repository finds only the points stored before, each restoring byte-identical."""

from __future__ import annotations

import os
import signal
import time

import numpy as np

from helpers import MIB, DiskModel, cli
from race import Command
from s3cli import LEASE_SECONDS, assert_one_line_error, repo_engine, s3_environment

STOP_AT = "backup.packs_published"


def disk(tmp_path, name: str, seed: int) -> DiskModel:
    model = DiskModel(tmp_path / f"{name}.img", 2 * MIB, np.random.default_rng(seed))
    model.random_changes(6)
    return model


def test_a_backup_stopped_past_its_lease_while_gc_sweeps_its_pack_stores_no_point(
        seaweedfs, s3_bucket, tmp_path, monkeypatch, capsys):
    s3_environment(monkeypatch, tmp_path, seaweedfs.endpoint)
    repo = f"s3://{s3_bucket}/repo"
    assert repo_engine("init", repo, "--no-encryption", "--cache-dir", tmp_path / "a").code == 0
    model = disk(tmp_path, "vm", 1)
    first = repo_engine("backup", "image", repo, "--vm", "vm", "--disk", f"sda={model.path}",
                        "--cache-dir", tmp_path / "a", "--json")
    assert first.code == 0, first.err
    kept = first.json()["point"]["id"]

    stalled = Command(tmp_path, "backup", "image", repo, "--vm", "other", "--disk",
                      f"sda={disk(tmp_path, 'other', 2).path}", "--cache-dir", tmp_path / "b",
                      pauses=(STOP_AT,))
    assert stalled.reached(STOP_AT)  # a pack in the bucket, no entry naming it
    os.kill(stalled.proc.pid, signal.SIGSTOP)  # its lease is renewed no more
    try:
        sweep = ("gc", repo, "--grace", "0s", "--cache-dir", tmp_path / "c", "--json")
        planned = repo_engine(*sweep)  # plans the pack no cache knows; waits for the lease
        assert planned.code == 0 and planned.json()["orphan_packs_deleted"] == 0, planned.err
        time.sleep(LEASE_SECONDS + 1)  # gc has seen the stopped lease unchanged past its span
        swept = repo_engine(*sweep)
        assert swept.code == 0 and swept.json()["orphan_packs_deleted"] >= 1, swept.err
    finally:
        stalled.release(STOP_AT)
        os.kill(stalled.proc.pid, signal.SIGCONT)
    err = assert_one_line_error(stalled.finish())
    assert err.startswith("repo-engine: error: the backup of 'other' stalled past its lease ("), err
    assert err.rstrip().endswith("no restore point was stored: run the backup again"), err

    fresh = tmp_path / "new-host"
    listed = cli(capsys, "points", repo, "--cache-dir", fresh, "--json")
    assert listed.code == 0, listed.err
    assert [p["id"] for p in listed.json()["points"]] == [kept]
    target = tmp_path / "restored.img"
    restored = cli(capsys, "restore", repo, kept, "--disk", "sda", "--to", target,
                   "--cache-dir", fresh)
    assert restored.code == 0, restored.err
    assert target.read_bytes() == model.copy_of_content()
