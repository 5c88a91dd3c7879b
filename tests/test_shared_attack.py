"""A shared repository attacked the way a crash, a stalled process, another host or a damaged
store would: every test ends with what is catalogued restoring byte-identically, or with a loud
refusal, never with a point naming data that is gone."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np
import pytest

from helpers import (KIB, DiskModel, attach_shared, cli, move_clocks, shared_repo,
                     stopped_before_commit)
from repo_engine import pause
from repo_engine.errors import CommitStalled, DamageError, FormatError, RepoError
from repo_engine.maintenance import shared_gc
from repo_engine.maintenance.forget import forget_points
from repo_engine.maintenance.gc import gc
from repo_engine.maintenance.scrub import scrub
from repo_engine.repository import journal, leases, sightings
from repo_engine.repository.checkpoint import STALE_AFTER, compact, write_checkpoint
from repo_engine.repository.envelope import seal
from repo_engine.repository.formats import JOURNAL
from repo_engine.repository.leases import LeaseLost
from repo_engine.repository.location import init_repository
from repo_engine.repository.locks import SHARED
from repo_engine.repository.packs import pack_object
from repo_engine.repository.points import PointRecord
from repo_engine.repository.repo import Repository
from repo_engine.repository.store.local import LocalStore
from test_shared_gc import pack_bytes, restores_everything
from test_shared_repo import Host, disk, hosts  # noqa: F401 (the two hosts fixture)


def stall_after_upload(repo: Repository, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make `repo`'s backups stop after their packs are in the store, before their journal
    entry: the place a backup suspended (SIGSTOP, a paused VM) leaves objects gc does not know."""
    reached, go = threading.Event(), threading.Event()

    def index_packs(packs):
        reached.set()
        go.wait(60)
        return Repository.index_packs(repo, packs)

    monkeypatch.setattr(repo, "index_packs", index_packs)
    return reached, go


@dataclass
class Stalled:
    """A backup of a new disk stopped after its packs are in the store, before its entry."""

    model: DiskModel
    go: threading.Event
    thread: threading.Thread
    done: list

    def finish(self) -> PointRecord:
        """Let it go on; its point."""
        self.go.set()
        self.thread.join(60)
        assert len(self.done) == 1
        return self.done[0]


def stalled_backup(host: Host, tmp_path: Path, monkeypatch, vm: str, seed: int) -> Stalled:
    """`host` backs up a new disk of `vm` in a thread, stopped by stall_after_upload."""
    model = disk(tmp_path, vm, seed)
    reached, go = stall_after_upload(host.repo, monkeypatch)
    done: list = []
    thread = threading.Thread(target=lambda: done.append(host.backup(vm, model)))
    thread.start()
    assert reached.wait(60)
    return Stalled(model, go, thread, done)


def test_a_lease_renewed_after_it_expired_stays_lost(hosts, monkeypatch):
    """A holder suspended past its expiry resumes; its renewal thread may run before the
    command's next check: the renewal must not bring the lease back (gc may have judged it
    expired and deleted what the holder wrote)."""
    _root, a, _b = hosts
    with a.repo.lock(SHARED, "backup image web1") as held:
        [lease] = held.leases
        move_clocks(monkeypatch, a.repo.lease_seconds + 1, wall=("leases", "shared_gc"))
        lease.renew()  # the daemon, first to run after the resume
        with pytest.raises(LeaseLost, match="expired"):
            a.repo.check_leases()


def failing_backup(host: Host, vm: str, model: DiskModel
                   ) -> tuple[threading.Thread, list[BaseException]]:
    """`host` backs up `model` as `vm` in a thread (started); the list gets what it raised."""
    failed: list[BaseException] = []

    def backup() -> None:
        try:
            host.backup(vm, model)
        except BaseException as exc:  # noqa: BLE001 (what the command reports)
            failed.append(exc)

    thread = threading.Thread(target=backup)
    thread.start()
    return thread, failed


def sweep_past_a_paused_host(a: Host, paused: Host, monkeypatch) -> shared_gc.SharedGcReport:
    """a's gc plans, then sweeps once it has seen `paused`'s leases unchanged past their span:
    a's clocks move, `paused`'s do not (a VM its hypervisor paused sees no time pass, so its
    own lease checks pass when it resumes)."""
    move_clocks(monkeypatch, paused.repo.lease_seconds + 1, wall=("shared_gc",))
    assert gc(a.repo, grace=0).plans_swept == 0  # the waits name paused's lease: seen from now
    move_clocks(monkeypatch, 2 * paused.repo.lease_seconds + 2, wall=("shared_gc",))
    swept = gc(a.repo, grace=0)
    assert swept.plans_swept >= 1
    paused.repo.check_leases()  # paused's clocks say its leases are fine
    return swept


