"""`repo-engine forget | protect | unprotect | gc | verify | scrub | rebuild-index | unlock`.

Exit codes: 0 ok, 1 error, 2 usage error, 3 damage found.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import click

from ..units import MAX_SECONDS
from .common import (LOOKUP_TEXT, CappedInt, NumberRange, Progress, emit_json, spinner, human_bytes,
                     json_option, open_repo, RepoAddress, repo_argument)


def _exit_damage(what: str) -> None:
    """Exit code 3 (DamageError), after the report has been printed."""
    from ..errors import DamageError

    raise DamageError(what)


def _months(_ctx: click.Context, _param: click.Parameter, text: str | None) -> str | None:
    """--keep-within spells months `mo`: `m` alone could be minutes."""
    from ..units import refuse_bare_m

    if text is not None:
        refuse_bare_m(text, "--keep-within", "6mo")
    return text


# a policy counts points: a million of any bucket keeps every point there will be (a million
# days is 2,700 years); -1 is no limit
KEEP_COUNT = CappedInt(-1, 1_000_000)
# scrub's threads each hold a pack being checked (tens of MiB)
WORKERS = CappedInt(1, 256)


def _keep_bucket(bucket: str, buckets: str):  # type: ignore[no-untyped-def]
    """`--keep-daily N` and its siblings."""
    return click.option(f"--keep-{bucket}", type=KEEP_COUNT, default=0, show_default=True,
                        metavar="N",
                        help=f"Keep the newest point of each of the last N {buckets}.")


def _iso(when: datetime) -> str:
    """A policy decision's time written as points are (UTC, `Z`)."""
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


@click.command()
@repo_argument
@click.argument("point_ids", nargs=-1, metavar="[POINT]...")
@click.option("--vm", type=LOOKUP_TEXT, help="Apply the policy to this VM's points only.")
@click.option("--keep-last", type=KEEP_COUNT, default=0, show_default=True, metavar="N",
              help="Keep the N newest points (-1: all).")
@_keep_bucket("hourly", "hours")
@_keep_bucket("daily", "days")
@_keep_bucket("weekly", "ISO weeks")
@_keep_bucket("monthly", "months")
@_keep_bucket("yearly", "years")
@click.option("--keep-within", metavar="DURATION", callback=_months,
              help="Keep points newer than the newest point minus DURATION: numbers with y "
                   "(years), mo (months), w (weeks), d (days), h (hours), e.g. 7d, 2w, 6mo, "
                   "1y6mo. A bare 'm' is refused as ambiguous.")
@click.option("--keep-tag", "keep_tags", multiple=True, type=LOOKUP_TEXT,
              help="Keep points with this tag. Repeatable.")
@click.option("--allow-remove-latest", is_flag=True,
              help="Let the policy remove the newest point of a VM and disk set too (by default "
                   "it is always kept).")
