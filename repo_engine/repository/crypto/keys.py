"""The key operations, as pure functions over keyrings and slots (keystore.py stores them).

- `create`: a new repository's K_ring, keyring (generation 1, epoch 1, bound to its config) and
  first passphrase slot.
- `unlock`: K_ring from a passphrase, trying every passphrase slot, newest first; a wrong
  passphrase is one error naming the slots tried.
- `slots.passphrase_slot` adds a slot for another passphrase (K_ring needed: unlock first).
- `removable`: the slot a `key remove` deletes; never the last slot nor the last passphrase slot.
- `with_slot`, `without_slot`, `still_listed`: the keyring generation that lists the valid slots,
  changed, each change checked against the generation it is applied to (a racing change may have
  removed the slot that opened, or every other passphrase slot).
- `change_passphrase`: a new slot for the new passphrase, and the old one's to delete after.
- `Keyring.rotated` (keyring.py): a new epoch for new data; old epochs stay readable.
- `export_recovery`: a new X25519 key pair; the private key as PEM for the user, a recovery slot
  for its public key. `recover`: K_ring through a recovery slot, given the private key.

Every function that makes keys or salts takes `random` (os.urandom by default), so that tests
can write golden bytes; scrypt parameters are always an explicit argument.
"""

from __future__ import annotations

import binascii
import os
from base64 import b64decode
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ...errors import NAME_THE_KEY, RepoError, UsageError
from .cipher import KEY_SIZE
from .keyring import Keyring, new_keyring
from .seal import Random
from .slots import (PASSPHRASE, RECOVERY, ScryptParams, Slot, open_passphrase, open_recovery,
                    passphrase_slot, recovery_slot)


class WrongPassphrase(RepoError):
    """The passphrase opens none of the repository's passphrase slots (exit code 1)."""


class WrongRecoveryKey(RepoError):
    """The private key opens none of the repository's recovery slots (exit code 1)."""


class NotARecoveryKey(UsageError):
    """The file given as a recovery key holds no X25519 private key: the user named the wrong
    file, which is not a wrong key (exit code 2)."""


class SlotRefused(RepoError):
    """A slot operation would lock the repository (remove its last slot) or names no slot."""


@dataclass(frozen=True)
class RepositoryKeys:
    ring_key: bytes = field(repr=False)
    keyring: Keyring
    slot: Slot


@dataclass(frozen=True)
class Unlocked:
    ring_key: bytes = field(repr=False)
    slot: Slot  # the slot that opened


def create(passphrase: bytes, params: ScryptParams, *, label: str, now: datetime,
           config_digest: bytes, random: Random = os.urandom) -> RepositoryKeys:
    """`config_digest`: the new repository's config's (bound in the keyring)."""
    ring_key = random(KEY_SIZE)
    keyring = new_keyring(config_digest, random)
    slot = passphrase_slot(ring_key, passphrase, params, label=label, now=now, random=random)
    return RepositoryKeys(ring_key, replace(keyring, slots={slot.id: slot.kind}), slot)


def newest_first(slots: Sequence[Slot], kind: str) -> list[Slot]:
    return sorted((s for s in slots if s.kind == kind), key=lambda s: (s.created, s.id),
                  reverse=True)


def _names(slots: Sequence[Slot]) -> str:
    return ", ".join(f"{s.id}" + (f" '{s.label}'" if s.label else "") for s in slots)


def _skipped_note(skipped: Sequence[str]) -> str:
    return f"; unreadable slots skipped: {'; '.join(skipped)}" if skipped else ""


def unlock(slots: Sequence[Slot], passphrase: bytes, *, skipped: Sequence[str] = ()) -> Unlocked:
    """K_ring through the first passphrase slot `passphrase` opens; `skipped` names slots that
    could not be read (for the error)."""
    tried = newest_first(slots, PASSPHRASE)
    for slot in tried:
        ring_key = open_passphrase(slot, passphrase)
        if ring_key is not None:
            return Unlocked(ring_key, slot)
    if not tried:
        raise WrongPassphrase("the repository has no passphrase slot; open it with its recovery "
                              "key: 'repo-engine key recover --private-key FILE'"
                              + _skipped_note(skipped))
    raise WrongPassphrase(
        f"the passphrase opens none of the {len(tried)} passphrase slot"
        f"{'s' if len(tried) > 1 else ''} ({_names(tried)}); check the passphrase file or "
        "variable, or use the recovery key" + _skipped_note(skipped))


def find_slot(slots: Sequence[Slot], slot_id: str) -> Slot:
    """The slot whose id is or starts with `slot_id` (at least 4 hex digits, unambiguous)."""
    found = [s for s in slots if len(slot_id) >= 4 and s.id.startswith(slot_id.lower())]
    if len(found) != 1:
        why = "matches several slots" if found else "matches no slot"
        raise SlotRefused(f"key slot {slot_id!r} {why}; 'repo-engine key list' shows them: "
                          f"{_names(slots)}")
    return found[0]


def removable(slots: Sequence[Slot], slot_id: str) -> Slot:
    """The slot `slot_id` names, when removing it leaves a passphrase slot to open with."""
    slot = find_slot(slots, slot_id)
    _refuse_lockout(slot, [s.kind for s in slots if s.id != slot.id])
    return slot


