"""Fixtures of the vSphere tests: the simulator (built once per session), the fake VDDK pointed
at the simulator's datastores, a repository, and the CLI wired to all three (`Env`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pyVim.task import WaitForTask

import fake_vddk
import vcsim
from helpers import KIB, cli

VM = "DC0_H0_VM0"
BS = 64 * KIB


@pytest.fixture(scope="session")
def vcsim_binary() -> Path:
    try:
        return vcsim.build()
    except vcsim.Unavailable as exc:
        pytest.skip(f"vCenter simulator unavailable: {exc}")


@pytest.fixture(scope="session")
def vddk_libdir(tmp_path_factory) -> str:
    return str(fake_vddk.build(tmp_path_factory.getbasetemp())["full"])


class Env:
    """One simulator, one repository, the CLI wired to both."""

    def __init__(self, sim: vcsim.Simulator, repo: Path, libdir: str, trace: Path, capsys,
                 tmp: Path) -> None:
        self.sim, self.repo, self.libdir, self.trace, self.capsys, self.tmp = (
            sim, repo, libdir, trace, capsys, tmp)

    def run(self, *args: object):
        return cli(self.capsys, *args)

    def backup(self, *extra: object, vm: str = VM, ok: bool = True):
        self.trace.write_text("")
        result = self.run("backup", "vsphere", self.repo, *self.sim.args(), "--vm", vm,
                          "--vddk-libdir", self.libdir, "--json", *extra)
        if ok:
            assert result.code == 0, result.err
            return result.json()
        return result

    def sectors_read(self) -> int:
        """Sectors the fake VDDK read since the last backup() or restore() started."""
        return self._sectors("read")

    def sectors_written(self) -> int:
        """Sectors the fake VDDK was asked to write since the last backup() or restore()."""
        return self._sectors("write")

    def traced(self, call: str) -> list[str]:
        """The fake VDDK's trace lines of `call` since the last backup() or restore()."""
        return [line for line in self.trace.read_text().splitlines()
                if line.split(" ", 1)[0] == call]

    def _sectors(self, call: str) -> int:
        return sum(int(line.split()[2]) for line in self.traced(call))

    def restore(self, *args: object):
        """`restore vsphere` of the repository with the simulator's connection options."""
        self.trace.write_text("")
        return self.run("restore", "vsphere", self.repo, *args, *self.sim.args(),
                        "--vddk-libdir", self.libdir, "--json")

    def power_off(self, vm: str = VM) -> None:
        with self.sim.session() as content:
            WaitForTask(vcsim.find(content, vm).PowerOffVM_Task())

    def restore_image(self, point: str, key: str) -> bytes:
        target = self.tmp / f"restored-{point}-{key}.img"
        target.unlink(missing_ok=True)
        result = self.run("restore", "image", self.repo, point, "--disk", key, "--to", target)
        assert result.code == 0, result.err
        return target.read_bytes()

    def show(self, point: str) -> dict:
        """The point as `show --json` prints it, with its VM configuration as `config`."""
        result = self.run("show", self.repo, point, "--json")
        assert result.code == 0, result.err
        doc = result.json()
        return {**doc["point"], "config": doc["config"]}

    def snapshots(self, vm: str = VM) -> list[str]:
        """Names of every snapshot the VM has."""
        with self.sim.session() as content:
            return [t.name for t in _tree(vcsim.find(content, vm))]

    def revert_and_delete(self, name: str, vm: str = VM) -> None:
        """What an administrator does to go back: revert to snapshot `name`, then delete it."""
        with self.sim.session() as content:
            snap = next(t.snapshot for t in _tree(vcsim.find(content, vm)) if t.name == name)
            WaitForTask(snap.RevertToSnapshot_Task())
            WaitForTask(snap.RemoveSnapshot_Task(removeChildren=False))


def _tree(vm) -> list:   # noqa: ANN001 - a pyvmomi VM
    out = []

    def walk(items) -> None:   # noqa: ANN001
        for t in items or []:
            out.append(t)
            walk(t.childSnapshotList)
    walk(vm.snapshot.rootSnapshotList if vm.snapshot else [])
    return out


@pytest.fixture
def make_env(vcsim_binary, vddk_libdir, tmp_path, monkeypatch, capsys):
    started: list[vcsim.Simulator] = []

    def make(*init_args: object, **sim_options) -> Env:
        """A simulator started with `sim_options`; the repository, made on the first call, is
        initialised with `init_args` too (say, `--encryption`)."""
        sim = vcsim.Simulator.start(vcsim_binary, tmp_path / f"vcsim{len(started)}",
                                    **sim_options)
        started.append(sim)
        for key, value in sim.fake_vddk_env().items():
            monkeypatch.setenv(key, value)
        trace = tmp_path / "vddk-trace"
        monkeypatch.setenv("FAKE_VDDK_TRACE", str(trace))
        monkeypatch.delenv("FAKE_VDDK_FAULTS", raising=False)
        repo = tmp_path / "repo"
        if not repo.exists():
            made = cli(capsys, "init", repo, "--block-size", "64KiB", *init_args)
            assert made.code == 0, made.err
        return Env(sim, repo, vddk_libdir, trace, capsys, tmp_path)

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture
def env(make_env) -> Env:
    return make_env()


def pattern(seed: int, length: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()
