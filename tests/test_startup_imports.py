"""Commands on a local repository load only the modules they use: a small incremental's run time
is mostly the interpreter's start-up, so the vSphere client and CLI, the maintenance modules, the
S3 store and settings, the shared repository's journal replay and leases, and the encryption
library (an unencrypted repository never asks for a passphrase) must stay unloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import MIB, write_extents

# Run in a fresh interpreter (the test process has imported everything already).
SCRIPT = """
import json, sys
from repo_engine.cli.main import run
for argv in json.loads(sys.argv[1]):
    if run(argv) != 0:
        sys.exit(f"command failed: {argv}")
print(json.dumps(sorted(sys.modules)))
"""
# Never needed on a local repository by an image backup without damaged chunks, nor by `points`.
UNUSED = ("pyVmomi", "pyVim", "repo_engine.maintenance", "repo_engine.sources.vsphere",
          "repo_engine.sources.vddk_disk", "repo_engine.restore", "repo_engine.cli.vsphere_cmd",
          "repo_engine.cli.vddk_env", "repo_engine.cli.maintenance_cmd",
          "repo_engine.repository.store.s3", "repo_engine.repository.leases",
          "repo_engine.repository.checkpoint", "boto3", "botocore", "tomllib",
          # encryption: only an encrypted repository and the key commands load them
          "cryptography", "repo_engine.repository.crypto.seal",
          "repo_engine.repository.crypto.access", "repo_engine.repository.crypto.manage",
          "repo_engine.cli.key_cmd",
          # np.unique imports it to ask whether an array is masked
          "numpy.ma")


def loaded_after(commands: list[list[str]], env: dict[str, str] | None = None) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(commands)],
                          capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.splitlines()[-1])


def unused(modules: list[str]) -> list[str]:
    return [m for m in modules if m in UNUSED or m.startswith(tuple(u + "." for u in UNUSED))]


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A repository holding one point of a 4 MiB image, the image, and the `backup` command that
    made the point."""
    repo, image = tmp_path / "repo", tmp_path / "disk.img"
    data = bytearray(4 * MIB)
    data[:MIB] = bytes(range(256)) * (MIB // 256)
    image.write_bytes(bytes(data))
    backup = ["backup", "image", str(repo), "--vm", "vm", "--disk", f"sda={image}", "--json"]
    subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([["init", str(repo)], backup])],
                   capture_output=True, text=True, check=True)
    return repo, image, backup


def test_image_backups_leave_unused_modules_unloaded(
        tmp_path: Path, backed_up: tuple[Path, Path, list[str]]) -> None:
    _, image, backup = backed_up
    changed = write_extents(tmp_path / "changed.json", [[0, 64 * 1024]])
    # a full backup, then an incremental whose changed block is new: a pack, a map and a point
    # are committed, the whole write path runs
    with image.open("r+b") as f:
        f.write(b"\x01" * 1024)
    modules = loaded_after([backup, [*backup[:-1], "--changed", f"sda={changed}", "--json"]])
    assert "repo_engine.backup.job" in modules   # the backup did run in this interpreter
    assert "repo_engine.repository.packs" in modules
    assert unused(modules) == []


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_points_leaves_unused_modules_unloaded(backed_up: tuple[Path, Path, list[str]],
                                               json_flag: list[str]) -> None:
    repo, _, _ = backed_up
    modules = loaded_after([["points", str(repo), *json_flag]])
    assert "repo_engine.repository.index" in modules   # it did read the catalog
    assert unused(modules) == []


# help names every command (each module is imported for its short help) but loads no engine
ENGINE = ("numpy", "lmdb", "zstandard", "repo_engine.repository.repo", "repo_engine.backup",
          "pyVmomi", "cryptography")


@pytest.mark.parametrize("command", [["--help"], ["backup", "--help"],
                                     ["backup", "image", "--help"], ["restore", "--help"],
                                     ["key", "recover", "--help"]])
def test_help_loads_no_engine(command: list[str]) -> None:
    modules = loaded_after([command])
    assert "repo_engine.cli.main" in modules
    assert [m for m in modules if m.startswith(ENGINE)] == []


# An encrypted repository opened by a key file needs the AEAD, HKDF and X25519, not the
# key-file formats of `serialization` (ssh, bcrypt, RSA...) nor strptime's locale machinery.
UNUSED_ENCRYPTED = ("cryptography.hazmat.primitives.serialization", "bcrypt", "_strptime",
                    "repo_engine.repository.crypto.manage", "repo_engine.cli.key_cmd")


def test_an_encrypted_repository_opened_by_a_key_file_loads_only_what_it_uses(tmp_path: Path):
    repo, image, key_file = tmp_path / "repo", tmp_path / "disk.img", tmp_path / "host.pem"
    image.write_bytes(bytes(range(256)) * (4 * MIB // 256))
    secret = tmp_path / "pass"
    secret.write_text("startup phrase\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPO_ENGINE_")}
    subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([
        ["init", str(repo), "--encryption", "--passphrase-file", str(secret)],
        ["key", "export-recovery", str(repo), "--out", str(key_file), "--passphrase-file",
         str(secret)]])], capture_output=True, text=True, check=True, env=env)
    backup = ["backup", "image", str(repo), "--vm", "vm", "--disk", f"sda={image}", "--json"]
    modules = loaded_after([backup, ["points", str(repo)]],
                           env={**env, "REPO_ENGINE_KEY_FILE": str(key_file)})
    assert "repo_engine.repository.crypto.access" in modules   # it did unlock the repository
    assert [m for m in modules if m.startswith(UNUSED_ENCRYPTED)] == []


def test_numpy_starts_no_thread_of_its_own(backed_up: tuple[Path, Path, list[str]]) -> None:
    """numpy's OpenBLAS would start a thread per core (spinning after each call) when it loads;
    nothing here multiplies matrices, so a command's only threads are its own."""
    repo, _, _ = backed_up
    script = SCRIPT.replace("print(json.dumps(sorted(sys.modules)))", (
        "import os, threading, numpy\n"
        "print(json.dumps([len(os.listdir('/proc/self/task')), threading.active_count()]))"))
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([["points", str(repo)]])],
                          capture_output=True, text=True, check=True,
                          env={k: v for k, v in os.environ.items() if "_NUM_THREADS" not in k})
    tasks, python_threads = json.loads(proc.stdout.splitlines()[-1])
    assert tasks == python_threads
