"""gc removes the temporary files (`.tmp-<host>-<pid>-<8 hex>-<name>`, atomic.temp_name) that a
process killed between writing an object and renaming it leaves in a local store's directories,
and never one a live writer may still rename: on a repository of one writer those of this host's
dead processes; on a shared one also other hosts' (and earlier versions' names, which give no
host) once older than the grace period and a lease's duration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, move_clocks, restore_bytes
from race import Command
from repo_engine.maintenance.gc import gc
from repo_engine.repository.atomic import (TempOwner, host_id, spool_name, spool_owner,
                                           temp_name, temp_owner)
from repo_engine.repository.store.local import LocalStore
from test_shared_gc import restores_everything
from test_shared_repo import disk, hosts  # noqa: F401 (the two hosts fixture)

OTHER_HOST = "0123456789abcdef"  # another host's id in temporary names
HOUR = 3600.0


def temps(root: Path) -> set[str]:
    """The temporary files under the repository directory, by relative name."""
    return {str(p.relative_to(root)) for p in root.rglob(".tmp-*")}


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant(root: Path, directory: str, *, host: str | None, pid: int, final: str = "x",
          age: float = 0.0) -> str:
    """A temporary file of `host` (None: an earlier version's name) and `pid` in `directory`,
    last written `age` seconds ago; its relative name."""
    owner = f"{host}-" if host is not None else ""
    path = root / directory / f".tmp-{owner}{pid}-{os.urandom(4).hex()}-{final}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half of an object")
    when = time.time() - age
    os.utime(path, (when, when))
    return str(path.relative_to(root))


def spooled(root: Path, kind: str, *, host: str | None, pid: int) -> str:
    """A spool file (`kind`: pack, ckpt) of `host` (None: an earlier version's name) and `pid`
    in the repository's tmp/; its name."""
    owner = f"{host}-" if host is not None else ""
    path = root / "tmp" / f"{kind}-{owner}{pid}-{os.urandom(6).hex()}.tmp"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"half of a pack")
    return path.name


def spool_files(root: Path) -> set[str]:
    return {p.name for p in (root / "tmp").glob("*.tmp")}


def backup_args(repo: Path, vm: str, image: Path) -> list[object]:
    return ["backup", "image", repo, "--vm", vm, "--disk", f"sda={image}", "--json"]


def backed_up(tmp_path: Path, capsys, seed: int = 4) -> tuple[Path, str, bytes]:
    """A new repository holding one backup: its path, the point's id and the disk's bytes."""
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "64KiB").code == 0
    model = DiskModel(tmp_path / "d.img", 2 * MIB, np.random.default_rng(seed))
    model.random_changes(5)
    done = cli(capsys, *backup_args(repo, "v", model.path))
    assert done.code == 0, done.err
    return repo, done.json()["point"]["id"], bytes(model.content)


def gc_json(capsys, repo: Path, *args: object) -> dict:
    """`gc REPO ARGS --json`, which must succeed: its report."""
    result = cli(capsys, "gc", repo, *args, "--json")
    assert result.code == 0, result.err
    return result.json()


# -- names ----------------------------------------------------------------------------------
def test_a_temporary_name_gives_its_writers_host_and_pid(tmp_path):
    name = temp_name(tmp_path / "ab" / "f00d.map")
    assert name.parent == tmp_path / "ab" and name.name.endswith("-f00d.map")
    assert name.name.startswith(f".tmp-{host_id()}-{os.getpid()}-")
    assert temp_owner(name.name) == TempOwner(host_id(), os.getpid())
    # an earlier version's name gives the pid alone; a final name may hold dashes
    assert temp_owner(".tmp-4242-0011aabb-keyring-00000001") == TempOwner(None, 4242)
    assert temp_owner(f".tmp-{OTHER_HOST}-77-0011aabb-slot-1.slot") == TempOwner(OTHER_HOST, 77)
    for junk in (".tmp-x", ".tmp-12-nothex00-a", ".tmp-12-0011aabb-", "tmp-12-0011aabb-a"):
        assert temp_owner(junk) is None


def test_a_spool_file_name_gives_its_writers_host_and_pid():
    for kind in ("pack", "ckpt"):
        assert spool_owner(spool_name(kind)) == TempOwner(host_id(), os.getpid())
    assert spool_owner("pack-4242-0011aabbccdd.tmp") == TempOwner(None, 4242)  # earlier version
    assert spool_owner(f"ckpt-{OTHER_HOST}-7-0011aabbccdd.tmp") == TempOwner(OTHER_HOST, 7)
    for junk in ("pack-x.tmp", "pack-12-0011aabbccdd", "map-12-0011aabbccdd.tmp",
                 "pack-99999999999-0011aabbccdd.tmp", "pack-12-0011aabbccdd.tmp.part"):
        assert spool_owner(junk) is None


