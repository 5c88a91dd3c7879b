"""`backup vsphere` end to end: pyvmomi speaks SOAP to govmomi's simulator (tests/vcsim) on
127.0.0.1, and vddk_ext reads the simulator's datastore files through the fake libvixDiskLib
(tests/fake_vddk). Nothing of repo-engine is mocked."""

from __future__ import annotations

import pytest

from helpers import KIB, MIB, disk_of
from vcsim.fixtures import BS, VM, make_env, pattern, vcsim_binary, vddk_libdir  # noqa: F401
from vcsim.fixtures import env  # noqa: F401


def test_full_then_three_incrementals_read_only_changes(env):
    key = str(env.sim.disk(VM)["key"])
    env.sim.write(VM, 0, pattern(1, 200 * KIB))
    env.sim.write(VM, 3 * MIB, pattern(2, 100 * KIB))
    expected = [env.sim.read(VM)]
    first = env.backup()
    disk = disk_of(first["point"], key)
    assert disk["read_mode"] == "allocated" and disk["kind"] == "full"
    # allocated data: blocks 0-3 (200 KiB) and 48-49 (100 KiB from 3 MiB)
    assert first["backup"]["bytes_read"] == 6 * BS
    assert env.sectors_read() * 512 == 6 * BS
    points = [first["point"]["id"]]
    writes = [[(64 * KIB + 10, 5)], [(2 * MIB, 128 * KIB), (4 * MIB - 100, 100)],
              [(0, 1), (1 * MIB + 3, 70 * KIB)]]
    for n, extents in enumerate(writes):
        blocks = set()
        for offset, length in extents:
            env.sim.write(VM, offset, pattern(10 + n, length))
            blocks.update(range(offset // BS, (offset + length - 1) // BS + 1))
        expected.append(env.sim.read(VM))
        point = env.backup()
        disk = disk_of(point["point"], key)
        assert disk["read_mode"] == "changed" and disk["kind"] == "delta", disk
        assert point["backup"]["bytes_read"] == len(blocks) * BS
        assert env.sectors_read() * 512 == len(blocks) * BS
        points.append(point["point"]["id"])
    for point, content in zip(points, expected):
        assert env.restore_image(point, key) == content
    assert env.snapshots() == []
    shown = env.show(points[-1])
    assert shown["source"] == "vsphere" and shown["consistency"] == "file"
    assert shown["disks"][0]["cursor"].endswith("/5")   # one changeId per snapshot


def _wait(task) -> None:   # noqa: ANN001
    from pyVim.task import WaitForTask

    WaitForTask(task)


def test_paging_across_several_replies(make_env):
    env = make_env(cbt_window=1 * MIB)   # the 4 MiB disk takes four replies
    key = str(env.sim.disk(VM)["key"])
    env.sim.write(VM, 10, pattern(3, 1000))
    env.sim.write(VM, 4 * MIB - 70 * KIB, pattern(4, 70 * KIB))   # in the last reply only
    first = env.backup()
    assert first["backup"]["bytes_read"] == 3 * BS
    config = env.show(first["point"]["id"])["config"]["vsphere"]
    assert config["disks"][key]["cbt_replies"] == 4
    env.sim.write(VM, 3 * MIB + 5, b"late")
    env.sim.write(VM, 1 * MIB - 1, b"xy")   # straddles the first two replies
    expected = env.sim.read(VM)
    second = env.backup()
    assert second["backup"]["bytes_read"] == 3 * BS
    assert env.show(second["point"]["id"])["config"]["vsphere"]["disks"][key]["cbt_replies"] == 4
    assert env.restore_image(second["point"]["id"], key) == expected


def test_invalid_change_id_falls_back_to_a_full_read(env):
    key = str(env.sim.disk(VM)["key"])
    env.sim.write(VM, 0, pattern(5, 300 * KIB))
    env.backup()
    env.sim.control(vm=VM, cbt_reset=True)   # vSphere forgot every changeId it handed out
    env.sim.write(VM, 2 * MIB, b"after the reset")
    expected = env.sim.read(VM)
    point = env.backup()
    disk = disk_of(point["point"], key)
    assert disk["read_mode"] == "full"
    assert "rejected the stored changeId (changeId" in disk["note"]
    assert point["backup"]["bytes_read"] == 4 * MIB
    assert env.restore_image(point["point"]["id"], key) == expected
    # the new changeId works again
    assert disk_of(env.backup()["point"], key)["read_mode"] == "changed"


def test_cbt_turned_off_and_on_changes_the_uuid(env):
    key = str(env.sim.disk(VM)["key"])
    env.sim.write(VM, 0, pattern(6, 100 * KIB))
    env.backup()
    with env.sim.session() as content:
        from pyVmomi import vim

        vm = vcsim_find(content)
        _wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=False)))
    point = env.backup()
    assert any("Changed Block Tracking was off: enabled it" in n
               for n in env.show(point["point"]["id"])["notes"])
    assert disk_of(point["point"], key)["read_mode"] == "full"
    assert "UUID differs" in disk_of(point["point"], key)["note"]


