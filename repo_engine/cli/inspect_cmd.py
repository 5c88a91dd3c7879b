"""`repo-engine points | show | diff | stats`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from .common import emit_json, human_bytes, json_option, open_repo, repo_argument


@click.command()
@repo_argument
@click.option("--vm", help="Only this VM's points.")
@json_option
def points(repo: Path, vm: str | None, as_json: bool) -> None:
    """List restore points, oldest first."""
    with open_repo(repo, shared="points") as repository:
        found = repository.points(vm)
    if as_json:
        emit_json([p.summary() for p in found])
        return
    click.echo(f"{'ID':8}  {'VM@TIME':45}  {'DISKS':>5}  {'LOGICAL':>10}  TAGS")
    for p in found:
        logical = human_bytes(sum(d.logical_bytes for d in p.disks))
        click.echo(f"{p.id[:8]}  {p.vm + '@' + p.time:45}  {len(p.disks):>5}  {logical:>10}  "
                   f"{','.join(p.tags)}")
    click.echo(f"{len(found)} points")


@click.command()
@repo_argument
@click.argument("point")
@json_option
def show(repo: Path, point: str, as_json: bool) -> None:
    """Show one restore point in full (POINT: short id, VM@latest or VM@TIME)."""
    with open_repo(repo, shared="show") as repository:
        record = repository.load_catalogued(repository.find_point(point).id)
    if as_json:
        emit_json(asdict(record))
        return
    click.echo(f"point {record.id}\n  vm: {record.vm}\n  time: {record.time}\n"
               f"  source: {record.source}\n  consistency: {record.consistency}\n"
               f"  tags: {', '.join(record.tags) or '-'}")
    for note in record.notes:
        click.echo(f"  note: {note}")
    for d in record.disks:
        parent = f" on {d.parent[:8]}" if d.parent else ""
        click.echo(f"  disk {d.key}: {human_bytes(d.capacity)}, {d.kind}{parent} "
                   f"({d.links} links), {d.read_mode} read, "
                   f"{human_bytes(d.counters.get('bytes_read', 0))} read, "
                   f"{d.counters.get('new_chunks', 0)} new chunks")
        if d.note:
            click.echo(f"    note: {d.note}")


@click.command()
@repo_argument
@click.argument("point_a")
@click.argument("point_b")
@json_option
def diff(repo: Path, point_a: str, point_b: str, as_json: bool) -> None:
    """Blocks that differ between POINT_A and POINT_B, per disk (--json lists byte extents)."""
    from ..restore.diff import diff_points

    with open_repo(repo, shared="diff") as repository:
        diffs = diff_points(repository, repository.find_point(point_a),
                            repository.find_point(point_b))
    if as_json:
        emit_json([asdict(d) for d in diffs])
        return
    for d in diffs:
        click.echo(f"disk {d.disk}: {d.changed_blocks} blocks changed "
                   f"({human_bytes(d.changed_bytes)}) in {len(d.extents)} extents")


@click.command()
@repo_argument
@json_option
def stats(repo: Path, as_json: bool) -> None:
    """Logical versus stored bytes, dedup and compression ratios."""
    from ..maintenance.stats import repo_stats

    with open_repo(repo, shared="stats") as repository:
        result = repo_stats(repository)
    if as_json:
        emit_json(asdict(result))
        return
    click.echo(f"points: {result.points} ({result.vms} VMs)\n"
               f"logical data: {human_bytes(result.logical_bytes)}\n"
               f"unique chunks: {result.chunks} ({human_bytes(result.unique_raw_bytes)} raw, "
               f"{human_bytes(result.stored_bytes)} compressed)\n"
               f"packs: {result.packs} ({human_bytes(result.pack_bytes)})\n"
               f"dedup ratio: {result.dedup_ratio}x  compression ratio: "
               f"{result.compression_ratio}x  overall: {result.total_ratio}x")
