"""`forget` by policy through the CLI: a policy that keeps nothing is refused before anything is
touched, and the newest point of each VM and disk set stays unless --allow-remove-latest."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, restore_bytes, tree_digest


@pytest.fixture
def repo_with_points(tmp_path, capsys):
    """Three points of VM `a` (the last one tagged `keep`) and one of VM `b`."""
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "16KiB").code == 0
    model = DiskModel(tmp_path / "a.img", 1 * MIB, np.random.default_rng(3))
    ids, content = [], {}
    for n in range(3):
        model.random_changes(2, 50_000)
        tags = ["--tag", "keep"] if n == 0 else []
        result = cli(capsys, "backup", "image", repo, "--vm", "a", "--disk", f"sda={model.path}",
                     "--json", *tags)
        assert result.code == 0, result.err
        ids.append(result.json()["point"]["id"])
        content[ids[-1]] = model.copy_of_content()
    other = DiskModel(tmp_path / "b.img", 1 * MIB, np.random.default_rng(4))
    result = cli(capsys, "backup", "image", repo, "--vm", "b", "--disk", f"sda={other.path}",
                 "--json")
    assert result.code == 0, result.err
    return repo, ids, content, result.json()["point"]["id"]


def _listed(capsys, repo) -> set[str]:
    return {p["id"] for p in cli(capsys, "points", repo, "--json").json()["points"]}


@pytest.mark.parametrize("args", [
    ["--keep-within", "0h"], ["--keep-within", "0d"], ["--keep-within", "0y0m"],
    ["--keep-last", "0"], ["--keep-daily", "0", "--keep-within", "0h"],
    ["--keep-within", "0h", "--allow-remove-latest"], ["--keep-last", "-3"],
])
def test_a_policy_that_keeps_nothing_is_a_usage_error(repo_with_points, capsys, args):
    repo, ids, _, b_point = repo_with_points
    before = tree_digest(repo)
    result = cli(capsys, "forget", repo, *args)
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repo-engine: error: "), result.err
    assert "Traceback" not in result.err
    assert _listed(capsys, repo) == {*ids, b_point}
    assert tree_digest(repo) == before


def test_the_newest_point_of_each_vm_stays_unless_allowed(repo_with_points, capsys, tmp_path):
    repo, ids, content, b_point = repo_with_points
    dry = cli(capsys, "forget", repo, "--keep-tag", "keep", "--dry-run", "--json")
    assert dry.code == 0, dry.err
    reasons = {d["id"]: d["reasons"] for d in dry.json()["decisions"]}
    assert reasons[ids[2]] == ["newest of its VM and disk set"]
    assert reasons[b_point] == ["newest of its VM and disk set"]
    assert reasons[ids[0]] == ["tag keep"] and reasons[ids[1]] == []

    result = cli(capsys, "forget", repo, "--keep-tag", "keep")
    assert result.code == 0, result.err
    assert _listed(capsys, repo) == {ids[0], ids[2], b_point}
    assert restore_bytes(capsys, repo, ids[2][:12], "sda", tmp_path / "o.img") == content[ids[2]]

    result = cli(capsys, "forget", repo, "--vm", "a", "--keep-tag", "keep",
                 "--allow-remove-latest")
    assert result.code == 0, result.err
    assert _listed(capsys, repo) == {ids[0], b_point}
    assert restore_bytes(capsys, repo, ids[0][:12], "sda", tmp_path / "o.img") == content[ids[0]]


def test_an_enormous_duration_keeps_everything(repo_with_points, capsys):
    repo, ids, _, b_point = repo_with_points
    result = cli(capsys, "forget", repo, "--keep-within", "9999y")
    assert result.code == 0, result.err
    assert _listed(capsys, repo) == {*ids, b_point}


def test_help_names_the_flag(capsys):
    result = cli(capsys, "forget", "--help")
    assert "--allow-remove-latest" in result.out


@pytest.mark.parametrize("field,value", [("time", 5), ("time", "not a time"), ("vm", None),
                                         ("disks", [{"map": "x"}]), ("tags", [1])])
def test_a_malformed_catalog_record_is_damage_to_a_policy_not_an_internal_error(
        repo_with_points, capsys, field, value):
    """A catalog record whose check matches but whose fields a policy reads are malformed (a
    writer's bug, an index version without checks): the policy reports damage (exit 3, one
    line pointing to rebuild-index) and removes nothing."""
    from repo_engine.repository.repo import Repository

    repo, ids, _content, _other = repo_with_points
    with Repository.open(repo) as opened:
        record = opened.index.points_records("a")[0]
        opened.index.put_point(record["id"], {**record, field: value})
    for extra in (["--dry-run"], []):
        result = cli(capsys, "forget", repo, "--keep-last", "1", *extra)
        assert result.code == 3, result.err
        assert "malformed" in result.err and "rebuild-index" in result.err, result.err
        assert result.err.count("\n") == 1
    with Repository.open(repo) as opened:
        assert len(opened.index.points_records()) == len(ids) + 1


@pytest.mark.parametrize("field,value", [("disks", [{"key": "sda", "parent": []}]),
                                         ("disks", None), ("disks", ["sda"]), ("disks", [None]),
                                         ("time", 5)])
def test_a_malformed_record_beside_the_points_forgotten_is_damage(repo_with_points, capsys,
                                                                 field, value):
    """forget reads the other records of the VM only as far as it needs them (whether one is
    built on a forgotten point, its commit order): a malformed field there is damage too (exit
    3, one line), and no point leaves the catalog."""
    from repo_engine.repository.repo import Repository

    repo, ids, _content, _other = repo_with_points
    with Repository.open(repo) as opened:
        record = next(r for r in opened.index.points_records("a") if r["id"] == ids[2])
        opened.index.put_point(ids[2], {**record, field: value})
    result = cli(capsys, "forget", repo, ids[0][:12])
    assert result.code == 3, result.err
    assert "malformed" in result.err and result.err.count("\n") == 1, result.err
    with Repository.open(repo) as opened:
        assert len(opened.index.points_records()) == len(ids) + 1


@pytest.mark.parametrize("value", [1, "yes", [True]])
def test_a_protected_flag_not_a_boolean_is_damage_and_the_point_stays(repo_with_points, capsys,
                                                                      value):
    """A point whose record's `protected` is not a boolean (shown as protected: it is truthy):
    neither a policy nor forget by id removes it as if it were unprotected; each reports the
    record malformed (exit 3, one line) and no point leaves the catalog."""
    from repo_engine.repository.repo import Repository

    repo, ids, _content, _other = repo_with_points
    with Repository.open(repo) as opened:
        record = next(r for r in opened.index.points_records("a") if r["id"] == ids[0])
        opened.index.put_point(ids[0], {**record, "protected": value})
    for args in (["--keep-last", "1"], [ids[0][:12]], [ids[0][:12], "--prune"]):
        result = cli(capsys, "forget", repo, *args)
        assert result.code == 3, result.err
        assert "malformed" in result.err and result.err.count("\n") == 1, result.err
    with Repository.open(repo) as opened:
        assert len(opened.index.points_records()) == len(ids) + 1


@pytest.mark.parametrize("text", ["-1mo", "2months", "1.5d"])
def test_a_bad_duration_is_echoed_as_given_with_examples_it_takes(repo_with_points, capsys,
                                                                  text):
    repo, ids, _, b_point = repo_with_points
    result = cli(capsys, "forget", repo, "--keep-within", text)
    assert result.code == 2
    assert result.err.strip() == (f"repo-engine: error: --keep-within: not a duration: {text!r} "
                                  "(examples: 7d, 2w, 6mo, 1y6mo, 36h)")
    for example in ("7d", "2w", "6mo", "1y6mo", "36h"):  # each example is taken
        assert cli(capsys, "forget", repo, "--keep-within", example, "--dry-run").code == 0
    assert _listed(capsys, repo) == {*ids, b_point}


def test_a_point_named_twice_is_removed_and_counted_once(repo_with_points, capsys, tmp_path):
    repo, ids, content, b_point = repo_with_points
    result = cli(capsys, "forget", repo, ids[2][:8], "a@latest", ids[2], "--json")
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["removed"] == [ids[2]] and [d["id"] for d in doc["decisions"]] == [ids[2]]
    assert _listed(capsys, repo) == {ids[0], ids[1], b_point}
    assert cli(capsys, "verify", repo).code == 0
    assert restore_bytes(capsys, repo, ids[1][:12], "sda", tmp_path / "o.img") == content[ids[1]]
