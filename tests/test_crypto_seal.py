"""Sealing of objects and pack parts: the format as its docstring tables it (rebuilt here from the
primitives), and every change to a sealed object refused as tampering, naming the object."""

from __future__ import annotations

import blake3
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from repo_engine.errors import DamageError, FormatError, TamperedError
from repo_engine.repository.crypto.cipher import associated_data
from repo_engine.repository.crypto.null import NullSealer
from repo_engine.repository.crypto.seal import ObjectSealer, UnknownEpoch

KEY_A, KEY_B = b"\xaa" * 32, b"\xbb" * 32
SALT = bytes(range(32))


class Stream:
    """A deterministic stand-in for os.urandom: the BLAKE3 XOF of a seed, read in order."""

    def __init__(self, seed: bytes = b"test") -> None:
        self._xof = blake3.blake3(seed)
        self._at = 0

    def __call__(self, n: int) -> bytes:
        out = self._xof.digest(n, seek=self._at)
        self._at += n
        return out


def fixed(*values: bytes):
    """A random source that returns `values` in turn."""
    it = iter(values)
    return lambda n: next(it)


def object_key(key: bytes, salt: bytes, kind: bytes) -> AESGCM:
    """The object key as the format defines it, derived here independently of the code."""
    return AESGCM(HKDF(hashes.SHA256(), 32, salt, b"repo-engine object v1 " + kind).derive(key))


def flips(data: bytes):
    for bit in range(len(data) * 8):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        yield bit, bytes(damaged)


def test_associated_data_layout():
    assert associated_data("chunk", b"\x01\x02", 7).hex() == (
        "05" + b"chunk".hex() + "0200" + "0102" + "07000000")
    # length prefixes keep (kind, name) pairs apart that plain concatenation would merge
    assert associated_data("map", b"", 1) != associated_data("map", b"\x00", 1)


def test_sealed_object_golden():
    sealer = ObjectSealer({3: KEY_A, 1: KEY_B}, 3, random=fixed(SALT))
    sealed = sealer.seal("map", b"name", b"plaintext")
    assert sealed[:4] == (3).to_bytes(4, "little") and sealed[4:36] == SALT
    ad = b"\x03map" + b"\x04\x00name" + b"\x03\x00\x00\x00"
    last = b"\x01"  # one segment: the last
    assert sealed[36:] == object_key(KEY_A, SALT, b"map").encrypt(bytes(12), b"plaintext",
                                                                   ad + last)
    assert len(sealed) == 36 + 9 + 16 == sealer.sealed_size(9)
    assert sealed[36:].hex() == "ce0914c4a8de4109cc2db39b823c8668ce119216e3648a9ece"
    assert sealer.open("map", b"name", sealed, "maps/x") == b"plaintext"


def test_segmented_object_golden():
    sealer = ObjectSealer({1: KEY_A}, 1, random=fixed(SALT), segment=4)
    sealed = sealer.seal("point", b"p", b"abcdefghij")
    key, ad = object_key(KEY_A, SALT, b"point"), associated_data("point", b"p", 1)
    assert sealed[36:] == (key.encrypt((0).to_bytes(12, "little"), b"abcd", ad + b"\x00")
                           + key.encrypt((1).to_bytes(12, "little"), b"efgh", ad + b"\x00")
                           + key.encrypt((2).to_bytes(12, "little"), b"ij", ad + b"\x01"))


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 16, 17, 40])
def test_segments_round_trip_and_refuse_reordering_dropping_and_adding(size):
    sealer = ObjectSealer({1: KEY_A}, 1, segment=8)
    plaintext = bytes(range(size))
    sealed = sealer.seal("journal", b"j", plaintext)
    assert len(sealed) == sealer.sealed_size(size)
    assert sealer.open("journal", b"j", sealed, "j") == plaintext
    head, body, step = sealed[:36], sealed[36:], 8 + 16
    pieces = [body[i:i + step] for i in range(0, len(body), step)]
    forged = [pieces[:-1], pieces + [pieces[-1]], pieces[::-1], pieces + pieces[:1]]
    forged += [pieces[:i] + pieces[i + 1:] for i in range(len(pieces))]
    for parts in forged:
        if parts != pieces:
            with pytest.raises(TamperedError, match="^j: sealed journal (fails auth|is trunc)"):
                sealer.open("journal", b"j", head + b"".join(parts), "j")


