"""Many restore points: the commands a user runs every day read what they need, not every point.

A repository of a few hundred points (real backups of tiny disks, the clock set so the points
spread over a year and a half) is asked for `points`, `show`, `forget --dry-run` with a GFS
policy, and a backup that finds its parent, while the store's reads (manifests, block maps) and
the catalog records decoded are counted; each answer is compared with one computed the
straightforward way. The retention decision on 10,000 synthetic times is compared with a
reference written here from the documented rules, and a forget that removes most points (runs
of them, full bases among them) leaves every other point restoring its own bytes.
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from helpers import cli, write_extents
from repo_engine.backup import job
from repo_engine.backup.job import BackupOptions, backup_vm
from repo_engine.maintenance.forget import forget_points
from repo_engine.maintenance.retention import (BUCKETS, NEWEST, PointInfo, Policy, Within,
                                               apply_policy, parse_time)
from repo_engine.repository.index import Index
from repo_engine.repository.repo import Repository
from repo_engine.repository.store.local import LocalStore
from repo_engine.sources.image import ImageDisk, image_snapshot

BS = 16 * 1024
BLOCKS = 4
VMS = 3
PER_VM = 100
GFS = ["--keep-daily", "7", "--keep-weekly", "4", "--keep-monthly", "12", "--keep-yearly", "5"]
START = datetime(2025, 1, 1, 2, 0, tzinfo=timezone.utc)


class Fleet:
    """VMs with one tiny disk each, backed up in rounds; `content[point id]` is the disk's bytes
    at that point."""

    def __init__(self, root: Path, vms: int, **settings: int) -> None:
        self.root, self.rng = root, np.random.default_rng(7)
        self.repo_path = root / "repo"
        Repository.init(self.repo_path, block_size=BS, **settings).close()
        self.images = {f"vm{v}": root / f"vm{v}.img" for v in range(vms)}
        for image in self.images.values():
            image.write_bytes(self._random(BLOCKS * BS))
        self.content: dict[str, bytes] = {}
        self.ids: dict[str, list[str]] = {vm: [] for vm in self.images}

    def _random(self, size: int) -> bytes:
        return self.rng.integers(0, 256, size, dtype=np.uint8).tobytes()

    def backup(self, repo: Repository, vm: str, when: datetime) -> str:
        """Change one block of `vm`'s disk, then back it up at `when`, the change listed."""
        block = len(self.ids[vm]) % BLOCKS
        with open(self.images[vm], "r+b") as f:
            f.seek(block * BS)
            f.write(self._random(BS))
        changed = write_extents(self.root / f"{vm}.json", [[block * BS, BS]])
        stamp = when.isoformat(timespec="microseconds").replace("+00:00", "Z")
        clock = job.now_iso
        job.now_iso = lambda: stamp
        try:
            snapshot = image_snapshot(vm, [ImageDisk("sda", self.images[vm], changed)])
            point = backup_vm(repo, snapshot, BackupOptions())
        finally:
            job.now_iso = clock
        self.ids[vm].append(point.id)
        self.content[point.id] = self.images[vm].read_bytes()
        return point.id

    def rounds(self, count: int, step: timedelta) -> None:
        with Repository.open(self.repo_path) as repo:
            for n in range(count):
                for v, vm in enumerate(self.images):
                    self.backup(repo, vm, START + n * step + timedelta(minutes=v))

    def restores(self, capsys, point: str) -> bool:
        target = self.root / "out.img"
        target.unlink(missing_ok=True)
        result = cli(capsys, "restore", self.repo_path, point, "--disk", "sda", "--to", target)
        assert result.code == 0, result.err
        return target.read_bytes() == self.content[point]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Fleet:
    """300 points: 3 VMs backed up every ~5.5 days for a year and a half."""
    built = Fleet(tmp_path_factory.mktemp("fleet"), VMS)
    built.rounds(PER_VM, timedelta(days=548) / PER_VM)
    return built


@contextmanager
def counted(monkeypatch) -> Iterator[Counter]:
    """Count the store's reads by area (`points/`: manifests, `maps/`: block maps, `packs/`),
    its listings by prefix, and the catalog records decoded."""
    reads: Counter = Counter()
    get, get_range, get_start, listing, record = (
        LocalStore.get, LocalStore.get_range, LocalStore.get_start, LocalStore.list, Index.record)

    def counting_get(self, name, **kw):
        reads[name.split("/")[0]] += 1
        return get(self, name, **kw)

    def counting_range(self, name, *args):
        reads[name.split("/")[0]] += 1
        return get_range(self, name, *args)

    def counting_start(self, name, *args):
        reads[name.split("/")[0]] += 1
        return get_start(self, name, *args)

    def counting_list(self, prefix, *args):
        reads["list " + prefix] += 1
        return listing(self, prefix, *args)

    def counting_record(self, key, raw):
        reads["record"] += 1
        return record(self, key, raw)

    with monkeypatch.context() as m:
        m.setattr(LocalStore, "get", counting_get)
        m.setattr(LocalStore, "get_range", counting_range)
        m.setattr(LocalStore, "get_start", counting_start)
        m.setattr(LocalStore, "list", counting_list)
        m.setattr(Index, "record", counting_record)
        yield reads


