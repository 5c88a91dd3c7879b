"""A passphrase's key derived ahead (crypto/ahead.py): used only for the very slot, salt and
passphrase it was derived for; a stale, damaged or hostile copy of a slot, or a passphrase that
would be asked on a terminal, changes nothing but who derives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from repo_engine.errors import TamperedError
from repo_engine.repository.crypto import ahead
from repo_engine.repository.crypto.keys import WrongPassphrase
from repo_engine.repository.crypto.slots import ScryptParams, decode_slot, encode_slot
from repo_engine.repository.location import init_repository, open_key_manager, open_repository
from repo_engine.repository.opening import unlock_hint
from test_crypto_keys import SMALL

PASS = b"correct horse"


class Unattended:
    """A passphrase read from a file or the environment: never asks anyone."""

    asks = False

    def __init__(self, passphrase: bytes = PASS) -> None:
        self.passphrase = passphrase

    def __call__(self) -> bytes:
        return self.passphrase


@pytest.fixture
def derivations(monkeypatch):
    """(thread name, salt) of every scrypt run, in order."""
    runs: list[tuple[str, bytes]] = []
    real = ScryptParams.compute

    def compute(self, passphrase, salt):
        runs.append((threading.current_thread().name, salt))
        return real(self, passphrase, salt)

    monkeypatch.setattr(ScryptParams, "compute", compute)
    return runs


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "repo"
    init_repository(str(path), cache_dir=tmp_path / "cache", passphrase=PASS, kdf=SMALL).close()
    return path


def opened(path, cache, passphrase=None):
    open_repository(str(path), cache_dir=cache, passphrase=passphrase or Unattended()).close()


def slot_ids(path):
    return sorted(p.name for p in (path / "keys").glob("slot-*.slot"))


def test_the_slot_that_opened_is_copied_and_the_next_open_derives_ahead(repo, tmp_path,
                                                                        derivations):
    hint = unlock_hint(str(repo), tmp_path / "cache")
    assert not hint.exists()
    opened(repo, tmp_path / "cache")
    assert derivations[-1][0] == threading.main_thread().name
    copy = decode_slot(hint.read_bytes(), "copy")
    assert [f"slot-{copy.id}.slot"] == slot_ids(repo)
    assert (repo / "keys" / f"slot-{copy.id}.slot").read_bytes() == hint.read_bytes()
    derivations.clear()
    opened(repo, tmp_path / "cache")
    assert derivations == [("derive-ahead", copy.salt)]


def test_a_passphrase_that_would_be_asked_is_not_read_ahead(repo, tmp_path, derivations):
    opened(repo, tmp_path / "cache")
    calls = []

    def typed() -> bytes:  # a prompt: no `asks` attribute, so taken to ask
        calls.append(threading.current_thread().name)
        return PASS

    derivations.clear()
    opened(repo, tmp_path / "cache", typed)
    assert calls == [threading.main_thread().name]
    assert [name for name, _ in derivations] == [threading.main_thread().name]


def test_a_wrong_passphrase_is_refused_the_same_with_a_copy(repo, tmp_path, derivations):
    opened(repo, tmp_path / "cache")
    derivations.clear()
    with pytest.raises(WrongPassphrase, match="the passphrase opens none of the 1 passphrase"):
        opened(repo, tmp_path / "cache", Unattended(b"wrong"))
    assert [name for name, _ in derivations] == ["derive-ahead"]


def test_a_stale_copy_costs_a_derivation_and_is_replaced(repo, tmp_path, derivations):
    cache = tmp_path / "cache"
    opened(repo, cache)
    hint = unlock_hint(str(repo), cache)
    old = decode_slot(hint.read_bytes(), "copy")
    with open_key_manager(str(repo), cache_dir=cache) as keys:
        new = keys.change_passphrase(keys.unlock(Unattended()), b"battery staple")
    assert slot_ids(repo) == [f"slot-{new.id}.slot"]
    derivations.clear()
    opened(repo, cache, Unattended(b"battery staple"))
    # derived ahead for the old slot's salt, wasted; the new slot's key derived when it is read
    assert sorted(derivations) == sorted([("derive-ahead", old.salt),
                                          (threading.main_thread().name, new.salt)])
    assert decode_slot(hint.read_bytes(), "copy").id == new.id
    derivations.clear()
    opened(repo, cache, Unattended(b"battery staple"))
    assert derivations == [("derive-ahead", new.salt)]


def test_a_damaged_copy_is_ignored_and_rewritten(repo, tmp_path, derivations):
    cache = tmp_path / "cache"
    opened(repo, cache)
    hint = unlock_hint(str(repo), cache)
    good = hint.read_bytes()
    hint.write_bytes(good[:40] + bytes([good[40] ^ 1]) + good[41:])
    derivations.clear()
    opened(repo, cache)
    assert [name for name, _ in derivations] == [threading.main_thread().name]
    assert hint.read_bytes() == good


def test_a_hostile_copy_never_runs_its_scrypt_parameters(repo, tmp_path, derivations):
    cache = tmp_path / "cache"
    opened(repo, cache)
    hint = unlock_hint(str(repo), cache)
    slot = decode_slot(hint.read_bytes(), "copy")
    costly = ScryptParams(log_n=30, r=8, p=1)  # 1 TiB of memory
    with pytest.raises(TamperedError):
        decode_slot(encode_slot(slot.__class__(**{**slot.__dict__, "kdf": costly})), "x")
    hint.write_bytes(encode_slot(slot.__class__(**{**slot.__dict__, "kdf": costly})))
    derivations.clear()
    opened(repo, cache)
    assert [name for name, _ in derivations] == [threading.main_thread().name]
    assert ahead.take(costly, slot.salt, PASS) is None


# A command in a fresh interpreter: when the derivation starts, and which thread runs it.
WATCHED = """
import json, sys, threading
from repo_engine.repository.crypto import ahead, slots
started, ran = [], []
real_start, real_compute = ahead.start, slots.ScryptParams.compute

