"""A shared repository attacked the way a crash, a stalled process, another host or a damaged
store would: every test ends with what is catalogued restoring byte-identically, or with a loud
refusal, never with a point naming data that is gone."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from helpers import attach_shared
from repo_engine.maintenance.gc import gc
from repo_engine.repository import leases
from repo_engine.repository.leases import LeaseLost
from repo_engine.repository.locks import SHARED
from repo_engine.repository.repo import Repository
from repo_engine.repository.store.local import LocalStore
from test_shared_gc import pack_bytes, restores_everything
from test_shared_repo import Host, disk, hosts  # noqa: F401 (the two hosts fixture)


def stall_after_upload(repo: Repository, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make `repo`'s backups stop after a pack is in the store, before its journal entry: the
    place a backup suspended (SIGSTOP, a paused VM) leaves an object gc does not know."""
    reached, go = threading.Event(), threading.Event()

    def commit_pack(writer):
        finish = writer.finish

        def stalled():
            finished = finish()
            reached.set()
            go.wait(60)
            return finished

        writer.finish = stalled
        return Repository.commit_pack(repo, writer)

    monkeypatch.setattr(repo, "commit_pack", commit_pack)
    return reached, go


def test_a_lease_renewed_after_it_expired_stays_lost(hosts, monkeypatch):
    """A holder suspended past its expiry resumes; its renewal thread may run before the
    command's next check: the renewal must not bring the lease back (gc may have judged it
    expired and deleted what the holder wrote)."""
    _root, a, _b = hosts
    with a.repo.lock(SHARED, "backup image web1") as held:
        [lease] = held.leases
        later = leases.now() + timedelta(seconds=a.repo.lease_seconds + 1)
        monkeypatch.setattr(leases, "now", lambda: later)
        lease.renew()  # the daemon, first to run after the resume
        with pytest.raises(LeaseLost, match="expired"):
            a.repo.check_leases()


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
    failed: list[BaseException] = []

    def backup() -> None:
        try:
            b.backup("other", disk(tmp_path, "other", 22))
        except BaseException as exc:  # noqa: BLE001 (what the command reports)
            failed.append(exc)

    thread = threading.Thread(target=backup)
    thread.start()
    assert reached.wait(60)
    uploaded = pack_bytes(a.repo.store)
    later = leases.now() + timedelta(seconds=b.repo.lease_seconds + 1)
    monkeypatch.setattr(leases, "now", lambda: later)
    swept = gc(a.repo, grace=0)
    assert swept.orphan_packs_deleted == 1 and pack_bytes(a.repo.store) < uploaded
    for held in list(b.repo.held):
        for lease in held.leases:
            lease.renew()  # the daemon, first to run after the resume
    go.set()
    thread.join(60)
    assert len(failed) == 1 and isinstance(failed[0], LeaseLost)
    restores_everything(root, tmp_path, {kept.id: content})
