"""What the tests of `repo-engine` on an `s3://` repository share: the environment a command finds
(credentials and endpoint by the AWS conventions, fast retries in the settings file, caches and
spool files under the test's directory), real `repo-engine` processes, the objects in a bucket,
and the objects of a repository that no catalogued point uses."""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from helpers import CliResult
from repo_engine.cli.main import run
from race import GIVE_UP
from s3server import ACCESS_KEY, SECRET_KEY, SeaweedServer, admin_client

# fast retries and short timeouts, so that a failure takes a second, not a minute
FAST_SETTINGS = ("[s3]\nmax_attempts = 3\nbackoff_base = 0.01\nbackoff_cap = 0.05\n"
                 "connect_timeout = 1.0\nread_timeout = 1.0\n")
LEASE_SECONDS = 8  # a lease a killed command left expires within a test


def s3_environment(monkeypatch, tmp_path: Path, endpoint: str | None = None) -> None:
    """Set this process's environment (which `repo-engine` processes inherit) for `s3://`
    repositories of the test server: with `endpoint`, AWS_ENDPOINT_URL names it."""
    settings = tmp_path / "s3.toml"
    settings.write_text(FAST_SETTINGS)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "REPO_ENGINE_CACHE_DIR",
                 "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    if endpoint is not None:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("REPO_ENGINE_S3_CONFIG", str(settings))
    monkeypatch.setenv("REPO_ENGINE_LEASE_SECONDS", str(LEASE_SECONDS))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def repo_engine(*args: object) -> CliResult:
    """`repo-engine ARGS` as a process of its own."""
    done = subprocess.run([sys.executable, "-m", "repo_engine", *map(str, args)],
                          capture_output=True, text=True, timeout=GIVE_UP)
    return CliResult(done.returncode, done.stdout, done.stderr)


def in_process(*args: object) -> CliResult:
    """`repo-engine ARGS` run in this process (a second faster than a process of its own)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = run([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


def assert_one_line_error(result: CliResult, code: int = 1) -> str:
    assert result.code == code, (result.out, result.err)
    assert result.err.startswith("repo-engine: error: ") and result.err.count("\n") == 1, \
        result.err
    return result.err


def bucket_objects(server: SeaweedServer, bucket: str, prefix: str) -> dict[str, int]:
    """Every object under `prefix` of `bucket`, with its size."""
    pages = admin_client(server).get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                          Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


@dataclass
class Leftovers:
    """Objects in a repository's store that no catalogued point uses."""

    packs: list[str]  # packs holding no chunk a point uses (gc drops whole dead packs)
    maps: list[str]
    manifests: list[str]
    # stored bytes in the packs of chunks no point uses, or of copies no ref places (what a
    # repack leaves none of)
    unused_bytes: int = 0


def leftovers(location: str, cache: Path) -> Leftovers:
    """What gc must have removed from the repository at `location`, read through a cache of its
    own in `cache` (a host that never saw the repository: everything comes from the store)."""
    from repo_engine.maintenance.inventory import objects_under
    from repo_engine.repository.location import open_repository
    from repo_engine.repository.locks import SHARED

    with open_repository(location, cache_dir=cache) as repo, repo.lock(SHARED, "test"):
        points = repo.points()
        live = [np.unique(repo.resolve(point, disk.key))
                for point in points for disk in point.disks]
        used = np.unique(np.concatenate(live)) if live else np.zeros(0, np.uint64)
        placed, used_set = places(repo), set(used.tolist())
        packs, unused = [], 0
        for name in objects_under(repo, "packs"):
            trailer = repo.read_trailer(name)
            if not np.isin(trailer["ref"], used).any():
                packs.append(name)
            unused += sum(int(e["stored"]) for e in trailer
                          if int(e["ref"]) not in used_set
                          or placed.get(int(e["ref"])) != (name, int(e["offset"])))
        maps = set(objects_under(repo, "maps")) - {d.map for p in points for d in p.disks}
        manifests = set(objects_under(repo, "points")) - {p.id for p in points}
        return Leftovers(sorted(packs), sorted(maps), sorted(manifests), unused)


def places(repo) -> dict[int, tuple[str, int]]:
    """ref -> (pack name, offset): where the cache of `repo` places each chunk."""
    from repo_engine.maintenance.inventory import scan_refs
    from repo_engine.repository.index_records import pack_fields

    with repo.index.env.begin() as txn:
        table = scan_refs(repo.index, txn)
        names = {int.from_bytes(k, "big"): pack_fields(v)[0]
                 for k, v in txn.cursor(db=repo.index.packs)}
    return {int(r): (names[int(p)], int(o))
            for r, p, o in zip(table["ref"], table["pack"], table["offset"])}