@click.option("--dry-run", is_flag=True, help="Only show what would be kept and removed.")
@click.option("--prune", is_flag=True, help="Run gc afterwards to reclaim the space.")
@json_option
def forget(repo: RepoAddress, point_ids: tuple[str, ...], vm: str | None, keep_last: int,
           keep_hourly: int, keep_daily: int, keep_weekly: int, keep_monthly: int,
           keep_yearly: int, keep_within: str | None, keep_tags: tuple[str, ...],
           allow_remove_latest: bool, dry_run: bool, prune: bool, as_json: bool) -> None:
    """Remove restore points by policy (per VM and disk set) or by id.

    Rules are OR'd, restic-style: each --keep-* rule keeps the newest point of each of its last N
    buckets. A count of 0 or a duration of 0 is no rule; a policy with no rule is refused. The
    newest point of each VM and disk set is always kept unless --allow-remove-latest is given
    (naming a point removes it whatever it is). Protected points are always kept. Removing a
    point merges its changes into the points that build on it; no data is deleted until gc.

    \b
    Examples:
      repo-engine forget /backup/repo --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run
      repo-engine forget /backup/repo --vm web1 --keep-last 10 --prune
      repo-engine forget /backup/repo 3f2a9c1d
    """
    from ..maintenance.forget import ForgetReport, forget_points, policy_decisions
    from ..maintenance.retention import Policy, parse_within
    from ..units import cut, shown

    policy = Policy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly,
                    parse_within(keep_within) if keep_within else None, tuple(keep_tags))
    if point_ids and policy != Policy():
        raise click.UsageError("give either POINT ids or a --keep-* policy, not both")
    if not point_ids:
        policy.check()
    with open_repo(repo) as repository, Progress() as progress:
        if point_ids:
            # one point named twice (by id and as VM@latest) is removed, and counted, once
            found_points = {p.id: p for p in map(repository.find_point, point_ids)}
            named = list(found_points.values())
            remove = list(found_points)
            decisions = [{"id": p.id, "vm": p.vm, "time": p.time, "keep": False,
                          "reasons": ["named"]} for p in named]
        else:
            found = policy_decisions(repository, policy, vm,
                                     allow_remove_latest=allow_remove_latest)
            if vm is not None and not found:
                from ..errors import PointNotFound

                raise PointNotFound(f"no points of VM {cut(vm)!r}; 'repo-engine points' lists "
                                    "the points of every VM")
            decisions = [{"id": d.id, "vm": d.vm, "time": _iso(d.time), "keep": d.keep,
                          "reasons": list(d.reasons)} for d in found]
            remove = [d.id for d in found if not d.keep]
        gc_report = None
        if dry_run:
            report = ForgetReport(dry_run=True)
        elif prune:
            from ..maintenance.gc import forget_and_collect

            report, gc_report = forget_and_collect(repository, remove,
                                                   tick=progress.bar("forget", len(remove)))
        else:
            report = forget_points(repository, remove,
                                   tick=progress.bar("forget", len(remove)))
        report.decisions = decisions
    if as_json:
        emit_json(report, gc=None if gc_report is None else asdict(gc_report))
        return
    if decisions:  # one write: a long history has thousands of lines
        click.echo("\n".join(f"{'keep  ' if d['keep'] else 'remove'} {d['id'][:8]}  "
                             f"{shown(d.get('vm', ''))}@{d.get('time', '')}  "
                             f"{', '.join(d['reasons'])}"
                             for d in decisions))
    for line in _forget_summary(len(remove), sum(d["keep"] for d in decisions),
                                len(set(report.rewritten)), dry_run, gc_report is not None):
        click.echo(line)
    if gc_report is not None:
        _echo_gc(gc_report)


def _forget_summary(removed: int, kept: int, merged: int, dry_run: bool,
                    pruned: bool) -> list[str]:
    """What forget did or would do, including what happens to the points built on a removed
    one: they take over its changes (its delta is merged into theirs), so they still restore."""
    from ..units import plural

    if dry_run:
        lines = [f"would remove {plural(removed, 'point')} and keep {kept} (dry run, nothing "
                 "changed)"]
        if removed:
            lines.append("points built on a removed point would take over its changes, so they "
                         "still restore; no data is deleted until gc")
        return lines
    lines = [f"removed {plural(removed, 'point')}, kept {kept}"]
    if merged:
        lines.append(f"{plural(merged, 'point')} built on removed points took over their "
                     "changes (merged into their own block maps)")
    if removed and not pruned:
        lines.append("no data is deleted until gc: run 'repo-engine gc' (or forget --prune)")
    return lines


def _protect(repo: RepoAddress, point: str, protected: bool, as_json: bool) -> None:
    from ..maintenance.forget import set_protected
    from ..units import shown

    with open_repo(repo) as repository:
        record = set_protected(repository, repository.find_point(point), protected)
    if as_json:
        emit_json(id=record.id, protected=record.protected)
    else:
        state = "protected" if record.protected else "not protected"
        click.echo(f"point {record.id[:8]} ({shown(record.vm)}@{record.time}) is {state}")


@click.command()
@repo_argument
@click.argument("point")
@json_option
def protect(repo: RepoAddress, point: str, as_json: bool) -> None:
    """Pin POINT so that no forget policy removes it.

    \b
    Example:
      repo-engine protect /backup/repo web1@2026-11-24
    """
    _protect(repo, point, True, as_json)


@click.command()
@repo_argument
@click.argument("point")
@json_option
def unprotect(repo: RepoAddress, point: str, as_json: bool) -> None:
    """Unpin POINT (policies may remove it again)."""
    _protect(repo, point, False, as_json)


def _counts(doc: dict) -> str:
    """`under counted 0, over counted 2`: a dict of counters in words, not a Python repr."""
    return ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in doc.items())


