"""Creating and opening an encrypted repository: the keys in the store, the passphrase, the
config bound by the keyring, the downgrade a swapped config would be, and a keyring another host
rotated meanwhile."""

from __future__ import annotations

import json

import pytest

from repo_engine.errors import RepoError, TamperedError
from repo_engine.repository.config import CONFIG_NAME, RepoConfig, read_config, write_config
from repo_engine.repository.crypto import keystore
from repo_engine.repository.crypto.keys import WrongPassphrase, unlock
from repo_engine.repository.crypto.seal import UnknownEpoch
from repo_engine.repository.envelope import seal, unseal
from repo_engine.repository.formats import ENCRYPTED_CONFIG
from repo_engine.repository.location import init_repository, open_key_manager, open_repository
from repo_engine.repository.store.local import LocalStore
from test_crypto_keys import SMALL

PASS = b"correct horse"


def asked(passphrase: bytes = PASS):
    """A passphrase callback that counts its calls."""
    def ask() -> bytes:
        ask.calls += 1
        return passphrase
    ask.calls = 0
    return ask


@pytest.fixture
def repo_path(tmp_path):
    path = tmp_path / "repo"
    init_repository(str(path), cache_dir=tmp_path / "cache-init", passphrase=PASS,
                    kdf=SMALL).close()
    return path


def opened(path, cache, passphrase=None):
    return open_repository(str(path), cache_dir=cache, passphrase=passphrase or asked())


def test_init_stores_keys_and_config_and_no_cleartext_index(repo_path, tmp_path):
    names = sorted(p.relative_to(repo_path).as_posix() for p in repo_path.rglob("*")
                   if p.is_file())
    assert names[:3] == ["config", "keys/keyring-0000000000000001",
                         "keys/keyring-0000000000000001.copy"]
    assert names[3].startswith("keys/slot-") and len(names) == 4
    data = (repo_path / "config").read_bytes()
    config = json.loads(unseal(ENCRYPTED_CONFIG, data, "config"))
    assert int.from_bytes(data[8:10], "little") == 3
    assert config["chunk_key"] == "" and config["shared"] is True
    assert (tmp_path / "cache-init" / config["repo_id"] / "index" / "data.mdb").exists()
    assert (tmp_path / "cache-init" / config["repo_id"] / "encrypted").exists()


def test_open_unlocks_the_same_chunk_key(repo_path, tmp_path):
    ask = asked()
    with (opened(repo_path, tmp_path / "a", ask) as first,
          opened(repo_path, tmp_path / "b") as second):
        assert ask.calls == 1 and first.sealer.encrypted
        assert first.codec.chunk_id(b"block") == second.codec.chunk_id(b"block")
        slots, _ = keystore.load_slots(first.store)
        keyring = keystore.load_keyring(first.store, unlock(slots, PASS).ring_key)
        sealed = first.sealer.seal("map", b"m", b"plain")
        assert keyring.sealer().open("map", b"m", sealed, "m") == b"plain"


def test_a_wrong_or_missing_passphrase_is_one_error_naming_the_slots(repo_path, tmp_path):
    slot = next((repo_path / "keys").glob("slot-*")).name[5:21]
    with pytest.raises(WrongPassphrase, match=f"none of the 1 passphrase slot \\({slot}\\)"):
        opened(repo_path, tmp_path / "c", asked(b"wrong"))
    with pytest.raises(RepoError, match="is encrypted: its passphrase is needed"):
        open_repository(str(repo_path), cache_dir=tmp_path / "c")


def test_a_changed_config_is_tampering(repo_path, tmp_path):
    store = LocalStore(repo_path)
    payload = json.loads(unseal(ENCRYPTED_CONFIG, (repo_path / CONFIG_NAME).read_bytes(), "c"))
    for field, value in (("block_size", 128 << 10), ("max_chain", 3), ("repo_id", "ab" * 16)):
        (repo_path / CONFIG_NAME).write_bytes(
            seal(ENCRYPTED_CONFIG, json.dumps({**payload, field: value}).encode()))
        assert getattr(read_config(store), field) == value
        with pytest.raises(TamperedError, match="config is not the one the repository's keyring"):
            opened(repo_path, tmp_path / "d")


def test_a_config_swapped_for_an_unencrypted_one_is_refused_by_a_host_that_knew(repo_path,
                                                                               tmp_path):
    config = read_config(LocalStore(repo_path))
    opened(repo_path, tmp_path / "host").close()
    for shared in (True, False):
        (repo_path / CONFIG_NAME).unlink()
        write_config(LocalStore(repo_path), RepoConfig(repo_id=config.repo_id,
                                                       chunk_key="00" * 32, shared=shared))
        ask = asked()
        with pytest.raises(TamperedError, match="this host knows it as encrypted"):
            open_repository(str(repo_path), cache_dir=tmp_path / "host", passphrase=ask)
        assert ask.calls == 0


def test_a_config_of_another_id_swapped_in_unencrypted_is_refused_where_it_was_found(repo_path,
                                                                                    tmp_path):
    """The new config claims a repository id this host has no cache of: the location's mark,
    made when the host first read the encrypted config, refuses it."""
    with open_key_manager(str(repo_path), cache_dir=tmp_path / "host"):
        pass  # `key list`: the config read, nothing unlocked
    for shared in (True, False):
        (repo_path / CONFIG_NAME).unlink()
        write_config(LocalStore(repo_path), RepoConfig(repo_id="ab" * 16, chunk_key="00" * 32,
                                                       shared=shared))
        ask = asked()
        with pytest.raises(TamperedError, match="this host found an encrypted one there"):
            open_repository(str(repo_path), cache_dir=tmp_path / "host", passphrase=ask)
        assert ask.calls == 0
    assert not (tmp_path / "host" / ("ab" * 16)).exists()


def test_an_epoch_another_host_rotated_in_is_read_after_one_reload(repo_path, tmp_path):
    with opened(repo_path, tmp_path / "a") as first:
        assert first.sealer.seal("map", b"m", b"x")[:4] == (1).to_bytes(4, "little")
        slots, _ = keystore.load_slots(first.store)
        rotated = keystore.rotate(first.store, unlock(slots, PASS).ring_key)
        sealed = rotated.sealer().seal("point", b"p", b"new data")
        assert first.sealer.open("point", b"p", sealed, "p") == b"new data"
        header = rotated.sealer().parts("pack").header
        first.sealer.parts_opener("pack", header, "pack")
        forged = (9).to_bytes(4, "little") + sealed[4:]
        with pytest.raises(UnknownEpoch, match="names key epoch 9.*holds 1, 2"):
            first.sealer.open("point", b"p", forged, "p")
        # once reloaded, new objects are sealed under the newest epoch
        assert first.sealer.seal("map", b"m", b"x")[:4] == (2).to_bytes(4, "little")


def test_an_unencrypted_repository_never_asks_for_a_passphrase(tmp_path):
    for shared in (False, True):
        path = tmp_path / f"plain-{shared}"
        init_repository(str(path), cache_dir=tmp_path / "cache", shared=shared).close()
        ask = asked()
        with open_repository(str(path), cache_dir=tmp_path / "cache", passphrase=ask) as repo:
            assert not repo.sealer.encrypted and ask.calls == 0
        assert not (path / "keys").exists()
