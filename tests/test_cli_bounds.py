"""Every value a user gives is bounded: a number of 5,000 digits, a count past what a command can
do, a duration of ten thousand years are each refused in one line with the usage exit code, the
value cut in the message, and the repository left as it was."""

from __future__ import annotations

import pytest

from repo_engine.units import SHOWN_MAX, capped_int, cut

from helpers import cli, tree_digest
from test_bad_input import _assert_one_line_error, setup  # noqa: F401 (a fixture)

HUGE = "9" * 5000   # past Python's 4,300 digits for an integer text


@pytest.mark.parametrize("args, fragments", [
    (["forget", "{repo}", "--keep-last", HUGE], ["--keep-last", "(5000 characters)",
                                                 "from -1 to 1000000"]),
    (["forget", "{repo}", "--keep-daily", "1000001"], ["--keep-daily", "'1000001'"]),
    (["forget", "{repo}", "--keep-weekly", "-2"], ["--keep-weekly", "'-2'"]),
    (["forget", "{repo}", "--keep-within", f"{HUGE}d"], ["not a duration", "(5001 characters)"]),
    (["forget", "{repo}", "--keep-within", "10000y"], ["the longest is 9999y"]),
    (["forget", "{repo}", "--keep-within", "9999y1d"], ["the longest is 9999y"]),
    (["scrub", "{repo}", "--workers", "257"], ["--workers", "from 1 to 256"]),
    (["scrub", "{repo}", "--workers", HUGE], ["--workers", "(5000 characters)"]),
    (["scrub", "{repo}", "--read-data-subset", f"{HUGE}/{HUGE}"], ["subset", "characters)"]),
    (["scrub", "{repo}", "--max-duration", f"{HUGE}s"], ["too long"]),
    (["gc", "{repo}", "--wait-timeout", "1e400"], ["--wait-timeout"]),
    (["gc", "{repo}", "--grace", f"{HUGE}s"], ["--grace"]),
    (["backup", "vddk", "{repo}", "--vm", "v", "--disk", "1=x", "--server", "s", "--user", "u",
      "--vmx-spec", "m", "--port", HUGE], ["--port", "from 1 to 65535"]),
])
def test_a_value_past_its_bound_is_one_cut_line(setup, capsys, args, fragments):
    repo, _ = setup
    before = tree_digest(repo)
    result = cli(capsys, *(a.replace("{repo}", str(repo)) for a in args))
    _assert_one_line_error(result, 2, *fragments)
    assert len(result.err) < 4 * SHOWN_MAX + 200, result.err
    assert "Traceback" not in result.err and "internal error" not in result.err
    assert tree_digest(repo) == before


@pytest.mark.parametrize("args, fragments", [
    (["--pack-size", "2GiB"], ["pack size", "at most 1GiB"]),
    (["--pack-size", f"{HUGE}KiB"], ["not a size", "(5003 characters)"]),
    (["--max-chain", "1001"], ["--max-chain", "from 1 to 1000"]),
    (["--max-chain", "0"], ["--max-chain", "from 1 to 1000"]),
    (["--compression-level", HUGE], ["--compression-level", "from 1 to 19"]),
    (["--compression-level", "20"], ["--compression-level", "from 1 to 19"]),
    (["--block-size", "8MiB"], ["block size", "16KiB to 4MiB"]),
])
def test_init_refuses_settings_out_of_bounds_and_creates_nothing(tmp_path, capsys, args,
                                                                 fragments):
    result = cli(capsys, "init", tmp_path / "repo", *args)
    _assert_one_line_error(result, 2, *fragments)
    assert not (tmp_path / "repo").exists()


def test_init_takes_the_bounds_themselves(tmp_path, capsys):
    result = cli(capsys, "init", tmp_path / "repo", "--pack-size", "1GiB", "--max-chain", "1000",
                 "--compression-level", "19")
    assert result.code == 0, result.err


def test_forget_takes_the_longest_duration_and_the_largest_count(setup, capsys):
    repo, _ = setup
    result = cli(capsys, "forget", repo, "--keep-within", "9998y12mo", "--keep-last", "1000000",
                 "--dry-run")
    assert result.code == 0, result.err


def test_an_overlong_word_of_any_message_is_cut(setup, capsys):
    repo, _ = setup
    result = cli(capsys, "points", repo, "x" * 1_000_000)
    _assert_one_line_error(result, 2, "unexpected extra argument", "(1000002 characters)",
                           "see 'repo-engine points --help'")
    assert len(result.err) < 1000


