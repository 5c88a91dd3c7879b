"""`--changed` in both shapes: `[[offset, length], ...]` and VMware's DiskChangeInfo exactly as
pyVmomi's JSON encoder writes it (one result, or the list of successive QueryChangedDiskAreas
calls). Bad shapes are one-line usage errors that name the problem, never a traceback."""

from __future__ import annotations

import json

import pytest
from pyVmomi import vim
from pyVmomi.VmomiJSONEncoder import VmomiJSONEncoder

from helpers import cli, disk_of, restore_bytes, tree_digest
from repo_engine.backup.extents import parse_extents
from repo_engine.errors import UsageError
from test_bad_input import setup  # noqa: F401  (fixture: a repository with one backup of a disk)

Info = vim.VirtualMachine.DiskChangeInfo
Extent = vim.VirtualMachine.DiskChangeInfo.DiskChangeExtent
CAP = 1 << 20


def _info(start: int, length: int, areas: list[tuple[int, int]]) -> Info:
    return Info(startOffset=start, length=length,
                changedArea=[Extent(start=o, length=n) for o, n in areas])


def _pyvmomi_json(obj: object, **options) -> object:
    return json.loads(json.dumps(obj, cls=VmomiJSONEncoder, **options))


@pytest.mark.parametrize("strip", [False, True])
def test_pyvmomi_encodings_parse_like_pairs(strip):
    one = _info(0, CAP, [(0, 65536), (131072, 4096)])
    calls = [_info(0, CAP // 2, [(4096, 10)]), _info(CAP // 2, CAP // 2, [(CAP - 1, 1)]),
             _info(CAP, 0, [])]
    cases = [(one, [[0, 65536], [131072, 4096]]), (calls, [[4096, 10], [CAP - 1, 1]]),
             (_info(0, CAP, []), [])]
    for obj, pairs in cases:
        doc = _pyvmomi_json(obj, strip_dynamic=strip)
        assert parse_extents(doc, CAP, "x").tolist() == parse_extents(pairs, CAP, "x").tolist()


def _doc(**change) -> dict:
    doc = _pyvmomi_json(_info(0, CAP, [(0, 10)]))
    doc.update(change)
    return doc


def _area(**change) -> dict:
    doc = _doc()
    doc["changedArea"][0].update(change)
    return doc


BAD = [
    ("not an object or list", 7, "expected [[offset, length], ...] or VMware's DiskChangeInfo"),
    ("missing startOffset", {"length": CAP, "changedArea": []}, "startOffset is missing"),
    ("negative length", _doc(length=-1), "length is missing or not a non-negative integer"),
    ("boolean offset", _doc(startOffset=True), "startOffset is missing"),
    ("wrong vimtype", _doc(_vimtype="vim.Folder"), "_vimtype is 'vim.Folder', expected "
                                                   "vim.VirtualMachine.DiskChangeInfo"),
    ("changedArea not a list", _doc(changedArea={}), "changedArea is not a list"),
    ("area not an object", _doc(changedArea=[[0, 10]]), "changedArea 0 is not an object"),
    ("area with string length", _area(length="10"), "changedArea 0: length is missing"),
    ("area wrong vimtype", _area(_vimtype="x"), "changedArea 0: _vimtype is 'x'"),
    ("area past the disk", _area(start=CAP - 5), f"ends at {CAP + 5}, beyond the disk's capacity"),
    ("area outside its info", {"startOffset": 0, "length": 100, "changedArea":
                               [{"start": 50, "length": 60}]}, "lies outside the range [0, 100)"),
    ("does not cover the disk", _doc(length=CAP // 2), f"nothing is known from byte {CAP // 2}"),
    ("gap between calls", [_doc(length=4096), _doc(startOffset=8192, length=CAP, changedArea=[])],
     "nothing is known from byte 4096"),
    ("starts past 0", _doc(startOffset=4096, changedArea=[]), "nothing is known from byte 0"),
    ("mixed shapes", [_doc(), [0, 10]], "DiskChangeInfo 1 is not an object"),
    ("huge span", _doc(startOffset=0, length=2**70), None),
]


@pytest.mark.parametrize("name,doc,message", BAD, ids=[b[0] for b in BAD])
def test_bad_shapes_are_named(name, doc, message):
    if message is None:   # not an error: a span past the end is cut at the capacity
        assert parse_extents(doc, CAP, "x").tolist() == [[0, 10]]
        return
    with pytest.raises(UsageError) as ei:
        parse_extents(doc, CAP, "x")
    assert message in str(ei.value) and "\n" not in str(ei.value)


def _clip(changes: list[list[int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of `changes` inside [lo, hi)."""
    cut = [(max(o, lo), min(o + n, hi)) for o, n in changes]
    return [(a, b - a) for a, b in cut if b > a]


def test_backup_with_a_pyvmomi_change_info_restores_exactly(tmp_path, capsys, setup):
    """Two successive QueryChangedDiskAreas results, as pyVmomi encodes them."""
    repo, model = setup
    changes = model.random_changes(6, 50_000)
    half = model.capacity // 2
    calls = [_info(0, half, _clip(changes, 0, half)),
             _info(half, model.capacity - half, _clip(changes, half, model.capacity))]
    path = tmp_path / "info.json"
    path.write_text(json.dumps(calls, cls=VmomiJSONEncoder))
    result = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                 "--changed", f"d={path}", "--json")
    assert result.code == 0, result.err
    assert disk_of(result.json()["point"], "d")["read_mode"] == "changed"
    restored = restore_bytes(capsys, repo, result.json()["point"]["id"][:12], "d", tmp_path / "o.img")
    assert restored == model.copy_of_content()


def _deep(path):
    path.write_text("[" * 100_000 + "]" * 100_000)
    return path


@pytest.mark.parametrize("make,message", [
    (_deep, "is nested too deeply"),
    (lambda p: (p.mkdir(), p)[1], "cannot be read: Is a directory"),
], ids=["nested 100000 deep", "directory"])
def test_unreadable_extents_files_are_usage_errors(tmp_path, capsys, setup, make, message):
    repo, model = setup
    before = tree_digest(repo)
    bad = make(tmp_path / "bad.json")
    result = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                 "--changed", f"d={bad}")
    assert result.code == 2, result.err
    assert result.err.startswith(f"repo-engine: error: extents file {bad} {message}")
    assert result.err.count("\n") == 1, result.err
    assert tree_digest(repo) == before
