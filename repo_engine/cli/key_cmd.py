"""`repo-engine key ...`: the key slots, epochs and recovery key of an encrypted repository.

Thin over repository/crypto/manage.py (KeyManager): every command opens the repository's keys
only (location.open_key_manager), never its index; the passphrase comes from the sources of
passphrase.py, a new passphrase from `--new-passphrase-file` or the terminal.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import UsageError
from .common import (OPTIONAL_TEXT, Progress, RepoAddress, check_output_file, emit_json,
                     json_option, open_repo, repo_argument, spinner)
from .passphrase import new_passphrase, read_key_file

if TYPE_CHECKING:
    from ..repository.crypto.manage import KeyManager
    from ..repository.crypto.slots import Slot

new_passphrase_option = click.option(
    "--new-passphrase-file", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
    help="File holding the new passphrase (one trailing newline is dropped); without it, the "
         "new passphrase is typed twice on the terminal.")
label_option = click.option("--label", default="", show_default="none", type=OPTIONAL_TEXT,
                            help="A note shown by 'key list' (at most 200 characters).")


@contextmanager
def key_manager(repo: RepoAddress) -> Iterator[KeyManager]:
    from ..repository.location import open_key_manager

    if repo.key_file is not None:
        raise UsageError("the key commands unlock with a passphrase, not --key-file (which "
                         "opens the other commands); 'key recover --private-key FILE' adds a "
                         "passphrase with the key file")
    with open_key_manager(repo.location, settings=repo.settings(),
                          cache_dir=repo.cache_dir) as manager:
        yield manager


def slot_doc(slot: Slot) -> dict[str, Any]:
    """A slot's public fields (never the wrapped key nor the recovery public key)."""
    doc: dict[str, Any] = {"id": slot.id, "kind": slot.kind, "label": slot.label,
                           "created": slot.created, "kdf": None}
    if slot.kdf is not None:
        doc["kdf"] = {"name": "scrypt", "log_n": slot.kdf.log_n, "r": slot.kdf.r,
                      "p": slot.kdf.p, "memory": slot.kdf.memory}
    return doc


def slot_line(slot: Slot) -> str:
    from ..units import shown

    kdf = (f"scrypt n=2^{slot.kdf.log_n} r={slot.kdf.r} p={slot.kdf.p}"
           if slot.kdf is not None else "X25519")
    return f"{slot.id}  {slot.kind:10}  {slot.created}  {kdf:26}  {shown(slot.label)}"


@click.group()
def key() -> None:
    """Manage the keys of an encrypted repository: passphrase slots, the recovery key, rotation.

    The passphrase comes from --passphrase-file FILE, $REPO_ENGINE_PASSWORD_FILE,
    $REPO_ENGINE_PASSWORD, else the terminal; never from the command line.
    """


@key.command("list")
@repo_argument
@json_option
def list_slots(repo: RepoAddress, as_json: bool) -> None:
    """List the key slots, newest passphrase slot first (no passphrase needed).

    \b
    Example:
      repo-engine key list /backup/repo --json
    """
    with key_manager(repo) as manager:
        listed = manager.slots()
    if as_json:
        emit_json(slots=[slot_doc(s) for s in listed.slots], unreadable=listed.skipped)
        return
    click.echo(f"{'SLOT':16}  {'KIND':10}  {'CREATED':20}  {'KDF':26}  LABEL")
    for slot in listed.slots:
        click.echo(slot_line(slot))
    for message in listed.skipped:
        click.echo(f"unreadable: {message}")


@key.command()
@repo_argument
@json_option
def status(repo: RepoAddress, as_json: bool) -> None:
    """Show the key epochs: the one new data is sealed with, and those kept for reading.

    \b
    Example:
      repo-engine key status /backup/repo
    """
    with key_manager(repo) as manager:
        opened = manager.unlock(repo.passphrase())
    ring = opened.keyring
    doc = {"current_epoch": ring.current, "epochs": sorted(ring.epochs),
           "keyring_generation": ring.generation, "unlocked_by": opened.unlocked.slot.id}
    if as_json:
        emit_json(doc)
        return
    click.echo(f"current epoch {ring.current} (new data is sealed with it); readable epochs "
               f"{', '.join(map(str, sorted(ring.epochs)))}; keyring generation "
               f"{ring.generation}; unlocked by slot {opened.unlocked.slot.id}")


@key.command()
@repo_argument
@new_passphrase_option
@label_option
def add(repo: RepoAddress, new_passphrase_file: Path | None, label: str) -> None:
    """Add a passphrase slot (unlocking with an existing passphrase first).

    \b
    Example:
      repo-engine key add /backup/repo --label alice --new-passphrase-file alice.pass
    """
    with key_manager(repo) as manager:
        opened = manager.unlock(repo.passphrase())
        slot = manager.add_passphrase(opened, new_passphrase(new_passphrase_file, repo.location),
                                      label)
    click.echo(f"added passphrase slot {slot.id}")


@key.command()
@repo_argument
@click.argument("slot")
def remove(repo: RepoAddress, slot: str) -> None:
    """Remove key slot SLOT (its id, or a unique prefix of at least 4 digits).

    The passphrase given must open another slot, one that stays. The last slot and the last
    passphrase slot are never removed.

    \b
    Example:
      repo-engine key remove /backup/repo 3f2a9c1d
    """
    with key_manager(repo) as manager:
        removed = manager.remove(slot, repo.passphrase())
    click.echo(f"removed {removed.kind} slot {removed.id}")


