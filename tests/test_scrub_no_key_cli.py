"""`scrub --no-key` as the README promises it to the storage host: no passphrase asked, nothing
written, every kind of stored object checked, exit code 0 clean, 3 on damage (naming the
object), 2 for options it does not take or an unencrypted repository, 1 when there is no
repository."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from helpers import cli
from test_encryption_cli import (DISK, VM, backup, disk, encrypted, failure, ok,  # noqa: F401
                                 small_kdf)


def snapshot(repo: Path) -> dict[str, tuple[str, int]]:
    """Every file under `repo`: its content hash and modification time."""
    return {str(p.relative_to(repo)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in sorted(repo.rglob("*")) if p.is_file()}


@pytest.fixture
def backed_up(encrypted, tmp_path, capsys):  # noqa: F811
    repo, _pass_file = encrypted
    backup(capsys, repo, disk(tmp_path), "--passphrase-file", _pass_file)
    return repo


def test_a_clean_repository_is_checked_without_a_passphrase_and_nothing_is_written(backed_up,
                                                                                  tmp_path,
                                                                                  capsys):
    cache = tmp_path / "cache"  # this host's cache directory (REPO_ENGINE_CACHE_DIR)
    before = snapshot(backed_up), snapshot(cache)
    out = ok(capsys, "scrub", backed_up, "--no-key").out  # no passphrase source, no terminal
    assert "checked the stored bytes without the key" in out and "no damage found" in out
    for kind in ("3 key records", "pack", "map", "point", "journal object"):
        assert kind in out
    assert (snapshot(backed_up), snapshot(cache)) == before


@pytest.mark.parametrize("kind", ["keys", "packs", "maps", "journal"])
def test_damage_in_any_kind_of_object_is_exit_code_3_naming_it(backed_up, capsys, kind):
    victim = next(p for p in sorted((backed_up / kind).rglob("*")) if p.is_file())
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    err = failure(capsys, 3, "scrub", backed_up, "--no-key")
    assert victim.name in err and "'repo-engine scrub' with the key" in err
    assert "scrub --no-key found 1 damaged object or chunk, the first: " in err


def test_what_it_refuses_is_exit_code_2_and_no_repository_is_1(backed_up, tmp_path, capsys):
    for option in (["--repair"], ["--read-data-subset", "10%"], ["--max-duration", "1h"]):
        result = cli(capsys, "scrub", backed_up, "--no-key", *option)  # a usage error of click's
        assert result.code == 2 and "--no-key checks every object whole" in result.err
    plain = tmp_path / "plain"
    ok(capsys, "init", plain, "--shared")
    assert "run 'repo-engine scrub' without --no-key" in failure(capsys, 2, "scrub", plain,
                                                                 "--no-key")
    failure(capsys, 1, "scrub", tmp_path / "nothing-here", "--no-key")


def test_a_damaged_keyring_record_is_found_the_copy_opens_and_a_rotation_writes_both_anew(
        encrypted, tmp_path, capsys):  # noqa: F811
    repo, pass_file = encrypted
    model = disk(tmp_path)
    backup(capsys, repo, model, "--passphrase-file", pass_file)
    record = repo / "keys" / "keyring-0000000000000001"
    data = bytearray(record.read_bytes())
    data[len(data) // 2] ^= 0x01
    record.write_bytes(bytes(data))
    err = failure(capsys, 3, "scrub", repo, "--no-key")
    assert "keyring-0000000000000001: keyring checksum mismatch" in err
    assert "run 'repo-engine key rotate' to write both anew" in err
    ok(capsys, "restore", repo, f"{VM}@latest", "--disk", DISK, "--to", tmp_path / "back.img",
       "--passphrase-file", pass_file)
    assert (tmp_path / "back.img").read_bytes() == model.path.read_bytes()
    ok(capsys, "key", "rotate", repo, "--passphrase-file", pass_file)
    assert sorted(p.name for p in (repo / "keys").glob("keyring-*")) == [
        "keyring-0000000000000001", "keyring-0000000000000002", "keyring-0000000000000002.copy"]
    assert "no damage found" in ok(capsys, "scrub", repo, "--no-key").out
