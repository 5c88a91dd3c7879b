"""`key retire`: everything an old key epoch sealed is rewritten under the current one, then the
old keys leave the keyring; the points restore the same bytes before, during and after, a run
that stops half-way is finished by the next one, and a command that sealed data under a retired
epoch commits nothing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel, move_clocks, restore_bytes
from repo_engine.errors import RepoError
from repo_engine.maintenance import retire as retire_module
from repo_engine.maintenance import shared_gc
from repo_engine.maintenance.verify import repair_manifests
from repo_engine.repository import checkpoint
from repo_engine.repository.blockmap import BlockMap
from repo_engine.repository.crypto.epochs import stored_epoch
from repo_engine.repository.crypto.keyring import EMPTIED
from repo_engine.repository.crypto.seal import ObjectSealer
from repo_engine.repository.journal import RefsOp
from repo_engine.repository.location import open_repository
from repo_engine.repository.locks import MAINTENANCE
from repo_engine.repository.repo import Repository
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


def other_host(tmp_path: Path, repo: Path) -> Repository:
    """The repository opened with a cache of its own, as another host opens it."""
    pass_file = Path(passphrase.os.environ[passphrase.FILE_ENV])
    return open_repository(str(repo), cache_dir=tmp_path / "other-host",
                           passphrase=lambda: pass_file.read_bytes().strip())


def backed_up_and_opened(tmp_path, capsys, monkeypatch, encrypted) -> tuple[Path, Repository]:
    """An encrypted repository with one point, and another host's handle on it."""
    repo, pass_file = encrypted
    monkeypatch.setenv(passphrase.FILE_ENV, str(pass_file))
    backup(capsys, repo, disk(tmp_path))
    return repo, other_host(tmp_path, repo)


def test_a_command_that_sealed_under_a_retired_epoch_commits_nothing(tmp_path, capsys,
                                                                     monkeypatch, encrypted):
    """A host that opened the repository before the rotation and sealed data under the old
    epoch: after the retire entry, its next commit is refused, whatever keyring it reloaded."""
    repo, early = backed_up_and_opened(tmp_path, capsys, monkeypatch, encrypted)
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
    fresh = other_host(tmp_path, repo)
    try:  # one opened after the rotation commits as before
        fresh.commit_journal(lambda _seq: [RefsOp(1 << 41, 1)])
    finally:
        fresh.close()


def test_a_command_that_sealed_nothing_yet_commits_under_the_current_epoch(
        tmp_path, capsys, monkeypatch, encrypted):  # noqa: F811
    """Opened before the rotation, it sealed nothing: catching up to the retire entry (sealed
    under the new epoch) reloads its keyring, and its entry is sealed under the new epoch."""
    repo, early = backed_up_and_opened(tmp_path, capsys, monkeypatch, encrypted)
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


@contextmanager
def opened_before_a_retire(tmp_path: Path, capsys, monkeypatch, encrypted) -> Iterator:
    """A repository of this host opened (its keyring read) before `key rotate` and a `key
    retire` that dropped the old key. Its index is opened on first use, after the CLI's
    commands (one LMDB environment per process), and is their cache: it never replays the
    retire entry (sealed under the new epoch) itself, so nothing made it read the new keyring."""
    repo, pass_file = encrypted
    monkeypatch.setenv(passphrase.FILE_ENV, str(pass_file))
    backup(capsys, repo, disk(tmp_path))
    early = open_repository(str(repo), passphrase=lambda: pass_file.read_bytes().strip())
    try:
        ok(capsys, "key", "rotate", repo)
        monkeypatch.setattr(checkpoint, "STALE_AFTER", 0.0)
        assert ok(capsys, "key", "retire", repo, "--grace", "0s", "--json").json()[
            "dropped"] == [1]
        yield early
    finally:
        early.close()


def test_a_command_that_opened_before_the_rotation_and_sealed_nothing_yet(tmp_path, capsys,
                                                                          monkeypatch,
                                                                          encrypted):
    """Its first commit after the old key was dropped is sealed under the current key, not the
    dropped one (which would leave a journal no host can replay)."""
    with opened_before_a_retire(tmp_path, capsys, monkeypatch, encrypted) as early:
        entry = early.commit_journal(lambda _seq: [RefsOp(1 << 40, 1)])
        assert stored_epoch(early.store, f"journal/{entry.seq:016x}.jnl") == 2
    monkeypatch.setenv("REPO_ENGINE_CACHE_DIR", str(tmp_path / "another-host"))
    repo = encrypted[0]
    ok(capsys, "points", repo)  # a host that replays the journal reads that entry
    ok(capsys, "verify", repo)
    assert set(epochs_in_store(repo)) == {2}


