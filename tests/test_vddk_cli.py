"""`repo-engine backup vddk` through the fake libvixDiskLib, then `repo-engine restore`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fake_vddk
from helpers import MIB, DiskModel, cli, disk_of, restore_bytes, write_extents

PASSWORD = "pa55 w0rd!"


@pytest.fixture(scope="session")
def libs(tmp_path_factory):
    return fake_vddk.build(tmp_path_factory.getbasetemp())


@pytest.fixture
def setup(libs, tmp_path, monkeypatch, capsys):
    """A repository, a datastore root with two disks, the fake's expectations in the env."""
    fake = fake_vddk.Fake(libs["full"], tmp_path / "datastores")
    fake.env(monkeypatch)
    (tmp_path / "expected.pw").write_text(PASSWORD + "\n")
    monkeypatch.setenv("FAKE_VDDK_PASSWORD_FILE", str(tmp_path / "expected.pw"))
    monkeypatch.setenv("FAKE_VDDK_USER", "backup@vsphere.local")
    monkeypatch.setenv("VC_PASSWORD", PASSWORD)
    # in this process: no re-exec (the fake does not need LD_LIBRARY_PATH; a subprocess test does)
    monkeypatch.setenv("LD_LIBRARY_PATH", str(libs["full"] / "lib64"))
    rng = np.random.default_rng(11)
    disks = {"2000": DiskModel(fake.disk_file("ds1", "web1/web1.vmdk"), 6 * MIB + 512 * 3, rng),
             "2001": DiskModel(fake.disk_file("ds2", "web1/data.vmdk"), 2 * MIB, rng)}
    for model in disks.values():
        model.random_changes(5)
    repo = tmp_path / "repo"
    result = cli(capsys, "init", repo, "--block-size", "64KiB", "--pack-size", "1MiB")
    assert result.code == 0, result.err
    return fake, repo, disks


def backup_args(fake, repo, **extra) -> list[object]:
    args = ["backup", "vddk", repo, "--vm", "web1", "--server", "vc.test",
            "--user", "backup@vsphere.local", "--password-env", "VC_PASSWORD",
            "--vmx-spec", "moref=vm-16", "--snapshot", "snapshot-7",
            "--thumbprint", fake_vddk.THUMBPRINT, "--transports", "nbdssl:nbd",
            "--vddk-libdir", fake.libdir, "--json",
            "--disk", "2000=[ds1] web1/web1.vmdk", "--disk", "2001=[ds2] web1/data.vmdk"]
    for name, value in extra.items():
        args += [f"--{name.replace('_', '-')}", value]
    return args


def test_backup_then_restore_gives_identical_bytes(setup, capsys, tmp_path):
    fake, repo, disks = setup
    result = cli(capsys, *backup_args(fake, repo))
    assert result.code == 0, result.err
    first = result.json()["point"]
    assert disk_of(first, "2000")["read_mode"] == "allocated"
    for key, model in disks.items():
        assert restore_bytes(capsys, repo, first["id"][:8], key, tmp_path / "out.img") \
            == model.copy_of_content()
    shown = cli(capsys, "points", repo, "--json").json()["points"]
    assert len(shown) == 1 and shown[0]["source"] == "vddk"
    assert PASSWORD not in json.dumps(shown)

    # a second backup with a change list: a delta that restores to the new bytes
    changes = disks["2000"].random_changes(3)
    extents = write_extents(tmp_path / "changes.json", changes)
    result = cli(capsys, *backup_args(fake, repo), "--changed", f"2000={extents}")
    assert result.code == 0, result.err
    second = result.json()["point"]
    assert disk_of(second, "2000")["read_mode"] == "changed"
    for key, model in disks.items():
        assert restore_bytes(capsys, repo, second["id"][:8], key, tmp_path / "out.img") \
            == model.copy_of_content()


