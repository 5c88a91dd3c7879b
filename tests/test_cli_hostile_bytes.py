"""Command-line arguments and environment values holding bytes that are not UTF-8 (Python
carries them as surrogates, os.fsdecode): a path may hold them and works; a name the
repository stores (VM, disk key, tag, slot label) is refused as a usage error; never an
internal error. So is such a name holding a control character, which would break the text
listings' lines; one an older version stored is shown escaped there."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import MIB, DiskModel, cli, tree_digest

NOT_UTF8 = os.fsdecode(b"\xff")


@pytest.fixture
def model(tmp_path) -> DiskModel:
    disk = DiskModel(tmp_path / "d.img", 2 * MIB, np.random.default_rng(5))
    disk.random_changes(5)
    return disk


def _program(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    """repo-engine as a process whose stdout is strict UTF-8 (as under en_US.UTF-8)."""
    return subprocess.run([sys.executable, "-m", "repo_engine", *map(str, args)],
                          capture_output=True, env=env)


@pytest.mark.parametrize("init_args", [[], ["--shared"], ["--encryption"]])
def test_a_repository_at_a_path_that_is_not_utf8(tmp_path, model, init_args):
    env = dict(os.environ, REPO_ENGINE_PASSWORD="correct horse",
               PYTHONIOENCODING="utf-8:strict")
    repo, target = tmp_path / f"repo-{NOT_UTF8}", tmp_path / f"out-{NOT_UTF8}.img"
    created = _program("init", repo, *init_args, env=env)
    assert (created.returncode, created.stderr) == (0, b""), created.stderr
    assert b" at " + os.fsencode(repo) + b" (" in created.stdout  # the path's own bytes
    for args in (["backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}"],
                 ["backup", "image", repo, "--vm", "v", "--disk", f"d={model.path}"],
                 ["verify", repo], ["restore", repo, "v@latest", "--disk", "d", "--to", target]):
        done = _program(*args, env=env)
        assert (done.returncode, done.stderr) == (0, b""), (args, done.stderr)
    assert target.read_bytes() == model.copy_of_content()


@pytest.mark.parametrize("args, option", [
    (["--vm", NOT_UTF8, "--disk", "d={img}"], "--vm"),
    (["--vm", "v", "--disk", f"{NOT_UTF8}={{img}}"], "--disk"),
    (["--vm", "v", "--disk", "d={img}", "--tag", NOT_UTF8], "--tag"),
])
def test_a_stored_name_that_is_not_utf8_is_a_usage_error(tmp_path, capsys, model, args, option):
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo).code == 0
    before = tree_digest(repo)
    result = cli(capsys, "backup", "image", repo, *[a.format(img=model.path) for a in args])
    assert result.code == 2, result.err
    assert option in result.err and "is not UTF-8 text" in result.err.splitlines()[-1]
    assert tree_digest(repo) == before


def test_key_labels_that_cannot_be_stored(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REPO_ENGINE_PASSWORD", "correct horse")
    repo, new = tmp_path / "repo", tmp_path / "new.pass"
    new.write_text("battery staple")
    assert cli(capsys, "init", repo, "--encryption").code == 0
    for label, message in ((NOT_UTF8, "is not UTF-8 text"),
                           ("x" * 201, "a key slot label has at most 200 characters")):
        result = cli(capsys, "key", "add", repo, "--label", label, "--new-passphrase-file", new)
        assert result.code == 2 and message in result.err, result.err
        assert "internal error" not in result.err
    assert len(cli(capsys, "key", "list", repo, "--json").json()["slots"]) == 1


@pytest.mark.parametrize("char", ["\n", "\r", "\x1b", "\x00", "\x7f", "\x85", "\u2028", "\u2029"])
@pytest.mark.parametrize("args, option", [
    (["backup", "image", "{repo}", "--vm", "web{c}1", "--disk", "d={img}"], "'--vm'"),
    (["backup", "image", "{repo}", "--vm", "v", "--disk", "sd{c}a={img}"], "--disk"),
    (["backup", "image", "{repo}", "--vm", "v", "--disk", "d={img}", "--tag", "a{c}"], "'--tag'"),
    (["key", "add", "{repo}", "--label", "alice{c}"], "'--label'"),
])
def test_a_stored_name_with_a_control_character_is_a_usage_error(tmp_path, capsys, model, args,
                                                                 option, char):
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo).code == 0
    before = tree_digest(repo)
    result = cli(capsys, *[a.format(repo=repo, img=model.path, c=char) for a in args])
    assert result.code == 2, result.err
    assert result.err.count("\n") == 1 and result.err.startswith("repo-engine: error: ")
    assert option in result.err
    assert f"holds a control character (U+{ord(char):04X})" in result.err
    assert tree_digest(repo) == before


def _unchecked_names(monkeypatch) -> None:
    """Names taken as older versions took them: control characters and all."""
    from repo_engine import units

    monkeypatch.setattr(units, "control_character", lambda _text: None,
                        raising=False)  # (none before they were checked)


def test_names_an_older_version_stored_are_shown_escaped_in_text_listings(tmp_path, capsys,
                                                                         model, monkeypatch):
    repo = tmp_path / "repo"
    assert cli(capsys, "init", repo).code == 0
    with monkeypatch.context() as older:
        _unchecked_names(older)
        done = cli(capsys, "backup", "image", repo, "--vm", "web\n1", "--disk",
                   f"sd\x1ba={model.path}", "--tag", "night\x85ly", "--tag", "a\u2028b")
        assert done.code == 0, done.err
    listed = cli(capsys, "points", repo).out.splitlines()
    assert len(listed) == 3 and listed[2] == "1 point"  # the header, one point, the count
    assert "  web\\x0a1@" in listed[1] and listed[1].endswith("  a\\u2028b,night\\x85ly")
    shown = cli(capsys, "show", repo, "web\n1@latest").out
    assert "\n  vm: web\\x0a1\n" in shown and "\n  tags: a\\u2028b, night\\x85ly" in shown
    assert "\n  disk sd\\x1ba: " in shown and "\x1b" not in shown and "\x85" not in shown
    [point] = cli(capsys, "points", repo, "--json").json()["points"]
    assert (point["vm"], point["tags"]) == ("web\n1", ["a\u2028b", "night\x85ly"])


def test_restore_image_shows_the_disk_key_and_target_escaped(tmp_path, capsys, model,
                                                            monkeypatch):
    repo, target = tmp_path / "repo", tmp_path / "out\x1b[2J\u2028.img"
    assert cli(capsys, "init", repo).code == 0
    with monkeypatch.context() as older:
        _unchecked_names(older)
        assert cli(capsys, "backup", "image", repo, "--vm", "v", "--disk",
                   f"sd\x9ba={model.path}").code == 0
    with monkeypatch.context() as terminal:  # stderr a terminal: a progress bar names the disk
        terminal.setattr(sys.stderr, "isatty", lambda: True)
        result = cli(capsys, "restore", repo, "v@latest", "--disk", "sd\x9ba", "--to", target)
    assert result.code == 0, result.err
    assert "disk sd\\x9ba" in result.err and "\x9b" not in result.err
    assert result.out.startswith("restored disk sd\\x9ba of point ")
    assert "\\x1b[2J\\u2028.img: " in result.out and result.out.count("\n") == 1
    assert not {"\x1b", "\x9b", "\u2028"} & set(result.out)
    assert target.read_bytes() == model.copy_of_content()


def test_an_error_naming_a_name_an_older_version_stored_shows_it_escaped(tmp_path, capsys,
                                                                        model, monkeypatch):
    """An ambiguous point name lists the points it matches, with their VM names."""
    repo, vm = tmp_path / "repo", "web\x1b]0;title\x07"
    assert cli(capsys, "init", repo).code == 0
    with monkeypatch.context() as older:
        _unchecked_names(older)
        for _ in range(2):
            assert cli(capsys, "backup", "image", repo, "--vm", vm, "--disk",
                       f"sda={model.path}").code == 0
    result = cli(capsys, "show", repo, f"{vm}@2")
    assert result.code == 2 and "matches 2 points: " in result.err
    assert "(web\\x1b]0;title\\x07@" in result.err and "\x1b" not in result.err


def test_a_key_label_an_older_version_stored_is_shown_escaped(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REPO_ENGINE_PASSWORD", "correct horse")
    repo, new = tmp_path / "repo", tmp_path / "new.pass"
    new.write_text("battery staple")
    assert cli(capsys, "init", repo, "--encryption").code == 0
    with monkeypatch.context() as older:
        _unchecked_names(older)
        added = cli(capsys, "key", "add", repo, "--label", "alice\nbob", "--new-passphrase-file",
                    new)
        assert added.code == 0, added.err
    listed = cli(capsys, "key", "list", repo).out.splitlines()
    # Both slots may share a creation second, so which row comes first is not fixed.
    assert len(listed) == 3 and [row for row in listed[1:] if row.endswith("  alice\\x0abob")]
    assert "alice\nbob" in [s["label"] for s in cli(capsys, "key", "list", repo,
                                                      "--json").json()["slots"]]


def test_a_passphrase_in_the_environment_that_is_not_utf8(tmp_path, capsys, monkeypatch):
    """The variable's bytes are the passphrase, as a file's are."""
    passphrase = b"pass\xffphrase"
    repo, file = tmp_path / "repo", tmp_path / "pass"
    file.write_bytes(passphrase)
    assert cli(capsys, "init", repo, "--encryption", "--passphrase-file", file).code == 0
    monkeypatch.setenv("REPO_ENGINE_PASSWORD", os.fsdecode(passphrase))
    result = cli(capsys, "points", repo)
    assert (result.code, result.err) == (0, "")


def test_an_s3_prefix_that_is_not_utf8():
    done = _program("points", f"s3://bucket/{NOT_UTF8}", "--endpoint", "http://127.0.0.1:9",
                    env=dict(os.environ))
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr == (b"repo-engine: error: s3://bucket/\\udcff: the prefix '\\udcff' is "
                           b"not UTF-8 text\n")
