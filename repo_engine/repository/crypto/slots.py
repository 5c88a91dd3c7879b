"""Key slots: the keyring key K_ring wrapped for one passphrase or one recovery public key.

A slot record is an envelope (envelope.py: magic SLOT, version, length, payload, BLAKE3 checksum)
whose payload is one JSON object, keys sorted, no spaces, ASCII:

| field     | passphrase slot                         | recovery slot                          |
|-----------|-----------------------------------------|----------------------------------------|
| id        | 16 hex: the slot's name `keys/slot-<id>.slot`                                    |
| kind      | "passphrase"                            | "recovery"                             |
| created   | UTC time, "YYYY-MM-DDTHH:MM:SSZ"                                                 |
| label     | free text (at most 200 characters), shown by `key list`                          |
| kdf       | {"name": "scrypt", "log_n", "r", "p"}   | absent                                 |
| salt      | 64 hex: the scrypt salt                 | absent                                 |
| recipient | absent                                  | 64 hex: the X25519 public key          |
| ephemeral | absent                                  | 64 hex: the ephemeral X25519 public key |
| wrapped   | 96 hex: AES-256-GCM(KEK, nonce 0, AD) of K_ring (32 bytes), tag last             |

KEK of a passphrase slot = scrypt(passphrase, salt, 2^log_n, r, p), 32 bytes; of a recovery slot
= HKDF-SHA256(X25519(ephemeral private, recipient), salt = ephemeral || recipient,
info = RECOVERY_INFO). Each KEK wraps one message only (a new salt or ephemeral key for every
slot), so nonce 0 is safe. AD = SLOT_AD + the payload's JSON without `wrapped`: a change to any
field (the parameters, the label, the id) makes the slot fail to open, even when the checksum
was recomputed; the checksum itself lets a reader without the passphrase tell damage from a
wrong passphrase, and `key list` show the slots.

The scrypt parameters are checked against MAX_MEMORY and MAX_WORK when a slot is read, before
any derivation: a hostile slot cannot make an unlock allocate gigabytes or run for minutes.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ...errors import FormatError, TamperedError, UsageError
from ..envelope import seal as envelope_seal
from ..envelope import unseal as envelope_unseal
from ..formats import SLOT
from . import ahead
from .cipher import KEY_SIZE, SALT_SIZE, TAG_SIZE, derive, nonce
from .seal import Random

PASSPHRASE, RECOVERY = "passphrase", "recovery"
SLOT_AD = b"repo-engine slot v1\x00"
RECOVERY_INFO = b"repo-engine recovery slot v1"
MAX_LABEL = 200
MAX_MEMORY = 1 << 30  # bytes scrypt may take: 128 * n * r
MAX_WORK = 1 << 24  # n * r * p: ten times DEFAULT_SCRYPT's, about 5 s here
WRAPPED_SIZE = KEY_SIZE + TAG_SIZE
_ID = re.compile(r"[0-9a-f]{16}")
# `timestamp`'s format; checked by a pattern and fromisoformat, not strptime, whose first call
# costs every command of an encrypted repository some 2 ms of imports and locale set-up
_CREATED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", re.ASCII)


@dataclass(frozen=True)
class ScryptParams:
    """scrypt's cost: n = 2^log_n, block size r, parallelism p."""

    log_n: int
    r: int
    p: int

    @property
    def memory(self) -> int:
        return 128 * (1 << self.log_n) * self.r

    def check(self, what: str) -> ScryptParams:
        """These parameters, when within the bounds a reader accepts (else TamperedError)."""
        fine = (all(type(v) is int for v in (self.log_n, self.r, self.p))
                and 1 <= self.log_n <= 30 and 1 <= self.r and 1 <= self.p
                and self.memory <= MAX_MEMORY and (1 << self.log_n) * self.r * self.p <= MAX_WORK)
        if not fine:
            raise TamperedError(
                f"{what}: key slot asks scrypt for n=2^{self.log_n}, r={self.r}, p={self.p}, "
                f"beyond what any slot may ask (at most {MAX_MEMORY >> 20} MiB and n*r*p <= "
                f"2^{MAX_WORK.bit_length() - 1}); refused unread: it was tampered with")
        return self

    def derive(self, passphrase: bytes, salt: bytes) -> bytes:
        """The key for `passphrase`: derived ahead (ahead.py) when that was started, else now."""
        started = ahead.take(self, salt, passphrase)
        if started is not None and started.exception() is None:
            return started.result()
        return self.compute(passphrase, salt)  # none started, or it failed: derive here

    def compute(self, passphrase: bytes, salt: bytes) -> bytes:
        return Scrypt(salt, KEY_SIZE, 1 << self.log_n, self.r, self.p).derive(passphrase)


