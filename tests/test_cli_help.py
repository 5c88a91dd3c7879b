"""Every command's --help: each option explains itself and shows its default the same way."""

from __future__ import annotations

import re

import click
import pytest

from helpers import cli
from repo_engine.cli.main import cli as root


def _commands(group: click.Group, ctx: click.Context, path: tuple[str, ...] = ()):
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        sub = click.Context(command, info_name=name, parent=ctx)
        if isinstance(command, click.Group):
            yield from _commands(command, sub, path + (name,))
        else:
            yield path + (name,), command, sub


COMMANDS = list(_commands(root, click.Context(root, info_name="repo-engine")))


def test_every_command_is_walked():
    names = {" ".join(path) for path, _, _ in COMMANDS}
    assert {"init", "backup image", "backup vsphere", "restore image", "forget", "scrub",
            "vsphere vms"} <= names


@pytest.mark.parametrize("path, command, ctx", COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_every_option_has_help_and_a_shown_default(path, command, ctx, capsys):
    assert command.help, f"{' '.join(path)} has no help text"
    result = cli(capsys, *path, "--help")
    assert result.code == 0, result.err
    for param in command.params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        record = param.get_help_record(ctx)
        assert param.help and record, f"{' '.join(path)} {param.opts[0]}: no help text"
        text = record[1]
        # a default is shown by click as "[default: ...]", never spelled out in the prose
        assert not re.search(r"\(default|\bDefault:", text), (path, param.opts[0], text)
        default = param.get_default(ctx, call=False)
        unset = default is None or default is getattr(click.core, "UNSET", None)
        empty = default is False or (isinstance(default, (tuple, list)) and not default)
        has_default = not unset and not empty or bool(param.show_default)
        if has_default and not param.is_flag:
            assert "[default: " in text, f"{' '.join(path)} {param.opts[0]}: default not shown"
        assert record[0] in result.out.replace("\n", " ") or param.opts[0] in result.out


def test_restore_help_shows_how_to_restore_an_image(capsys):
    for args in (("restore", "--help"), ("restore", "image", "--help")):
        out = cli(capsys, *args).out
        assert "repo-engine restore /backup/repo web1@latest --disk sda --to " in out, args


def test_config_help_names_the_real_keys(capsys):
    from repo_engine.sources.vsphere.settings import KEYS

    out = " ".join(cli(capsys, "backup", "vsphere", "--help").out.split())
    for key in KEYS:
        assert re.search(rf"\b{key}\b", out), key


def test_rebuild_index_help_says_what_it_does_for_a_shared_repository(capsys):
    out = " ".join(cli(capsys, "rebuild-index", "--help").out.split())
    assert "A local repository's index is rebuilt from its packs and manifests alone" in out
    for fragment in ("For a shared repository", "only this host's cache",
                     "newest checkpoint and the journal entries after it", "reads no pack"):
        assert fragment in out, out
