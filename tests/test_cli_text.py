"""The text reports users read: words, singular and plural, one unit system (IEC sizes, MiB/s),
no Python reprs, no ratio where nothing was stored; durations that cannot be misread; and wrong
paths that say what to do."""

from __future__ import annotations

import re

import numpy as np
import pytest

from helpers import KIB, MIB, DiskModel, cli, write_extents
from test_maint_damage import place_of_block

BS = 16 * KIB


def assert_readable(out: str) -> None:
    """No Python repr, no '1 chunks', no decimal units (MB, MB/s) anywhere in a report."""
    assert not re.search(r"[{\[]'|':|\bNone\b|\bTrue\b|\bFalse\b", out), out
    assert not re.search(r"(?<![\d.])1 (?:new |non-zero |zero |block |orphan )?[A-Za-z]+s\b",
                         out), out
    assert not re.search(r"\b[kMGT]B\b|MB/s", out), out
    assert "0.0x" not in out, out


@pytest.fixture
def one_vm(tmp_path, capsys):
    """A repository holding two points of one VM with one disk: the singular cases."""
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB").code == 0
    model = DiskModel(tmp_path / "d.img", 1 * MIB, np.random.default_rng(1))
    model.write(0, np.random.default_rng(2).integers(0, 256, BS, dtype=np.uint8).tobytes())
    return repo, model


def backup(capsys, repo, model, *extra):
    result = cli(capsys, "backup", "image", repo, "--vm", "web1", "--disk",
                 f"sda={model.path}", *extra)
    assert result.code == 0, result.err
    assert_readable(result.out)
    return result.out.splitlines()


def test_backup_reports(tmp_path, capsys, one_vm):
    repo, model = one_vm
    first = backup(capsys, repo, model)
    assert re.fullmatch(r"point [0-9a-f]{8}  web1@\S+Z", first[0])
    assert first[1] == "  disk sda: read its allocated extents, full map"
    assert re.fullmatch(r"  read 16\.0 KiB in \d+\.\d\d s \(\d+\.\d MiB/s\)", first[2])
    assert first[3].startswith("  stored 1 new chunk: 16.0 KiB, ")
    assert "dedup 1x" in first[3]

    # nothing changed: everything read again, nothing new stored, and no ratio claimed
    again = backup(capsys, repo, model)
    assert again[1].startswith("  disk sda: read whole, delta on ")
    assert "(no change list given: read everything, store only new)" in again[1]
    assert again[3] == "  stored nothing new: the 1 non-zero block read was already in the " \
                       "repository"
    empty = write_extents(tmp_path / "none.json", [])
    quiet = backup(capsys, repo, model, "--changed", f"sda={empty}")
    assert quiet[1].startswith("  disk sda: read the changed extents, delta on ")
    assert "(a chain of 3 maps)" in quiet[1]
    assert quiet[3] == "  stored nothing new: nothing to read"


def test_points_show_stats(capsys, one_vm):
    repo, model = one_vm
    backup(capsys, repo, model, "--tag", "nightly")
    points = cli(capsys, "points", repo).out
    assert_readable(points)
    lines = points.splitlines()
    assert lines[0].split() == ["ID", "VM@TIME", "DISKS", "LOGICAL", "TAGS"]
    assert lines[1].split()[2:] == ["1", "16.0", "KiB", "nightly"]
    assert lines[-1] == "1 point"
    shown = cli(capsys, "show", repo, "web1@latest").out
    assert_readable(shown)
    assert "  tags: nightly\n" in shown
    assert "  disk sda: 1.0 MiB, read its allocated extents, full map\n" in shown
    assert "    16.0 KiB read, 1 new chunk stored\n" in shown
    stats = cli(capsys, "stats", repo).out
    assert_readable(stats)
    assert stats.splitlines()[0] == "points: 1 (1 VM)"
    assert "dedup ratio: 1x  compression ratio: " in stats


def test_stats_of_an_empty_repository_claims_no_ratio(tmp_path, capsys):
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo).code == 0
    stats = cli(capsys, "stats", repo).out
    assert_readable(stats)
    assert stats.splitlines()[0] == "points: 0 (0 VMs)"
    assert stats.splitlines()[-1] == "dedup ratio: -  compression ratio: -  overall: -"


def test_forget_dry_run_gc_verify(capsys, one_vm):
    repo, model = one_vm
    backup(capsys, repo, model)
    model.write(0, b"x" * 10)
    backup(capsys, repo, model)
    dry = cli(capsys, "forget", repo, "--keep-last", "1", "--dry-run")
    assert dry.code == 0, dry.err
    assert_readable(dry.out)
    lines = dry.out.splitlines()
    assert lines[0].startswith("keep   ") and lines[0].endswith("  last")
    assert lines[1].startswith("remove ")
    assert lines[2] == "would remove 1 point and keep 1 (dry run, nothing changed)"
    assert "would take over its changes, so they still restore" in lines[3]
    done = cli(capsys, "forget", repo, "--keep-last", "1")
    assert_readable(done.out)
    assert "removed 1 point, kept 1" in done.out
    assert "1 point built on removed points took over their changes" in done.out
    assert "no data is deleted until gc" in done.out

    gc = cli(capsys, "gc", repo)
    assert gc.code == 0, gc.err
    assert_readable(gc.out)
    lines = gc.out.splitlines()
    assert re.fullmatch(r"gc \(incremental\): freed \d+\.\d KiB in \d+\.\d\d s", lines[0])
    assert lines[1].startswith("  chunks: 1 unused, 1 dropped (")
    assert re.fullmatch(r"  \d+ block maps? and \d+ manifests? deleted", lines[3])
    full = cli(capsys, "gc", repo, "--full")
    assert_readable(full.out)
    assert "  recount: under counted 0, over counted 0" in full.out

    verify = cli(capsys, "verify", repo)
    assert verify.code == 0, verify.out
    assert_readable(verify.out)
    assert re.fullmatch(r"verified 1 point, 1 block map, 1 chunk, 1 pack in \d+\.\d\d s\n"
                        r"no errors found\n", verify.out)


