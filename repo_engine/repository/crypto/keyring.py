"""The keyring: the chunk-id key and the data key of every epoch, sealed with K_ring.

Object `keys/keyring-<generation as 16 hex>`, and the same bytes as `keys/keyring-<generation as
16 hex>.copy`: an envelope (envelope.py: magic KEYRING, version,
length, payload, BLAKE3 checksum, so that a keyless scrub can check its stored bytes) whose
payload is a sealed object (seal.py) under K_ring as epoch 0, kind "keyring", name = the
generation as u64 LE: a keyring copied to another generation's name fails authentication. The
plaintext is one JSON object, keys sorted, no spaces:

| field      | value                                                                   |
|------------|-------------------------------------------------------------------------|
| generation | the generation, as in the name                                          |
| chunk_key  | 64 hex: the BLAKE3 key of chunk ids; never changes (dedup depends on it) |
| epochs     | {"<epoch>": "<64 hex data key>", ...}: every epoch still readable       |
| current    | the epoch new objects are sealed with                                   |
| config     | 64 hex: the digest of the repository's config (config.py), which is     |
|            | readable without the keys; a config that no longer matches is refused    |
| slots      | {"<16 hex slot id>": "passphrase" or "recovery", ...}: the valid slots   |

A keyring is at most keystore.MAX_KEYRING_SIZE bytes stored (some 14,000 epochs); a change that
would make it larger is refused before it is written.

Every key change (a slot added or removed, a passphrase changed, a rotation) is a new generation,
written put-if-absent over the generation it was computed from: two writers cannot both make
generation g + 1; the loser reloads, checks its change again on top of the winner's (refused
when the winner took what it needed: the last passphrase slot, the slot it opened with) and
retries. The newest generation wins; older ones are emptied once it is durable: overwritten with
the envelope of an empty payload (`EMPTIED`), their keys gone, their names kept. A name is never
free again, so a writer that read generation g and is late cannot put its g + 1 after g + 1 was
written and replaced: readers, taking the newest, would never see it, while the writer went on
(deleting the slot file its change replaced) as if it had been made. A slot file the
newest generation does not list (a removal that crashed before deleting it) never opens the
repository. Rotation adds an epoch and never drops one: objects sealed under an old epoch stay
readable until they are rewritten and the epoch is retired.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ...errors import FormatError, TamperedError
from ..envelope import seal as envelope_seal
from ..envelope import unseal as envelope_unseal
from ..formats import KEYRING
from .cipher import KEY_SIZE
from .seal import RING_EPOCH, ObjectSealer, Random
from .slots import PASSPHRASE, RECOVERY, valid_id

KEYRING_PREFIX = "keys/keyring-"
EMPTIED = envelope_seal(KEYRING, b"")  # what a replaced generation is overwritten with
_GENERATION = struct.Struct("<Q")
MAX_EPOCH = (1 << 32) - 1


class KeyringEmptied(TamperedError):
    """The generation read was emptied: replaced by a newer one meanwhile, else tampering."""


@dataclass(frozen=True)
class Keyring:
    generation: int
    chunk_key: bytes = field(repr=False)
    epochs: Mapping[int, bytes] = field(repr=False)
    current: int
    config_digest: bytes = field(repr=False)
    slots: Mapping[str, str] = field(default_factory=dict)  # slot id -> kind: the valid slots

    def sealer(self, random: Random = os.urandom) -> ObjectSealer:
        """The sealer of data objects: new ones under the current epoch, any held epoch read."""
        return ObjectSealer(self.epochs, self.current, random)

    def rotated(self, random: Random = os.urandom) -> Keyring:
        """The next generation, with a new epoch's data key for everything sealed from now on."""
        epoch = max(self.epochs) + 1
        assert epoch <= MAX_EPOCH
        return replace(self, generation=self.generation + 1,
                       epochs={**self.epochs, epoch: random(KEY_SIZE)}, current=epoch)


def new_keyring(config_digest: bytes, random: Random = os.urandom) -> Keyring:
    return Keyring(generation=1, chunk_key=random(KEY_SIZE), epochs={1: random(KEY_SIZE)},
                   current=1, config_digest=config_digest)


def keyring_object(generation: int) -> str:
    return f"{KEYRING_PREFIX}{generation:016x}"


def keyring_copy(generation: int) -> str:
    """The second record of a generation, the same bytes: one damaged object must not cost an
    encrypted repository every key it has."""
    return keyring_object(generation) + ".copy"


def _ring_sealer(ring_key: bytes, random: Random = os.urandom) -> ObjectSealer:
    return ObjectSealer({RING_EPOCH: ring_key}, RING_EPOCH, random)


def encode_keyring(keyring: Keyring, ring_key: bytes, random: Random = os.urandom) -> bytes:
    plaintext = json.dumps({
        "generation": keyring.generation, "chunk_key": keyring.chunk_key.hex(),
        "epochs": {str(e): key.hex() for e, key in sorted(keyring.epochs.items())},
        "current": keyring.current, "config": keyring.config_digest.hex(),
        "slots": dict(keyring.slots)},
        sort_keys=True, separators=(",", ":")).encode()
    sealed = _ring_sealer(ring_key, random).seal(
        "keyring", _GENERATION.pack(keyring.generation), plaintext)
    return envelope_seal(KEYRING, sealed)


def decode_keyring(data: bytes, generation: int, ring_key: bytes, what: str) -> Keyring:
    """The keyring of `generation` in the record `data`: checksum, then authentication
    (TamperedError), then its fields."""
    sealed = envelope_unseal(KEYRING, data, what)
    if not sealed:
        raise KeyringEmptied(f"{what}: an emptied keyring generation (one a newer generation "
                             "replaced) is the newest: the newer ones were deleted")
    plaintext = _ring_sealer(ring_key).open("keyring", _GENERATION.pack(generation), sealed, what)
    try:
        fields = json.loads(plaintext)
        keyring = Keyring(generation=fields["generation"],
                          chunk_key=bytes.fromhex(fields["chunk_key"]),
                          epochs={int(e): bytes.fromhex(k) for e, k in fields["epochs"].items()},
                          current=fields["current"],
                          config_digest=bytes.fromhex(fields["config"]),
                          slots=dict(fields["slots"]))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise FormatError(f"{what}: keyring not understood ({exc}); upgrade repo-engine") from None
    _check(keyring, generation, what)
    return keyring


def _check(keyring: Keyring, generation: int, what: str) -> None:
    """An authenticated keyring is ours, so a bad field is a newer or broken writer."""
    sizes_ok = len(keyring.chunk_key) == len(keyring.config_digest) == KEY_SIZE and all(
        len(k) == KEY_SIZE and 1 <= e <= MAX_EPOCH for e, k in keyring.epochs.items())
    slots_ok = all(valid_id(i) and k in (PASSPHRASE, RECOVERY) for i, k in keyring.slots.items())
    if (keyring.generation != generation or keyring.current not in keyring.epochs
            or not sizes_ok or not slots_ok):
        raise FormatError(f"{what}: keyring fields are inconsistent (generation "
                          f"{keyring.generation}, current epoch {keyring.current}); upgrade "
                          "repo-engine")
