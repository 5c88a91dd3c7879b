"""gc and forget on a shared repository (maintenance/shared_gc.py, forget.py): plans, leases,
the grace period and sweeps, with hosts that have their own caches writing one local shared
repository (and one run on S3). Every test ends by restoring what is catalogued."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from helpers import DiskModel, attach_shared, cli, move_clocks, shared_repo, stopped_before_commit
from repo_engine.maintenance.forget import forget_points
from repo_engine.maintenance.gc import gc
from repo_engine.repository import journal
from repo_engine.repository.journal import PlanOp, SweepOp, entry_seqs, read_entry
from repo_engine.repository.locks import SHARED
from repo_engine.repository.points import new_point_id, now_iso
from repo_engine.repository.store.local import LocalStore
from s3cli import leftovers, places
from test_shared_repo import Host, disk, hosts  # noqa: F401 (the two hosts fixture)


def pack_bytes(store) -> int:
    return sum(info.size for info in store.list("packs/"))


def objects(store) -> set[str]:
    """The names of the store's packs, maps and manifests."""
    return {i.name for kind in ("packs/", "maps/", "points/") for i in store.list(kind)}


def head(store) -> int:
    return max(entry_seqs(store), default=0)


def map_refs(repo, point) -> np.ndarray:
    """The chunk refs a point's maps name (ZERO, ref 0, is no chunk)."""
    refs = np.unique(np.concatenate([repo.read_map(d.map).refs for d in point.disks]))
    return refs[refs != 0]


def plans_in_journal(store) -> list[PlanOp]:
    return [op for seq in sorted(entry_seqs(store)) for op in read_entry(store, seq).ops
            if isinstance(op, PlanOp)]


def restores_everything(root: Path, tmp_path: Path, contents: dict) -> None:
    """A fresh host sees exactly the points of `contents` and restores each byte-identical."""
    fresh = Host(attach_shared(LocalStore(root), tmp_path / f"cache-{os.urandom(4).hex()}"))
    fresh.repo.refresh()
    assert {p.id for p in fresh.repo.points()} == set(contents)
    for point in fresh.repo.points():
        assert fresh.restored(point, tmp_path) == contents[point.id]
    fresh.repo.close()


def backups(host: Host, tmp_path: Path, vms: int, chain: int) -> tuple[list, dict]:
    """`vms` VMs of `chain` points each (changes between them): the points, their contents by
    id."""
    points, contents = [], {}
    for v in range(vms):
        model = disk(tmp_path, f"vm{v}", 100 + v)
        for _ in range(chain):
            point = host.backup(f"vm{v}", model)
            points.append(point)
            contents[point.id] = model.copy_of_content()
            model.random_changes(3)
    return points, contents


def test_forget_half_then_gc_reclaims_their_packs_and_the_rest_restores(hosts, tmp_path):
    root, a, b = hosts
    points, contents = backups(a, tmp_path, vms=4, chain=3)
    store = a.repo.store
    # half: two whole VMs (their packs die whole) and the middle point of each other chain
    # (its child is consolidated onto the first point in the same journal entry)
    forgotten = [p.id for p in points if p.vm in ("vm0", "vm1")]
    forgotten += [p.id for p in points if p.vm in ("vm2", "vm3")][1::3]
    before_head = head(store)
    report = forget_points(b.repo, forgotten)
    assert sorted(report.removed) == sorted(forgotten) and len(report.rewritten) == 2
    assert head(store) == before_head + 1  # the whole forget is one journal entry
    kept = {i: content for i, content in contents.items() if i not in forgotten}
    restores_everything(root, tmp_path, kept)

    before = pack_bytes(store)
    result = gc(a.repo, grace=0)
    assert result.plans_swept == 1 and result.plans_pending == 0
    assert result.packs_deleted >= 2 and result.chunks_dropped > 0
    assert result.freed_bytes > 0 and pack_bytes(store) == before - result.freed_bytes
    assert result.manifests_deleted == len(forgotten)  # left by forget, removed by gc
    restores_everything(root, tmp_path, kept)

    # a second run finds nothing: no entry, no object removed
    before, seq = pack_bytes(store), head(store)
    again = gc(b.repo, grace=0)
    assert (again.candidates, again.plans_swept, again.freed_bytes) == (0, 0, 0)
    assert head(store) == seq and pack_bytes(store) == before
    restores_everything(root, tmp_path, kept)