def test_scrub_reports_and_repair_in_words(capsys, one_vm):
    repo, model = one_vm
    out = backup(capsys, repo, model)
    clean = cli(capsys, "scrub", repo)
    assert clean.code == 0, clean.out
    assert_readable(clean.out)
    assert re.fullmatch(r"scrubbed 1 of 1 pack: 1 chunk, 16\.0 KiB in \d+\.\d\d s "
                        r"\(\d+\.\d MiB/s\); 0 never scrubbed\nno damage found\n", clean.out)
    # flip a byte of the one chunk: scrub finds it, --repair says what it did in words
    point = out[0].split()[1]
    pack, offset, stored = place_of_block(repo, point, 0)
    with open(pack, "r+b") as f:
        f.seek(offset + stored // 2)
        byte = f.read(1)
        f.seek(offset + stored // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    damaged = cli(capsys, "scrub", repo, "--repair")
    assert damaged.code == 3
    assert_readable(damaged.out)
    assert "  affects point " in damaged.out and "disk sda: 1 block at bytes [0, 16384)" \
        in damaged.out
    repair = next(line for line in damaged.out.splitlines() if line.startswith("repair: "))
    assert "quarantined 1" in repair and "{" not in repair


@pytest.mark.parametrize("damaged", [1, 2])
def test_verify_counts_its_errors_in_words(capsys, one_vm, damaged):
    repo, model = one_vm
    for _ in range(2):
        backup(capsys, repo, model)
    for manifest in sorted((repo / "points").glob("*.point"))[:damaged]:
        data = bytearray(manifest.read_bytes())
        data[40] ^= 0x55
        manifest.write_bytes(bytes(data))
    result = cli(capsys, "verify", repo)
    assert result.code == 3
    errors = "1 error" if damaged == 1 else f"{damaged} errors"
    assert result.out.endswith(f"\n{errors}\n")
    assert f"verify found {errors}; affected points: " in result.err


def test_a_shared_gc_counts_its_requests_in_words(capsys):
    """A repack done and one told of, each of a single request (rare in a real run: set
    here)."""
    from repo_engine.cli.maintenance_cmd import _echo_shared_gc
    from repo_engine.maintenance.shared_gc import SharedGcReport

    _echo_shared_gc(SharedGcReport(packs_repacked=1, packs_written=1, repacked_requests=1,
                                   repack_packs=1, repack_requests=1))
    out = capsys.readouterr().out
    assert_readable(out)
    assert "in 1 pack, 1 request; the old packs" in out and " in 1 request and free " in out


@pytest.mark.parametrize("args, fragment", [
    (("forget", "--keep-within", "6m"), "--keep-within '6m': 'm' is ambiguous"),
    (("forget", "--keep-within", "1y6m"), "write 'min' for minutes or 'mo' for months"),
    (("scrub", "--max-duration", "30m"), "--max-duration '30m': 'm' is ambiguous"),
    (("scrub", "--max-duration", "1h30m"), "(e.g. 30min)"),
    (("scrub", "--max-duration", "soon"), "not a duration"),
])
def test_ambiguous_or_bad_durations_are_refused(capsys, one_vm, args, fragment):
    repo, _ = one_vm
    result = cli(capsys, args[0], repo, *args[1:])
    assert result.code == 2, (result.code, result.err)
    assert fragment in result.err and len(result.err.strip().splitlines()) == 1


def test_durations_with_unambiguous_units(capsys, one_vm):
    from repo_engine.units import parse_seconds

    assert parse_seconds("90s") == 90 and parse_seconds("1h30min") == 5400
    assert parse_seconds("2h") == 7200 and parse_seconds("1d") == 86400
    repo, model = one_vm
    backup(capsys, repo, model)
    kept = cli(capsys, "forget", repo, "--keep-within", "6mo", "--dry-run")
    assert kept.code == 0, kept.err
    assert "within 6mo" in kept.out, "a reason is written the way the option is"
    assert cli(capsys, "forget", repo, "--keep-within", "1Y6MO", "--dry-run").code == 0
    assert cli(capsys, "scrub", repo, "--max-duration", "30min").code == 0


def test_backup_to_a_directory_that_is_not_a_repository_suggests_init(tmp_path, capsys,
                                                                      one_vm):
    _, model = one_vm
    for target in (tmp_path / "missing", tmp_path):
        result = cli(capsys, "backup", "image", target, "--vm", "v", "--disk",
                     f"sda={model.path}")
        assert result.code != 0
        assert "is not a repo-engine repository" in result.err
        assert f"repo-engine init {target}" in result.err


def test_init_does_not_create_a_missing_parent_unless_asked(tmp_path, capsys):
    nested = tmp_path / "typo" / "backups" / "repo"
    result = cli(capsys, "init", nested)
    assert result.code == 2
    assert f"the directory {nested.parent} does not exist" in result.err
    assert "--parents" in result.err
    assert not (tmp_path / "typo").exists(), "nothing created"
    assert cli(capsys, "init", nested, "--parents").code == 0
    assert cli(capsys, "points", nested).out == f"{'ID':8}  {'VM@TIME':45}  {'DISKS':>5}  " \
        f"{'LOGICAL':>10}  TAGS\n0 points\n"