def reads_of(reads: Counter, *areas: str) -> dict[str, int]:
    return {area: reads[area] for area in areas}


def all_points(fleet: Fleet) -> list[dict]:
    with Repository.open(fleet.repo_path) as repo:
        return [{"id": p.id, "vm": p.vm, "time": p.time} for p in repo.points()]


# -- what each command reads --------------------------------------------------------------------
def test_points_lists_every_point_from_the_catalog_alone(fleet, capsys, monkeypatch) -> None:
    with counted(monkeypatch) as reads:
        listed = cli(capsys, "points", fleet.repo_path, "--json")
    assert listed.code == 0, listed.err
    assert [p["id"] for p in listed.json()["points"]] == [p["id"] for p in all_points(fleet)]
    assert sorted(p["id"] for p in listed.json()["points"]) == sorted(fleet.content)
    assert reads_of(reads, "points", "maps", "list points/") == {"points": 0, "maps": 0,
                                                                  "list points/": 0}
    assert reads["record"] == VMS * PER_VM   # each record once
    with counted(monkeypatch) as reads:
        text = cli(capsys, "points", fleet.repo_path, "--vm", "vm1")
    assert text.code == 0 and text.out.count("vm1@") == PER_VM, text.err
    assert reads_of(reads, "points", "maps", "record") == {"points": 0, "maps": 0,
                                                            "record": PER_VM}


@pytest.mark.parametrize("how", ["latest", "id", "time"])
def test_show_reads_one_manifest_and_its_own_records(fleet, capsys, monkeypatch, how) -> None:
    """`show` reads the one manifest it shows (for the VM configuration), and of the catalog
    only the records its address can name: its VM's, or those of its id prefix."""
    vm, index = "vm2", {"latest": -1, "id": 40, "time": 60}[how]
    point = fleet.ids[vm][index]
    records = all_points(fleet)
    when = next(p["time"] for p in records if p["id"] == point)
    ref = {"latest": f"{vm}@latest", "id": point[:8], "time": f"{vm}@{when[:16]}"}[how]
    with counted(monkeypatch) as reads:
        shown = cli(capsys, "show", fleet.repo_path, ref, "--json")
    assert shown.code == 0, shown.err
    assert shown.json()["point"]["id"] == point
    assert reads_of(reads, "points", "maps", "list points/") == {"points": 1, "maps": 0,
                                                                  "list points/": 0}
    same_prefix = sum(p["id"].startswith(point[:8]) for p in records)
    assert reads["record"] == (same_prefix if how == "id" else PER_VM)


def test_an_unknown_point_is_not_found_and_damage_still_is(fleet, capsys, monkeypatch) -> None:
    """No id has the prefix: the answer is 'not found' (every record read first, so a damaged
    catalog would be reported as damage instead)."""
    taken = {p["id"][:4] for p in all_points(fleet)}
    prefix = next(f"{n:04x}" for n in range(1 << 16) if f"{n:04x}" not in taken)
    with counted(monkeypatch) as reads:
        missing = cli(capsys, "show", fleet.repo_path, prefix)
    assert missing.code == 1
    assert missing.err == (f"repo-engine: error: no restore point matches {prefix!r} "
                           "(see 'repo-engine points')\n")
    assert reads["record"] == VMS * PER_VM and reads["points"] == 0


def test_forget_dry_run_decides_from_the_catalog(fleet, capsys, monkeypatch) -> None:
    with counted(monkeypatch) as reads:
        dry = cli(capsys, "forget", fleet.repo_path, *GFS, "--dry-run", "--json")
    assert dry.code == 0, dry.err
    assert reads_of(reads, "points", "maps", "list points/") == {"points": 0, "maps": 0,
                                                                  "list points/": 0}
    decided = {d["id"]: d["keep"] for d in dry.json()["decisions"]}
    records = all_points(fleet)
    policy = Policy(daily=7, weekly=4, monthly=12, yearly=5)
    expected = reference_policy([PointInfo(p["id"], p["vm"], parse_time(p["time"]), ("sda",))
                                 for p in records], policy)
    assert decided == expected
    assert 0 < sum(decided.values()) < len(records) // 2