def vcsim_find(content, name: str = VM):   # noqa: ANN001, ANN201
    import vcsim

    return vcsim.find(content, name)


def test_grown_disk_gives_the_right_map(env):
    key = str(env.sim.disk(VM)["key"])
    env.sim.write(VM, 1 * MIB, pattern(7, 200 * KIB))
    first = env.backup()
    with env.sim.session() as content:
        from pyVmomi import vim

        vm = vcsim_find(content)
        disk = next(d for d in vm.config.hardware.device
                    if isinstance(d, vim.vm.device.VirtualDisk))
        disk.capacityInKB = 6 * 1024
        disk.capacityInBytes = 6 * MIB
        change = vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)
        _wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[change])))
    env.sim.write(VM, 5 * MIB, pattern(8, 64 * KIB))
    env.sim.write(VM, 1 * MIB, b"changed too")
    expected = env.sim.read(VM)
    assert len(expected) == 6 * MIB
    grown = env.backup()
    disk = disk_of(grown["point"], key)
    assert "resized from 4194304 to 6291456 bytes" in disk["note"]
    assert disk["read_mode"] == "full"
    shown = env.show(grown["point"]["id"])
    assert shown["disks"][0]["capacity"] == 6 * MIB
    assert env.restore_image(grown["point"]["id"], key) == expected
    assert len(env.restore_image(first["point"]["id"], key)) == 4 * MIB
    after = env.backup()
    assert disk_of(after["point"], key)["read_mode"] == "changed"
    assert after["backup"]["bytes_read"] == 0


def test_quiesce_fault_gives_a_crash_consistent_point(env):
    env.sim.write(VM, 0, pattern(9, 64 * KIB))
    env.sim.control(vm=VM, quiesce_fault=True)
    point = env.backup()
    shown = env.show(point["point"]["id"])
    assert shown["consistency"] == "crash"
    assert any("could not quiesce (ApplicationQuiesceFault" in n for n in shown["notes"])
    assert env.snapshots() == []
    env.sim.control(vm=VM, quiesce_fault=False)
    assert env.show(env.backup()["point"]["id"])["consistency"] == "file"
    assert env.show(env.backup("--no-quiesce")["point"]["id"])["consistency"] == "crash"


def test_vddk_read_failing_mid_disk_stores_nothing(env, monkeypatch):
    env.sim.write(VM, 0, pattern(10, 4 * MIB))
    monkeypatch.setenv("FAKE_VDDK_FAULTS", "read_fail=2:1")
    result = env.backup(ok=False)
    assert result.code == 1
    assert "no restore point was stored; snapshot 'repo-engine-backup-" in result.err
    assert result.err.rstrip().endswith("' was removed")
    assert "Traceback" not in result.err
    assert env.snapshots() == []
    listed = env.run("points", env.repo, "--json")
    assert listed.code == 0 and listed.json()["points"] == []
    monkeypatch.delenv("FAKE_VDDK_FAULTS")
    assert env.backup()["backup"]["bytes_read"] == 4 * MIB


