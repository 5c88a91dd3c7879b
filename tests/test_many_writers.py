"""Many hosts write one repository in a bucket at once: three backup processes, each with a cache
of its own (`--cache-dir`, as three hosts would have), back up three VMs in a loop while a fourth
runs forget and gc (grace of a second) in a loop, all real `repo-engine` processes against the
SeaweedFS of tests/s3server.py. Afterwards a host that never saw the repository finds every
catalogued point, each restores byte-identical to the disk it was taken from, and what was
forgotten is gone from the bucket: no pack without a used chunk, no unused chunk in a pack (gc
repacks: `--repack --max-unused 0`), no unused map, no manifest of a forgotten point.

The VMs' disks share their first half (the same bytes on every VM and in every round), so the
hosts deduplicate against each other's chunks and sometimes store the same chunk at the same
moment; the second half is new in every round, so every backup stores packs of its own that
become wholly dead once its point is forgotten."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from helpers import KIB, DiskModel, cli
from s3cli import leftovers, repo_engine, s3_environment

VMS = 3
ROUNDS = 4
HALF = 512 * KIB
GRACE = "1s"


class Writer(threading.Thread):
    """One host backing up its VM ROUNDS times; remembers each point's disk content."""

    def __init__(self, tmp: Path, repo: str, number: int, base: bytes) -> None:
        super().__init__()
        self.repo, self.vm, self.cache = repo, f"vm{number}", tmp / f"host{number}"
        self.model = DiskModel(tmp / f"{self.vm}.img", 2 * HALF, np.random.default_rng(number))
        self.model.write(0, base)
        self.contents: dict[str, bytes] = {}
        self.failures: list[str] = []

    def run(self) -> None:
        for _ in range(ROUNDS):
            fresh = self.model.rng.integers(0, 256, HALF, dtype=np.uint8).tobytes()
            self.model.write(HALF, fresh)
            result = repo_engine("backup", "image", self.repo, "--cache-dir", self.cache,
                                 "--vm", self.vm, "--disk", f"sda={self.model.path}", "--json")
            if result.code:
                self.failures.append(result.err)
                continue
            self.contents[result.json()["point"]["id"]] = self.model.copy_of_content()


def maintain(repo: str, cache: Path, keep: int, failures: list[str]) -> None:
    """One forget by policy, then one gc, as the fourth host."""
    for args in (("forget", repo, "--keep-last", keep),
                 ("gc", repo, "--grace", GRACE, "--repack", "--max-unused", 0)):
        result = repo_engine(*args, "--cache-dir", cache)
        if result.code:
            failures.append(result.err)


def test_three_writers_and_maintenance_on_one_bucket(tmp_path, capsys, monkeypatch, seaweedfs,
                                                     s3_bucket):
    s3_environment(monkeypatch, tmp_path, seaweedfs.endpoint)
    repo = f"s3://{s3_bucket}/repo"
    assert repo_engine("init", repo, "--no-encryption", "--cache-dir",
                       tmp_path / "host0").code == 0
    base = np.random.default_rng(99).integers(0, 256, HALF, dtype=np.uint8).tobytes()
    writers = [Writer(tmp_path, repo, n, base) for n in range(VMS)]
    failures: list[str] = []
    for w in writers:
        w.start()
    while any(w.is_alive() for w in writers):
        maintain(repo, tmp_path / "maintainer", 2, failures)
    for w in writers:
        w.join()
        failures += w.failures
    assert failures == []

    maintain(repo, tmp_path / "maintainer", 1, failures)  # plans what the last forget freed
    assert leftovers(repo, tmp_path / "check").packs  # not deleted within the grace
    # past the grace: sweeps it, and repacks what the sweep left partly used; past the grace
    # again: sweeps the packs that repack emptied
    for _ in range(2):
        time.sleep(1.1)
        maintain(repo, tmp_path / "maintainer", 1, failures)
    assert failures == []

    contents = {pid: data for w in writers for pid, data in w.contents.items()}
    assert len(contents) == VMS * ROUNDS
    fresh = tmp_path / "new-host"
    listed = cli(capsys, "points", repo, "--cache-dir", fresh, "--json")
    assert listed.code == 0, listed.err
    catalogued = [p["id"] for p in listed.json()["points"]]
    assert len(catalogued) == VMS and set(catalogued) <= set(contents)  # keep-last 1 per VM
    for pid in catalogued:
        target = tmp_path / f"{pid}.img"
        result = cli(capsys, "restore", repo, pid, "--disk", "sda", "--to", target,
                     "--cache-dir", fresh)
        assert result.code == 0, result.err
        assert target.read_bytes() == contents[pid], pid
    left = leftovers(repo, tmp_path / "check")
    assert left.packs == [] and left.maps == [] and left.manifests == [], left
    assert left.unused_bytes == 0, left
