"""The config of an encrypted repository: major version 3 (refused by readers without
encryption), no chunk key, its fields bound by a digest."""

from __future__ import annotations

import dataclasses
import json

import pytest

from repo_engine.errors import DamageError, FormatError
from repo_engine.repository.config import ENCRYPTION, RepoConfig, read_config, write_config
from repo_engine.repository.envelope import seal, unseal
from repo_engine.repository.formats import CONFIG, FileFormat
from repo_engine.repository.store.local import LocalStore

# what a version of repo-engine without encryption reads
BEFORE_ENCRYPTION = FileFormat("config", CONFIG.magic, 1, also_reads=(2,))


def encrypted() -> RepoConfig:
    return RepoConfig.new(shared=True, encryption=ENCRYPTION)


def test_an_encrypted_config_round_trips_without_a_chunk_key(tmp_path):
    store = LocalStore(tmp_path)
    config = encrypted()
    write_config(store, config)
    assert config.chunk_key == "" and read_config(store) == config
    data = (tmp_path / "config").read_bytes()
    assert int.from_bytes(data[8:10], "little") == 3
    with pytest.raises(FormatError, match="config format version 3 is not supported.*upgrade"):
        unseal(BEFORE_ENCRYPTION, data, "config")


def test_an_unencrypted_config_keeps_its_major_version(tmp_path):
    for shared, major in ((False, 1), (True, 2)):
        store = LocalStore(tmp_path / str(major))
        (tmp_path / str(major)).mkdir()
        write_config(store, RepoConfig.new(shared=shared))
        data = (tmp_path / str(major) / "config").read_bytes()
        assert int.from_bytes(data[8:10], "little") == major
        unseal(BEFORE_ENCRYPTION, data, "config")


@pytest.mark.parametrize("changes, message", [
    ({"chunk_key": "00" * 32}, "keeps no chunk key"),
    ({"shared": False}, "encrypted repository is shared"),
    ({"encryption": "rot13"}, "encryption 'rot13' is not supported"),
    ({"encryption": "", "chunk_key": ""}, "chunk key is not 32 bytes"),
])
def test_an_inconsistent_encryption_setting_is_damage(tmp_path, changes, message):
    fields = {**dataclasses.asdict(encrypted()), **changes}
    (tmp_path / "config").write_bytes(seal(CONFIG, json.dumps(fields).encode()))
    with pytest.raises(DamageError, match=message):
        read_config(LocalStore(tmp_path))


def test_the_digest_covers_every_field():
    config = encrypted()
    changed = {"repo_id": "ab" * 16, "block_size": 128 << 10, "compression_level": 3,
               "max_chain": 2, "pack_size": 1 << 20, "created": "x"}
    assert set(changed) | {"chunk_key", "shared", "encryption"} == {
        f.name for f in dataclasses.fields(RepoConfig)}
    digests = {dataclasses.replace(config, **{k: v}).digest for k, v in changed.items()}
    assert len(digests | {config.digest}) == len(changed) + 1