def test_a_plan_waits_for_the_grace_period(hosts, tmp_path):
    root, a, _b = hosts
    (doomed, kept), contents = backups(a, tmp_path, vms=2, chain=1)
    forget_points(a.repo, [doomed.id])
    before = pack_bytes(a.repo.store)
    planned = gc(a.repo, grace=3600)
    assert planned.planned_packs >= 1 and (planned.plans_swept, planned.plans_pending) == (0, 1)
    assert pack_bytes(a.repo.store) == before
    assert gc(a.repo, grace=3600).plans_swept == 0  # still within the grace period
    swept = gc(a.repo, grace=0)  # the same plan, now past a grace period of 0
    assert swept.plans_swept == 1 and swept.candidates == 0
    assert pack_bytes(a.repo.store) < before
    restores_everything(root, tmp_path, {kept.id: contents[kept.id]})


def test_a_session_holding_a_lease_from_before_the_plan_keeps_it_from_being_swept(hosts,
                                                                                    tmp_path):
    root, a, b = hosts
    (doomed, kept), contents = backups(a, tmp_path, vms=2, chain=1)
    forget_points(a.repo, [doomed.id])
    before = pack_bytes(a.repo.store)
    with b.repo.vm_lock("vm9", "backup image vm9") as vm_lock, \
            b.repo.lock(SHARED, "backup image vm9") as session:
        planned = gc(a.repo, grace=0)
        assert (planned.plans_swept, planned.plans_pending) == (0, 1)
        [plan] = a.repo.index.pending_plans()
        assert vm_lock.leases  # the VM lock in the store is not a session: not waited for
        assert plan.leases == [session.leases[0].name]  # gc's own leases are not waited for
        assert gc(a.repo, grace=0).plans_swept == 0
        assert pack_bytes(a.repo.store) == before
    swept = gc(a.repo, grace=0)
    assert swept.plans_swept == 1 and pack_bytes(a.repo.store) < before
    restores_everything(root, tmp_path, {kept.id: contents[kept.id]})


def test_a_backup_started_after_the_plan_never_dedups_against_doomed_chunks(hosts, tmp_path):
    root, a, b = hosts
    model = disk(tmp_path, "vm", 7)
    first = a.backup("vm", model)
    content = model.copy_of_content()
    forget_points(a.repo, [first.id])
    with b.repo.lock(SHARED, "restore vm8"):  # keeps the plan pending
        gc(a.repo, grace=0)
        [plan] = plans_in_journal(a.repo.store)
        again = b.backup("vm", model)  # same content, after the plan: stored afresh
    assert again.counters["new_chunks"] > 0 and again.counters["dup_blocks"] == 0
    assert not np.isin(map_refs(b.repo, again), plan.refs).any()
    assert again.disks[0].map not in plan.maps  # same content, salted name
    assert gc(a.repo, grace=0).plans_swept == 1
    restores_everything(root, tmp_path, {again.id: content})


def test_a_chunk_used_again_by_a_backup_from_before_the_plan_is_never_deleted(
        hosts, tmp_path, monkeypatch):
    """b's backup looks its chunks up (finding the ones of a point about to be forgotten), then
    stops before its commit; the point is forgotten and gc plans; b commits using doomed chunks.
    The sweep recounts: those chunks and their pack stay."""
    root, a, b = hosts
    model = disk(tmp_path, "vm", 8)
    first = a.backup("vm", model)
    content = model.copy_of_content()
    with stopped_before_commit(lambda: b.backup("vm2", model), tmp_path, monkeypatch) as done:
        forget_points(a.repo, [first.id])
        planned = gc(a.repo, grace=0)
        assert planned.plans_pending == 1 and planned.packs_deleted == 0  # waits for b's lease
    [late] = done
    [plan] = plans_in_journal(a.repo.store)
    assert np.isin(map_refs(b.repo, late), plan.refs).all()  # deduplicated before the plan
    swept = gc(a.repo, grace=0)
    assert swept.plans_swept == 1 and swept.resurrected == len(plan.refs)
    assert swept.packs_kept_live == len(plan.packs) and swept.packs_deleted == 0
    restores_everything(root, tmp_path, {late.id: content})


def test_a_sweep_racing_a_commit_recounts_and_keeps_what_the_commit_uses(hosts, tmp_path,
                                                                         monkeypatch):
    """A point using doomed chunks (a backup stalled past its lease) is committed by b between
    gc's catch-up and its sweep entry: gc loses the seq, catches up, marks again and keeps them."""
    root, a, b = hosts
    model = disk(tmp_path, "vm", 9)
    first = a.backup("vm", model)
    content = model.copy_of_content()
    b.repo.refresh()  # b's cache still finds the chunks
    stalled = replace(first, id=new_point_id("vm", now_iso()), seq=0,
                      disks=[replace(d) for d in first.disks])
    forget_points(a.repo, [first.id])
    with b.repo.lock(SHARED, "restore vm8"):
        gc(a.repo, grace=0)  # the plan, pending
    write = journal.write_entry
    raced: list[int] = []

    def racing(store, entry, *sealer):
        if not raced and any(isinstance(op, SweepOp) for op in entry.ops):
            raced.append(entry.seq)
            b.repo.commit_point(stalled)
        write(store, entry, *sealer)

    monkeypatch.setattr(journal, "write_entry", racing)
    swept = gc(a.repo, grace=0)
    assert raced and swept.plans_swept == 1 and swept.resurrected > 0
    sweep = next(op for op in read_entry(a.repo.store, raced[0] + 1).ops)
    assert isinstance(sweep, SweepOp) and len(sweep.refs) == 0 and sweep.packs == []
    restores_everything(root, tmp_path, {stalled.id: content})


