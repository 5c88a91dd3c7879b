"""An encrypted repository's keys as an open repository holds them: made at init, unlocked at
open, and the one sealer every object of the repository goes through.

Open order: the slots (keystore.load_slots: an unreadable one is skipped and named), K_ring from
the passphrase (keys.unlock), the newest keyring generation, then the config read before the
keys is checked against the digest the keyring binds (config.py): a config changed in the store
(another block size, another id, encryption switched off) is tampering, exit code 3.

Only the slots the newest keyring lists open the repository: a slot file left behind by a
removal that crashed before deleting it is tried like any other, but when it is the one that
opens, the passphrase is tried again on the listed slots alone (and refused when it opens none).

The sealer reloads the keyring once when an object names an epoch it does not hold: another host
may have rotated since this one opened the repository. Only when the newest keyring lacks the
epoch too is that tampering.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from ...errors import RepoError, TamperedError
from ..store import Store
from .keyring import Keyring
from . import ahead
from . import slots as slot_format
from .keys import Unlocked, create, recover, unlock
from .keystore import change_keyring, init_keys, load_keyring, load_slots
from .null import PartSealer, Sealer
from .seal import ObjectSealer, UnknownEpoch
from .slots import ScryptParams, Slot

T = TypeVar("T")


@dataclass(frozen=True)
class OpenKeys:
    """What an open encrypted repository needs: its sealer and its chunk-id key."""

    sealer: Sealer
    chunk_key: bytes = field(repr=False)


class RepositorySealer:
    """Seals with the current epoch of the newest keyring this host read; opens any epoch the
    keyring holds, reloading it once for an epoch it lacks."""

    encrypted = True

    def __init__(self, store: Store, ring_key: bytes, keyring: Keyring) -> None:
        self._store = store
        self._ring_key = ring_key
        self._keyring = keyring
        self._sealer = keyring.sealer()
        self._reloading = threading.Lock()  # the threads of a backup share this sealer
        self.part_overhead = self._sealer.part_overhead
        # a reload may change the epoch new objects get in the middle of a command: every
        # epoch used counts when a commit checks that none of them was retired
        self._used: frozenset[int] = frozenset()

    @property
    def keyring(self) -> Keyring:
        """The newest keyring this host read."""
        return self._keyring

    def drop_epochs(self, retired: frozenset[int]) -> Keyring:
        """Write a keyring generation without the data keys of `retired` (never the current
        epoch), once nothing in the store is sealed under them any more (maintenance/retire.py
        makes sure): from then on no key this repository holds opens what they sealed."""
        def drop(keyring: Keyring) -> Keyring:
            if keyring.current in retired:
                raise RepoError(f"{self._store.location}/keys: epoch {keyring.current}, the one "
                                "new data is sealed with, cannot be retired; run 'repo-engine "
                                "key rotate' first")
            if not retired & keyring.epochs.keys():
                return keyring
            return replace(keyring, epochs={e: k for e, k in keyring.epochs.items()
                                            if e not in retired})
        with self._reloading:
            keyring = change_keyring(self._store, self._ring_key, drop)
            self._keyring, self._sealer = keyring, keyring.sealer()
        return keyring

    def sealed_size(self, size: int) -> int:
        return self._sealer.sealed_size(size)

    def seal(self, kind: str, name: bytes, plaintext: bytes) -> bytes:
        return self._sealing().seal(kind, name, plaintext)

    def open(self, kind: str, name: bytes, sealed: bytes, what: str) -> bytes:
        return self._retrying(lambda sealer: sealer.open(kind, name, sealed, what))

    def parts(self, kind: str) -> PartSealer:
        return self._sealing().parts(kind)

    def avoid(self, retired: set[int]) -> None:
        """Seal nothing more under the `retired` epochs: when the current one is among them
        (this host read the keyring before another host rotated, and may never have read an
        object sealed under the new epoch), the newest keyring is read."""
        sealer = self._sealer  # one snapshot: another thread may reload meanwhile (_sealing)
        if sealer.current not in retired:
            return
        sealer = self._reload(sealer)
        if sealer.current in retired:
            raise TamperedError(f"{self._store.location}/keys: the newest keyring seals new "
                                f"data under epoch {sealer.current}, which the journal "
                                "says was retired; the keyring was rolled back or tampered with")

    def _sealing(self) -> ObjectSealer:
        """The sealer to seal with, its epoch counted: the epoch of that very sealer, since
        another thread may replace `_keyring` and `_sealer` (a reload) in between."""
        sealer = self._sealer
        if sealer.current not in self._used:
            self._used |= {sealer.current}
        return sealer

    @property
    def sealed_epochs(self) -> frozenset[int]:
        """The epochs this sealer sealed anything under so far, and the one it seals with next
        (a journal entry is sealed after the commit's checks)."""
        return self._used | {self._keyring.current}

    def parts_opener(self, kind: str, header: bytes, what: str) -> PartSealer:
        return self._retrying(lambda sealer: sealer.parts_opener(kind, header, what))

    def _retrying(self, use: Callable[[Sealer], T]) -> T:
        sealer = self._sealer
        try:
            return use(sealer)
        except UnknownEpoch:
            return use(self._reload(sealer))

    def _reload(self, failed: Sealer) -> Sealer:
        """The sealer of the newest keyring (read once for all the threads that failed with
        `failed`), which must keep the chunk key and the config the repository was opened with."""
        with self._reloading:
            if self._sealer is failed:
                keyring = load_keyring(self._store, self._ring_key)
                if (keyring.chunk_key, keyring.config_digest) != (self._keyring.chunk_key,
                                                                  self._keyring.config_digest):
                    raise TamperedError(f"{self._store.location}/keys: the newest keyring "
                                        "changed the chunk-id key or the config it binds; it "
                                        "was tampered with")
                self._keyring, self._sealer = keyring, keyring.sealer()
            return self._sealer


def _check_config(keyring: Keyring, config_digest: bytes, location: str) -> None:
    if keyring.config_digest != config_digest:
        raise TamperedError(f"{location}/config: the config is not the one the repository's "
                            "keyring binds; it was changed or replaced in the store (restore it "
                            "from a copy)")


def create_keys(store: Store, config_digest: bytes, passphrase: bytes, *,
                params: ScryptParams | None = None, label: str = "") -> OpenKeys:
    """Make and store a new repository's keys (keyring, then its first passphrase slot), bound
    to the config of `config_digest`, which the caller writes after them. `params`: the slot's
    scrypt cost (None: slots.DEFAULT_SCRYPT, read when called)."""
    made = create(passphrase, params or slot_format.DEFAULT_SCRYPT, label=label,
                  now=datetime.now(timezone.utc), config_digest=config_digest)
    init_keys(store, made)
    return OpenKeys(RepositorySealer(store, made.ring_key, made.keyring), made.keyring.chunk_key)


def open_keys(store: Store, config_digest: bytes, passphrase: Callable[[], bytes] | None,
              key_file: tuple[bytes, str] | None = None, hint: Path | None = None) -> OpenKeys:
    """Unlock the repository in `store` whose config has `config_digest`: with `key_file` (the
    PEM of a recovery private key and where it was read: no KDF to run), else with
    `passphrase`, asked for only once the slots were read (a repository without readable
    slots asks nothing); the slot it opens is copied to `hint` (ahead.py)."""
    if key_file is not None:
        unlocked, keyring = unlock_store(store, config_digest,
                                         lambda found, _skipped: recover(found, *key_file))
    else:
        assert passphrase is not None
        unlocked, keyring = unlock_store(store, config_digest, lambda found, skipped: unlock(
            found, passphrase(), skipped=skipped))
        if hint is not None:
            ahead.remember(hint, slot_format.encode_slot(unlocked.slot))
    return OpenKeys(RepositorySealer(store, unlocked.ring_key, keyring), keyring.chunk_key)


def unlock_store(store: Store, config_digest: bytes,
                 opener: Callable[[list[Slot], list[str]], Unlocked]) -> tuple[Unlocked, Keyring]:
    """(K_ring and the slot that opened, the newest keyring) of the repository in `store`:
    `opener` (a passphrase or a recovery key) unwraps K_ring from one of the readable slots (it
    is given the messages of the unreadable ones), which must open the keyring that binds
    `config_digest`."""
    found, skipped = load_slots(store)
    if not found:
        raise TamperedError(f"{store.location}/keys: no readable key slot"
                            + (f" ({'; '.join(skipped)})" if skipped else "")
                            + "; the repository's keys were deleted or damaged")
    unlocked = opener(found, skipped)
    try:
        keyring = load_keyring(store, unlocked.ring_key)
    except TamperedError as exc:
        raise TamperedError(f"{exc} (with the key of slot {unlocked.slot.id}, which opened: a "
                            "slot copied from another repository, or a replaced keyring)") from None
    _check_config(keyring, config_digest, store.location)
    if unlocked.slot.id not in keyring.slots:  # a removed slot whose file a crash left
        unlocked = opener([s for s in found if s.id in keyring.slots], skipped)
    return unlocked, keyring
