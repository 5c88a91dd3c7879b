"""Hosts whose clocks differ, sharing one repository (repository/leases.py, "Clocks"): a host
whose clock runs hours ahead of a live holder's never takes its maintenance or VM lock over,
never removes its lease with `unlock`, and gc there never aborts its upload in progress; a
crashed holder's lock is still taken over once seen unchanged for a lease, and a dead holder of
this host's at once. One process plays every host: another host is this one with its host name
and its clock (`leases.now`, or `shared_gc.now`) patched while it acts."""

from __future__ import annotations

import shutil
import socket
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Iterator

import pytest

from helpers import Clocks, cli, move_clocks
from repo_engine.errors import LockedError
from repo_engine.maintenance.rebuild import unlock_shared
from repo_engine.repository import leases, sightings
from repo_engine.repository.leases import (MAINT, Lease, LeaseLost, list_leases, lock_name,
                                           maintenance_name, read_lease, vm_base)
from repo_engine.repository.locks import MAINTENANCE, SHARED
from repo_engine.repository.repo import Repository
from repo_engine.repository.store import StoreError
from test_leases import crashed, host, store  # noqa: F401 (the store fixture)

AHEAD = timedelta(hours=2)
DAY = 86400.0


@contextmanager
def as_host_b(monkeypatch, passed: float = 0.0, *, skew: float = 0.0,
              since: Clocks | None = None) -> Iterator[None]:
    """The host acting in the block is another host (the holder is this one), whose clocks
    move as `move_clocks` tells (its wall clock: the leases')."""
    with monkeypatch.context() as patched:
        patched.setattr(socket, "gethostname", lambda: "hostb")
        move_clocks(patched, passed, skew=skew, wall=("leases",), since=since)
        yield


def refuse(*_args, **_kwargs):
    raise StoreError("the server answered 503 SlowDown")


def take(repo: Repository, kind: str):
    return repo.lock(MAINTENANCE, "gc") if kind == MAINT else repo.vm_lock("v", "backup image v")


@pytest.mark.parametrize("kind", [MAINT, "vm"])
def test_a_taker_whose_clock_runs_ahead_never_takes_a_renewed_lock(store, tmp_path, monkeypatch,
                                                                   kind):
    """b's clock runs two hours ahead of a's: a's lock, renewed on time by a's clock, expired
    long ago by b's. b watches it change at every renewal, so never sees it unchanged for a
    lease, and is refused each time (before, b took it at once: two holders)."""
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    with take(a, kind) as held:
        lease = held.leases[-1]
        start = Clocks.read()
        for minutes in (0, 6.5, 13, 19.5):  # past two leases on b's clock, a renewing between
            lease.renew()  # what a's daemon does every quarter of its lease
            with as_host_b(monkeypatch, minutes * 60, skew=AHEAD.total_seconds(), since=start):
                with pytest.raises(LockedError) as refused:
                    take(b, kind)
            assert "free from " in str(refused.value)
            assert "on this host's clock unless renewed" in str(refused.value)
        a.check_leases()  # still a's: no higher generation, its record its own
        assert [f.name for f in list_leases(store) if f.info.kind != "session"] == [
            lease.name]
    assert list_leases(store) == []


def test_unlock_on_a_host_whose_clock_runs_ahead_leaves_a_live_lease(store, tmp_path,
                                                                     monkeypatch):
    """A live backup's session lease, expired on the clock of a host two hours ahead: `unlock`
    there keeps it and says why (before, it removed it, and gc stopped waiting for that
    backup); so does it each time the lease was renewed since it last looked."""
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    with a.lock(SHARED, "backup image web1") as held:
        [lease] = held.leases
        start = Clocks.read()
        for minutes in (0, 8, 16):
            lease.renew()
            with as_host_b(monkeypatch, minutes * 60, skew=AHEAD.total_seconds(), since=start):
                report = unlock_shared(b)
            assert report.removed == []
            [kept] = report.kept
            assert kept["file"] == lease.name and kept["seen_seconds"] == 0
            seen = leases.datetime.fromisoformat(kept["free_from"])
            assert seen == start.wall + AHEAD + timedelta(minutes=minutes, seconds=600)
        a.check_leases()
        with as_host_b(monkeypatch, 24 * 60, skew=AHEAD.total_seconds(),
                       since=start):  # unrenewed 8 min
            assert unlock_shared(b).kept[0]["seen_seconds"] == 480
        a.check_leases()
    assert list_leases(store) == []