def test_gc_and_forget_commands_on_a_shared_repository(tmp_path, capsys):
    root = tmp_path / "repo"
    host = Host(shared_repo(root, root))  # the CLI's commands catch up in caches of their own
    (doomed, kept), contents = backups(host, tmp_path, vms=2, chain=1)
    host.repo.close()
    removed = cli(capsys, "forget", root, doomed.id[:8])
    assert removed.code == 0, removed.err
    planned = cli(capsys, "gc", root)
    assert planned.code == 0, planned.err
    assert "0 swept, 1 pending (grace 86400 s); planned " in planned.out
    swept = cli(capsys, "gc", root, "--grace", "0s", "--json")
    assert swept.code == 0, swept.err
    doc = swept.json()
    assert doc["plans_swept"] == 1 and doc["packs_deleted"] >= 1
    refused = cli(capsys, "gc", root, "--grace", "soon")
    assert refused.code == 2 and "--grace: not a duration" in refused.err
    restores_everything(root, tmp_path, {kept.id: contents[kept.id]})


def test_forget_and_gc_on_s3(seaweedfs, s3_bucket, tmp_path, monkeypatch):
    from repo_engine.repository.config import RepoConfig
    from repo_engine.repository.repo import Repository
    from repo_engine.repository.store.s3 import S3Store
    from test_store_s3 import settings_for

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    store = S3Store(f"s3://{s3_bucket}/repo", settings_for(seaweedfs.endpoint))
    first = Repository.create(store, tmp_path / "cache-a", RepoConfig.new(shared=True))
    a, b = Host(first), Host(attach_shared(store, tmp_path / "cache-b"))
    points, contents = backups(a, tmp_path, vms=2, chain=2)
    forget_points(b.repo, [points[0].id, points[1].id, points[2].id])  # vm0, and vm1's base
    before = pack_bytes(store)
    result = gc(b.repo, grace=0)
    assert result.plans_swept == 1 and pack_bytes(store) < before
    a.repo.refresh()
    assert {p.id for p in a.repo.points()} == {points[3].id}
    for point in a.repo.points():
        assert a.restored(point, tmp_path) == contents[point.id]
    assert gc(a.repo, grace=0).candidates == 0
    a.repo.close()
    b.repo.close()


def test_gc_aborts_the_multipart_uploads_a_dead_process_left(seaweedfs, s3_bucket, tmp_path,
                                                              monkeypatch):
    """An upload begun and never finished (its process died) holds stored parts no object
    names: gc aborts it once it is older than the grace period and a lease's duration, and
    leaves a younger one, which a live backup may still be sending."""
    from repo_engine.repository.config import RepoConfig
    from repo_engine.repository.repo import Repository
    from repo_engine.repository.store.s3 import S3Store
    from s3server import admin_client
    from test_store_s3 import settings_for

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    store = S3Store(f"s3://{s3_bucket}/repo", settings_for(seaweedfs.endpoint))
    host = Host(Repository.create(store, tmp_path / "cache", RepoConfig.new(shared=True)))
    admin = admin_client(seaweedfs)
    upload = admin.create_multipart_upload(Bucket=s3_bucket, Key="repo/packs/00/dead.pack")
    admin.upload_part(Bucket=s3_bucket, Key="repo/packs/00/dead.pack", PartNumber=1,
                      UploadId=upload["UploadId"], Body=b"x" * 1024)
    assert gc(host.repo, grace=0).uploads_aborted == 0  # younger than a lease: may be live
    assert [u.name for u in store.pending_uploads()] == ["packs/00/dead.pack"]
    move_clocks(monkeypatch, host.repo.lease_seconds + 60, wall=("shared_gc",))
    assert gc(host.repo, grace=0).uploads_aborted == 1
    assert list(store.pending_uploads()) == []
    host.repo.close()


