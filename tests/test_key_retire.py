"""`key retire`: everything an old key epoch sealed is rewritten under the current one, then the
old keys leave the keyring; the points restore the same bytes before, during and after, a run
that stops half-way is finished by the next one, and a command that sealed data under a retired
epoch commits nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel, restore_bytes
from repo_engine.errors import RepoError
from repo_engine.maintenance import retire as retire_module
from repo_engine.repository import checkpoint
from repo_engine.repository.blockmap import BlockMap
from repo_engine.repository.crypto.epochs import stored_epoch
from repo_engine.repository.crypto.seal import ObjectSealer
from repo_engine.repository.journal import RefsOp
from repo_engine.repository.location import open_repository
from repo_engine.repository.store import Store
from repo_engine.repository.store.local import LocalStore
from repo_engine.sources.vsphere import marks
from repo_engine.cli import passphrase
from s3cli import s3_environment
from test_encryption_cli import (DISK, backup, disk, encrypted, failure, ok,  # noqa: F401
                                 small_kdf)


def epochs_in_store(repo: Path | Store) -> dict[int | None, list[str]]:
    """Every object of the repository's store but its keys and leases, by the epoch sealing it."""
    store = LocalStore(repo) if isinstance(repo, Path) else repo
    found: dict[int | None, list[str]] = {}
    for prefix in ("packs/", "maps/", "points/", "journal/", "sources/"):
        for info in store.list(prefix):
            found.setdefault(stored_epoch(store, info.name), []).append(info.name)
    return found


@pytest.fixture
def rotated(tmp_path, capsys, monkeypatch, encrypted):  # noqa: F811
    """An encrypted repository with two points under epoch 1, a rotation, and a third point
    under epoch 2 (a delta on the second: its chain reads maps of both epochs); the disk's
    content at each point."""
    repo, pass_file = encrypted
    monkeypatch.setenv(passphrase.FILE_ENV, str(pass_file))
    model = disk(tmp_path)
    contents = []
    for changes in (0, 3):
        model.random_changes(changes)
        backup(capsys, repo, model)
        contents.append(model.copy_of_content())
    ok(capsys, "key", "rotate", repo)
    model.random_changes(4)
    backup(capsys, repo, model)
    contents.append(model.copy_of_content())
    assert set(epochs_in_store(repo)) == {1, 2}
    return repo, contents


def restores(capsys, tmp_path: Path, repo: Path) -> list[bytes]:
    ids = [p["id"] for p in ok(capsys, "points", repo, "--json").json()["points"]]
    return [restore_bytes(capsys, repo, point_id, DISK, tmp_path / f"r{i}.img")
            for i, point_id in enumerate(ids)]


def test_retire_rewrites_everything_then_drops_the_old_key(tmp_path, capsys, monkeypatch,
                                                           rotated):
    repo, contents = rotated
    monkeypatch.setattr(checkpoint, "STALE_AFTER", 0.0)
    out = ok(capsys, "key", "retire", repo, "--grace", "0s").out
    assert "retiring key epochs 1 (new data: epoch 2): rewrote 2 points" in out
    assert "dropped the keys of epochs 1" in out, out
    assert set(epochs_in_store(repo)) == {2}
    status = ok(capsys, "key", "status", repo, "--json").json()
    assert (status["current_epoch"], status["epochs"]) == (2, [2])
    assert restores(capsys, tmp_path, repo) == contents
    ok(capsys, "verify", repo)
    ok(capsys, "scrub", repo)
    again = failure(capsys, 1, "key", "retire", repo, "--grace", "0s")
    assert "nothing to retire" in again and "key rotate" in again