def test_unlock_command_tells_when_a_lease_may_be_removed(tmp_path, capsys, monkeypatch):
    path = tmp_path / "repo"
    store = Repository.init(path, shared=True).store
    a = host(store, tmp_path, "a")
    with a.lock(SHARED, "backup image web1"):
        with as_host_b(monkeypatch, skew=AHEAD.total_seconds()):
            result = cli(capsys, "unlock", path)
        assert result.code == 0, result.err
        assert ("kept the lease of \"backup image web1\" (pid " in result.out
                and "): it may still be live, seen unchanged for 0 s; run 'repo-engine unlock' "
                    "again after " in result.out
                and "(this host's clock), or with --force if that process is gone"
                    in result.out)
        assert "removed 0 locks" in result.out
        a.check_leases()


def test_unlock_command_says_why_it_keeps_a_record_of_this_hosts_name(tmp_path, capsys):
    """A live lease that names this host but was written through another cache (another
    container or machine of its name, or before a reboot) is kept as another host's would be:
    `unlock` says why, as a lock refused for it does, since a user who finds no such process
    here would expect it removed at once."""
    path = tmp_path / "repo"
    store = Repository.init(path, shared=True).store
    other = host(store, tmp_path, "other")
    with other.lock(SHARED, "backup image web1"):
        result = cli(capsys, "unlock", path)
        assert result.code == 0, result.err
        assert ("): it may still be live (its record names this host but was written before "
                "its last boot, or on another machine or container of its name: its pid is not "
                "judged here), seen unchanged for 0 s; run 'repo-engine unlock' again after "
                in result.out)
        assert cli(capsys, "unlock", path, "--json").json()["kept"][0]["elsewhere"] is True
        other.check_leases()


def test_unlock_command_shows_a_record_s_command_escaped(tmp_path, capsys, monkeypatch):
    """A record's command is written by whichever host shares the store: a control character
    in it (an escape sequence setting the terminal's title) is shown escaped, as a name in a
    listing is."""
    path = tmp_path / "repo"
    store = Repository.init(path, shared=True).store
    a = host(store, tmp_path, "a")
    with a.lock(SHARED, "backup image web\x1b]0;title\x07"):
        with as_host_b(monkeypatch):
            result = cli(capsys, "unlock", path)
        assert result.code == 0, result.err
        assert "kept the lease of \"backup image web\\x1b]0;title\\x07\" (pid " in result.out
        assert "\x1b" not in result.out and "\x07" not in result.out


def test_a_crashed_holders_lock_is_taken_over_once_seen_unchanged_for_a_lease(store, tmp_path,
                                                                             monkeypatch):
    """The record names its holder's lease duration: the taker waits that long from its first
    sight of it on its own clock, whatever its expiry and start say on the holder's."""
    # expiry two hours ahead (the holder's clock), start an hour before: renewed all along
    info = replace(crashed(store, maintenance_name(3), MAINT, "forget", ago=-7200),
                   seconds=600.0)
    leases.write_lease(store, maintenance_name(3), info)
    b = host(store, tmp_path, "b")
    first = Clocks.read()
    with pytest.raises(LockedError, match="free from " + leases.on_this_clock(
            first.wall + timedelta(seconds=600)).replace("+", r"\+")):
        with as_host_b(monkeypatch, since=first):
            b.lock(MAINTENANCE, "gc")
    with as_host_b(monkeypatch, 599, since=first), pytest.raises(LockedError):
        b.lock(MAINTENANCE, "gc")
    with as_host_b(monkeypatch, 601, since=first):
        with b.lock(MAINTENANCE, "gc"):
            assert [f.name for f in leases.maintenance_locks(store)] == [maintenance_name(4)]
            stalled = Lease(store, maintenance_name(3), info, 600.0)
            with pytest.raises(LeaseLost, match="taken over"):
                stalled.check()