def packs_entries_name(store) -> set[str]:
    """The packs the journal's `pack` entries name."""
    return {op.name for seq in journal.entry_seqs(store)
            for op in journal.read_entry(store, seq).ops if isinstance(op, journal.PackOp)}


def test_a_backup_suspended_past_its_lease_stores_no_point_naming_a_swept_pack(
        hosts, tmp_path, monkeypatch):
    """b's backup uploads a pack and is suspended before its journal entry; its lease expires;
    gc plans the unknown pack and sweeps it (grace 0). b resumes (its renewal thread first):
    it must fail and catalogue nothing, and what a catalogued before restores."""
    root, a, b = hosts
    model = disk(tmp_path, "vm", 21)
    kept = a.backup("vm", model)
    content = model.copy_of_content()
    reached, go = stall_after_upload(b.repo, monkeypatch)
    thread, failed = failing_backup(b, "other", disk(tmp_path, "other", 22))
    assert reached.wait(60)
    uploaded = pack_bytes(a.repo.store)
    move_clocks(monkeypatch, b.repo.lease_seconds + 1, wall=("leases", "shared_gc"))
    assert gc(a.repo, grace=0).plans_swept == 0  # expired on b's clock; a sees it first now
    # seen unchanged past its span
    move_clocks(monkeypatch, 2 * b.repo.lease_seconds + 2, wall=("leases", "shared_gc"))
    swept = gc(a.repo, grace=0)
    assert swept.orphan_packs_deleted == 1 and pack_bytes(a.repo.store) < uploaded
    for held in list(b.repo.held):
        for lease in held.leases:
            lease.renew()  # the daemon, first to run after the resume
    go.set()
    thread.join(60)
    assert len(failed) == 1 and isinstance(failed[0], LeaseLost)
    restores_everything(root, tmp_path, {kept.id: content})


def test_a_paused_vm_resumed_past_its_lease_indexes_no_pack_gc_swept(hosts, tmp_path,
                                                                      monkeypatch):
    """b's backup uploads a pack and its VM is paused (its clocks stop) before the pack's
    journal entry; gc, seeing b's lease unchanged past its span, plans the pack no cache knows
    and sweeps it. b resumes and its own lease checks pass: the sweep's note of the pack, found
    caught up, refuses its entry (CommitStalled, one line). No entry names the deleted pack (no
    host deduplicates against its chunks), no point is stored, and what a stored restores."""
    root, a, b = hosts
    model = disk(tmp_path, "vm", 23)
    kept = a.backup("vm", model)
    reached, go = stall_after_upload(b.repo, monkeypatch)
    thread, failed = failing_backup(b, "other", disk(tmp_path, "other", 24))
    assert reached.wait(60)
    assert sweep_past_a_paused_host(a, b, monkeypatch).orphan_packs_deleted == 1
    go.set()
    thread.join(60)
    assert len(failed) == 1 and isinstance(failed[0], CommitStalled), failed
    message = str(failed[0])
    assert message.startswith("the backup of 'other' stalled past its lease: gc deleted pack ")
    assert message.endswith("; no restore point was stored: run the backup again")
    assert "\n" not in message
    packs = {i.name for i in a.repo.store.list("packs/")}
    assert {pack_object(name) for name in packs_entries_name(a.repo.store)} <= packs
    restores_everything(root, tmp_path, {kept.id: model.copy_of_content()})


def test_a_point_whose_manifest_a_sweep_deletes_after_its_entry_is_never_committed(
        hosts, tmp_path, monkeypatch):
    """b backs up a copy of a's disk (every chunk and its map deduplicated: its manifest is all
    it writes) and its VM is paused with the manifest written, before its entry. gc plans the
    manifest no point names, sweeps it once b's lease is past its span, and is itself held up
    between its sweep entry and the deletes. b resumes (its clocks saw no pause), loses its seq
    to gc and writes its manifest again at the next: the sweep's note of the manifest refuses
    the commit, so the deletes that follow leave no catalogued point without its manifest."""
    root, a, b = hosts
    model = disk(tmp_path, "vm", 25)
    kept = a.backup("vm", model)
    monkeypatch.setenv("REPO_ENGINE_PAUSE_DIR", str(tmp_path))
    monkeypatch.setattr(pause, "_NAMES", frozenset({"repository.point_built"}))
    thread, failed = failing_backup(b, "copy", model)
    while not (tmp_path / "repository.point_built.reached").exists():
        assert thread.is_alive()
        threading.Event().wait(0.01)
    held_up: list[list[str]] = []
    monkeypatch.setattr(shared_gc, "_delete", lambda _repo, names: held_up.append(names))
    assert sweep_past_a_paused_host(a, b, monkeypatch).manifests_deleted >= 1
    (tmp_path / "repository.point_built.go").touch()
    thread.join(60)
    assert len(failed) == 1 and isinstance(failed[0], CommitStalled), failed
    [manifest] = {name for names in held_up for name in names if name.startswith("points/")}
    assert str(failed[0]) == (f"the backup of 'copy' stalled past its lease: gc deleted the "
                              f"manifest of point {manifest[7:-6]}, not catalogued yet; no "
                              "restore point was stored: run the backup again")
    a.repo.store.delete([name for names in held_up for name in names])  # gc goes on
    restores_everything(root, tmp_path, {kept.id: model.copy_of_content()})


