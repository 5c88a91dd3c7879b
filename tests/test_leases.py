"""Leases, the maintenance lock and the VM locks of a shared repository (repository/leases.py),
on a local shared repository and on S3 (SeaweedFS): two hosts (two repositories opened on one
store, each with its own local directory), expiry judged by the holder's clock, takeover of an
expired maintenance lock by exactly one of two racing takers, VM locks, lost renewals, unlock."""

from __future__ import annotations

import os
import socket
import threading
from collections import Counter
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from helpers import attach_shared, cli, move_clocks
from repo_engine.errors import LockedError, RepoError
from repo_engine.maintenance.rebuild import unlock, unlock_shared
from repo_engine.repository import leases, sightings
from repo_engine.repository.config import RepoConfig, write_config
from repo_engine.repository.leases import (MAINT, SESSION, VM, Lease, LeaseInfo, LeaseLost,
                                           clear_leases, list_leases, lock_name,
                                           maintenance_name, read_lease, session_name, vm_base,
                                           write_lease)
from repo_engine.repository.locks import MAINTENANCE, SHARED
from repo_engine.repository.repo import Repository
from repo_engine.repository.store import StoreError
from repo_engine.repository.store.local import LocalStore
from repo_engine.repository.store.s3 import S3Store
from test_store_s3 import settings_for


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        s = LocalStore(tmp_path / "repo")
        (tmp_path / "repo").mkdir(mode=0o700)
    else:
        seaweedfs = request.getfixturevalue("seaweedfs")
        bucket = request.getfixturevalue("s3_bucket")
        s = S3Store(f"s3://{bucket}/repo", settings_for(seaweedfs.endpoint))
    write_config(s, RepoConfig.new(shared=True))
    yield s
    s.close()


def host(store, tmp_path: Path, name: str, seconds: float = 600.0) -> Repository:
    """The repository as one host sees it: the shared store, its own local directory."""
    repo = attach_shared(store, tmp_path / name)
    repo.lease_seconds = seconds
    return repo


def crashed(store, name: str, kind: str, command: str = "gc", *, ago: float = 60.0) -> LeaseInfo:
    """The record a holder that died `ago` seconds after its last renewal left behind."""
    expired = leases.now() - timedelta(seconds=ago)
    info = LeaseInfo(kind, "otherhost", 4242, command, leases.iso(expired - timedelta(hours=1)),
                     leases.iso(expired), "0123456789abcdef")
    write_lease(store, name, info)
    return info


def watched(monkeypatch, *repos: Repository, hours: float = 2.0) -> None:
    """Each host lists the store's leases now, noting when it first saw each record, and then
    every clock moves `hours` on: a record left unchanged meanwhile is over for each of them."""
    for repo in repos:
        listed = sightings.monotonic()
        leases.sighted(repo.index, list_leases(repo.store), leases.now(), listed)
    move_clocks(monkeypatch, hours * 3600, wall=("leases",))


class Noted:
    """A host's notes of first sightings that say it saw every record `ago` seconds before."""

    def __init__(self, ago: float = 0.0) -> None:
        self.ago = ago

    def first_seen(self, _key, names, at, _scope="", _listed=None):
        return {name: at - self.ago for name in names}

    def cache_id(self) -> str:
        return "noted"


def commands(store) -> list[tuple[str, str]]:
    return [(found.info.kind, found.info.command) for found in list_leases(store)]


def test_every_lock_writes_a_session_lease_released_with_it(store, tmp_path):
    a = host(store, tmp_path, "a")
    with a.lock(SHARED, "backup image web1"):
        assert commands(store) == [(SESSION, "backup image web1")]
        [found] = list_leases(store)
        assert found.name.startswith("leases/") and found.name.endswith(".lease")
        assert found.info.expires > found.info.started
        a.check_leases()
    assert list_leases(store) == [] and a.held == []