def with_slot(keyring: Keyring, slot: Slot) -> Keyring:
    return replace(keyring, slots={**keyring.slots, slot.id: slot.kind})


def without_slot(keyring: Keyring, slot: Slot, *, listed: bool = True) -> Keyring:
    """`keyring` without `slot`, unless that leaves no passphrase slot. `listed`: whether the
    keyring the change was decided on listed `slot`; when it did not (a removal that crashed
    before deleting the file), `keyring` itself; when it did and `keyring` no longer does,
    another change removed or replaced the slot meanwhile: refused."""
    if slot.id not in keyring.slots:
        if listed:
            raise SlotRefused(f"key slot {slot.id} was removed or replaced meanwhile (keyring "
                              f"generation {keyring.generation}); nothing was changed: see "
                              "'repo-engine key list'")
        return keyring
    _refuse_lockout(slot, [k for i, k in keyring.slots.items() if i != slot.id])
    return replace(keyring, slots={i: k for i, k in keyring.slots.items() if i != slot.id})


def still_listed(keyring: Keyring, slot: Slot) -> None:
    """Refuse a change whose authority, the slot that opened, another change has removed."""
    if slot.id not in keyring.slots:
        raise SlotRefused(f"key slot {slot.id}, which opened the repository, was removed from "
                          f"it meanwhile (keyring generation {keyring.generation}); nothing was "
                          "changed: try again with a passphrase 'repo-engine key list' shows")


def _refuse_lockout(slot: Slot, other_kinds: Sequence[str]) -> None:
    """SlotRefused when removing `slot` leaves slots of `other_kinds` only."""
    if not other_kinds:
        raise SlotRefused(f"key slot {slot.id} is the repository's last slot: removing it would "
                          "lock the repository for good; add another first ('repo-engine key "
                          "add')")
    if slot.kind == PASSPHRASE and PASSPHRASE not in other_kinds:
        raise SlotRefused(f"key slot {slot.id} is the last passphrase slot: without it only the "
                          "recovery key opens the repository; add another first "
                          "('repo-engine key add')")
    return slot


def change_passphrase(slots: Sequence[Slot], old: bytes, new: bytes, params: ScryptParams, *,
                      now: datetime, random: Random = os.urandom) -> tuple[Slot, Slot]:
    """(the new slot, the slot `old` opened): write the new one, then delete the old one."""
    unlocked = unlock(slots, old)
    slot = passphrase_slot(unlocked.ring_key, new, params, label=unlocked.slot.label, now=now,
                           random=random)
    return slot, unlocked.slot


# What `export_recovery` writes: PEM of the PKCS#8 DER of an X25519 key (RFC 8410), which is
# this prefix and the 32-byte key. Read without the `serialization` module, whose imports cost
# every command opened by a key file some 4 ms; any other PEM goes through it.
_PEM_LINES = (b"-----BEGIN PRIVATE KEY-----", b"-----END PRIVATE KEY-----")
_X25519_PKCS8 = bytes.fromhex("302e020100300506032b656e04220420")


def export_recovery(ring_key: bytes, *, label: str, now: datetime,
                    random: Random = os.urandom) -> tuple[bytes, Slot]:
    """(a new X25519 private key as unencrypted PKCS#8 PEM, the recovery slot for it)."""
    from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption,
                                                              PrivateFormat)
    private_key = X25519PrivateKey.from_private_bytes(random(KEY_SIZE))
    pem = private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    slot = recovery_slot(ring_key, private_key.public_key().public_bytes_raw(), label=label,
                         now=now, random=random)
    return pem, slot


def _x25519_pkcs8(pem: bytes) -> bytes | None:
    """The raw key of `pem` when it is exactly what `export_recovery` writes, else None."""
    begin, end = _PEM_LINES
    text = pem.strip()
    if not (text.startswith(begin) and text.endswith(end)):
        return None
    try:
        der = b64decode(b"".join(text[len(begin):-len(end)].split()), validate=True)
    except binascii.Error:
        return None
    if len(der) != len(_X25519_PKCS8) + 32 or not der.startswith(_X25519_PKCS8):
        return None
    return der[len(_X25519_PKCS8):]


def load_recovery_key(pem: bytes, what: str) -> X25519PrivateKey:
    raw = _x25519_pkcs8(pem)
    if raw is not None:
        return X25519PrivateKey.from_private_bytes(raw)
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise NotARecoveryKey(f"{what} is not an unencrypted PEM private key ({exc}); "
                              f"{NAME_THE_KEY}") from None
    if not isinstance(key, X25519PrivateKey):
        raise NotARecoveryKey(f"{what} is a {type(key).__name__.lstrip('_')}, not the X25519 "
                              f"private key; {NAME_THE_KEY}")
    return key


def recover(slots: Sequence[Slot], pem: bytes, what: str) -> Unlocked:
    """K_ring through the recovery slot of the private key in `pem` (read from `what`)."""
    private_key = load_recovery_key(pem, what)
    tried = newest_first(slots, RECOVERY)
    for slot in tried:
        ring_key = open_recovery(slot, private_key)
        if ring_key is not None:
            return Unlocked(ring_key, slot)
    raise WrongRecoveryKey(f"the private key in {what} opens none of the repository's "
                           f"{len(tried)} recovery slots ({_names(tried) or 'none'})")
