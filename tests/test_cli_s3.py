"""The CLI on repositories in object storage (`s3://BUCKET/PREFIX`) against the real SeaweedFS of
tests/s3server.py: init, backup, restore and inspection through the README's commands, where this
host's cache lives, `init --shared` for a local directory, and one-line errors with the documented
exit codes for a wrong endpoint, bad credentials, a missing bucket, a prefix that holds something
else and an unreachable server; no secret ever appears in what a command prints."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import MIB, CliResult, DiskModel, cli, restore_bytes
from race import Command
from s3cli import assert_one_line_error, bucket_objects, s3_environment
from s3proxy import FaultProxy
from s3server import SECRET_KEY, admin_client, free_ports


@pytest.fixture(autouse=True)
def environment(tmp_path, monkeypatch):
    """Credentials in the environment, fast retries, caches under the test's directory (the
    default rule: $XDG_CACHE_HOME); the endpoint is each command's --endpoint."""
    s3_environment(monkeypatch, tmp_path)


@pytest.fixture
def s3_repo(s3_bucket) -> str:
    return f"s3://{s3_bucket}/site1/repo"


def run(capsys, *args: object) -> CliResult:
    """The command's result, after checking that no secret is in what it printed."""
    result = cli(capsys, *args)
    for secret in {SECRET_KEY, os.environ.get("AWS_SECRET_ACCESS_KEY") or SECRET_KEY}:
        assert secret not in result.out + result.err
    return result


def ok(capsys, *args: object) -> CliResult:
    result = run(capsys, *args)
    assert result.code == 0, result.err
    return result


def failure(capsys, code: int, *args: object) -> str:
    """The one error line of a command that must fail with exit code `code`."""
    return assert_one_line_error(run(capsys, *args), code)


def disk(tmp_path: Path, seed: int, size: int = 4 * MIB) -> DiskModel:
    model = DiskModel(tmp_path / f"disk-{seed}.img", size, np.random.default_rng(seed))
    model.random_changes(6)
    return model


def test_init_backup_restore_on_s3(tmp_path, capsys, seaweedfs, s3_bucket, s3_repo):
    out = ok(capsys, "init", s3_repo, "--no-encryption", "--endpoint",
             seaweedfs.endpoint).out
    assert "created shared repository" in out and s3_repo in out
    model = disk(tmp_path, 1)
    ok(capsys, "backup", "image", s3_repo, "--endpoint", seaweedfs.endpoint, "--vm", "web1",
       "--disk", f"sda={model.path}")
    model.random_changes(3)
    ok(capsys, "backup", "image", s3_repo, "--endpoint", seaweedfs.endpoint, "--vm", "web1",
       "--disk", f"sda={model.path}", "--tag", "second")
    points = ok(capsys, "points", s3_repo, "--endpoint", seaweedfs.endpoint, "--json").json()
    assert [p["tags"] for p in points["points"]] == [[], ["second"]]
    # the endpoint from the environment instead of --endpoint (AWS conventions)
    os.environ["AWS_ENDPOINT_URL"] = seaweedfs.endpoint
    restored = restore_bytes(capsys, s3_repo, "web1@latest", "sda", tmp_path / "sda.img")
    assert restored == model.copy_of_content()
    keys = bucket_objects(seaweedfs, s3_bucket, "site1/repo/")
    assert "site1/repo/config" in keys
    assert any(k.startswith("site1/repo/packs/") for k in keys)
    assert not any("/index/" in k or "/locks/" in k for k in keys)  # local files stay local
    # a host that lost its cache rebuilds it from the bucket
    rebuilt = ok(capsys, "rebuild-index", s3_repo, "--cache-dir", tmp_path / "new", "--json")
    assert rebuilt.json()["points"] == 2


