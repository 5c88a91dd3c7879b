"""`backup vsphere` and `restore vsphere` on an encrypted repository, against the simulator
(tests/vcsim) and the fake VDDK (tests/fake_vddk): a full and a Changed Block Tracking
incremental restore byte for byte (to a file, `--onto` the older image, and into the VM, whose
sealed mark then asks for a full read), opened by a passphrase or by a key file, and no file of the repository holds a byte of the disk's
data, the VM's name or the disk's key in the clear."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import KIB, MIB, disk_of
from repo_engine.cli import passphrase
from repo_engine.repository.crypto import slots
from test_crypto_keys import SMALL
from vcsim.fixtures import BS, VM, Env, make_env, pattern, vcsim_binary, vddk_libdir  # noqa: F401

# Random bytes around a marker: stored as they are in an unencrypted pack (no compression wins).
MARKERS = (b"vsphere-full-marker-5b1d9e", b"vsphere-incremental-marker-c07a44")


def marked(n: int, length: int) -> bytes:
    data = bytearray(pattern(40 + n, length))
    data[length // 2:length // 2 + len(MARKERS[n])] = MARKERS[n]
    return bytes(data)


@pytest.fixture(params=["passphrase", "key-file"])
def sealed(request, make_env, monkeypatch, tmp_path) -> Env:
    """The simulator and an encrypted repository, every command opening it by the passphrase in
    $REPO_ENGINE_PASSWORD, or by the recovery key file in $REPO_ENGINE_KEY_FILE (and no
    passphrase source at all)."""
    monkeypatch.setattr(slots, "DEFAULT_SCRYPT", SMALL)
    monkeypatch.setattr(passphrase, "on_terminal", lambda: False)
    monkeypatch.delenv(passphrase.FILE_ENV, raising=False)
    monkeypatch.setenv(passphrase.VALUE_ENV, "vsphere vault phrase")
    env = make_env("--encryption")
    if request.param == "key-file":
        key_file = tmp_path / "host.pem"
        assert env.run("key", "export-recovery", env.repo, "--out", key_file).code == 0
        monkeypatch.delenv(passphrase.VALUE_ENV)
        monkeypatch.setenv(passphrase.KEY_FILE_ENV, str(key_file))
    return env


def in_clear(repo: Path, needles: list[bytes]) -> list[str]:
    """Every file of `repo` (packs too) that holds one of `needles`, with the needle."""
    return [f"{path.relative_to(repo)}: {needle!r}"
            for path in sorted(p for p in repo.rglob("*") if p.is_file())
            for needle in needles if needle in path.read_bytes()]


def test_full_and_incremental_restore_with_nothing_in_clear(sealed):
    env = sealed
    key = str(env.sim.disk(VM)["key"])
    env.sim.write(VM, 0, marked(0, 256 * KIB))
    full_content = env.sim.read(VM)
    full = env.backup()
    assert disk_of(full["point"], key)["kind"] == "full"
    env.sim.write(VM, 2 * MIB + 100, marked(1, 2 * BS))
    incr_content = env.sim.read(VM)
    incr = env.backup()
    disk = disk_of(incr["point"], key)
    assert (disk["read_mode"], disk["kind"]) == ("changed", "delta")
    assert incr["backup"]["bytes_read"] == 3 * BS
    first, second = full["point"]["id"], incr["point"]["id"]

    assert env.restore_image(first, key) == full_content
    assert env.restore_image(second, key) == incr_content
    onto = env.tmp / f"restored-{first}-{key}.img"   # holds the full point's image
    result = env.run("restore", "image", env.repo, second, "--disk", key, "--onto", onto,
                     "--base", first)
    assert result.code == 0, result.err
    assert onto.read_bytes() == incr_content

    env.power_off()
    result = env.restore(first, "--in-place")
    assert result.code == 0, result.err
    assert env.sim.read(VM) == full_content
    assert env.snapshots() == []
    after = env.backup()   # the VM's mark, sealed, says a restore wrote to it: a full read
    assert "a restore wrote to the VM" in disk_of(after["point"], key)["note"]
    assert env.restore_image(after["point"]["id"], key) == full_content
    env.sim.write(VM, 0, b"x")
    assert disk_of(env.backup()["point"], key)["read_mode"] == "changed"   # the mark cleared
    assert in_clear(env.repo, [*MARKERS, VM.encode(), f'"{key}"'.encode()]) == []
