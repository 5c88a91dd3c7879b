"""A hostile repository: symlinks, FIFOs, devices, bad names and absurd numbers planted in every
directory of the layout. Every command ends in bounded time with success or a one-line error,
never a hang, a traceback, or a read, write or deletion outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import blake3
import numpy as np
import pytest

from repo_engine.errors import DamageError
from repo_engine.repository.blockmap import (HEAD, HEAD2, SEGMENT, SEGMENT_SHIFT, decode,
                                             map_object)
from repo_engine.repository.envelope import seal, write_sealed
from repo_engine.repository.formats import BLOCK_MAP, BLOCK_MAP_V1, POINT
from repo_engine.repository.points import point_object, read_point
from repo_engine.repository.store.local import LocalStore

from helpers import MIB, DiskModel, cli, tree_digest

RUN_TIMEOUT = 60  # seconds: far above any command here; a hang fails the test, not the run


def run_cli(*args: object, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """`repo-engine ARGS` in a child process (a hang is a TimeoutExpired, not a stuck test)."""
    return subprocess.run([sys.executable, "-m", "repo_engine", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def assert_clean_end(result: subprocess.CompletedProcess, what: str) -> None:
    """Success, or exactly one line `repo-engine: error: ...` with a documented exit code."""
    assert "Traceback" not in result.stderr, (what, result.stderr)
    assert result.returncode in (0, 1, 2, 3), (what, result.returncode, result.stderr)
    if result.returncode:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("repo-engine: error: "), (what, lines)


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory) -> tuple[Path, Path]:
    """A repository with two points of VM v (a full and a delta) and the image backed up."""
    root = tmp_path_factory.mktemp("base")
    repo, image = root / "repo", root / "d.img"
    model = DiskModel(image, 2 * MIB, np.random.default_rng(5))
    model.random_changes(6)
    assert run_cli("init", repo, "--block-size", "64KiB").returncode == 0
    for _ in range(2):
        assert run_cli("backup", "image", repo, "--vm", "v", "--disk", f"d={image}").returncode == 0
        model.random_changes(2)
    return repo, image


@pytest.fixture
def hostile(tmp_path, base_repo) -> tuple[Path, Path, Path]:
    """(a private copy of the base repository, its image, an `outside` directory of files the
    repository's symlinks point at, which no command may read into, change or delete)."""
    repo = tmp_path / "repo"
    shutil.copytree(base_repo[0], repo, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not a repository file\n" * 100)
    return repo, base_repo[1], outside


def _first(directory: Path, suffix: str) -> Path:
    return sorted(directory.rglob(f"*{suffix}"))[0]


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _link(path: Path, to: Path | str) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(to)


def _chardev(path: Path) -> None:
    """A character device node (/dev/zero's numbers); a FIFO where we may not create one."""
    path.unlink(missing_ok=True)
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    except PermissionError:
        os.mkfifo(path)


def _swap_dir(path: Path, outside: Path) -> None:
    """Replace a directory of the repository by a symlink to a copy of it outside."""
    shutil.move(str(path), str(outside / path.name))
    path.symlink_to(outside / path.name)


def _huge(path: Path) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(1 << 40)  # sparse: costs nothing on disk, far beyond any format's limit


Plant = Callable[[Path, Path], None]
PLANTS: dict[str, Plant] = {
    "config-symlink": lambda r, o: _link(r / "config", o / "secret"),
    "config-fifo": lambda r, o: _fifo(r / "config"),
    "config-chardev": lambda r, o: _chardev(r / "config"),
    "config-huge": lambda r, o: _huge(r / "config"),
    "pack-symlink": lambda r, o: _link(_first(r / "packs", ".pack"), o / "secret"),
    "pack-fifo": lambda r, o: _fifo(_first(r / "packs", ".pack")),
    "pack-chardev": lambda r, o: _chardev(_first(r / "packs", ".pack")),
    "pack-badname": lambda r, o: (_first(r / "packs", ".pack").parent / "EVIL.pack").write_bytes(
        b"x" * 100),
    "map-badname": lambda r, o: (_first(r / "maps", ".map").parent / "zz.map").write_bytes(b"x"),
    "point-badname": lambda r, o: (r / "points" / "..evil.point").write_bytes(b"x"),
    "packs-subdir-symlink": lambda r, o: _swap_dir(_first(r / "packs", ".pack").parent, o),
    "packs-dir-symlink": lambda r, o: _swap_dir(r / "packs", o),
    "map-symlink": lambda r, o: _link(_first(r / "maps", ".map"), o / "secret"),
    "map-fifo": lambda r, o: _fifo(_first(r / "maps", ".map")),
    "map-huge": lambda r, o: _huge(_first(r / "maps", ".map")),
    "maps-subdir-symlink": lambda r, o: _swap_dir(_first(r / "maps", ".map").parent, o),
    "point-symlink": lambda r, o: _link(_first(r / "points", ".point"), o / "secret"),
    "point-fifo": lambda r, o: _fifo(_first(r / "points", ".point")),
    "point-huge": lambda r, o: _huge(_first(r / "points", ".point")),
    "stray-point-symlink": lambda r, o: _link(r / "points" / f"{'0' * 16}.point", o / "secret"),
    "points-dir-symlink": lambda r, o: _swap_dir(r / "points", o),
    "lock-fifo": lambda r, o: _fifo(r / "locks" / "evil-1-0.lock"),
    "lock-devzero": lambda r, o: _link(r / "locks" / "evil-2-0.lock", "/dev/zero"),
    "lock-symlink": lambda r, o: _link(r / "locks" / "evil-3-0.lock", o / "secret"),
    "lock-torn": lambda r, o: (r / "locks" / "evil-4-0.lock").write_bytes(b""),
    "lock-huge": lambda r, o: _huge(r / "locks" / "evil-5-0.lock"),
    "lock-dir": lambda r, o: (r / "locks" / "evil-6-0.lock").mkdir(),
    "lock-new-fifo": lambda r, o: _fifo(r / "locks" / f"{os.uname().nodename}-1-0.new"),
    "locks-dir-symlink": lambda r, o: _swap_dir(r / "locks", o),
    "tmp-fifo": lambda r, o: _fifo(r / "tmp" / "pack-1-000000000000.tmp"),
    "tmp-symlink": lambda r, o: _link(r / "tmp" / "pack-1-000000000001.tmp", o / "secret"),
    "tmp-dir-symlink": lambda r, o: _swap_dir(r / "tmp", o),
    "index-data-fifo": lambda r, o: _fifo(r / "index" / "data.mdb"),
    "index-data-symlink": lambda r, o: _link(r / "index" / "data.mdb", o / "secret"),
    "index-dir-symlink": lambda r, o: _swap_dir(r / "index", o),
}


def _commands(repo: Path, image: Path, target: Path) -> list[list[object]]:
    """Every command, the destructive ones last."""
    return [
        ["points", repo], ["show", repo, "v@latest"], ["stats", repo],
        ["restore", repo, "v@latest", "--disk", "d", "--to", target],
        ["verify", repo], ["scrub", repo],
        ["backup", "image", repo, "--vm", "v", "--disk", f"d={image}"],
        ["gc", repo], ["gc", repo, "--full"], ["forget", repo, "--keep-last", "1", "--prune"],
        ["rebuild-index", repo], ["unlock", repo], ["points", repo],
    ]


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_every_command_survives_a_hostile_repository(hostile, tmp_path, plant):
    repo, image, outside = hostile
    PLANTS[plant](repo, outside)
    before = tree_digest(outside)
    kinds = {p.name: os.lstat(p).st_mode for p in outside.iterdir()}
    for args in _commands(repo, image, tmp_path / "restored.img"):
        result = run_cli(*args)
        assert_clean_end(result, f"{plant}: {args[0]}")
        assert tree_digest(outside) == before, f"{plant}: {args[0]} changed a file outside"
        assert {p.name: os.lstat(p).st_mode for p in outside.iterdir()} == kinds


# -- names and numbers read from disk ----------------------------------------------------------
def _rewrite_manifest(repo: Path, change: Callable[[dict], None]) -> str:
    """Change the newest point's manifest (resealed: only the content is hostile) and rebuild
    the index from it, as an attacker who can write the repository would."""
    manifest = max((repo / "points").glob("*.point"), key=lambda p: p.stat().st_mtime)
    store, name = LocalStore(repo), f"points/{manifest.name}"
    point = read_point(store, name)
    doc = asdict(point)
    change(doc)
    write_sealed(store, name, POINT, json.dumps(doc, sort_keys=True).encode())
    return point.id


def _disk0(change: Callable[[dict], None]) -> Callable[[dict], None]:
    return lambda doc: change(doc["disks"][0])


BAD_RECORDS = {
    "map-dotdot": _disk0(lambda d: d.update(map="../../../outside/evil")),
    "map-absolute": _disk0(lambda d: d.update(map="/etc/passwd")),
    "map-short": _disk0(lambda d: d.update(map="abcd")),
    "parent-dotdot": _disk0(lambda d: d.update(parent="../../outside/x")),
    "block-size-zero": _disk0(lambda d: d.update(block_size=0)),
    "block-size-odd": _disk0(lambda d: d.update(block_size=65537)),
    "capacity-negative": _disk0(lambda d: d.update(capacity=-1)),
    "capacity-absurd": _disk0(lambda d: d.update(capacity=1 << 62)),
    "capacity-string": _disk0(lambda d: d.update(capacity="big")),
    "capacity-grown": _disk0(lambda d: d.update(capacity=d["capacity"] * 1000)),
    "links-zero": _disk0(lambda d: d.update(links=0)),
    "kind-unknown": _disk0(lambda d: d.update(kind="sideways")),
    "id-dotdot": lambda doc: doc.update(id="../../outside/x"),
    "disks-not-list": lambda doc: doc.update(disks=7),
}


@pytest.mark.parametrize("bad", sorted(BAD_RECORDS))
def test_bad_names_and_numbers_are_damage_never_a_path(hostile, tmp_path, bad):
    repo, _image, outside = hostile
    # whatever opens the file a bad name points at would block on this FIFO
    os.mkfifo(outside / "evil.map")
    _rewrite_manifest(repo, BAD_RECORDS[bad])
    rebuilt = run_cli("rebuild-index", repo)
    assert_clean_end(rebuilt, bad)
    for args in (["verify", repo], ["points", repo],
                 ["restore", repo, "v@latest", "--disk", "d", "--to", tmp_path / "r.img"]):
        result = run_cli(*args)
        assert_clean_end(result, f"{bad}: {args[0]}")
    if bad != "capacity-grown":  # a record that parses: its map then disagrees (below)
        assert "not a valid name" in rebuilt.stdout + rebuilt.stderr or "malformed" in (
            rebuilt.stdout + rebuilt.stderr), rebuilt
    assert sorted(p.name for p in outside.iterdir()) == ["evil.map", "secret"]


def test_map_length_must_match_its_disk_record(hostile, tmp_path):
    repo, _image, _outside = hostile
    _rewrite_manifest(repo, _disk0(lambda d: d.update(capacity=d["capacity"] * 1000)))
    assert run_cli("rebuild-index", repo).returncode == 0
    result = run_cli("restore", repo, "v@latest", "--disk", "d", "--to", tmp_path / "r.img")
    assert result.returncode == 3 and "its disk record says" in result.stderr, result.stderr
    assert not (tmp_path / "r.img").exists()


@pytest.mark.parametrize("kind, nblocks, count", [
    (0, 1 << 40, 1 << 40),  # a FULL map of 2^40 blocks in a few bytes
    (1, 1 << 40, 1 << 30),  # a DELTA naming 2^30 entries
    (1, 1 << 62, 1),  # a DELTA that would resize its base to 2^62 blocks
])
def test_absurd_map_headers_are_refused_before_allocating(kind, nblocks, count):
    import zstandard
    body = zstandard.ZstdCompressor().compress(bytes(64))
    with pytest.raises(DamageError, match="block map"):
        decode(HEAD.pack(kind, nblocks, count) + body, "m")


@pytest.mark.parametrize("version", [1, 2])
def test_absurd_map_file_restores_as_damage(hostile, tmp_path, version):
    """A crafted map whose content name is right (an attacker can hash) and whose header
    claims 2^40 blocks (version 2: in one segment that claims them all): exit 3, not
    MemoryError."""
    repo, _image, _outside = hostile
    import zstandard
    frame = zstandard.ZstdCompressor().compress(bytes(64))
    if version == 1:
        data = seal(BLOCK_MAP_V1, HEAD.pack(0, 1 << 40, 1 << 40) + frame)
    else:
        data = seal(BLOCK_MAP, HEAD2.pack(0, bytes(7), 1 << 40, 1 << 40, SEGMENT_SHIFT, 1)
                    + SEGMENT.pack(0, 1 << 40, len(frame), bytes(16)) + frame)
    name = blake3.blake3(data).hexdigest()
    path = repo / map_object(name)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    _rewrite_manifest(repo, _disk0(lambda d: d.update(map=name, kind="full", parent=None,
                                                      links=1)))
    assert run_cli("rebuild-index", repo).returncode == 0
    for args in (["verify", repo],
                 ["restore", repo, "v@latest", "--disk", "d", "--to", tmp_path / "r.img"]):
        result = run_cli(*args)
        assert_clean_end(result, args[0])
        assert result.returncode == 3, result.stderr


# -- directories and files that are not what the layout says -------------------------------------
def test_gc_never_deletes_through_a_symlinked_points_dir(hostile):
    repo, _image, outside = hostile
    _swap_dir(repo / "points", outside)
    (outside / "points" / f"{'1' * 16}.point").write_bytes(b"unrelated")
    result = run_cli("gc", repo, "--full")
    assert result.returncode == 3 and "is a symlink, not a directory" in result.stderr
    assert (outside / "points" / f"{'1' * 16}.point").read_bytes() == b"unrelated"


def test_verify_reports_what_it_skips(hostile):
    repo, _image, outside = hostile
    _link(repo / "points" / f"{'2' * 16}.point", outside / "secret")
    result = run_cli("verify", repo)
    assert result.returncode == 0, result.stderr
    assert "not a regular file: left alone" in result.stdout


# -- locks ------------------------------------------------------------------------------------------
def test_torn_lock_with_free_flock_is_stale(hostile):
    repo, _image, _outside = hostile
    (repo / "locks" / "somehost-1-abcd.lock").write_bytes(b"")
    result = run_cli("points", repo)
    assert result.returncode == 0, result.stderr
    assert run_cli("gc", repo).returncode == 0  # a maintenance lock removes it as stale
    assert not (repo / "locks" / "somehost-1-abcd.lock").exists()


def test_unlock_clears_a_torn_lock(hostile):
    repo, _image, _outside = hostile
    (repo / "locks" / "somehost-1-abcd.lock").write_bytes(b"\0" * 10)
    result = run_cli("unlock", repo)
    assert result.returncode == 0, result.stderr
    assert list((repo / "locks").iterdir()) == []


HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_torn_lock_whose_flock_is_held_counts_as_held(hostile):
    repo, _image, _outside = hostile
    torn = repo / "locks" / "somehost-1-abcd.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(torn)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        result = run_cli("gc", repo)
        assert result.returncode == 1 and "cannot be read" in result.stderr, result.stderr
        refused = run_cli("unlock", repo)
        assert refused.returncode == 1 and "cannot be read" in refused.stderr, refused.stderr
        assert "pid -1" not in refused.stderr
        assert torn.exists()
    finally:
        holder.communicate("", timeout=RUN_TIMEOUT)
    assert run_cli("unlock", repo).returncode == 0
    assert not torn.exists()


# -- owner-only files -----------------------------------------------------------------------------------
def test_every_file_and_directory_is_owner_only(tmp_path):
    """Whatever the umask: init, backup, gc --full, rebuild-index all create 0600/0700."""
    repo, image = tmp_path / "repo", tmp_path / "d.img"
    model = DiskModel(image, 2 * MIB, np.random.default_rng(8))
    model.random_changes(4)
    env = dict(os.environ)
    steps = [["init", repo], ["backup", "image", repo, "--vm", "v", "--disk", f"d={image}"],
             ["forget", repo, "--keep-last", "1"],
             ["backup", "image", repo, "--vm", "v", "--disk", f"d={image}"],
             ["gc", repo, "--full"], ["rebuild-index", repo], ["verify", repo]]
    for args in steps:
        result = subprocess.run([sys.executable, "-m", "repo_engine", *map(str, args)],
                                capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env,
                                preexec_fn=lambda: os.umask(0))
        assert result.returncode == 0, (args, result.stderr)
    seen = 0
    for path in [repo, *repo.rglob("*")]:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
        seen += 1
    assert seen > 10


def test_existing_world_readable_repository_still_opens(tmp_path, capsys):
    repo, image = tmp_path / "repo", tmp_path / "d.img"
    DiskModel(image, MIB, np.random.default_rng(9)).random_changes(2)
    assert cli(capsys, "init", repo).code == 0
    for path in [repo, *repo.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    assert cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={image}").code == 0
    assert cli(capsys, "verify", repo).code == 0


def test_names_from_disk_never_become_paths_outside(tmp_path):
    for bad in ("../x", "0123456789abcdeF", "/etc/passwd0000", ""):
        with pytest.raises(DamageError, match="not a valid name"):
            point_object(bad)
        with pytest.raises(DamageError, match="not a valid name"):
            map_object(bad)


def test_rebuild_index_reports_what_it_skips(hostile):
    repo, _image, outside = hostile
    _fifo(repo / "points" / f"{'3' * 16}.point")
    _link(_first(repo / "packs", ".pack").parent / f"{'4' * 64}.pack", outside / "secret")
    result = run_cli("rebuild-index", repo)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("not a regular file: left alone") == 2, result.stdout
    assert run_cli("verify", repo).returncode == 0
