"""The `--json` documents: every command's fields and their types are pinned here and in
docs/JSON.md (a change to either must change both, and a rename bumps `version`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, write_extents

NUM = (int, float)
NULL = type(None)

DISK = {"key": str, "capacity": int, "block_size": int, "kind": str, "parent": (str, NULL),
        "links": int, "cursor": (str, NULL), "read_mode": str, "note": str,
        "logical_bytes": int, "counters": dict}
POINT = {"id": str, "vm": str, "time": str, "source": str, "consistency": str, "tags": [str],
         "protected": bool, "notes": [str], "damage": [str], "counters": dict, "disks": [DISK]}
BACKUP = {"bytes_read": int, "nonzero_blocks_read": int, "new_chunks": int,
          "new_raw_bytes": int, "new_bytes_stored": int, "dedup_ratio": (*NUM, NULL),
          "compression_ratio": (*NUM, NULL), "seconds": NUM, "mib_per_s": NUM}
AFFECTED = {"point": str, "vm": str, "time": str, "disk": str, "blocks": int, "extents": list}
DIFF = {"disk": str, "capacity_a": (int, NULL), "capacity_b": (int, NULL),
        "changed_blocks": int, "changed_bytes": int, "extents": list}
DECISION = {"id": str, "vm": str, "time": str, "keep": bool, "reasons": [str]}
GC = {"mode": str, "dry_run": bool, "forgets_finished": int, "maps_settled": int,
      "candidates": int, "resurrected": int, "chunks_dropped": int, "stored_bytes_dropped": int,
      "maps_deleted": int, "manifests_deleted": int, "orphan_packs_deleted": int,
      "tmp_files_deleted": int, "packs_repacked": int, "packs_written": int,
      "packs_deleted": int, "freed_bytes": int, "damaged_packs_skipped": [str],
      "recount": dict, "counts_damaged": [str], "waited_seconds": NUM, "seconds": NUM}
SHARED_GC = {**GC, "grace_seconds": NUM, "plans_swept": int, "plans_pending": int,
             "planned_packs": int, "planned_maps": int, "planned_objects": int,
             "packs_kept_live": int, "repack_packs": int, "repack_read_bytes": int,
             "repack_write_bytes": int, "repack_requests": int, "repack_reclaims_bytes": int,
             "repacked_read_bytes": int, "repacked_written_bytes": int,
             "repacked_requests": int, "repacked_old_bytes": int, "checkpoint": int,
             "entries_compacted": int, "uploads_aborted": int}

SCHEMAS = {
    "backup": {"point": POINT, "backup": BACKUP},
    "points": {"points": [POINT]},
    "show": {"point": POINT, "config": dict},
    "diff": {"disks": [DIFF]},
    "stats": {"points": int, "vms": int, "logical_bytes": int, "unique_raw_bytes": int,
              "stored_bytes": int, "pack_bytes": int, "chunks": int, "packs": int,
              "dedup_ratio": (*NUM, NULL), "compression_ratio": (*NUM, NULL),
              "total_ratio": (*NUM, NULL), "damaged_counters": [str]},
    "restore": {"point": str, "disk": str, "target": str, "capacity": int,
                "blocks_written": int, "zero_blocks": int, "chunks_read": int,
                "bytes_written": int, "seconds": NUM},
    "forget": {"removed": [str], "rewritten": [str], "decisions": [DECISION], "dry_run": bool,
               "gc": (dict, NULL)},
    "protect": {"id": str, "protected": bool},
    "gc": GC,
    "verify": {"points": int, "maps": int, "refs": int, "packs": int, "errors": [str],
               "warnings": [str], "orphans": dict, "affected": [AFFECTED],
               "damaged_points": [str], "seconds": NUM, "ok": bool,
               "manifests_rewritten": [str]},
    "scrub": {"packs_total": int, "packs_scrubbed": int, "packs_never_scrubbed": int,
              "chunks_checked": int, "bytes_read": int, "raw_bytes": int, "seconds": NUM,
              "mib_per_s": NUM, "stopped_early": bool, "damaged": [dict],
              "affected": [AFFECTED], "repair": (dict, type(None)), "ok": bool},
    "rebuild-index": {"packs": int, "chunks": int, "points": int, "duplicate_refs": int,
                      "unreadable_packs": [str], "unreadable_manifests": [str],
                      "recount": dict, "journal_seq": int, "seconds": NUM},
    "unlock": {"removed": [dict], "kept": [dict]},
    "key list": {"slots": [{"id": str, "kind": str, "label": str, "created": str,
                            "kdf": (dict, NULL)}], "unreadable": [str]},
    "key status": {"current_epoch": int, "epochs": [int], "keyring_generation": int,
                   "unlocked_by": str},
    "key retire": {"retiring": [int], "current": int, "points_rewritten": int,
                   "maps_rewritten": int, "packs_repacked": int, "objects_resealed": int,
                   "checkpoint": int, "remaining": dict, "dropped": [int], "epochs": [int],
                   "gc": SHARED_GC, "seconds": NUM},
}


def check(doc: object, schema: object, where: str) -> None:
    """`doc` has exactly the fields of `schema`, each of its type (lists: each element)."""
    if isinstance(schema, dict):
        assert isinstance(doc, dict), where
        assert sorted(doc) == sorted(schema), f"{where}: fields {sorted(doc)}"
        for key, sub in schema.items():
            check(doc[key], sub, f"{where}.{key}")
    elif isinstance(schema, list):
        assert isinstance(doc, list), where
        for i, item in enumerate(doc):
            check(item, schema[0], f"{where}[{i}]")
    else:
        types = schema if isinstance(schema, tuple) else (schema,)
        ok = isinstance(doc, types) and not (isinstance(doc, bool) and bool not in types)
        assert ok, f"{where}: {doc!r} is not {types}"


def run_json(capsys, *args: object) -> dict:
    result = cli(capsys, *args, "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert isinstance(doc, dict) and doc.pop("version") == 1, "every document is versioned"
    return doc


@pytest.fixture
def repo(tmp_path, capsys) -> Path:
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB").code == 0
    return repo


def test_every_command_prints_its_pinned_schema(tmp_path, capsys, repo):
    model = DiskModel(tmp_path / "d.img", 2 * MIB, np.random.default_rng(3))
    model.random_changes(4)
    first = run_json(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                     "--tag", "t")
    check(first, SCHEMAS["backup"], "backup")
    changes = write_extents(tmp_path / "e.json", model.random_changes(2))
    second = run_json(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                      "--changed", f"d={changes}")
    check(second, SCHEMAS["backup"], "backup (delta)")
    a, b = first["point"]["id"], second["point"]["id"]

    listing = run_json(capsys, "points", repo)
    check(listing, SCHEMAS["points"], "points")
    shown = run_json(capsys, "show", repo, b)
    check(shown, SCHEMAS["show"], "show")
    # a point is the same object wherever it appears
    assert listing["points"][1] == shown["point"] == second["point"]

    runs = {
        "diff": ("diff", repo, a, b),
        "stats": ("stats", repo),
        "restore": ("restore", repo, b, "--disk", "d", "--to", tmp_path / "o.img"),
        "protect": ("protect", repo, a),
        "verify": ("verify", repo),
        "scrub": ("scrub", repo),
        "gc": ("gc", repo, "--full"),
        "forget": ("forget", repo, "--keep-last", "1", "--dry-run"),
        "rebuild-index": ("rebuild-index", repo),
        "unlock": ("unlock", repo),
    }
    for name, args in runs.items():
        check(run_json(capsys, *args), SCHEMAS[name], name)
    check(run_json(capsys, "unprotect", repo, a), SCHEMAS["protect"], "unprotect")
    pruned = run_json(capsys, "forget", repo, "--keep-last", "1", "--prune")
    check(pruned, SCHEMAS["forget"], "forget --prune")
    check(pruned["gc"], GC, "forget --prune: gc")


def test_gc_of_a_shared_repository_prints_its_pinned_schema(tmp_path, capsys):
    repo = tmp_path / "shared"
    assert cli(capsys, "init", repo, "--shared", "--cache-dir", tmp_path / "cache").code == 0
    model = DiskModel(tmp_path / "d.img", 1 * MIB, np.random.default_rng(3))
    model.random_changes(4)
    run_json(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
             "--cache-dir", tmp_path / "cache")
    for args in ((), ("--repack", "--grace", "0s")):
        doc = run_json(capsys, "gc", repo, "--cache-dir", tmp_path / "cache", *args)
        check(doc, SHARED_GC, "gc (shared)")
        assert doc["mode"] == "shared"


def test_empty_listings_are_versioned_objects_and_ratios_null(capsys, repo):
    assert run_json(capsys, "points", repo) == {"points": []}
    stats = run_json(capsys, "stats", repo)
    check(stats, SCHEMAS["stats"], "stats")
    assert stats["dedup_ratio"] is None and stats["total_ratio"] is None
    assert stats["damaged_counters"] == []


def test_docs_describe_every_field():
    doc = (Path(__file__).parent.parent / "docs" / "JSON.md").read_text()

    def fields(schema: object):
        if isinstance(schema, dict):
            for key, sub in schema.items():
                yield key
                yield from fields(sub)
        elif isinstance(schema, list):
            yield from fields(schema[0])

    missing = {f for s in (*SCHEMAS.values(), SHARED_GC) for f in fields(s)
               if f"`{f}`" not in doc}
    assert not missing, f"docs/JSON.md does not describe {sorted(missing)}"
    for command in SCHEMAS:
        assert f"`{command}" in doc, command


def test_key_commands_print_their_pinned_schema(tmp_path, capsys, monkeypatch):
    from repo_engine.repository.crypto import slots
    from test_crypto_keys import SMALL

    monkeypatch.setattr(slots, "DEFAULT_SCRYPT", SMALL)
    monkeypatch.setenv("REPO_ENGINE_PASSWORD", "pinned")
    repo = tmp_path / "encrypted"
    assert cli(capsys, "init", repo, "--encryption", "--cache-dir", tmp_path / "cache").code == 0
    assert cli(capsys, "key", "export-recovery", repo, "--out", tmp_path / "r.pem").code == 0
    listed = run_json(capsys, "key", "list", repo)
    check(listed, SCHEMAS["key list"], "key list")
    assert [s["kdf"] is None for s in listed["slots"]] == [False, True]
    check(listed["slots"][0]["kdf"], {"name": str, "log_n": int, "r": int, "p": int,
                                      "memory": int}, "key list: kdf")
    check(run_json(capsys, "key", "status", repo, "--cache-dir", tmp_path / "cache"),
          SCHEMAS["key status"], "key status")
    assert cli(capsys, "key", "rotate", repo, "--cache-dir", tmp_path / "cache").code == 0
    retired = run_json(capsys, "key", "retire", repo, "--cache-dir", tmp_path / "cache")
    check(retired, SCHEMAS["key retire"], "key retire")
    assert retired["retiring"] == retired["dropped"] == [1]  # nothing was sealed under it