def test_a_dead_maintenance_holder_of_this_host_is_taken_over_at_once(store, tmp_path,
                                                                      monkeypatch):
    """A gc whose store failed could not delete its maintenance lock: it leaves its local lock
    file, stale once it is gone, which tells its host's next maintenance command that the
    holder is dead; another host, with no such evidence, waits."""
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    held = a.lock(MAINTENANCE, "gc")
    with monkeypatch.context() as failing:
        failing.setattr(store, "delete", refuse)
        held.release()
    assert [f.name for f in leases.maintenance_locks(store)] == [maintenance_name(1)]
    with pytest.raises(LockedError, match=r"repository is locked \(maintenance\) by 'gc'"):
        b.lock(MAINTENANCE, "forget")
    with a.lock(MAINTENANCE, "forget"):
        assert [f.name for f in leases.maintenance_locks(store)] == [maintenance_name(2)]
    # only the dead gc's session lease is left, to expire (gc waits for it, unlock removes it)
    assert [(f.info.kind, f.info.command) for f in list_leases(store)] == [("session", "gc")]


def test_a_vm_lock_of_a_dead_backup_of_this_host_is_taken_over_at_once(store, tmp_path,
                                                                       monkeypatch):
    """Its evidence, the stale local VM lock, outweighs a record still fresh (seen just now)."""
    a = host(store, tmp_path, "a")
    held = a.vm_lock("v", "backup image v")
    with monkeypatch.context() as failing:
        failing.setattr(store, "delete", refuse)
        held.release()
    assert read_lease(store, lock_name(vm_base("v"), 1)) is not None
    with a.vm_lock("v", "backup image v"):
        assert [f.name for f in list_leases(store)] == [lock_name(vm_base("v"), 2)]


def test_gc_on_a_host_whose_clock_runs_ahead_leaves_a_live_upload(seaweedfs, s3_bucket,
                                                                  tmp_path, monkeypatch):
    """A backup is sending a pack as a multipart upload; gc runs on a host whose clock is two
    hours ahead of the server's: the upload's `Initiated` time, of the server's clock, looks two
    hours old there. gc aborts it only once it has seen it, on its own clock, for longer than the
    grace period and a lease (before, at once: the backup's put failed)."""
    from repo_engine.maintenance.gc import gc
    from repo_engine.repository.config import RepoConfig
    from repo_engine.repository.store.s3 import S3Store
    from s3server import admin_client
    from test_store_s3 import settings_for

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    s3 = S3Store(f"s3://{s3_bucket}/repo", settings_for(seaweedfs.endpoint))
    repo = Repository.create(s3, tmp_path / "cache", RepoConfig.new(shared=True))
    admin = admin_client(seaweedfs)
    key = "repo/packs/00/sending.pack"
    upload = admin.create_multipart_upload(Bucket=s3_bucket, Key=key)
    admin.upload_part(Bucket=s3_bucket, Key=key, PartNumber=1, UploadId=upload["UploadId"],
                      Body=b"x" * 1024)
    move_clocks(monkeypatch, skew=AHEAD.total_seconds(), wall=("shared_gc",))
    assert gc(repo, grace=0).uploads_aborted == 0
    assert gc(repo, grace=0).uploads_aborted == 0  # seen again at once: may still be sent
    assert [u.upload_id for u in s3.pending_uploads()] == [upload["UploadId"]]
    # left that long: its writer is gone
    move_clocks(monkeypatch, repo.lease_seconds + 1, wall=("shared_gc",))
    assert gc(repo, grace=0).uploads_aborted == 1
    assert list(s3.pending_uploads()) == []
    repo.close()


