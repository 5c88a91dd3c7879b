"""`repo-engine backup image|...`."""

from __future__ import annotations

from pathlib import Path

import click

from .common import (PORT, STORED_TEXT, NumberRange, Progress, RepoAddress, disk_line, emit_json,
                     json_option, open_repo, repo_argument, tag_option)
from .main import LazyGroup


def _disk_key(key: str, given: dict, option: str) -> str:
    if key in given:
        raise click.BadParameter(f"disk key {key!r} given twice", param_hint=option)
    try:
        return STORED_TEXT.convert(key, None, None)
    except click.BadParameter as exc:
        raise click.BadParameter(f"disk key {exc.message}", param_hint=option) from None


def _pairs(values: tuple[str, ...], option: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for value in values:
        key, sep, path = value.partition("=")
        if not sep or not key or not path:
            raise click.BadParameter(f"{value!r} is not KEY=PATH", param_hint=option)
        out[_disk_key(key, out, option)] = Path(path)
    return out


# `backup vsphere` lives in vsphere_cmd.py, loaded only when it runs or its help is shown
@click.group(cls=LazyGroup, lazy={"vsphere": "repo_engine.cli.vsphere_cmd:backup_vsphere"})
def backup() -> None:
    """Back up a VM's disks into a repository."""


@backup.command()
@repo_argument
@click.option("--vm", required=True, type=STORED_TEXT,
              help="VM name the points are filed under.")
@click.option("--disk", "disks", multiple=True, required=True, metavar="KEY=PATH",
              help="A disk: its stable key and an image file or block device. Repeatable.")
@click.option("--changed", multiple=True, metavar="KEY=EXTENTS.json",
              help="Changed extents of a disk since its last backup: JSON [[offset, length], "
                   "...] or VMware's DiskChangeInfo as pyVmomi writes it.")
@tag_option
@click.option("--audit", "audit_percent", type=NumberRange(0, 100), default=0.0,
              show_default=True, metavar="PERCENT",
              help="Also re-read this percentage of blocks the change list calls unchanged and "
                   "check them; a mismatch makes the disk a full read.")
@json_option
def image(repo: RepoAddress, vm: str, disks: tuple[str, ...], changed: tuple[str, ...],
          tags: tuple[str, ...], audit_percent: float, as_json: bool) -> None:
    """Back up disk image files or block devices.

    \b
    Examples:
      repo-engine backup image /backup/repo --vm web1 --disk sda=/images/web1.img
      repo-engine backup image /backup/repo --vm web1 --disk sda=/images/web1.img \\
          --changed sda=/tmp/web1-changes.json --tag nightly
    """
    from ..backup.job import BackupOptions, backup_vm
    from ..sources.image import ImageDisk, image_snapshot

    disk_paths, changed_paths = _pairs(disks, "--disk"), _pairs(changed, "--changed")
    unknown = sorted(set(changed_paths) - set(disk_paths))
    if unknown:
        raise click.BadParameter(f"no --disk named {', '.join(unknown)}", param_hint="--changed")
    with open_repo(repo, shared=f"backup {vm}") as repository, Progress() as progress:
        snapshot = image_snapshot(
            vm, [ImageDisk(k, p, changed_paths.get(k)) for k, p in disk_paths.items()])
        options = BackupOptions(tags=list(tags), audit_percent=audit_percent,
                                progress=lambda key, total: progress.bar(f"disk {key}", total))
        point = backup_vm(repository, snapshot, options)
    report_backup(point, as_json)


def report_backup(point: object, as_json: bool) -> None:
    from ..repository.points import PointRecord
    from ..units import mib_per_s, ratio
    from .schema import point_doc

    assert isinstance(point, PointRecord)
    c = point.counters
    nonzero = int(c.get("blocks_read", 0) - c.get("zero_blocks", 0))
    new_chunks = int(c.get("new_chunks", 0))
    summary = {
        "bytes_read": int(c.get("bytes_read", 0)),
        "nonzero_blocks_read": nonzero,
        "new_chunks": new_chunks,
        "new_raw_bytes": int(c.get("new_raw_bytes", 0)),
        "new_bytes_stored": int(c.get("new_stored_bytes", 0)),
        # non-zero blocks read per new chunk stored, and raw per stored bytes of the new chunks;
        # null when nothing new was stored (there is no ratio to speak of)
        "dedup_ratio": ratio(nonzero, new_chunks),
        "compression_ratio": ratio(c.get("new_raw_bytes", 0), c.get("new_stored_bytes", 0)),
        "seconds": float(c.get("seconds", 0)),
        "mib_per_s": mib_per_s(c.get("bytes_read", 0), c.get("seconds", 0)),
    }
    if as_json:
        emit_json(point=point_doc(point), backup=summary)
        return
    click.echo(f"point {point.id[:8]}  {point.vm}@{point.time}")
    for d in point.disks:
        click.echo(f"  disk {d.key}: {disk_line(d)}")
    for line in backup_lines(summary):
        click.echo(f"  {line}")

    for note in point.notes:
        click.echo(f"  note: {note}")

def backup_lines(s: dict) -> list[str]:
    """What a backup read and stored, in words (ratios only when something new was stored)."""
    from ..units import format_rate, format_ratio, format_size, plural

    read = (f"read {format_size(s['bytes_read'])} in {s['seconds']:.2f} s "
            f"({format_rate(s['bytes_read'], s['seconds'])})")
    if s["new_chunks"]:
        stored = (f"stored {plural(s['new_chunks'], 'new chunk')}: "
                  f"{format_size(s['new_raw_bytes'])}, {format_size(s['new_bytes_stored'])} "
                  f"compressed; dedup {format_ratio(s['dedup_ratio'])} (non-zero blocks read "
                  f"per new chunk), compression {format_ratio(s['compression_ratio'])}")
    elif s["nonzero_blocks_read"]:
        stored = (f"stored nothing new: the {plural(s['nonzero_blocks_read'], 'non-zero block')} "
                  f"read {'was' if s['nonzero_blocks_read'] == 1 else 'were'} already in the "
                  "repository")
    else:
        stored = "stored nothing new: every block read was zero" if s["bytes_read"] else \
            "stored nothing new: nothing to read"
    return [read, stored]


def _datastore_pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        key, sep, path = value.partition("=")
        if not sep or not key or not path.strip():
            raise click.BadParameter(f"{value!r} is not KEY=[datastore] path.vmdk",
                                     param_hint=option)
        out[_disk_key(key, out, option)] = path.strip()
    return out


@backup.command()
@repo_argument
@click.option("--vm", required=True, type=STORED_TEXT,
              help="VM name the points are filed under.")
@click.option("--disk", "disks", multiple=True, required=True, metavar="KEY=[DS] PATH.vmdk",
              help="A disk: its stable key (deviceKey) and datastore path. Repeatable.")
@click.option("--server", required=True, help="vCenter or ESXi host.")
@click.option("--port", type=PORT, default=443, show_default=True,
              help="HTTPS port of the server.")
@click.option("--user", required=True, help="User name, e.g. backup@vsphere.local.")
@click.option("--password-file", type=click.Path(path_type=Path, dir_okay=False),
              help="File holding the password (one trailing newline is dropped).")
@click.option("--password-env", metavar="VAR", help="Environment variable holding the password.")
@click.option("--vmx-spec", required=True, metavar="moref=vm-N", help="The VM, as VDDK wants it.")
@click.option("--snapshot", metavar="snapshot-N", help="Read the disks as of this snapshot.")
@click.option("--thumbprint", metavar="SHA1",
              help="The server certificate's SHA-1 fingerprint; without it, taken from a "
                   "certificate the system's CAs trust.")
@click.option("--transports", metavar="MODES", help="VDDK transport modes, e.g. nbdssl:nbd.")
@click.option("--vddk-libdir", envvar="VDDK_LIBDIR", show_envvar=True, metavar="DIR",
              help="VDDK's directory (holding lib64/).")
@click.option("--changed", multiple=True, metavar="KEY=EXTENTS.json",
              help="Changed extents of a disk since its last backup: JSON [[offset, length], "
                   "...] or VMware's DiskChangeInfo as pyVmomi writes it.")
@tag_option
@json_option
def vddk(repo: RepoAddress, vm: str, disks: tuple[str, ...], server: str, port: int, user: str,
         password_file: Path | None, password_env: str | None, vmx_spec: str,
         snapshot: str | None, thumbprint: str | None, transports: str | None,
         vddk_libdir: str | None, changed: tuple[str, ...], tags: tuple[str, ...],
         as_json: bool) -> None:
    """Back up a VMware VM's disks read through VDDK (libvixDiskLib).

    The password is read from a file or an environment variable, never from the command line.
    VDDK's lib64 must be on LD_LIBRARY_PATH when the process starts: if it is not, the command
    re-executes itself once with it set (the password passes through a pipe, not the
    environment).

    \b
    Examples:
      repo-engine backup vddk /backup/repo --vm web1 --server vc.example.com \\
          --user backup@vsphere.local --password-file /etc/repo-engine/vc.pw \\
          --vmx-spec moref=vm-42 --snapshot snapshot-7 --vddk-libdir /opt/vmware-vix-disklib \\
          --disk 2000='[datastore1] web1/web1.vmdk' --transports nbdssl:nbd
    """
    from ..backup.job import BackupOptions, backup_vm
    from ..sources.vddk_disk import VddkConnection, VddkDisk, server_thumbprint, vddk_snapshot
    from .vddk_env import SecretSource, ensure_library_path, read_secret

    disk_paths, changed_paths = _datastore_pairs(disks, "--disk"), _pairs(changed, "--changed")
    unknown = sorted(set(changed_paths) - set(disk_paths))
    if unknown:
        raise click.BadParameter(f"no --disk named {', '.join(unknown)}", param_hint="--changed")
    if not vddk_libdir:
        raise click.UsageError("no VDDK directory: give --vddk-libdir DIR or set VDDK_LIBDIR")
    secret = SecretSource(password_file, password_env)
    # may re-execute this command (never returns then)
    ensure_library_path(vddk_libdir, secret, repo.passphrase().held)
    connection = VddkConnection(
        server=server, port=port, user=user, password=read_secret(secret), vmx_spec=vmx_spec,
        thumbprint=thumbprint or server_thumbprint(server, port), snapshot=snapshot,
        transports=transports, libdir=vddk_libdir)
    with open_repo(repo, shared=f"backup {vm}") as repository, Progress() as progress:
        snapshot_ = vddk_snapshot(
            vm, connection, [VddkDisk(k, p, changed_paths.get(k)) for k, p in disk_paths.items()])
        options = BackupOptions(tags=list(tags),
                                progress=lambda key, total: progress.bar(f"disk {key}", total))
        point = backup_vm(repository, snapshot_, options)
    report_backup(point, as_json)