@pytest.mark.parametrize("call", ["QueryChangedDiskAreas", "RemoveSnapshot_Task"])
def test_connection_lost_mid_backup_says_what_is_left(env, call):
    env.sim.write(VM, 0, pattern(15, 256 * KIB))
    env.backup()
    env.sim.write(VM, 1 * MIB, pattern(16, 64 * KIB))
    env.sim.control(drop_at=call)
    result = env.backup(ok=False)
    assert result.code == 1
    [line] = result.err.strip().splitlines()
    [snap] = env.snapshots()
    if call == "QueryChangedDiskAreas":
        assert "no restore point was stored" in line
        assert line.endswith(f"snapshot {snap!r} of {VM} is left: the next run removes it (or "
                             "delete it in vSphere)")
    else:
        assert line.endswith(f"the backup itself completed, but could not remove snapshot "
                             f"{snap!r} of {VM}: the connection was lost; the next run removes it")
    listed = env.run("points", env.repo, "--json")
    assert len(listed.json()["points"]) == (2 if call == "RemoveSnapshot_Task" else 1)
    env.sim.control(drop_at="")
    env.backup()
    assert env.snapshots() == []


def test_vm_is_prepared_for_access_around_the_disk_reads(env, monkeypatch):
    """PrepareForAccess (vCenter: no migration) before the first Open, EndAccess after the
    last Close; the fake refuses Open without it. EndAccess runs when the backup fails too."""
    monkeypatch.setenv("FAKE_VDDK_REQUIRE_PREPARE", "1")
    env.sim.write(VM, 0, pattern(13, 256 * KIB))
    env.backup()
    calls = [line.split()[:2] for line in env.trace.read_text().splitlines()]
    names = [c[0] for c in calls]
    assert names.count("prepare") == 1 and names.count("end_access") == 1
    prepare, end = names.index("prepare"), names.index("end_access")
    opens = [i for i, n in enumerate(names) if n == "open"]
    closes = [i for i, n in enumerate(names) if n == "close"]
    assert opens and prepare < opens[0] and closes[-1] < end
    assert calls[prepare][1] == calls[end][1] and calls[prepare][1].startswith("moref=vm-")
    env.sim.write(VM, 1 * MIB, pattern(14, 128 * KIB))
    monkeypatch.setenv("FAKE_VDDK_FAULTS", "read_fail=1:1")
    result = env.backup(ok=False)
    assert result.code == 1 and "no restore point was stored" in result.err, result.err
    names = [line.split()[0] for line in env.trace.read_text().splitlines()]
    assert names.count("prepare") == 1 and names.count("end_access") == 1
    assert "read" in names
    assert names.index("end_access") > max(i for i, n in enumerate(names) if n == "close")
    # PrepareForAccess refused (say, no privilege to disable migration): the backup goes on
    monkeypatch.setenv("FAKE_VDDK_FAULTS", "prepare_fail=1")
    monkeypatch.delenv("FAKE_VDDK_REQUIRE_PREPARE")
    point = env.backup()
    notes = env.show(point["point"]["id"])["notes"]
    assert any(n.startswith("PrepareForAccess failed") for n in notes), notes
    assert env.snapshots() == []


def test_leftover_snapshots_of_ours_are_removed(env):
    with env.sim.session() as content:
        vm = vcsim_find(content)
        _wait(vm.CreateSnapshot_Task(name="repo-engine-backup-crashed", description="",
                                     memory=False, quiesce=False))
        _wait(vm.CreateSnapshot_Task(name="admin-snapshot", description="", memory=False,
                                     quiesce=False))
    point = env.backup()
    notes = env.show(point["point"]["id"])["notes"]
    assert "removed leftover snapshot repo-engine-backup-crashed" in notes
    assert env.snapshots() == ["admin-snapshot"]