def test_backup_into_an_encrypted_repository(setup, capsys, tmp_path, monkeypatch):
    """The same backup into an encrypted repository (its passphrase from the environment):
    every disk restores byte for byte, and no stored map, manifest or journal entry names the
    VM."""
    from repo_engine.repository.crypto import slots
    from test_crypto_keys import SMALL

    fake, _plain, disks = setup
    monkeypatch.setattr(slots, "DEFAULT_SCRYPT", SMALL)
    monkeypatch.setenv("REPO_ENGINE_PASSWORD", "vault phrase")
    monkeypatch.setenv("REPO_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    repo = tmp_path / "sealed"
    assert cli(capsys, "init", repo, "--encryption", "--block-size", "64KiB").code == 0
    result = cli(capsys, *backup_args(fake, repo))
    assert result.code == 0, result.err
    point = result.json()["point"]["id"][:8]
    for key, model in disks.items():
        assert restore_bytes(capsys, repo, point, key, tmp_path / "out.img") \
            == model.copy_of_content()
    assert not [p for p in repo.rglob("*") if p.is_file() and p.parts[-3] != "packs"
                and b"web1" in p.read_bytes()]


def test_backup_keeps_the_full_queue_of_reads_in_flight(setup, capsys, monkeypatch, tmp_path):
    """A disk read through VDDK is read in batches large enough for every request of the queue
    (16 by default) to be in flight at once: over a network each batch pays one round trip."""
    fake, repo, disks = setup
    disks["2000"].write(0, np.random.default_rng(5).bytes(6 * MIB))  # 6 contiguous 1 MiB reads
    trace = tmp_path / "trace"
    monkeypatch.setenv("FAKE_VDDK_TRACE", str(trace))
    result = cli(capsys, *backup_args(fake, repo))
    assert result.code == 0, result.err
    closes = [line.split() for line in trace.read_text().splitlines() if line.startswith("close")]
    in_flight = [int(item.split("=")[1]) for line in closes for item in line
                 if item.startswith("max_in_flight=")]
    assert max(in_flight) >= 6, closes
    assert restore_bytes(capsys, repo, result.json()["point"]["id"][:8], "2000",
                         tmp_path / "out.img") == disks["2000"].copy_of_content()


@pytest.mark.parametrize("faults, text", [
    ("read_fail=3:14011", "The network connection to the host was lost (VIX error 14011)"),
    ("drop_after=2", "The network connection to the host was lost (VIX error 14011)"),
    ("read_fail=2:1", "Unknown error (VIX error 1)"),
])
def test_failing_read_mid_disk_stores_no_point(setup, capsys, monkeypatch, faults, text):
    fake, repo, _ = setup
    fake.env(monkeypatch, faults)
    result = cli(capsys, *backup_args(fake, repo))
    assert result.code == 1
    assert "repo-engine: error: reading [ds1] web1/web1.vmdk on vc.test (nbdssl) failed" \
        in result.err
    assert "VixDiskLib_ReadAsync" in result.err and text in result.err
    assert PASSWORD not in result.err
    assert cli(capsys, "points", repo, "--json").json()["points"] == []


@pytest.mark.parametrize("faults, failed", [
    (None, "cannot open [ds1] web1/web1.vmdk on vc.test: VixDiskLib_Open"),
    ("login_at_connect=1", "cannot connect to vc.test for [ds1] web1/web1.vmdk: "
                           "VixDiskLib_ConnectEx"),
])
def test_wrong_thumbprint_is_a_clear_error(setup, capsys, monkeypatch, faults, failed):
    """Whichever call VDDK checks the certificate in, one line names the likely cause and how
    to check the thumbprint."""
    fake, repo, _ = setup
    fake.env(monkeypatch, faults)
    args = backup_args(fake, repo)
    args[args.index("--thumbprint") + 1] = "00:" * 19 + "00"
    result = cli(capsys, *args)
    assert result.code == 1
    assert result.err.splitlines() == [
        f"repo-engine: error: disk 2000: {failed}: Unknown error (VIX error 1); the likely "
        "cause: the server's certificate thumbprint does not match the one given "
        f"({'00:' * 19}00), or the user name or password is wrong; check the thumbprint with: "
        "openssl s_client -connect vc.test:443 </dev/null | openssl x509 -noout -fingerprint "
        "-sha1"]
    assert cli(capsys, "points", repo, "--json").json()["points"] == []


def test_password_file_and_wrong_password(setup, capsys, tmp_path):
    fake, repo, _ = setup
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    args = backup_args(fake, repo)
    i = args.index("--password-env")
    args[i:i + 2] = ["--password-file", tmp_path / "pw"]
    assert cli(capsys, *args).code == 0
    (tmp_path / "pw").write_text("wrong\n")
    result = cli(capsys, *args)
    assert result.code == 1 and "VixDiskLib_Open" in result.err


def test_usage_errors(setup, capsys, monkeypatch):
    fake, repo, _ = setup
    args = backup_args(fake, repo)
    i = args.index("--password-env")
    no_password = args[:i] + args[i + 2:]
    result = cli(capsys, *no_password)
    assert result.code == 2 and "--password-file FILE or --password-env VAR" in result.err
    monkeypatch.delenv("VC_PASSWORD")
    result = cli(capsys, *args)
    assert result.code == 2 and "VC_PASSWORD is not set" in result.err
    j = args.index("--vddk-libdir")
    monkeypatch.delenv("VDDK_LIBDIR", raising=False)
    result = cli(capsys, *(args[:j] + args[j + 2:]))
    assert result.code == 2 and "VDDK_LIBDIR" in result.err
    monkeypatch.setenv("VC_PASSWORD", PASSWORD)
    result = cli(capsys, *args[:-2], "--disk", "2001=web1/data.vmdk")
    assert result.code == 2 and "not a datastore path" in result.err


@pytest.mark.parametrize("how", ["env", "file"])
def test_cli_reexecs_with_ld_library_path_and_no_visible_secret(setup, tmp_path, how):
    """As a real process: the fake refuses InitEx unless its lib64 is on LD_LIBRARY_PATH (so
    the CLI must re-execute itself) and aborts if the password shows in /proc/self/cmdline or
    /proc/self/environ of the process that connects."""
    fake, repo, disks = setup
    args = [str(a) for a in backup_args(fake, repo)]
    if how == "file":
        (tmp_path / "pw").write_text(PASSWORD + "\n")
        i = args.index("--password-env")
        args[i:i + 2] = ["--password-file", str(tmp_path / "pw")]
    env = dict(os.environ, FAKE_VDDK_REQUIRE_LD_PATH="1", FAKE_VDDK_SECRET_SCAN="1")
    env.pop("LD_LIBRARY_PATH")
    if how == "file":
        env.pop("VC_PASSWORD")
    r = subprocess.run([sys.executable, "-m", "repo_engine", *args], env=env,
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    point = json.loads(r.stdout)["point"]["id"]
    assert restore_bytes_subprocess(repo, point, tmp_path) == disks["2000"].copy_of_content()


def restore_bytes_subprocess(repo: Path, point: str, tmp_path: Path) -> bytes:
    target = tmp_path / "restored.img"
    r = subprocess.run([sys.executable, "-m", "repo_engine", "restore", str(repo), point[:8],
                        "--disk", "2000", "--to", str(target)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return target.read_bytes()


def test_a_passphrase_piped_on_stdin_reaches_the_reexecuted_command(setup, tmp_path, capsys,
                                                                    monkeypatch):
    """A host that opened the repository before keeps a copy of its slot, so the command reads
    the passphrase from stdin as it parses its arguments, before it re-executes itself: the
    child, whose stdin is then empty, gets it through an inherited pipe."""
    fake, _, disks = setup
    monkeypatch.setenv("REPO_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    repo = tmp_path / "encrypted"
    (tmp_path / "repo.pass").write_bytes(b"correct horse\n")
    for args in (("init", repo, "--encryption"), ("points", repo)):
        result = cli(capsys, *args, "--passphrase-file", tmp_path / "repo.pass")
        assert result.code == 0, result.err
    env = dict(os.environ, FAKE_VDDK_REQUIRE_LD_PATH="1")
    env.pop("LD_LIBRARY_PATH")
    args = [str(a) for a in backup_args(fake, repo, passphrase_file="/dev/stdin")]
    r = subprocess.run([sys.executable, "-m", "repo_engine", *args], env=env,
                       input="correct horse\n", capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    point = json.loads(r.stdout)["point"]["id"]
    env["REPO_ENGINE_PASSWORD"] = "correct horse"
    target = tmp_path / "restored.img"
    r = subprocess.run([sys.executable, "-m", "repo_engine", "restore", str(repo), point[:8],
                        "--disk", "2000", "--to", str(target)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == disks["2000"].copy_of_content()
