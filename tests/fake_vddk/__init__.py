"""Test helpers around the fake libvixDiskLib (fake_vixdisklib.c, built by build.sh).

`build(base)` compiles every variant once per test session; `Fake` describes where a test's
datastores live and the connection parameters the fake expects. Path mapping: "[ds] dir/x.vmdk"
is ROOT/ds/dir/x-flat.vmdk (or ROOT/ds/dir/x.vmdk when there is no -flat file).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("full", "noquery", "noasync", "broken", "noaccess", "flat")
THUMBPRINT = "12:34:56:78:9A:BC:DE:F0:12:34:56:78:9A:BC:DE:F0:12:34:56:78"

_built: dict[str, Path] = {}


def build(base: Path) -> dict[str, Path]:
    """{variant: LIBDIR} for every variant, compiled once per process into base (or taken from
    $FAKE_VDDK_PREBUILT, a build.sh output directory)."""
    if not _built:
        prebuilt = os.environ.get("FAKE_VDDK_PREBUILT")
        out = Path(prebuilt) if prebuilt else base / "fake_vddk"
        if not prebuilt:
            subprocess.run(["sh", str(HERE / "build.sh"), str(out)], check=True,
                           capture_output=True, text=True)
        _built.update({v: out / v for v in VARIANTS})
    return dict(_built)


@dataclass
class Fake:
    """One test's datastore root and the matching open_vddk keyword arguments."""

    libdir: Path
    root: Path

    def kwargs(self, **overrides: object) -> dict[str, object]:
        kw: dict[str, object] = dict(
            libdir=str(self.libdir), server="vc.test", thumbprint=THUMBPRINT, user="backup",
            password="s3cret", vmx_spec="moref=vm-16", snapshot_ref="snapshot-7",
            transports="nbdssl:nbd")
        kw.update(overrides)
        return kw

    def disk_file(self, datastore: str, path: str) -> Path:
        """The backing file of '[datastore] path' (a '-flat' file for a .vmdk path)."""
        rel = path[:-5] + "-flat.vmdk" if path.endswith(".vmdk") else path
        file = self.root / datastore / rel
        file.parent.mkdir(parents=True, exist_ok=True)
        return file

    def env(self, monkeypatch, faults: str | None = None) -> None:
        monkeypatch.setenv("FAKE_VDDK_ROOT", str(self.root))
        monkeypatch.setenv("FAKE_VDDK_THUMBPRINT", THUMBPRINT)
        if faults is None:
            monkeypatch.delenv("FAKE_VDDK_FAULTS", raising=False)
        else:
            monkeypatch.setenv("FAKE_VDDK_FAULTS", faults)