def test_a_shared_lock_inside_another_keeps_its_session_lease_and_refreshes(store, tmp_path):
    """A command's second shared lock (restore's inside the CLI's, a backup's after its VM lock)
    writes no lease of its own: the first one, written before any of its refreshes, is what gc
    waits for; the cache is brought up to the journal's head all the same."""
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    with a.lock(SHARED, "backup image web1"):
        with b.lock(SHARED, "backup image web2"):
            claimed = b.reserve_refs(1)  # a journal entry that a has not seen yet
        assert a.index.meta_u64("next_ref") < claimed.stop
        with a.vm_lock("web1", "backup image web1"), a.lock(SHARED, "backup image web1"):
            assert sorted(commands(store)) == [(SESSION, "backup image web1"),
                                               (VM, "backup image web1")]
            assert a.index.meta_u64("next_ref") >= claimed.stop
            a.check_leases()
        assert commands(store) == [(SESSION, "backup image web1")]
    assert list_leases(store) == [] and a.held == []
    with a.vm_lock("web1", "backup image web1"), a.lock(SHARED, "backup image web1"):
        # a VM lock is no session: the shared lock taken after it writes the lease
        assert sorted(commands(store)) == [(SESSION, "backup image web1"),
                                           (VM, "backup image web1")]
    assert list_leases(store) == [] and a.held == []


def test_maintenance_lock_excludes_other_hosts_but_not_their_backups(store, tmp_path):
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    with a.lock(MAINTENANCE, "gc"):
        assert sorted(commands(store)) == [(MAINT, "gc"), (SESSION, "gc")]
        with pytest.raises(LockedError) as refused:
            b.lock(MAINTENANCE, "forget")
        text = str(refused.value)
        assert text.startswith("repository is locked (maintenance) by 'gc', pid ")
        assert "\n" not in text and "repo-engine unlock" in text
        # the refused command left nothing behind: no lease, no local lock
        assert sorted(commands(store)) == [(MAINT, "gc"), (SESSION, "gc")]
        assert list((tmp_path / "b" / "locks").iterdir()) == [] and b.held == []
        with b.lock(SHARED, "backup image web1"):  # backups run beside maintenance
            a.check_leases()
    assert list_leases(store) == []
    with b.lock(MAINTENANCE, "forget"):  # free again once released
        assert [f.name for f in list_leases(store) if f.info.kind == MAINT] == [
            maintenance_name(1)]


