"""The cryptographic primitives every sealed object uses, in one place.

- AEAD: AES-256-GCM (`cryptography`), 12-byte nonce, 16-byte tag. Chosen by bench/crypto.py:
  on this machine it seals 64 KiB messages faster than BLAKE3 hashes them, twice as fast as
  ChaCha20-Poly1305 and 15 times as fast as AES-256-GCM-SIV.
- Object key: HKDF-SHA256(input key, salt = the object's random 32-byte salt,
  info = b"repo-engine object v1 " + kind), 32 bytes. A new salt for every object written makes
  every object key new, so nonces under it are a plain counter and GCM's limit on random
  nonces does not apply: a (key, nonce) pair repeats only if a 256-bit salt repeats.
- Nonce: a counter as 12 bytes little endian (0 for an object that is one message; the byte
  position of the part in a pack for the parts of a pack).
- Associated data: every field length-prefixed, so that no two (kind, name, epoch) encode alike:

| size | field                         |
|------|-------------------------------|
| 1    | length K of the kind          |
| K    | kind (ASCII, one of KINDS)    |
| 2    | length N of the name (u16 LE) |
| N    | name (a chunk id, a generation, a point id...) |
| 4    | epoch (u32 LE)                |
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_SIZE = 32
SALT_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
MAX_COUNTER = (1 << 64) - 1
# what a sealed object can be; the kind is in both the key derivation and the associated data
KINDS = frozenset({"pack", "chunk", "trailer", "map", "point", "journal", "checkpoint", "config",
                   "keyring", "mark"})
OBJECT_INFO = b"repo-engine object v1 "
_NAME_LEN = struct.Struct("<H")
_EPOCH = struct.Struct("<I")


def derive(key: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 of `key` into a new 32-byte key."""
    return HKDF(hashes.SHA256(), KEY_SIZE, salt, info).derive(key)


def object_cipher(key: bytes, salt: bytes, kind: str) -> AESGCM:
    """The AEAD of one object: its key derived from `key` (a data key) and its salt."""
    assert kind in KINDS, kind
    assert len(salt) == SALT_SIZE
    return AESGCM(derive(key, salt, OBJECT_INFO + kind.encode()))


def nonce(counter: int) -> bytes:
    assert 0 <= counter <= MAX_COUNTER
    return counter.to_bytes(NONCE_SIZE, "little")


def associated_data(kind: str, name: bytes, epoch: int) -> bytes:
    return associated_data_of(kind, epoch)(name)


def associated_data_of(kind: str, epoch: int) -> Callable[[bytes], bytes]:
    """`associated_data` of `kind` and `epoch` as a function of the name, its fixed parts built
    once (a restore opens every chunk it writes with one)."""
    assert kind in KINDS, kind
    k = kind.encode()
    head, tail, name_len = bytes([len(k)]) + k, _EPOCH.pack(epoch), _NAME_LEN.pack
    return lambda name: head + name_len(len(name)) + name + tail
