"""`repo-engine init`."""

from __future__ import annotations

from functools import partial

import click

from ..repository.config import DEFAULT_LEVEL, DEFAULT_MAX_CHAIN, MAX_LEVEL, MAX_MAX_CHAIN
from .common import CappedInt, RepoAddress, repo_argument


@click.command()
@repo_argument
@click.option("--block-size", default="64KiB", show_default=True,
              help="Block (chunk) size, a power of two from 16KiB to 4MiB.")
@click.option("--compression-level", default=DEFAULT_LEVEL, show_default=True,
              type=CappedInt(1, MAX_LEVEL),
              help="zstd level for chunks, 1..19.")
@click.option("--max-chain", default=DEFAULT_MAX_CHAIN, show_default=True,
              type=CappedInt(1, MAX_MAX_CHAIN),
              help=f"Block maps per chain before a synthetic full, 1..{MAX_MAX_CHAIN}.")
@click.option("--pack-size", default="32MiB", show_default=True,
              help="Target pack file size, from the block size to 1GiB.")
@click.option("--parents", is_flag=True,
              help="Also create REPO's missing parent directories (like mkdir -p).")
@click.option("--shared", is_flag=True,
              help="Let many hosts write a local REPO at once (e.g. over NFS), each with its own "
                   "cache (--cache-dir); an s3:// REPO is always shared.")
@click.option("--encryption/--no-encryption", default=None,
              show_default="encrypted for an s3:// REPO, not for a local one",
              help="Seal everything stored with a key unlocked by a passphrase (README, "
                   "\"Encryption\"); an encrypted REPO is always shared.")
def init(repo: RepoAddress, block_size: str, compression_level: int, max_chain: int,
         pack_size: str, parents: bool, shared: bool, encryption: bool | None) -> None:
    """Create an empty repository in REPO: a new or empty directory whose parent exists, or an
    empty prefix of a bucket, s3://BUCKET/PREFIX (README, "Object storage").

    \b
    Examples:
      repo-engine init /backup/repo --block-size 64KiB
      repo-engine init s3://backups/site1 --endpoint https://s3.example.com
      repo-engine init /backup/repo --encryption --passphrase-file /etc/repo-engine/repo.pass
    """
    from ..repository.location import init_repository, is_remote
    from ..units import format_size, parse_size

    if encryption is None:  # data that leaves the host is encrypted unless told otherwise
        encryption = is_remote(repo.location)
    sizes = {"block_size": parse_size(block_size),  # checked before a passphrase is asked
             "pack_size": parse_size(pack_size)}
    created = init_repository(  # which asks for the passphrase once the location is usable
        repo.location, settings=repo.settings(), cache_dir=repo.cache_dir, shared=shared,
        parents=parents,
        passphrase=partial(repo.passphrase().read, confirm=True) if encryption else None,
        compression_level=compression_level, max_chain=max_chain, **sizes)
    kind = "shared repository" if created.config.shared else "repository"
    kind = f"encrypted {kind}" if created.config.encryption else kind
    click.echo(f"created {kind} {created.config.repo_id[:12]} at {created.location} "
               f"(block size {format_size(created.config.block_size)}, zstd level "
               f"{created.config.compression_level})")
    created.close()