@pytest.mark.parametrize("checkpoints_meanwhile", [0, 1])
def test_a_run_once_the_journal_may_be_compacted_drops_the_old_key(
        tmp_path, capsys, monkeypatch, rotated, checkpoints_meanwhile):
    """The journal entries sealed under the old epoch go only once a checkpoint covering them
    is an hour (and the grace period) old: the run after that drops the key, although it (and a
    gc of a busy repository, which checkpoints every 200 entries) writes a newer checkpoint."""
    repo, contents = rotated
    doc = ok(capsys, "key", "retire", repo, "--grace", "0s", "--json").json()
    assert doc["dropped"] == [] and "journal" in doc["remaining"]
    move_clocks(monkeypatch, 2 * checkpoint.STALE_AFTER, wall=("checkpoint",))  # a later run
    if checkpoints_meanwhile:
        monkeypatch.setattr(shared_gc, "checkpoint_due", lambda *_args: True)
        ok(capsys, "gc", repo, "--grace", "0s")
    doc = ok(capsys, "key", "retire", repo, "--grace", "0s", "--json").json()
    assert (doc["dropped"], doc["remaining"]) == ([1], {})
    assert set(epochs_in_store(repo)) == {2}
    assert restores(capsys, tmp_path, repo) == contents


def test_a_repair_that_locked_after_the_retire_seals_under_the_current_key(tmp_path, capsys,
                                                                            monkeypatch,
                                                                            encrypted):
    """What a command seals without a journal commit (`verify --repair` rewriting a manifest)
    after a lock taken once the old key was retired is sealed under the current key, although
    the command read the keyring before the rotation."""
    with opened_before_a_retire(tmp_path, capsys, monkeypatch, encrypted) as early:
        point = early.points()[0]
        early.delete_manifest(point.id)
        with early.lock(MAINTENANCE, "verify --repair"):
            assert repair_manifests(early) == [point.id]
    monkeypatch.setenv("REPO_ENGINE_CACHE_DIR", str(tmp_path / "another-host"))
    repo = encrypted[0]
    ok(capsys, "show", repo, point.id)
    assert set(epochs_in_store(repo)) == {2}


def test_a_rewrite_holds_the_block_maps_of_a_bounded_batch(tmp_path, capsys, monkeypatch,
                                                          rotated):
    """The points are rewritten in journal entries whose block maps together stay under a
    bound (a whole full map of a large disk takes hundreds of MiB: 64 of them must not be held
    at once); only a point whose own maps pass it is committed alone."""
    repo, contents = rotated
    bound = 1  # byte: every point in an entry of its own
    monkeypatch.setattr(retire_module, "REWRITE_BYTES", bound, raising=False)
    calls: list[tuple[int, int]] = []
    commit_forget = Repository.commit_forget

    def measured(self, rewrites, forgets, check, maps=None):
        names = {d.map for point in rewrites for d in point.disks}
        held = [(maps or {}).get(n) or self.read_map(n) for n in names]
        calls.append((len(rewrites), sum(m.refs.nbytes + (0 if m.blocks is None
                                                             else m.blocks.nbytes)
                                         for m in held)))
        return commit_forget(self, rewrites, forgets, check, maps)

    monkeypatch.setattr(Repository, "commit_forget", measured)
    monkeypatch.setattr(checkpoint, "STALE_AFTER", 0.0)
    doc = ok(capsys, "key", "retire", repo, "--grace", "0s", "--json").json()
    assert doc["points_rewritten"] == 2 and doc["dropped"] == [1]
    assert len(calls) == 2 and all(points == 1 or held <= bound for points, held in calls)
    assert restores(capsys, tmp_path, repo) == contents


def test_a_damaged_old_pack_is_named_instead_of_waiting_for_gc(tmp_path, capsys, monkeypatch,
                                                               rotated):
    """A pack sealed under the old epoch whose used chunks cannot be read is not repacked: the
    report names it and says what heals it, instead of asking to wait for gc (which never
    deletes a pack in use)."""
    repo, _contents = rotated
    old_packs = [n for n in epochs_in_store(repo)[1] if n.startswith("packs/")]
    with open(repo / old_packs[0], "r+b") as f:
        f.seek(200)  # in the first chunk's sealed bytes
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    monkeypatch.setattr(checkpoint, "STALE_AFTER", 0.0)
    out = ok(capsys, "key", "retire", repo, "--grace", "0s").out
    name = old_packs[0].rsplit("/", 1)[1].removesuffix(".pack")
    assert f"not repacked (damaged): pack {name}" in out and "scrub --repair" in out, out
    assert "gc deletes the old copies" not in out


