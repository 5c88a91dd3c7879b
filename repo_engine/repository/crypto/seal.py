"""Sealing: one object, or the parts of one streamed object (a pack, a checkpoint), under the
data key of an epoch.

A sealed object (a block map, a point manifest, a journal entry, a checkpoint, the keyring):

| offset | size   | field                                                             |
|--------|--------|-------------------------------------------------------------------|
| 0      | 4      | epoch u32 LE: whose data key (0: the keyring key K_ring)          |
| 4      | 32     | salt: random, new for every object sealed                         |
| 36     | ...    | the N plaintext bytes in segments of SEGMENT bytes (the last one  |
|        |        | shorter, or empty when N = 0), each sealed as SEGMENT + 16 bytes: |
|        |        | AES-256-GCM(object key, nonce = segment number 0, 1, ..., AD)     |
|        |        | with its tag last                                                 |

object key = HKDF(data key of the epoch, salt, kind); AD = the associated data of the kind, the
name and the epoch (cipher.py) followed by one byte, 1 for the last segment and 0 for the others.
The same ciphertext under another name, of another kind, or with its epoch or salt changed fails
authentication; so does a segment moved, dropped or added (a reader cuts the ciphertext into
SEGMENT + 16-byte pieces, and whatever piece comes last must carry the last-segment byte).
Segments keep each AEAD message under the 2 GiB `cryptography` accepts (a block map can be
larger) and far under GCM's 64 GiB; most objects are one segment.

An object written as a stream of parts (a pack, a checkpoint) seals them under one object key:
its header carries the same 36 bytes (epoch, salt; the key derived with the object's kind), and
each part is AES-256-GCM(object key, nonce = the part's byte position in the object, associated
data = (part kind, name, epoch)) with the tag last. In a pack, a chunk is the part of kind
"chunk" named by its chunk id, the table of contents the part of kind "trailer" with an empty
name. Positions strictly increase as an object is written, so no nonce is used twice under its
key, and a reader who knows where a part is (the index stores a chunk's pack and offset) knows
its nonce; a part moved to another place, chunk id or object fails authentication.

The null sealer of an unencrypted repository (null.py) has the same interface.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ...errors import TamperedError
from .cipher import SALT_SIZE, TAG_SIZE, associated_data, associated_data_of, nonce, object_cipher
from .null import PART_HEADER_SIZE, PART_TAG_SIZE, PartOpener, PartSealer

HEADER = struct.Struct("<I32s")
assert HEADER.size == 4 + SALT_SIZE == PART_HEADER_SIZE and TAG_SIZE == PART_TAG_SIZE
SEGMENT = 16 << 20
LAST, NOT_LAST = b"\x01", b"\x00"
RING_EPOCH = 0  # the keyring is sealed under K_ring as "epoch 0"; data epochs start at 1

Random = Callable[[int], bytes]


class UnknownEpoch(TamperedError):
    """A sealed object names a key epoch the keyring does not hold (exit code 3). A caller whose
    keyring may be older than the object (another host rotated) reloads the keyring and retries
    once before reporting it."""


def _tampered(what: str, kind: str, why: str) -> TamperedError:
    return TamperedError(f"{what}: sealed {kind} {why}; it was damaged or tampered with "
                         "(run 'repo-engine scrub' to find what else is)")


class ObjectSealer:
    """Seals new objects under the current epoch's data key; opens those of any epoch held."""

    encrypted = True
    part_overhead = TAG_SIZE

    def __init__(self, keys: Mapping[int, bytes], current: int, random: Random = os.urandom,
                 segment: int = SEGMENT) -> None:
        assert current in keys and 0 < segment < 1 << 31
        self._keys = dict(keys)
        self._current = current
        self._random = random
        self._segment = segment  # part of the format: tests pass a small one to reach edges

    @property
    def current(self) -> int:
        """The epoch this sealer seals new objects under."""
        return self._current

    def sealed_size(self, size: int) -> int:
        return HEADER.size + size + TAG_SIZE * max(1, -(-size // self._segment))

    def seal(self, kind: str, name: bytes, plaintext: bytes) -> bytes:
        salt = self._random(SALT_SIZE)
        cipher = object_cipher(self._keys[self._current], salt, kind)
        ad = associated_data(kind, name, self._current)
        view, starts = memoryview(plaintext), range(0, max(len(plaintext), 1), self._segment)
        out = [HEADER.pack(self._current, salt)]
        for i, start in enumerate(starts):
            out.append(cipher.encrypt(nonce(i), view[start:start + self._segment],
                                      ad + (LAST if i == len(starts) - 1 else NOT_LAST)))
        return b"".join(out)

    def open(self, kind: str, name: bytes, sealed: bytes, what: str) -> bytes:
        least = self.sealed_size(0)
        if len(sealed) < least:
            raise _tampered(what, kind, f"is truncated ({len(sealed)} bytes, the least is "
                                        f"{least})")
        epoch, salt = HEADER.unpack_from(sealed)
        cipher = object_cipher(self._key(epoch, kind, what), salt, kind)
        ad = associated_data(kind, name, epoch)
        body, step = memoryview(sealed)[HEADER.size:], self._segment + TAG_SIZE
        count = max(1, -(-len(body) // step))
        try:
            return b"".join(
                cipher.decrypt(nonce(i), body[i * step:(i + 1) * step],
                               ad + (LAST if i == count - 1 else NOT_LAST))
                for i in range(count))
        except InvalidTag:
            raise _tampered(what, kind, "fails authentication (its bytes were changed, cut, "
                                        "or moved from another name)") from None

    def parts(self, kind: str) -> PartSealer:
        return self._parts(kind, self._current, self._random(SALT_SIZE), f"new {kind}")

    def parts_opener(self, kind: str, header: bytes, what: str) -> PartSealer:
        if len(header) != HEADER.size:
            raise _tampered(what, kind, f"has a {len(header)}-byte key header "
                                        f"({HEADER.size} expected)")
        epoch, salt = HEADER.unpack(header)
        return self._parts(kind, epoch, salt, what)

    def _parts(self, kind: str, epoch: int, salt: bytes, what: str) -> PartSealer:
        return _EncryptedParts(object_cipher(self._key(epoch, kind, what), salt, kind),
                               epoch, HEADER.pack(epoch, salt))

    def _key(self, epoch: int, kind: str, what: str) -> bytes:
        key = self._keys.get(epoch)
        if key is None:
            held = ", ".join(str(e) for e in sorted(self._keys))
            raise UnknownEpoch(f"{what}: sealed {kind} names key epoch {epoch}, which the keyring "
                               f"does not hold (it holds {held}); it was tampered with, or "
                               "sealed under a newer keyring than the one read")
        return key


class _EncryptedParts:
    def __init__(self, cipher: AESGCM, epoch: int, header: bytes) -> None:
        self._cipher = cipher
        self._epoch = epoch
        self.header = header
        self._last = -1

    def seal(self, position: int, kind: str, name: bytes, data: bytes) -> bytes:
        # the position is the nonce: a repeated or earlier one would reuse a nonce under this key
        if position <= self._last:
            raise ValueError(f"part sealed at {position}, not after {self._last}")
        self._last = position
        return self._cipher.encrypt(nonce(position), data,
                                    associated_data(kind, name, self._epoch))

    def open(self, position: int, kind: str, name: bytes, sealed: bytes, what: str) -> bytes:
        opened = self.opener(kind)(position, name, sealed)
        if opened is None:
            raise _tampered(f"{what} at offset {position}", kind,
                            "fails authentication (its bytes were changed, cut, or moved from "
                            "another place or chunk id)")
        return opened

    def opener(self, kind: str) -> PartOpener:
        decrypt, ad = self._cipher.decrypt, associated_data_of(kind, self._epoch)

        def open_part(position: int, name: bytes, sealed: bytes | memoryview) -> bytes | None:
            try:
                return decrypt(nonce(position), sealed, ad(name))
            except InvalidTag:
                return None
        return open_part