def test_the_cache_directory_rule(tmp_path, capsys, monkeypatch, seaweedfs, s3_repo):
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint)
    ok(capsys, "init", s3_repo, "--no-encryption")
    ok(capsys, "stats", s3_repo)
    caches = [p for p in (tmp_path / "xdg-cache" / "repo-engine").iterdir()]
    assert len(caches) == 1, caches  # $XDG_CACHE_HOME/repo-engine/<repo_id>
    default = caches[0]
    assert len(default.name) == 32 and (default / "index" / "data.mdb").exists()
    assert stat.S_IMODE(default.stat().st_mode) == 0o700
    assert stat.S_IMODE((default / "index").stat().st_mode) == 0o700

    monkeypatch.setenv("REPO_ENGINE_CACHE_DIR", str(tmp_path / "env-cache"))
    ok(capsys, "points", s3_repo)
    assert (tmp_path / "env-cache" / default.name / "index" / "data.mdb").exists()
    ok(capsys, "points", s3_repo, "--cache-dir", tmp_path / "option-cache")  # wins over both
    assert (tmp_path / "option-cache" / default.name / "index" / "data.mdb").exists()
    assert stat.S_IMODE((tmp_path / "option-cache" / default.name).stat().st_mode) == 0o700


def test_init_refuses_a_prefix_in_use(tmp_path, capsys, seaweedfs, s3_bucket, s3_repo):
    ep = ("--endpoint", seaweedfs.endpoint)
    admin_client(seaweedfs).put_object(Bucket=s3_bucket, Key="site1/repo/notes.txt", Body=b"x")
    err = failure(capsys, 2, "init", s3_repo, "--no-encryption", *ep)
    assert "already holds objects" in err and "notes.txt" in err
    # a neighbour prefix sharing the name's start is another prefix
    ok(capsys, "init", f"s3://{s3_bucket}/site1/re", "--no-encryption", *ep)
    err = failure(capsys, 2, "init", f"s3://{s3_bucket}/site1/re", "--no-encryption", *ep)
    assert "already holds a repository" in err
    assert list(bucket_objects(seaweedfs, s3_bucket, "site1/repo/")) == ["site1/repo/notes.txt"]


def test_open_what_is_not_a_repository(tmp_path, capsys, seaweedfs, s3_bucket, s3_repo):
    ep = ("--endpoint", seaweedfs.endpoint)
    err = failure(capsys, 1, "points", s3_repo, *ep)
    assert f"there is no repository at {s3_repo}" in err and f"repo-engine init {s3_repo}" in err
    admin_client(seaweedfs).put_object(Bucket=s3_bucket, Key="site1/repo/photos/a.jpg", Body=b"x")
    err = failure(capsys, 1, "points", s3_repo, *ep)
    assert "holds objects but no repository config: it is not a repo-engine repository" in err


def test_a_config_of_one_local_writer_in_a_bucket_is_damage(tmp_path, capsys, seaweedfs,
                                                            s3_bucket, s3_repo):
    ok(capsys, "init", tmp_path / "local")
    admin_client(seaweedfs).put_object(Bucket=s3_bucket, Key="site1/repo/config",
                                       Body=(tmp_path / "local" / "config").read_bytes())
    err = failure(capsys, 3, "points", s3_repo, "--endpoint", seaweedfs.endpoint)
    assert "always shared" in err


def test_wrong_endpoint_and_unreachable_server(tmp_path, capsys, seaweedfs, s3_repo):
    nobody = f"http://127.0.0.1:{free_ports(1)[0]}"
    err = failure(capsys, 1, "points", s3_repo, "--endpoint", nobody)
    assert f"cannot reach the S3 endpoint {nobody}" in err and "--endpoint" in err
    # an HTTP server that is not S3 (the SeaweedFS master's port)
    master = f"http://127.0.0.1:{seaweedfs.ports['master.port']}"
    err = failure(capsys, 1, "points", s3_repo, "--endpoint", master)
    assert master in err
    err = failure(capsys, 2, "points", s3_repo, "--endpoint", "s3.example.com")  # a typo
    assert ("endpoint 's3.example.com' must start with http:// or https:// (endpoint from the "
            "command line)") in err
    for fault, text in (("hang", "did not answer get config in time"),
                        ("reset", "cannot reach the S3 endpoint")):
        proxy = FaultProxy(seaweedfs.ports["s3.port"])
        try:
            proxy.arm(fault, 100)
            err = failure(capsys, 1, "points", s3_repo, "--endpoint", proxy.endpoint)
            assert text in err and "after 3 attempts" in err, err
        finally:
            proxy.close()


