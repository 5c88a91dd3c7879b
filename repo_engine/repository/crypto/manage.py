"""Key management of an encrypted repository, as the `key` commands use it: the key operations
(keys.py) applied to the records in the store (keystore.py), each in its crash-safe order.

- Listing the slots needs no key: a slot's public fields (kind, label, time, KDF parameters) are
  readable by anyone with access to the store; the epochs are in the sealed keyring.
- Every change first unlocks (a passphrase, or the recovery key), which also checks the keyring
  and the config it binds: a change is never made on the strength of a slot copied from another
  repository.
- Every change is a new keyring generation written put-if-absent (keystore.change_keyring),
  checked again on the generation it is written over: a change racing another host's is re-made
  on top of it or refused (the slot that opened was removed meanwhile; the removal would leave no
  passphrase slot). A change made by a slot the keyring no longer lists is refused. A slot file
  removed while no keyring listed it is put back when a change lists it meanwhile (`_put_back`).
- New slot files are written before the generation that lists them, and before any slot they
  replace is deleted; a recovery key file is durable before its slot is written (a slot without
  its private key would be useless), and deleted again when its slot could not be added.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ...errors import RepoError, UsageError
from ..atomic import write_atomic
from ..store import ObjectExists, Store
from . import keys
from . import slots as slot_format
from .access import unlock_store
from .keyring import Keyring
from .keys import Unlocked
from .keystore import (KeyringFull, change_keyring, delete_slot, load_keyring, load_slots,
                       save_slot)
from .null import Passphrase
from .slots import Slot



@dataclass(frozen=True)
class Opened:
    """The repository's keys: K_ring and the slot that opened, and the newest keyring."""

    unlocked: Unlocked
    keyring: Keyring


@dataclass(frozen=True)
class SlotList:
    slots: list[Slot]
    skipped: list[str]  # one message per unreadable slot file


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _put_back(store: Store, slot: Slot) -> None:
    """`slot`'s file stored again unless it is there. A removal deletes a slot file no keyring
    listed when it checked, then reads the keyring again; a change that lists a new slot stores
    its file again after writing the keyring: whatever their order, one of the two sees the
    other's write and the listed slot keeps its file."""
    try:
        save_slot(store, slot)
    except ObjectExists:
        pass