@pytest.mark.parametrize("where", ["second rewrite", "repacked", "sweep", "drop"])
def test_a_run_stopped_at_any_step_is_finished_by_the_next(tmp_path, capsys, monkeypatch,
                                                           rotated, where):
    """Stopped between two rewrite entries, after a repacked pack and before its entry, after
    a sweep's entry and before its deletes, or just before the keyring is written: every point
    restores, and the next run finishes without the old key."""
    repo, contents = rotated
    monkeypatch.setattr(checkpoint, "STALE_AFTER", 0.0)
    monkeypatch.setattr(retire_module, "REWRITE_BATCH", 1)

    def stop(*_args, **_kwargs):
        raise RepoError("the run stopped here")

    with monkeypatch.context() as patch:
        if where == "second rewrite":
            commit_forget, calls = Repository.commit_forget, []

            def second(self, *args, **kwargs):
                calls.append(1)
                return stop() if len(calls) == 2 else commit_forget(self, *args, **kwargs)

            patch.setattr(Repository, "commit_forget", second)
        elif where == "drop":
            patch.setattr(retire_module.RepositorySealer, "drop_epochs", stop)
        else:
            point = f"gc.{where}"
            patch.setattr(shared_gc, "pause_point",
                          lambda name: stop() if name == point else None)
        assert "the run stopped here" in failure(capsys, 1, "key", "retire", repo,
                                                 "--grace", "0s")
    assert restores(capsys, tmp_path, repo) == contents
    assert ok(capsys, "key", "status", repo, "--json").json()["epochs"] == [1, 2]
    doc = ok(capsys, "key", "retire", repo, "--grace", "0s", "--json").json()
    assert (doc["dropped"], doc["epochs"]) == ([1], [2])
    assert set(epochs_in_store(repo)) == {2}
    assert restores(capsys, tmp_path, repo) == contents
    ok(capsys, "verify", repo)


def test_a_backup_of_another_host_during_the_retire_keeps_its_old_chunks(tmp_path, capsys,
                                                                         monkeypatch, rotated):
    """After the repack, another host (opened after the rotation) backs up a disk whose blocks
    dedup against chunks no point used at the repack, still in packs of the old epoch: the key
    stays until a later run has copied them, and every point restores throughout."""
    repo, contents = rotated
    points = ok(capsys, "points", repo, "--json").json()["points"]
    ok(capsys, "forget", repo, points[0]["id"])  # its overwritten blocks: used by no point
    image = tmp_path / "first.img"
    image.write_bytes(contents[0])
    cache = str(tmp_path / "cache")
    collect = retire_module.collect

    def with_a_backup_meanwhile(*args, **kwargs):
        monkeypatch.setenv("REPO_ENGINE_CACHE_DIR", str(tmp_path / "host-b"))
        ok(capsys, "backup", "image", repo, "--vm", "other-vm", "--disk", f"{DISK}={image}")
        monkeypatch.setenv("REPO_ENGINE_CACHE_DIR", cache)
        return collect(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "STALE_AFTER", 0.0)
    with monkeypatch.context() as patch:
        patch.setattr(retire_module, "collect", with_a_backup_meanwhile)
        first = ok(capsys, "key", "retire", repo, "--grace", "0s", "--json").json()
    assert first["dropped"] == [] and "packs" in first["remaining"]
    expected = {**{p["id"]: c for p, c in zip(points[1:], contents[1:])}}
    restored = {p["id"]: restore_bytes(capsys, repo, p["id"], DISK, tmp_path / "r.img")
                for p in ok(capsys, "points", repo, "--json").json()["points"]}
    other = [i for i in restored if i not in expected]
    assert len(other) == 1 and restored == {**expected, other[0]: contents[0]}
    doc = ok(capsys, "key", "retire", repo, "--grace", "0s", "--json").json()
    assert (doc["dropped"], doc["epochs"]) == ([1], [2])
    assert set(epochs_in_store(repo)) == {2}
    assert {p["id"]: restore_bytes(capsys, repo, p["id"], DISK, tmp_path / "r.img")
            for p in ok(capsys, "points", repo, "--json").json()["points"]} == restored


def test_the_report_says_the_old_journal_entries_wait_an_hour(tmp_path, capsys, rotated):
    """With --grace 0s the old maps and packs go at once, but the journal entries only an hour
    after the checkpoint: the report says so, instead of 'after the grace period (0 s)' alone
    (running again at once would not drop the key)."""
    repo, _contents = rotated
    out = ok(capsys, "key", "retire", repo, "--grace", "0s").out
    assert "rewrote 2 points and 2 block maps, repacked " in out, out
    assert "still sealed under the old epochs: " in out and "in journal/" in out
    assert "an hour after this run's checkpoint at the earliest" in out


