"""gc's walk of a local store for killed writers' temporary files stays within what the
repository can judge: a temporary-looking name whose pid no process can have is left alone, and
a directory that is not the repository's and cannot be read does not stop gc."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, restore_bytes
from race import Command
from repo_engine.maintenance import shared_gc
from repo_engine.maintenance.gc import gc
from repo_engine.repository.store import local
from test_gc_temp_files import (OTHER_HOST, backed_up, backup_args, dead_pid, gc_json, plant,
                                temps)
from test_shared_repo import disk, hosts  # noqa: F401 (the two hosts fixture)


def test_gc_leaves_a_temporary_name_whose_pid_no_process_can_have(tmp_path, capsys):
    """A name of the temporary form but with a pid past any pid_t (a stray file, a damaged
    name) is not a writer gc can judge: left alone, and gc finishes."""
    repo, point, content = backed_up(tmp_path, capsys)
    for name in (".tmp-99999999999999999999-0011aabb-x.map", ".tmp-2147483648-0011aabb-y.map"):
        (repo / "maps" / name).write_bytes(b"?")
    before = temps(repo)
    assert gc_json(capsys, repo)["tmp_files_deleted"] == 0
    assert temps(repo) == before
    assert restore_bytes(capsys, repo, point, "sda", tmp_path / "out.img") == content


def test_gc_is_not_stopped_by_an_unreadable_directory_beside_the_repository(
        tmp_path, capsys, monkeypatch):
    """A repository at a filesystem's root has lost+found, which only root may read: gc walks
    the whole store for temporary files, and a directory it may not read is none of the
    repository's (what gc reads of its own kinds still fails loudly)."""
    repo, point, content = backed_up(tmp_path, capsys)
    (repo / "lost+found").mkdir()
    real = os.scandir

    def scandir(path):
        if Path(path).name == "lost+found":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(local.os, "scandir", scandir)
    result = cli(capsys, "gc", repo)
    assert result.code == 0, result.err
    assert restore_bytes(capsys, repo, point, "sda", tmp_path / "out.img") == content


def test_shared_gc_in_another_pid_namespace_keeps_a_live_writers_temporary_file(
        tmp_path, capsys):
    """A container that shares the host's name but not its pids (host networking) runs gc on
    a shared repository a backup of the host is writing to: the backup's pid names no process
    in gc's namespace, yet its lease file, fsynced under its temporary name, is about to be
    renamed. gc must leave it, and the backup must finish."""
    if subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode:
        pytest.skip("no pid namespaces here")
    repo = tmp_path / "repo"
    assert cli(capsys, "init", "--shared", repo).code == 0
    model = DiskModel(tmp_path / "d.img", 2 * MIB, np.random.default_rng(9))
    model.random_changes(5)
    running = Command(tmp_path, *backup_args(repo, "v", model.path), pauses=("atomic.written",))
    assert running.reached("atomic.written")
    live = temps(repo)
    assert live
    collect = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-m", "repo_engine",
                              "gc", str(repo), "--grace", "24h", "--json"],
                             capture_output=True, text=True)
    assert collect.returncode == 0, collect.stderr
    assert temps(repo) == live  # a writer gc cannot see is no dead writer
    running.release("atomic.written")
    finished = running.finish()
    assert finished.code == 0, finished.err


def test_gc_leaves_a_spool_file_whose_pid_no_process_can_have(tmp_path, capsys):
    """Likewise a pack spool file's name in tmp/ (`pack-<pid>-...tmp`) with such a pid."""
    repo, point, content = backed_up(tmp_path, capsys)
    stray = repo / "tmp" / "pack-99999999999999999999-0011aabbccdd.tmp"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"?")
    gc_json(capsys, repo)
    assert stray.exists()
    assert restore_bytes(capsys, repo, point, "sda", tmp_path / "out.img") == content


def test_gc_is_not_stopped_by_a_temporary_name_the_store_would_refuse_to_delete(
        tmp_path, capsys):
    """A dead process's temporary name holding `..` (a stray file of that form: the
    repository's final names never hold one) is no name `delete` takes: gc leaves it and
    still deletes the others."""
    repo, point, content = backed_up(tmp_path, capsys)
    dead = dead_pid()
    odd = plant(repo, "maps", host=None, pid=dead, final="x..map")
    plain = plant(repo, "maps", host=None, pid=dead, final="y.map")
    gc_json(capsys, repo)
    assert temps(repo) == {odd} and plain not in temps(repo)
    assert restore_bytes(capsys, repo, point, "sda", tmp_path / "out.img") == content


def test_gc_through_a_symlinked_repository_path_lists_the_store(tmp_path, capsys):
    """A repository reached through a symlink (moved to a bigger disk, linked from its old
    place): gc walks the directory the link names, removing what dead writers left and the
    orphans, as it does through the real path."""
    real, point, content = backed_up(tmp_path, capsys)
    link = tmp_path / "link"
    link.symlink_to(real)
    plant(real, "maps", host=None, pid=dead_pid(), final="y.map")
    orphan = real / "points" / f"{'0' * 16}.point"
    orphan.write_bytes(b"a manifest no catalog entry names")
    report = gc_json(capsys, link)
    assert (report["tmp_files_deleted"], report["manifests_deleted"]) == (1, 1)
    assert temps(real) == set() and not orphan.exists()
    assert restore_bytes(capsys, link, point, "sda", tmp_path / "out.img") == content


def test_shared_gc_with_a_clock_ahead_keeps_another_hosts_fresh_temporary_file(
        hosts, tmp_path, monkeypatch):
    """gc's host runs two hours ahead of the host (or file server) that stamps the files: a
    temporary file another host wrote a moment ago, about to be renamed, must stay (the
    shared gc times its other waits on its own clock for this reason)."""
    root, a, b = hosts
    model = disk(tmp_path, "v", 4)
    a.backup("v", model)
    fresh = plant(root, "maps/ab", host=OTHER_HOST, pid=os.getpid(), final="f.map")
    ahead = shared_gc.now() + timedelta(hours=2)
    monkeypatch.setattr(shared_gc, "now", lambda: ahead)
    gc(b.repo, grace=0.0)
    assert fresh in temps(root)