def test_expired_maintenance_lock_is_taken_over_by_exactly_one_of_two_racers(store, tmp_path,
                                                                             monkeypatch):
    hosts = [host(store, tmp_path, f"h{i}") for i in range(2)]
    for generation in range(1, 4):  # a crashed holder at each generation in turn
        crashed(store, maintenance_name(generation), MAINT)
        watched(monkeypatch, *hosts)
        barrier = threading.Barrier(2)
        won, refused = [], []

        def take(repo: Repository) -> None:
            barrier.wait()
            try:
                won.append(repo.lock(MAINTENANCE, "gc"))
            except LockedError as exc:
                refused.append(str(exc))

        threads = [threading.Thread(target=take, args=(h,)) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == 1, (won, refused)
        assert refused[0].startswith("repository is locked (maintenance) by 'gc'")
        maint = [f.name for f in list_leases(store) if f.info.kind == MAINT]
        assert maint == [maintenance_name(generation + 1)]  # the expired one was cleared
        won[0].check()
        won[0].release()
        assert list_leases(store) == []


def test_a_holder_whose_lock_was_taken_over_stops(store, tmp_path, monkeypatch):
    """A holder whose clock runs behind (or that was suspended) still thinks its lock is valid;
    the taker saw it unchanged for its span on its own clock. The old holder's next check sees
    the higher generation."""
    info = crashed(store, maintenance_name(7), MAINT, "forget")
    b = host(store, tmp_path, "b")
    watched(monkeypatch, b)
    behind = replace(info, expires=leases.iso(leases.now() + timedelta(hours=1)))
    stalled = Lease(store, maintenance_name(7), behind, 600.0)  # never renewed
    with b.lock(MAINTENANCE, "gc"):
        with pytest.raises(LeaseLost, match=r"taken over by 'gc', pid .* stops before it writes"):
            stalled.check()
        assert read_lease(store, maintenance_name(7)) is None  # cleared by the taker
        with pytest.raises(LeaseLost):  # lost for good
            stalled.check()


def test_renewal_pushes_the_expiry_and_a_failed_renewal_loses_the_lease(store, tmp_path,
                                                                        monkeypatch):
    a = host(store, tmp_path, "a", seconds=2.0)  # a renewal later than that loses the lease
    with a.lock(SHARED, "backup image web1") as held:
        [lease] = held.leases
        first = read_lease(store, lease.name).expires
        for _ in range(200):  # the daemon renews every 0.5 s; wait until it did
            if read_lease(store, lease.name).expires > first:
                break
            threading.Event().wait(0.05)
        assert read_lease(store, lease.name).expires > first
        a.check_leases()

        def refuse(*_args, **_kwargs):
            raise StoreError(f"{store.location}: the server answered 503 SlowDown")

        monkeypatch.setattr(store, "put", refuse)
        lease.renew()  # what the daemon does next
        with pytest.raises(LeaseLost) as lost:
            a.check_leases()
        assert "could not be renewed" in str(lost.value) and "503" in str(lost.value)
        assert "\n" not in str(lost.value)
        monkeypatch.undo()
        lease.renew()
        with pytest.raises(LeaseLost):  # a later renewal does not bring it back
            a.check_leases()
    assert list_leases(store) == []


def test_expiry_is_judged_by_the_holders_clock(store, tmp_path, monkeypatch):
    """A holder stalled past its expiry (a suspended VM, a hung thread) is stopped by its own
    check, whatever the object in the store still says."""
    a = host(store, tmp_path, "a")
    with a.lock(SHARED, "backup image web1"):
        a.check_leases()
        later = leases.now() + timedelta(seconds=601)
        monkeypatch.setattr(leases, "now", lambda: later)
        with pytest.raises(LeaseLost, match="expired at .* before it could be renewed"):
            a.check_leases()


def test_a_renewal_stopped_past_the_lease_between_its_check_and_its_write_stays_lost(
        store, tmp_path, monkeypatch):
    """The renewal thread checks the lease, then the process stops (SIGSTOP, a paused VM, the
    read-back hung) for longer than the lease, then it writes the record anew: gc may have
    swept meanwhile, so the command's next check must find the lease expired."""
    a = host(store, tmp_path, "a")
    with a.lock(SHARED, "backup image web1") as held:
        [lease] = held.leases
        read_back = lease._still_ours
        steady = leases.monotonic

        def stopped_while_reading_back(*args):
            read_back(*args)
            monkeypatch.setattr(leases, "monotonic", lambda: steady() + lease.seconds + 1)

        monkeypatch.setattr(lease, "_still_ours", stopped_while_reading_back)
        lease.renew()
        monkeypatch.setattr(lease, "_still_ours", read_back)
        with pytest.raises(LeaseLost, match="after its last renewal, before it could be renewed"):
            a.check_leases()


def test_unlock_removes_expired_leases_and_force_removes_live_ones(store, tmp_path,
                                                                   monkeypatch):
    a = host(store, tmp_path, "a")
    dead_backup = session_name()
    crashed(store, dead_backup, SESSION, "backup image db1")
    crashed(store, maintenance_name(3), MAINT, "gc")
    watched(monkeypatch, a)
    with a.lock(SHARED, "backup image web1") as held:
        live = held.leases[0].name
        cleared = clear_leases(store, a.index)
        assert sorted(f.name for f in cleared.removed) == sorted([dead_backup,
                                                                  maintenance_name(3)])
        assert [k.found.name for k in cleared.kept] == [live]
        assert [f.name for f in list_leases(store)] == [live]
        a.check_leases()
        assert [f.name for f in clear_leases(store, a.index, force=True).removed] == [live]
        with pytest.raises(LeaseLost, match="was removed"):
            a.check_leases()
    assert list_leases(store) == []


def test_an_unreadable_maintenance_lock_holds_until_unlock_force(store, tmp_path):
    store.put(maintenance_name(1), b"not a lease")
    a = host(store, tmp_path, "a")
    with pytest.raises(LockedError, match=r"cannot be read; .*'repo-engine unlock --force'"):
        a.lock(MAINTENANCE, "gc")
    assert [k.found.name for k in clear_leases(store, a.index).kept] == [maintenance_name(1)]
    assert [f.name for f in clear_leases(store, a.index, force=True).removed] == [
        maintenance_name(1)]
    with a.lock(MAINTENANCE, "gc"):
        pass


def test_unlock_command_on_a_shared_local_repository(tmp_path, capsys, monkeypatch):
    path = tmp_path / "repo"
    store = Repository.init(path, shared=True).store
    crashed(store, maintenance_name(1), MAINT, "forget")
    crashed(store, session_name(), SESSION, "backup image web1")
    first = cli(capsys, "unlock", path)  # seen now: they may still be live
    assert first.code == 0, first.err
    assert ("kept the maintenance lock of \"forget\" (pid 4242 on otherhost): it may still be "
            "live, seen unchanged for 0 s; run 'repo-engine unlock' again after ") in first.out
    assert "removed 0 locks" in first.out and len(list_leases(store)) == 2
    watched(monkeypatch)  # an hour and more later, unchanged
    b = host(store, tmp_path, "b")
    with b.lock(SHARED, "restore web1") as held:
        refused = cli(capsys, "gc", path)  # the expired lock is taken over: gc itself runs
        assert refused.code == 0, refused.err
        crashed(store, maintenance_name(9), MAINT, "forget", ago=-600)  # live, another host
        refused = cli(capsys, "gc", path)
        assert refused.code == 1
        assert refused.err.startswith("repo-engine: error: repository is locked (maintenance) by "
                                      "'forget', pid 4242 on otherhost since ")
        result = cli(capsys, "unlock", path)
        assert result.code == 0, result.err
        assert "removed the lease of \"backup image web1\" (pid 4242 on otherhost)" in result.out
        assert [f.name for f in list_leases(store)] == sorted([held.leases[0].name,
                                                               maintenance_name(9)])
        forced = cli(capsys, "unlock", path, "--force", "--json").json()
        assert {d["kind"] for d in forced["removed"]} == {"lease", "maintenance"}
        assert list_leases(store) == []
    assert unlock(path).removed == []


def test_the_lease_duration_comes_from_the_environment(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "repo")
    (tmp_path / "repo").mkdir(mode=0o700)
    write_config(store, RepoConfig.new(shared=True))
    monkeypatch.setenv("REPO_ENGINE_LEASE_SECONDS", "30")
    repo = attach_shared(store, tmp_path / "a")
    with repo.lock(SHARED, "verify") as held:
        info = held.leases[0].info
        assert (leases.datetime.fromisoformat(info.expires)
                - leases.datetime.fromisoformat(info.started)).total_seconds() == 30
    for bad in ("soon", "0", "-5", "inf", "1e400", "99999999999999999999"):
        monkeypatch.setenv("REPO_ENGINE_LEASE_SECONDS", bad)
        with pytest.raises(RepoError, match=f"REPO_ENGINE_LEASE_SECONDS='{bad}' is not a positive"):
            attach_shared(store, tmp_path / "b")


def test_unlock_of_a_shared_repository_in_any_store(store, tmp_path, monkeypatch):
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    crashed(store, session_name(), SESSION, "backup image db1")
    crashed(store, maintenance_name(2), MAINT, "forget")
    watched(monkeypatch, b)
    with a.lock(SHARED, "backup image web1") as held:
        report = unlock_shared(b)
        assert sorted((d["kind"], d["command"]) for d in report.removed) == [
            ("lease", "backup image db1"), (MAINTENANCE, "forget")]
        assert [d["file"] for d in report.kept] == [held.leases[0].name]
        assert all(d["expires"] for d in report.removed + report.kept)
        forced = unlock_shared(b, force=True)
        assert [d["file"] for d in forced.removed] == [held.leases[0].name]
    assert list_leases(store) == []


class CountingStore:
    """A store that counts the calls of each of its methods."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, Counter()

    def __getattr__(self, name: str):
        method = getattr(self.inner, name)

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return method(*args, **kwargs)
        return counted


def test_checking_the_leases_reads_each_record_once(store, tmp_path):
    """Before each journal commit a backup checks its session lease (its record) and its VM
    lock (a listing of the lock's generations, which reads their records: ours among them)."""
    a = host(store, tmp_path, "a")
    with a.vm_lock("v", "backup image v"), a.lock(SHARED, "backup image v"):
        counting = CountingStore(store)
        for lease in (lease for held in a.held for lease in held.leases):
            lease.store = counting
        a.check_leases()
        assert counting.calls == {"list": 1, "get": 2}


def test_a_vm_is_backed_up_by_one_host_at_a_time(store, tmp_path):
    """The local VM lock is in each host's own directory: the store's VM lock excludes the
    other hosts, refused in the words of the local one, and leaves nothing behind."""
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    with a.vm_lock("v", "backup image v") as held:
        assert commands(store) == [(VM, "backup image v")]
        [found] = list_leases(store)
        assert found.name == lock_name(vm_base("v"), 1)
        with pytest.raises(LockedError) as refused:
            b.vm_lock("v", "backup image v")
        text = str(refused.value)
        assert text.startswith(f"VM 'v' is being backed up by 'backup image v', pid {os.getpid()} "
                               f"on {socket.gethostname()} since {found.info.started}; wait for "
                               "it to finish (if that process is gone, ")
        assert "\n" not in text and "repo-engine unlock --force" in text
        assert list((tmp_path / "b" / "locks").iterdir()) == [] and b.held == []
        with b.vm_lock("w", "backup image w"):  # other VMs are not held up
            assert sorted(commands(store)) == [(VM, "backup image v"), (VM, "backup image w")]
        a.check_leases()  # checked before each journal commit with the others
        assert held in a.held
    assert list_leases(store) == [] and a.held == []
    assert list((tmp_path / "a" / "locks").iterdir()) == []
    with b.vm_lock("v", "backup image v"):  # free again once released
        pass


def test_an_expired_vm_lock_is_taken_over_and_its_holder_stops(store, tmp_path, monkeypatch):
    name = lock_name(vm_base("v"), 4)
    info = crashed(store, name, VM, "backup image v")
    b = host(store, tmp_path, "b")
    watched(monkeypatch, b)
    behind = replace(info, expires=leases.iso(leases.now() + timedelta(hours=1)))
    stalled = Lease(store, name, behind, 600.0)  # its clock runs behind: never renewed
    with b.vm_lock("v", "backup image v"):
        assert [f.name for f in list_leases(store)] == [lock_name(vm_base("v"), 5)]
        with pytest.raises(LeaseLost, match=r"vm lock was taken over by 'backup image v', pid "):
            stalled.check()


def test_unlock_removes_expired_vm_locks_and_force_removes_live_ones(store, tmp_path,
                                                                     monkeypatch):
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    crashed(store, lock_name(vm_base("db1"), 1), VM, "backup image db1")
    watched(monkeypatch, b)
    with a.vm_lock("web1", "backup image web1") as held:
        report = unlock_shared(b)
        assert [(d["kind"], d["command"]) for d in report.removed] == [
            ("vm", "backup image db1")]
        assert [d["file"] for d in report.kept] == [held.leases[0].name]
        assert [d["file"] for d in unlock_shared(b, force=True).removed] == [
            held.leases[0].name]
        with pytest.raises(LeaseLost, match="was removed"):
            a.check_leases()
    assert list_leases(store) == []


def test_a_vm_lock_a_failed_backup_could_not_delete_is_taken_over_by_its_host(store, tmp_path,
                                                                              monkeypatch):
    """A backup whose store failed could not delete its store VM lock: it leaves its local VM
    lock file, stale, which tells its host's next backup of the VM that the holder is gone;
    other hosts, with no such evidence, wait for the expiry."""
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    held = a.vm_lock("v", "backup image v")

    def refuse(*_args, **_kwargs):
        raise StoreError(f"{store.location}: the server answered 503 SlowDown")

    with monkeypatch.context() as failing:
        failing.setattr(store, "delete", refuse)
        held.release()
    assert [f.name for f in list_leases(store)] == [lock_name(vm_base("v"), 1)]
    assert [p.name for p in (tmp_path / "a" / "locks").iterdir()] == [held.local.path.name]
    with a.lock(SHARED, "verify"):  # other commands leave the stale VM lock file alone
        pass
    with pytest.raises(LockedError, match="VM 'v' is being backed up by 'backup image v'"):
        b.vm_lock("v", "backup image v")
    with a.vm_lock("v", "backup image v"):
        assert [f.name for f in list_leases(store)] == [lock_name(vm_base("v"), 2)]
    assert list_leases(store) == [] and list((tmp_path / "a" / "locks").iterdir()) == []


def test_a_takeover_between_a_listing_and_its_check_is_seen(tmp_path, monkeypatch):
    """Another host takes an expired maintenance lock over (writes g + 1, deletes g) after this
    host's listing read the directory (g its only generation) but before it looked at g: that
    listing holds no generation, yet the lock is held; it must be refused, not taken a second
    time as generation 1."""
    from repo_engine.repository.store import local

    (tmp_path / "repo").mkdir(mode=0o700)
    store = LocalStore(tmp_path / "repo")
    write_config(store, RepoConfig.new(shared=True))
    crashed(store, maintenance_name(3), MAINT)
    real_walk, other = local._walk, []

    def walk(top, base, *reports):
        entries = list(real_walk(top, base, *reports))  # the directory as it was read
        if base == "leases" and not other:
            other.append(True)
            leases.take_maintenance(LocalStore(tmp_path / "repo"), Noted(ago=86400), "gc",
                                    600)  # the other host, which saw gen 3 a day ago
        yield from entries
    monkeypatch.setattr(local, "_walk", walk)
    with pytest.raises(LockedError, match=r"repository is locked \(maintenance\) by 'gc'"):
        leases.take_maintenance(store, Noted(), "forget", 600)  # seen gen 4 just now
    assert other and [f.name for f in leases.maintenance_locks(store)] == [maintenance_name(4)]