def test_a_second_backup_of_a_vm_leaves_the_running_ones_snapshot_alone(env):
    """While a backup of the VM runs (its VM lock held, its snapshot taken), another backup of
    that VM is refused before it touches the VM: the running backup's snapshot stays."""
    from repo_engine.repository.repo import Repository

    with env.sim.session() as content:
        _wait(vcsim_find(content).CreateSnapshot_Task(
            name="repo-engine-backup-running", description="", memory=False, quiesce=False))
    with Repository.open(env.repo) as repo, repo.vm_lock(VM, f"backup {VM}"):
        result = env.backup(ok=False)
    assert result.code == 1
    assert result.err.startswith(f"repo-engine: error: VM '{VM}' is being backed up by "
                                 f"'backup {VM}', pid ")
    assert len(result.err.splitlines()) == 1
    assert env.snapshots() == ["repo-engine-backup-running"]


def test_interrupt_inside_the_backup_removes_the_snapshot(env, monkeypatch):
    from repo_engine.repository.repo import Repository
    from repo_engine.sources.vsphere.connection import connect
    from repo_engine.sources.vsphere.inventory import find_vm
    from repo_engine.sources.vsphere.settings import merge
    from repo_engine.sources.vsphere.source import DataPlane, frozen_vm

    settings = merge({"server": env.sim.host, "port": env.sim.port, "user": "user",
                      "password_file": str(env.sim.password_file),
                      "thumbprint": env.sim.thumbprint}, None)
    repo = Repository.open(env.repo)
    try:
        with connect(settings, "pass") as conn:
            vm = find_vm(conn.content, VM)
            with pytest.raises(KeyboardInterrupt):
                with frozen_vm(conn, vm, repo, plane=DataPlane(libdir=env.libdir)) as frozen:
                    assert frozen.snapshot.disks and env.snapshots()[0].startswith("repo-engine-")
                    raise KeyboardInterrupt
    finally:
        repo.close()
    assert env.snapshots() == []


def test_config_file_holds_every_setting(env):
    env.sim.write(VM, 0, pattern(11, 64 * KIB))
    config = env.tmp / "job.toml"
    config.write_text(
        f'server = "{env.sim.host}"\nport = {env.sim.port}\nuser = "user"\n'
        f'password-file = "{env.sim.password_file}"\nthumbprint = "{env.sim.thumbprint}"\n'
        f'vm = "{VM}"\nvddk-libdir = "{env.libdir}"\ntransports = "nbdssl:nbd"\n'
        f'tags = ["nightly"]\n')
    result = env.run("backup", "vsphere", env.repo, "--config", config, "--json")
    assert result.code == 0, result.err
    assert env.show(result.json()["point"]["id"])["tags"] == ["nightly"]
    bad = env.tmp / "bad.toml"
    bad.write_text('server = "x"\npasword-file = "typo"\n')
    result = env.run("backup", "vsphere", env.repo, "--config", bad)
    assert result.code == 2 and "unknown key 'pasword-file'" in result.err


def test_nightly_job_as_a_process_keeps_the_password_secret(make_env, tmp_path):
    """The real entry point: re-executes with VDDK on LD_LIBRARY_PATH (the fake insists), and
    the password is neither on a command line nor in an environment (the fake scans both)."""
    import os
    import subprocess
    import sys

    env = make_env(password="Zq9-nightly-secret-77")
    env.sim.write(VM, 0, pattern(12, 128 * KIB))
    config = tmp_path / "nightly.toml"
    config.write_text(
        f'server = "{env.sim.host}"\nport = {env.sim.port}\nuser = "user"\n'
        f'password-env = "VC_PASSWORD"\nthumbprint = "{env.sim.thumbprint}"\n'
        f'vm = "{VM}"\nvddk-libdir = "{env.libdir}"\n')
    child_env = dict(os.environ, VC_PASSWORD="Zq9-nightly-secret-77",
                     FAKE_VDDK_REQUIRE_LD_PATH="1", FAKE_VDDK_SECRET_SCAN="1")
    child_env.pop("LD_LIBRARY_PATH", None)
    done = subprocess.run([sys.executable, "-m", "repo_engine", "backup", "vsphere", str(env.repo),
                           "--config", str(config), "--json"],
                          capture_output=True, text=True, env=child_env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert env.snapshots() == []
    import json
    assert json.loads(done.stdout)["backup"]["bytes_read"] == 2 * BS
