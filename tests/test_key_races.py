"""Key changes racing each other, as two hosts sharing a repository make them: each change is a
new keyring generation written put-if-absent over the one it read, so the loser re-checks on top
of the winner's and never undoes it; two removals never leave the repository without a
passphrase slot."""

from __future__ import annotations

import os
import threading
from datetime import datetime, timezone

import pytest

from repo_engine.errors import RepoError
from repo_engine.repository.crypto import keys, keystore, manage, slots
from repo_engine.repository.location import is_remote, open_key_manager
from repo_engine.repository.store.s3_settings import load_s3_settings
from repo_engine.repository.store import StoreUnreachable
from repo_engine.repository.store import local
from repo_engine.repository.store.local import LocalStore
from s3cli import s3_environment
from test_crypto_keystore import initialised
from helpers import cli
from test_encryption_cli import encrypted, ok, secret_file, small_kdf  # noqa: F401 (fixtures)


def race(monkeypatch, *changes) -> list[object]:
    """Run each change in its own thread (its own KeyManager: another host), each waiting after
    its unlock until every other has unlocked too (all checked what they are about to change
    before any writes); their results or errors, in order."""
    barrier = threading.Barrier(len(changes))
    real = keys.unlock

    def unlock(*args, **kwargs):
        unlocked = real(*args, **kwargs)
        barrier.wait(timeout=60)
        return unlocked
    results: list[object] = [None] * len(changes)

    def run(i: int) -> None:
        try:
            results[i] = changes[i]()
        except RepoError as exc:
            results[i] = exc
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(changes))]
    with monkeypatch.context() as patch:
        patch.setattr(keys, "unlock", unlock)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results


def slot_ids(capsys, repo) -> dict[str, str]:
    """label -> id of the repository's slots."""
    doc = ok(capsys, "key", "list", repo, "--json").json()
    return {s["label"]: s["id"] for s in doc["slots"]}


@pytest.fixture(params=["local", "s3"])
def two_passphrases(request, tmp_path, capsys, monkeypatch):
    """An encrypted repository, local or on the test S3 server, with two passphrase slots:
    labelled "" (correct horse) and "second"."""
    if request.param == "s3":
        s3_environment(monkeypatch, tmp_path, request.getfixturevalue("seaweedfs").endpoint)
        repo: object = f"s3://{request.getfixturevalue('s3_bucket')}/races"
    else:
        repo = tmp_path / "repo"
    first = secret_file(tmp_path, "repo.pass", b"correct horse\n")
    ok(capsys, "init", repo, "--encryption", "--passphrase-file", first)
    second = secret_file(tmp_path, "second.pass", b"second passphrase\n")
    ok(capsys, "key", "add", repo, "--passphrase-file", first, "--new-passphrase-file", second,
       "--label", "second")
    return repo, first, second


def manager(repo):
    """The KeyManager a host of its own would use."""
    location = str(repo)
    return open_key_manager(location, settings=load_s3_settings({}) if is_remote(location)
                            else None)


def test_two_removals_racing_never_leave_no_passphrase_slot(two_passphrases, capsys,
                                                            monkeypatch):
    repo, first, second = two_passphrases
    ids = slot_ids(capsys, repo)
    with manager(repo) as one, manager(repo) as two:
        results = race(monkeypatch, lambda: one.remove(ids[""], lambda: b"second passphrase"),
                       lambda: two.remove(ids["second"], lambda: b"correct horse"))
    refused = [r for r in results if isinstance(r, RepoError)]
    assert len(refused) == 1, results
    assert "\n" not in str(refused[0])
    assert "slot" in str(refused[0])  # which check refused depends on the interleaving
    kept = second if isinstance(results[1], RepoError) else first
    ok(capsys, "key", "status", repo, "--passphrase-file", kept)


def test_a_passphrase_change_racing_the_removal_of_its_slot_is_refused(two_passphrases, capsys,
                                                                        monkeypatch, tmp_path):
    """A slot being removed while its holder changes its passphrase: the holder keeps no access
    through a new slot made on the strength of a removed one, or the removal is refused."""
    repo, first, second = two_passphrases
    ids = slot_ids(capsys, repo)
    with manager(repo) as one, manager(repo) as two:
        results = race(monkeypatch,
                       lambda: one.change_passphrase(one.unlock(lambda: b"correct horse"),
                                                     b"new passphrase"),
                       lambda: two.remove(ids[""], lambda: b"second passphrase"))
    refused = [r for r in results if isinstance(r, RepoError)]
    assert len(refused) == 1, results
    listed = slot_ids(capsys, repo)
    new = secret_file(tmp_path, "new.pass", b"new passphrase")
    if isinstance(results[0], RepoError):  # removed: only the second passphrase opens
        assert list(listed) == ["second"]
        failure_out = cli(capsys, "key", "status", repo, "--passphrase-file", new)
        assert failure_out.code == 1 and "opens none" in failure_out.err
    else:  # changed: the removal named a slot that no longer is
        assert sorted(listed) == ["", "second"] and listed[""] != ids[""]
        ok(capsys, "key", "status", repo, "--passphrase-file", new)