def test_gc_writes_a_checkpoint_and_compacts_the_journal_a_fresh_host_starts_from(
        hosts, tmp_path, monkeypatch):
    from repo_engine.repository import checkpoint
    from repo_engine.repository.journal import RefsOp

    root, a, b = hosts
    points, contents = backups(a, tmp_path, vms=2, chain=2)
    forget_points(b.repo, [points[0].id])
    for _ in range(checkpoint.CHECKPOINT_EVERY):  # other hosts' commits: ref claims
        b.repo.commit_journal(lambda _seq: [RefsOp(b.repo.index.meta_u64("next_ref"), 1)])
    store = a.repo.store
    first = gc(a.repo, grace=0)
    assert first.checkpoint == head(store) and first.entries_compacted == 0  # an hour first
    monkeypatch.setattr(checkpoint, "STALE_AFTER", 0.0)
    second = gc(a.repo, grace=0)
    assert second.checkpoint == 0 and second.entries_compacted == first.checkpoint
    assert min(entry_seqs(store), default=first.checkpoint + 1) > first.checkpoint
    restores_everything(root, tmp_path, {p.id: contents[p.id] for p in points[1:]})


def test_a_gc_that_died_between_plan_and_waits_is_finished_by_the_next(hosts, tmp_path,
                                                                       monkeypatch):
    """The next gc waits for every session of its own time instead (any session of the plan's
    time still running is among them), and sweeps in the same run when there is none."""
    from repo_engine.maintenance import shared_gc

    _root, a, b = hosts
    points, _contents = backups(a, tmp_path, vms=2, chain=1)

    def plan_and_die(point) -> None:
        forget_points(a.repo, [point.id])
        with monkeypatch.context() as patched:
            patched.setattr(shared_gc, "_commit_waits", _killed)
            with pytest.raises(KeyboardInterrupt):
                gc(a.repo, grace=0)
        b.repo.refresh()
        assert [p.leases for p in b.repo.index.pending_plans()] == [None]

    plan_and_die(points[0])
    before = pack_bytes(a.repo.store)
    with a.repo.lock(SHARED, "restore vm1") as session:
        assert gc(b.repo, grace=0).plans_swept == 0
        assert b.repo.index.pending_plans()[0].leases == [session.leases[0].name]
    assert gc(b.repo, grace=0).plans_swept == 1 and pack_bytes(a.repo.store) < before
    plan_and_die(points[1])
    assert gc(b.repo, grace=0).plans_swept == 1  # no session: swept in the same run
    assert pack_bytes(a.repo.store) == 0 and b.repo.index.pending_plans() == []


def _killed(*_args: object) -> None:
    raise KeyboardInterrupt  # the process is killed right after the plan's commit


def test_gc_dry_run_on_a_shared_repository_commits_nothing(hosts, tmp_path):
    root, a, _b = hosts
    (doomed, kept), contents = backups(a, tmp_path, vms=2, chain=1)
    forget_points(a.repo, [doomed.id])
    seq, before = head(a.repo.store), pack_bytes(a.repo.store)
    report = gc(a.repo, grace=0, dry_run=True)
    assert report.dry_run and report.candidates > 0 and report.planned_packs >= 1
    assert head(a.repo.store) == seq and pack_bytes(a.repo.store) == before
    assert a.repo.index.pending_plans() == []
    restores_everything(root, tmp_path, {kept.id: contents[kept.id]})


def test_a_gc_that_died_after_its_sweep_entry_leaves_objects_the_next_one_removes(
        hosts, tmp_path, monkeypatch):
    from repo_engine.maintenance import shared_gc

    root, a, b = hosts
    (doomed, kept), contents = backups(a, tmp_path, vms=2, chain=1)
    forget_points(a.repo, [doomed.id])
    before = pack_bytes(a.repo.store)
    with monkeypatch.context() as patched:
        patched.setattr(shared_gc, "_delete", _killed)
        with pytest.raises(KeyboardInterrupt):
            gc(a.repo, grace=0)
    assert pack_bytes(a.repo.store) == before  # swept in the journal, still in the store
    again = gc(b.repo, grace=0)
    assert again.plans_swept == 1 and again.orphan_packs_deleted >= 1
    assert again.freed_bytes > 0 and pack_bytes(a.repo.store) == before - again.freed_bytes
    restores_everything(root, tmp_path, {kept.id: contents[kept.id]})