def test_the_epoch_counted_is_the_one_sealed_under_whatever_thread_reloads(tmp_path, capsys,
                                                                           monkeypatch,
                                                                           encrypted):
    """A backup's threads seal while one of them reloads the keyring (it met an object of a
    newer epoch): an object sealed between the reload's two assignments must still have its
    epoch counted, or a commit after `key retire` would not be refused."""
    repo, pass_file = encrypted
    monkeypatch.setenv(passphrase.FILE_ENV, str(pass_file))
    opened = open_repository(str(repo), passphrase=lambda: pass_file.read_bytes().strip())
    try:
        ok(capsys, "key", "rotate", repo)
        sealer = opened.sealer
        seen: list[tuple[int, frozenset[int]]] = []

        class Interleaved(type(sealer)):
            def __setattr__(self, name, value):
                super().__setattr__(name, value)
                if name in ("_keyring", "_sealer"):  # another thread seals right now
                    epoch = int.from_bytes(self.seal("map", b"", b"x")[:4], "little")
                    seen.append((epoch, self.sealed_epochs))

        sealer.__class__ = Interleaved
        sealer.avoid({1})  # the journal says epoch 1 is retired: the newest keyring is read
    finally:
        opened.close()
    assert len(seen) == 2 and {epoch for epoch, _counted in seen} <= {1, 2}
    assert all(epoch in counted for epoch, counted in seen), seen


def test_a_restore_marking_its_vm_while_the_mark_is_resealed_is_not_forgotten(
        tmp_path, capsys, monkeypatch, rotated):
    """The store has no compare-and-swap: a restore's mark written between the reseal's read
    and its write is overwritten. Its write time must not go back with it: an in-place restore
    from a point older than that write must not trust CBT (which misses what VDDK wrote)."""
    repo, _contents = rotated
    pass_file = Path(passphrase.os.environ[passphrase.FILE_ENV])
    uuid = "5001a2b3-c4d5-e6f7-0819-2a3b4c5d6e7f"
    opened = open_repository(str(repo), passphrase=lambda: pass_file.read_bytes().strip())
    try:  # a restore wrote to the VM long ago; its mark is sealed under epoch 1
        old_key = ObjectSealer({1: opened.sealer.keyring.epochs[1]}, 1)
        marks._save(opened.store, old_key, uuid, marks.VmMark("web1", False,
                                                               "2026-01-01T00:00:00.000000Z"))
    finally:
        opened.close()
    load, written = marks.load, []

    def load_then_a_restore_marks(store, sealer, vm_uuid):
        mark = load(store, sealer, vm_uuid)
        marks.mark_written(store, sealer, vm_uuid, "web1", "restore in place")  # meanwhile
        written.append(load(store, sealer, vm_uuid).last_write)
        return mark

    monkeypatch.setattr(marks, "load", load_then_a_restore_marks)
    assert ok(capsys, "key", "retire", repo, "--json").json()["objects_resealed"] == 1
    monkeypatch.setattr(marks, "load", load)
    opened = open_repository(str(repo), passphrase=lambda: pass_file.read_bytes().strip())
    try:
        mark = marks.load(opened.store, opened.sealer, uuid)
    finally:
        opened.close()
    assert mark.full_next and mark.last_write >= written[0], (mark, written)


def test_a_keyring_generation_a_crash_left_is_emptied_by_the_next_run(tmp_path, capsys,
                                                                      monkeypatch, rotated):
    """A crash between writing the keyring without the old key and emptying the generation
    before it leaves that generation, which still holds the old key: the next run empties it,
    even when it has nothing left to retire."""
    repo, _contents = rotated
    keys = repo / "keys"
    before = {p.name: p.read_bytes() for p in keys.glob("keyring-*")}
    monkeypatch.setattr(checkpoint, "STALE_AFTER", 0.0)
    assert ok(capsys, "key", "retire", repo, "--grace", "0s", "--json").json()["dropped"] == [1]
    for name, data in before.items():  # as if the run had stopped before deleting it
        (keys / name).write_bytes(data)
    assert "nothing to retire" in failure(capsys, 1, "key", "retire", repo)
    for name in before:  # the records emptied, the copies gone
        assert (not (keys / name).exists() if name.endswith(".copy")
                else (keys / name).read_bytes() == EMPTIED)
