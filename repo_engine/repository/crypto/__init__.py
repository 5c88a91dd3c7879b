"""Client-side encryption: sealing objects with an AEAD, the keyring, and the key slots.

Key hierarchy (every key 32 random bytes unless derived):

    passphrase --scrypt(slot salt, n, r, p)--> KEK ┐
    recovery private key --X25519 + HKDF-----> KEK ┴-> slot: AES-256-GCM(KEK) of K_ring
    K_ring (keyring key) --seals--> keyring: chunk_key, data key of each epoch, current epoch
    data key of epoch e --HKDF(object salt, kind)--> object key --AES-256-GCM--> sealed object

- `cipher.py`: the primitives: AES-256-GCM, the object key derivation, nonces and the
  associated data that binds a ciphertext to its kind, name and epoch.
- `null.py`: the sealer interface, and the null sealer of an unencrypted repository.
- `seal.py`: sealing of one object (a map, a point, a journal entry, the keyring) and of the
  parts of an object written as a stream (the chunks of a pack, the records of a checkpoint); the
  null sealer of an unencrypted repository has the same interface, so that callers never ask
  whether a repository is encrypted.
- `keyring.py`: the keyring record (generation-named, sealed with K_ring) and rotation.
- `slots.py`: the key slot record: passphrase slots (scrypt, bounded parameters) and recovery
  slots (an X25519 public key).
- `keys.py`: the key operations as pure functions over records: create, unlock, add and remove a
  slot, change a passphrase, rotate, export a recovery key, recover.
- `keystore.py`: where those records live in a store (`keys/...`).

Nothing here reads a passphrase: the caller passes it in as bytes. Nothing outside `repository/`
imports this package but the CLI's key commands.
"""
