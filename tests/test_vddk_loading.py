"""Loading VDDK: library search, missing symbols, optional functions, init/exit rules.

VDDK can be initialised once per process, so each case runs in a fresh interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import fake_vddk

MiB = 1024 * 1024


@pytest.fixture(scope="session")
def libs(tmp_path_factory):
    return fake_vddk.build(tmp_path_factory.getbasetemp())


@pytest.fixture
def disk(tmp_path):
    """A 3 MiB + 4 KiB disk '[ds1] vm/disk.vmdk' with data in its second MiB; its root."""
    root = tmp_path / "datastores"
    file = root / "ds1" / "vm" / "disk-flat.vmdk"
    file.parent.mkdir(parents=True)
    with open(file, "wb") as f:
        f.truncate(3 * MiB + 4096)
        f.seek(MiB + 100)
        f.write(os.urandom(200000))
    return root


def run(code: str, root, **env: str) -> subprocess.CompletedProcess:
    prelude = textwrap.dedent(f"""
        import json, sys, numpy as np, vddk_ext
        KW = dict(server="vc.test", thumbprint={fake_vddk.THUMBPRINT!r}, user="u",
                  password="p", vmx_spec="moref=vm-1")
        def fail(exc):
            print(json.dumps({{"type": type(exc).__name__, "msg": str(exc),
                               "errno": getattr(exc, "errno", None)}}))
            sys.exit(3)
    """)
    full_env = dict(os.environ, FAKE_VDDK_ROOT=str(root), **env)
    full_env.pop("FAKE_VDDK_FAULTS", None)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=60)


def error_of(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 3, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


OPEN_AND_FAIL = """
    try:
        vddk_ext.open_vddk("[ds1] vm/disk.vmdk", libdir=sys.argv[1] if len(sys.argv) > 1
                           else {libdir!r}, **KW)
    except Exception as exc:
        fail(exc)
