"""Encrypted repositories through the commands a user types: init --encryption, the passphrase
sources, backup and restore byte for byte (local and on the test S3 server), and every `key`
command, with their one-line errors and exit codes. No cleartext VM name, tag, disk key or
block of data in the stored block maps, manifests, journal entries and checkpoints (packs are
checked by the pack tests).

Every repository here is made with small scrypt parameters (slots.DEFAULT_SCRYPT patched), so an
unlock takes milliseconds."""

from __future__ import annotations

import json
import shlex
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, CliResult, DiskModel, cli, restore_bytes, tree_digest
from repo_engine.cli import passphrase
from repo_engine.repository.crypto import keystore, slots
from repo_engine.repository.store import StoreUnreachable
from repo_engine.repository.store.local import LocalStore
from s3cli import assert_one_line_error, s3_environment
from test_crypto_keys import SMALL

VM, TAG, DISK = "secret-vm-7c1e", "nightly-tag-91ab", "disk-key-e55a"
KNOWN = (b"known plaintext block 3f9d " * 2500)[:64 * 1024]  # one whole 64 KiB block


@pytest.fixture(autouse=True)
def small_kdf(monkeypatch, tmp_path):
    monkeypatch.setattr(slots, "DEFAULT_SCRYPT", SMALL)
    monkeypatch.setenv("REPO_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    for name in (passphrase.FILE_ENV, passphrase.VALUE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(passphrase, "on_terminal", lambda: False)


def secret_file(tmp_path: Path, name: str, text: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text)
    return path


def ok(capsys, *args: object) -> CliResult:
    result = cli(capsys, *args)
    assert result.code == 0, result.err
    return result


def failure(capsys, code: int, *args: object) -> str:
    return assert_one_line_error(cli(capsys, *args), code)


def disk(tmp_path: Path) -> DiskModel:
    model = DiskModel(tmp_path / "disk.img", 4 * MIB, np.random.default_rng(13))
    model.random_changes(6)
    model.write(MIB, KNOWN)
    return model


def backup(capsys, repo: object, model: DiskModel, *extra: object) -> None:
    ok(capsys, "backup", "image", repo, "--vm", VM, "--disk", f"{DISK}={model.path}", *extra)


def stored_cleartext(repo: Path) -> list[str]:
    """The files of `repo` but its packs that hold a name, a tag or the known block in clear."""
    found = []
    for path in sorted(p for p in repo.rglob("*") if p.is_file()):
        if path.relative_to(repo).parts[0] == "packs":
            continue
        data = path.read_bytes()
        found += [f"{path.relative_to(repo)}: {what!r}" for what in (VM, TAG, DISK)
                  if what.encode() in data]
        found += [f"{path.relative_to(repo)}: known block"] if KNOWN[:32] in data else []
    return found


@pytest.fixture
def encrypted(tmp_path, capsys) -> tuple[Path, Path]:
    """A new encrypted local repository and its passphrase file."""
    pass_file = secret_file(tmp_path, "repo.pass", b"correct horse\n")
    repo = tmp_path / "repo"
    out = ok(capsys, "init", repo, "--encryption", "--passphrase-file", pass_file).out
    assert out.startswith("created encrypted shared repository")
    return repo, pass_file


def test_backup_change_backup_restore_with_nothing_in_clear(tmp_path, capsys, monkeypatch,
                                                             encrypted):
    repo, pass_file = encrypted
    model = disk(tmp_path)
    p = ("--passphrase-file", pass_file)
    monkeypatch.setenv(passphrase.FILE_ENV, str(pass_file))  # for restore_bytes
    backup(capsys, repo, model, *p)
    first = model.copy_of_content()
    model.random_changes(4)
    backup(capsys, repo, model, "--tag", TAG, *p)
    points = ok(capsys, "points", repo, "--json", *p).json()["points"]
    assert [pt["tags"] for pt in points] == [[], [TAG]]
    assert restore_bytes(capsys, repo, points[0]["id"], DISK, tmp_path / "a.img") == first
    assert restore_bytes(capsys, repo, f"{VM}@latest", DISK,
                         tmp_path / "b.img") == model.copy_of_content()
    ok(capsys, "verify", repo, *p)
    assert any(p.parts[-2] == "journal" for p in repo.rglob("*") if p.is_file())
    assert stored_cleartext(repo) == []


def test_every_repository_command_works_encrypted(tmp_path, capsys, monkeypatch, encrypted):
    """restore --to and --onto, diff, stats, forget --prune, gc, verify, scrub (with the key and
    without), scrub --repair and rebuild-index on an encrypted repository: each exits 0, and
    the points restore byte for byte before and after the maintenance."""
    repo, pass_file = encrypted
    monkeypatch.setenv(passphrase.FILE_ENV, str(pass_file))
    model = disk(tmp_path)
    backup(capsys, repo, model)
    first, first_content = ok(capsys, "points", repo, "--json").json()["points"][0]["id"], \
        model.copy_of_content()
    model.random_changes(5)
    backup(capsys, repo, model)
    latest = model.copy_of_content()
    assert restore_bytes(capsys, repo, first, DISK, tmp_path / "onto.img") == first_content
    ok(capsys, "restore", repo, f"{VM}@latest", "--disk", DISK, "--onto", tmp_path / "onto.img",
       "--base", first)
    assert (tmp_path / "onto.img").read_bytes() == latest
    report = ok(capsys, "diff", repo, first, f"{VM}@latest", "--json").json()
    extents = report["disks"][0]["extents"]
    differs = np.flatnonzero(np.frombuffer(first_content, np.uint8)
                             != np.frombuffer(latest, np.uint8))
    assert extents and all(any(o <= b < o + n for o, n in extents) for b in differs[::97])
    assert ok(capsys, "stats", repo, "--json").json()
    ok(capsys, "forget", repo, first, "--prune")
    for command in (("gc",), ("verify",), ("scrub",), ("scrub", "--no-key"),
                    ("scrub", "--repair"), ("rebuild-index",), ("verify",)):
        ok(capsys, command[0], repo, *command[1:])
    assert first not in [p["id"] for p in ok(capsys, "points", repo, "--json").json()["points"]]
    assert restore_bytes(capsys, repo, f"{VM}@latest", DISK, tmp_path / "after.img") == latest
    assert stored_cleartext(repo) == []


def test_the_stored_cleartext_check_sees_an_unencrypted_repository(tmp_path, capsys):
    """The check above would find what it looks for."""
    repo = tmp_path / "plain"
    ok(capsys, "init", repo, "--shared")
    model = disk(tmp_path)
    backup(capsys, repo, model, "--tag", TAG)
    found = stored_cleartext(repo)
    assert any(VM in f for f in found) and any(TAG in f for f in found)


def test_passphrase_sources_in_order(tmp_path, capsys, monkeypatch, encrypted):
    repo, pass_file = encrypted
    wrong = secret_file(tmp_path, "wrong.pass", b"wrong\n")
    monkeypatch.setenv(passphrase.VALUE_ENV, "wrong")
    failure(capsys, 1, "points", repo)
    monkeypatch.setenv(passphrase.VALUE_ENV, "correct horse")
    ok(capsys, "points", repo)
    monkeypatch.setenv(passphrase.FILE_ENV, str(wrong))  # the file variable wins over the value
    err = failure(capsys, 1, "points", repo)
    assert "opens none of the 1 passphrase slot" in err
    monkeypatch.setenv(passphrase.FILE_ENV, str(pass_file))
    ok(capsys, "points", repo)
    ok(capsys, "points", repo, "--passphrase-file", pass_file)  # the option wins over both
    err = failure(capsys, 1, "points", repo, "--passphrase-file", wrong)
    slot = next((repo / "keys").glob("slot-*")).name[5:21]
    assert f"the passphrase opens none of the 1 passphrase slot ({slot})" in err


def test_exactly_one_trailing_newline_is_dropped_and_empty_is_refused(tmp_path, capsys):
    repo = tmp_path / "repo"
    two = secret_file(tmp_path, "two", b"pass\n\n")
    ok(capsys, "init", repo, "--encryption", "--passphrase-file", two)
    ok(capsys, "points", repo, "--passphrase-file", secret_file(tmp_path, "a", b"pass\n\n"))
    failure(capsys, 1, "points", repo, "--passphrase-file", secret_file(tmp_path, "b", b"pass\n"))
    for text in (b"", b"\n"):
        err = failure(capsys, 2, "points", repo, "--passphrase-file",
                      secret_file(tmp_path, "empty", text))
        assert "is empty; an empty passphrase is refused" in err
    err = failure(capsys, 2, "init", tmp_path / "r2", "--encryption", "--passphrase-file",
                  secret_file(tmp_path, "empty", b"\n"))
    assert "is empty" in err and not (tmp_path / "r2").exists()


def test_missing_or_unreadable_passphrase_file_and_no_source(tmp_path, capsys, monkeypatch,
                                                            encrypted):
    repo, _ = encrypted
    # a passphrase file that cannot be read is a bad input file: a usage error naming it
    err = failure(capsys, 2, "points", repo, "--passphrase-file", tmp_path / "nowhere")
    assert f"--passphrase-file: cannot read the passphrase file {tmp_path / 'nowhere'}" in err
    monkeypatch.setenv(passphrase.FILE_ENV, str(tmp_path))  # a directory
    err = failure(capsys, 2, "points", repo)
    assert f"$REPO_ENGINE_PASSWORD_FILE: cannot read the passphrase file {tmp_path}" in err
    monkeypatch.delenv(passphrase.FILE_ENV)
    err = failure(capsys, 1, "points", repo)
    assert f"{repo} is encrypted and no passphrase was given" in err
    assert "--passphrase-file FILE, $REPO_ENGINE_PASSWORD_FILE or $REPO_ENGINE_PASSWORD" in err
    err = failure(capsys, 1, "init", tmp_path / "new", "--encryption")
    assert "or create the repository unencrypted with --no-encryption" in err


def test_the_terminal_is_asked_without_echo_twice_for_a_new_passphrase(tmp_path, capsys,
                                                                       monkeypatch):
    answers = iter(["typed", "typo", "typed", "typed", "typed"])
    asked = []

    def hidden(text: str) -> str:
        asked.append(text)
        return next(answers)

    monkeypatch.setattr(passphrase, "on_terminal", lambda: True)
    monkeypatch.setattr("click.termui.hidden_prompt_func", hidden)
    repo = tmp_path / "repo"
    ok(capsys, "init", repo, "--encryption")  # typed, typo: asked again; typed, typed
    assert asked[:2] == [f"New passphrase for {repo}: ", "Repeat the passphrase: "]
    assert len(asked) == 4
    ok(capsys, "points", repo)
    assert asked[-1] == f"Passphrase for {repo}: " and len(asked) == 5


def test_an_unencrypted_repository_never_asks(tmp_path, capsys, monkeypatch):
    def never(*_args, **_kwargs):
        raise AssertionError("asked for a passphrase")

    monkeypatch.setattr(passphrase.PassphraseSource, "read", never)
    repo = tmp_path / "repo"
    ok(capsys, "init", repo)
    backup(capsys, repo, disk(tmp_path))
    ok(capsys, "points", repo)
    err = failure(capsys, 1, "key", "list", repo)
    assert f"{repo} is not encrypted: it has no keys to manage" in err
    kept = tmp_path / "kept.pem"  # read before the repository is opened: it must exist
    kept.write_bytes(b"kept")
    for args in (("status",), ("add",), ("remove", "abcd"), ("passwd",), ("rotate",),
                 ("export-recovery", "--out", tmp_path / "k.pem"),
                 ("recover", "--private-key", kept)):
        failure(capsys, 1, "key", args[0], repo, *args[1:])
    assert not (tmp_path / "k.pem").exists()


def test_an_encrypted_repository_replaced_by_an_unencrypted_one_is_refused(
        tmp_path, capsys, monkeypatch, encrypted):
    """Someone who can write the storage puts a new unencrypted repository where the encrypted
    one was: this host neither reads nor writes cleartext there (exit code 3)."""
    repo, pass_file = encrypted
    model = disk(tmp_path)
    shutil.rmtree(repo)
    with monkeypatch.context() as elsewhere:  # the planted repository, made on another host
        elsewhere.setenv("REPO_ENGINE_CACHE_DIR", str(tmp_path / "other-host"))
        ok(capsys, "init", repo, "--no-encryption")
    before = sorted(p for p in repo.rglob("*"))
    for args in (("points", repo), ("backup", "image", repo, "--vm", VM, "--disk",
                                    f"{DISK}={model.path}")):
        err = failure(capsys, 3, *args, "--passphrase-file", pass_file)
        assert "this host found an encrypted one there" in err and "restore it" in err
    assert sorted(p for p in repo.rglob("*")) == before


def test_key_add_list_passwd_and_remove(tmp_path, capsys, encrypted):
    repo, pass_file = encrypted
    alice = secret_file(tmp_path, "alice.pass", b"alice\n")
    new = secret_file(tmp_path, "new.pass", b"new one\n")
    ok(capsys, "key", "add", repo, "--passphrase-file", pass_file, "--label", "alice",
       "--new-passphrase-file", alice)
    ok(capsys, "points", repo, "--passphrase-file", alice)
    listed = {s["label"]: s for s in ok(capsys, "key", "list", repo, "--json").json()["slots"]}
    assert sorted(listed) == ["", "alice"] and listed["alice"]["kind"] == "passphrase"
    assert listed["alice"]["kdf"] == {"name": "scrypt", "log_n": 4, "r": 1, "p": 1,
                                      "memory": 2048}
    assert set(listed["alice"]) == {"id", "kind", "label", "created", "kdf"}
    text = ok(capsys, "key", "list", repo).out
    assert "alice" in text and "scrypt n=2^4 r=1 p=1" in text
    original = listed[""]["id"]

    out = ok(capsys, "key", "passwd", repo, "--passphrase-file", pass_file,
             "--new-passphrase-file", new).out
    assert f"replaces slot {original}" in out
    err = failure(capsys, 1, "points", repo, "--passphrase-file", pass_file)
    assert "opens none of the 2 passphrase slots" in err and original not in err
    ok(capsys, "points", repo, "--passphrase-file", new)

    alice_id = listed["alice"]["id"]
    err = failure(capsys, 1, "key", "remove", repo, alice_id, "--passphrase-file", alice)
    assert "opens none of the 1 passphrase slot" in err
    assert f"removing slot {alice_id} needs the passphrase of a slot that stays" in err
    ok(capsys, "key", "remove", repo, alice_id[:6], "--passphrase-file", new)
    err = failure(capsys, 1, "points", repo, "--passphrase-file", alice)
    last = ok(capsys, "key", "list", repo, "--json").json()["slots"][0]["id"]
    err = failure(capsys, 1, "key", "remove", repo, last, "--passphrase-file", new)
    assert f"key slot {last} is the repository's last slot" in err
    err = failure(capsys, 1, "key", "remove", repo, "ffff", "--passphrase-file", new)
    assert "'ffff' matches no slot" in err


def test_rotate_then_old_and_new_points_restore(tmp_path, capsys, monkeypatch, encrypted):
    repo, pass_file = encrypted
    p = ("--passphrase-file", pass_file)
    monkeypatch.setenv(passphrase.FILE_ENV, str(pass_file))  # for restore_bytes
    model = disk(tmp_path)
    backup(capsys, repo, model, *p)
    first = model.copy_of_content()
    assert "new data is sealed with epoch 2" in ok(capsys, "key", "rotate", repo, *p).out
    status = ok(capsys, "key", "status", repo, "--json", *p).json()
    assert (status["current_epoch"], status["epochs"]) == (2, [1, 2])
    model.random_changes(5)
    backup(capsys, repo, model, *p)
    ids = [pt["id"] for pt in ok(capsys, "points", repo, "--json", *p).json()["points"]]
    assert restore_bytes(capsys, repo, ids[0], DISK, tmp_path / "a.img") == first
    assert restore_bytes(capsys, repo, ids[1], DISK,
                         tmp_path / "b.img") == model.copy_of_content()
    assert "readable epochs 1, 2" in ok(capsys, "key", "status", repo, *p).out


def test_export_recovery_then_recover_after_the_passphrase_is_lost(tmp_path, capsys, encrypted):
    repo, pass_file = encrypted
    key_file = tmp_path / "offline" / "recovery.pem"
    key_file.parent.mkdir()
    model = disk(tmp_path)
    backup(capsys, repo, model, "--passphrase-file", pass_file)
    ok(capsys, "key", "export-recovery", repo, "--out", key_file, "--passphrase-file", pass_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in key_file.parent.iterdir()] == ["recovery.pem"]
    before = key_file.read_bytes()
    err = failure(capsys, 2, "key", "export-recovery", repo, "--out", key_file,
                  "--passphrase-file", pass_file)
    assert "already exists" in err and key_file.read_bytes() == before
    kinds = [s["kind"] for s in ok(capsys, "key", "list", repo, "--json").json()["slots"]]
    assert kinds == ["passphrase", "recovery"]

    pass_file.unlink()  # lost
    fresh = secret_file(tmp_path, "fresh.pass", b"fresh start\n")
    out = ok(capsys, "key", "recover", repo, "--private-key", key_file,
             "--new-passphrase-file", fresh).out
    assert "added passphrase slot" in out
    result = cli(capsys, "restore", repo, f"{VM}@latest", "--disk", DISK, "--to",
                 tmp_path / "r.img", "--passphrase-file", fresh)
    assert result.code == 0, result.err
    assert (tmp_path / "r.img").read_bytes() == model.copy_of_content()


def test_a_key_file_opens_every_command_without_passphrase_or_kdf(tmp_path, capsys,
                                                                  monkeypatch, encrypted):
    """For unattended hosts: the recovery key file, by --key-file or $REPO_ENGINE_KEY_FILE,
    opens backup, restore and listing with no passphrase given and no scrypt run; a key that
    opens no slot is one line (exit 1), a file that cannot be read or holds no such key a usage
    error (exit 2), and a passphrase source is not used instead."""
    repo, pass_file = encrypted
    key_file = tmp_path / "host.pem"
    ok(capsys, "key", "export-recovery", repo, "--out", key_file, "--passphrase-file", pass_file)
    other, foreign = tmp_path / "other", tmp_path / "foreign.pem"
    ok(capsys, "init", other, "--encryption", "--passphrase-file", pass_file)
    ok(capsys, "key", "export-recovery", other, "--out", foreign, "--passphrase-file", pass_file)

    def no_kdf(*_args: object) -> bytes:
        raise AssertionError("scrypt ran")
    monkeypatch.setattr(slots.ScryptParams, "derive", no_kdf)
    model = disk(tmp_path)
    backup(capsys, repo, model, "--key-file", key_file)
    monkeypatch.setenv(passphrase.KEY_FILE_ENV, str(key_file))
    assert restore_bytes(capsys, repo, f"{VM}@latest", DISK, tmp_path / "r.img") == \
        model.copy_of_content()
    assert len(ok(capsys, "points", repo, "--json").json()["points"]) == 1
    monkeypatch.delenv(passphrase.KEY_FILE_ENV)

    monkeypatch.setenv(passphrase.VALUE_ENV, "correct horse")  # not used in the key file's stead
    err = failure(capsys, 1, "points", repo, "--key-file", foreign)
    assert f"the private key in --key-file {foreign} opens none of the repository's" in err
    before = tree_digest(repo)
    err = failure(capsys, 2, "backup", "image", repo, "--vm", VM, "--disk",
                  f"{DISK}={model.path}", "--key-file", pass_file)
    assert err.startswith(f"repo-engine: error: --key-file {pass_file} is not an unencrypted "
                          "PEM private key (")
    assert err.endswith("; name the file 'repo-engine key export-recovery' wrote\n")
    err = failure(capsys, 2, "points", repo, "--key-file", tmp_path / "gone.pem")
    assert err == (f"repo-engine: error: --key-file: cannot read the key file "
                   f"{tmp_path / 'gone.pem'}: No such file or directory; name the file "
                   "'repo-engine key export-recovery' wrote\n")
    monkeypatch.setenv(passphrase.KEY_FILE_ENV, str(tmp_path))
    err = failure(capsys, 2, "points", repo)
    assert f"$REPO_ENGINE_KEY_FILE: cannot read the key file {tmp_path}: Is a directory" in err
    monkeypatch.delenv(passphrase.KEY_FILE_ENV)
    assert tree_digest(repo) == before
    err = failure(capsys, 2, "key", "add", repo, "--key-file", key_file)
    assert "the key commands unlock with a passphrase, not --key-file" in err


def test_recovery_key_errors(tmp_path, capsys, encrypted):
    repo, pass_file = encrypted
    fresh = ("--new-passphrase-file", secret_file(tmp_path, "fresh.pass", b"fresh\n"))
    err = failure(capsys, 2, "key", "recover", repo, "--private-key", pass_file, *fresh)
    assert f"{pass_file} is not an unencrypted PEM private key" in err
    err = failure(capsys, 2, "key", "recover", repo, "--private-key", tmp_path / "none", *fresh)
    assert f"--private-key: cannot read the key file {tmp_path / 'none'}" in err
    other = tmp_path / "other.pem"
    ok(capsys, "key", "export-recovery", repo, "--out", other, "--passphrase-file", pass_file)
    ok(capsys, "key", "remove", repo, "--passphrase-file", pass_file,
       ok(capsys, "key", "list", repo, "--json").json()["slots"][1]["id"])
    err = failure(capsys, 1, "key", "recover", repo, "--private-key", other, *fresh)
    assert "opens none of the repository's 0 recovery slots" in err
    assert len(ok(capsys, "key", "list", repo, "--json").json()["slots"]) == 1


def test_damaged_or_foreign_slots(tmp_path, capsys, encrypted):
    repo, pass_file = encrypted
    other_pass = secret_file(tmp_path, "other.pass", b"other\n")
    other = tmp_path / "other"
    ok(capsys, "init", other, "--encryption", "--passphrase-file", other_pass)
    foreign = next((other / "keys").glob("slot-*"))
    (repo / "keys" / foreign.name).write_bytes(foreign.read_bytes())
    ok(capsys, "points", repo, "--passphrase-file", pass_file)  # its own slot still opens
    err = failure(capsys, 3, "points", repo, "--passphrase-file", other_pass)
    assert "a slot copied from another repository" in err and foreign.name[5:21] in err
    err = failure(capsys, 3, "key", "status", repo, "--passphrase-file", other_pass)
    assert "a slot copied from another repository" in err
    (repo / "keys" / foreign.name).unlink()

    own = next((repo / "keys").glob("slot-*"))
    data = bytearray(own.read_bytes())
    data[len(data) // 2] ^= 0x40
    own.write_bytes(bytes(data))
    for args in (("points", repo), ("key", "status", repo), ("key", "add", repo)):
        err = failure(capsys, 3, *args, "--passphrase-file", pass_file)
        assert "no readable key slot" in err and own.name in err
    listed = ok(capsys, "key", "list", repo, "--json").json()
    assert listed["slots"] == [] and own.name in listed["unreadable"][0]


def test_on_s3_encryption_is_the_default(tmp_path, capsys, monkeypatch, seaweedfs, s3_bucket):
    s3_environment(monkeypatch, tmp_path, seaweedfs.endpoint)
    repo = f"s3://{s3_bucket}/enc"
    err = failure(capsys, 1, "init", repo)
    assert "--no-encryption" in err
    monkeypatch.setenv(passphrase.VALUE_ENV, "s3 secret")
    assert "created encrypted shared repository" in ok(capsys, "init", repo).out
    model = disk(tmp_path)
    backup(capsys, repo, model)
    first = model.copy_of_content()
    model.random_changes(3)
    backup(capsys, repo, model, "--tag", TAG)
    points = ok(capsys, "points", repo, "--json").json()["points"]
    assert restore_bytes(capsys, repo, points[0]["id"], DISK, tmp_path / "a.img") == first
    assert restore_bytes(capsys, repo, f"{VM}@latest", DISK,
                         tmp_path / "b.img") == model.copy_of_content()
    ok(capsys, "key", "add", repo, "--new-passphrase-file", secret_file(tmp_path, "b", b"b\n"))
    assert len(ok(capsys, "key", "list", repo, "--json").json()["slots"]) == 2
    monkeypatch.setenv(passphrase.VALUE_ENV, "wrong")
    failure(capsys, 1, "points", repo)
    monkeypatch.delenv(passphrase.VALUE_ENV)
    plain = f"s3://{s3_bucket}/plain"
    assert "created shared repository" in ok(capsys, "init", plain, "--no-encryption").out
    assert json.loads(ok(capsys, "points", plain, "--json").out)["points"] == []


def readme_commands() -> list[list[str]]:
    """The commands of the README's "Encryption" block, each as argv (comments dropped)."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = text[text.index("### Encryption\n"):].split("\n\n")[1]
    return [shlex.split(line, comments=True)
            for line in block.replace("\\\n", " ").splitlines()]


def moved(arg: str, paths: dict) -> object:
    """`arg` with the README path it is (or its value after `KEY=`) replaced."""
    key, sep, value = arg.rpartition("=")
    return f"{key}={paths[value]}" if sep and value in paths else paths.get(arg, arg)


def test_the_readme_encryption_commands_run_as_written(tmp_path, capsys, monkeypatch):
    """Each command of the README's block, in order, with its paths moved under tmp_path and the
    slot id `key remove` names replaced by the slot `key add` made."""
    model = disk(tmp_path)
    (tmp_path / "safe").mkdir()
    paths = {"/backup/repo": tmp_path / "repo", "/images/web1-sda.img": model.path,
             "/etc/repo-engine/repo.pass": secret_file(tmp_path, "repo.pass", b"first\n"),
             "alice.pass": secret_file(tmp_path, "alice.pass", b"alice\n"),
             "new.pass": secret_file(tmp_path, "new.pass", b"new\n"),
             "/media/safe/repo-recovery.pem": tmp_path / "safe" / "recovery.pem"}
    ran = []
    for argv in readme_commands():
        if argv[0] == "export":
            name, value = argv[1].split("=", 1)
            monkeypatch.setenv(name, str(paths[value]))
            continue
        assert argv[0] == "repo-engine"
        if argv[1:3] == ["key", "remove"]:
            listed = ok(capsys, "key", "list", paths["/backup/repo"], "--json").json()["slots"]
            paths[argv[4]] = next(s["id"] for s in listed if s["label"] == "alice")
        ok(capsys, *[moved(arg, paths) for arg in argv[1:]])
        ran.append(" ".join(argv[1:3]))
    assert ran == ["init /backup/repo", "backup image", "key add", "key list", "key remove",
                   "key rotate", "key retire", "key status", "key export-recovery", "key recover",
                   "points /backup/repo", "key passwd", "scrub /backup/repo"]
    slots = ok(capsys, "key", "list", paths["/backup/repo"], "--json").json()["slots"]
    assert sorted(s["kind"] for s in slots) == ["passphrase", "passphrase", "recovery"]
    monkeypatch.setenv(passphrase.FILE_ENV, str(paths["new.pass"]))
    assert restore_bytes(capsys, paths["/backup/repo"], "web1@latest", "sda",
                         tmp_path / "r.img") == model.copy_of_content()


def test_a_key_change_growing_the_keyring_past_its_bound_is_refused_unwritten(
        tmp_path, capsys, monkeypatch, encrypted):
    """A keyring larger than readers accept, once the newest generation, would open for no
    host: the change that would write it is refused, naming the way out."""
    repo, pass_file = encrypted
    keyring = repo / "keys" / "keyring-0000000000000001"
    monkeypatch.setattr(keystore, "MAX_KEYRING_SIZE", len(keyring.read_bytes()) + 20)
    new = secret_file(tmp_path, "new.pass", b"new passphrase")
    for args in (("rotate",), ("add", "--new-passphrase-file", new)):
        err = failure(capsys, 1, "key", *args, repo, "--passphrase-file", pass_file)
        assert "more than a keyring may" in err and "'repo-engine key retire'" in err
    assert sorted(p.name for p in (repo / "keys").iterdir())[0] == keyring.name
    assert len(list((repo / "keys").iterdir())) == 3  # the keyring, its copy, the first slot
    status = ok(capsys, "key", "status", repo, "--passphrase-file", pass_file, "--json").json()
    assert (status["keyring_generation"], status["epochs"]) == (1, [1])


def test_a_keyring_past_its_bound_is_refused_unread(tmp_path, capsys, encrypted):
    """Its size is checked before a byte of it is held in memory (damage: exit code 3)."""
    repo, pass_file = encrypted
    planted = repo / "keys" / "keyring-0000000000000002"
    planted.write_bytes(b"\0" * (keystore.MAX_KEYRING_SIZE + 1))
    err = failure(capsys, 3, "key", "status", repo, "--passphrase-file", pass_file)
    assert f"{planted.name} holds {keystore.MAX_KEYRING_SIZE + 1} bytes, more than" in err


def test_export_recovery_keeps_no_key_that_opens_nothing(tmp_path, capsys, monkeypatch,
                                                         encrypted):
    """The private key is written before its slot: when the slot cannot be added, the key file
    is deleted again, unless the keyring may list the slot (a write whose answer was lost)."""
    repo, pass_file = encrypted
    p = ("--passphrase-file", pass_file)
    err = failure(capsys, 2, "key", "export-recovery", repo, "--out",
                  tmp_path / "missing" / "recovery.pem")  # no passphrase given: none asked
    assert "missing is not a directory" in err
    out = tmp_path / "recovery.pem"
    real_put = LocalStore.put

    def failing(prefix: str, after: bool):
        def put(self, name, data, **kwargs):
            if after:
                real_put(self, name, data, **kwargs)
            if name.startswith(prefix):
                raise StoreUnreachable(f"{name}: connection reset")
            if not after:
                real_put(self, name, data, **kwargs)
        return put
    with monkeypatch.context() as full:  # the change refused
        keyring = repo / "keys" / "keyring-0000000000000001"
        full.setattr(keystore, "MAX_KEYRING_SIZE", len(keyring.read_bytes()) + 20)
        assert "more than a keyring may" in failure(capsys, 1, "key", "export-recovery", repo,
                                                    "--out", out, *p)
    assert not out.exists()
    with monkeypatch.context() as down:  # the slot's file not stored
        down.setattr(LocalStore, "put", failing("keys/slot-", after=False))
        failure(capsys, 1, "key", "export-recovery", repo, "--out", out, *p)
    assert not out.exists()
    kinds = [s["kind"] for s in ok(capsys, "key", "list", repo, "--json").json()["slots"]]
    assert kinds == ["passphrase"]
    with monkeypatch.context() as lost:  # the keyring listing it written, the answer lost
        lost.setattr(LocalStore, "put", failing("keys/keyring-", after=True))
        failure(capsys, 1, "key", "export-recovery", repo, "--out", out, *p)
    assert out.exists()
    ok(capsys, "points", repo, "--key-file", out)
