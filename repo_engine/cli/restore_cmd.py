"""`repo-engine restore`."""

from __future__ import annotations

from pathlib import Path

import click

from .common import (Progress, check_output_file, emit_json, human_bytes, json_option, open_repo,
                      RepoAddress, repo_argument)
from .main import LazyGroup


class DefaultToImage(LazyGroup):
    """`restore REPO POINT ...` is short for `restore image REPO POINT ...`."""

    def resolve_command(self, ctx: click.Context, args: list[str]):  # type: ignore[no-untyped-def]
        if args and args[0] not in self.list_commands(ctx) and not args[0].startswith("-"):
            args = ["image", *args]
        return super().resolve_command(ctx, args)


# `restore vsphere` lives in vsphere_cmd.py, loaded only when it runs or its help is shown
@click.group(cls=DefaultToImage, lazy={"vsphere": "repo_engine.cli.vsphere_cmd:restore_vsphere"})
def restore() -> None:
    """Restore a disk of a point to a file or block device (`restore image`, the default), or a
    VM through vSphere (`restore vsphere`).

    \b
    Examples (restore disk sda of web1's newest point as an image file, or onto a device):
      repo-engine restore /backup/repo web1@latest --disk sda --to /restore/sda.img
      repo-engine restore /backup/repo web1@2026-11-24 --disk sda --to /dev/vg/web1-sda
    \b
    Points are named by short id (3f2a9c1d), VM@latest or VM@TIME (any prefix of the UTC time);
    `repo-engine points REPO` lists them and `repo-engine show REPO POINT` lists a point's disks.
    """


@restore.command("image")
@repo_argument
@click.argument("point")
@click.option("--disk", "key", required=True,
              help="Key of the disk to restore (as given at backup; `show` lists them).")
@click.option("--to", "target", type=click.Path(path_type=Path),
              help="Write the full image to this new file or block device.")
@click.option("--onto", type=click.Path(path_type=Path),
              help="File or device that already holds --base's image: write only what differs.")
@click.option("--base", help="The point whose image --onto already holds.")
@click.option("--force", is_flag=True,
              help="Overwrite an existing --to file; with --onto, write every block into a file "
                   "whose size is not --base's disk (a full restore).")
@json_option
def restore_image(repo: RepoAddress, point: str, key: str, target: Path | None, onto: Path | None,
            base: str | None, force: bool, as_json: bool) -> None:
    """Restore disk KEY of POINT (short id, VM@latest or VM@TIME) as an image.

    \b
    Examples:
      repo-engine restore /backup/repo web1@latest --disk sda --to /restore/sda.img
      repo-engine restore image /backup/repo web1@latest --disk sda --to /dev/vg/web1-sda
      repo-engine restore /backup/repo 3f2a9c1d --disk sda --onto /images/sda.img --base web1@2026-11-24
    """
    from ..restore.restorer import restore_disk
    from ..units import format_rate, plural, shown

    if (target is None) == (onto is None):
        raise click.UsageError("give exactly one of --to PATH or --onto PATH")
    if (onto is None) != (base is None):
        raise click.UsageError("--onto and --base go together")
    written = target if target is not None else onto
    assert written is not None
    check_output_file(written, "--to" if target is not None else "--onto", repo)
    with open_repo(repo, shared=f"restore {point}") as repository, Progress() as progress:
        chosen = repository.find_point(point)
        base_point = repository.find_point(base) if base else None
        summary = restore_disk(
            repository, chosen, key, target or onto, base=base_point, force=force,  # type: ignore[arg-type]
            progress=lambda total: progress.bar(f"disk {key}", total))
    if as_json:
        emit_json(summary)
        return
    click.echo(f"restored disk {shown(key)} of point {summary.point[:8]} to "
               f"{shown(summary.target)}: "
               f"{plural(summary.blocks_written, 'block')} written "
               f"({human_bytes(summary.bytes_written)}), "
               f"{plural(summary.zero_blocks, 'zero block')}, "
               f"{plural(summary.chunks_read, 'chunk')} read, {summary.seconds:.2f} s "
               f"({format_rate(summary.bytes_written, summary.seconds)})")