def _echo_gc(r: object) -> None:
    from ..maintenance.gc import GcReport
    from ..units import plural

    assert isinstance(r, GcReport)
    head = "gc (dry run, nothing deleted)" if r.dry_run else f"gc ({r.mode})"
    verb = "would free" if r.dry_run else "freed"
    click.echo(f"{head}: {verb} {human_bytes(max(r.freed_bytes, 0))} in {r.seconds:.2f} s")
    click.echo(f"  chunks: {r.candidates} unused, {r.chunks_dropped} dropped "
               f"({human_bytes(r.stored_bytes_dropped)}), {r.resurrected} kept for running "
               f"backups")
    click.echo(f"  packs: {r.packs_repacked} repacked into {r.packs_written}, "
               f"{r.packs_deleted} deleted, "
               f"{plural(r.orphan_packs_deleted, 'orphan pack')} deleted")
    click.echo(f"  {plural(r.maps_deleted, 'block map')} and "
               f"{plural(r.manifests_deleted, 'manifest')} deleted")
    if r.tmp_files_deleted:
        click.echo(f"  {plural(r.tmp_files_deleted, 'temporary file')} of killed writers "
                   "deleted")
    if r.waited_seconds >= 0.01:
        click.echo(f"  waited {r.waited_seconds:.2f} s for running backups")
    for msg in r.counts_damaged:
        click.echo(f"  counts damaged, recounted first: {msg}")
    if r.recount:
        click.echo(f"  recount: {_counts(r.recount)}")
    for msg in r.damaged_packs_skipped:
        click.echo(f"  not repacked (damaged): {msg}")
    _echo_shared_gc(r)


def _echo_shared_gc(r: object) -> None:
    """The plans of a shared repository's gc and what a repack would cost."""
    from ..maintenance.gc import GcReport

    if type(r) is GcReport:  # a local gc's: shared_gc.py is not loaded for it (20 ms)
        return
    from ..maintenance.shared_gc import SharedGcReport
    from ..units import plural

    if not isinstance(r, SharedGcReport):
        return
    click.echo(f"  plans: {r.plans_swept} swept, {r.plans_pending} pending (grace "
               f"{r.grace_seconds:g} s); planned {plural(r.candidates, 'chunk')}, "
               f"{plural(r.planned_packs, 'pack')}, {plural(r.planned_maps, 'block map')}, "
               f"{plural(r.planned_objects, 'unknown object')}")
    if r.packs_written:
        click.echo(f"  repacked: read back {human_bytes(r.repacked_read_bytes)} of "
                   f"{plural(r.packs_repacked, 'partly used pack')}, wrote "
                   f"{human_bytes(r.repacked_written_bytes)} in {plural(r.packs_written, 'pack')}"
                   f", {plural(r.repacked_requests, 'request')}; the old packs "
                   f"({human_bytes(r.repacked_old_bytes)}) are deleted by a sweep")
    if r.repack_packs:
        click.echo(f"  a repack of {plural(r.repack_packs, 'partly used pack')} would read "
                   f"{human_bytes(r.repack_read_bytes)}, write "
                   f"{human_bytes(r.repack_write_bytes)} in "
                   f"{plural(r.repack_requests, 'request')} and "
                   f"free {human_bytes(r.repack_reclaims_bytes)} (not done: 'gc --repack' "
                   f"does it)")


@click.command()
@repo_argument
@click.option("--dry-run", is_flag=True, help="Report what a full gc would reclaim; change nothing.")
@click.option("--full", is_flag=True, help="Recount every reference (mark and sweep) first.")
@click.option("--max-unused", type=NumberRange(0, 100), default=10.0, show_default=True,
              help="Repack packs with more than this percentage of unused bytes.")
@click.option("--repack", is_flag=True,
              help="Shared repository: rewrite the packs over --max-unused (reads their used "
                   "chunks back); without it gc only drops wholly unused packs and reports "
                   "what a repack would cost. A local repository always repacks.")
@click.option("--wait-timeout", type=NumberRange(0, MAX_SECONDS), default=None, metavar="SECONDS",
              show_default="wait as long as it takes",
              help="Give up (safely) after waiting this long for running backups.")
@click.option("--grace", metavar="DURATION", default=None, show_default="24h",
              help="Shared repository: delete what a plan doomed only this long after the plan "
                   "and after the last backup that may use it ended (e.g. 0s, 30min, 24h).")