def test_capped_int_and_cut():
    assert capped_int(" 7 ", "--n", 1, 10) == 7
    assert capped_int("-1", "--n", -1, 10) == -1
    for bad in ("11", "0", "x", "1.5", "", HUGE):
        with pytest.raises(Exception, match="is not a whole number from 1 to 10"):
            capped_int(bad, "--n", 1, 10)
    assert cut("abc") == "abc"
    assert cut("a" * 500) == "a" * SHOWN_MAX + "... (500 characters)"


@pytest.mark.parametrize("args, fragments", [
    (["backup", "image", "{repo}", "--vm", "", "--disk", "d={img}"], ["--vm", "empty name"]),
    (["backup", "image", "{repo}", "--vm", "v", "--disk", "d={img}", "--tag", ""],
     ["--tag", "empty name"]),
    (["forget", "{repo}", "--vm", "", "--keep-last", "1"], ["--vm", "empty name"]),
    (["forget", "{repo}", "--keep-tag", ""], ["--keep-tag", "empty name"]),
    (["points", "{repo}", "--vm", ""], ["--vm", "empty name"]),
    (["points", ""], ["REPO", "empty location"]),
    (["init", ""], ["REPO", "empty location"]),
])
def test_an_empty_name_is_refused(setup, capsys, args, fragments):
    _refused_as_usage(setup, capsys, args, fragments)


def test_forget_of_a_vm_with_no_points_says_so(setup, capsys):
    repo, _ = setup
    before = tree_digest(repo)
    result = cli(capsys, "forget", repo, "--vm", "nosuch", "--keep-last", "1")
    _assert_one_line_error(result, 1, "no points of VM 'nosuch'", "repo-engine points")
    assert tree_digest(repo) == before
    assert cli(capsys, "forget", repo, "--vm", "v", "--keep-last", "1").code == 0


def _vsphere_config(tmp_path, text: str):
    path = tmp_path / "job.toml"
    path.write_text('server = "vc"\nuser = "u"\npassword-env = "NO_SUCH_VARIABLE"\n' + text)
    return path


@pytest.mark.parametrize("text, fragments", [
    ("port = 99999999999\n", ["port in", "from 1 to 65535"]),
    ("port = 0\n", ["port in", "from 1 to 65535"]),
    ('vm = "a\\u0007b"\n', ["vm in", "control character"]),
    ('vm = ""\n', ["vm in", "empty name"]),
    ('tags = ["ok", ""]\n', ["tags in", "empty name"]),
    ("audit = 1000\n", ["audit in", "0<=x<=100"]),
    ('password-file = "a\\u0000b"\n', ["password-file in", "NUL"]),
])
def test_a_vsphere_config_is_checked_as_the_options_are(setup, tmp_path, capsys, text,
                                                        fragments):
    repo, _ = setup
    before = tree_digest(repo)
    config = _vsphere_config(tmp_path, text)
    result = cli(capsys, "backup", "vsphere", repo, "--config", config)
    _assert_one_line_error(result, 2, "--config:", *fragments)
    assert tree_digest(repo) == before


@pytest.mark.parametrize("option, where, fragments", [
    ("--to", "{tmp}/nodir/x.img", ["{tmp}/nodir is not a directory", "existing directory"]),
    ("--to", "{img}/x.img", ["{img} is not a directory"]),
    ("--to", "{repo}/x.img", ["inside the repository {repo}", "outside it"]),
    ("--to", "{repo}/packs/x.img", ["inside the repository"]),
    ("--to", "{link}/x.img", ["inside the repository"]),
    ("--onto", "{repo}/config", ["inside the repository"]),
])
def test_a_restore_target_in_no_directory_or_in_the_repository_is_refused(
        setup, tmp_path, capsys, option, where, fragments):
    repo, model = setup
    (tmp_path / "link").symlink_to(repo)
    names = {"{tmp}": str(tmp_path), "{img}": str(model.path), "{repo}": str(repo),
             "{link}": str(tmp_path / "link")}

    def fill(text: str) -> str:
        for name, value in names.items():
            text = text.replace(name, value)
        return text

    before = tree_digest(repo)
    args = ["restore", repo, "v@latest", "--disk", "d", option, fill(where)]
    if option == "--onto":
        args += ["--base", "v@latest"]
    result = cli(capsys, *args)
    _assert_one_line_error(result, 2, option, *map(fill, fragments))
    assert tree_digest(repo) == before


