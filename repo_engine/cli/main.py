"""Entry point: the command group, lazy command loading and the exit-code contract.

Exit codes: 0 success, 1 error, 2 usage error (bad arguments or input files), 3 damage found.
"""

from __future__ import annotations

import importlib
import sys

import click

COMMANDS = {
    "init": "repo_engine.cli.init_cmd:init",
    "backup": "repo_engine.cli.backup_cmd:backup",
    "restore": "repo_engine.cli.restore_cmd:restore",
    "points": "repo_engine.cli.inspect_cmd:points",
    "show": "repo_engine.cli.inspect_cmd:show",
    "diff": "repo_engine.cli.inspect_cmd:diff",
    "stats": "repo_engine.cli.inspect_cmd:stats",
    "vsphere": "repo_engine.cli.vsphere_cmd:vsphere",
    "forget": "repo_engine.cli.maintenance_cmd:forget",
    "protect": "repo_engine.cli.maintenance_cmd:protect",
    "unprotect": "repo_engine.cli.maintenance_cmd:unprotect",
    "gc": "repo_engine.cli.maintenance_cmd:gc",
    "verify": "repo_engine.cli.maintenance_cmd:verify",
    "scrub": "repo_engine.cli.maintenance_cmd:scrub",
    "rebuild-index": "repo_engine.cli.maintenance_cmd:rebuild_index",
    "unlock": "repo_engine.cli.maintenance_cmd:unlock",
}

EPILOG = "Exit codes: 0 ok, 1 error, 2 usage error, 3 damage found."


class LazyGroup(click.Group):
    """Imports a command's module only when that command runs or its help is shown."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="repo-engine")
def cli() -> None:
    """repo-engine: deduplicating backup repository for virtual-machine disks."""


def run(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (errors are printed as one line on stderr)."""
    from ..errors import RepoError

    try:
        cli.main(args=argv, prog_name="repo-engine", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("repo-engine: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except RepoError as exc:
        click.echo(f"repo-engine: error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("repo-engine: interrupted", err=True)
        return 130
    return 0


def main() -> None:
    sys.exit(run())