class KeyManager:
    """The keys of the encrypted repository in `store`, whose config has `config_digest`."""

    def __init__(self, store: Store, config_digest: bytes) -> None:
        self.store = store
        self._config_digest = config_digest

    def __enter__(self) -> KeyManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()

    def slots(self) -> SlotList:
        found, skipped = load_slots(self.store)
        return SlotList(keys.newest_first(found, slot_format.PASSPHRASE)
                        + keys.newest_first(found, slot_format.RECOVERY), skipped)

    def unlock(self, passphrase: Passphrase, *, keeping: str | None = None) -> Opened:
        """Unlocked with the passphrase; `keeping`: a slot about to be removed, which the
        passphrase must not be the one to open."""
        def opener(found: list[Slot], skipped: list[str]) -> Unlocked:
            return keys.unlock([s for s in found if s.id != keeping], passphrase(),
                               skipped=skipped)
        return self._opened(opener)

    def recover(self, pem: bytes, what: str) -> Opened:
        """Unlocked with the recovery private key `pem` (read from `what`)."""
        return self._opened(lambda found, _skipped: keys.recover(found, pem, what))

    def _opened(self, opener: Callable[[list[Slot], list[str]], Unlocked]) -> Opened:
        return Opened(*unlock_store(self.store, self._config_digest, opener))

    def _change(self, opened: Opened, change: Callable[[Keyring], Keyring]) -> Keyring:
        """`change` as the next keyring generation, made by the slot that opened."""
        def checked(keyring: Keyring) -> Keyring:
            keys.still_listed(keyring, opened.unlocked.slot)
            return change(keyring)
        return change_keyring(self.store, opened.unlocked.ring_key, checked)

    def _listed(self, opened: Opened, slot: Slot,
                change: Callable[[Keyring], Keyring]) -> None:
        """The new `slot` stored, then `change` (which lists it); its file deleted again when
        the change is refused (never after a store error: the generation listing it may have
        been written; an unlisted file left is harmless, it opens nothing)."""
        save_slot(self.store, slot)
        try:
            self._change(opened, change)
        except (keys.SlotRefused, KeyringFull):
            delete_slot(self.store, slot)
            raise
        _put_back(self.store, slot)  # a removal may have deleted it while no keyring listed it

    def add_passphrase(self, opened: Opened, new: bytes, label: str) -> Slot:
        slot = self._passphrase_slot(opened, new, label)
        self._listed(opened, slot, lambda keyring: keys.with_slot(keyring, slot))
        return slot

    def _passphrase_slot(self, opened: Opened, new: bytes, label: str) -> Slot:
        return slot_format.passphrase_slot(opened.unlocked.ring_key, new,
                                           slot_format.DEFAULT_SCRYPT, label=label, now=_now(),
                                           random=os.urandom)

    def remove(self, slot_id: str, passphrase: Passphrase) -> Slot:
        """Delete the slot `slot_id` names, once a passphrase of a slot that stays unlocked: a
        repository is never left with only slots nobody can open."""
        victim = keys.removable(self.slots().slots, slot_id)
        try:
            opened = self.unlock(passphrase, keeping=victim.id)
        except keys.WrongPassphrase as exc:
            raise keys.WrongPassphrase(f"{exc} (removing slot {victim.id} needs the passphrase "
                                       "of a slot that stays)") from None
        listed = victim.id in opened.keyring.slots
        self._change(opened, lambda keyring: keys.without_slot(keyring, victim, listed=listed))
        delete_slot(self.store, victim)
        self._not_listed_since(opened, victim)
        return victim

    def _not_listed_since(self, opened: Opened, victim: Slot) -> None:
        """Put `victim`'s file back, refused, when the newest keyring lists it after all: a
        change that lists a new slot (`key passwd`, `key add`) may have been written between
        this removal's keyring check and the file's deletion, and a listed slot without its
        file opens nothing (with `key passwd` having dropped the old slot: no passphrase
        would open the repository)."""
        keyring = load_keyring(self.store, opened.unlocked.ring_key)
        if victim.id in keyring.slots:
            _put_back(self.store, victim)
            raise keys.SlotRefused(f"key slot {victim.id} was listed by another key change "
                                   f"meanwhile (keyring generation {keyring.generation}); it "
                                   "was kept: see 'repo-engine key list', then remove it again")

    def change_passphrase(self, opened: Opened, new: bytes) -> Slot:
        """A slot for `new` (durable first) in place of the slot that opened, whose file is
        deleted once the keyring no longer lists it."""
        old = opened.unlocked.slot
        slot = self._passphrase_slot(opened, new, old.label)
        self._listed(opened, slot, lambda keyring: keys.without_slot(
            keys.with_slot(keyring, slot), old))
        delete_slot(self.store, old)
        return slot

    def rotate(self, opened: Opened) -> Keyring:
        return self._change(opened, lambda keyring: keyring.rotated())

    def export_recovery(self, opened: Opened, out: Path, label: str) -> Slot:
        """Write a new recovery private key to `out` (owner-only, a new file), then its slot;
        the file is deleted again when the slot could not be added (a key that opens nothing
        must not be kept as a way back in), unless the keyring may list it after all."""
        pem, slot = keys.export_recovery(opened.unlocked.ring_key, label=label, now=_now())
        try:
            write_atomic(out, pem, overwrite=False)
        except FileExistsError:
            raise UsageError(f"{out} already exists: a recovery key is never written over a "
                             "file; name a new file") from None
        try:
            self._listed(opened, slot, lambda keyring: keys.with_slot(keyring, slot))
        except BaseException:
            if self._surely_unlisted(opened, slot):
                out.unlink(missing_ok=True)
            raise
        return slot

    def _surely_unlisted(self, opened: Opened, slot: Slot) -> bool:
        """Whether the newest keyring is known not to list `slot`: False when it cannot be read
        (a keyring write whose answer was lost may have listed it)."""
        try:
            return slot.id not in load_keyring(self.store, opened.unlocked.ring_key).slots
        except (RepoError, OSError):
            return False
