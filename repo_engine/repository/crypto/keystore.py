"""Where the key records live in a store, and the write order that keeps each change crash-safe.

    keys/keyring-<16 hex generation>    keyring.py (newest generation wins)
    keys/slot-<16 hex id>.slot          slots.py

Write order: a new slot is durable before the slot it replaces is deleted (a crash in between
leaves both, each opening K_ring); a new keyring generation is durable (put-if-absent: one writer
makes each generation) before older generations are deleted; a crash in between leaves older
generations that readers ignore and the next rotation deletes. A record whose name and content
disagree (a slot copied under another id) is tampering.
"""

from __future__ import annotations

import os
import re

from ...errors import RepoError, TamperedError
from ..store import ObjectExists, Store
from .keyring import KEYRING_PREFIX, Keyring, decode_keyring, encode_keyring, keyring_object
from .keys import RepositoryKeys
from .seal import Random
from .slots import Slot, decode_slot, encode_slot

MAX_SLOT_SIZE = 64 << 10
MAX_KEYRING_SIZE = 1 << 20
ROTATE_ATTEMPTS = 5
_SLOT_NAME = re.compile(r"keys/slot-([0-9a-f]{16})\.slot")
_KEYRING_NAME = re.compile(re.escape(KEYRING_PREFIX) + r"([0-9a-f]{16})")


def save_slot(store: Store, slot: Slot) -> None:
    store.put(slot.name, encode_slot(slot), if_absent=True)


def delete_slot(store: Store, slot: Slot) -> None:
    store.delete([slot.name])


def load_slots(store: Store) -> tuple[list[Slot], list[str]]:
    """(the readable slots, one message per unreadable one): a damaged slot must not stop the
    others from opening the repository."""
    slots, skipped = [], []
    for info in store.list("keys/"):
        match = _SLOT_NAME.fullmatch(info.name)
        if not match:
            continue
        what = f"{store.location}/{info.name}"
        try:
            slot = decode_slot(store.get(info.name, limit=MAX_SLOT_SIZE), what)
            if slot.id != match[1]:
                raise TamperedError(f"{what}: holds key slot {slot.id}, not {match[1]}; it was "
                                    "moved from another name")
        except RepoError as exc:
            skipped.append(str(exc))
            continue
        slots.append(slot)
    return slots, skipped


def generations(store: Store) -> list[int]:
    return sorted(int(m[1], 16) for info in store.list(KEYRING_PREFIX)
                  if (m := _KEYRING_NAME.fullmatch(info.name)))


def load_keyring(store: Store, ring_key: bytes) -> Keyring:
    """The newest keyring generation (never an older one in its place: it may lack an epoch)."""
    found = generations(store)
    if not found:
        raise TamperedError(f"{store.location}/keys: no keyring; the repository's keys were "
                            "deleted")
    name = keyring_object(found[-1])
    return decode_keyring(store.get(name, limit=MAX_KEYRING_SIZE), found[-1], ring_key,
                          f"{store.location}/{name}")


def save_keyring(store: Store, keyring: Keyring, ring_key: bytes,
                 random: Random = os.urandom) -> None:
    """Write a new generation (ObjectExists when another writer made it first), then delete
    the older ones."""
    store.put(keyring_object(keyring.generation), encode_keyring(keyring, ring_key, random),
              if_absent=True)
    store.delete(keyring_object(g) for g in generations(store) if g < keyring.generation)


def init_keys(store: Store, keys: RepositoryKeys, random: Random = os.urandom) -> None:
    """Store a new repository's keys (keys.create): the keyring, then its first slot."""
    save_keyring(store, keys.keyring, keys.ring_key, random)
    save_slot(store, keys.slot)


def rotate(store: Store, ring_key: bytes, random: Random = os.urandom) -> Keyring:
    """A new epoch for new data, in a new keyring generation; a writer that lost the race to
    another rotation retries on top of it."""
    for _ in range(ROTATE_ATTEMPTS):
        keyring = load_keyring(store, ring_key).rotated(random)
        try:
            save_keyring(store, keyring, ring_key, random)
        except ObjectExists:
            continue
        return keyring
    raise RepoError(f"{store.location}/keys: the keyring changed under {ROTATE_ATTEMPTS} "
                    "rotations in a row; try again")