def start(hint, passphrase):
    started.append("repo_engine.repository.repo" in sys.modules)
    return real_start(hint, passphrase)

def compute(self, passphrase, salt):
    ran.append(threading.current_thread().name)
    return real_compute(self, passphrase, salt)

ahead.start, slots.ScryptParams.compute = start, compute
from repo_engine.cli.main import run
code = run(sys.argv[1:])
print(json.dumps([code, started, ran]))
"""


def test_a_command_starts_deriving_before_it_loads_the_engine(repo, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("REPO_ENGINE_")},
           "REPO_ENGINE_CACHE_DIR": str(tmp_path / "cache"), "REPO_ENGINE_PASSWORD": PASS.decode()}

    def points() -> list:
        proc = subprocess.run([sys.executable, "-c", WATCHED, "points", str(repo)], env=env,
                              capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.splitlines()[-1])

    code, started, ran = points()  # no copy of the slot yet: derived when the slot is read
    assert code == 0 and ran == ["MainThread"]
    code, started, ran = points()
    assert code == 0 and ran == ["derive-ahead"]
    assert started[0] is False  # the first start came before the engine's modules loaded


def test_a_passphrase_that_can_be_read_once_opens_again_and_again(repo, tmp_path):
    """--passphrase-file /dev/stdin (a pipe): the command reads it once, however many times the
    unlock ahead and the unlock ask for it."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("REPO_ENGINE_")},
           "REPO_ENGINE_CACHE_DIR": str(tmp_path / "cache")}
    for _ in range(3):  # the first run makes the copy; the others derive ahead from it
        done = subprocess.run([sys.executable, "-c", WATCHED, "points", "--passphrase-file",
                               "/dev/stdin", str(repo)], input=PASS + b"\n", env=env,
                              capture_output=True, check=True)
        assert json.loads(done.stdout.splitlines()[-1])[0] == 0
    assert json.loads(done.stdout.splitlines()[-1])[2] == ["derive-ahead"]


def test_a_key_file_open_derives_nothing_ahead(repo, tmp_path, derivations):
    cache = tmp_path / "cache"
    opened(repo, cache)  # the copy is made
    with open_key_manager(str(repo), cache_dir=cache) as keys:
        keys.export_recovery(keys.unlock(Unattended()), tmp_path / "r.pem", "vault")
    pem = (tmp_path / "r.pem").read_bytes()
    asked: list[int] = []

    class Counted(Unattended):
        def __call__(self) -> bytes:
            asked.append(1)
            return super().__call__()

    derivations.clear()
    open_repository(str(repo), cache_dir=cache, passphrase=Counted(),
                    key_file=lambda: (pem, "r.pem")).close()
    assert derivations == [] and asked == []


@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/zero", "huge"])
def test_a_copy_that_is_not_a_small_regular_file_is_not_read(repo, tmp_path, derivations, kind):
    """A FIFO (which would block), a symlink (which would be followed) or a file larger than
    any slot in place of the copy: ignored, the open derives as without one."""
    cache = tmp_path / "cache"
    hint = unlock_hint(str(repo), cache)
    hint.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(hint)
    elif kind == "huge":
        hint.write_bytes(bytes(1 << 20))
    else:
        hint.symlink_to("/dev/zero")
    done = threading.Event()

    def open_it() -> None:
        opened(repo, cache)
        done.set()

    threading.Thread(target=open_it, name="opening", daemon=True).start()
    finished = done.wait(20)
    if not finished and kind == "fifo":  # let the blocked reader go
        os.close(os.open(hint, os.O_WRONLY | os.O_NONBLOCK))
    assert finished, f"the open blocked on a {kind} in place of the copy"
    assert [name for name, _ in derivations] == ["opening"]  # not ahead: by the opening itself