# about 0.45 s on the reference machine (bench/crypto.py) in 64 MiB: p runs the same memory 3
# times over, so every command's unlock stays within the memory a backup may take (peak RSS
# under 200 MB) while an offline guess still costs 0.45 s and 64 MiB
DEFAULT_SCRYPT = ScryptParams(log_n=16, r=8, p=3)


@dataclass(frozen=True)
class Slot:
    id: str
    kind: str
    created: str
    label: str
    wrapped: bytes
    kdf: ScryptParams | None = None  # passphrase slots
    salt: bytes = b""  # passphrase slots
    recipient: bytes = b""  # recovery slots
    ephemeral: bytes = b""  # recovery slots

    @property
    def name(self) -> str:
        return slot_object(self.id)

    def public_fields(self) -> dict[str, Any]:
        """The JSON fields but `wrapped`, as written (bytes as hex, absent fields left out)."""
        fields: dict[str, Any] = {"id": self.id, "kind": self.kind, "created": self.created,
                                  "label": self.label}
        if self.kind == PASSPHRASE:
            assert self.kdf is not None
            fields.update(kdf={"name": "scrypt", **asdict(self.kdf)}, salt=self.salt.hex())
        else:
            fields.update(recipient=self.recipient.hex(), ephemeral=self.ephemeral.hex())
        return fields


def slot_object(slot_id: str) -> str:
    return f"keys/slot-{slot_id}.slot"


def timestamp(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _associated(slot: Slot) -> bytes:
    return SLOT_AD + _canonical(slot.public_fields())


def _wrap(slot: Slot, kek: bytes, ring_key: bytes) -> Slot:
    wrapped = AESGCM(kek).encrypt(nonce(0), ring_key, _associated(slot))
    return replace(slot, wrapped=wrapped)


def _unwrap(slot: Slot, kek: bytes) -> bytes | None:
    try:
        return AESGCM(kek).decrypt(nonce(0), slot.wrapped, _associated(slot))
    except InvalidTag:
        return None


def _new(kind: str, label: str, now: datetime, random: Random, **fields: Any) -> Slot:
    if len(label) > MAX_LABEL:
        raise UsageError(f"--label: a key slot label has at most {MAX_LABEL} characters")
    return Slot(id=random(8).hex(), kind=kind, created=timestamp(now), label=label,
                wrapped=b"", **fields)


def passphrase_slot(ring_key: bytes, passphrase: bytes, params: ScryptParams, *, label: str,
                    now: datetime, random: Random) -> Slot:
    params.check("new key slot")
    slot = _new(PASSPHRASE, label, now, random, kdf=params, salt=random(SALT_SIZE))
    return _wrap(slot, params.derive(passphrase, slot.salt), ring_key)


def recovery_slot(ring_key: bytes, recipient: bytes, *, label: str, now: datetime,
                  random: Random) -> Slot:
    """A slot only the holder of the private key of `recipient` (raw X25519, 32 bytes) opens."""
    recipient_key = X25519PublicKey.from_public_bytes(recipient)
    ephemeral = X25519PrivateKey.from_private_bytes(random(KEY_SIZE))
    slot = _new(RECOVERY, label, now, random, recipient=recipient,
                ephemeral=ephemeral.public_key().public_bytes_raw())
    return _wrap(slot, _recovery_kek(ephemeral.exchange(recipient_key), slot), ring_key)


def _recovery_kek(shared: bytes, slot: Slot) -> bytes:
    return derive(shared, slot.ephemeral + slot.recipient, RECOVERY_INFO)


def open_passphrase(slot: Slot, passphrase: bytes) -> bytes | None:
    """K_ring, when `passphrase` is this passphrase slot's."""
    assert slot.kind == PASSPHRASE and slot.kdf is not None
    return _unwrap(slot, slot.kdf.derive(passphrase, slot.salt))


def open_recovery(slot: Slot, private_key: X25519PrivateKey) -> bytes | None:
    """K_ring, when `private_key` is the one this recovery slot was made for."""
    assert slot.kind == RECOVERY
    if private_key.public_key().public_bytes_raw() != slot.recipient:
        return None
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(slot.ephemeral))
    except ValueError:  # a low-order ephemeral key: the all-zero shared secret
        return None
    return _unwrap(slot, _recovery_kek(shared, slot))