def test_a_commit_that_lost_its_seq_checks_its_leases_again_before_its_next_attempt(
        hosts, tmp_path, monkeypatch):
    """a's commit loses the race for its seq to b's, and meanwhile a's lease is lost (removed
    here; a stall past it alike): the next attempt checks the lease again and commits nothing."""
    root, a, b = hosts
    model = disk(tmp_path, "vm", 26)
    kept = a.backup("vm", model)
    write = journal.write_entry
    raced: list[int] = []

    def racing(store, entry, *sealer):
        if not raced and store is a.repo.store:
            raced.append(entry.seq)
            b.repo.commit_journal(lambda _seq: [journal.RefsOp(1 << 40, 1)])
            leases.clear_leases(a.repo.store, None, force=True)
        write(store, entry, *sealer)

    monkeypatch.setattr(journal, "write_entry", racing)
    with a.repo.lock(SHARED, "backup image other"):
        with pytest.raises(LeaseLost, match="was removed"):
            a.repo.reserve_refs(1)
    assert raced and max(journal.entry_seqs(a.repo.store)) == raced[0]  # b's entry only
    restores_everything(root, tmp_path, {kept.id: model.copy_of_content()})


# -- a cache the journal does not back ---------------------------------------------------------
def journal_names(root) -> set[str]:
    return {p.name for p in (root / "journal").iterdir()}


def refused(host: Host, tmp_path, match: str) -> None:
    """Every command of `host` refuses at its lock, and a backup writes no journal entry."""
    root = host.repo.store.root
    before = journal_names(root)
    with pytest.raises(DamageError, match=match):
        host.repo.lock(SHARED, "points").release()
    with pytest.raises(DamageError, match=match):
        host.backup("late", disk(tmp_path, "late", 31))
    assert journal_names(root) == before


def test_a_cache_ahead_of_the_journal_is_refused(hosts, tmp_path):
    """The journal was restored from an older copy (entries the cache replayed are gone): the
    host must not commit at a seq it takes for the head, nor dedup against the lost entries'
    chunks."""
    root, a, _b = hosts
    model = disk(tmp_path, "vm", 23)
    first = a.backup("vm", model)
    content = model.copy_of_content()
    older = journal_names(root)
    model.random_changes(4)
    a.backup("vm", model)
    for name in journal_names(root) - older:
        (root / "journal" / name).unlink()
    refused(a, tmp_path, "restored from an older copy")
    restores_everything(root, tmp_path, {first.id: content})


@pytest.mark.parametrize("missing", [1, 2])
def test_an_entry_missing_in_the_middle_of_the_journal_is_refused(hosts, tmp_path, missing):
    """b's cache is at seq S; entry S + `missing` is deleted while later ones exist: b must not
    stop at the gap as if it were the head (its next commit would take the missing seq)."""
    root, a, b = hosts
    a.backup("vm", disk(tmp_path, "vm", 24))
    seq = b.repo.refresh()
    a.backup("vm2", disk(tmp_path, "vm2", 25))
    (root / "journal" / f"{seq + missing:016x}.jnl").unlink()
    refused(b, tmp_path, f"entry {seq + missing} is missing")


def test_entries_compacted_past_a_recently_refreshed_cache_are_read_from_the_checkpoint(
        hosts, tmp_path, monkeypatch):
    """gc compacted the entries b's cache had not replayed yet (its clock jumped two hours
    ahead after it first saw the checkpoint): b, refreshed a minute ago, loads the checkpoint
    at its lock instead of taking the gap for the head."""
    root, a, b = hosts
    model = disk(tmp_path, "vm", 26)
    first = a.backup("vm", model)
    contents = {first.id: model.copy_of_content()}
    b.repo.refresh()
    model.random_changes(4)
    second = a.backup("vm", model)
    contents[second.id] = model.copy_of_content()
    seq = write_checkpoint(a.repo.store, a.repo.index)
    assert compact(a.repo.store, a.repo.index, grace=0) == 0  # first seen now
    move_clocks(monkeypatch, 2 * STALE_AFTER, wall=())
    assert compact(a.repo.store, a.repo.index, grace=0) == seq
    with b.repo.lock(SHARED, "points"):
        assert {p.id for p in b.repo.points()} == set(contents)
    third = b.backup("vm", model)
    contents[third.id] = model.copy_of_content()
    restores_everything(root, tmp_path, contents)