def test_the_listing_reports_temporary_files_beside_the_objects(tmp_path):
    store = LocalStore(tmp_path)
    store.put("maps/ab/one.map", b"map")
    store.put("config", b"config")
    planted = {plant(tmp_path, "maps/ab", host=None, pid=1),
               plant(tmp_path, ".", host=OTHER_HOST, pid=2).removeprefix("./")}
    found: list = []
    assert sorted(i.name for i in store.list("", temps=found)) == ["config", "maps/ab/one.map"]
    assert {t.name for t in found} == {p.removeprefix("./") for p in planted}
    assert all(abs(t.modified - time.time()) < 60 for t in found)
    store.delete([t.name for t in found])
    assert temps(tmp_path) == set()


# -- a repository of one writer ---------------------------------------------------------------
def test_gc_removes_what_a_killed_backup_left_and_keeps_a_running_backups(tmp_path, capsys):
    """A backup killed while its maps are written under their temporary names leaves them; gc
    removes them (and the pack spool files of the same process) but not those of a backup
    paused in the same place, which goes on to commit its point; every point restores."""
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB", "--pack-size", "256KiB").code == 0
    rng = np.random.default_rng(5)
    first, other = DiskModel(tmp_path / "a.img", 3 * MIB, rng), DiskModel(tmp_path / "b.img",
                                                                             3 * MIB, rng)
    first.random_changes(8, max_len=400 * 1024)
    other.random_changes(8, max_len=400 * 1024)
    done = cli(capsys, *backup_args(repo, "vm", first.path))
    assert done.code == 0, done.err
    expected = {done.json()["point"]["id"]: first.copy_of_content()}

    first.random_changes(4, max_len=400 * 1024)
    killed = Command(tmp_path, *backup_args(repo, "vm", first.path), pauses=("atomic.written",))
    assert killed.reached("atomic.written")
    os.kill(killed.proc.pid, signal.SIGKILL)
    killed.finish()  # reaped: its pid is dead
    left = temps(repo)
    assert left and all(name.startswith("maps/") for name in left), left
    spooled = {p.name for p in (repo / "tmp").glob(f"pack-*-{killed.proc.pid}-*.tmp")}

    running = Command(tmp_path, *backup_args(repo, "other", other.path),
                      pauses=("atomic.written",))
    assert running.reached("atomic.written")
    live = temps(repo) - left
    assert live
    collect = Command(tmp_path, "gc", repo, "--json", pauses=("gc.waiting",))
    assert collect.reached("gc.waiting")  # listed and decided: now it waits for the backup
    running.release("atomic.written")
    finished = running.finish()
    assert finished.code == 0, finished.err  # its maps were there to rename
    expected[json.loads(finished.out)["point"]["id"]] = other.copy_of_content()
    collect.release("gc.waiting")
    result = collect.finish()
    assert result.code == 0, result.err
    assert json.loads(result.out)["tmp_files_deleted"] == len(left) + len(spooled)
    assert temps(repo) == set()
    assert not list((repo / "tmp").glob("pack-*.tmp"))
    for point_id, content in expected.items():
        assert restore_bytes(capsys, repo, point_id, "sda", tmp_path / "out.img") == content
    assert cli(capsys, "verify", repo).code == 0


def test_gc_of_one_writer_removes_dead_processes_temporary_files_in_every_directory(
        tmp_path, capsys):
    """This host's dead processes' files go, under new and earlier names and wherever they
    are; a live process's, another host's (left to its own gc) and names the repository does
    not give stay."""
    repo, point, content = backed_up(tmp_path, capsys, seed=3)
    dead = dead_pid()
    gone = {plant(repo, "maps/ab", host=host_id(), pid=dead, final="f.map"),
            plant(repo, "points", host=None, pid=dead, final="p.point"),
            plant(repo, "packs/cd", host=host_id(), pid=dead, final="k.pack"),
            plant(repo, "sources/vsphere/vms", host=host_id(), pid=dead, final="m.mark")}
    kept = {plant(repo, "maps/ab", host=host_id(), pid=os.getpid(), age=10 * HOUR),
            plant(repo, "points", host=None, pid=os.getpid()),
            plant(repo, "maps/ef", host=OTHER_HOST, pid=dead, age=100 * HOUR)}
    (repo / "points" / ".tmp-not-ours").write_bytes(b"?")
    before = temps(repo)

    assert gc_json(capsys, repo, "--dry-run")["tmp_files_deleted"] == len(gone)
    assert temps(repo) == before
    text = cli(capsys, "gc", repo)
    assert text.code == 0, text.err
    assert f"  {len(gone)} temporary files of killed writers deleted" in text.out.splitlines()
    assert temps(repo) == before - gone == kept | {"points/.tmp-not-ours"}
    assert gc_json(capsys, repo)["tmp_files_deleted"] == 0
    assert "temporary" not in cli(capsys, "gc", repo).out  # said only when some were deleted
    assert restore_bytes(capsys, repo, point, "sda", tmp_path / "out.img") == content


