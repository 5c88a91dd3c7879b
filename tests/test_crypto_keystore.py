"""The key records in a store (LocalStore): names, write order, damaged or moved records, a
rotation racing another."""

from __future__ import annotations

import pytest

from repo_engine.errors import DamageError, TamperedError
from repo_engine.repository.crypto import keystore
from repo_engine.repository.crypto.keyring import EMPTIED, Keyring, keyring_copy, keyring_object
from repo_engine.repository.crypto.keys import (WrongPassphrase, change_passphrase, create,
                                                removable, unlock)
from repo_engine.repository.crypto.slots import passphrase_slot
from repo_engine.repository.store import ObjectExists
from repo_engine.repository.store.local import LocalStore
from test_crypto_keys import CFG, NOW, SMALL
from test_crypto_seal import Stream


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path)


def initialised(store, passphrase=b"pw"):
    made = create(passphrase, SMALL, label="first", now=NOW, config_digest=CFG,
                  random=Stream(passphrase))
    keystore.init_keys(store, made)
    return made


def names(store) -> list[str]:
    return sorted(info.name for info in store.list(""))


def test_init_unlock_and_read_the_keyring(store):
    made = initialised(store)
    assert names(store) == ["keys/keyring-0000000000000001", "keys/keyring-0000000000000001.copy",
                            f"keys/slot-{made.slot.id}.slot"]
    assert store.get(keyring_copy(1), limit=1 << 20) == store.get(keyring_object(1), limit=1 << 20)
    slots, skipped = keystore.load_slots(store)
    assert (slots, skipped) == ([made.slot], [])
    ring_key = unlock(slots, b"pw").ring_key
    assert keystore.load_keyring(store, ring_key) == made.keyring


def test_a_damaged_slot_is_skipped_and_named_and_the_others_still_open(store):
    made = initialised(store)
    second = passphrase_slot(made.ring_key, b"second", SMALL, label="", now=NOW,
                             random=Stream(b"s"))
    keystore.save_slot(store, second)
    path = store.path_of(made.slot.name)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    slots, skipped = keystore.load_slots(store)
    assert slots == [second]
    assert skipped == [f"{store.location}/{made.slot.name}: key slot checksum mismatch (file is "
                       "damaged)"]
    assert unlock(slots, b"second", skipped=skipped).ring_key == made.ring_key
    with pytest.raises(WrongPassphrase, match=f"unreadable slots skipped: .*{made.slot.id}"):
        unlock(slots, b"pw", skipped=skipped)


def test_a_slot_copied_under_another_id_is_refused(store):
    made = initialised(store)
    store.put("keys/slot-0123456789abcdef.slot", store.get(made.slot.name, limit=1 << 16))
    slots, skipped = keystore.load_slots(store)
    assert slots == [made.slot]
    assert skipped == [f"{store.location}/keys/slot-0123456789abcdef.slot: holds key slot "
                       f"{made.slot.id}, not 0123456789abcdef; it was moved from another name"]


def test_change_passphrase_then_remove_the_old_slot(store):
    made = initialised(store, b"old")
    slots, _ = keystore.load_slots(store)
    new, old = change_passphrase(slots, b"old", b"new", SMALL, now=NOW, random=Stream(b"n"))
    keystore.save_slot(store, new)  # durable before the old one goes
    keystore.delete_slot(store, removable(keystore.load_slots(store)[0], old.id))
    slots, _ = keystore.load_slots(store)
    assert slots == [new]
    assert unlock(slots, b"new").ring_key == made.ring_key
    with pytest.raises(ObjectExists):
        keystore.save_slot(store, new)  # a slot is never overwritten


def test_rotate_writes_a_new_generation_and_empties_the_old(store):
    made = initialised(store)
    before = made.keyring.sealer().seal("point", b"p", b"old point")
    rotated = keystore.rotate(store, made.ring_key, random=Stream(b"r"))
    assert rotated.generation == 2 and rotated.current == 2
    assert [n for n in names(store) if "keyring" in n] == ["keys/keyring-0000000000000001",
                                                          "keys/keyring-0000000000000002",
                                                          "keys/keyring-0000000000000002.copy"]
    assert keystore.generations(store) == [1, 2]
    assert store.get(keyring_object(1), limit=1 << 20) == EMPTIED  # its keys gone, name kept
    loaded = keystore.load_keyring(store, made.ring_key)
    assert loaded == rotated
    assert loaded.sealer().open("point", b"p", before, "p") == b"old point"


