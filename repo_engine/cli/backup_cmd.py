"""`repo-engine backup image|...`."""

from __future__ import annotations

from pathlib import Path

import click

from .common import Progress, emit_json, human_bytes, json_option, open_repo, repo_argument


def _pairs(values: tuple[str, ...], option: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for value in values:
        key, sep, path = value.partition("=")
        if not sep or not key or not path:
            raise click.BadParameter(f"{value!r} is not KEY=PATH", param_hint=option)
        if key in out:
            raise click.BadParameter(f"disk key {key!r} given twice", param_hint=option)
        out[key] = Path(path)
    return out


@click.group()
def backup() -> None:
    """Back up a VM's disks into a repository."""


@backup.command()
@repo_argument
@click.option("--vm", required=True, help="VM name the points are filed under.")
@click.option("--disk", "disks", multiple=True, required=True, metavar="KEY=PATH",
              help="A disk: its stable key and an image file or block device. Repeatable.")
@click.option("--changed", multiple=True, metavar="KEY=EXTENTS.json",
              help="Changed extents of a disk since its last backup: JSON [[offset, length], ...].")
@click.option("--tag", "tags", multiple=True, help="Tag the point. Repeatable.")
@click.option("--audit", "audit_percent", type=click.FloatRange(0, 100), default=0.0,
              help="Also re-read this percentage of blocks the change list calls unchanged and "
                   "check them; a mismatch makes the disk a full read.")
@json_option
def image(repo: Path, vm: str, disks: tuple[str, ...], changed: tuple[str, ...],
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


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def report_backup(point: object, as_json: bool) -> None:
    from ..repository.points import PointRecord

    assert isinstance(point, PointRecord)
    c = point.counters
    seconds = max(c.get("seconds", 0), 1e-9)
    summary = {
        "point": point.id, "vm": point.vm, "time": point.time,
        "bytes_read": int(c.get("bytes_read", 0)),
        "new_chunks": int(c.get("new_chunks", 0)),
        "new_bytes_stored": int(c.get("new_stored_bytes", 0)),
        # non-zero blocks read per new chunk stored, and raw per stored bytes of the new chunks
        "dedup_ratio": _ratio(c.get("blocks_read", 0) - c.get("zero_blocks", 0),
                              c.get("new_chunks", 0)),
        "compression_ratio": _ratio(c.get("new_raw_bytes", 0), c.get("new_stored_bytes", 0)),
        "seconds": c.get("seconds", 0),
        "mb_per_s": round(c.get("bytes_read", 0) / seconds / 1e6, 1),
        "disks": {d.key: {"mode": d.read_mode, "kind": d.kind, "note": d.note, **d.counters}
                  for d in point.disks},
    }
    if as_json:
        emit_json(summary)
        return
    click.echo(f"point {point.id[:8]}  {point.vm}@{point.time}")
    for d in point.disks:
        note = f"  ({d.note})" if d.note else ""
        click.echo(f"  disk {d.key}: {d.read_mode} read, {d.kind} map{note}")
    click.echo(f"  read {human_bytes(summary['bytes_read'])} in {summary['seconds']:.2f} s "
               f"({summary['mb_per_s']} MB/s); {summary['new_chunks']} new chunks, "
               f"{human_bytes(summary['new_bytes_stored'])} stored; dedup "
               f"{summary['dedup_ratio']}x, compression {summary['compression_ratio']}x")


def _datastore_pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        key, sep, path = value.partition("=")
        if not sep or not key or not path.strip():
            raise click.BadParameter(f"{value!r} is not KEY=[datastore] path.vmdk",
                                     param_hint=option)
        if key in out:
            raise click.BadParameter(f"disk key {key!r} given twice", param_hint=option)
        out[key] = path.strip()
    return out


@backup.command()
@repo_argument
@click.option("--vm", required=True, help="VM name the points are filed under.")
@click.option("--disk", "disks", multiple=True, required=True, metavar="KEY=[DS] PATH.vmdk",
              help="A disk: its stable key (deviceKey) and datastore path. Repeatable.")
@click.option("--server", required=True, help="vCenter or ESXi host.")
@click.option("--port", type=click.IntRange(1, 65535), default=443, show_default=True)
@click.option("--user", required=True)
@click.option("--password-file", type=click.Path(path_type=Path, dir_okay=False),
              help="File holding the password (one trailing newline is dropped).")
@click.option("--password-env", metavar="VAR", help="Environment variable holding the password.")
@click.option("--vmx-spec", required=True, metavar="moref=vm-N", help="The VM, as VDDK wants it.")
@click.option("--snapshot", metavar="snapshot-N", help="Read the disks as of this snapshot.")
@click.option("--thumbprint", metavar="SHA1",
              help="The server certificate's SHA-1 fingerprint; without it, taken from a "
                   "certificate the system's CAs trust.")
@click.option("--transports", metavar="MODES", help="VDDK transport modes, e.g. nbdssl:nbd.")
@click.option("--vddk-libdir", envvar="VDDK_LIBDIR", metavar="DIR",
              help="VDDK's directory (holding lib64/). Default: $VDDK_LIBDIR.")
@click.option("--changed", multiple=True, metavar="KEY=EXTENTS.json",
              help="Changed extents of a disk since its last backup: JSON [[offset, length], ...].")
@click.option("--tag", "tags", multiple=True, help="Tag the point. Repeatable.")
@json_option
def vddk(repo: Path, vm: str, disks: tuple[str, ...], server: str, port: int, user: str,
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
    ensure_library_path(vddk_libdir, secret)   # may re-execute this command (never returns then)
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


# `backup vsphere` lives in vsphere_cmd.py (which imports pyvmomi only inside its command body)
from .vsphere_cmd import backup_vsphere  # noqa: E402

backup.add_command(backup_vsphere)