def test_a_rotation_racing_a_passphrase_change_loses_neither(two_passphrases, capsys,
                                                             monkeypatch, tmp_path):
    repo, first, second = two_passphrases
    with manager(repo) as one, manager(repo) as two:
        results = race(monkeypatch,
                       lambda: one.change_passphrase(one.unlock(lambda: b"correct horse"),
                                                     b"new passphrase"),
                       lambda: two.rotate(two.unlock(lambda: b"second passphrase")))
    assert not [r for r in results if isinstance(r, RepoError)], results
    new = secret_file(tmp_path, "new.pass", b"new passphrase")
    status = ok(capsys, "key", "status", repo, "--passphrase-file", new, "--json").json()
    assert status["epochs"] == [1, 2] and status["current_epoch"] == 2
    assert cli(capsys, "key", "status", repo, "--passphrase-file", first).code == 1


def test_a_passwd_whose_keyring_write_is_late_is_made_again_on_the_newest(two_passphrases,
                                                                          capsys, monkeypatch,
                                                                          tmp_path):
    """`key passwd` of slot Y read the keyring; before it writes its change, Y's holder on
    another host removes slot X and rotates (two generations). The late change must be made
    again on the newest generation: written under a name the others used and replaced, no
    reader would see it, and deleting Y's file would leave the newest keyring listing Y alone
    with no file, so that no passphrase opens."""
    repo, first, second = two_passphrases
    ids = slot_ids(capsys, repo)
    real = manage.change_keyring
    meanwhile: list[object] = []

    def change_keyring(store, ring_key, change, *args):
        def late(keyring):
            if not meanwhile:
                meanwhile.append(None)
                with manager(repo) as other:
                    meanwhile.append(other.remove(ids[""], lambda: b"second passphrase"))
                    meanwhile.append(other.rotate(other.unlock(lambda: b"second passphrase")))
            return change(keyring)
        return real(store, ring_key, late, *args)
    monkeypatch.setattr(manage, "change_keyring", change_keyring)
    with manager(repo) as keys_of:
        keys_of.change_passphrase(keys_of.unlock(lambda: b"second passphrase"), b"new one")
    assert len(meanwhile) == 3
    status = ok(capsys, "key", "status", repo, "--json", "--passphrase-file",
                secret_file(tmp_path, "new.pass", b"new one")).json()
    assert (status["epochs"], status["current_epoch"]) == ([1, 2], 2)
    assert list(slot_ids(capsys, repo)) == ["second"]


def test_a_slot_file_the_keyring_does_not_list_never_opens_and_key_remove_deletes_it(
        encrypted, tmp_path, capsys):  # noqa: F811
    """What a removal that crashed between the new keyring generation and the file's deletion
    leaves (or a slot file put in the store by someone holding K_ring)."""
    repo, first = encrypted
    with manager(repo) as keys_of:
        opened = keys_of.unlock(lambda: b"correct horse")
        stray = slots.passphrase_slot(opened.unlocked.ring_key, b"stray", slots.DEFAULT_SCRYPT,
                                      label="stray", now=datetime.now(timezone.utc),
                                      random=os.urandom)
        keystore.save_slot(keys_of.store, stray)
    stray_file = secret_file(tmp_path, "stray.pass", b"stray")
    result = cli(capsys, "key", "status", repo, "--passphrase-file", stray_file)
    assert result.code == 1 and "opens none of the 1 passphrase slot" in result.err
    ok(capsys, "key", "remove", repo, stray.id, "--passphrase-file", first)
    assert list(slot_ids(capsys, repo)) == [""]
    ok(capsys, "key", "status", repo, "--passphrase-file", first)


def test_a_keyring_generation_replaced_between_listing_and_reading_is_read_anew(tmp_path):
    """Another host's key change writes g + 1 and deletes g after this host listed g."""
    made = initialised(LocalStore(tmp_path))

    class ChangedUnderfoot(LocalStore):
        changed = False

        def get(self, name, **kwargs):
            if name.startswith("keys/keyring-") and not self.changed:
                self.changed = True
                keystore.rotate(LocalStore(tmp_path), made.ring_key)  # the other host
            return super().get(name, **kwargs)
    keyring = keystore.load_keyring(ChangedUnderfoot(tmp_path), made.ring_key)
    assert (keyring.generation, keyring.current) == (2, 2)