def test_partly_used_packs_are_kept_and_what_a_repack_would_cost_is_reported(hosts, tmp_path):
    from repo_engine.maintenance.inventory import scan_refs

    root, a, _b = hosts
    model = disk(tmp_path, "vm", 11)
    first = a.backup("vm", model)
    model.random_changes(8)  # the second point overwrites part of the first's chunks
    second = a.backup("vm", model)
    forget_points(a.repo, [first.id])  # the second becomes a full map: part of pack 1 dies
    with a.repo.index.env.begin() as txn:
        table = scan_refs(a.repo.index, txn)
    used = np.isin(table["ref"], map_refs(a.repo, a.repo.points()[0]))
    first_pack = table["pack"] == table["pack"][table["ref"] == map_refs(a.repo, first)[0]]
    live = int(table["stored"][first_pack & used].sum())
    assert 0 < live < int(table["stored"][first_pack].sum())
    before = pack_bytes(a.repo.store)
    report = gc(a.repo, grace=0, max_unused=0)
    assert report.plans_swept == 1 and report.packs_deleted == 0  # nothing dies whole
    assert (report.repack_packs, report.repack_write_bytes) == (1, live)
    assert live <= report.repack_read_bytes < before  # the gaps of a coalesced GET are read
    assert report.repack_requests == 3  # one GET, one PUT, one DELETE
    assert pack_bytes(a.repo.store) == before  # a report only: no pack rewritten
    restores_everything(root, tmp_path, {second.id: model.copy_of_content()})


def test_gc_checks_its_leases_before_each_batch_of_deletes(hosts, tmp_path, monkeypatch):
    """After `unlock --force` removed its leases, gc stops before its next batch; what it had
    not deleted yet, the next gc removes."""
    from repo_engine.maintenance import shared_gc
    from repo_engine.repository.leases import LeaseLost, clear_leases

    root, a, b = hosts
    points, contents = backups(a, tmp_path, vms=3, chain=1)
    forget_points(a.repo, [points[0].id, points[1].id])
    store = a.repo.store
    before, listed = pack_bytes(store), objects(store)
    delete, batches = store.delete, []

    def forced_unlock_after_one(names):
        names = list(names)
        delete(names)
        if names and not any(n.startswith("leases/") for n in names):  # one of gc's batches
            batches.append(names)
            clear_leases(store, None, force=True)

    with monkeypatch.context() as patched:
        patched.setattr(shared_gc, "DELETE_BATCH", 1)
        patched.setattr(store, "delete", forced_unlock_after_one)
        with pytest.raises(LeaseLost, match="was removed .* this 'gc' stops before it writes"):
            gc(a.repo, grace=0)
    assert len(batches) == 1 and len(batches[0]) == 1
    assert objects(store) == listed - set(batches[0])  # the rest was left for the next gc
    again = gc(b.repo, grace=0)
    assert again.plans_swept == 1 and pack_bytes(store) < before
    assert not any(name.endswith(".point") and points[0].id in name
                   for name in (i.name for i in store.list("points/")))
    restores_everything(root, tmp_path, {points[2].id: contents[points[2].id]})


# -- repack ------------------------------------------------------------------------------------
def unused_bytes(root: Path, tmp_path: Path) -> int:
    """Stored bytes in the packs of chunks no catalogued point uses (or stale copies), seen by a
    host that never saw the repository."""
    return leftovers(str(root), tmp_path / f"check-{os.urandom(4).hex()}").unused_bytes


def test_gc_repack_leaves_only_used_chunks_and_every_host_agrees(hosts, tmp_path):
    """Forgetting every other point leaves packs partly used: gc drops none of them and reports
    what a repack would cost; `repack` rewrites them, and a sweep deletes the old ones. The host
    that repacked, a host replaying its entries, a host starting from a checkpoint and
    rebuild-index place every chunk alike."""
    from repo_engine.maintenance.rebuild import rebuild_cache
    from repo_engine.repository.checkpoint import write_checkpoint

    root, a, b = hosts
    points, contents = backups(a, tmp_path, vms=2, chain=4)
    forgotten = [p.id for p in points][::2]
    forget_points(b.repo, forgotten)
    kept = {i: content for i, content in contents.items() if i not in forgotten}
    plain = gc(a.repo, grace=0)
    assert plain.plans_swept == 1 and plain.repack_packs > 0 and plain.packs_repacked == 0
    assert unused_bytes(root, tmp_path) > 0
    assert gc(a.repo, grace=0, max_unused=100, repack=True).packs_repacked == 0  # threshold

    store, before = a.repo.store, pack_bytes(a.repo.store)
    report = gc(a.repo, grace=0, max_unused=0, repack=True)
    assert report.packs_repacked == plain.repack_packs and report.packs_written >= 1
    assert report.repacked_read_bytes == plain.repack_read_bytes  # the cost reported first
    assert report.repacked_requests == plain.repack_requests - 1 + report.packs_written
    assert report.plans_swept == 1 and report.packs_deleted == report.packs_repacked
    assert report.freed_bytes == report.repacked_old_bytes and report.repack_packs == 0
    assert pack_bytes(store) == before - report.repacked_old_bytes + report.repacked_written_bytes
    assert unused_bytes(root, tmp_path) == 0
    restores_everything(root, tmp_path, kept)

    b.repo.refresh()
    assert places(b.repo) == places(a.repo) and b.repo.index.counters() == a.repo.index.counters()
    write_checkpoint(store, a.repo.index)
    fresh = attach_shared(LocalStore(root), tmp_path / "cache-fresh")
    fresh.refresh()
    assert fresh.index.journal_seq == a.repo.index.journal_seq
    assert places(fresh) == places(a.repo) and fresh.index.counters() == a.repo.index.counters()
    fresh.close()
    rebuild_cache(b.repo)  # rebuild-index: the checkpoint, then no entry
    assert places(b.repo) == places(a.repo) and b.repo.index.counters() == a.repo.index.counters()
    again = gc(b.repo, grace=0, max_unused=0, repack=True)
    assert (again.candidates, again.packs_repacked, again.freed_bytes) == (0, 0, 0)


