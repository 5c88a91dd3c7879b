"""Key management of an encrypted repository, as the `key` commands use it: the key operations
(keys.py) applied to the records in the store (keystore.py), each in its crash-safe order.

- Listing the slots needs no key: a slot's public fields (kind, label, time, KDF parameters) are
  readable by anyone with access to the store; the epochs are in the sealed keyring.
- Every change first unlocks (a passphrase, or the recovery key), which also checks the keyring
  and the config it binds: a change is never made on the strength of a slot copied from another
  repository.
- New slots are written before any slot they replace is deleted; a recovery key file is durable
  before its slot is written (a slot without its private key would be useless, a key file
  without its slot is only a file to delete).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ...errors import UsageError
from ..atomic import write_atomic
from ..store import Store
from . import keys
from . import slots as slot_format
from .access import unlock_store
from .keyring import Keyring
from .keys import Unlocked
from .keystore import delete_slot, load_slots, rotate, save_slot
from .slots import Slot

Passphrase = Callable[[], bytes]


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

    def add_passphrase(self, opened: Opened, new: bytes, label: str) -> Slot:
        slot = slot_format.passphrase_slot(opened.unlocked.ring_key, new,
                                           slot_format.DEFAULT_SCRYPT, label=label, now=_now(),
                                           random=os.urandom)
        save_slot(self.store, slot)
        return slot

    def remove(self, slot_id: str, passphrase: Passphrase) -> Slot:
        """Delete the slot `slot_id` names, once a passphrase of a slot that stays unlocked: a
        repository is never left with only slots nobody can open."""
        victim = keys.removable(self.slots().slots, slot_id)
        try:
            self.unlock(passphrase, keeping=victim.id)
        except keys.WrongPassphrase as exc:
            raise keys.WrongPassphrase(f"{exc} (removing slot {victim.id} needs the passphrase "
                                       "of a slot that stays)") from None
        delete_slot(self.store, victim)
        return victim

    def change_passphrase(self, opened: Opened, new: bytes) -> Slot:
        """A slot for `new` (durable first), then the slot that opened deleted."""
        slot = self.add_passphrase(opened, new, opened.unlocked.slot.label)
        delete_slot(self.store, opened.unlocked.slot)
        return slot

    def rotate(self, opened: Opened) -> Keyring:
        return rotate(self.store, opened.unlocked.ring_key)

    def export_recovery(self, opened: Opened, out: Path, label: str) -> Slot:
        """Write a new recovery private key to `out` (owner-only, a new file), then its slot."""
        pem, slot = keys.export_recovery(opened.unlocked.ring_key, label=label, now=_now())
        try:
            write_atomic(out, pem, overwrite=False)
        except FileExistsError:
            raise UsageError(f"{out} already exists: a recovery key is never written over a "
                             "file; name a new file") from None
        save_slot(self.store, slot)
        return slot