def test_a_keyring_generation_replaced_while_being_listed_is_listed_anew(tmp_path, monkeypatch):
    """Another host's key change writes g + 1 and deletes g after this host's listing read the
    directory (g its only generation) but before it looked at g: that listing holds no generation,
    yet the keyring was never gone."""
    made = initialised(LocalStore(tmp_path))
    real_walk = local._walk
    changed = []

    def walk(top, base, *reports):
        entries = list(real_walk(top, base, *reports))  # the directory as it was read
        if base == "keys" and not changed:
            changed.append(True)
            keystore.rotate(LocalStore(tmp_path), made.ring_key)  # the other host
        yield from entries
    monkeypatch.setattr(local, "_walk", walk)
    keyring = keystore.load_keyring(LocalStore(tmp_path), made.ring_key)
    assert changed and (keyring.generation, keyring.current) == (2, 2)


def test_a_key_change_whose_keyring_write_errs_after_landing_keeps_the_new_slot(encrypted,
                                                                                tmp_path,
                                                                                capsys):  # noqa: F811
    """The store wrote the new generation but the writer heard an error (a lost response): the
    slot it lists must still be there, or its passphrase would open nothing."""
    repo, first = encrypted

    class LostResponse(LocalStore):
        def put(self, name, data, **kwargs):
            super().put(name, data, **kwargs)
            if name.startswith("keys/keyring-"):
                raise StoreUnreachable(f"{name}: connection reset")
    with manager(repo) as keys_of:
        keys_of.store = LostResponse(repo)
        with pytest.raises(StoreUnreachable):
            keys_of.change_passphrase(keys_of.unlock(lambda: b"correct horse"), b"new one")
    new = secret_file(tmp_path, "new.pass", b"new one")
    ok(capsys, "key", "status", repo, "--passphrase-file", new)


def new_slot_id(keys_of, old: str) -> str:
    return next(s.id for s in keys_of.slots().slots if s.id != old)


def test_removing_a_new_slot_before_its_passwd_lists_it_leaves_the_new_passphrase_working(
        encrypted, tmp_path, capsys, monkeypatch):  # noqa: F811
    """`key passwd` stored its new slot's file; `key remove` of that file (listed by no keyring
    yet, so it changes no keyring) deletes it before the passwd writes the keyring that lists it
    and drops the old slot: the new slot must keep its file, or no passphrase opens."""
    repo, first = encrypted
    real = manage.change_keyring
    removed: list[object] = []

    def change_keyring(*args):
        if not removed:  # the passwd, its new slot stored
            removed.append(None)
            with manager(repo) as other:
                old = other.unlock(lambda: b"correct horse").unlocked.slot.id
                removed.append(other.remove(new_slot_id(other, old), lambda: b"correct horse"))
        return real(*args)
    monkeypatch.setattr(manage, "change_keyring", change_keyring)
    with manager(repo) as keys_of:
        keys_of.change_passphrase(keys_of.unlock(lambda: b"correct horse"), b"new one")
    assert removed[1] is not None
    ok(capsys, "key", "status", repo, "--passphrase-file",
       secret_file(tmp_path, "new.pass", b"new one"))


def test_removing_a_new_slot_while_its_passwd_lists_it_is_refused_and_keeps_it(
        encrypted, tmp_path, capsys, monkeypatch):  # noqa: F811
    """The same removal, its keyring check made before the passwd's keyring write and its file
    deletion after the passwd ended: the file is put back and the removal refused."""
    repo, first = encrypted
    saved, checked, changed = threading.Event(), threading.Event(), threading.Event()
    real_change, real_delete = manage.change_keyring, manage.delete_slot
    victim: list[str] = []

    def change_keyring(*args):
        if not saved.is_set():  # the passwd, its new slot stored
            saved.set()
            assert checked.wait(timeout=60)
        return real_change(*args)

    def delete_slot(store, slot):
        if victim == [slot.id]:  # the removal, its keyring check made
            checked.set()
            assert changed.wait(timeout=60)
        return real_delete(store, slot)
    monkeypatch.setattr(manage, "change_keyring", change_keyring)
    monkeypatch.setattr(manage, "delete_slot", delete_slot)

    def passwd() -> None:
        with manager(repo) as keys_of:
            keys_of.change_passphrase(keys_of.unlock(lambda: b"correct horse"), b"new one")
        changed.set()
    thread = threading.Thread(target=passwd)
    thread.start()
    assert saved.wait(timeout=60)
    with manager(repo) as other:
        old = other.unlock(lambda: b"correct horse").unlocked.slot.id
        victim.append(new_slot_id(other, old))
        with pytest.raises(keys.SlotRefused, match="listed by another key change meanwhile"):
            other.remove(victim[0], lambda: b"correct horse")
    thread.join()
    ok(capsys, "key", "status", repo, "--passphrase-file",
       secret_file(tmp_path, "new.pass", b"new one"))
