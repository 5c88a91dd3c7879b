"""Where the key records live in a store, and the write order that keeps each change crash-safe.

    keys/keyring-<16 hex generation>    keyring.py (newest generation wins)
    keys/keyring-<16 hex generation>.copy   the same bytes, written after it
    keys/slot-<16 hex id>.slot          slots.py

Write order: a new slot file is durable before the keyring generation that lists it, and a
removed slot's file is deleted after the generation that no longer lists it (a crash in between
leaves a file the keyring does not list: it never opens the repository). Every key change is a
new keyring generation made by `change_keyring` from the newest one, put-if-absent: of two hosts
changing keys at once one writes generation g + 1, the other re-makes its change on g + 1 (which
may refuse it) and writes g + 2; no lock is needed, local or on object storage. Older generations
are emptied (keyring.EMPTIED), never deleted, once the new one is durable: a late writer's
put-if-absent of a name already used fails, whatever happened since; a crash in between leaves
older generations that readers ignore and the next change empties. A generation is read from its
copy when its record is missing or damaged (not when it was emptied: then it was replaced): the
record's put-if-absent decides which writer made the generation, so only that writer writes the
copy (a crash before the copy leaves a generation with one record, until the next key change);
an older generation's copy is deleted when its record is emptied. A record whose name and
content disagree (a slot copied under another id) is tampering.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import replace

from ...errors import RepoError, TamperedError
from ..store import ObjectExists, ObjectMissing, Store
from .keyring import (EMPTIED, KEYRING_PREFIX, Keyring, KeyringEmptied, decode_keyring,
                      encode_keyring, keyring_copy, keyring_object)
from .keys import RepositoryKeys
from .null import MAX_SLOT_SIZE
from .seal import Random
from .slots import Slot, decode_slot, encode_slot

MAX_KEYRING_SIZE = 1 << 20  # some 14,000 epochs: a writer refuses to grow past it
CHANGE_ATTEMPTS = 5
_SLOT_NAME = re.compile(r"keys/slot-([0-9a-f]{16})\.slot")
_KEYRING_NAME = re.compile(re.escape(KEYRING_PREFIX) + r"([0-9a-f]{16})(\.copy)?")


class KeyringFull(RepoError):
    """A key change would grow the keyring past MAX_KEYRING_SIZE, which no reader accepts
    (exit code 1): nothing was written."""


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
    """The generations with a record or a copy in `store`, emptied ones too, oldest first."""
    return sorted({g for g, _copy, _size in _listed(store)})


def _listed(store: Store) -> list[tuple[int, bool, int]]:
    """(generation, whether it is the copy, stored size) of every keyring record and copy."""
    return [(int(m[1], 16), bool(m[2]), info.size) for info in store.list(KEYRING_PREFIX)
            if (m := _KEYRING_NAME.fullmatch(info.name))]


def load_keyring(store: Store, ring_key: bytes) -> Keyring:
    """The newest keyring generation (never an older one in its place: it may lack an epoch).
    A generation deleted or emptied between the listing and the read was replaced by a newer
    one (another host's key change): listed again. So is a listing that holds none: a listing
    is no snapshot (a local one reads the directory, then looks at each file), and one racing a
    change can miss both g (deleted since) and g + 1 (written since); only two in a row mean no
    keyring."""
    for _ in range(CHANGE_ATTEMPTS):
        found = generations(store) or generations(store)
        if not found:
            raise TamperedError(f"{store.location}/keys: no keyring; the repository's keys "
                                "were deleted")
        try:
            return _read_generation(store, found[-1], ring_key)
        except (ObjectMissing, KeyringEmptied):
            if generations(store)[-1:] == found[-1:]:
                raise
    raise RepoError(f"{store.location}/keys: the keyring changed under {CHANGE_ATTEMPTS} "
                    "reads in a row (other hosts changing keys); try again")


def _read_generation(store: Store, generation: int, ring_key: bytes) -> Keyring:
    """Generation `generation` from its record, else from its copy; when neither reads, the
    error of a damaged one before that of a missing one (ObjectMissing: both gone)."""
    errors: list[RepoError] = []
    for name in (keyring_object(generation), keyring_copy(generation)):
        try:
            return decode_keyring(store.get(name, limit=MAX_KEYRING_SIZE), generation, ring_key,
                                  f"{store.location}/{name}")
        except KeyringEmptied:
            raise  # replaced by a newer generation: its copy is stale, or deleted
        except RepoError as exc:  # ObjectMissing is one
            errors.append(exc)
    raise next((e for e in errors if not isinstance(e, ObjectMissing)), errors[0])


def save_keyring(store: Store, keyring: Keyring, ring_key: bytes,
                 random: Random = os.urandom) -> None:
    """Write a new generation (ObjectExists when another writer made it first) and its copy,
    then empty the older ones. One larger than readers accept is refused unwritten
    (KeyringFull): as the newest generation it would lock every host out."""
    data = encode_keyring(keyring, ring_key, random)
    if len(data) > MAX_KEYRING_SIZE:
        raise KeyringFull(f"{store.location}/keys: the keyring would hold {len(data)} bytes "
                          f"({len(keyring.epochs)} key epochs, {len(keyring.slots)} slots), "
                          f"more than a keyring may ({MAX_KEYRING_SIZE}); nothing was changed: "
                          "run 'repo-engine key retire' to drop the old epochs' keys, and "
                          "'repo-engine key remove' slots no longer used")
    store.put(keyring_object(keyring.generation), data, if_absent=True)
    store.put(keyring_copy(keyring.generation), data)
    empty_older(store, keyring.generation)


def empty_older(store: Store, generation: int) -> None:
    """Empty the keyring generations before `generation` that still hold keys, and delete their
    copies (a crash after a change may have left them: an older one may hold a data key
    `key retire` dropped)."""
    listed = [(g, copy, size) for g, copy, size in _listed(store) if g < generation]
    emptied = {g for g, copy, size in listed if not copy and size == len(EMPTIED)}
    for older in sorted({g for g, _copy, _size in listed} - emptied):
        store.put(keyring_object(older), EMPTIED)
    store.delete(keyring_copy(g) for g, copy, _size in listed if copy)


def init_keys(store: Store, keys: RepositoryKeys, random: Random = os.urandom) -> None:
    """Store a new repository's keys (keys.create): the keyring, then its first slot."""
    save_keyring(store, keys.keyring, keys.ring_key, random)
    save_slot(store, keys.slot)


def change_keyring(store: Store, ring_key: bytes, change: Callable[[Keyring], Keyring],
                   random: Random = os.urandom) -> Keyring:
    """`change` (which may refuse) applied to the newest keyring and written as the next
    generation, whatever generation `change` gives it; a writer that lost the race to another
    change re-applies its own on top of it. A change that returns the keyring it was given
    writes nothing."""
    for _ in range(CHANGE_ATTEMPTS):
        current = load_keyring(store, ring_key)
        changed = change(current)
        if changed is current:
            return current
        keyring = replace(changed, generation=current.generation + 1)
        try:
            save_keyring(store, keyring, ring_key, random)
        except ObjectExists:
            continue
        return keyring
    raise RepoError(f"{store.location}/keys: the keyring changed under {CHANGE_ATTEMPTS} "
                    "attempts in a row (other hosts changing keys); try again")


def rotate(store: Store, ring_key: bytes, random: Random = os.urandom) -> Keyring:
    """A new epoch for new data, in a new keyring generation."""
    return change_keyring(store, ring_key, lambda keyring: keyring.rotated(random), random)