"""


def test_library_not_found(tmp_path, disk):
    r = run(OPEN_AND_FAIL.format(libdir=str(tmp_path / "novddk")), disk)
    e = error_of(r)
    assert e["type"] == "DiskError" and e["errno"] == 2
    assert "no usable libvixDiskLib.so.9/.8/.7/.6" in e["msg"]
    assert f"{tmp_path / 'novddk'}/lib64" in e["msg"]


def test_unloadable_library_says_why(tmp_path, disk):
    bad = tmp_path / "bad" / "lib64"
    bad.mkdir(parents=True)
    (bad / "libvixDiskLib.so.8").write_text("not an ELF file\n" * 100)
    e = error_of(run(OPEN_AND_FAIL.format(libdir=str(tmp_path / "bad")), disk))
    assert "libvixDiskLib.so.8" in e["msg"] and "invalid ELF header" in e["msg"]


def test_missing_required_symbol_is_named(libs, disk):
    e = error_of(run(OPEN_AND_FAIL.format(libdir=str(libs["broken"])), disk))
    assert e["type"] == "DiskError"
    assert "required function VixDiskLib_GetInfo is missing" in e["msg"]
    assert "broken/lib64/libvixDiskLib.so.8" in e["msg"]


def test_flat_directory_and_older_soname(libs, disk):
    r = run(f"""
        d = vddk_ext.open_vddk("[ds1] vm/disk.vmdk", libdir={str(libs['flat'])!r}, **KW)
        print(vddk_ext.vddk_info()["library"], d.capacity)
    """, disk)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(libs["flat"] / "libvixDiskLib.so.7"), str(3 * MiB + 4096)]


def test_vddk_libdir_from_environment(libs, disk):
    r = run("""
        d = vddk_ext.open_vddk("[ds1] vm/disk.vmdk", **KW)
        print(d.capacity)
    """, disk, VDDK_LIBDIR=str(libs["full"]))
    assert r.returncode == 0, r.stderr
    e = error_of(run("""
        try:
            vddk_ext.open_vddk("[ds1] vm/disk.vmdk", **KW)
        except Exception as exc:
            fail(exc)
    """, disk, VDDK_LIBDIR=""))
    assert e["type"] == "ValueError" and "VDDK_LIBDIR" in e["msg"]


def test_without_query_allocated_blocks_the_whole_disk_is_allocated(libs, disk):
    r = run(f"""
        d = vddk_ext.open_vddk("[ds1] vm/disk.vmdk", libdir={str(libs['noquery'])!r}, **KW)
        print(json.dumps([vddk_ext.vddk_info()["functions"], d.allocated_extents()]))
    """, disk)
    assert r.returncode == 0, r.stderr
    functions, extents = json.loads(r.stdout)
    assert functions == {"ReadAsync": True, "QueryAllocatedBlocks": False,
                         "AllocateConnectParams": True, "PrepareForAccess": True}
    assert extents == [[0, 3 * MiB + 4096]]


def test_without_async_reads_use_read(libs, disk):
    file = disk / "ds1" / "vm" / "disk-flat.vmdk"
    r = run(f"""
        d = vddk_ext.open_vddk("[ds1] vm/disk.vmdk", libdir={str(libs['noasync'])!r}, **KW)
        n = -(-d.capacity // 65536)
        data = b"".join(bytes(b.data) for b in d.reader(65536, np.arange(n, dtype=np.uint64)))
        assert vddk_ext.vddk_info()["functions"]["ReadAsync"] is False
        assert data[:d.capacity] == open({str(file)!r}, "rb").read()
        print("ok")
    """, disk)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_without_prepare_for_access_it_is_a_no_op(libs, disk, tmp_path):
    trace = tmp_path / "trace"
    r = run(f"""
        libdir = {str(libs['noaccess'])!r}
        assert vddk_ext.vddk_prepare_for_access(libdir=libdir, **KW) is False
        assert vddk_ext.vddk_info()["functions"]["PrepareForAccess"] is False
        d = vddk_ext.open_vddk("[ds1] vm/disk.vmdk", libdir=libdir, **KW)
        d.close()
        assert vddk_ext.vddk_end_access(**KW) is False
        print("ok")
    """, disk, FAKE_VDDK_TRACE=str(trace))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert not any(line.startswith(("prepare", "end_access"))
                   for line in trace.read_text().splitlines())


def test_init_only_on_the_main_thread(libs, disk):
    e = error_of(run(f"""
        import threading
        out = []
        def go():
            try:
                vddk_ext.vddk_init({str(libs['full'])!r})
            except Exception as exc:
                out.append(exc)
        t = threading.Thread(target=go); t.start(); t.join()
        fail(out[0])
    """, disk))
    assert "must be initialised on the main thread" in e["msg"]


def test_exit_is_final_and_runs_at_interpreter_exit(libs, disk, tmp_path):
    trace = tmp_path / "trace"
    e = error_of(run(f"""
        d = vddk_ext.open_vddk("[ds1] vm/disk.vmdk", libdir={str(libs['full'])!r}, **KW)
        d.close()
        vddk_ext.vddk_exit()
        vddk_ext.vddk_exit()   # idempotent
        assert vddk_ext.vddk_info()["state"] == "exited"
        try:
            vddk_ext.open_vddk("[ds1] vm/disk.vmdk", **KW)
        except Exception as exc:
            fail(exc)
    """, disk, FAKE_VDDK_TRACE=str(trace)))
    assert "shut down" in e["msg"]
    r = run(f"""
        d = vddk_ext.open_vddk("[ds1] vm/disk.vmdk", libdir={str(libs['full'])!r}, **KW)
        d.close()
    """, disk, FAKE_VDDK_TRACE=str(tmp_path / "trace2"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "trace2").read_text().splitlines()[-1] == "exit"


def test_library_needing_ld_library_path(libs, disk):
    """The fake can insist, as the real VDDK does, on its lib64 being on LD_LIBRARY_PATH."""
    code = textwrap.dedent(OPEN_AND_FAIL.format(libdir=str(libs["full"]))) + "print('opened')\n"
    e = error_of(run(code, disk, FAKE_VDDK_REQUIRE_LD_PATH="1", LD_LIBRARY_PATH=""))
    assert e["type"] == "VixError" and "VixDiskLib_InitEx" in e["msg"]
    r = run(code, disk, FAKE_VDDK_REQUIRE_LD_PATH="1",
            LD_LIBRARY_PATH=str(libs["full"] / "lib64"))
    assert r.returncode == 0 and "opened" in r.stdout, r.stderr