def released_in_a_store_failure(repo: Repository, monkeypatch, command: str) -> tuple:
    """A lock whose release found the store failing: its lease left in the store, its local
    lock file left stale. Returns (lease name, lock file name)."""
    held = repo.lock(SHARED, command)
    [lease] = held.leases
    with monkeypatch.context() as failing:
        failing.setattr(repo.store, "delete", refuse)
        held.release()
    return lease.name, held.local.path.name


def test_unlock_removes_the_records_of_a_dead_holder_of_this_host_at_once(store, tmp_path,
                                                                          monkeypatch):
    """A backup whose store failed on its release kept its lease and its local lock file, stale
    once released: `unlock` on its host removes that lease at once (the stale lock is the
    evidence), unless a live lock of this host holds that pid again; on another host it waits,
    as for any record it has just seen."""
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    lease, lock_file = released_in_a_store_failure(a, monkeypatch, "backup image web1")
    assert [f.name for f in list_leases(store)] == [lease]
    assert [d["file"] for d in unlock_shared(b).kept] == [lease]
    with a.lock(SHARED, "restore web1") as again:  # the same pid (this process), alive
        with pytest.raises(LockedError, match="1 locks are held by live processes"):
            unlock_shared(a)
        assert not (tmp_path / "a" / "locks" / lock_file).exists()
        assert sorted(f.name for f in list_leases(store)) == sorted([lease,
                                                                     again.leases[0].name])
    second, lock_file = released_in_a_store_failure(a, monkeypatch, "backup image web2")
    report = unlock_shared(a)  # every record of that pid: its holder is gone
    assert sorted(d["file"] for d in report.removed) == sorted([lock_file, lease, second])
    assert list_leases(store) == []


def test_a_record_of_this_host_is_over_once_expired_on_its_clock(store, tmp_path, monkeypatch):
    """Its times are of this host's own clock: `unlock` here removes it once it expired, though
    this host sees it for the first time and the evidence of its holder's death is gone
    (another lock of this host removed the stale local lock file); another host, seeing it for
    the first time too, keeps it."""
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    lease, lock_file = released_in_a_store_failure(a, monkeypatch, "backup image web1")
    with a.lock(SHARED, "verify"):  # removes the stale lock file: no evidence left
        assert not (tmp_path / "a" / "locks" / lock_file).exists()
    first = Clocks.read()
    with as_host_b(monkeypatch, 601, since=first):
        assert [d["file"] for d in unlock_shared(b).kept] == [lease]
    move_clocks(monkeypatch, 601, wall=("leases",), since=first)
    assert [d["file"] for d in unlock_shared(a).removed] == [lease]


def test_unlock_dates_its_first_sight_after_its_listing(store, tmp_path, monkeypatch):
    """A listing takes time (each record is a read): a lease renewed while `unlock` lists is
    first seen when the listing ends, not when it began, or `unlock` would remove it that long
    before its holder's lease ends (and gc stop waiting for it)."""
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    base = leases.now()
    clock = [base]
    listing = leases.list_leases
    with a.lock(SHARED, "backup image web1") as held:
        [lease] = held.leases

        def renewed_while_listing(s):
            clock[0] = base + timedelta(seconds=10)
            lease.renew()  # a's lease now ends at base + 610 s
            clock[0] = base + timedelta(seconds=30)  # the listing took 30 s
            return listing(s)

        with monkeypatch.context() as patched:
            patched.setattr(leases, "now", lambda: clock[0])
            patched.setattr(sightings, "monotonic", lambda: clock[0].timestamp())
            patched.setattr(socket, "gethostname", lambda: "hostb")
            patched.setattr(leases, "list_leases", renewed_while_listing)
            unlock_shared(b)
            patched.setattr(leases, "list_leases", listing)
            clock[0] = base + timedelta(seconds=601)
            report = unlock_shared(b)
        assert report.removed == []
        [kept] = report.kept
        assert kept["free_from"] == leases.iso(base + timedelta(seconds=630))
        a.check_leases()