def test_bad_credentials_never_show_the_secret(tmp_path, capsys, monkeypatch, seaweedfs,
                                              s3_repo):
    ep = ("--endpoint", seaweedfs.endpoint)
    ok(capsys, "init", s3_repo, "--no-encryption", *ep)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-7f3a9c")
    for args in (("points", s3_repo), ("points", s3_repo, "--json"),
                 ("init", s3_repo + "2", "--no-encryption"),
                 ("--debug", "points", s3_repo)):
        result = run(capsys, *args, *ep)
        assert result.code == 1 and "refused the credentials" in result.err, result.err
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    err = failure(capsys, 1, "points", s3_repo, *ep)
    assert "no S3 credentials" in err


def test_missing_bucket(capsys, seaweedfs):
    err = failure(capsys, 1, "points", "s3://no-such-bucket-here/repo", "--endpoint",
                  seaweedfs.endpoint)
    assert "bucket 'no-such-bucket-here' does not exist" in err
    err = failure(capsys, 2, "points", "s3://Bad_Bucket/repo", "--endpoint", seaweedfs.endpoint)
    assert "'Bad_Bucket' is not a bucket name" in err


@pytest.mark.parametrize("text, message", [
    ("[s3]\nmax_attempts = 1000\n",
     "bad S3 settings: max_attempts must be at most 100 (max_attempts from the S3 settings file "
     "{path})"),
    ('[s3]\naddressing_style = "dns"\n', "addressing_style must be one of path, virtual "
                                         "(addressing_style from the S3 settings file {path})"),
    ('[s3]\nendpont = "http://x"\n', "the S3 settings file {path}: unknown S3 setting endpont"),
    ("[s3\n", "the S3 settings file {path} is not valid TOML"),
])
def test_a_bad_s3_settings_file_is_a_usage_error_naming_file_and_key(
        tmp_path, capsys, monkeypatch, seaweedfs, s3_bucket, s3_repo, text, message):
    ok(capsys, "init", s3_repo, "--no-encryption", "--endpoint", seaweedfs.endpoint)
    before = bucket_objects(seaweedfs, s3_bucket, "site1/repo/")
    settings = tmp_path / "s3.toml"
    settings.write_text(text)
    monkeypatch.setenv("REPO_ENGINE_S3_CONFIG", str(settings))
    err = failure(capsys, 2, "backup", "image", s3_repo, "--endpoint", seaweedfs.endpoint,
                  "--vm", "web1", "--disk", f"sda={disk(tmp_path, 1).path}")
    assert message.format(path=settings) in err
    assert bucket_objects(seaweedfs, s3_bucket, "site1/repo/") == before


def test_endpoint_is_for_s3_locations_only(tmp_path, capsys, seaweedfs):
    ok(capsys, "init", tmp_path / "repo")
    result = run(capsys, "points", tmp_path / "repo", "--endpoint", seaweedfs.endpoint)
    assert result.code == 2 and "--endpoint applies to s3:// locations only" in result.err


def test_init_shared_local_directory(tmp_path, capsys):
    repo = tmp_path / "repo"
    ok(capsys, "init", repo, "--shared", "--cache-dir", tmp_path / "host1")
    assert not (repo / "index").exists() and not (repo / "locks").exists()
    model = disk(tmp_path, 2)
    ok(capsys, "backup", "image", repo, "--cache-dir", tmp_path / "host1", "--vm", "v",
       "--disk", f"d={model.path}")
    caches = list((tmp_path / "host1").iterdir())
    assert len(caches) == 1 and (caches[0] / "locks").is_dir()
    target = tmp_path / "out.img"
    ok(capsys, "restore", repo, "v@latest", "--disk", "d", "--to", target, "--cache-dir",
       tmp_path / "host1")
    assert target.read_bytes() == model.copy_of_content()
    point = ok(capsys, "points", repo, "--cache-dir", tmp_path / "host1", "--json").json()
    # another host finds the point through the journal; rebuild-index rebuilds a host's cache
    for host in ("host2", "host1"):
        assert ok(capsys, "points", repo, "--cache-dir", tmp_path / host, "--json").json() == point
        rebuilt = ok(capsys, "rebuild-index", repo, "--cache-dir", tmp_path / host, "--json")
        assert rebuilt.json()["points"] == 1
    assert not (repo / "index").exists() and not (repo / "locks").exists()  # hosts' caches