@key.command()
@repo_argument
@new_passphrase_option
def passwd(repo: RepoAddress, new_passphrase_file: Path | None) -> None:
    """Change a passphrase: a slot for the new one is written, then the old one's is removed.

    \b
    Example:
      repo-engine key passwd /backup/repo --passphrase-file old.pass --new-passphrase-file new.pass
    """
    with key_manager(repo) as manager:
        opened = manager.unlock(repo.passphrase())
        slot = manager.change_passphrase(opened, new_passphrase(new_passphrase_file,
                                                                repo.location))
    click.echo(f"passphrase changed: slot {slot.id} replaces slot {opened.unlocked.slot.id}")


@key.command()
@repo_argument
def rotate(repo: RepoAddress) -> None:
    """Make a new data key (epoch) for everything written from now on; data written before stays
    readable with its own epoch's key (README, "Encryption": retiring an old key).

    \b
    Example:
      repo-engine key rotate /backup/repo
    """
    with key_manager(repo) as manager:
        keyring = manager.rotate(manager.unlock(repo.passphrase()))
    click.echo(f"new data is sealed with epoch {keyring.current}; epochs "
               f"{', '.join(map(str, sorted(keyring.epochs)))} stay readable")


@key.command()
@repo_argument
@click.option("--grace", metavar="DURATION", default=None, show_default="24h",
              help="Delete the rewritten objects' old copies only this long after nothing uses "
                   "them (as gc --grace; e.g. 0s, 30min, 24h).")
@json_option
def retire(repo: RepoAddress, grace: str | None, as_json: bool) -> None:
    """Rewrite everything sealed under the key epochs before the current one, then drop their
    keys: run 'key rotate' first. Backups may keep running.

    The old copies are deleted by gc rules (after --grace, and the old journal entries an
    hour after the checkpoint this command writes at the earliest); until they are, the old
    keys stay and the command says so: run it again once that time has passed.

    \b
    Example:
      repo-engine key rotate /backup/repo && repo-engine key retire /backup/repo
    """
    from ..maintenance.retire import retire as run_retire
    from ..maintenance.shared_gc import DEFAULT_GRACE
    from ..sources.vsphere import marks
    from ..units import parse_seconds, plural

    seconds = DEFAULT_GRACE if grace is None else parse_seconds(grace, "--grace")
    with open_repo(repo) as repository, Progress() as progress:
        report = run_retire(repository, grace=seconds, reseal=[marks.reseal],
                            tick=spinner(progress, "key retire"))
    if as_json:
        emit_json(report)
        return
    click.echo(f"retiring key epochs {_epochs(report.retiring)} (new data: epoch "
               f"{report.current}): rewrote {plural(report.points_rewritten, 'point')} and "
               f"{plural(report.maps_rewritten, 'block map')}, repacked "
               f"{plural(report.packs_repacked, 'pack')}, sealed "
               f"{plural(report.objects_resealed, 'other object')} again")
    if report.dropped:
        click.echo(f"dropped the keys of epochs {_epochs(report.dropped)}: no object is sealed "
                   f"under them any more; the keyring holds epoch {_epochs(report.epochs)}")
        return
    damaged = report.gc.damaged_packs_skipped
    for msg in damaged:
        click.echo(f"not repacked (damaged): {msg}")
    if damaged:  # gc never deletes a pack in use: waiting would not help
        click.echo(f"the keys of epochs {_epochs(report.retiring)} stay while {len(damaged)} "
                   "damaged packs sealed under them hold chunks in use: run 'repo-engine scrub "
                   "--repair', then 'repo-engine key retire' again")
        return
    waiting = ", ".join(f"{n} in {prefix}/" for prefix, n in sorted(report.remaining.items()))
    journal = ("; the journal's, an hour after this run's checkpoint at the earliest"
               if "journal" in report.remaining else "")
    click.echo(f"still sealed under the old epochs: {waiting}; gc deletes the old copies after "
               f"the grace period ({report.gc.grace_seconds:g} s{journal}): run 'repo-engine "
               "key retire' again then to drop their keys")


def _epochs(epochs: list[int]) -> str:
    return ", ".join(map(str, epochs))


@key.command("export-recovery")
@repo_argument
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="A new file for the recovery private key (written owner-only).")
@label_option
def export_recovery(repo: RepoAddress, out: Path, label: str) -> None:
    """Write a new recovery private key to a new file and add the slot it opens.

    Keep the file away from the backup host (offline): with it, 'key recover' opens the
    repository without any passphrase.

    \b
    Example:
      repo-engine key export-recovery /backup/repo --out /media/safe/repo-recovery.pem
    """
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out} already exists: a recovery key is never written over a file; "
                         "name a new file")
    check_output_file(out, "--out", repo)
    with key_manager(repo) as manager:
        slot = manager.export_recovery(manager.unlock(repo.passphrase()), out, label)
    click.echo(f"wrote the recovery private key to {out}; added recovery slot {slot.id}")


@key.command()
@repo_argument
@click.option("--private-key", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The recovery private key file 'key export-recovery' wrote.")
@new_passphrase_option
@label_option
def recover(repo: RepoAddress, private_key: Path, new_passphrase_file: Path | None,
            label: str) -> None:
    """Open the repository with its recovery key and add a new passphrase slot.

    \b
    Example:
      repo-engine key recover /backup/repo --private-key /media/safe/repo-recovery.pem
    """
    pem, what = read_key_file(private_key, "--private-key")
    with key_manager(repo) as manager:
        opened = manager.recover(pem, what)
        slot = manager.add_passphrase(opened, new_passphrase(new_passphrase_file, repo.location),
                                      label)
    click.echo(f"recovered with slot {opened.unlocked.slot.id}; added passphrase slot {slot.id}")
