"""Entry point: the command group, lazy command loading and the exit-code contract.

Exit codes: 0 success, 1 error, 2 usage error (bad arguments or input files), 3 damage found.

Every command ends in `run`, the one place that turns an exception into the one-line
`repo-engine: error: ...` message and its exit code; `--debug` (or `REPO_ENGINE_DEBUG=1`) adds the
traceback.
"""

from __future__ import annotations

import errno
import gc
import importlib
import io
import os
import re
import sys
from dataclasses import dataclass

import click

# numpy's OpenBLAS starts a thread per core when it is loaded, and those threads spin for a while
# after any call; nothing here multiplies matrices (numpy only sorts, compares and copies)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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
    "key": "repo_engine.cli.key_cmd:key",
}

EPILOG = "Exit codes: 0 ok, 1 error, 2 usage error, 3 damage found."
DEBUG_ENV = "REPO_ENGINE_DEBUG"
_DEBUG_OFF = ("", "0", "false", "no", "off")

# errno -> (what happened, what to do); the OS's own wording is kept next to it
_ERRNO_TEXT = {
    errno.ENOSPC: ("filesystem full", "free some space and run the command again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space and run the command again"),
    errno.EACCES: ("permission denied", "check the owner and permissions of that path"),
    errno.EPERM: ("operation not permitted", "check the owner and permissions of that path"),
    errno.EROFS: ("read-only filesystem", "use a writable location or remount it read-write"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENOTDIR: ("not a directory", "check the path"),
    errno.EISDIR: ("is a directory", "name a file, not a directory"),
    errno.EIO: ("input/output error", "the device reported a failure; check its health"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (ulimit -n)"),
}


@dataclass
class RunState:
    """What `run` needs to know about the invocation once a command has failed."""

    debug: bool = False


class Interrupted(Exception):
    """Ctrl-C during a command, carried past click's own handler (which prints an empty line
    before its Abort: two lines on a log) to `run`."""


class LazyGroup(click.Group):
    """A group whose `lazy` commands ({name: "module:attribute"}) are imported only when that
    command runs or its help is shown; commands added the usual way are kept too."""

    def __init__(self, *args: object, lazy: dict[str, str] | None = None,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted from None


@click.group(cls=LazyGroup, lazy=COMMANDS, epilog=EPILOG,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="repo-engine")
# the environment variable is read by `run` alone: a value click cannot read as a boolean
# would otherwise fail every command
@click.option("--debug", is_flag=True,
              help=f"Print the Python traceback of an error (also: {DEBUG_ENV}=1).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """repo-engine: deduplicating backup repository for virtual-machine disks."""
    if isinstance(ctx.obj, RunState):
        ctx.obj.debug = ctx.obj.debug or debug
        _report_faults(ctx.obj.debug)


# exit 3: the fault that reaches this in practice is a damaged page of the memory-mapped index
_FAULT_HEAD = "repo-engine: error: stopped by "
_FAULT_TAIL = (" in a library, most likely on a damaged page of the local index; run "
               "'repo-engine rebuild-index' on the repository, then the command again (if it "
               "happens again, run it with --debug and report it)\n")


def _report_faults(debug: bool) -> None:
    """A fault in C code (SIGBUS, SIGSEGV, abort) ends as one line and exit 3, not a core dump.
    With --debug, or where faulthandler is on already (PYTHONFAULTHANDLER, a test runner), the
    Python stacks of every thread are printed instead: what a bug report needs."""
    import faulthandler

    if faulthandler.is_enabled():
        return
    if not debug:
        from vddk_ext import on_fatal_signal

        on_fatal_signal(_FAULT_HEAD, _FAULT_TAIL, 3)
    elif sys.__stderr__ is not None:  # (sys.stderr may be a capture with no file behind it)
        faulthandler.enable(sys.__stderr__, all_threads=True)


def os_error_text(exc: OSError) -> str:
    """`filesystem full: /repo/index/data.mdb; free some space ...`: the errno's meaning, the
    paths, what the message adds to the OS wording, and what to do."""
    label, hint = _ERRNO_TEXT.get(exc.errno or 0, (None, None))
    detail = exc.strerror or str(exc) or type(exc).__name__
    where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    if label is None:
        return f"{detail}: {where}" if where else detail
    # the OS wording is the label's: keep only what the message adds ("writing disk x")
    detail = detail.removesuffix(os.strerror(exc.errno or 0)).removesuffix(": ")
    text = ": ".join(part for part in (label, where, detail) if part)
    return f"{text}; {hint}"


def _vsphere_fault_text(exc: BaseException) -> str | None:
    """A pyVmomi fault's own message, or None when `exc` is not one (pyVmomi is never imported
    here: a fault can only exist if it already is)."""
    vmodl = getattr(sys.modules.get("pyVmomi"), "vmodl", None)
    if vmodl is None or not isinstance(exc, vmodl.MethodFault):
        return None
    messages = [getattr(m, "message", None) for m in getattr(exc, "faultMessage", None) or []]
    msg = getattr(exc, "msg", None) or "; ".join(m for m in messages if m)
    msg = msg or getattr(exc, "reason", None) or ""
    name = type(exc).__name__.rsplit(".", 1)[-1]
    return f"vSphere fault {name}: {msg}" if msg else f"vSphere fault {name}"


def _index_error(exc: BaseException) -> tuple[str, int] | None:
    """An LMDB (repository index) error's message and exit code, with the errno wording where
    LMDB has one; a corrupt page is damage (exit 3). None when `exc` is not one (lmdb is never
    imported here)."""
    from ..errors import DamageError

    lmdb = sys.modules.get("lmdb")
    if lmdb is None or not isinstance(exc, lmdb.Error):
        return None
    code = {lmdb.DiskError: errno.ENOSPC, lmdb.ReadonlyError: errno.EACCES}.get(type(exc))
    if code is not None:
        return os_error_text(OSError(code, f"repository index: {exc}")), 1
    if isinstance(exc, (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError,
                        lmdb.VersionMismatchError)):
        return (f"the repository index is damaged ({exc}); run 'repo-engine rebuild-index'",
                DamageError.exit_code)
    return f"repository index: {exc}", 1


def error_line(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for any exception a command can end with."""
    from ..errors import RepoError

    if isinstance(exc, RepoError):
        return str(exc), exc.exit_code
    vddk = sys.modules.get("vddk_ext")
    if vddk is not None and isinstance(exc, vddk.VixError):  # names the disk and the VDDK call
        return exc.strerror or str(exc), 1
    if isinstance(exc, OSError):
        return os_error_text(exc), 1
    text = _vsphere_fault_text(exc)
    if text is not None:
        return text, 1
    index_error = _index_error(exc)
    if index_error is not None:
        return index_error
    if isinstance(exc, RecursionError):
        return "input nested too deeply to process (Python's recursion limit was reached)", 1
    if isinstance(exc, MemoryError):
        return "out of memory; close other programs or use a machine with more memory", 1
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return f"internal error: {text} (run with --debug for the traceback)", 1


# click 8.2 shows a group named alone (`repo-engine backup`) its help, as a usage error: kept whole
_HELP_AS_ERROR = getattr(click.exceptions, "NoArgsIsHelpError", ())


def click_error_line(exc: click.ClickException) -> str:
    """click's own error (an unknown option, a missing argument, a bad value) as one line, its
    usage and help hint, two lines more in click, folded into where to look: `no such option
    '--foo' (see 'repo-engine backup image --help')`. click quotes some of the words it names
    (repr) but not all (extra arguments): their control characters are escaped, not sent to
    the terminal."""
    text = one_line(exc.format_message()).removesuffix(".")
    if re.match(r"[A-Z][a-z]*\b", text):  # click's sentence case, not a name (VM, S3)
        text = text[0].lower() + text[1:]
    ctx = getattr(exc, "ctx", None)
    return f"{text} (see '{ctx.command_path} --help')" if ctx is not None else text


def run(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (errors are printed as one line on stderr)."""
    state = RunState(debug=os.environ.get(DEBUG_ENV, "").strip().lower() not in _DEBUG_OFF)
    try:
        cli.main(args=argv, prog_name="repo-engine", standalone_mode=False, obj=state)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except _HELP_AS_ERROR as exc:
        exc.show()
        return exc.exit_code
    except click.ClickException as exc:
        click.echo(f"repo-engine: error: {click_error_line(exc)}", err=True)
        return exc.exit_code
    except (Interrupted, click.exceptions.Abort, KeyboardInterrupt) as exc:
        # a terminal's line may hold the echoed ^C or a progress bar (click ends a prompt's)
        if isinstance(exc, Interrupted) and sys.stderr.isatty():
            click.echo(err=True)
        click.echo("repo-engine: interrupted", err=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place every error becomes one line
        return _report(exc, state.debug)
    return 0


def _report(exc: BaseException, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    text, code = error_line(exc)
    click.echo(f"repo-engine: error: {one_line(text)}", err=True)
    return code


def one_line(text: str) -> str:
    """An error message as the one line printed: its control characters escaped (it may name
    what the repository holds: a VM name an older version stored with an escape sequence must
    not drive the terminal) and each overlong word cut (it may quote a 1 MB argument)."""
    from ..units import SHOWN_MAX, cut, shown

    return " ".join(cut(shown(word), 2 * SHOWN_MAX) for word in text.split())


# A command builds large acyclic structures in few steps (a catalog of 10,000 records decoded, a
# listing of the store, decisions): collected every 700 new containers (the default), each young
# generation is walked and its survivors pile into full collections that walk every object again
# (0.3 s of a daily prune of 10,000 points). Cycles are still collected, less often.
YOUNG_GENERATION = 50_000


def main() -> None:
    # a path may hold bytes that are not UTF-8: print them as the OS gave them (as ls does),
    # not fail once the work is done, whatever the locale makes of stdout
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")
    gc.set_threshold(YOUNG_GENERATION, *gc.get_threshold()[1:])
    code = run()
    # the interpreter's exit runs garbage collections over every object of every module loaded
    # (numpy, click, ...), for nothing since the process ends: 20-40 ms of a small backup's CPU
    # time. Frozen objects are left out of every collection.
    gc.freeze()
    sys.exit(code)