def encode_slot(slot: Slot) -> bytes:
    assert len(slot.wrapped) == WRAPPED_SIZE
    return envelope_seal(SLOT, _canonical({**slot.public_fields(), "wrapped": slot.wrapped.hex()}))


def decode_slot(data: bytes, what: str) -> Slot:
    """The slot in the record `data` (named `what` in errors): checksum, fields and scrypt
    bounds checked, nothing derived yet."""
    payload = envelope_unseal(SLOT, data, what)
    try:
        fields = json.loads(payload)
        slot = _slot_of(fields, what)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise TamperedError(f"{what}: key slot record is malformed ({exc}); it was tampered "
                            "with") from None
    if slot.kdf is not None:
        slot.kdf.check(what)
    return slot


def _hex(fields: dict[str, Any], key: str, size: int) -> bytes:
    value = bytes.fromhex(fields[key])
    if len(value) != size:
        raise ValueError(f"{key} has {len(value)} bytes, not {size}")
    return value


def valid_id(slot_id: object) -> bool:
    return isinstance(slot_id, str) and _ID.fullmatch(slot_id) is not None


def _slot_of(fields: dict[str, Any], what: str) -> Slot:
    kind, slot_id, label = fields["kind"], fields["id"], fields["label"]
    if kind not in (PASSPHRASE, RECOVERY):
        raise FormatError(f"{what}: key slot kind {kind!r} is not supported; upgrade repo-engine")
    if not valid_id(slot_id):
        raise ValueError(f"bad id {slot_id!r}")
    if not isinstance(label, str) or len(label) > MAX_LABEL:
        raise ValueError("bad label")
    created = fields["created"]
    if not _CREATED.fullmatch(created):
        raise ValueError(f"bad creation time {created!r}")
    datetime.fromisoformat(created[:-1])   # a real date and time
    common = dict(id=slot_id, kind=kind, created=created, label=label,
                  wrapped=_hex(fields, "wrapped", WRAPPED_SIZE))
    if kind == RECOVERY:
        return Slot(**common, recipient=_hex(fields, "recipient", KEY_SIZE),
                    ephemeral=_hex(fields, "ephemeral", KEY_SIZE))
    kdf = fields["kdf"]
    if kdf.get("name") != "scrypt" or set(kdf) != {"name", "log_n", "r", "p"}:
        raise FormatError(f"{what}: key slot KDF {kdf.get('name')!r} is not supported; "
                          "upgrade repo-engine")
    return Slot(**common, kdf=ScryptParams(kdf["log_n"], kdf["r"], kdf["p"]),
                salt=_hex(fields, "salt", SALT_SIZE))

