"""Key slots, the keyring and the key operations: formats rebuilt from the primitives, every
damaged or tampered record refused, wrong secrets named, hostile parameters refused unread.

Every test passes small scrypt parameters (SMALL) explicitly."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import blake3
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption, PrivateFormat,
                                                          load_pem_private_key)

from repo_engine.errors import (DamageError, FormatError, RepoError, TamperedError,
                               UsageError)
from repo_engine.repository.crypto import keys, slots
from repo_engine.repository.crypto.keyring import (KEYRING, Keyring, decode_keyring,
                                                   encode_keyring, new_keyring)
from repo_engine.repository.crypto.keys import (NotARecoveryKey, SlotRefused, WrongPassphrase,
                                                WrongRecoveryKey, change_passphrase, create,
                                                export_recovery, recover, removable, unlock)
from repo_engine.repository.crypto.seal import UnknownEpoch
from repo_engine.repository.crypto.slots import (ScryptParams, decode_slot, encode_slot,
                                                 passphrase_slot, recovery_slot)
from repo_engine.repository.envelope import seal as envelope_seal
from test_crypto_seal import Stream, fixed, flips, object_key

SMALL = ScryptParams(log_n=4, r=1, p=1)
NOW = datetime(2026, 11, 30, 2, 0, 0, tzinfo=timezone.utc)
RING = b"\x42" * 32
CFG = b"\x05" * 32  # a config digest


def payload_of(record: bytes) -> dict:
    return json.loads(record[24:-32])


def canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def reseal(record: bytes, **changes) -> bytes:
    """`record` with payload fields changed and a valid checksum: what an attacker can write."""
    fields = {**payload_of(record), **changes}
    return envelope_seal(slots.SLOT, canonical(fields))


def test_passphrase_slot_golden():
    salt, slot_id = b"\x05" * 32, bytes.fromhex("00112233445566ff")
    slot = passphrase_slot(RING, b"hunter2", SMALL, label="ops", now=NOW,
                           random=fixed(salt, slot_id))
    record = encode_slot(slot)
    assert record[:8] == b"REslt\x00\x01\x1a" and record[-32:] == blake3.blake3(
        record[:-32]).digest()
    fields = payload_of(record)
    public = {"created": "2026-11-30T02:00:00Z", "id": "00112233445566ff",
              "kdf": {"log_n": 4, "name": "scrypt", "p": 1, "r": 1}, "kind": "passphrase",
              "label": "ops", "salt": "05" * 32}
    assert record[24:-32] == canonical({**public, "wrapped": fields["wrapped"]})
    kek = Scrypt(salt, 32, 16, 1, 1).derive(b"hunter2")
    ad = b"repo-engine slot v1\x00" + canonical(public)
    assert AESGCM(kek).decrypt(bytes(12), bytes.fromhex(fields["wrapped"]), ad) == RING
    assert fields["wrapped"] == ("ed400155de37eaecb8781d287d25a4b848afa50bb5e2bd7e6c089e31d0eb02"
                                 "ac1fd79cf62c164f43fb1b1ec0c6c93a28")
    assert decode_slot(record, "s") == slot


def test_recovery_slot_golden():
    recipient = X25519PrivateKey.from_private_bytes(b"\x07" * 32)
    ephemeral = X25519PrivateKey.from_private_bytes(b"\x09" * 32)
    slot = recovery_slot(RING, recipient.public_key().public_bytes_raw(), label="vault",
                         now=NOW, random=fixed(b"\x09" * 32, bytes(8)))
    fields = payload_of(encode_slot(slot))
    public = {"created": "2026-11-30T02:00:00Z", "id": "0" * 16, "kind": "recovery",
              "label": "vault", "recipient": recipient.public_key().public_bytes_raw().hex(),
              "ephemeral": ephemeral.public_key().public_bytes_raw().hex()}
    assert {k: v for k, v in fields.items() if k != "wrapped"} == public
    shared = recipient.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(
        public["ephemeral"])))
    kek = HKDF(hashes.SHA256(), 32, bytes.fromhex(public["ephemeral"] + public["recipient"]),
               b"repo-engine recovery slot v1").derive(shared)
    ad = b"repo-engine slot v1\x00" + canonical(public)
    assert AESGCM(kek).decrypt(bytes(12), bytes.fromhex(fields["wrapped"]), ad) == RING


def test_keyring_golden():
    keyring = Keyring(generation=2, chunk_key=b"\x01" * 32, epochs={1: b"\x02" * 32,
                                                                    2: b"\x03" * 32}, current=2,
                      config_digest=CFG, slots={"0a" * 8: "passphrase", "0b" * 8: "recovery"})
    salt = b"\x04" * 32
    record = encode_keyring(keyring, RING, random=fixed(salt))
    assert record[:8] == b"REkrg\x00\x01\x1a"
    sealed = record[24:-32]
    assert sealed[:36] == bytes(4) + salt  # epoch 0: sealed with K_ring
    ad = b"\x07keyring" + b"\x08\x00" + (2).to_bytes(8, "little") + bytes(4) + b"\x01"
    plaintext = object_key(RING, salt, b"keyring").decrypt(bytes(12), sealed[36:], ad)
    assert plaintext == canonical({"chunk_key": "01" * 32, "current": 2, "generation": 2,
                                   "epochs": {"1": "02" * 32, "2": "03" * 32},
                                   "config": "05" * 32,
                                   "slots": {"0a" * 8: "passphrase", "0b" * 8: "recovery"}})
    assert decode_keyring(record, 2, RING, "k") == keyring


def test_every_bit_flip_of_a_slot_record_is_refused_naming_it():
    for make in (lambda: passphrase_slot(RING, b"pw", SMALL, label="a", now=NOW,
                                         random=Stream()),
                 lambda: export_recovery(RING, label="r", now=NOW, random=Stream())[1]):
        record = encode_slot(make())
        for bit, damaged in flips(record):
            with pytest.raises((DamageError, FormatError), match="^keys/slot-x: ") as err:
                decode_slot(damaged, "keys/slot-x")
            # the magic and the version name the format; everything else is damage (exit 3)
            assert isinstance(err.value, DamageError) == (bit >= 80), bit


def test_every_bit_flip_of_a_keyring_record_is_refused_naming_it():
    record = encode_keyring(new_keyring(CFG, Stream()), RING)
    for bit, damaged in flips(record):
        with pytest.raises((DamageError, FormatError), match="^keys/keyring-1: ") as err:
            decode_keyring(damaged, 1, RING, "keys/keyring-1")
        assert isinstance(err.value, DamageError) == (bit >= 80), bit


def test_a_resealed_keyring_record_is_refused_by_authentication():
    """An attacker can recompute the checksum, never the tag; nor move a generation."""
    record = encode_keyring(new_keyring(CFG, Stream()), RING)
    sealed = bytearray(record[24:-32])
    sealed[40] ^= 1
    with pytest.raises(TamperedError, match="^k: sealed keyring fails authentication"):
        decode_keyring(envelope_seal(KEYRING, bytes(sealed)), 1, RING, "k")
    with pytest.raises(TamperedError, match="fails authentication"):
        decode_keyring(record, 2, RING, "k")  # copied to generation 2's name
    with pytest.raises(TamperedError, match="fails authentication"):
        decode_keyring(record, 1, b"\x43" * 32, "k")  # another repository's K_ring


@pytest.mark.parametrize("changes", [
    {"label": "renamed"}, {"created": "2020-01-01T00:00:00Z"},
    {"kdf": {"log_n": 5, "name": "scrypt", "p": 1, "r": 1}}, {"salt": "00" * 32},
    {"id": "ffffffffffffffff"}])
def test_a_resealed_slot_with_any_field_changed_no_longer_opens(changes):
    record = encode_slot(passphrase_slot(RING, b"pw", SMALL, label="a", now=NOW,
                                         random=Stream()))
    assert unlock([decode_slot(record, "s")], b"pw").ring_key == RING
    with pytest.raises(WrongPassphrase):
        unlock([decode_slot(reseal(record, **changes), "s")], b"pw")


@pytest.mark.parametrize("kdf", [
    {"log_n": 40, "r": 8, "p": 1},  # n = 2^40: 128 TiB
    {"log_n": 20, "r": 16, "p": 1},  # 2 GiB
    {"log_n": 14, "r": 8, "p": 1 << 20},  # little memory, hours of work
    {"log_n": 10 ** 6, "r": 1, "p": 1},
    {"log_n": 0, "r": 1, "p": 1}, {"log_n": 4, "r": 0, "p": 1},
    {"log_n": 4, "r": True, "p": 1}, {"log_n": 4.5, "r": 1, "p": 1}])
def test_hostile_kdf_parameters_are_refused_before_any_work(kdf, monkeypatch):
    record = encode_slot(passphrase_slot(RING, b"pw", SMALL, label="a", now=NOW,
                                         random=Stream()))
    hostile = reseal(record, kdf={"name": "scrypt", **kdf})

    def no_scrypt(*args, **kwargs):
        raise AssertionError("scrypt ran on a hostile slot")

    monkeypatch.setattr(slots, "Scrypt", no_scrypt)
    with pytest.raises(TamperedError, match="^keys/slot-h: key slot asks scrypt for .*beyond "
                                            "what any slot may ask .*tampered with"):
        decode_slot(hostile, "keys/slot-h")
    with pytest.raises(TamperedError):
        passphrase_slot(RING, b"pw", ScryptParams(**kdf), label="", now=NOW, random=Stream())


@pytest.mark.parametrize("changes, error, message", [
    ({"kind": "fido2"}, FormatError, "kind 'fido2' is not supported; upgrade"),
    ({"kdf": {"name": "argon2id", "t": 3}}, FormatError, "KDF 'argon2id' is not supported"),
    ({"id": "../../x"}, TamperedError, "malformed"),
    ({"wrapped": "00"}, TamperedError, "malformed"),
    ({"salt": 5}, TamperedError, "malformed"),
    ({"created": None}, TamperedError, "malformed"),
    ({"created": "2026-02-30T00:00:00Z"}, TamperedError, "malformed"),
    ({"created": "2026-11-30 02:00:00Z"}, TamperedError, "malformed"),
    ({"created": "2026-11-30T02:00:00+00:00"}, TamperedError, "malformed"),
    ({"label": "x" * 201}, TamperedError, "malformed")])
def test_a_malformed_slot_is_refused(changes, error, message):
    record = encode_slot(passphrase_slot(RING, b"pw", SMALL, label="a", now=NOW,
                                         random=Stream()))
    with pytest.raises(error, match=f"^s: .*{message}"):
        decode_slot(reseal(record, **changes), "s")
    with pytest.raises(TamperedError, match="malformed"):
        decode_slot(envelope_seal(slots.SLOT, b"[1, 2]"), "s")


def test_wrong_passphrase_names_the_slots_tried_newest_first():
    made = create(b"first", SMALL, label="laptop", now=NOW, config_digest=CFG, random=Stream(b"a"))
    later = passphrase_slot(made.ring_key, b"second", SMALL, label="", now=NOW.replace(hour=3),
                            random=Stream(b"b"))
    recovery = export_recovery(made.ring_key, label="vault", now=NOW, random=Stream(b"c"))[1]
    all_slots = [made.slot, recovery, later]
    with pytest.raises(WrongPassphrase) as err:
        unlock(all_slots, b"third")
    assert str(err.value) == (
        f"the passphrase opens none of the 2 passphrase slots ({later.id}, {made.slot.id} "
        "'laptop'); check the passphrase file or variable, or use the recovery key")
    assert err.value.exit_code == 1
    assert unlock(all_slots, b"first").slot == made.slot
    assert unlock(all_slots, b"second") == keys.Unlocked(made.ring_key, later)
    with pytest.raises(WrongPassphrase, match=r"none of the 1 passphrase slot \(.*; unreadable "
                                              "slots skipped: keys/slot-9: checksum"):
        unlock([made.slot], b"x", skipped=["keys/slot-9: checksum mismatch"])
    with pytest.raises(WrongPassphrase, match="no passphrase slot; open it with its recovery"):
        unlock([recovery], b"first")


def test_removing_the_last_slot_or_the_last_passphrase_slot_is_refused():
    made = create(b"pw", SMALL, label="", now=NOW, config_digest=CFG, random=Stream(b"a"))
    only = [made.slot]
    with pytest.raises(SlotRefused, match=f"key slot {made.slot.id} is the repository's last "
                                          "slot: removing it would lock"):
        removable(only, made.slot.id)
    recovery = export_recovery(made.ring_key, label="", now=NOW, random=Stream(b"b"))[1]
    with pytest.raises(SlotRefused, match="is the last passphrase slot"):
        removable([made.slot, recovery], made.slot.id[:6])
    assert removable([made.slot, recovery], recovery.id) == recovery
    other = passphrase_slot(made.ring_key, b"pw2", SMALL, label="", now=NOW, random=Stream(b"c"))
    assert removable([made.slot, other], made.slot.id.upper()[:4]) == made.slot
    with pytest.raises(SlotRefused, match="'0000000000000000' matches no slot"):
        removable([made.slot, other], "0" * 16)
    with pytest.raises(SlotRefused, match="matches no slot"):
        removable([made.slot, other], made.slot.id[:3])  # too short to name one


def test_change_passphrase_makes_a_new_slot_and_names_the_old_one():
    made = create(b"old", SMALL, label="ops", now=NOW, config_digest=CFG, random=Stream(b"a"))
    new, old = change_passphrase([made.slot], b"old", b"new", SMALL, now=NOW,
                                 random=Stream(b"b"))
    assert old == made.slot and new.id != old.id and new.label == "ops"
    assert unlock([new], b"new").ring_key == made.ring_key
    with pytest.raises(WrongPassphrase):
        unlock([new], b"old")
    with pytest.raises(WrongPassphrase):
        change_passphrase([made.slot], b"wrong", b"new", SMALL, now=NOW)


def test_rotation_keeps_old_epochs_readable_and_seals_new_data_with_the_new_epoch():
    keyring = new_keyring(CFG, Stream(b"k"))
    before = keyring.sealer().seal("map", b"m", b"old")
    rotated = keyring.rotated(Stream(b"r"))
    assert (rotated.generation, rotated.current, sorted(rotated.epochs)) == (2, 2, [1, 2])
    assert rotated.chunk_key == keyring.chunk_key  # dedup keeps working across rotations
    assert rotated.epochs[1] == keyring.epochs[1] and rotated.epochs[2] != keyring.epochs[1]
    after = rotated.sealer().seal("map", b"m", b"new")
    assert after[:4] == (2).to_bytes(4, "little")
    assert rotated.sealer().open("map", b"m", before, "m") == b"old"
    with pytest.raises(UnknownEpoch):
        keyring.sealer().open("map", b"m", after, "m")
    record = encode_keyring(rotated, RING)
    assert decode_keyring(record, 2, RING, "k") == rotated


def pem_of(private_key) -> bytes:
    return private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def test_recovery_with_the_private_key_and_refusal_of_any_other():
    made = create(b"pw", SMALL, label="", now=NOW, config_digest=CFG, random=Stream(b"a"))
    pem, slot = export_recovery(made.ring_key, label="vault", now=NOW, random=Stream(b"b"))
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert recover([made.slot, slot], pem, "key.pem") == keys.Unlocked(made.ring_key, slot)
    stranger = pem_of(X25519PrivateKey.generate())
    with pytest.raises(WrongRecoveryKey, match=f"^the private key in other.pem opens none of "
                                               f"the repository's 1 recovery slots \\({slot.id} "
                                               "'vault'\\)"):
        recover([made.slot, slot], stranger, "other.pem")
    with pytest.raises(NotARecoveryKey, match="is a .*Ed25519PrivateKey, not the X25519"):
        recover([slot], pem_of(Ed25519PrivateKey.generate()), "ed.pem")
    with pytest.raises(NotARecoveryKey, match="^junk.pem is not an unencrypted PEM private key"):
        recover([slot], b"not a key", "junk.pem")
    with pytest.raises(WrongRecoveryKey, match=r"recovery slots \(none\)"):
        recover([made.slot], pem, "key.pem")


def test_a_recovery_key_file_reads_as_the_library_reads_it():
    """The PEM export_recovery writes is read without the library's PEM parser; the same key
    with other line ends too, and whatever else through the parser, with its messages."""
    made = create(b"pw", SMALL, label="", now=NOW, config_digest=CFG, random=Stream(b"a"))
    pem, slot = export_recovery(made.ring_key, label="", now=NOW, random=Stream(b"b"))
    wanted = load_pem_private_key(pem, None).private_bytes_raw()
    for variant in (pem, pem.replace(b"\n", b"\r\n"), b"\n" + pem + b"\n\n"):
        assert keys.load_recovery_key(variant, "k").private_bytes_raw() == wanted
        assert recover([slot], variant, "k").ring_key == made.ring_key
    ed = pem_of(Ed25519PrivateKey.generate())   # the same shape, another algorithm
    with pytest.raises(NotARecoveryKey, match="is a .*Ed25519PrivateKey, not the X25519"):
        keys.load_recovery_key(ed, "ed.pem")
    cut = pem.replace(pem.splitlines()[1], pem.splitlines()[1][:-4])
    with pytest.raises(NotARecoveryKey, match="^cut.pem is not an unencrypted PEM private key"):
        keys.load_recovery_key(cut, "cut.pem")


def test_a_recovery_slot_with_a_low_order_ephemeral_key_does_not_open():
    made = create(b"pw", SMALL, label="", now=NOW, config_digest=CFG, random=Stream(b"a"))
    pem, slot = export_recovery(made.ring_key, label="", now=NOW, random=Stream(b"b"))
    hostile = decode_slot(reseal(encode_slot(slot), ephemeral="00" * 32), "s")
    with pytest.raises(WrongRecoveryKey):
        recover([hostile], pem, "key.pem")


def test_errors_are_repo_errors_with_their_exit_codes():
    assert issubclass(TamperedError, DamageError) and TamperedError.exit_code == 3
    assert issubclass(UnknownEpoch, TamperedError)
    for error in (WrongPassphrase, WrongRecoveryKey, SlotRefused):
        assert issubclass(error, RepoError) and error.exit_code == 1
    assert issubclass(NotARecoveryKey, UsageError) and NotARecoveryKey.exit_code == 2
