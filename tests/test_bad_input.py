"""Bad input gets a one-line error naming the problem and leaves the repository untouched."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from repo_engine.repository.envelope import seal, unseal
from repo_engine.repository.formats import CONFIG, FileFormat

from helpers import MIB, DiskModel, cli, disk_of, repo_with_point, tree_digest, write_extents


@pytest.fixture
def setup(tmp_path, capsys):
    return repo_with_point(tmp_path, capsys, 3)


def _assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert result.code == code, (result.code, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("content, fragments", [
    ("[[0, -5]]", ["entry 0", "negative"]),
    ("[[-1, 10]]", ["entry 0", "negative"]),
    ("[[0, 100], [2097000, 1000]]", ["entry 1", "beyond the disk's capacity of 2097152"]),
    ("{not json", ["not valid JSON"]),
    ('{"a": 1}', ["startOffset is missing"]),
    ('"text"', ["expected [[offset, length], ...] or VMware's DiskChangeInfo"]),
    ('[[0, 1, 2]]', ["entry 0 is not an [offset, length] pair"]),
    ('[[0, "1"]]', ["entry 0 is not an [offset, length] pair"]),
    ('[[0.5, 1]]', ["entry 0 is not an [offset, length] pair"]),
])
def test_bad_extents_files(tmp_path, capsys, setup, content, fragments):
    repo, model = setup
    before = tree_digest(repo)
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    result = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                 "--changed", f"d={bad}")
    _assert_one_line_error(result, 2, "bad.json", *fragments)
    assert tree_digest(repo) == before


def _back_up_changed(capsys, repo: Path, model: DiskModel, changed: Path):
    return cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
               "--changed", f"d={changed}")


def test_an_endless_extents_file_is_refused_once_past_the_limit(capsys, setup, monkeypatch):
    """/dev/zero, or any stream that does not end, is read to the limit and refused (before, it
    was read until memory ran out); the limit lowered here to keep the test small."""
    from repo_engine.backup import extents

    monkeypatch.setattr(extents, "CHANGES_MAX", MIB)
    repo, model = setup
    before = tree_digest(repo)
    result = _back_up_changed(capsys, repo, model, Path("/dev/zero"))
    _assert_one_line_error(result, 2, "extents file /dev/zero is larger than 1.0 MiB, the most "
                                      "a change list may be")
    assert tree_digest(repo) == before


def test_an_extents_file_past_the_limit_is_refused_by_its_size(tmp_path, capsys, setup):
    repo, model = setup
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(1024 * MIB + 1)  # past the limit README gives; sparse: takes no disk space
    result = _back_up_changed(capsys, repo, model, huge)
    _assert_one_line_error(result, 2, f"extents file {huge} is larger than 1.0 GiB")


def test_unsorted_overlapping_extents_are_merged(tmp_path, capsys, setup):
    repo, model = setup
    model.write(100_000, b"x" * 70_000)
    model.write(10_000, b"y" * 10)
    extents = [[100_000, 70_000], [10_000, 10], [120_000, 5], [0, 0]]
    result = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                 "--changed", f"d={write_extents(tmp_path / 'e.json', extents)}", "--json")
    assert result.code == 0, result.err
    # blocks 0 (10_000), 1 and 2 (100_000..170_000) at 64 KiB
    assert disk_of(result.json()["point"], "d")["counters"]["blocks_read"] == 3
    out = tmp_path / "out.img"
    assert cli(capsys, "restore", repo, "v@latest", "--disk", "d", "--to", out).code == 0
    assert out.read_bytes() == model.content


@pytest.mark.parametrize("args, code, fragments", [
    (["--disk", "d={missing}"], 1, ["disk d", "No such file or directory", "missing.img"]),
    (["--disk", "d={directory}"], 1, ["disk d"]),
    (["--disk", "d={model}", "--changed", "d={missing_json}"], 2, ["nope.json", "does not exist"]),
    (["--disk", "d={model}", "--changed", "x={missing_json}"], 2, ["no --disk named x"]),
    (["--disk", "d"], 2, ["'d' is not KEY=PATH"]),
])
def test_bad_disks(tmp_path, capsys, setup, args, code, fragments):
    repo, model = setup
    before = tree_digest(repo)
    (tmp_path / "adir").mkdir()
    subst = {"missing": tmp_path / "missing.img", "directory": tmp_path / "adir",
             "model": model.path, "missing_json": tmp_path / "nope.json"}
    args = [a.format(**subst) for a in args]
    result = cli(capsys, "backup", "image", repo, "--vm", "v", *args)
    assert result.code == code, result.err
    for fragment in fragments:
        assert fragment in result.err
    assert tree_digest(repo) == before


def test_not_a_repository(tmp_path, capsys):
    for target in (tmp_path, tmp_path / "nowhere"):
        result = cli(capsys, "points", target)
        _assert_one_line_error(result, 1, "is not a repo-engine repository")


def test_unknown_format_version(tmp_path, capsys, setup):
    repo, _ = setup
    payload = unseal(CONFIG, (repo / "config").read_bytes(), "config")
    future = FileFormat(CONFIG.name, CONFIG.magic, max(CONFIG.major, *CONFIG.also_reads) + 1)
    (repo / "config").write_bytes(seal(future, payload))
    before = tree_digest(repo)
    result = cli(capsys, "points", repo)
    _assert_one_line_error(result, 1, f"format version {future.major} is not supported",
                           "upgrade repo-engine")
    assert tree_digest(repo) == before


def test_damaged_config_is_damage(tmp_path, capsys, setup):
    repo, _ = setup
    data = bytearray((repo / "config").read_bytes())
    data[30] ^= 0xFF
    (repo / "config").write_bytes(bytes(data))
    result = cli(capsys, "points", repo)
    _assert_one_line_error(result, 3, "checksum mismatch")


@pytest.mark.parametrize("content, code, fragment", [
    (b"hello\n", 1, "not a config file (bad magic)"),  # some other file, short or long
    (b"[s3]\nregion = 'x'\n" * 8, 1, "not a config file (bad magic)"),
    (b"", 3, "truncated config file (0 bytes)"),  # ours, cut: damage
    (CONFIG.magic[:5], 3, "truncated config file (5 bytes)"),
])
def test_a_config_that_is_not_ours_is_told_from_a_cut_one(tmp_path, capsys, content, code,
                                                          fragment):
    (tmp_path / "config").write_bytes(content)
    _assert_one_line_error(cli(capsys, "points", tmp_path), code, fragment)
    assert (tmp_path / "config").read_bytes() == content


@pytest.mark.parametrize("ref", ["deadbeef", "v@1999", "nobody@latest", ""])
def test_point_that_does_not_exist(tmp_path, capsys, setup, ref):
    repo, _ = setup
    result = cli(capsys, "restore", repo, ref, "--disk", "d", "--to", tmp_path / "o.img")
    _assert_one_line_error(result, 1, "no restore point matches")
    assert not (tmp_path / "o.img").exists()


def test_disk_not_in_point(tmp_path, capsys, setup):
    repo, _ = setup
    result = cli(capsys, "restore", repo, "v@latest", "--disk", "zz", "--to", tmp_path / "o.img")
    _assert_one_line_error(result, 1, "has no disk 'zz'", "its disks: d")


def test_restore_refuses_to_overwrite(tmp_path, capsys, setup):
    repo, _ = setup
    target = tmp_path / "exists.img"
    target.write_bytes(b"precious")
    result = cli(capsys, "restore", repo, "v@latest", "--disk", "d", "--to", target)
    _assert_one_line_error(result, 2, "already exists", "--force")
    assert target.read_bytes() == b"precious"


def test_init_refuses_nonempty_directory(tmp_path, capsys, setup):
    repo, _ = setup
    before = tree_digest(repo)
    result = cli(capsys, "init", repo)
    _assert_one_line_error(result, 2, "already exists")
    assert tree_digest(repo) == before
    result = cli(capsys, "init", tmp_path / "r2", "--block-size", "3000")
    _assert_one_line_error(result, 2, "power of two")
    assert not (tmp_path / "r2").exists()


def test_full_filesystem_stores_no_point(tmp_path, capsys):
    """A repository on a tiny tmpfs: the backup fails cleanly, earlier points stay intact."""
    # a private mount point: pytest may rename its own temporary directories while we run
    mount = Path(tempfile.mkdtemp(prefix="repo-engine-enospc-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        repo = mount / "repo"
        assert cli(capsys, "init", repo, "--block-size", "16KiB", "--pack-size", "256KiB").code == 0
        small = DiskModel(tmp_path / "small.img", 256 * 1024, np.random.default_rng(5))
        small.write(0, np.random.default_rng(6).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
        assert cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={small.path}").code == 0
        before = cli(capsys, "stats", repo, "--json").json()["pack_bytes"]
        big = tmp_path / "big.img"
        big.write_bytes(np.random.default_rng(7).integers(0, 256, 8 * MIB, dtype=np.uint8).tobytes())
        result = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={big}")
        _assert_one_line_error(result, 1, "filesystem is full", "no restore point was stored",
                               f"'repo-engine gc {repo}' frees what this backup wrote")
        assert cli(capsys, "stats", repo, "--json").json()["pack_bytes"] > before
        assert cli(capsys, "gc", repo).code == 0
        assert cli(capsys, "stats", repo, "--json").json()["pack_bytes"] == before, \
            "gc frees what the failed backup wrote, as the message says"
        points = cli(capsys, "points", repo, "--json").json()["points"]
        assert len(points) == 1
        assert not list((repo / "tmp").iterdir()), "temporary pack left behind"
        out = tmp_path / "o.img"
        assert cli(capsys, "restore", repo, points[0]["id"], "--disk", "d", "--to", out).code == 0
        assert out.read_bytes() == small.content
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def test_a_full_filesystem_met_by_the_index_is_the_same_clean_failure(tmp_path, capsys,
                                                                     monkeypatch):
    """ENOSPC may hit the index's commit rather than a pack's write (LMDB's own error): the
    backup fails the same way, in one line, and stores no point."""
    import lmdb

    from repo_engine.repository.index import Index

    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo).code == 0
    image = DiskModel(tmp_path / "d.img", 1 * MIB, np.random.default_rng(3))
    image.write(0, np.random.default_rng(4).integers(0, 256, MIB, dtype=np.uint8).tobytes())

    def full(*_args: object) -> int:
        raise lmdb.DiskError("mdb_txn_commit: No space left on device")
    monkeypatch.setattr(Index, "_put_chunks", full)
    result = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={image.path}")
    _assert_one_line_error(result, 1, "filesystem is full", "no restore point was stored")
    monkeypatch.undo()
    assert cli(capsys, "points", repo, "--json").json()["points"] == []


def test_cli_runs_as_a_program(tmp_path):
    """The installed entry point: usage errors exit 2 with click's message, on one line."""
    result = subprocess.run([sys.executable, "-m", "repo_engine", "backup", "image"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == ("repo-engine: error: missing argument 'REPO' "
                             "(see 'repo-engine backup image --help')\n")
    result = subprocess.run([sys.executable, "-m", "repo_engine", "init", str(tmp_path / "r")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "created repository" in result.stdout


def test_restore_of_damaged_chunk_fails_and_leaves_no_image(tmp_path, capsys, setup):
    repo, _ = setup
    pack = next((repo / "packs").rglob("*.pack"))
    data = bytearray(pack.read_bytes())
    data[200] ^= 0xFF  # inside the first chunk's blob
    pack.write_bytes(bytes(data))
    target = tmp_path / "o.img"
    result = cli(capsys, "restore", repo, "v@latest", "--disk", "d", "--to", target)
    _assert_one_line_error(result, 3, "chunk ref", "cannot be restored whole", "scrub --repair")
    assert not target.exists()