def test_every_bit_flip_of_a_sealed_object_is_refused_naming_it():
    sealer = ObjectSealer({1: KEY_A}, 1)
    sealed = sealer.seal("point", b"0123456789abcdef", b'{"vm": "db01"}')
    for bit, damaged in flips(sealed):
        expected = UnknownEpoch if bit < 32 else TamperedError
        with pytest.raises(expected, match="^points/p1: sealed point ") as err:
            sealer.open("point", b"0123456789abcdef", damaged, "points/p1")
        assert isinstance(err.value, DamageError) and err.value.exit_code == 3
        assert "\n" not in str(err.value)


def test_truncation_and_extension_are_refused():
    sealer = ObjectSealer({1: KEY_A}, 1)
    sealed = sealer.seal("journal", b"\x05" + bytes(7), b"entry")
    for cut in range(len(sealed)):
        with pytest.raises(TamperedError, match="truncated|fails authentication"):
            sealer.open("journal", b"\x05" + bytes(7), sealed[:cut], "journal/5")
    with pytest.raises(TamperedError, match="fails authentication"):
        sealer.open("journal", b"\x05" + bytes(7), sealed + b"\x00", "journal/5")


@pytest.mark.parametrize("kind, name", [("map", b"other"), ("point", b"name"), ("map", b"")])
def test_a_ciphertext_moved_to_another_name_or_kind_is_refused(kind, name):
    sealer = ObjectSealer({1: KEY_A}, 1)
    sealed = sealer.seal("map", b"name", b"map bytes")
    with pytest.raises(TamperedError, match="moved from another name"):
        sealer.open(kind, name, sealed, "maps/other")


def test_new_epoch_seals_new_objects_and_reads_old_ones():
    old = ObjectSealer({1: KEY_A}, 1)
    new = ObjectSealer({1: KEY_A, 2: KEY_B}, 2)
    before = old.seal("map", b"m", b"old data")
    after = new.seal("map", b"m", b"new data")
    assert after[:4] == (2).to_bytes(4, "little")
    assert new.open("map", b"m", before, "m") == b"old data"
    with pytest.raises(UnknownEpoch, match="names key epoch 2, which the keyring does not hold "
                                           r"\(it holds 1\)"):
        old.open("map", b"m", after, "m")


def test_an_epoch_rewritten_in_the_header_is_refused():
    sealer = ObjectSealer({1: KEY_A, 2: KEY_A}, 1)  # even under the same key, the AD binds it
    sealed = bytearray(sealer.seal("map", b"m", b"data"))
    sealed[0] = 2
    with pytest.raises(TamperedError, match="fails authentication"):
        sealer.open("map", b"m", bytes(sealed), "m")


def pack_parts(sealer, ids=(b"\x01" * 32, b"\x02" * 32)):
    """Seal two chunks and a trailer as a pack writer would: positions after a 16-byte header."""
    pack = sealer.parts("pack")
    position, parts = 16 + len(pack.header), []
    for chunk_id in ids:
        part = pack.seal(position, "chunk", chunk_id, b"blob of " + chunk_id[:1])
        parts.append((position, chunk_id, part))
        position += len(part)
    trailer = pack.seal(position, "trailer", b"", b"table of contents")
    return pack.header, parts, (position, trailer)


def test_pack_golden():
    sealer = ObjectSealer({4: KEY_A}, 4, random=fixed(SALT))
    header, parts, (trailer_at, trailer) = pack_parts(sealer)
    assert header == (4).to_bytes(4, "little") + SALT
    key = object_key(KEY_A, SALT, b"pack")
    position, chunk_id, part = parts[0]
    assert position == 52
    assert part == key.encrypt((52).to_bytes(12, "little"), b"blob of \x01",
                               b"\x05chunk\x20\x00" + chunk_id + b"\x04\x00\x00\x00")
    assert parts[1][0] == 52 + 9 + 16 and trailer_at == parts[1][0] + 9 + 16
    assert trailer == key.encrypt(trailer_at.to_bytes(12, "little"), b"table of contents",
                                  b"\x07trailer\x00\x00\x04\x00\x00\x00")


def test_pack_parts_round_trip_and_refuse_every_change():
    sealer = ObjectSealer({1: KEY_A}, 1)
    header, parts, (trailer_at, trailer) = pack_parts(sealer)
    reader = sealer.parts_opener("pack", header, "packs/ab/cd.pack")
    (p1, id1, c1), (p2, id2, c2) = parts
    assert reader.open(p1, "chunk", id1, c1, "packs/ab/cd.pack") == b"blob of \x01"
    assert reader.open(trailer_at, "trailer", b"", trailer, "t") == b"table of contents"
    refused = [(p1, id2, c1), (p2, id1, c2),  # a chunk swapped to another chunk id
               (p2, id1, c1), (p1, id2, c2),  # ... to another place
               (p1, id1, c1[:-1]), (p1, id1, c1 + b"\x00")]  # cut or extended
    refused += [(p1, id1, damaged) for _bit, damaged in flips(c1)]
    for position, chunk_id, part in refused:
        with pytest.raises(TamperedError, match=f"^packs/ab/cd.pack at offset {position}: "
                                                "sealed chunk fails authentication"):
            reader.open(position, "chunk", chunk_id, part, "packs/ab/cd.pack")