def test_a_gc_killed_between_its_new_pack_and_the_pack_entry_leaves_the_repository_whole(
        hosts, tmp_path, monkeypatch):
    """The new pack is in the store, no entry names it: every host still places the chunks in
    the old packs, and the next gc finishes the repack (the same pack again: its content is
    the same) and leaves nothing unused."""
    from repo_engine.maintenance import shared_gc

    root, a, b = hosts
    points, contents = backups(a, tmp_path, vms=1, chain=4)
    forget_points(a.repo, [points[0].id, points[2].id])
    kept = {p.id: contents[p.id] for p in (points[1], points[3])}
    gc(a.repo, grace=0)
    listed, placed = objects(a.repo.store), places(a.repo)

    def killed(name: str) -> None:
        if name == "gc.repacked":
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(shared_gc, "pause_point", killed)
        with pytest.raises(KeyboardInterrupt):
            gc(a.repo, grace=0, max_unused=0, repack=True)
    orphans = objects(a.repo.store) - listed
    assert len(orphans) == 1 and next(iter(orphans)).startswith("packs/")
    b.repo.refresh()
    assert places(a.repo) == placed == places(b.repo)
    restores_everything(root, tmp_path, kept)

    again = gc(b.repo, grace=0, max_unused=0, repack=True)
    assert again.packs_repacked >= 1 and again.plans_swept == 1
    assert orphans <= objects(a.repo.store)
    assert unused_bytes(root, tmp_path) == 0 and leftovers(str(root), tmp_path / "c").packs == []
    restores_everything(root, tmp_path, kept)


def test_a_backup_running_during_a_repack_commits_and_keeps_what_it_uses(hosts, tmp_path,
                                                                        monkeypatch):
    """b backs up a disk holding a forgotten point's content while a repacks: b deduplicates
    against chunks the repack moves (their refs stay valid) and against unused chunks it
    leaves in the old pack, which the plan dooms. The sweep waits for b, keeps what b's point
    uses and the old pack holding it; the next repack moves those too."""
    root, a, b = hosts
    model = disk(tmp_path, "x", 21)
    first = a.backup("x", model)
    old_content = model.copy_of_content()
    model.random_changes(8)
    second = a.backup("x", model)
    forget_points(a.repo, [first.id])
    copy = DiskModel(tmp_path / "y.img", len(old_content), np.random.default_rng(0))
    copy.write(0, old_content)
    with stopped_before_commit(lambda: b.backup("y", copy), tmp_path, monkeypatch) as done:
        during = gc(a.repo, grace=0, max_unused=0, repack=True)
        assert during.packs_repacked == 1 and during.plans_swept == 0  # waits for b
    late = done[0]
    kept = {second.id: model.copy_of_content(), late.id: old_content}
    restores_everything(root, tmp_path, kept)
    after = gc(a.repo, grace=0, max_unused=0, repack=True)
    assert after.plans_swept >= 1 and after.resurrected > 0
    assert unused_bytes(root, tmp_path) == 0
    restores_everything(root, tmp_path, kept)