def test_a_recovery_key_is_never_exported_into_the_repository(tmp_path, capsys):
    repo = tmp_path / "repo"
    secret = tmp_path / "pass"
    secret.write_text("correct horse\n")
    assert cli(capsys, "init", repo, "--encryption", "--passphrase-file", secret).code == 0
    before = tree_digest(repo)
    result = cli(capsys, "key", "export-recovery", repo, "--passphrase-file", secret,
                 "--out", repo / "keys" / "recovery.pem")
    _assert_one_line_error(result, 2, "--out", "inside the repository", "outside it")
    assert tree_digest(repo) == before
    assert not list(repo.rglob("*.pem"))


def _little_memory(monkeypatch, nbytes: int) -> None:
    from repo_engine import memory

    monkeypatch.setattr(memory, "available", lambda: nbytes)


def test_a_change_list_that_would_not_fit_in_memory_is_refused_before_decoding(
        setup, tmp_path, capsys, monkeypatch):
    repo, model = setup
    changes = tmp_path / "changes.json"
    changes.write_text("[" + ",".join(["[0,65536]"] * 20_000) + "]")   # 200 KB, 4 MB decoded
    _little_memory(monkeypatch, 4 * 1024 * 1024)
    before = tree_digest(repo)
    result = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                 "--changed", f"d={changes}")
    _assert_one_line_error(result, 2, f"decoding extents file {changes} needs about",
                           "more than half the 4.0 MiB available", "merge its nearby extents")
    assert tree_digest(repo) == before


def test_an_audit_that_would_not_fit_in_memory_is_refused_and_stores_no_point(
        setup, tmp_path, capsys, monkeypatch):
    repo, model = setup
    changes = tmp_path / "changes.json"
    changes.write_text("[[0, 65536]]")
    _little_memory(monkeypatch, 1024)
    result = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                 "--changed", f"d={changes}", "--audit", "100")
    _assert_one_line_error(result, 2, "--audit 100 of disk d (31 blocks) needs about",
                           "give a smaller --audit percentage")
    assert len(cli(capsys, "points", repo, "--json").json()["points"]) == 1


@pytest.mark.parametrize("command", [["points"], ["stats", "--json"], ["verify"],
                                     ["rebuild-index"], ["unlock"], ["scrub", "--no-key"]])
def test_a_repository_path_that_is_a_file_is_named_as_one(tmp_path, capsys, command):
    path = tmp_path / "disk.img"
    path.write_bytes(b"not a repository")
    result = cli(capsys, command[0], path, *command[1:])
    _assert_one_line_error(result, 1, f"{path} is not a repo-engine repository: it is a file, "
                                      "not a directory; check the path")
    assert path.read_bytes() == b"not a repository"


def test_init_under_a_file_says_it_is_a_file(tmp_path, capsys):
    path = tmp_path / "disk.img"
    path.write_bytes(b"x")
    for extra in ([], ["--parents"]):
        result = cli(capsys, "init", path / "repo", *extra)
        _assert_one_line_error(result, 2, f"{path} is a file, not a directory")
    assert path.read_bytes() == b"x"


@pytest.mark.parametrize("args, fragments", [
    (["backup", "image", "{repo}", "--vm", "v" * 256, "--disk", "d={img}"],
     ["--vm", "is 256 characters long; the longest name is 255"]),
    (["backup", "image", "{repo}", "--vm", "v", "--disk", "k" * 100_000 + "={img}"],
     ["disk key", "(100000 characters)", "the longest name is 255"]),
    (["backup", "image", "{repo}", "--vm", "v", "--disk", "d={img}", "--tag", "t" * 300],
     ["--tag", "the longest name is 255"]),
])
def test_a_name_past_255_characters_is_refused(setup, capsys, args, fragments):
    assert len(_refused_as_usage(setup, capsys, args, fragments).err) < 1000


def _refused_as_usage(setup, capsys, args: list[str], fragments: list[str]):
    """ARGS ({repo}, {img} filled in) end in a one-line usage error holding FRAGMENTS, the
    repository untouched; the result."""
    repo, model = setup
    before = tree_digest(repo)
    result = cli(capsys, *(a.replace("{repo}", str(repo)).replace("{img}", str(model.path))
                           for a in args))
    _assert_one_line_error(result, 2, *fragments)
    assert tree_digest(repo) == before
    return result


