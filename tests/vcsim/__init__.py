"""The vCenter simulator for the vSphere tests: build (once per session), start, control, stop.

`build()` runs build.sh (Debian's golang-go + golang-github-vmware-govmomi-dev; installs them
with apt-get when missing and this runs as root) and returns the binary, or raises
`Unavailable` with the reason. `Simulator.start(workdir)` runs one instance on 127.0.0.1 with its
datastores under `workdir` (TMPDIR), reads the JSON line it prints, and offers: connection
settings, the local data file of each VM disk (the one the VM runs on: a delta while it has a
snapshot; the fake libvixDiskLib serves the same files), and the test controls of main.go
(quiesce faults, CBT reset/support/query faults, reply window, a session dropped at a named
call, faults from a call itself).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = ("golang-go", "golang-github-vmware-govmomi-dev")
GOVMOMI = Path("/usr/share/gocode/src/github.com/vmware/govmomi/simulator")


class Unavailable(Exception):
    """The simulator cannot be built here (the reason is the message)."""


def _toolchain_present() -> bool:
    return shutil.which("go") is not None and GOVMOMI.is_dir()


def _install() -> str:
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "apt-get is not available as root"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode:
            return f"{' '.join(cmd)} failed: {done.stderr.strip()[-300:]}"
    return ""


def build() -> Path:
    if not _toolchain_present():
        why = _install()
        if not _toolchain_present():
            raise Unavailable(f"go and govmomi's sources are missing ({' '.join(PACKAGES)}) and "
                              f"could not be installed: {why or 'unknown reason'}")
    done = subprocess.run(["bash", str(HERE / "build.sh")], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"building the simulator failed:\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


@dataclass
class Simulator:
    proc: subprocess.Popen
    info: dict
    workdir: Path
    password_file: Path
    _disks: dict = field(default_factory=dict)

    @classmethod
    def start(cls, binary: Path, workdir: Path, *, disk_mib: int = 4, cbt_window: int = 0,
              password: str = "pass") -> "Simulator":
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TMPDIR=str(workdir))
        proc = subprocess.Popen(
            [str(binary), "-disk-mib", str(disk_mib), "-cbt-window", str(cbt_window),
             "-password", password],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(workdir / "vcsim.log", "w"),
            env=env, text=True)
        line = proc.stdout.readline()
        if not line:
            proc.wait(5)
            raise RuntimeError(f"the simulator did not start: {(workdir / 'vcsim.log').read_text()}")
        info = json.loads(line)
        password_file = workdir / "password"
        password_file.write_text(info["password"] + "\n")
        return cls(proc, info, workdir, password_file)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()   # main.go exits when its stdin closes
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # ---- connection settings

    @property
    def host(self) -> str:
        return self.info["host"]

    @property
    def port(self) -> int:
        return int(self.info["port"])

    @property
    def thumbprint(self) -> str:
        return self.info["thumbprint"]

    @property
    def datastores(self) -> dict[str, str]:
        return self.info["datastores"]

    def args(self) -> list[str]:
        """Connection options for the CLI."""
        return ["--server", self.host, "--port", str(self.port), "--user", self.info["user"],
                "--password-file", str(self.password_file), "--thumbprint", self.thumbprint]

    def fake_vddk_env(self) -> dict[str, str]:
        """What the fake libvixDiskLib needs to serve this simulator's datastores."""
        return {"FAKE_VDDK_DATASTORES": ":".join(f"{k}={v}" for k, v in self.datastores.items()),
                "FAKE_VDDK_THUMBPRINT": self.thumbprint, "FAKE_VDDK_USER": self.info["user"],
                "FAKE_VDDK_PASSWORD_FILE": str(self.password_file)}

    def connect(self):   # noqa: ANN201 - a pyvmomi ServiceInstance
        from pyVim.connect import SmartConnect

        return SmartConnect(host=self.host, port=self.port, user=self.info["user"],
                            pwd=self.info["password"],
                            sslContext=ssl._create_unverified_context())

    @contextmanager
    def session(self) -> Iterator:
        """A pyvmomi session's content (tests use it to act as an administrator would)."""
        from pyVim.connect import Disconnect

        si = self.connect()
        try:
            yield si.RetrieveContent()
        finally:
            Disconnect(si)

    # ---- the simulator's own endpoints

    def _url(self, path: str) -> str:
        return f"https://{self.host}:{self.port}{path}"

    def control(self, **settings: object) -> None:
        req = urllib.request.Request(self._url("/vcsim/control"), method="POST",
                                     data=json.dumps(settings).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, context=ssl._create_unverified_context()) as r:
            assert r.status == 204, r.read()

    def vms(self) -> dict[str, list[dict]]:
        with urllib.request.urlopen(self._url("/vcsim/info"),
                                    context=ssl._create_unverified_context()) as r:
            return json.loads(r.read())

    def disk(self, vm: str, index: int = 0) -> dict:
        """{key, file, data, capacity} of a VM's disk; `data` is the local file behind it."""
        return self.vms()[vm][index]

    def write(self, vm: str, offset: int, data: bytes, index: int = 0) -> None:
        with open(self.disk(vm, index)["data"], "r+b") as f:
            f.seek(offset)
            f.write(data)

    def read(self, vm: str, index: int = 0) -> bytes:
        disk = self.disk(vm, index)
        with open(disk["data"], "rb") as f:
            return f.read(disk["capacity"])


def find(content, name: str):   # noqa: ANN001, ANN201 - pyvmomi objects
    """The VM called `name`."""
    from pyVmomi import vim

    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return next(v for v in view.view if v.name == name)
    finally:
        view.Destroy()
