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
    with open_repo(repo) as repository, Progress() as progress:
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