def test_an_object_deleted_while_a_local_store_lists_it_is_left_out(tmp_path):
    """Another host's gc, or a command releasing its lease, deletes objects while this one
    lists them (two takers of the maintenance lock met this): the listing leaves the deleted
    object out, it never fails."""
    (tmp_path / "repo").mkdir()
    store = LocalStore(tmp_path / "repo")
    names = {f"leases/h-1-{i:08x}.lease" for i in range(2)}
    for name in names:
        store.put(name, b"lease")
    listing = store.list("leases/")
    first = next(listing).name
    store.delete(names - {first})
    assert list(listing) == []


def test_a_cache_of_another_repository_is_refused(hosts, tmp_path):
    """A cache directory given to a second repository (a copied --cache-dir, two repositories
    on one cache path) would replay one journal on top of the other's state: refused, whatever
    the two heads."""
    root, a, _b = hosts
    first = a.backup("vm", disk(tmp_path, "vm", 27))
    other_root = tmp_path / "other"
    other = Host(shared_repo(other_root, tmp_path / "cache-other"))
    for i in range(3):  # ahead of a's journal
        other.backup(f"o{i}", disk(tmp_path, f"o{i}", 40 + i))
    other.repo.close()
    a.repo.close_index()  # one process opens one LMDB environment once
    with pytest.raises(RepoError, match="holds the cache of another repository"):
        intruder = attach_shared(LocalStore(other_root), a.repo.path)
        intruder.lock(SHARED, "points").release()
    assert {p.id for p in a.repo.points()} == {first.id}