def test_gc_of_one_writer_removes_dead_processes_spool_files(tmp_path, capsys):
    """Packs and checkpoints a killed process was building in tmp/: this host's dead ones go
    (an earlier version's name counts as this host's), a live process's and another host's
    stay."""
    repo, point, content = backed_up(tmp_path, capsys)
    dead = dead_pid()
    gone = {spooled(repo, "pack", host=host_id(), pid=dead),
            spooled(repo, "ckpt", host=host_id(), pid=dead),
            spooled(repo, "pack", host=None, pid=dead)}
    kept = {spooled(repo, "pack", host=host_id(), pid=os.getpid()),
            spooled(repo, "ckpt", host=OTHER_HOST, pid=dead)}
    assert gc_json(capsys, repo, "--dry-run")["tmp_files_deleted"] == len(gone)
    assert spool_files(repo) == gone | kept  # counted, not deleted
    assert gc_json(capsys, repo)["tmp_files_deleted"] == len(gone)
    assert spool_files(repo) == kept
    assert restore_bytes(capsys, repo, point, "sda", tmp_path / "out.img") == content


# -- a shared repository ----------------------------------------------------------------------
def test_shared_gc_removes_a_killed_backups_lease_write_at_once(tmp_path, capsys):
    """A shared repository's backup killed while writing its lease leaves the lease's
    temporary file: this host's, of a dead process, so gc removes it without waiting for the
    grace period."""
    repo = tmp_path / "repo"
    assert cli(capsys, "init", "--shared", repo).code == 0
    model = DiskModel(tmp_path / "d.img", 2 * MIB, np.random.default_rng(9))
    model.random_changes(5)
    done = cli(capsys, *backup_args(repo, "v", model.path))
    assert done.code == 0, done.err
    killed = Command(tmp_path, *backup_args(repo, "v", model.path), pauses=("atomic.written",))
    assert killed.reached("atomic.written")
    os.kill(killed.proc.pid, signal.SIGKILL)
    killed.finish()
    left = temps(repo)
    assert left and all(name.startswith("leases/") for name in left), left

    assert gc_json(capsys, repo, "--grace", "24h")["tmp_files_deleted"] == len(left)
    assert temps(repo) == set()
    point = done.json()["point"]["id"]
    assert restore_bytes(capsys, repo, point, "sda", tmp_path / "out.img") == bytes(
        model.content)


@pytest.mark.parametrize("grace", [HOUR, 0.0])
def test_shared_gc_removes_other_hosts_temporary_files_only_after_the_grace_period(
        hosts, tmp_path, monkeypatch, grace):
    """Another host's files (and earlier versions' names, which could be any host's) go once
    last written, and first seen by this host, longer ago than the grace period and a lease's
    duration (the second gc, its clock that much later); younger ones may be a live writer's
    and stay. This host's go when their process is dead, at any age, and stay while it lives."""
    root, a, b = hosts
    model = disk(tmp_path, "v", 4)
    point = a.backup("v", model)
    lease = a.repo.lease_seconds
    wait = max(grace, lease)
    dead = dead_pid()
    now_dead = plant(root, "leases", host=host_id(), pid=dead)
    gone = {plant(root, "maps/ab", host=OTHER_HOST, pid=os.getpid(), age=wait + HOUR),
            plant(root, "journal", host=None, pid=os.getpid(), age=wait + HOUR)}
    kept = {plant(root, "maps/ab", host=OTHER_HOST, pid=dead, age=-wait),  # written later
            plant(root, "points", host=None, pid=dead, age=-wait),
            plant(root, "keys", host=host_id(), pid=os.getpid(), age=wait + HOUR),
            # beside config, in no object directory: never walked (docs/FORMAT.md)
            plant(root, ".", host=OTHER_HOST, pid=dead, age=wait + HOUR, final="config")}
    kept = {name.removeprefix("./") for name in kept}

    assert gc(b.repo, grace=grace).tmp_files_deleted == 1  # first seen: only this host's dead
    assert temps(root) == gone | kept
    move_clocks(monkeypatch, wait + 1, wall=("shared_gc",))
    unseen = plant(root, "maps/cd", host=OTHER_HOST, pid=dead, age=wait + HOUR)
    report = gc(b.repo, grace=grace)
    assert now_dead not in temps(root)
    assert report.tmp_files_deleted == len(gone)
    assert temps(root) == kept | {unseen}
    restores_everything(root, tmp_path, {point.id: model.copy_of_content()})


def test_shared_gc_removes_this_hosts_dead_spool_files_only(hosts, tmp_path):
    """On a shared local store tmp/ is every host's: gc removes the spool files of this host's
    dead processes, and leaves another host's and an earlier version's name (which could be a
    host not yet upgraded, writing it now)."""
    root, a, b = hosts
    model = disk(tmp_path, "v", 6)
    point = a.backup("v", model)
    dead = dead_pid()
    gone = {spooled(root, "pack", host=host_id(), pid=dead),
            spooled(root, "ckpt", host=host_id(), pid=dead)}
    kept = {spooled(root, "pack", host=None, pid=dead),
            spooled(root, "pack", host=OTHER_HOST, pid=dead),
            spooled(root, "pack", host=host_id(), pid=os.getpid())}
    assert gc(b.repo, grace=HOUR).tmp_files_deleted == len(gone)
    assert spool_files(root) == kept
    restores_everything(root, tmp_path, {point.id: model.copy_of_content()})