def test_until_the_grace_period_passed_the_old_key_stays(tmp_path, capsys, monkeypatch,
                                                         rotated):
    repo, contents = rotated
    doc = ok(capsys, "key", "retire", repo, "--json").json()
    assert (doc["retiring"], doc["dropped"], doc["epochs"]) == ([1], [], [1, 2])
    assert doc["points_rewritten"] == 2 and doc["maps_rewritten"] == 2
    assert doc["packs_repacked"] >= 1
    assert set(doc["remaining"]) >= {"packs", "maps", "journal"}
    # what epoch 1 still seals is only what gc deletes once the grace period has passed
    catalogued = {f"points/{p['id']}.point"
                  for p in ok(capsys, "points", repo, "--json").json()["points"]}
    assert not catalogued & set(epochs_in_store(repo)[1])
    assert restores(capsys, tmp_path, repo) == contents
    out = ok(capsys, "key", "retire", repo).out
    assert "still sealed under the old epochs" in out and "run 'repo-engine key retire' again" in out
    monkeypatch.setattr(checkpoint, "STALE_AFTER", 0.0)
    doc = ok(capsys, "key", "retire", repo, "--grace", "0s", "--json").json()
    assert (doc["dropped"], doc["epochs"], doc["remaining"]) == ([1], [2], {})
    assert set(epochs_in_store(repo)) == {2}
    assert restores(capsys, tmp_path, repo) == contents


def test_a_run_that_stops_half_way_is_finished_by_the_next(tmp_path, capsys, monkeypatch,
                                                           rotated):
    repo, contents = rotated

    def crash(*_args, **_kwargs):
        raise RepoError("the run stopped here")

    with monkeypatch.context() as patch:  # points rewritten and packs repacked, nothing deleted
        patch.setattr(retire_module, "collect", crash)
        assert "the run stopped here" in failure(capsys, 1, "key", "retire", repo)
    assert restores(capsys, tmp_path, repo) == contents
    assert ok(capsys, "key", "status", repo, "--json").json()["epochs"] == [1, 2]
    monkeypatch.setattr(checkpoint, "STALE_AFTER", 0.0)
    doc = ok(capsys, "key", "retire", repo, "--grace", "0s", "--json").json()
    assert doc["dropped"] == [1] and doc["points_rewritten"] == 0
    assert set(epochs_in_store(repo)) == {2}
    assert restores(capsys, tmp_path, repo) == contents


def test_a_command_that_sealed_under_a_retired_epoch_commits_nothing(tmp_path, capsys,
                                                                     monkeypatch, encrypted):
    """A host that opened the repository before the rotation and sealed data under the old
    epoch: after the retire entry, its next commit is refused, whatever keyring it reloaded."""
    repo, pass_file = encrypted
    monkeypatch.setenv(passphrase.FILE_ENV, str(pass_file))
    backup(capsys, repo, disk(tmp_path))
    early = open_repository(str(repo), cache_dir=tmp_path / "other-host",
                            passphrase=lambda: pass_file.read_bytes().strip())
    try:
        name = early.write_map(BlockMap.delta(4, np.array([1], np.uint64),
                                              np.array([7], np.uint64)))
        ok(capsys, "key", "rotate", repo)
        ok(capsys, "key", "retire", repo)
        with pytest.raises(RepoError, match=r"retired key epoch 1, which this command sealed"):
            early.commit_journal(lambda _seq: [RefsOp(1 << 40, 1)])
        assert early.index.retired_epochs() == {1}
        assert stored_epoch(early.store, f"maps/{name[:2]}/{name}.map") == 1
    finally:
        early.close()
    fresh = open_repository(str(repo), cache_dir=tmp_path / "other-host",
                            passphrase=lambda: pass_file.read_bytes().strip())
    try:  # one opened after the rotation commits as before
        fresh.commit_journal(lambda _seq: [RefsOp(1 << 41, 1)])
    finally:
        fresh.close()