def test_a_number_of_thousands_of_digits_in_an_input_file_is_one_line(setup, tmp_path, capsys,
                                                                      monkeypatch):
    repo, model = setup
    before = tree_digest(repo)
    changes = tmp_path / "changes.json"
    changes.write_text(f"[[0, {HUGE}]]")
    result = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                 "--changed", f"d={changes}")
    _assert_one_line_error(result, 2, f"extents file {changes} holds a number of thousands "
                                      "of digits")
    config = _vsphere_config(tmp_path, f"port = {HUGE}\n")
    result = cli(capsys, "backup", "vsphere", repo, "--config", config)
    _assert_one_line_error(result, 2, f"--config: {config} holds a number of thousands of digits")
    settings = tmp_path / "s3.toml"
    settings.write_text(f"[s3]\nmax_attempts = {HUGE}\n")
    monkeypatch.setenv("REPO_ENGINE_S3_CONFIG", str(settings))
    result = cli(capsys, "points", "s3://bucket/prefix")
    _assert_one_line_error(result, 2, f"the S3 settings file {settings} holds a number of "
                                      "thousands of digits")
    assert tree_digest(repo) == before


def test_a_point_takes_at_most_a_hundred_tags(setup, tmp_path, capsys):
    repo, model = setup
    before = tree_digest(repo)
    tags = [a for i in range(101) for a in ("--tag", f"t{i}")]
    result = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}", *tags)
    _assert_one_line_error(result, 2, "--tag", "101 tags given; a point takes at most 100")
    config = _vsphere_config(tmp_path, f"tags = {[f't{i}' for i in range(101)]}\n")
    result = cli(capsys, "backup", "vsphere", repo, "--config", config)
    _assert_one_line_error(result, 2, "--config: tags in", "101 tags given")
    assert tree_digest(repo) == before
    result = cli(capsys, "backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}",
                 *tags[:200])
    assert result.code == 0, result.err


@pytest.mark.parametrize("command", [
    ["vsphere", "vms", "--server", "vc", "--user", "u"],
    ["backup", "vddk", "{repo}", "--vm", "v", "--disk", "1=[ds] v.vmdk", "--server", "vc",
     "--user", "u", "--vmx-spec", "moref=vm-1", "--vddk-libdir", "{repo}"],
])
@pytest.mark.parametrize("name", ["", "A=B"])
def test_a_password_variable_name_that_names_none_is_refused(setup, capsys, command, name):
    repo, _ = setup
    result = cli(capsys, *(a.replace("{repo}", str(repo)) for a in command),
                 "--password-env", name)
    _assert_one_line_error(result, 2, f"--password-env {name!r} is not the name of an "
                                      "environment variable")


@pytest.mark.parametrize("args", [
    ["backup", "vsphere", "{repo}", "--vm-uuid", ""],
    ["restore", "vsphere", "{repo}", "v@latest", "--in-place", "--vm", ""],
    ["restore", "vsphere", "{repo}", "v@latest", "--as-new", ""],
])
def test_an_empty_vsphere_name_is_refused_before_connecting(setup, capsys, args):
    repo, _ = setup
    result = cli(capsys, *(a.replace("{repo}", str(repo)) for a in args), "--server", "vc",
                 "--user", "u", "--password-env", "NO_SUCH_VARIABLE", "--vddk-libdir", repo)
    _assert_one_line_error(result, 2, "empty name is refused")


def test_a_settings_file_nested_too_deeply_is_named(setup, tmp_path, capsys):
    repo, _ = setup
    config = _vsphere_config(tmp_path, "tags = " + "[" * 100_000 + "]" * 100_000 + "\n")
    result = cli(capsys, "backup", "vsphere", repo, "--config", config)
    _assert_one_line_error(result, 2, f"--config: {config} is nested too deeply")


def test_a_cache_inside_the_repository_is_refused(tmp_path, capsys):
    """A shared repository's cache inside it would be every host's: one index for all."""
    repo = tmp_path / "repo"
    result = cli(capsys, "init", repo, "--shared", "--cache-dir", repo / "cache")
    _assert_one_line_error(result, 2, "--cache-dir", "never inside the repository")
    assert not repo.exists()
    assert cli(capsys, "init", repo, "--shared", "--cache-dir", tmp_path / "cache").code == 0
    before = tree_digest(repo)
    result = cli(capsys, "points", repo, "--cache-dir", repo)
    _assert_one_line_error(result, 2, "--cache-dir", "never inside the repository")
    assert tree_digest(repo) == before