def test_gc_repack_on_s3_killed_after_its_new_pack_then_finished(seaweedfs, s3_bucket, tmp_path,
                                                                monkeypatch, capsys):
    """Real processes on SeaweedFS. After half the points are forgotten, gc reports what a
    repack would cost and does not do it; `gc --repack` killed (SIGKILL) with its new pack in
    the bucket and no entry naming it; the next `gc --repack`, once the killed one's leases
    expired and `unlock` removed them, finishes: the bucket's packs hold nothing but the used chunks, and a host that
    never saw the repository restores every point byte-identical."""
    import time

    from race import Command
    from s3cli import LEASE_SECONDS, bucket_objects, repo_engine, s3_environment

    s3_environment(monkeypatch, tmp_path, seaweedfs.endpoint)
    repo = f"s3://{s3_bucket}/repo"
    assert repo_engine("init", repo, "--no-encryption").code == 0
    model = disk(tmp_path, "vm", 41)
    contents: dict[str, bytes] = {}
    for _ in range(4):
        done = repo_engine("backup", "image", repo, "--vm", "vm", "--disk",
                           f"sda={model.path}", "--json")
        assert done.code == 0, done.err
        contents[done.json()["point"]["id"]] = model.copy_of_content()
        model.random_changes(4)
    forgotten = list(contents)[::2]
    assert repo_engine("forget", repo, *forgotten).code == 0
    kept = {i: data for i, data in contents.items() if i not in forgotten}

    def bucket_pack_bytes() -> int:
        return sum(bucket_objects(seaweedfs, s3_bucket, "repo/packs/").values())

    plain = repo_engine("gc", repo, "--grace", "0s", "--max-unused", "0")
    assert plain.code == 0, plain.err
    assert "would read" in plain.out and "(not done: 'gc --repack' does it)" in plain.out
    before = bucket_pack_bytes()
    repack = ("gc", repo, "--grace", "0s", "--repack", "--max-unused", "0")
    killed = Command(tmp_path, *repack, pauses=("gc.repacked",))
    assert killed.reached("gc.repacked")
    killed.proc.kill()
    killed.finish()
    assert bucket_pack_bytes() > before  # the new pack, which no entry names

    # the killed gc's lease and lock, once expired, removed: else gc waits for its lease
    # until it has seen it unchanged for its span
    time.sleep(LEASE_SECONDS + 1)
    assert repo_engine("unlock", repo).code == 0
    done = repo_engine(*repack, "--json")
    assert done.code == 0, done.err
    doc = done.json()
    assert doc["packs_repacked"] >= 1 and doc["packs_written"] >= 1 and doc["plans_swept"] == 1
    assert doc["repacked_read_bytes"] > 0 and doc["repacked_requests"] >= 3
    assert doc["freed_bytes"] == doc["repacked_old_bytes"]
    left = leftovers(repo, tmp_path / "check")
    assert left.unused_bytes == 0 and left.packs == [] and left.manifests == []
    assert bucket_pack_bytes() < before

    fresh = tmp_path / "new-host"
    for pid, data in kept.items():
        target = tmp_path / f"{pid}.img"
        result = cli(capsys, "restore", repo, pid, "--disk", "sda", "--to", target,
                     "--cache-dir", fresh)
        assert result.code == 0, result.err
        assert target.read_bytes() == data, pid


def test_gc_repack_command_says_what_it_read_wrote_and_frees(tmp_path, capsys):
    root = tmp_path / "repo"
    host = Host(shared_repo(root, root))
    points, contents = backups(host, tmp_path, vms=1, chain=2)
    host.repo.close()
    assert cli(capsys, "forget", root, points[0].id).code == 0
    told = cli(capsys, "gc", root, "--grace", "0s", "--max-unused", "0")
    assert told.code == 0, told.err
    assert "a repack of 1 partly used pack would read " in told.out
    assert "(not done: 'gc --repack' does it)" in told.out
    done = cli(capsys, "gc", root, "--grace", "0s", "--max-unused", "0", "--repack")
    assert done.code == 0, done.err
    assert "  repacked: read back " in done.out and " of 1 partly used pack, wrote " in done.out
    assert "the old packs (" in done.out and "a repack of" not in done.out
    assert "1 swept" in done.out  # the old pack, doomed and swept in the same run
    restores_everything(root, tmp_path, {points[1].id: contents[points[1].id]})


def test_repacked_packs_keep_to_the_pack_size(tmp_path):
    """The chunks of many partly used packs go into new packs of at most the pack size (and
    its trailer), several when they need it, and every point still restores."""
    from repo_engine.repository.packs import ENTRY, FOOTER

    root, size = tmp_path / "repo", 256 * 1024
    host = Host(shared_repo(root, tmp_path / "cache", pack_size=size))
    points, contents = backups(host, tmp_path, vms=2, chain=3)
    forgotten = [p.id for p in points][::2]
    forget_points(host.repo, forgotten)
    gc(host.repo, grace=0)
    before = objects(host.repo.store)
    report = gc(host.repo, grace=0, max_unused=0, repack=True)
    assert report.packs_repacked >= 2 and report.packs_written >= 2
    for name in objects(host.repo.store) - before:
        count = len(host.repo.read_trailer(name.rsplit("/", 1)[1].split(".")[0]))
        assert host.repo.store.size(name) <= size + count * ENTRY.size + FOOTER.size
    assert unused_bytes(root, tmp_path) == 0
    restores_everything(root, tmp_path, {i: c for i, c in contents.items() if i not in forgotten})


