"""`restore vsphere` (in place and as a new VM), `vsphere vms`, and the errors a user meets, all
against the simulator (tests/vcsim) and the fake VDDK (tests/fake_vddk)."""

from __future__ import annotations

from pyVim.task import WaitForTask

from helpers import KIB, MIB, disk_of
from vcsim import find
from vcsim.fixtures import BS, VM, make_env, pattern, vcsim_binary, vddk_libdir  # noqa: F401
from vcsim.fixtures import env  # noqa: F401


def test_in_place_restore_writes_only_changes_and_forces_a_full_backup(env):
    key = str(env.sim.disk(VM)["key"])
    env.sim.write(VM, 0, pattern(20, 512 * KIB))
    wanted = env.sim.read(VM)
    first = env.backup()["point"]["id"]
    env.sim.write(VM, 100 * KIB, pattern(21, 10))          # block 1
    env.sim.write(VM, 3 * MIB, pattern(22, 2 * BS))        # blocks 48, 49
    env.backup()
    env.sim.write(VM, 2 * MIB + 1, b"after the last backup")   # block 32

    refused = env.restore(first, "--in-place")
    assert refused.code == 1 and "power it off" in refused.err
    env.power_off()
    result = env.restore(first, "--in-place")
    assert result.code == 0, result.err
    done = result.json()
    assert done["mode"] == "in-place" and done["vm"] == VM
    [disk] = done["disks"]
    assert disk["mode"] == "changed" and disk["blocks_written"] == 4
    assert env.sim.read(VM) == wanted
    assert env.snapshots() == []

    after = env.backup()
    assert disk_of(after["point"], key)["read_mode"] == "full"
    assert "a restore wrote to the VM" in disk_of(after["point"], key)["note"]
    assert env.restore_image(after["point"]["id"], key) == wanted
    env.sim.write(VM, 0, b"x")
    assert disk_of(env.backup()["point"], key)["read_mode"] == "changed"   # CBT is trusted again


def test_restore_as_new_vm_holds_the_point_bytes(env):
    env.sim.write(VM, 64 * KIB, pattern(30, 300 * KIB))
    env.sim.write(VM, 4 * MIB - 5, b"tail!")
    wanted = env.sim.read(VM)
    point = env.backup()["point"]["id"]
    env.sim.write(VM, 0, pattern(31, 1 * MIB))   # the source moves on
    result = env.restore(point, "--as-new", "restored-vm", "--datastore", "LocalDS_0")
    assert result.code == 0, result.err
    done = result.json()
    assert done["mode"] == "as-new" and done["vm"] == "restored-vm"
    assert env.sim.read("restored-vm") == wanted
    with env.sim.session() as content:
        vm = find(content, "restored-vm")
        assert vm.config.hardware.memoryMB == 32 and vm.config.guestId == "otherGuest"
    again = env.restore(point, "--as-new", "restored-vm", "--datastore", "LocalDS_0")
    assert again.code == 1 and "exists already" in again.err
    # the new VM backs up like any other
    assert env.backup(vm="restored-vm")["backup"]["bytes_read"] == 6 * BS


def test_vms_lists_cbt_state_and_disks(env):
    env.backup()
    result = env.run("vsphere", "vms", *env.sim.args(), "--json")
    assert result.code == 0, result.err
    vms = {vm["name"]: vm for vm in result.json()["vms"]}
    assert len(vms) == 4
    assert vms[VM]["cbt_enabled"] is True and vms["DC0_H0_VM1"]["cbt_enabled"] is False
    assert vms[VM]["disks"][0]["capacity"] == 4 * MIB
    assert vms[VM]["disks"][0]["change_id"]
    text = env.run("vsphere", "vms", *env.sim.args())
    assert text.code == 0 and "4 VMs" in text.out


def test_text_output_shows_names_escaped(env):
    """A VM name holding a C1 control (CSI) or a line separator reaches no terminal raw: not
    in `vsphere vms`, nor in `restore vsphere`'s lines, which name the VM and its disk files."""
    env.sim.write(VM, 0, pattern(40, 64 * KIB))
    point = env.backup()["point"]["id"]
    hostile = "web\x9b2J\u2028x"
    with env.sim.session() as content:
        WaitForTask(find(content, VM).Rename_Task(hostile))
    env.power_off(hostile)
    listed = env.run("vsphere", "vms", *env.sim.args())
    assert listed.code == 0, listed.err
    assert "web\\x9b2J\\u2028x  " in listed.out and listed.out.count("\n") == 6
    in_place = env.run("restore", "vsphere", env.repo, point, *env.sim.args(), "--vddk-libdir",
                       env.libdir, "--in-place")
    assert in_place.code == 0, in_place.err
    assert " in-place to VM web\\x9b2J\\u2028x (" in in_place.out
    as_new = env.run("restore", "vsphere", env.repo, point, *env.sim.args(), "--vddk-libdir",
                     env.libdir, "--as-new", "new\x9bvm\u2028", "--datastore", "LocalDS_0")
    assert as_new.code == 0, as_new.err
    assert " as-new to VM new\\x9bvm\\u2028 (" in as_new.out
    assert "new\\x9bvm\\u2028/" in as_new.out.splitlines()[1]   # the disk's file
    for out in (listed.out, in_place.out, as_new.out):
        assert "\x9b" not in out and "\u2028" not in out


def _args_without(env, option: str) -> list[str]:
    args = env.sim.args()
    i = args.index(option)
    return args[:i] + args[i + 2:]


def test_clear_errors(env):
    wrong = env.tmp / "wrong-password"
    wrong.write_text("not the password\n")
    args = _args_without(env, "--password-file") + ["--password-file", str(wrong)]
    result = env.run("backup", "vsphere", env.repo, *args, "--vm", VM, "--vddk-libdir", env.libdir)
    assert result.code == 1 and "wrong user name or password" in result.err

    result = env.backup(vm="no-such-vm", ok=False)
    assert result.code == 1 and "no VM named 'no-such-vm'" in result.err

    bad = "AA:" * 19 + "AA"
    args = _args_without(env, "--thumbprint") + ["--thumbprint", bad]
    result = env.run("backup", "vsphere", env.repo, *args, "--vm", VM, "--vddk-libdir", env.libdir)
    assert result.code == 1 and "does not match --thumbprint" in result.err
    assert env.sim.thumbprint in result.err

    args = _args_without(env, "--thumbprint")   # a self-signed certificate, not pinned
    result = env.run("backup", "vsphere", env.repo, *args, "--vm", VM, "--vddk-libdir", env.libdir)
    assert result.code == 1 and "is not trusted" in result.err

    env.sim.control(vm=VM, cbt_supported=False)
    result = env.backup(ok=False)
    assert result.code == 1 and "does not support Changed Block Tracking" in result.err

    result = env.run("restore", "vsphere", env.repo, "x", *env.sim.args(), "--in-place",
                     "--as-new", "y")
    assert result.code == 2 and "exactly one of --in-place or --as-new" in result.err
    for res in (result,):
        assert "Traceback" not in res.err
    assert env.snapshots() == []
    listed = env.run("points", env.repo, "--json")
    assert listed.json()["points"] == []
