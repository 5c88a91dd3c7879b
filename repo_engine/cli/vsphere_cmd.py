"""`repo-engine vsphere vms`, `backup vsphere` and `restore vsphere`.

pyvmomi is imported only inside command bodies, so `repo-engine --help` stays instant. Settings
come from the options, over a TOML `--config` file (see repo_engine/sources/vsphere/settings.py
and docs/VSPHERE.md); the password only from a file or an environment variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .common import (LOOKUP_TEXT, PORT, STORED_TEXT, NumberRange, Progress, RepoAddress,
                     emit_json, few_tags, human_bytes, json_option, open_repo, repo_argument,
                     tag_option)


def connection_options(fn: Callable) -> Callable:
    options = [
        click.option("--config", "config", type=click.Path(path_type=Path, dir_okay=False),
                     help="TOML file of settings, options given on the command line win. Keys: "
                          "server, port, user, password-file, password-env, thumbprint, "
                          "insecure, vm, vm-uuid, quiesce (true/false), transports, "
                          "vddk-libdir, tags (a list), audit; see docs/VSPHERE.md."),
        click.option("--server", help="vCenter or ESXi host."),
        click.option("--port", type=PORT, show_default="443",
                     help="HTTPS port of the server."),
        click.option("--user", help="User name, e.g. backup@vsphere.local."),
        click.option("--password-file", type=click.Path(path_type=Path, dir_okay=False),
                     help="File holding the password (one trailing newline is dropped)."),
        click.option("--password-env", metavar="VAR",
                     help="Environment variable holding the password."),
        click.option("--thumbprint", metavar="SHA1",
                     help="Pin the server certificate's SHA-1 fingerprint (AB:CD:...)."),
        click.option("--insecure", is_flag=True, default=None,
                     help="Skip certificate checks (for test servers only)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def data_options(fn: Callable) -> Callable:
    options = [
        click.option("--transports", metavar="MODES", help="VDDK transport modes, e.g. nbdssl:nbd."),
        click.option("--vddk-libdir", metavar="DIR", show_default="$VDDK_LIBDIR",
                     help="VDDK's directory (holding lib64/)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _settings(params: dict[str, Any]) -> Any:
    from ..sources.vsphere.settings import merge

    return merge(params, params.get("config"), check=_as_option)


def _as_option(key: str, value: Any) -> Any:
    """A config file's value checked by the command's own option of that name (`tags` by
    --tag, each), as if it had been given on the command line: the same bounds, the same
    refusals. A key the command has no option for is checked by its type alone."""
    from ..errors import UsageError

    ctx = click.get_current_context()
    flag = "--tag" if key == "tags" else f"--{key}"
    param = next((p for p in ctx.command.params if flag in getattr(p, "opts", ())), None)
    if param is None or isinstance(param.type, (click.types.StringParamType,
                                                click.types.BoolParamType)):
        return value
    try:
        if key == "tags":
            return list(few_tags(ctx, param, tuple(param.type.convert(item, param, ctx)
                                                   for item in value)))
        return param.type.convert(value, param, ctx)
    except click.BadParameter as exc:
        raise UsageError(exc.message.removesuffix(".")) from None


def _password(settings: Any, vddk: bool,
              repo: RepoAddress | None = None) -> tuple[str, str | None]:
    """The password (re-executing first with VDDK on LD_LIBRARY_PATH when needed, handing over
    the passphrase of `repo` when it was read already) and the VDDK directory."""
    from .vddk_env import SecretSource, ensure_library_path, read_secret

    source = SecretSource(settings.password_file, settings.password_env)
    libdir = settings.vddk_libdir or os.environ.get("VDDK_LIBDIR") if vddk else None
    if vddk and not libdir:
        raise click.UsageError("no VDDK directory: give --vddk-libdir DIR (or vddk-libdir= in "
                               "--config) or set VDDK_LIBDIR")
    if libdir:
        ensure_library_path(libdir, source,   # may re-execute this command
                            repo.passphrase().held if repo is not None else None)
    return read_secret(source), libdir


@click.group()
def vsphere() -> None:
    """Inspect a vCenter/ESXi server (to set up `backup vsphere` jobs)."""


@vsphere.command("vms")
@connection_options
@json_option
def vms(as_json: bool, **params: Any) -> None:
    """List VMs with their power state, CBT state and disks.

    \b
    Example:
      repo-engine vsphere vms --server vc.example.com --user backup@vsphere.local \\
          --password-file /etc/repo-engine/vc.pw --thumbprint AB:CD:...
    """
    from ..sources.vsphere.connection import connect
    from ..sources.vsphere.inventory import list_vms
    from ..units import plural, shown

    settings = _settings(params)
    password, _ = _password(settings, vddk=False)
    with connect(settings, password) as conn:
        found = list_vms(conn.content)
    if as_json:
        emit_json(vms=found)
        return
    click.echo(f"{'NAME':30}  {'MOREF':10}  {'POWER':10}  {'CBT':12}  DISKS")
    for vm in found:
        cbt = ("on" if vm["cbt_enabled"] else "off") if vm["cbt_supported"] else "unsupported"
        disks = ", ".join(f"{d['key']}:{human_bytes(d['capacity'])}" for d in vm["disks"])
        click.echo(f"{shown(vm['name']):30}  {shown(vm['moref']):10}  {vm['power_state']:10}  "
                   f"{cbt:12}  {disks}")
    click.echo(plural(len(found), "VM"))


@click.command("vsphere")
@repo_argument
@connection_options
@click.option("--vm", type=STORED_TEXT, help="The VM's name.")
@click.option("--vm-uuid", type=LOOKUP_TEXT,
              help="The VM's instance (or BIOS) UUID, instead of --vm.")
@click.option("--no-quiesce", is_flag=True, default=None,
              help="Do not quiesce the guest (crash-consistent point).")
@data_options
@tag_option
@click.option("--audit", type=NumberRange(0, 100), metavar="PERCENT", show_default="0",
              help="Also re-read this percentage of blocks CBT calls unchanged and check them.")
@json_option
def backup_vsphere(repo: RepoAddress, as_json: bool, **params: Any) -> None:
    """Back up a VMware VM: snapshot, Changed Block Tracking, VDDK.

    Enables CBT when it is off, removes leftover snapshots of ours, snapshots the VM (quiesced
    unless --no-quiesce; crash-consistent when the guest cannot quiesce), reads the extents CBT
    reports changed since the last point (everything allocated on a first backup) and always
    removes the snapshot.

    \b
    Examples:
      repo-engine backup vsphere /backup/repo --config /etc/repo-engine/web1.toml
      repo-engine backup vsphere /backup/repo --server vc.example.com \\
          --user backup@vsphere.local --password-file /etc/repo-engine/vc.pw \\
          --thumbprint AB:CD:... --vm web1 --vddk-libdir /opt/vmware-vix-disklib-distrib \\
          --transports nbdssl:nbd --tag nightly
    """
    from ..backup.job import BackupOptions, backup_vm
    from ..sources.vsphere.connection import connect
    from ..sources.vsphere.inventory import find_vm
    from ..sources.vsphere.source import DataPlane, after_backup, frozen_vm
    from .backup_cmd import report_backup

    settings = _settings(params)
    password, libdir = _password(settings, vddk=True, repo=repo)
    with open_repo(repo, shared=f"backup {settings.vm}") as repository, \
            connect(settings, password) as conn, Progress() as progress:
        vm = find_vm(conn.content, settings.vm, settings.vm_uuid)
        options = BackupOptions(tags=settings.tags, audit_percent=settings.audit,
                                progress=lambda key, total: progress.bar(f"disk {key}", total))
        plane = DataPlane(settings.transports, libdir)
        # the VM lock before the snapshot: a second backup would remove the running one's
        # snapshot as a leftover
        with repository.vm_lock(vm.name, f"backup {vm.name}"), \
                frozen_vm(conn, vm, repository, quiesce=settings.quiesce, plane=plane) as frozen:
            point = backup_vm(repository, frozen.snapshot, options, vm_locked=True)
        after_backup(repository.store, repository.sealer, frozen)
    report_backup(point, as_json)


@click.command("vsphere")
@repo_argument
@click.argument("point")
@connection_options
@click.option("--in-place", is_flag=True,
              help="Roll the (powered-off) VM back to POINT, writing only what differs.")
@click.option("--vm", type=LOOKUP_TEXT, show_default="the point's VM",
              help="In place: the VM to roll back.")
@click.option("--vm-uuid", type=LOOKUP_TEXT, help="In place: the VM's UUID, instead of --vm.")
@click.option("--as-new", metavar="NAME", type=LOOKUP_TEXT,
              help="Create a new VM NAME from the point.")
@click.option("--datastore", help="As new: the datastore for the VM and its disks.")
@click.option("--resource-pool", show_default="the datastore host's",
              help="As new: the resource pool.")
@click.option("--folder", show_default="the datacenter's", help="As new: the VM folder.")
@data_options
@json_option
def restore_vsphere(repo: RepoAddress, point: str, in_place: bool, as_new: str | None,
                    datastore: str | None, resource_pool: str | None, folder: str | None,
                    as_json: bool, **params: Any) -> None:
    """Restore a VM from POINT (short id, VM@latest or VM@TIME) into vSphere.

    \b
    --in-place: the VM must be powered off; snapshot it, write the blocks that differ from
    the point (CBT since the point, else read and compared) into the deltas under the
    snapshot, remove the snapshot; on failure revert to it, so the disks are as before (the
    error line says when vSphere could not be asked and what to do). After a restore that
    wrote something the VM's next backup reads everything.
    --as-new NAME --datastore DS: create a VM from the saved configuration, write its disks;
    on failure the half-made VM is deleted.

    \b
    Examples:
      repo-engine restore vsphere /backup/repo web1@latest --config web1.toml --in-place
      repo-engine restore vsphere /backup/repo 3f2a9c1d --config web1.toml \\
          --as-new web1-restored --datastore datastore2
    """
    from ..sources.vsphere.connection import connect
    from ..sources.vsphere.inventory import find_vm
    from ..restore.vsphere import restore_as_new, restore_in_place
    from ..sources.vsphere.source import DataPlane
    from ..units import plural, shown

    if in_place == bool(as_new):
        raise click.UsageError("give exactly one of --in-place or --as-new NAME")
    if as_new and not datastore:
        raise click.UsageError("--as-new needs --datastore DS")
    if in_place and (datastore or resource_pool or folder):
        raise click.UsageError("--datastore, --resource-pool and --folder go with --as-new")
    target = {"vm": params.pop("vm"), "vm_uuid": params.pop("vm_uuid")}
    settings = _settings(params)
    password, libdir = _password(settings, vddk=True, repo=repo)
    plane = DataPlane(settings.transports, libdir)
    with open_repo(repo, shared=f"restore {point}") as repository, \
            connect(settings, password) as conn:
        chosen = repository.load_catalogued(repository.find_point(point).id)   # with its config
        if as_new:
            result = restore_as_new(repository, chosen, conn, as_new, datastore,  # type: ignore[arg-type]
                                    plane, pool=resource_pool, folder=folder)
        else:
            saved = chosen.config.get("vsphere", {}).get("summary", {})
            uuid = target["vm_uuid"] or (None if target["vm"] else saved.get("instance_uuid"))
            vm = find_vm(conn.content, target["vm"] or chosen.vm, uuid)
            result = restore_in_place(repository, chosen, conn, vm, plane)
    if as_json:
        emit_json(result.as_dict())
        return
    click.echo(f"restored point {result.point[:8]} {result.mode} to VM {shown(result.vm)} "
               f"({shown(result.moref)})")
    for d in result.disks:
        note = f"  ({shown(d.note)})" if d.note else ""
        click.echo(f"  disk {shown(d.key)} {shown(d.file)}: {plural(d.blocks_written, 'block')} "
                   f"({human_bytes(d.bytes_written)}), {d.mode}{note}")
    for note in result.notes:
        click.echo(f"  note: {shown(note)}")
