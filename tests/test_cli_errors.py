"""Whatever fails inside a command, the user sees one line `repo-engine: error: ...` and the
documented exit code, never a Python traceback; `--debug` (or REPO_ENGINE_DEBUG=1) shows it."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import click
import lmdb
import numpy as np
import pytest
import vddk_ext
from pyVmomi import vmodl

from repo_engine.cli.main import cli as cli_group
from repo_engine.units import control_character

from helpers import MIB, DiskModel, cli, tree_digest
from test_bad_input import setup  # noqa: F401 (a fixture)

REPO_OPEN = "repo_engine.repository.location.open_repository"
KEYS_OPEN = "repo_engine.repository.location.open_key_manager"
REPO_DIRECTORY = "repo_engine.maintenance.rebuild.check_repository_directory"

# every leaf command, with arguments that pass option parsing, and the engine function it reaches
# first (the fault is injected there)
COMMANDS: dict[str, tuple[list[str], str]] = {
    "init": (["init", "{tmp}/new"], "repo_engine.repository.repo.Repository.init"),
    "backup image": (["backup", "image", "{repo}", "--vm", "v", "--disk", "d={img}"], REPO_OPEN),
    "backup vddk": (["backup", "vddk", "{repo}", "--vm", "v", "--disk", "2000=[ds] v.vmdk",
                     "--server", "vc", "--user", "u", "--password-env", "PW", "--vmx-spec",
                     "moref=vm-1", "--thumbprint", "AB:CD", "--vddk-libdir", "{tmp}"],
                    REPO_OPEN),
    "backup vsphere": (["backup", "vsphere", "{repo}", "--server", "vc", "--user", "u",
                        "--password-env", "PW", "--vm", "v", "--vddk-libdir", "{tmp}"],
                       REPO_OPEN),
    "restore image": (["restore", "{repo}", "v@latest", "--disk", "d", "--to", "{tmp}/o.img"],
                      REPO_OPEN),
    "restore vsphere": (["restore", "vsphere", "{repo}", "v@latest", "--server", "vc", "--user",
                         "u", "--password-env", "PW", "--in-place", "--vddk-libdir", "{tmp}"],
                        REPO_OPEN),
    "vsphere vms": (["vsphere", "vms", "--server", "vc", "--user", "u", "--password-env", "PW"],
                    "repo_engine.sources.vsphere.connection.connect"),
    "points": (["points", "{repo}"], REPO_OPEN),
    "show": (["show", "{repo}", "v@latest"], REPO_OPEN),
    "diff": (["diff", "{repo}", "v@latest", "v@latest"], REPO_OPEN),
    "stats": (["stats", "{repo}"], REPO_OPEN),
    "forget": (["forget", "{repo}", "--keep-last", "1"], REPO_OPEN),
    "protect": (["protect", "{repo}", "v@latest"], REPO_OPEN),
    "unprotect": (["unprotect", "{repo}", "v@latest"], REPO_OPEN),
    "gc": (["gc", "{repo}"], REPO_OPEN),
    "verify": (["verify", "{repo}"], REPO_OPEN),
    "scrub": (["scrub", "{repo}"], REPO_OPEN),
    "rebuild-index": (["rebuild-index", "{repo}"], REPO_DIRECTORY),
    "unlock": (["unlock", "{repo}"], REPO_DIRECTORY),
    **{f"key {args[0]}": (["key", args[0], "{repo}", *args[1:]], KEYS_OPEN) for args in (
        ["list"], ["status"], ["add"], ["remove", "abcd"], ["passwd"], ["rotate"],
        ["export-recovery", "--out", "{tmp}/k.pem"], ["recover", "--private-key", "{img}"])},
    "key retire": (["key", "retire", "{repo}"], REPO_OPEN),  # opens the repository, not the keys
}

# fault -> (exit code, what the line must say)
FAULTS: dict[str, tuple[Callable[[], BaseException], int, list[str]]] = {
    "ENOSPC": (lambda: OSError(errno.ENOSPC, "No space left on device", "/r/index/data.mdb"), 1,
               ["filesystem full", "/r/index/data.mdb", "free some space"]),
    "EACCES": (lambda: OSError(errno.EACCES, "Permission denied", "/r/locks"), 1,
               ["permission denied", "/r/locks"]),
    "EROFS": (lambda: OSError(errno.EROFS, "Read-only file system", "/r/tmp/x"), 1,
              ["read-only filesystem", "/r/tmp/x"]),
    "ENOENT": (lambda: FileNotFoundError(errno.ENOENT, "No such file or directory", "/r/p"), 1,
               ["no such file or directory", "/r/p"]),
    "vddk_ext": (lambda: vddk_ext.DiskError(errno.ENOSPC, "writing disk /t/o.img at 65536: "
                                            "No space left on device"), 1,
                 ["filesystem full", "writing disk /t/o.img at 65536"]),
    "VixError": (lambda: vddk_ext.VixError(errno.EIO, "VixDiskLib_QueryAllocatedBlocks on "
                                           "[ds] v.vmdk: A general error occurred (VIX error 1)"),
                 1, ["VixDiskLib_QueryAllocatedBlocks on [ds] v.vmdk: A general error occurred"]),
    "lmdb": (lambda: lmdb.DiskError("mdb_txn_commit: No space left on device"), 1,
             ["filesystem full", "repository index", "mdb_txn_commit"]),
    "lmdb-corrupt": (lambda: lmdb.CorruptedError("mdb_get: MDB_CORRUPTED: Located page was "
                                                 "wrong type"), 3,
                     ["repository index is damaged", "MDB_CORRUPTED", "rebuild-index"]),
    "pyVmomi": (lambda: vmodl.fault.SystemError(msg="QueryChangedDiskAreas failed"), 1,
                ["vSphere fault SystemError", "QueryChangedDiskAreas failed"]),
    "RecursionError": (lambda: RecursionError("maximum recursion depth exceeded"), 1,
                       ["nested too deeply"]),
    "MemoryError": (lambda: MemoryError(), 1, ["out of memory"]),
    "RuntimeError": (lambda: RuntimeError("boom"), 1,
                     ["internal error: RuntimeError: boom", "--debug"]),
}


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    assert "Traceback" not in result.err, result.err
    assert result.code == code, (result.code, result.err)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("repo-engine: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _leaf_commands(group: click.Group, prefix: str = "") -> set[str]:
    ctx = click.Context(group)
    found = set()
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            found |= _leaf_commands(command, f"{prefix}{name} ")
        else:
            found.add(f"{prefix}{name}")
    return found


def test_the_fault_table_covers_every_command():
    assert _leaf_commands(cli_group) == set(COMMANDS)


def _raiser(make: Callable[[], BaseException]) -> Callable[..., object]:
    def fail(*_args: object, **_kwargs: object) -> object:
        raise make()
    return fail


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_turns_every_fault_into_one_line(tmp_path, capsys, monkeypatch, command,
                                                       fault):
    argv, target = COMMANDS[command]
    make, code, fragments = FAULTS[fault]
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    monkeypatch.setenv("PW", "secret")
    monkeypatch.setattr(target, _raiser(make))
    args = [a.format(tmp=tmp_path, repo=tmp_path / "repo", img=img) for a in argv]
    assert_one_line_error(cli(capsys, *args), code, *fragments)


@pytest.mark.parametrize("how", ["flag", "env", "env yes", "env junk"])
def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, how):
    monkeypatch.setattr(REPO_OPEN, _raiser(lambda: RuntimeError("boom")))
    if how.startswith("env"):
        value = {"env": "1", "env yes": "yes", "env junk": "maybe"}[how]
        monkeypatch.setenv("REPO_ENGINE_DEBUG", value)
        result = cli(capsys, "points", tmp_path)
    else:
        result = cli(capsys, "--debug", "points", tmp_path)
    assert result.code == 1
    assert "Traceback (most recent call last)" in result.err
    assert result.err.rstrip().splitlines()[-1] == (
        "repo-engine: error: internal error: RuntimeError: boom (run with --debug for the "
        "traceback)")


@pytest.mark.parametrize("value", ["0", "false", "No", ""])
def test_debug_off_in_the_environment(tmp_path, capsys, monkeypatch, value):
    monkeypatch.setattr(REPO_OPEN, _raiser(lambda: RuntimeError("boom")))
    monkeypatch.setenv("REPO_ENGINE_DEBUG", value)
    assert_one_line_error(cli(capsys, "points", tmp_path), 1, "internal error: RuntimeError")


@pytest.mark.parametrize("content, fragment", [
    (b'server = "\xff"\n', "is not valid TOML"),  # not UTF-8
    (None, "is larger than any settings file"),  # /dev/zero: never read whole
])
@pytest.mark.parametrize("command", [["vsphere", "vms"], ["backup", "vsphere", "{repo}"]])
def test_a_vsphere_config_that_is_no_toml(tmp_path, capsys, setup, content, fragment, command):
    repo, _ = setup
    config = Path("/dev/zero")
    if content is not None:
        config = tmp_path / "job.toml"
        config.write_bytes(content)
    result = cli(capsys, *[a.format(repo=repo) for a in command], "--config", config)
    assert_one_line_error(result, 2, f"--config: {config} {fragment}")


@pytest.mark.parametrize("location, fragment", [
    ("s3://", "s3://: '' is not a bucket name"),
    ("s3://Bad_Bucket/repo", "'Bad_Bucket' is not a bucket name"),
    ("s3://ok-bucket/a/../b", "s3://ok-bucket/a/../b: the prefix 'a/../b' is not a valid object"),
    ("s3:/bucket/repo", "s3:/bucket/repo is neither a directory nor s3://BUCKET/PREFIX; write "
                        "s3://BUCKET/PREFIX, or ./s3:/bucket/repo for a directory of that name"),
    ("S3://bucket/repo", "S3://bucket/repo is neither a directory nor s3://BUCKET/PREFIX"),
    ("ftp://host/repo", "ftp://host/repo is neither a directory nor s3://BUCKET/PREFIX"),
])
@pytest.mark.parametrize("command", [["init"], ["points"], ["key", "list"]])
def test_a_malformed_location_is_a_usage_error_before_anything_is_opened(
        tmp_path, capsys, monkeypatch, location, fragment, command):
    """What the user typed is refused (exit 2) before a connection is tried, a directory of
    that name made or a cache written."""
    from repo_engine.repository.store import s3

    def never(*_args: object) -> None:
        raise AssertionError("a connection was tried")
    monkeypatch.setattr(s3.S3Store, "__init__", never)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPO_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    assert_one_line_error(cli(capsys, *command, location), 2, fragment)
    assert not any(tmp_path.iterdir())


def test_restore_into_a_missing_directory(tmp_path, capsys, setup):
    """A usage error (exit 2), named before anything is read: no failed open of a temporary
    file beside the target."""
    repo, _ = setup
    result = cli(capsys, "restore", repo, "v@latest", "--disk", "d", "--to",
                 tmp_path / "nosuchdir" / "x.img")
    assert_one_line_error(result, 2, "nosuchdir is not a directory")


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_restore_to_a_directory(tmp_path, capsys, setup, force):
    repo, _ = setup
    (tmp_path / "adir").mkdir()
    result = cli(capsys, "restore", repo, "v@latest", "--disk", "d", "--to", tmp_path / "adir",
                 *force)
    assert result.code in (1, 2)
    assert_one_line_error(result, result.code, "adir")
    assert (tmp_path / "adir").is_dir()


@pytest.mark.parametrize("args, fragment", [
    (["scrub", "{repo}", "--workers", "-1"], "--workers"),
    (["scrub", "{repo}", "--workers", "0"], "--workers"),
    (["gc", "{repo}", "--wait-timeout", "-1"], "--wait-timeout"),
    # a time that far back or ahead is no date: it overflowed where gc computed one
    (["gc", "{repo}", "--grace", "99999999999999999999d"], "--grace"),
    (["scrub", "{repo}", "--max-duration", "36501d"], "--max-duration"),
    # NaN passes any range (it compares false with both bounds)
    (["gc", "{repo}", "--max-unused", "nan"], "--max-unused"),
    (["gc", "{repo}", "--wait-timeout", "nan"], "--wait-timeout"),
    (["backup", "image", "{repo}", "--vm", "v", "--disk", "d={img}", "--audit", "NaN"],
     "--audit"),
])
def test_option_ranges_are_usage_errors(tmp_path, capsys, setup, args, fragment):
    repo, model = setup
    result = cli(capsys, *[a.format(repo=repo, img=model.path) for a in args])
    assert result.code == 2, result.err
    assert fragment in result.err and "Traceback" not in result.err


@pytest.mark.parametrize("args, fragment, command", [
    (["backup", "image", "r", "--foo"], "no such option '--foo'", "backup image"),
    (["backup", "image"], "missing argument 'REPO'", "backup image"),
    (["backup", "image", "r", "--disk", "d=x"], "missing option '--vm'", "backup image"),
    (["scrub", "r", "--workers", "many"], "invalid value for '--workers': 'many'", "scrub"),
    (["key", "add", "r", "--label"], "option '--label' requires an argument", None),
    (["nosuch"], "no such command 'nosuch'", ""),
    (["vsphere", "nosuch"], "no such command 'nosuch'", "vsphere"),
    (["--foo"], "no such option '--foo'", ""),
])
def test_clicks_own_usage_errors_are_one_line(capsys, args, fragment, command):
    """click's errors (an unknown option or command, a missing argument or option, a bad value)
    are one line and exit code 2 like every other, naming the command's help (before, click's
    usage line and hint came first: three lines and a blank)."""
    result = cli(capsys, *args)
    assert result.code == 2
    assert result.err.startswith(f"repo-engine: error: {fragment}") and result.err.count("\n") == 1
    if command is not None:  # click knows the command it was parsing
        hint = " ".join(["repo-engine", command]) if command else "repo-engine"
        assert result.err.endswith(f" (see '{hint} --help')\n")


@pytest.mark.parametrize("word", ["b\x1b]0;title\x07", "b\x9b2J", "b\x7fc"])
def test_a_word_in_a_usage_error_cannot_drive_the_terminal(tmp_path, capsys, word):
    """click names extra arguments as they were given: a control character among them (an
    escape sequence setting the terminal's title, a C1 one) is shown escaped."""
    result = cli(capsys, "points", tmp_path, "a", word)
    assert result.code == 2 and result.err.count("\n") == 1
    assert result.err.startswith("repo-engine: error: got unexpected extra arguments (a b\\")
    assert control_character(result.err.rstrip("\n")) is None


def _mount_tmpfs(size: str) -> Path:
    mount = Path(tempfile.mkdtemp(prefix="repo-engine-enospc-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        mount.rmdir()
        pytest.skip("cannot mount a tmpfs here (needs root)")
    return mount


def _umount(mount: Path) -> None:
    subprocess.run(["umount", "-l", str(mount)], check=False)
    mount.rmdir()


def test_restore_onto_a_full_filesystem(tmp_path, capsys):
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo, "--block-size", "64KiB").code == 0
    img = tmp_path / "d.img"
    img.write_bytes(np.random.default_rng(1).integers(0, 256, 4 * MIB, dtype=np.uint8).tobytes())
    assert cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={img}").code == 0
    mount = _mount_tmpfs("1M")
    try:
        result = cli(capsys, "restore", repo, "v@latest", "--disk", "d", "--to", mount / "o.img")
        assert_one_line_error(result, 1, "filesystem full")
    finally:
        _umount(mount)


def _fill(directory: Path) -> None:
    """Fill the filesystem holding `directory` to the last page."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (64 * 1024, 4096, 1):
            try:
                while os.write(fd, bytes(size)):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("args", [
    ["backup", "image", "{repo}", "--vm", "v", "--disk", "d={img}"],   # lock, packs, manifest
    ["protect", "{repo}", "v@latest"],                                # manifest + index commit
    ["forget", "{repo}", "--keep-last", "1"],
    ["gc", "{repo}"],
    ["rebuild-index", "{repo}"],
])
def test_repository_filesystem_full(tmp_path, capsys, args):
    """The repository's filesystem fills up; every command says so in one line."""
    mount = _mount_tmpfs("4M")
    try:
        repo = mount / "repo"
        assert cli(capsys, "init", repo, "--block-size", "16KiB", "--pack-size", "256KiB").code == 0
        model = DiskModel(tmp_path / "d.img", MIB, np.random.default_rng(2))
        model.random_changes(4)
        for _ in range(2):
            assert cli(capsys, "backup", "image", repo, "--vm", "v", "--disk",
                       f"d={model.path}").code == 0
            model.random_changes(2)
        _fill(mount)
        before = tree_digest(repo / "points")
        result = cli(capsys, *[a.format(repo=repo, img=model.path) for a in args])
        assert_one_line_error(result, 1, "filesystem full", "free some space")
        assert tree_digest(repo / "points") == before
    finally:
        _umount(mount)


@pytest.mark.parametrize("target, fault", [
    ("repo_engine.repository.atomic.write_all",            # block maps and the manifest
     lambda: OSError(errno.ENOSPC, "No space left on device")),
    ("repo_engine.repository.index.Index.commit_pack",     # the index commit
     lambda: lmdb.DiskError("mdb_txn_commit: No space left on device")),
])
def test_repository_full_mid_backup_keeps_it_sound(tmp_path, capsys, setup, monkeypatch, target,
                                                   fault):
    repo, model = setup
    model.random_changes(3)
    with monkeypatch.context() as patch:
        patch.setattr(target, _raiser(fault))
        result = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}")
    assert_one_line_error(result, 1, "full")
    assert len(cli(capsys, "points", repo, "--json").json()["points"]) == 1
    assert cli(capsys, "verify", repo).code == 0


def test_permission_denied_on_the_repository(tmp_path, capsys, setup, monkeypatch):
    """Root ignores file modes: the denial is injected where the index is opened."""
    repo, _ = setup

    def denied(*_a: object, **_k: object) -> object:
        raise lmdb.ReadonlyError(f"{repo}/index: Permission denied")

    monkeypatch.setattr(lmdb, "open", denied)
    result = cli(capsys, "points", repo)
    assert_one_line_error(result, 1, "permission denied", "repository index")


def test_program_exit_code_and_single_line(tmp_path):
    """The installed program, not only `run`: a missing target directory is one line, exit 1."""
    result = subprocess.run([sys.executable, "-m", "repo_engine", "points", str(tmp_path / "x")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def _damage_index_pages(repo: Path) -> None:
    """0xff over the node offsets of every page after the two meta pages: LMDB then reads nodes
    past the end of the file, which the memory map turns into SIGBUS."""
    data, page = repo / "index" / "data.mdb", 4096
    with open(data, "r+b") as f:
        for offset in range(2 * page, data.stat().st_size, page):
            f.seek(offset + 16)
            f.write(b"\xff" * 64)


def test_a_fault_in_a_library_is_one_line_exit_3_and_its_advice_repairs(tmp_path, capsys, setup):
    repo, model = setup
    _damage_index_pages(repo)
    # the test runner's faulthandler must not reach the program
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    for command in ("points", "verify"):
        result = subprocess.run([sys.executable, "-m", "repo_engine", command, str(repo)],
                                capture_output=True, text=True, env=env)
        assert (result.returncode, result.stderr.count("\n")) == (3, 1), result.stderr
        assert result.stderr.startswith("repo-engine: error: stopped by SIGBUS in a library")
        assert "run 'repo-engine rebuild-index' on the repository" in result.stderr
    assert cli(capsys, "rebuild-index", repo).code == 0
    assert cli(capsys, "restore", repo, "v@latest", "--disk", "d", "--to",
               tmp_path / "back.img").code == 0
    assert (tmp_path / "back.img").read_bytes() == model.path.read_bytes()


def test_debug_leaves_a_fault_to_faulthandler(tmp_path, setup):
    """With --debug the Python stack of the faulting thread is what is printed (for a report)."""
    repo, _ = setup
    _damage_index_pages(repo)
    result = subprocess.run([sys.executable, "-m", "repo_engine", "--debug", "points", str(repo)],
                            capture_output=True, text=True)
    assert result.returncode == -signal.SIGBUS
    assert "Fatal Python error: Bus error" in result.stderr and "index.py" in result.stderr