def test_a_backup_reads_its_parent_chain_and_its_vm_records_only(fleet, capsys,
                                                                monkeypatch) -> None:
    """The parent is the VM's latest point, found among the VM's records; the backup reads the
    maps of the parent's chain (to resolve it) and no manifest."""
    with Repository.open(fleet.repo_path) as repo:
        parent = repo.points("vm0")[-1]
        chain = parent.disks[0].links
    vm_points = len(fleet.ids["vm0"])
    with counted(monkeypatch) as reads, Repository.open(fleet.repo_path) as repo:
        point = fleet.backup(repo, "vm0", START + timedelta(days=600))
    with Repository.open(fleet.repo_path) as repo:
        made = repo.points("vm0")[-1]
    assert made.id == point and made.disks[0].parent == parent.id
    assert made.disks[0].kind == "delta" and made.disks[0].links == chain + 1
    assert reads_of(reads, "points", "list points/") == {"points": 0, "list points/": 0}
    assert reads["maps"] == chain
    # the parent's chain and the commit: a few passes over the VM's records, none over the others
    assert reads["record"] <= 2 * vm_points + chain + 2
    assert fleet.restores(capsys, point)


def test_forget_of_one_point_reads_its_vm_records_only(fleet, tmp_path, capsys,
                                                       monkeypatch) -> None:
    """Forgetting a VM's oldest point (a full base: its child becomes a full map) decodes the
    records of that VM (twice: to rewrite the child, to remove the point), none of the other
    VMs'; the VM's points left restore."""
    copy = Fleet.__new__(Fleet)
    copy.__dict__.update(fleet.__dict__)
    copy.root, copy.repo_path = tmp_path, tmp_path / "repo"
    shutil.copytree(fleet.repo_path, copy.repo_path)
    oldest, vm_points = copy.ids["vm1"][0], len(copy.ids["vm1"])
    with counted(monkeypatch) as reads, Repository.open(copy.repo_path) as repo:
        report = forget_points(repo, [oldest])
    assert report.removed == [oldest] and len(report.rewritten) == 1
    assert 0 < reads["record"] <= 2 * vm_points + 10
    left = [p["id"] for p in all_points(copy) if p["vm"] == "vm1"]
    assert oldest not in left and len(left) == vm_points - 1
    assert all(copy.restores(capsys, point) for point in left[:3])


# -- forget removing most points ----------------------------------------------------------------
def test_gfs_forget_keeps_what_the_dry_run_said_and_every_kept_point_restores(
        fleet, tmp_path, capsys) -> None:
    copy = Fleet.__new__(Fleet)
    copy.__dict__.update(fleet.__dict__)
    copy.root = tmp_path
    copy.repo_path = tmp_path / "repo"
    shutil.copytree(fleet.repo_path, copy.repo_path)
    dry = cli(capsys, "forget", copy.repo_path, *GFS, "--dry-run", "--json")
    kept = sorted(d["id"] for d in dry.json()["decisions"] if d["keep"])
    done = cli(capsys, "forget", copy.repo_path, *GFS, "--prune", "--json")
    assert done.code == 0, done.err
    assert sorted(p["id"] for p in all_points(copy)) == kept
    assert all(copy.restores(capsys, point) for point in kept)
    assert cli(capsys, "verify", copy.repo_path).code == 0


@pytest.mark.parametrize("pattern", ["runs", "bases", "all-but-newest", "random"])
def test_forget_of_many_points_leaves_the_others_restoring(tmp_path, capsys, pattern) -> None:
    """Removed points in runs, full bases (max chain 4) among them, whole chains but one point:
    each other point keeps its bytes, rewritten onto its nearest kept ancestor."""
    fleet = Fleet(tmp_path, 2, max_chain=4)
    fleet.rounds(24, timedelta(days=1))
    ids = fleet.ids["vm0"]
    with Repository.open(fleet.repo_path) as repo:
        full = [p.id for p in repo.points("vm0") if p.disks[0].kind == "full"]
        gone = {"runs": [i for n, i in enumerate(ids) if n % 6 in (1, 2, 3)],
                "bases": full + ids[1::5],
                "all-but-newest": ids[:-1] + fleet.ids["vm1"][:-1],
                "random": random.Random(3).sample(ids + fleet.ids["vm1"], 30)}[pattern]
        report = forget_points(repo, gone)
        left = {p.id for p in repo.points()}
    assert sorted(report.removed) == sorted(set(gone))
    assert left == set(fleet.content) - set(gone)
    assert all(fleet.restores(capsys, point) for point in sorted(left))
    assert cli(capsys, "verify", fleet.repo_path).code == 0