@json_option
def gc(repo: RepoAddress, dry_run: bool, full: bool, max_unused: float, repack: bool,
       wait_timeout: float | None, grace: str | None, as_json: bool) -> None:
    """Reclaim chunks, maps and packs no restore point uses. Backups may keep running.

    \b
    Examples:
      repo-engine gc /backup/repo
      repo-engine gc /backup/repo --full --max-unused 5
      repo-engine gc s3://bucket/repo --repack --max-unused 30
    """
    from ..maintenance.gc import gc as run_gc
    from ..units import parse_seconds

    seconds = None if grace is None else parse_seconds(grace, "--grace")
    with open_repo(repo) as repository, Progress() as progress:
        report = run_gc(repository, full=full, dry_run=dry_run, max_unused=max_unused,
                        wait_timeout=wait_timeout, tick=spinner(progress, "gc"), grace=seconds,
                        repack=repack)
    if as_json:
        emit_json(report)
    else:
        _echo_gc(report)


@click.command()
@repo_argument
@click.option("--repair", is_flag=True,
              help="Rewrite damaged or missing manifests from the catalog and recount "
                   "references, under the maintenance lock, before verifying.")
@json_option
def verify(repo: RepoAddress, repair: bool, as_json: bool) -> None:
    """Check the metadata: every point resolves, every chunk it uses is indexed in a pack whose
    trailer agrees, the reference counts are right; list orphans. Exit code 3 on damage.

    \b
    Example:
      repo-engine verify /backup/repo --json
    """
    from ..maintenance.verify import verify as run_verify
    from ..units import plural

    repaired: list[str] = []
    with open_repo(repo, shared="verify") as repository, Progress() as progress:
        if repair:
            from ..maintenance.gc import recount
            from ..maintenance.verify import repair_manifests
            from ..repository.locks import MAINTENANCE

            with repository.lock(MAINTENANCE, "verify --repair"):
                repaired = repair_manifests(repository)
                recount(repository, strict=False)
        report = run_verify(repository, tick=progress.bar("packs", len(repository.index.all_packs())))
    if as_json:
        emit_json(report, ok=report.ok, manifests_rewritten=repaired)
    else:
        for point_id in repaired:
            click.echo(f"rewrote the manifest of point {point_id} from the catalog")
        click.echo(f"verified {plural(report.points, 'point')}, "
                   f"{plural(report.maps, 'block map')}, {plural(report.refs, 'chunk')}, "
                   f"{plural(report.packs, 'pack')} in {report.seconds:.2f} s")
        for msg in report.errors:
            click.echo(f"ERROR: {msg}")
        for msg in report.warnings:
            click.echo(f"warning: {msg}")
        for kind, names in report.orphans.items():
            if names:
                click.echo(f"orphan {kind} (unused; gc removes them): {len(names)} "
                           f"({', '.join(n[:12] for n in names[:5])})")
        _echo_affected(report.affected)
        click.echo("no errors found" if report.ok else plural(len(report.errors), "error"))
    if not report.ok:
        _exit_damage(f"verify found {plural(len(report.errors), 'error')}; affected points: "
                     f"{', '.join(p[:8] for p in report.damaged_points) or 'none'}")


def _echo_affected(affected: list) -> None:
    from ..units import plural, shown

    for a in affected:
        ranges = ", ".join(f"[{o}, {o + n})" for o, n in a.extents[:4])
        more = " ..." if len(a.extents) > 4 else ""
        click.echo(f"  affects point {a.point[:8]} ({shown(a.vm)}@{a.time}) disk "
                   f"{shown(a.disk)}: {plural(a.blocks, 'block')} at bytes {ranges}{more}")


@click.command()
@repo_argument
@click.option("--read-data-subset", "subset", metavar="PERCENT|n/t",
              help="Check only the least recently scrubbed PERCENT of the data, or slice n of t.")
@click.option("--max-duration", metavar="DURATION",
              help="Stop starting new packs after this long: numbers with s, min, h, d, e.g. "
                   "30min, 2h, 1h30min. A bare 'm' is refused as ambiguous.")
@click.option("--repair", is_flag=True,
              help="Quarantine damaged chunks, heal them from good copies, make the next backup "
                   "re-read the affected blocks (that backup heals the points using them), mark "
                   "points that cannot heal yet as damaged.")
@click.option("--workers", type=WORKERS, default=None,
              show_default="the number of CPUs",
              help="Verification threads.")
@click.option("--no-key", "no_key", is_flag=True,
              help="Encrypted repository: check the stored bytes of every object against their "
                   "checksums without the key (no passphrase asked, nothing written), e.g. on "
                   "the storage host.")