def test_a_repack_leaves_a_damaged_pack_alone_and_names_it(hosts, tmp_path):
    """A chunk to copy that fails its check is never written into a new pack: its pack is left
    as it is, named in the report, and the other packs are repacked."""
    from repo_engine.maintenance import shared_gc
    from repo_engine.repository.packs import pack_object

    root, a, _b = hosts
    points, _contents = backups(a, tmp_path, vms=2, chain=3)
    forget_points(a.repo, [p.id for p in points][::2])
    gc(a.repo, grace=0)
    partly = shared_gc._partly_used(a.repo, shared_gc.Marker(a.repo), 0)
    assert len(partly.numbers) >= 2
    row = next(partly.groups(a.repo.index))[1][0]
    name = partly.packs.names[int(row["pack"])][0]
    path = root / pack_object(name)
    data = bytearray(path.read_bytes())
    data[int(row["offset"]) + 7] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    report = gc(a.repo, grace=0, max_unused=0, repack=True)
    assert len(report.damaged_packs_skipped) == 1 and name in report.damaged_packs_skipped[0]
    assert report.packs_repacked == len(partly.numbers) - 1
    assert path.exists() and places(a.repo)[int(row["ref"])][0] == name


def test_a_point_committed_while_a_repack_reads_its_packs_keeps_what_it_uses(
        hosts, tmp_path, monkeypatch):
    """The rows a repack copies are read a group of packs at a time, after its mark: b commits
    a point using chunks the mark found unused while a reads its groups (one pack each). The
    repack leaves those chunks in their old pack, and the plan and the sweep of the same run
    keep it: every catalogued point restores."""
    from repo_engine.maintenance import shared_gc

    root, a, b = hosts
    points, contents = backups(a, tmp_path, vms=2, chain=2)
    b.repo.refresh()  # b's cache still finds the forgotten points' chunks
    forgotten = [p for p in points if p.seq == min(q.seq for q in points if q.vm == p.vm)]
    stalled = [replace(p, id=new_point_id(p.vm, now_iso()), seq=0,
                       disks=[replace(d) for d in p.disks]) for p in forgotten]
    forget_points(a.repo, [p.id for p in forgotten])
    kept = {i: c for i, c in contents.items() if i not in {p.id for p in forgotten}}
    kept.update({s.id: contents[p.id] for s, p in zip(stalled, forgotten)})
    monkeypatch.setattr(shared_gc, "GROUP_ROWS", 1)
    read = shared_gc.refs_in_packs
    groups: list[int] = []

    def racing(index, txn, numbers):
        if len(groups) < len(stalled):  # one point before each of the first groups is read
            b.repo.commit_point(stalled[len(groups)])
        groups.append(len(numbers))
        return read(index, txn, numbers)

    monkeypatch.setattr(shared_gc, "refs_in_packs", racing)
    report = gc(a.repo, grace=0, max_unused=0, repack=True)
    assert len(groups) >= 2 and report.packs_repacked >= 2 and report.resurrected == 0
    restores_everything(root, tmp_path, kept)
    monkeypatch.undo()
    gc(a.repo, grace=0, max_unused=0, repack=True)  # the next run moves what b's points use
    assert unused_bytes(root, tmp_path) == 0
    restores_everything(root, tmp_path, kept)


def test_a_lease_left_by_a_holder_whose_clock_ran_ahead_is_waited_for_a_lease_only(
        hosts, tmp_path, monkeypatch):
    """A backup on a host whose clock ran two hours ahead died: its lease expires two hours on
    by gc's clock. gc has seen it unchanged for a lease, which is what tells it ended (its
    holder's own check stops it by then), and sweeps: its holder's times, of another clock,
    neither hasten nor delay that (before, gc waited two hours more, and forever for a record
    whose expiry was years ahead)."""
    from repo_engine.repository import leases

    root, a, _b = hosts
    (doomed, kept), contents = backups(a, tmp_path, vms=2, chain=1)
    forget_points(a.repo, [doomed.id])
    ahead = leases.now() + timedelta(hours=2)
    dead = leases.LeaseInfo(leases.SESSION, "hostc", 4242, "backup image vm9",
                            leases.iso(ahead - timedelta(hours=1)),
                            leases.iso(ahead + timedelta(seconds=600)), "0123456789abcdef",
                            600.0, "fedcba9876543210")
    leases.write_lease(a.repo.store, "leases/hostc-4242-01234567.lease", dead)
    assert gc(a.repo, grace=0).plans_pending == 1
    move_clocks(monkeypatch, 601, wall=("shared_gc",))
    assert gc(a.repo, grace=0).plans_swept == 1
    restores_everything(root, tmp_path, {kept.id: contents[kept.id]})