# -- maintenance commands on a shared repository -------------------------------------------------
def flip_first_chunk(repo: Repository, point) -> None:
    """Damage, in its pack, the stored chunk of the first block of `point`'s disk that holds
    one."""
    refs = repo.resolve(point, "d")
    ref = int(refs[refs != 0][0])
    with repo.index.reader() as reader:
        [place] = reader.locate(np.array([ref], np.uint64))
    path = repo.store.path_of(pack_object(repo.index.pack_info(int(place["pack"])).name))
    with open(path, "r+b") as f:
        f.seek(int(place["offset"]) + int(place["stored"]) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_heal_by_scrub_repair_reaches_every_host_and_survives_gc(hosts, tmp_path):
    """scrub --repair quarantines a damaged chunk; the next backup stores it again and heals
    the damaged ref from that copy into a new pack. The heal must be a journal commit: else
    other hosts keep reading the damaged copy and gc deletes the healed pack as unknown."""
    root, a, b = hosts
    model = disk(tmp_path, "vm", 28)
    first = a.backup("vm", model)
    content = model.copy_of_content()
    flip_first_chunk(a.repo, first)
    found = scrub(a.repo, repair=True)
    assert len(found.damaged) == 1 and found.repair.points_marked_damaged == 1
    second = a.backup("vm", model)
    swept = gc(b.repo, grace=0)
    assert swept.planned_objects == 0 and swept.orphan_packs_deleted == 0  # the healed pack
    assert not any(p.damage for p in a.repo.points())
    restores_everything(root, tmp_path, {first.id: content, second.id: content})


def test_maintenance_commands_on_a_shared_repository(tmp_path, capsys):
    """verify, scrub (and --repair), rebuild-index and unlock through the CLI on a local shared
    repository: a clean one reports no damage and no false orphans; damage is found and named."""
    root = tmp_path / "repo"
    host = Host(shared_repo(root, root))  # the CLI's cache: the repository's directory
    model = disk(tmp_path, "vm", 29)
    host.backup("vm", model)
    model.random_changes(3)
    second = host.backup("vm", model)
    host.repo.close()
    for command in (["verify"], ["scrub"], ["verify", "--repair"], ["scrub", "--repair"],
                    ["rebuild-index"], ["unlock"], ["verify"]):
        result = cli(capsys, *command, root)
        assert result.code == 0, (command, result.out, result.err)
        assert "orphan" not in result.out and "gc --full" not in result.out, result.out
    assert cli(capsys, "verify", root, "--json").json()["orphans"]["maps"] == []
    with Repository.open(root) as repo:
        flip_first_chunk(repo, repo.find_point(second.id))
    found = cli(capsys, "scrub", root)
    assert found.code == 3 and second.id[:8] in found.out + found.err, found.out + found.err
    repaired = cli(capsys, "scrub", root, "--repair")
    assert repaired.code == 3 and "marked damaged" in repaired.out, repaired.out
    marked = cli(capsys, "points", root, "--json").json()["points"]
    assert [p["id"] for p in marked if p["damage"]] == [second.id]
    with Repository.open(root) as repo:
        repo.store.delete([pack_object(p.name) for p in repo.index.all_packs()][:1])
    broken = cli(capsys, "verify", root)
    assert broken.code == 3 and "affects point" in broken.out, broken.out


def test_the_journal_head_check_on_s3(seaweedfs, s3_bucket, tmp_path, monkeypatch):
    """On S3: an entry deleted in the middle is refused (HEAD requests find the gap), and once
    gc compacted the journal past b's cache, b reads the checkpoint and restores every point."""
    from repo_engine.repository.config import RepoConfig
    from repo_engine.repository.journal import entry_object
    from repo_engine.repository.store.s3 import S3Store
    from test_store_s3 import settings_for

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    store = S3Store(f"s3://{s3_bucket}/repo", settings_for(seaweedfs.endpoint))
    a = Host(Repository.create(store, tmp_path / "cache-a", RepoConfig.new(shared=True)))
    b = Host(attach_shared(store, tmp_path / "cache-b"))
    models = [disk(tmp_path, f"vm{i}", 50 + i) for i in range(2)]
    points = {a.backup("vm0", models[0]).id: models[0].copy_of_content()}
    seq = b.repo.refresh()
    points[a.backup("vm1", models[1]).id] = models[1].copy_of_content()
    store.delete([entry_object(seq + 1)])
    with pytest.raises(DamageError, match=f"entry {seq + 1} is missing"):
        b.repo.lock(SHARED, "points").release()
    head = write_checkpoint(store, a.repo.index)
    assert compact(store, a.repo.index, grace=0) == 0  # first seen now
    move_clocks(monkeypatch, 2 * STALE_AFTER, wall=())
    assert compact(store, a.repo.index, grace=0) == head - 1
    with b.repo.lock(SHARED, "restore"):
        assert {p.id for p in b.repo.points()} == set(points)
        for point in b.repo.points():
            assert b.restored(point, tmp_path) == points[point.id]
    a.repo.close()
    b.repo.close()


def crash_before_point_entry(host: Host, vm: str, model, monkeypatch) -> None:
    """A backup killed after its packs, maps and manifest are in the store, before the journal
    entry that would have catalogued its point."""
    from repo_engine.repository.journal import PointOp

    write = journal.write_entry

    def killed(store, entry, *sealer):
        if any(isinstance(op, PointOp) for op in entry.ops):
            raise KeyboardInterrupt
        write(store, entry, *sealer)

    with monkeypatch.context() as patched:
        patched.setattr(journal, "write_entry", killed)
        with pytest.raises(KeyboardInterrupt):
            host.backup(vm, model)


def test_rebuild_index_of_a_shared_repository_is_the_journal_not_the_manifests(
        tmp_path, capsys, monkeypatch):
    """rebuild-index of a shared repository rebuilds this host's cache from the journal: a
    manifest a killed backup left is no point (gc deletes it and its maps on other hosts), and a
    damaged cache, which every other command refuses, is rebuilt."""
    root = tmp_path / "repo"
    # the cache where the command line keeps it (repository/location.py)
    host = Host(init_repository(str(root), shared=True, block_size=64 * KIB))
    cache = host.repo.path
    model = disk(tmp_path, "vm", 30)
    kept = host.backup("vm", model)
    content = model.copy_of_content()
    model.random_changes(3)
    crash_before_point_entry(host, "vm", model, monkeypatch)
    host.repo.close()
    assert len(list((root / "points").iterdir())) == 2
    with open(cache / "index" / "data.mdb", "r+b") as f:
        f.truncate(4096)
    damaged = cli(capsys, "points", root)
    assert damaged.code == 3 and "rebuild-index" in damaged.err, damaged.err
    rebuilt = cli(capsys, "rebuild-index", root, "--json")
    assert rebuilt.code == 0, rebuilt.err
    assert rebuilt.json()["journal_seq"] == max(journal.entry_seqs(LocalStore(root)))
    listed = cli(capsys, "points", root, "--json").json()["points"]
    assert [p["id"] for p in listed] == [kept.id]
    restores_everything(root, tmp_path, {kept.id: content})


def test_a_backup_whose_parent_another_host_forgets_meanwhile_commits_a_full_map(
        hosts, tmp_path, monkeypatch):
    """a's backup of vm computes a delta on the newest point and stops before its commit; b
    forgets that point and gc sweeps it (grace 0, after a ended); a's commit finds its parent
    gone and writes the disk as a full map: every point restores, before and after gc."""
    root, a, b = hosts
    model = disk(tmp_path, "vm", 32)
    parent = a.backup("vm", model)
    model.random_changes(3)
    with stopped_before_commit(lambda: a.backup("vm", model), tmp_path, monkeypatch) as done:
        forget_points(b.repo, [parent.id])
    [child] = done
    [record] = a.repo.points()
    assert record.id == child.id and record.disks[0].kind == "full"
    assert "parent point was forgotten" in record.disks[0].note
    assert gc(b.repo, grace=0).plans_swept == 1
    restores_everything(root, tmp_path, {child.id: model.copy_of_content()})


def newer_entry(seq: int, what: str) -> bytes:
    """Entry `seq` as a newer repo-engine could write it: a new op, or a new major version."""
    if what == "op":
        header = json.dumps({"seq": seq, "time": "", "host": "h", "pid": 1,
                             "ops": [{"op": "moved", "refs": [0, 0]}]}).encode()
        return seal(JOURNAL, journal.HEAD_LEN.pack(len(header)) + header)
    body = bytearray(journal.encode(journal.Entry.new(seq, [journal.RefsOp(1, 1)]))[:-32])
    body[8:10] = (JOURNAL.major + 1).to_bytes(2, "little")
    return bytes(body) + blake3.blake3(bytes(body)).digest()


@pytest.mark.parametrize("what", ["op", "version"])
def test_a_journal_entry_of_a_newer_version_is_refused_not_skipped(hosts, tmp_path, what):
    """An entry a newer repo-engine wrote (a newer envelope version, or an op this one does not
    know) stops every command with the advice to upgrade; nothing is committed past it."""
    root, a, b = hosts
    a.backup("vm", disk(tmp_path, "vm", 33))
    seq = b.repo.refresh()
    (root / "journal" / f"{seq + 1:016x}.jnl").write_bytes(newer_entry(seq + 1, what))
    before = journal_names(root)
    with pytest.raises(FormatError, match="upgrade repo-engine"):
        b.repo.lock(SHARED, "points").release()
    with pytest.raises(FormatError, match="upgrade repo-engine"):
        b.backup("vm2", disk(tmp_path, "vm2", 34))
    assert journal_names(root) == before


def test_a_backup_killed_before_its_point_entry_then_gc_on_another_host(tmp_path, capsys,
                                                                        monkeypatch):
    """A `repo-engine backup` process is killed (SIGKILL) with its packs and maps committed,
    before its point entry; its lease is left behind. Another host's gc, once that lease has
    expired, sweeps what it wrote; the next backup of the VM on the first host (whose cache
    still finds the swept chunks until it refreshes) stores them again: all restores."""
    from race import Command

    root = tmp_path / "repo"
    first = Host(shared_repo(root, root))  # the CLI's cache: the repository's directory
    model = disk(tmp_path, "vm0", 35)
    contents = {first.backup("vm0", model).id: model.copy_of_content()}
    first.repo.close()
    other = disk(tmp_path, "vm1", 36)
    args = ["backup", "image", root, "--vm", "vm1", "--disk", f"d={other.path}", "--json"]
    killed = Command(tmp_path, *args, pauses=("backup.before_commit",))
    assert killed.reached("backup.before_commit")
    killed.proc.kill()
    killed.finish()
    b = Host(attach_shared(LocalStore(root), tmp_path / "cache-b"))
    move_clocks(monkeypatch, b.repo.lease_seconds + 1, wall=("leases", "shared_gc"))
    assert gc(b.repo, grace=0).plans_swept == 0  # the lease left: seen unchanged from now
    move_clocks(monkeypatch, 2 * b.repo.lease_seconds + 2, wall=("leases", "shared_gc"))
    swept = gc(b.repo, grace=0)
    assert swept.plans_swept == 1 and swept.packs_deleted >= 1 and swept.maps_deleted >= 1
    b.repo.close()
    again = cli(capsys, *args)
    assert again.code == 0, again.err
    contents[again.json()["point"]["id"]] = other.copy_of_content()
    restores_everything(root, tmp_path, contents)


def test_an_entry_copied_under_another_seq_is_refused(hosts, tmp_path):
    """A hostile store serves entry `seq` again as the next one: the entry says which seq it
    is, so the copy is damage, never replayed twice."""
    root, a, b = hosts
    a.backup("vm", disk(tmp_path, "vm", 37))
    seq = b.repo.refresh()
    (root / "journal" / f"{seq + 1:016x}.jnl").write_bytes(
        (root / "journal" / f"{seq:016x}.jnl").read_bytes())
    refused(b, tmp_path, "moved or tampered with")


def checkpointed_past_a_stalled_backup(hosts, tmp_path, monkeypatch, seed: int):
    """Two points of a's, with b's backup stalled between them (refreshed at its lock, packs
    uploaded), then a checkpoint a wrote: (contents by point, the stalled backup, its seq)."""
    _root, a, b = hosts
    model = disk(tmp_path, "vm", seed)
    contents = {a.backup("vm", model).id: model.copy_of_content()}
    stalled = stalled_backup(b, tmp_path, monkeypatch, "other", seed + 1)
    model.random_changes(4)
    contents[a.backup("vm", model).id] = model.copy_of_content()
    return contents, stalled, write_checkpoint(a.repo.store, a.repo.index)


def test_entries_compacted_while_a_backup_runs_are_never_committed_again(
        hosts, tmp_path, monkeypatch):
    """b's backup refreshed at its lock and is between two commits (its packs uploaded) when a
    gc whose clock runs two hours ahead of the checkpoint writer's compacts the journal past
    b's cache. b's next commits refresh without the head check: were the compaction allowed,
    b would take the gap for the head and commit at seqs the checkpoint covers, entries no
    other host ever reads (its point lost to them, its packs planned as unknown objects). The
    compactor must judge a checkpoint's age on its own clock, from when it first saw it."""
    root, a, _b = hosts
    contents, stalled, seq = checkpointed_past_a_stalled_backup(hosts, tmp_path, monkeypatch, 28)
    move_clocks(monkeypatch, skew=2 * STALE_AFTER, wall=("checkpoint",))  # the compactor's clock
    assert compact(a.repo.store, a.repo.index, grace=0) == 0  # first seen now
    contents[stalled.finish().id] = stalled.model.copy_of_content()
    restores_everything(root, tmp_path, contents)
    # an hour later on the compactor's own clock, the entries go; every point stays
    move_clocks(monkeypatch, STALE_AFTER, wall=())
    assert compact(a.repo.store, a.repo.index, grace=0) == seq
    restores_everything(root, tmp_path, contents)


def test_a_backup_whose_clock_was_set_back_loads_the_checkpoint_compacted_past_its_cache(
        hosts, tmp_path, monkeypatch):
    """b's backup refreshed at its lock and spends over an hour between two commits (a large
    upload, its lease renewed), while its clock is set an hour back (NTP correcting a clock that
    ran fast): on that clock it refreshed a moment ago. Meanwhile a compacted the journal past
    b's cache, having seen the checkpoint for an hour. b's next commit refreshes without the head
    check: it must judge its cache stale on a clock no setting moves and load the checkpoint
    (before, it took the gap for the head and committed its point at a seq the checkpoint
    covers, an entry no other host reads)."""
    root, a, _b = hosts
    contents, stalled, seq = checkpointed_past_a_stalled_backup(hosts, tmp_path, monkeypatch, 30)
    assert compact(a.repo.store, a.repo.index, grace=0) == 0  # first seen now
    # an hour passes, and the wall clock, set an hour back, shows none of it
    move_clocks(monkeypatch, STALE_AFTER + 1, skew=-(STALE_AFTER + 1), wall=("checkpoint",))
    assert compact(a.repo.store, a.repo.index, grace=0) == seq
    contents[stalled.finish().id] = stalled.model.copy_of_content()
    restores_everything(root, tmp_path, contents)


def test_a_backup_whose_clocks_stood_still_loads_the_checkpoint_compacted_past_its_cache(
        hosts, tmp_path, monkeypatch):
    """b's backup is between two commits (its packs uploaded) when its VM is paused for over an
    hour: on its clocks no time passed, so its cache looks fresh. Meanwhile a compacted the
    journal past b's cache. b's next commit finds the entry its cache stopped at gone: it loads
    the checkpoint and commits at the head (else it would take the gap for the head and commit
    where no other host reads: its point lost to them, its packs planned as unknown objects)."""
    root, a, b = hosts
    contents, stalled, seq = checkpointed_past_a_stalled_backup(hosts, tmp_path, monkeypatch, 31)
    assert compact(a.repo.store, a.repo.index, grace=0) == 0  # first seen now
    move_clocks(monkeypatch, STALE_AFTER + 1, wall=("checkpoint",))  # a's clocks
    assert compact(a.repo.store, a.repo.index, grace=0) == seq
    monkeypatch.setattr(b.repo.index, "refreshed_ago", lambda: 0.0)  # b's clocks stood still
    contents[stalled.finish().id] = stalled.model.copy_of_content()
    restores_everything(root, tmp_path, contents)


def test_a_gc_whose_clock_runs_ahead_never_sweeps_what_a_live_backup_uploaded(
        hosts, tmp_path, monkeypatch):
    """b's backup is live (its lease renewed on time by its own clock) with a pack uploaded
    and not yet in an entry; a's clock runs more than a lease ahead of b's, and gc runs with a
    short grace period. Judged on b's clock alone, b's lease looks expired to a: gc would sweep
    b's pack, and b, whose own checks pass, would then catalogue a point naming it. gc must
    sweep only once it has seen the lease unchanged, on its own clock, for as long as its
    holder could still hold it."""
    root, a, b = hosts
    model = disk(tmp_path, "vm", 38)
    contents = {a.backup("vm", model).id: model.copy_of_content()}
    stalled = stalled_backup(b, tmp_path, monkeypatch, "other", 39)
    uploaded = pack_bytes(a.repo.store)
    move_clocks(monkeypatch, skew=b.repo.lease_seconds + 60, wall=("shared_gc",))  # gc's alone
    first = gc(a.repo, grace=0)
    assert (first.plans_swept, first.plans_pending) == (0, 1)
    assert gc(a.repo, grace=0).plans_swept == 0  # seen again at once: b may still hold it
    assert pack_bytes(a.repo.store) == uploaded
    contents[stalled.finish().id] = stalled.model.copy_of_content()
    pending = len(a.repo.index.pending_plans())
    assert pending and gc(a.repo, grace=0).plans_swept >= pending  # b's lease is gone
    assert a.repo.index.pending_plans() == []
    restores_everything(root, tmp_path, contents)


def test_a_gc_suspended_after_listing_the_leases_never_sweeps_what_a_live_backup_uploaded(
        hosts, tmp_path, monkeypatch):
    """gc saw b's live lease, listed it again a minute later and its host then slept a lease
    before gc read its clock (b renewing meanwhile): the lease was seen unchanged for that
    minute, not for the sleep (before, gc swept the packs b uploaded and is about to commit)."""
    root, a, b = hosts
    model = disk(tmp_path, "vm", 41)
    contents = {a.backup("vm", model).id: model.copy_of_content()}
    clock = [sightings.monotonic()]
    monkeypatch.setattr(sightings, "monotonic", lambda: clock[0])
    stalled = stalled_backup(b, tmp_path, monkeypatch, "other", 42)
    uploaded = pack_bytes(a.repo.store)
    first = gc(a.repo, grace=0)
    assert (first.plans_swept, first.plans_pending) == (0, 1)
    clock[0] += 60
    listing = shared_gc.list_leases

    def listed_then_suspended(store):
        found = listing(store)
        clock[0] += b.repo.lease_seconds
        for lease in (lease for held in b.repo.held for lease in held.leases):
            lease.renew()  # what b's daemon did meanwhile
        return found
    monkeypatch.setattr(shared_gc, "list_leases", listed_then_suspended)
    assert gc(a.repo, grace=0).plans_swept == 0
    assert pack_bytes(a.repo.store) == uploaded
    contents[stalled.finish().id] = stalled.model.copy_of_content()
    restores_everything(root, tmp_path, contents)


def test_a_lease_left_by_a_dead_holder_is_swept_past_once_seen_unchanged_long_enough(
        hosts, tmp_path, monkeypatch):
    """A lease whose holder died stays in the store unchanged: gc sweeps past it once it has
    seen it so, on its own clock, for the lease's span (expiry less start: at least its
    duration) and the grace period, not at once although it expired on its holder's clock."""
    from test_leases import crashed

    root, a, _b = hosts
    model = disk(tmp_path, "vm", 40)
    doomed = a.backup("vm", model)
    model.random_changes(4)
    kept = a.backup("vm", model)
    forget_points(a.repo, [doomed.id])
    crashed(a.repo.store, "leases/otherhost-4242-0badf00d.lease", leases.SESSION,
            "backup image dead", ago=60)  # span: an hour
    first = gc(a.repo, grace=0)
    assert (first.plans_swept, first.plans_pending) == (0, 1)
    move_clocks(monkeypatch, 3600 - 60, wall=("shared_gc",))  # on gc's host
    assert gc(a.repo, grace=0).plans_swept == 0
    move_clocks(monkeypatch, 3600 + 1, wall=("shared_gc",))
    assert gc(a.repo, grace=0).plans_swept == 1
    restores_everything(root, tmp_path, {kept.id: model.copy_of_content()})