@json_option
def scrub(repo: RepoAddress, subset: str | None, max_duration: str | None, repair: bool,
          workers: int | None, no_key: bool, as_json: bool) -> None:
    """Read the chunk data back and check every chunk against its id. Exit code 3 on damage.

    \b
    Examples:
      repo-engine scrub /backup/repo --read-data-subset 10% --max-duration 2h
      repo-engine scrub /backup/repo --repair
      repo-engine scrub s3://bucket/repo --no-key
    """
    from ..maintenance.scrub import scrub as run_scrub
    from ..units import parse_seconds, plural

    if no_key:
        if subset or max_duration or repair:
            raise click.UsageError("--no-key checks every object whole: it takes no "
                                   "--read-data-subset, --max-duration or --repair")
        _scrub_stored(repo, workers, as_json)
        return
    limit = parse_seconds(max_duration, "--max-duration") if max_duration else None
    with open_repo(repo, shared="scrub") as repository, Progress() as progress:
        total = sum(p.size for p in repository.index.all_packs())
        report = run_scrub(repository, subset=subset, max_duration=limit, repair=repair,
                           workers=workers, tick=progress.bar("scrub", total))
    if as_json:
        emit_json(report, ok=report.ok)
    else:
        _echo_scrub(report)
    if not report.ok:
        chunks, points = len(report.damaged), len({a.point for a in report.affected})
        found = "left" if repair else "found"
        _exit_damage(f"scrub {found} {plural(chunks, 'damaged chunk')} used by "
                     f"{plural(points, 'point')}"
                     + ("" if repair else "; 'repo-engine scrub --repair' heals what it can"))


def _scrub_stored(repo: RepoAddress, workers: int | None, as_json: bool) -> None:
    import os
    from contextlib import closing

    from ..maintenance.stored_scrub import scrub_stored
    from ..repository.location import open_stored
    from ..units import format_rate, plural

    opened = open_stored(repo.location, settings=repo.settings(), cache_dir=repo.cache_dir)
    with closing(opened):
        report = scrub_stored(opened, workers=workers or max(2, os.cpu_count() or 2))
    if as_json:
        emit_json(report, ok=report.ok)
    else:
        named = {"journal": "journal object", "keys": "key record"}
        counts = ", ".join(plural(n, named.get(kind, kind.rstrip("s")))
                           for kind, n in report.objects.items())
        click.echo(f"checked the stored bytes without the key: {counts}; "
                   f"{plural(report.chunks_checked, 'chunk')}, {human_bytes(report.bytes_read)} "
                   f"in {report.seconds:.2f} s ({format_rate(report.bytes_read, report.seconds)})")
        for line in report.damaged[:20]:
            click.echo(f"DAMAGED {line}")
        if len(report.damaged) > 20:
            click.echo(f"... {plural(len(report.damaged) - 20, 'more damaged object')}")
        if report.ok:
            click.echo("no damage found")
    if not report.ok:
        damaged = plural(len(report.damaged), "damaged object or chunk",
                         "damaged objects or chunks")
        _exit_damage(f"scrub --no-key found {damaged}, "
                     f"the first: {report.damaged[0]}; 'repo-engine scrub' with the key says "
                     "which points they affect")


def _echo_scrub(report: object) -> None:
    from ..maintenance.scrub import ScrubReport
    from ..units import format_rate, plural

    assert isinstance(report, ScrubReport)
    click.echo(f"scrubbed {report.packs_scrubbed} of {plural(report.packs_total, 'pack')}: "
               f"{plural(report.chunks_checked, 'chunk')}, {human_bytes(report.raw_bytes)} in "
               f"{report.seconds:.2f} s ({format_rate(report.raw_bytes, report.seconds)}); "
               f"{report.packs_never_scrubbed} never scrubbed"
               + ("; stopped at --max-duration" if report.stopped_early else ""))
    for d in report.damaged[:20]:
        click.echo(f"DAMAGED chunk ref {d['ref']}: {d['reason']}")
    if len(report.damaged) > 20:
        click.echo(f"... {plural(len(report.damaged) - 20, 'more damaged chunk')}")
    _echo_affected(report.affected)
    for line in report.repair.summary() if report.repair else []:
        click.echo(f"repair: {line}")
    if report.ok:
        click.echo("no damage found")