STEADY = 1000.0  # a reading of b's steady clock when the test begins


def test_a_sighting_noted_while_the_clock_ran_ahead_does_not_delay_a_takeover(store, tmp_path,
                                                                              monkeypatch):
    """b's clock was set a day ahead when b first saw a crashed holder's lock, and was then set
    right: b takes the lock over a lease after that first sight, as its steady clock tells
    (before, a day and a lease later: a crash not taken over in any bounded time)."""
    info = replace(crashed(store, maintenance_name(3), MAINT, "forget"), seconds=600.0)
    leases.write_lease(store, maintenance_name(3), info)
    b = host(store, tmp_path, "b")
    first = Clocks(leases.now(), STEADY)
    with as_host_b(monkeypatch, skew=DAY, since=first), pytest.raises(LockedError):
        b.lock(MAINTENANCE, "gc")
    with pytest.raises(LockedError, match="free from " + leases.on_this_clock(
            first.wall + timedelta(seconds=590))):
        with as_host_b(monkeypatch, 10, skew=-10, since=first):  # set right
            b.lock(MAINTENANCE, "gc")
    with as_host_b(monkeypatch, 601, skew=-10, since=first):
        with b.lock(MAINTENANCE, "gc"):
            assert [f.name for f in leases.maintenance_locks(store)] == [maintenance_name(4)]


@pytest.mark.parametrize("step", [timedelta(minutes=11), timedelta(days=1)])
def test_a_clock_stepped_forward_during_a_wait_does_not_end_it(store, tmp_path, monkeypatch,
                                                                step):
    """b first sees a live holder's lock, then b's clock is stepped forward (NTP setting it
    right after boot, a VM resumed from a snapshot) before the holder's next renewal is due:
    b's wait goes on for a lease on its steady clock (before, the lock was taken at once: the
    step counted as time b had watched it, and the live holder lost its lock)."""
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    with a.lock(MAINTENANCE, "gc") as held:
        first = Clocks(leases.now(), STEADY)
        with as_host_b(monkeypatch, since=first), pytest.raises(LockedError):
            b.lock(MAINTENANCE, "forget")
        stepped = step.total_seconds() - 30
        with as_host_b(monkeypatch, 30, skew=stepped, since=first), pytest.raises(LockedError):
            b.lock(MAINTENANCE, "forget")
        held.check()
        assert [f.name for f in leases.maintenance_locks(store)] == [maintenance_name(1)]


def test_unlock_after_a_clock_step_keeps_a_live_lease_and_reports_the_steady_wait(
        store, tmp_path, monkeypatch):
    """As above for `unlock`: a step of a day while it watches a live backup's lease is not a
    day of watching."""
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    with a.lock(SHARED, "backup image web1") as held:
        first = Clocks(leases.now(), STEADY)
        with as_host_b(monkeypatch, since=first):
            assert unlock_shared(b).removed == []
        with as_host_b(monkeypatch, 40, skew=DAY - 40, since=first):
            report = unlock_shared(b)
        assert report.removed == [] and report.kept[0]["seen_seconds"] == 40
        held.check()


def test_unlock_leaves_a_live_lease_of_the_same_host_name_and_pid_from_another_cache(
        store, tmp_path, monkeypatch):
    """Two containers on one machine share its host name (host networking), each with its own
    cache and its own pid namespace, so their processes' pids repeat: the stale local lock that
    one's dead backup left is no evidence against the other's live backup of the same pid
    (before, `unlock` removed that live lease, and gc stopped waiting for it)."""
    a, other = host(store, tmp_path, "a"), host(store, tmp_path, "other")
    dead, lock_file = released_in_a_store_failure(a, monkeypatch, "backup image web1")
    with other.lock(SHARED, "backup image web2") as live:
        report = unlock_shared(a)
        assert sorted(d["file"] for d in report.removed) == sorted([lock_file, dead])
        assert [d["file"] for d in report.kept] == [live.leases[0].name]
        other.check_leases()


