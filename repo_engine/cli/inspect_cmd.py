"""`repo-engine points | show | diff | stats`."""

from __future__ import annotations

from dataclasses import asdict

import click

from .common import (LOOKUP_TEXT, disk_line, emit_json, human_bytes, json_option, open_repo,
                      RepoAddress, repo_argument)


@click.command()
@repo_argument
@click.option("--vm", type=LOOKUP_TEXT, help="Only this VM's points; without it, every VM's.")
@json_option
def points(repo: RepoAddress, vm: str | None, as_json: bool) -> None:
    """List restore points, oldest first.

    \b
    Example:
      repo-engine points /backup/repo --vm web1
    """
    from ..units import plural, shown
    from .schema import point_doc

    with open_repo(repo, shared="points") as repository:
        found = repository.points(vm)
    if as_json:
        emit_json(points=[point_doc(p) for p in found])
        return
    click.echo(f"{'ID':8}  {'VM@TIME':45}  {'DISKS':>5}  {'LOGICAL':>10}  TAGS")
    for p in found:
        logical = human_bytes(sum(d.logical_bytes for d in p.disks))
        click.echo(f"{p.id[:8]}  {shown(p.vm) + '@' + p.time:45}  {len(p.disks):>5}  "
                   f"{logical:>10}  {shown(','.join(p.tags))}")
    click.echo(plural(len(found), "point"))


@click.command()
@repo_argument
@click.argument("point")
@json_option
def show(repo: RepoAddress, point: str, as_json: bool) -> None:
    """Show one restore point in full (POINT: short id, VM@latest or VM@TIME).

    \b
    Example:
      repo-engine show /backup/repo web1@latest
    """
    from ..units import plural, shown
    from .schema import point_doc

    with open_repo(repo, shared="show") as repository:
        record = repository.load_catalogued(repository.find_point(point).id)
    if as_json:
        emit_json(point=point_doc(record), config=record.config)
        return
    click.echo(f"point {record.id}\n  vm: {shown(record.vm)}\n  time: {record.time}\n"
               f"  source: {record.source}\n  consistency: {record.consistency}\n"
               f"  tags: {shown(', '.join(record.tags)) or '-'}"
               + ("\n  protected: yes" if record.protected else ""))
    for note in record.notes:
        click.echo(f"  note: {note}")
    for damage in record.damage:
        click.echo(f"  damaged: {damage}")
    for d in record.disks:
        click.echo(f"  disk {shown(d.key)}: {human_bytes(d.capacity)}, {disk_line(d)}")
        click.echo(f"    {human_bytes(d.counters.get('bytes_read', 0))} read, "
                   f"{plural(d.counters.get('new_chunks', 0), 'new chunk')} stored")


@click.command()
@repo_argument
@click.argument("point_a")
@click.argument("point_b")
@json_option
def diff(repo: RepoAddress, point_a: str, point_b: str, as_json: bool) -> None:
    """Blocks that differ between POINT_A and POINT_B, per disk (--json lists byte extents).

    \b
    Example:
      repo-engine diff /backup/repo web1@2026-11-24 web1@latest
    """
    from ..restore.diff import diff_points
    from ..units import plural, shown

    with open_repo(repo, shared="diff") as repository:
        diffs = diff_points(repository, repository.find_point(point_a),
                            repository.find_point(point_b))
    if as_json:
        emit_json(disks=[asdict(d) for d in diffs])
        return
    for d in diffs:
        click.echo(f"disk {shown(d.disk)}: {plural(d.changed_blocks, 'block')} changed "
                   f"({human_bytes(d.changed_bytes)}) in {plural(len(d.extents), 'extent')}")


@click.command()
@repo_argument
@json_option
def stats(repo: RepoAddress, as_json: bool) -> None:
    """Logical versus stored bytes, dedup and compression ratios.

    \b
    Example:
      repo-engine stats /backup/repo
    """
    from ..maintenance.stats import repo_stats
    from ..units import format_ratio, plural

    with open_repo(repo, shared="stats") as repository:
        result = repo_stats(repository)
    if as_json:
        emit_json(result)
        return
    click.echo(f"points: {result.points} ({plural(result.vms, 'VM')})\n"
               f"logical data: {human_bytes(result.logical_bytes)}\n"
               f"unique chunks: {result.chunks} ({human_bytes(result.unique_raw_bytes)} raw, "
               f"{human_bytes(result.stored_bytes)} compressed)\n"
               f"packs: {result.packs} ({human_bytes(result.pack_bytes)})\n"
               f"dedup ratio: {format_ratio(result.dedup_ratio)}  compression ratio: "
               f"{format_ratio(result.compression_ratio)}  overall: "
               f"{format_ratio(result.total_ratio)}")
    if result.damaged_counters:
        click.echo(f"damaged counters (shown at 0 where they went below it): "
                   f"{', '.join(result.damaged_counters)}; 'repo-engine rebuild-index' counts "
                   "them anew")