def test_a_command_that_sealed_nothing_yet_commits_under_the_current_epoch(
        tmp_path, capsys, monkeypatch, encrypted):  # noqa: F811
    """Opened before the rotation, it sealed nothing: catching up to the retire entry (sealed
    under the new epoch) reloads its keyring, and its entry is sealed under the new epoch."""
    repo, pass_file = encrypted
    monkeypatch.setenv(passphrase.FILE_ENV, str(pass_file))
    backup(capsys, repo, disk(tmp_path))
    early = open_repository(str(repo), cache_dir=tmp_path / "other-host",
                            passphrase=lambda: pass_file.read_bytes().strip())
    try:
        early.refresh()
        ok(capsys, "key", "rotate", repo)
        ok(capsys, "key", "retire", repo)
        entry = early.commit_journal(lambda _seq: [RefsOp(1 << 40, 1)])
        assert stored_epoch(early.store, f"journal/{entry.seq:016x}.jnl") == 2
    finally:
        early.close()


def test_retire_seals_the_vsphere_marks_again_asking_for_a_full_read(tmp_path, capsys,
                                                                    monkeypatch, rotated):
    repo, _contents = rotated
    pass_file = Path(passphrase.os.environ[passphrase.FILE_ENV])
    uuid = "5001a2b3-c4d5-e6f7-0819-2a3b4c5d6e7f"
    opened = open_repository(str(repo), passphrase=lambda: pass_file.read_bytes().strip())
    try:  # a mark under epoch 1, written by a host that still held the old keyring
        old_key = ObjectSealer({1: opened.sealer.keyring.epochs[1]}, 1)
        marks._save(opened.store, old_key, uuid, marks.VmMark("web1"))
    finally:
        opened.close()
    mark_object = f"sources/vsphere/vms/{uuid}.mark"
    assert stored_epoch(LocalStore(repo), mark_object) == 1
    monkeypatch.setattr(checkpoint, "STALE_AFTER", 0.0)
    doc = ok(capsys, "key", "retire", repo, "--grace", "0s", "--json").json()
    assert doc["objects_resealed"] == 1 and doc["dropped"] == [1]
    assert stored_epoch(LocalStore(repo), mark_object) == 2
    opened = open_repository(str(repo), passphrase=lambda: pass_file.read_bytes().strip())
    try:
        mark = marks.load(opened.store, opened.sealer, uuid)
    finally:
        opened.close()
    assert (mark.vm, mark.full_next) == ("web1", True)


def test_retire_errors(tmp_path, capsys, monkeypatch, encrypted):  # noqa: F811
    repo, pass_file = encrypted
    monkeypatch.setenv(passphrase.FILE_ENV, str(pass_file))
    message = failure(capsys, 1, "key", "retire", repo)
    assert "nothing to retire" in message and "key rotate" in message
    plain = tmp_path / "plain"
    ok(capsys, "init", plain)
    assert "is not encrypted" in failure(capsys, 1, "key", "retire", plain)
    assert "--grace" in failure(capsys, 2, "key", "retire", repo, "--grace", "soon")


def test_retire_on_object_storage(tmp_path, capsys, monkeypatch, seaweedfs, s3_bucket):
    s3_environment(monkeypatch, tmp_path, seaweedfs.endpoint)
    monkeypatch.setenv(passphrase.VALUE_ENV, "s3 secret")
    repo = f"s3://{s3_bucket}/retire"
    ok(capsys, "init", repo)
    model, contents = disk(tmp_path), []
    for rotate in (False, True):
        if rotate:
            ok(capsys, "key", "rotate", repo)
            model.random_changes(4)
        backup(capsys, repo, model)
        contents.append(model.copy_of_content())
    monkeypatch.setattr(checkpoint, "STALE_AFTER", 0.0)
    doc = ok(capsys, "key", "retire", repo, "--grace", "0s", "--json").json()
    assert (doc["dropped"], doc["epochs"], doc["points_rewritten"]) == ([1], [2], 1)
    opened = open_repository(repo, passphrase=lambda: b"s3 secret")
    try:
        assert set(epochs_in_store(opened.store)) == {2}
    finally:
        opened.close()
    ids = [p["id"] for p in ok(capsys, "points", repo, "--json").json()["points"]]
    assert [restore_bytes(capsys, repo, point_id, DISK, tmp_path / f"r{i}.img")
            for i, point_id in enumerate(ids)] == contents