def test_a_chunk_moved_to_another_pack_or_header_is_refused():
    sealer = ObjectSealer({1: KEY_A}, 1)
    header, parts, _ = pack_parts(sealer)
    other_header, _, _ = pack_parts(sealer)
    position, chunk_id, part = parts[0]
    with pytest.raises(TamperedError, match="fails authentication"):
        sealer.parts_opener("pack", other_header, "p2").open(position, "chunk", chunk_id, part, "p2")
    for _bit, damaged in flips(header[4:]):  # the salt: another key
        with pytest.raises(TamperedError):
            sealer.parts_opener("pack", header[:4] + damaged, "p").open(position, "chunk", chunk_id,
                                                               part, "p")
    with pytest.raises(UnknownEpoch, match="^p: sealed pack names key epoch 9"):
        sealer.parts_opener("pack", (9).to_bytes(4, "little") + header[4:], "p")
    with pytest.raises(TamperedError, match="35-byte key header"):
        sealer.parts_opener("pack", header[:-1], "p")


def test_a_pack_never_seals_two_parts_at_one_position():
    pack = ObjectSealer({1: KEY_A}, 1).parts("pack")
    pack.seal(16, "chunk", bytes(32), b"a")
    for position in (16, 15):  # the position is the nonce: reuse is refused, not done
        with pytest.raises(ValueError, match="not after 16"):
            pack.seal(position, "chunk", bytes(32), b"b")


@pytest.mark.parametrize("sealer", [NullSealer(), ObjectSealer({1: KEY_A}, 1)],
                         ids=["null", "aead"])
def test_callers_never_branch_on_encryption(sealer):
    """The same caller code writes and reads through either sealer; the formats' sizes follow
    from `sealed_size` and `part_overhead`."""
    sealed = sealer.seal("checkpoint", b"7", b"state")
    assert len(sealed) == sealer.sealed_size(5)
    assert sealer.open("checkpoint", b"7", sealed, "c") == b"state"
    header, parts, (trailer_at, trailer) = pack_parts(sealer)
    reader = sealer.parts_opener("pack", header, "p")
    for position, chunk_id, part in parts:
        assert len(part) == 9 + sealer.part_overhead
        assert reader.open(position, "chunk", chunk_id, part, "p") == b"blob of " + chunk_id[:1]
    assert reader.open(trailer_at, "trailer", b"", trailer, "p") == b"table of contents"


def test_null_sealer_refuses_an_encrypted_pack():
    header, _, _ = pack_parts(ObjectSealer({1: KEY_A}, 1))
    with pytest.raises(FormatError, match="^p: the pack is encrypted but the repository was "
                                          "opened without its keys"):
        NullSealer().parts_opener("pack", header, "p")


def test_a_cleartext_object_in_an_encrypted_repository_is_refused():
    """A reader holding keys never takes an object's word that it is unencrypted: a cleartext
    map or pack written by whoever can write the store is tampering, not a format."""
    sealer = ObjectSealer({1: KEY_A}, 1)
    for forged in (b"", b"x" * 35, NullSealer().seal("map", b"m", b"\x01" * 200)):
        with pytest.raises(TamperedError, match="^maps/m: sealed map (is truncated|fails auth|names key epoch)"):
            sealer.open("map", b"m", forged, "maps/m")
    with pytest.raises(TamperedError, match="^p: sealed pack has a 0-byte key header"):
        sealer.parts_opener("pack", NullSealer().parts("pack").header, "p")


def test_parts_of_one_kind_of_object_do_not_open_as_another():
    sealer = ObjectSealer({1: KEY_A}, 1)
    stream = sealer.parts("checkpoint")
    part = stream.seal(16 + 36, "checkpoint", b"", b"records")
    assert sealer.parts_opener("checkpoint", stream.header, "c").open(
        52, "checkpoint", b"", part, "c") == b"records"
    with pytest.raises(TamperedError, match="^c at offset 52: sealed checkpoint fails auth"):
        sealer.parts_opener("pack", stream.header, "c").open(52, "checkpoint", b"", part, "c")