def _unshared_directory(repo: RepoAddress) -> Path | None:
    """The directory of a local repository of one writer, which rebuild-index and unlock work
    on by path (they report a missing or damaged config their own way); None for a shared
    repository, which is opened instead."""
    from ..errors import RepoError
    from ..repository.config import read_config
    from ..repository.location import is_remote
    from ..repository.store.local import LocalStore

    if is_remote(repo.location):
        return None
    path = Path(repo.location)
    try:
        return None if read_config(LocalStore(path)).shared else path
    except RepoError:
        return path


@click.command("rebuild-index")
@repo_argument
@json_option
def rebuild_index(repo: RepoAddress, as_json: bool) -> None:
    """Recreate the index (chunks, packs, catalog, counts) from what the repository stores.

    A local repository's index is rebuilt from its packs and manifests alone. For a shared
    repository (s3:// or init --shared) the truth is the journal in the store: this rebuilds
    only this host's cache of it, from the newest checkpoint and the journal entries after it,
    and reads no pack and no map.

    \b
    Examples:
      repo-engine rebuild-index /backup/repo
      repo-engine rebuild-index s3://backups/vms
    """
    from ..maintenance.rebuild import rebuild_cache
    from ..maintenance.rebuild import rebuild_index as run_rebuild
    from ..units import plural

    path = _unshared_directory(repo)
    if path is None:  # this host's cache, from the journal
        with repo.open(rebuilding=True) as repository:
            report = rebuild_cache(repository)
    else:
        report = run_rebuild(path)
    if as_json:
        emit_json(report)
        return
    click.echo(f"rebuilt the index: {plural(report.packs, 'pack')}, "
               f"{plural(report.chunks, 'chunk')}, {plural(report.points, 'point')} in "
               f"{report.seconds:.2f} s")
    for msg in report.unreadable_packs + report.unreadable_manifests:
        click.echo(f"skipped: {msg}")


@click.command()
@repo_argument
@click.option("--force", is_flag=True, help="Also remove locks of live processes or other hosts.")
@json_option
def unlock(repo: RepoAddress, force: bool, as_json: bool) -> None:
    """Remove stale locks left by processes that died (and, in a shared repository, the leases
    of any host that this host has seen unchanged for their duration: run it again later for
    the others).

    \b
    Example:
      repo-engine unlock /backup/repo
    """
    from ..maintenance.rebuild import unlock as run_unlock
    from ..maintenance.rebuild import unlock_shared
    from ..units import plural

    path = _unshared_directory(repo)
    if path is None:  # this host's locks in its cache, every host's leases in the store
        with repo.open() as repository:
            report = unlock_shared(repository, force=force)
    else:
        report = run_unlock(path, force=force)
    if as_json:
        emit_json(report)
        return
    for doc in report.removed:
        click.echo(f"removed the {_holder(doc)}")
    for doc in report.kept:
        if "free_from" in doc:  # a store's lease or lock that may still be live
            click.echo(_kept_line(doc))
    click.echo(f"removed {plural(len(report.removed), 'lock')}")


def _kept_line(doc: dict) -> str:
    """Why `unlock` kept a store's lease or lock, and what to do."""
    from ..repository.leases import ELSEWHERE, UNREADABLE_HOST

    if doc["host"] == UNREADABLE_HOST:
        return (f"kept the {_lock_kind(doc)} {doc['file']}: it cannot be read, so it never ends; "
                "if no repo-engine command on any host holds it, run 'repo-engine unlock --force'")
    holder = _holder(doc)
    if not doc["free_from"]:  # no cache to time it in, or times that cannot be read
        return (f"kept the {holder}: this host cannot tell when it ends; if that process is "
                "gone, run 'repo-engine unlock --force'")
    why = f" ({ELSEWHERE})" if doc["elsewhere"] else ""
    return (f"kept the {holder}: it may still be live{why}, seen unchanged for "
            f"{doc['seen_seconds']:.0f} s; run 'repo-engine unlock' again after "
            f"{doc['free_from']} (this host's clock), or with --force if that process is gone")


def _holder(doc: dict) -> str:
    """The lease or lock of a record as `unlock` names it; its command and host, written by
    any host sharing the store, shown escaped."""
    from ..units import shown

    return (f"{_lock_kind(doc)} of \"{shown(doc['command'])}\" (pid {doc['pid']} on "
            f"{shown(doc['host'])})")


def _lock_kind(doc: dict) -> str:
    return "lease" if doc["kind"] == "lease" else f"{doc['kind']} lock"
