"""The VDDK source: disks of a VMware VM read through VDDK (libvixDiskLib, via vddk_ext).

One connection per disk open (ConnectEx + Open, Close + Disconnect on close). A first backup
reads the disk's allocated extents (QueryAllocatedBlocks, or the whole disk on a VDDK without
it); a later one reads the extents of a change list (`--changed`, JSON `[[offset, length], ...]`)
or, with none, everything, storing only new chunks. The vSphere source builds on this module:
it supplies the snapshot reference and QueryChangedDiskAreas' extents instead of a JSON file.

Secrets: the password (or session cookie) lives only in `VddkConnection`, never in the point's
config or in messages.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import vddk_ext

from ..backup.extents import load_extents
from ..backup.source import BlockDevice, SourceDisk, VmSnapshot
from ..errors import SourceError, UsageError
from .image import check_disks, listed_disk


@dataclass(frozen=True)
class VddkConnection:
    """Where and how to reach a VM's disks through VDDK."""

    server: str
    user: str
    vmx_spec: str                      # "moref=vm-16"
    thumbprint: str                    # SHA-1 of the server's certificate, "AA:BB:..."
    password: str = field(default="", repr=False)
    cookie: str | None = field(default=None, repr=False)   # a session cookie instead
    port: int = 443
    snapshot: str | None = None        # "snapshot-42": read the disks as of that snapshot
    transports: str | None = None      # "nbdssl:nbd"; None lets VDDK choose
    libdir: str | None = None          # VDDK's directory; None = $VDDK_LIBDIR

    def open(self, path: str, *, readonly: bool = True) -> vddk_ext.Disk:
        return vddk_ext.open_vddk(
            path, server=self.server, port=self.port, thumbprint=self.thumbprint,
            user=self.user, password=self.password, cookie=self.cookie,
            vmx_spec=self.vmx_spec, snapshot_ref=self.snapshot, transports=self.transports,
            libdir=self.libdir, readonly=readonly)

    def _access_kwargs(self, identity: str) -> dict[str, object]:
        return dict(server=self.server, port=self.port, thumbprint=self.thumbprint,
                    user=self.user, password=self.password, cookie=self.cookie,
                    vmx_spec=self.vmx_spec, identity=identity, libdir=self.libdir)

    def prepare_for_access(self, identity: str = "repo-engine") -> bool:
        """VixDiskLib_PrepareForAccess: vCenter keeps the VM from migrating until end_access.
        False when this VDDK lacks the function (nothing was done); VixError on failure."""
        return vddk_ext.vddk_prepare_for_access(**self._access_kwargs(identity))

    def end_access(self, identity: str = "repo-engine") -> bool:
        """VixDiskLib_EndAccess, undoing prepare_for_access (harmless without it)."""
        return vddk_ext.vddk_end_access(**self._access_kwargs(identity))

    def public(self) -> dict[str, object]:
        """What a restore point may record: everything but the secrets."""
        return {"server": self.server, "port": self.port, "user": self.user,
                "vmx_spec": self.vmx_spec, "snapshot": self.snapshot,
                "transports": self.transports, "thumbprint": self.thumbprint}


@dataclass(frozen=True)
class VddkDisk:
    key: str
    path: str                          # "[datastore] dir/disk.vmdk"
    changed: Path | None = None


def _probe(connection: VddkConnection, disk: VddkDisk) -> tuple[int, str | None]:
    """Capacity and transport, checking up front that the disk can be opened."""
    try:
        with connection.open(disk.path) as device:
            return device.capacity, device.transport
    except OSError as exc:
        # vddk_ext's message names the disk, the VDDK function and VDDK's text
        raise SourceError(f"disk {disk.key}: {exc.strerror or exc}") from None


def vddk_source_disk(connection: VddkConnection, disk: VddkDisk,
                     extents: np.ndarray | None = None) -> SourceDisk:
    """One disk as the pipeline sees it; `extents` (bytes) override disk.changed."""
    capacity, transport = _probe(connection, disk)
    if extents is None and disk.changed is not None:
        extents = load_extents(disk.changed, capacity)

    def open_device() -> BlockDevice:
        return connection.open(disk.path)

    return listed_disk(disk.key, capacity, open_device, extents,
                       f"{disk.path} on {connection.server} ({transport})")


def vddk_snapshot(vm: str, connection: VddkConnection, disks: list[VddkDisk]) -> VmSnapshot:
    check_disks(vm, [d.key for d in disks], "--disk KEY=[datastore] path.vmdk")
    for d in disks:
        if not d.path.startswith("[") or "]" not in d.path:
            raise UsageError(f"disk {d.key}: {d.path!r} is not a datastore path "
                             "like '[datastore1] vm/vm.vmdk'")
    return VmSnapshot(vm=vm, source="vddk", disks=[vddk_source_disk(connection, d) for d in disks],
                      config={"vddk": connection.public(),
                              "disks": {d.key: d.path for d in disks}})


def server_thumbprint(host: str, port: int = 443, timeout: float = 10.0) -> str:
    """The SHA-1 fingerprint VDDK wants, of a certificate the system's CAs vouch for."""
    context = ssl.create_default_context()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                context.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise SourceError(f"cannot get the certificate thumbprint of {host}:{port} ({exc}); "
                          "pass --thumbprint with the server's SHA-1 fingerprint") from None
    if der is None:
        raise SourceError(f"{host}:{port} presented no certificate; pass --thumbprint")
    digest = hashlib.sha1(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, 40, 2))