def test_a_late_writer_never_puts_a_generation_no_reader_sees(store):
    """A writer read generation 1; before it writes 2, another host makes two key changes (2,
    then 3, replacing 2): the late put of 2 must fail and the change be made again on 3, not
    land under 2's name, freed, where readers (taking the newest) never look."""
    made = initialised(store)
    others: list[Keyring] = []

    def change(keyring: Keyring) -> Keyring:
        if not others:
            others.extend(keystore.rotate(store, made.ring_key, random=Stream(name))
                          for name in (b"a", b"b"))
        return keyring.rotated(Stream(b"late"))
    ours = keystore.change_keyring(store, made.ring_key, change)
    assert [k.generation for k in others] == [2, 3]
    assert ours.generation == 4 and sorted(ours.epochs) == [1, 2, 3, 4]
    assert keystore.load_keyring(store, made.ring_key) == ours


class RacingStore:
    """A store in which another writer rotates just before our first keyring write."""

    def __init__(self, store, ring_key):
        self._store, self._ring_key, self.raced = store, ring_key, False

    def __getattr__(self, name):
        return getattr(self._store, name)

    def put(self, name, data, *, if_absent=False):
        if name.startswith("keys/keyring-") and not self.raced:
            self.raced = True
            keystore.rotate(self._store, self._ring_key, random=Stream(b"other host"))
        self._store.put(name, data, if_absent=if_absent)


def test_a_rotation_that_loses_a_race_retries_on_top_of_the_winner(store):
    made = initialised(store)
    racing = RacingStore(store, made.ring_key)
    ours = keystore.rotate(racing, made.ring_key, random=Stream(b"us"))
    winner = Stream(b"other host")(32)  # the other host's new data key
    assert racing.raced and ours.generation == 3 and sorted(ours.epochs) == [1, 2, 3]
    assert ours.epochs[2] == winner  # its epoch kept: what it sealed stays readable
    assert keystore.load_keyring(store, made.ring_key) == ours


def test_a_missing_or_moved_keyring_is_tampering(store):
    made = initialised(store)
    record = store.get(keyring_object(1), limit=1 << 20)
    store.put(keyring_object(2), record)  # generation 1's record under generation 2's name
    with pytest.raises(TamperedError, match="keyring-0000000000000002: sealed keyring fails "
                                            "authentication"):
        keystore.load_keyring(store, made.ring_key)
    store.delete([keyring_object(1), keyring_copy(1), keyring_object(2)])
    with pytest.raises(TamperedError, match="/keys: no keyring; the repository's keys were "
                                            "deleted"):
        keystore.load_keyring(store, made.ring_key)


def _damage(store, name: str) -> None:
    path = store.path_of(name)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("harm", ["damaged", "missing"])
def test_a_keyring_record_damaged_or_missing_is_read_from_its_copy(store, harm):
    made = initialised(store)
    rotated = keystore.rotate(store, made.ring_key, random=Stream(b"r"))
    if harm == "damaged":
        _damage(store, keyring_object(2))
    else:
        store.delete([keyring_object(2)])
    assert keystore.load_keyring(store, made.ring_key) == rotated
    # the next change writes both records of a new generation, and the harm is gone with the old
    again = keystore.rotate(store, made.ring_key, random=Stream(b"again"))
    assert [n for n in names(store) if "keyring" in n][-2:] == [
        "keys/keyring-0000000000000003", "keys/keyring-0000000000000003.copy"]
    assert [store.get(keyring_object(g), limit=1 << 20) for g in (1, 2)] == [EMPTIED] * 2
    assert not [n for n in names(store) if n.endswith(".copy") and "0003" not in n]
    assert keystore.load_keyring(store, made.ring_key) == again


def test_a_damaged_copy_is_not_read_while_its_record_is_whole(store):
    made = initialised(store)
    _damage(store, keyring_copy(1))
    assert keystore.load_keyring(store, made.ring_key) == made.keyring


def test_both_records_damaged_is_the_records_own_error(store):
    made = initialised(store)
    _damage(store, keyring_object(1))
    store.delete([keyring_copy(1)])
    with pytest.raises(DamageError, match="keyring-0000000000000001: "):
        keystore.load_keyring(store, made.ring_key)
    _damage(store, keyring_object(1))  # whole again
    store.put(keyring_copy(1), store.get(keyring_object(1), limit=1 << 20))
    _damage(store, keyring_object(1))
    _damage(store, keyring_copy(1))
    with pytest.raises(DamageError, match="keyring-0000000000000001: keyring checksum"):
        keystore.load_keyring(store, made.ring_key)


def test_a_keyring_written_before_copies_existed_still_opens(store):
    """A repository made before generations had copies: one record each."""
    made = initialised(store)
    store.delete([keyring_copy(1)])
    assert keystore.load_keyring(store, made.ring_key) == made.keyring
    rotated = keystore.rotate(store, made.ring_key, random=Stream(b"r"))
    assert keystore.generations(store) == [1, 2] and keystore.load_keyring(store,
                                                                        made.ring_key) == rotated