def test_a_stale_maintenance_lock_of_another_cache_is_no_evidence(store, tmp_path, monkeypatch):
    """As above: a's dead gc (its local lock file stale) and the other container's live gc have
    one host name and pid; a's next forget must wait, not take the live gc's lock over."""
    a, other = host(store, tmp_path, "a"), host(store, tmp_path, "other")
    held = a.lock(MAINTENANCE, "gc")
    with monkeypatch.context() as failing:
        failing.setattr(store, "delete", refuse)
        held.release()
    unlock_shared(other, force=True)  # its store lock removed; a's local lock file stays
    with other.lock(MAINTENANCE, "gc") as live:
        with pytest.raises(LockedError, match=r"repository is locked \(maintenance\) by 'gc'"):
            a.lock(MAINTENANCE, "forget")
        live.check()


def test_a_record_of_another_cache_of_the_same_host_name_is_judged_by_sightings(
        store, tmp_path, monkeypatch):
    """Machines cloned from one image keep its host name, not its clock: a record of the same
    host name written through another cache is judged as any other host's, by this host's
    sightings, not by its expiry on this clock."""
    a, other = host(store, tmp_path, "a"), host(store, tmp_path, "other")
    with other.lock(SHARED, "backup image web1") as live:
        # a's clock runs ahead of the other machine's
        move_clocks(monkeypatch, skew=AHEAD.total_seconds(), wall=("leases",))
        report = unlock_shared(a)
        assert report.removed == [] and [d["file"] for d in report.kept] == [
            live.leases[0].name]


def test_a_holder_whose_clock_is_set_back_stops_a_lease_after_its_last_renewal(store, tmp_path,
                                                                                monkeypatch):
    """A holder's renewal hangs (its store stalls) and its clock is set an hour back meanwhile:
    on that clock its lease would last an hour more, while other hosts take it over, or gc
    stops waiting for it, a lease after they first saw its last renewal. Its own check counts
    the lease from that renewal on a clock no setting moves, so it stops in time."""
    a = host(store, tmp_path, "a")
    steady = leases.monotonic()
    with a.lock(SHARED, "backup image web1"):
        a.check_leases()
        back = leases.now() - timedelta(hours=1)
        monkeypatch.setattr(leases, "now", lambda: back)
        monkeypatch.setattr(leases, "monotonic", lambda: steady + 601)
        with pytest.raises(LeaseLost, match="600 s after its last renewal"):
            a.check_leases()


def test_unlock_command_names_a_record_it_keeps_for_good(tmp_path, capsys):
    """A record that cannot be read is never over: `unlock` keeps it, and says that only
    `--force` removes it (before, it kept it without a word: "removed 0 locks", while every
    forget and gc stayed refused)."""
    path = tmp_path / "repo"
    store = Repository.init(path, shared=True).store
    store.put(maintenance_name(1), b"not a lease")
    result = cli(capsys, "unlock", path)
    assert result.code == 0, result.err
    assert (f"kept the maintenance lock {maintenance_name(1)}: it cannot be read, so it never "
            "ends; if no repo-engine command on any host holds it, run 'repo-engine unlock "
            "--force'\n") in result.out
    assert list_leases(store)[0].name == maintenance_name(1)