# -- retention on 10,000 points -----------------------------------------------------------------
def reference_policy(points: list[PointInfo], policy: Policy) -> dict[str, bool]:
    """Keep or remove per point, from the rules as documented, one rule at a time: a bucket rule
    with count N keeps the newest point of each of the N newest buckets of its group (ordinary
    points only), and also the oldest point when fewer than N buckets exist (or N is -1)."""
    keep = {p.id: p.protected for p in points}
    groups: dict[tuple, list[PointInfo]] = {}
    for p in points:
        groups.setdefault((p.vm, tuple(sorted(p.disks))), []).append(p)
    for group in groups.values():
        group.sort(key=lambda p: p.time, reverse=True)
        ordinary = [p for p in group if not p.protected]
        for p in ordinary:
            keep[p.id] |= any(t in p.tags for t in policy.tags)
            if policy.within is not None and not policy.within.is_zero():
                keep[p.id] |= p.time > policy.within.before(group[0].time)
        for rule in BUCKETS:
            count = getattr(policy, rule)
            if not count or not ordinary:
                continue
            newest_of: dict[object, str] = {}
            for n, p in enumerate(ordinary):
                newest_of.setdefault(n if rule == "last" else bucket_of(rule, p.time), p.id)
            chosen = list(newest_of.values())
            for point_id in chosen if count == -1 else chosen[:count]:
                keep[point_id] = True
            if count == -1 or len(chosen) < count:
                keep[ordinary[-1].id] = True
        keep[group[0].id] = True   # the newest point of the group
    return keep


def bucket_of(rule: str, t: datetime) -> object:
    return {"hourly": t.strftime("%Y%m%d%H"), "daily": t.strftime("%Y%m%d"),
            "weekly": t.strftime("%G%V"), "monthly": t.strftime("%Y%m"),
            "yearly": t.strftime("%Y")}[rule]


def synthetic_points(count: int, seed: int) -> list[PointInfo]:
    """`count` points of 20 VMs (two disk sets for some) over two years: nightly, with gaps,
    extra points some days, a few protected, some tagged."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        vm = f"vm{n % 20:02d}"
        when = START + timedelta(days=n // 20 * 730 / (count // 20),
                                 hours=rng.choice([0, 0, 0, 5, 13]), minutes=rng.randrange(60))
        disks = ("sda",) if n % 7 else ("sda", "sdb")
        tags = ("monthly-report",) if rng.random() < 0.01 else ()
        out.append(PointInfo(f"{n:016x}", vm, when, disks, tags, rng.random() < 0.005))
    return out


POLICIES = [Policy(daily=7, weekly=4, monthly=12, yearly=5),
            Policy(last=3, hourly=24, daily=30, weekly=-1),
            Policy(monthly=-1, within=Within(months=2), tags=("monthly-report",)),
            Policy(yearly=1, within=Within(days=10, hours=6))]


@pytest.mark.parametrize("policy", POLICIES, ids=[" ".join(p.rules()) for p in POLICIES])
def test_retention_on_10000_points_equals_the_reference(policy) -> None:
    points = synthetic_points(10_000, seed=len(policy.rules()))
    decisions = apply_policy(points, policy)
    assert len(decisions) == len(points)
    got = {d.id: d.keep for d in decisions}
    assert got == reference_policy(points, policy)
    assert 0 < sum(got.values()) < len(points)
    newest = {d.id for d in decisions if d.reasons == (NEWEST,)}
    assert all(got[i] for i in newest)


def test_the_records_of_several_vms_are_read_in_one_pass_whatever_their_names(
        tmp_path, capsys) -> None:
    """A forget of points of several VMs reads those VMs' records, found by the VM's name in
    each record's raw JSON: names with quotes, backslashes and letters JSON escapes, and a tag
    that spells another VM's pair, are told apart."""
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB").code == 0
    image = tmp_path / "d.img"
    image.write_bytes(bytes(range(256)) * 256)
    names = ['we"b\\1', "ünï", "a b", "plain"]
    ids: dict[str, list[str]] = {name: [] for name in names}
    for name in names * 2:
        done = cli(capsys, "backup", "image", repo, "--vm", name, "--disk", f"sda={image}",
                   "--tag", '"vm": "a b"', "--json")
        assert done.code == 0, done.err
        ids[name].append(done.json()["point"]["id"])
    with Repository.open(repo) as opened:
        found = opened.index.catalog_of_vms({ids['we"b\\1'][0], ids["ünï"][1]})
    assert sorted(found) == sorted(ids['we"b\\1'] + ids["ünï"])
    assert {r["vm"] for r in found.values()} == {'we"b\\1', "ünï"}
