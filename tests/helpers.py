"""Shared test helpers: repositories in a temporary directory, random sparse disk images, the CLI
run in-process, and snapshots of a repository's files for "left untouched" checks."""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import threading
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from repo_engine.cli.main import run
from repo_engine.maintenance import shared_gc
from repo_engine.repository import checkpoint, leases, sightings

KIB = 1024
MIB = 1024 * KIB


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


def cli(capsys, *args: object) -> CliResult:
    """Run `repo-engine ARGS` in this process and capture its output."""
    capsys.readouterr()
    code = run([str(a) for a in args])
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` with the hash of its content (LMDB's lock file excluded: readers
    touch it)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != "lock.mdb":
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclass
class DiskModel:
    """A disk image file and the bytes we expect in it, changed through random extents."""

    path: Path
    capacity: int
    rng: np.random.Generator
    content: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self.content = bytearray(self.capacity)
        with open(self.path, "wb") as f:
            f.truncate(self.capacity)

    def write(self, offset: int, data: bytes) -> None:
        self.content[offset:offset + len(data)] = data
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def random_data(self, length: int) -> bytes:
        """Half the time compressible text-like bytes, else random; sometimes zeros."""
        kind = self.rng.integers(0, 4)
        if kind == 0:
            return bytes(length)
        if kind == 1:
            return self.rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        words = self.rng.choice([b"alpha ", b"beta ", b"gamma\n", b"delta\t"], size=length // 6 + 1)
        return b"".join(words)[:length]

    def random_changes(self, count: int, max_len: int = 200 * KIB) -> list[list[int]]:
        """Write `count` random extents; returns them as a change list."""
        extents = []
        for _ in range(count):
            length = int(self.rng.integers(1, max_len))
            offset = int(self.rng.integers(0, self.capacity - length))
            self.write(offset, self.random_data(length))
            extents.append([offset, length])
        return extents

    def copy_of_content(self) -> bytes:
        return bytes(self.content)


def write_extents(path: Path, extents: list[list[int]]) -> Path:
    path.write_text(json.dumps(extents))
    return path


def restore_bytes(capsys, repo: Path, point: str, key: str, target: Path) -> bytes:
    if target.exists():
        target.unlink()
    result = cli(capsys, "restore", repo, point, "--disk", key, "--to", target)
    assert result.code == 0, result.err
    return target.read_bytes()


def assert_sparse_where_zero(path: Path, block_size: int, content: bytes) -> None:
    """Every data extent of the restored file overlaps some non-zero block (zero blocks are holes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        size = os.fstat(fd).st_size
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            assert any(content[data:hole]), f"data extent [{data}, {hole}) holds only zeros"
            offset = hole
    finally:
        os.close(fd)


def disk_of(point: dict, key: str) -> dict:
    """Disk `key` of a point as `--json` prints it (a list of disks, each with its key)."""
    return next(d for d in point["disks"] if d["key"] == key)


def repo_with_point(tmp_path: Path, capsys, seed: int) -> tuple[Path, DiskModel]:
    """A 64 KiB-block repository holding one point of VM `v` (disk `d`, 2 MiB of random
    changes)."""
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "64KiB").code == 0
    model = DiskModel(tmp_path / "d.img", 2 * MIB, np.random.default_rng(seed))
    model.random_changes(5)
    assert cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}").code == 0
    return repo, model


def shared_repo(root: Path, cache: Path, **settings):
    """A new shared repository in the local directory `root`, this host's cache in `cache`."""
    from repo_engine.repository.config import RepoConfig
    from repo_engine.repository.repo import Repository
    from repo_engine.repository.store.local import LocalStore

    root.mkdir(parents=True, exist_ok=True)
    config = RepoConfig.new(shared=True, **{"block_size": 64 * KIB, **settings})
    return Repository.create(LocalStore(root), cache, config)


def attach_shared(store, cache: Path):
    """Another host's view of the shared repository in `store` (a Store), cached in `cache`."""
    from repo_engine.repository.config import read_config
    from repo_engine.repository.repo import Repository

    return Repository.attach(store, cache, read_config(store))


@contextmanager
def stopped_before_commit(backup: Callable[[], object], tmp_path: Path,
                          monkeypatch) -> Iterator[list]:
    """Run `backup()` in a thread that stops at the pause point `backup.before_commit` (its
    chunks stored, its point not committed) while the body of the `with` runs; yields a list
    that holds the backup's result once the `with` ends."""
    from repo_engine import pause

    monkeypatch.setenv("REPO_ENGINE_PAUSE_DIR", str(tmp_path))
    monkeypatch.setattr(pause, "_NAMES", frozenset({"backup.before_commit"}))
    done: list = []
    thread = threading.Thread(target=lambda: done.append(backup()))
    thread.start()
    while not (tmp_path / "backup.before_commit.reached").exists():
        assert thread.is_alive()
        threading.Event().wait(0.01)
    try:
        yield done
    finally:
        (tmp_path / "backup.before_commit.go").touch()
        thread.join()


# Opt-in, never in CI: REPO_ENGINE_BIG_REPO names a repository of 16 KiB blocks grown by the
# bench-only loader (bench/bigrepo.py, e.g. 10 M chunks); the SIGKILL tests then start from
# copies of it instead of empty repositories, and REPO_ENGINE_CRASH_KILLS (default 20) sets how
# many kills each lands (each check runs gc and verify over the whole repository).
BIG_REPO = os.environ.get("REPO_ENGINE_BIG_REPO")
CRASH_KILLS = int(os.environ.get("REPO_ENGINE_CRASH_KILLS", "20"))


def new_crash_repo(repo: Path, *init_args: object) -> None:
    """An empty repository made with `init ARGS`, or a copy of REPO_ENGINE_BIG_REPO."""
    import subprocess
    import sys

    if BIG_REPO:
        copy_repo(Path(BIG_REPO), repo)
        return
    done = subprocess.run([sys.executable, "-m", "repo_engine", "init", str(repo),
                           *map(str, init_args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def copy_repo(source: Path, target: Path) -> None:
    """A copy of a local repository whose files other than the index are hard links: those are
    only ever replaced (atomic renames) or deleted, never changed in place; LMDB's are."""
    import shutil

    shutil.copytree(source, target, copy_function=os.link,
                    ignore=shutil.ignore_patterns("index"))
    shutil.copytree(source / "index", target / "index")


def resident_pages(path) -> int:
    """Pages of the file at `path` in the page cache (mincore over a map of it, which reads
    nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec)


@dataclass(frozen=True)
class Clocks:
    """Readings of this host's clocks: its wall clock and its steady one (CLOCK_BOOTTIME, that
    repository/sightings.py times the sightings of other hosts' records on)."""

    wall: datetime
    steady: float

    @classmethod
    def read(cls) -> Clocks:
        return cls(leases.now(), sightings.monotonic())


WALL_CLOCKS = ("leases", "shared_gc", "checkpoint")


def move_clocks(monkeypatch, passed: float = 0.0, *, skew: float = 0.0,
                wall: Collection[str] = WALL_CLOCKS, since: Clocks | None = None) -> None:
    """This host's clocks move on from what they read now (or stop at `since` moved).

    `passed`: seconds that pass on this host: its steady clock moves that much, and so do its
    wall clocks `wall`; what it saw before was seen that much longer ago. `skew`: seconds this
    host's wall clocks `wall` are set ahead (behind if negative) with no time passing: a host
    whose clock runs ahead of another's, or a clock stepped; its steady clock does not move.
    `wall`: the wall clocks that move, named by the module that reads them: "leases" (lease
    times), "shared_gc" (gc's own name for it), "checkpoint" (checkpoint times and ages); ()
    for none (time passes on the steady clock alone: a wall clock set back by as much). The
    steady clock a lease holder times its own renewals on (leases.monotonic) is not moved.
    `since`: readings to move from instead of now; the clocks moved then stand still, for a
    test that asserts exact times (unless `since`, they run on)."""
    steady_reading = sightings.monotonic
    monkeypatch.setattr(sightings, "monotonic", (lambda: since.steady + passed) if since else
                        (lambda: steady_reading() + passed))
    ahead = timedelta(seconds=passed + skew)

    def moved(reading: Callable[[], datetime]) -> Callable[[], datetime]:
        return (lambda: since.wall + ahead) if since else (lambda: reading() + ahead)

    for name in wall:
        if name == "checkpoint":
            _move_checkpoint_clock(monkeypatch, moved)
        else:
            module = {"leases": leases, "shared_gc": shared_gc}[name]
            monkeypatch.setattr(module, "now", moved(module.now))


def _move_checkpoint_clock(monkeypatch,
                           moved: Callable[[Callable[[], datetime]], Callable[[], datetime]]
                           ) -> None:
    """checkpoint reads the wall clock as time.time and datetime.now: both moved."""
    real_time, real_datetime = checkpoint.time.time, checkpoint.datetime
    now = moved(lambda: real_datetime.fromtimestamp(real_time(), timezone.utc))

    class Moved(real_datetime):
        @classmethod
        def now(cls, tz=None):
            return now().astimezone(tz) if tz else now().astimezone().replace(tzinfo=None)

    monkeypatch.setattr(checkpoint, "time", SimpleNamespace(time=lambda: now().timestamp()))
    monkeypatch.setattr(checkpoint, "datetime", Moved)