def test_a_cache_cloned_with_its_machine_takes_no_live_lock_of_the_original(store, tmp_path,
                                                                           monkeypatch):
    """A machine cloned (its disk copied) while its backup of a VM runs: the clone has the same
    host name and a copy of the cache, whose local lock file of that backup is stale there (no
    process of the clone holds it). The record in the store names the same host, pid and cache;
    the clone must still wait for it as for another host's, since it runs in another boot
    (before, it took the live backup's lock at once: two backups of one VM)."""
    a = host(store, tmp_path, "a")
    with a.vm_lock("v", "backup image v") as held:
        shutil.copytree(tmp_path / "a", tmp_path / "clone")
        monkeypatch.setattr(sightings, "boot_id", lambda: "boot-of-the-clone")
        clone = host(store, tmp_path, "clone")
        with pytest.raises(LockedError, match="free from"):
            clone.vm_lock("v", "backup image v")
        monkeypatch.undo()
        held.check()


@pytest.mark.parametrize("kind", [MAINT, "vm"])
def test_a_lock_of_this_host_before_its_reboot_is_refused_saying_why_it_is_waited_for(
        store, tmp_path, monkeypatch, kind):
    """A holder of this host dies with the host (power lost), its lock left in the store and its
    local lock file stale: after the reboot this host waits for it as for another host's (a
    clone of the machine would look the same). The refusal names this host and a pid that is
    gone here, so it says why that is no evidence (before, it read as a live holder)."""
    a = host(store, tmp_path, "a")
    held = take(a, kind)
    with monkeypatch.context() as failing:
        failing.setattr(store, "delete", refuse)
        held.release()
    monkeypatch.setattr(sightings, "boot_id", lambda: "boot-after-the-reboot")
    with pytest.raises(LockedError) as refused:
        take(a, kind)
    assert ("free from " in str(refused.value) and "(its record names this host but was "
            "written before its last boot, or on another machine or container of its name: "
            "its pid is not judged here)" in str(refused.value))


def suspended_after_listing(monkeypatch, module, name: str, clock: list[float],
                            seconds: float) -> None:
    """`module.name`, a listing, returns what it read and then the host sleeps `seconds`
    (suspended, its steady clock running on) before it looks at its clock."""
    listing = getattr(module, name)

    def listed(*args, **kwargs):
        found = listing(*args, **kwargs)
        clock[0] += seconds
        return found
    monkeypatch.setattr(module, name, listed)


def test_a_taker_suspended_between_its_listing_and_its_clock_keeps_waiting(store, tmp_path,
                                                                          monkeypatch):
    """b first saw a's live lock, listed it again 100 s later and was suspended right after
    that listing for ten minutes, over which a renewed it: what b listed was seen unchanged
    for 100 s, not for the ten minutes b slept (before, b took the live lock over)."""
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    with a.lock(MAINTENANCE, "gc") as held:
        clock = [STEADY]
        with as_host_b(monkeypatch, since=Clocks(leases.now(), STEADY)), \
                pytest.raises(LockedError):
            b.lock(MAINTENANCE, "forget")
        with monkeypatch.context() as patched:
            clock[0] += 100
            patched.setattr(sightings, "monotonic", lambda: clock[0])
            patched.setattr(socket, "gethostname", lambda: "hostb")
            suspended_after_listing(patched, leases, "generations", clock, 600)
            with pytest.raises(LockedError, match="free from"):
                b.lock(MAINTENANCE, "forget")
        held.check()


def test_unlock_suspended_between_its_listing_and_its_clock_keeps_a_live_lease(
        store, tmp_path, monkeypatch):
    """As above for `unlock` and a live backup's lease (before, it removed it)."""
    a, b = host(store, tmp_path, "a"), host(store, tmp_path, "b")
    with a.lock(SHARED, "backup image web1") as held:
        clock = [STEADY]
        with as_host_b(monkeypatch, since=Clocks(leases.now(), STEADY)):
            assert unlock_shared(b).removed == []
        with monkeypatch.context() as patched:
            clock[0] += 100
            patched.setattr(sightings, "monotonic", lambda: clock[0])
            patched.setattr(socket, "gethostname", lambda: "hostb")
            suspended_after_listing(patched, leases, "list_leases", clock, 600)
            report = unlock_shared(b)
        assert report.removed == [] and report.kept[0]["seen_seconds"] == 100
        held.check()
