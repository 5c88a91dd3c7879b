"""`restore vsphere --in-place` when something fails midway, against the simulator's delta disks
(a snapshot moves the VM onto a delta, revert discards it, removal merges it) and the fake VDDK's
faults. Every failure must end in one error line, the exit code of docs/VSPHERE.md ("When a
restore fails"), a known snapshot state and known disk bytes; what the docs say to do next is
then done and checked too."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import MIB, disk_of
from vcsim.fixtures import BS, VM, make_env, pattern, vcsim_binary, vddk_libdir  # noqa: F401
from vcsim.fixtures import env  # noqa: F401

SECTORS = BS // 512
CHANGED = 7          # blocks written after the point, apart, so the restore makes 7 writes
FILLED = 1 * MIB     # the point holds data there, zeros after


@pytest.fixture
def scene(env):
    """A point, then CHANGED blocks changed (one of them past FILLED, where the point reads
    zero), the VM powered off: (point id, the point's bytes, the bytes before the restore)."""
    env.sim.write(VM, 0, pattern(40, FILLED))
    wanted = env.sim.read(VM)
    point = env.backup()["point"]["id"]
    for i in range(CHANGED - 1):
        env.sim.write(VM, 2 * i * BS + 7, pattern(41 + i, 100))
    env.sim.write(VM, FILLED + 5 * BS, pattern(50, 300))
    env.power_off()
    before = env.sim.read(VM)
    assert before != wanted
    return point, wanted, before


def _documented() -> list[re.Pattern]:
    """The endings of a failed restore's line that docs/VSPHERE.md lists (V, S, NAME: any)."""
    text = (Path(__file__).parent.parent / "docs" / "VSPHERE.md").read_text()
    section = text[text.index("### When a restore fails"):text.index("## Tests")]
    endings = [q.removeprefix("...; ") for q in re.findall(r'"([^"]+)"', " ".join(section.split()))]
    return [re.compile(re.sub(r"\b(V|S|NAME)\b", r"\\S+", re.escape(e))
                       + "(; run the same restore again)?$") for e in endings]


DOCUMENTED = _documented()


def one_error_line(result, code: int = 1) -> str:
    """The one error line; it ends as docs/VSPHERE.md says."""
    assert result.code == code, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repo-engine: error: "), result.err
    assert any(p.search(lines[0]) for p in DOCUMENTED), f"not in docs/VSPHERE.md: {lines[0]}"
    return lines[0]


def restore_snapshot(env) -> str:
    [name] = env.snapshots()
    assert name.startswith("repo-engine-restore-")
    return name


def finishes(env, point: str, wanted: bytes) -> None:
    """Running the same restore again finishes it and leaves no snapshot."""
    again = env.restore(point, "--in-place")
    assert again.code == 0, again.err
    assert env.sim.read(VM) == wanted and env.snapshots() == []


@pytest.mark.parametrize("fault", ["write_fail=3", "drop_after_writes=3"])
def test_failed_write_is_undone(env, scene, monkeypatch, fault):
    point, wanted, before = scene
    monkeypatch.setenv("FAKE_VDDK_FAULTS", fault)
    line = one_error_line(env.restore(point, "--in-place"))
    assert "through VDDK failed" in line and "the restore was undone" in line
    assert "no snapshot is left; run the same restore again" in line
    assert env.sectors_written() >= 3 * SECTORS            # it did write before failing
    assert env.sim.read(VM) == before and env.snapshots() == []
    monkeypatch.delenv("FAKE_VDDK_FAULTS")
    finishes(env, point, wanted)


def test_failed_compare_writes_nothing(env, scene, monkeypatch):
    point, wanted, before = scene
    env.sim.control(vm=VM, query_fault="FileFault")
    monkeypatch.setenv("FAKE_VDDK_FAULTS", "read_fail=2")
    line = one_error_line(env.restore(point, "--in-place"))
    assert "read failed" in line or "reading" in line
    assert "nothing was written: " in line and "no snapshot is left" in line
    assert env.sectors_written() == 0 and env.sim.read(VM) == before and env.snapshots() == []
    monkeypatch.delenv("FAKE_VDDK_FAULTS")
    finishes(env, point, wanted)


def test_connection_lost_before_anything_was_written(env, scene):
    point, wanted, before = scene
    env.sim.control(drop_at="QueryChangedDiskAreas")
    result = env.restore(point, "--in-place")
    line = one_error_line(result)
    snap = restore_snapshot(env)
    assert "the connection to 127.0.0.1 was lost while reading the disks" in line
    assert f"are as before the restore, but it keeps snapshot {snap}: delete it" in line
    assert env.sectors_written() == 0 and env.sim.read(VM) == before
    env.sim.control(drop_at="")
    finishes(env, point, wanted)


@pytest.mark.parametrize("go", ["back", "on"])
def test_connection_lost_before_the_revert(env, scene, monkeypatch, go):
    point, wanted, before = scene
    monkeypatch.setenv("FAKE_VDDK_FAULTS", "write_fail=3")
    env.sim.control(drop_at="RevertToSnapshot_Task")
    line = one_error_line(env.restore(point, "--in-place"))
    snap = restore_snapshot(env)
    assert "through VDDK failed" in line
    assert (f"partly restored and its snapshot {snap} holds them as they were before: revert "
            "to that snapshot in vSphere and delete it to go back, or run the same restore "
            "again to finish it") in line
    assert env.sim.read(VM) not in (before, wanted)   # mixed, and the message says so
    monkeypatch.delenv("FAKE_VDDK_FAULTS")
    env.sim.control(drop_at="")
    if go == "back":
        env.revert_and_delete(snap)
        assert env.sim.read(VM) == before and env.snapshots() == []
    else:
        finishes(env, point, wanted)


@pytest.mark.parametrize("fault", ["NoPermission", "SystemError"])
def test_revert_refused_by_the_call(env, scene, monkeypatch, fault):
    point, wanted, before = scene
    env.sim.control(call_faults={"RevertToSnapshot_Task": fault})
    done = env.restore(point, "--in-place")              # a restore that works never reverts
    assert done.code == 0 and done.err == "", done.err
    assert env.sim.read(VM) == wanted and env.snapshots() == []

    env.sim.write(VM, 3 * BS, b"changed again")
    env.sim.write(VM, 9 * BS, b"and here")
    monkeypatch.setenv("FAKE_VDDK_FAULTS", "write_fail=2")
    before = env.sim.read(VM)
    line = one_error_line(env.restore(point, "--in-place"))
    snap = restore_snapshot(env)
    assert f"then reverting {VM} to snapshot {snap} failed: {fault}" in line
    assert "partly restored" in line
    env.sim.control(call_faults={"RevertToSnapshot_Task": ""})
    env.revert_and_delete(snap)
    assert env.sim.read(VM) == before


def test_connection_lost_at_the_snapshot(env, scene):
    point, wanted, before = scene
    env.sim.control(drop_at="CreateSnapshot_Task")
    line = one_error_line(env.restore(point, "--in-place"))
    assert "was lost while snapshotting" in line and "nothing was written" in line
    assert env.snapshots() == [] and env.sim.read(VM) == before
    env.sim.control(drop_at="")
    finishes(env, point, wanted)


@pytest.mark.parametrize("fault", ["NoPermission", "dropped"])
def test_snapshot_removal_failing_after_a_complete_restore(env, scene, fault):
    point, wanted, _ = scene
    if fault == "dropped":
        env.sim.control(drop_at="RemoveSnapshot_Task")
    else:
        env.sim.control(call_faults={"RemoveSnapshot_Task": fault})
    line = one_error_line(env.restore(point, "--in-place"))
    snap = restore_snapshot(env)
    why = "was lost while removing snapshot" if fault == "dropped" else \
        f"removing snapshot {snap} failed: {fault}"
    assert why in line
    assert "the restore itself is complete" in line and "do not revert to it" in line
    assert env.sim.read(VM) == wanted
    env.sim.control(drop_at="", call_faults={"RemoveSnapshot_Task": ""})
    finishes(env, point, wanted)


def test_damaged_repository_is_undone_with_exit_3(env, scene):
    point, _, before = scene
    for pack in (env.repo / "packs").rglob("*"):
        if pack.is_file():
            data = bytearray(pack.read_bytes())
            for at in range(64, len(data) * 9 // 10, 4096):   # every chunk, not the trailer
                data[at] ^= 0xFF
            pack.write_bytes(bytes(data))
    line = one_error_line(env.restore(point, "--in-place"), code=3)
    assert "no snapshot is left" in line
    assert env.sim.read(VM) == before and env.snapshots() == []


@pytest.mark.parametrize("fault", ["write", "write+dropped"])
def test_failed_as_new_restore_leaves_no_half_made_vm(env, monkeypatch, fault):
    env.sim.write(VM, 0, pattern(70, FILLED))
    point = env.backup()["point"]["id"]
    monkeypatch.setenv("FAKE_VDDK_FAULTS", "write_fail=2")
    if fault == "write+dropped":
        env.sim.control(drop_at="Destroy_Task")
    line = one_error_line(env.restore(point, "--as-new", "copy", "--datastore", "LocalDS_0"))
    assert "through VDDK failed" in line
    exists = "copy" in env.sim.vms()
    if fault == "write":
        assert line.endswith("the incomplete VM copy was deleted") and not exists
    else:
        assert line.endswith("delete the incomplete VM copy in vSphere") and exists


@pytest.mark.parametrize("fault", ["SystemError", "FileFault"])
def test_cbt_failing_compares_and_writes_only_what_differs(env, scene, fault):
    point, wanted, _ = scene
    env.sim.control(vm=VM, query_fault=fault)
    result = env.restore(point, "--in-place")
    assert result.code == 0 and result.err == "", result.err
    [disk] = result.json()["disks"]
    assert disk["mode"] == "compared" and fault in disk["note"]
    assert disk["blocks_written"] == CHANGED
    # only the changed blocks, the one past FILLED as zeros; no zeros where the disk reads zero
    assert env.sectors_written() == CHANGED * SECTORS
    assert env.sim.read(VM) == wanted and env.snapshots() == []


def test_cbt_reset_compares_too(env, scene):
    point, wanted, _ = scene
    env.sim.control(vm=VM, cbt_reset=True)
    result = env.restore(point, "--in-place")
    assert result.code == 0, result.err
    assert result.json()["disks"][0]["mode"] == "compared"
    assert env.sectors_written() == CHANGED * SECTORS and env.sim.read(VM) == wanted


def test_restore_asks_vcenter_not_to_migrate(env, scene, monkeypatch):
    point, wanted, _ = scene
    monkeypatch.setenv("FAKE_VDDK_REQUIRE_PREPARE", "1")   # Open fails without PrepareForAccess
    result = env.restore(point, "--in-place")
    assert result.code == 0, result.err
    calls = [line.split()[0] for line in env.trace.read_text().splitlines()]
    assert calls.index("prepare") < calls.index("open")
    assert calls.index("end_access") > max(i for i, c in enumerate(calls) if c == "write")
    assert env.sim.read(VM) == wanted


@pytest.mark.parametrize("removal", ["works", "refused"])
def test_noop_restore_writes_nothing_and_keeps_cbt_trusted(env, removal):
    key = str(env.sim.disk(VM)["key"])
    env.sim.write(VM, 0, pattern(60, FILLED))
    point = env.backup()["point"]["id"]
    wanted = env.sim.read(VM)
    env.power_off()
    if removal == "refused":
        env.sim.control(call_faults={"RemoveSnapshot_Task": "SystemError"})
        line = one_error_line(env.restore(point, "--in-place"))
        assert "nothing needed writing: " in line
        restore_snapshot(env)
        env.sim.control(call_faults={"RemoveSnapshot_Task": ""})
    else:
        result = env.restore(point, "--in-place")
        assert result.code == 0, result.err
        assert result.json()["disks"][0]["blocks_written"] == 0
        assert env.snapshots() == []
    assert env.sectors_written() == 0 and env.sim.read(VM) == wanted
    after = env.backup()["point"]
    assert disk_of(after, key)["read_mode"] == "changed" and env.snapshots() == []