@pytest.mark.parametrize("variable, base", [("REPO_ENGINE_CACHE_DIR", "{file}"),
                                            ("XDG_CACHE_HOME", "{file}/repo-engine")])
def test_a_cache_directory_that_is_a_file_names_the_setting(tmp_path, capsys, monkeypatch,
                                                            variable, base):
    repo = tmp_path / "repo"
    ok(capsys, "init", repo, "--shared", "--cache-dir", tmp_path / "host1")
    (tmp_path / "afile").write_bytes(b"x")
    monkeypatch.setenv(variable, str(tmp_path / "afile"))
    for args in (["points", repo], ["backup", "image", repo, "--vm", "v", "--disk",
                                    f"d={disk(tmp_path, 1).path}"]):
        err = assert_one_line_error(cli(capsys, *args))
        assert err == (f"repo-engine: error: cannot keep this host's cache of shared "
                       f"repositories in {base.format(file=tmp_path / 'afile')} (not a "
                       "directory); name a writable directory with --cache-dir or "
                       "$REPO_ENGINE_CACHE_DIR\n")
    assert (tmp_path / "afile").read_bytes() == b"x"


def test_commands_name_points_another_host_stored(tmp_path, capsys):
    """forget and protect find a point before they lock: in a cache brought up to date."""
    repo, host = tmp_path / "repo", ("--cache-dir", tmp_path / "host1")
    ok(capsys, "init", repo, "--shared", *host)
    model = disk(tmp_path, 4, size=MIB)
    ids = []
    for _ in range(2):
        model.random_changes(2)
        ids.append(ok(capsys, "backup", "image", repo, *host, "--vm", "v", "--disk",
                      f"d={model.path}", "--json").json()["point"]["id"])
    ok(capsys, "protect", repo, ids[0][:8], "--cache-dir", tmp_path / "host2")
    ok(capsys, "unprotect", repo, ids[0][:8], "--cache-dir", tmp_path / "host3")
    ok(capsys, "forget", repo, ids[0][:8], "--cache-dir", tmp_path / "host4")
    points = ok(capsys, "points", repo, *host, "--json").json()["points"]
    assert [p["id"] for p in points] == ids[1:]


def test_unlock_removes_what_a_killed_backup_left(tmp_path, capsys, monkeypatch, seaweedfs,
                                                  s3_bucket, s3_repo):
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweedfs.endpoint)
    monkeypatch.setenv("REPO_ENGINE_LEASE_SECONDS", "1")
    ok(capsys, "init", s3_repo, "--no-encryption")
    model = disk(tmp_path, 3)
    cmd = Command(tmp_path, "backup", "image", s3_repo, "--vm", "web1", "--disk",
                  f"sda={model.path}", pauses=("backup.before_commit",))
    assert cmd.reached("backup.before_commit")
    cmd.proc.kill()
    cmd.finish()
    assert bucket_objects(seaweedfs, s3_bucket, "site1/repo/leases/")
    time.sleep(1.1)  # its lease expired
    out = ok(capsys, "unlock", s3_repo).out
    assert 'removed the lease of "backup web1"' in out
    assert 'lock of "backup web1"' in out  # this host's lock file, in its cache
    assert not bucket_objects(seaweedfs, s3_bucket, "site1/repo/leases/")
    ok(capsys, "backup", "image", s3_repo, "--vm", "web1", "--disk", f"sda={model.path}")
