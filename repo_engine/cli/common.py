"""What every command shares: the repository argument, JSON output, progress bars."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .passphrase import FILE_ENV, KEY_FILE_ENV, VALUE_ENV, KeyFileSource, PassphraseSource

if TYPE_CHECKING:  # imported lazily at run time: `--help` must not load the engine
    from ..repository.repo import Repository

CACHE_DIR_KEY = "repo_engine.cache_dir"
ENDPOINT_KEY = "repo_engine.endpoint"
PASSPHRASE_FILE_KEY = "repo_engine.passphrase_file"
KEY_FILE_KEY = "repo_engine.key_file"
_EAGER_KEYS = {"cache_dir": CACHE_DIR_KEY, "endpoint": ENDPOINT_KEY,
               "passphrase_file": PASSPHRASE_FILE_KEY, "key_file": KEY_FILE_KEY}


@dataclass(frozen=True)
class RepoAddress:
    """The REPO argument: a local directory or `s3://BUCKET/PREFIX`, with the command's
    `--endpoint`, `--cache-dir`, `--passphrase-file` and `--key-file`."""

    location: str
    endpoint: str | None = None
    cache_dir: Path | None = None
    passphrase_file: Path | None = None
    key_file: Path | None = None
    _passphrase: list[PassphraseSource] = field(default_factory=list, compare=False, repr=False)

    def __str__(self) -> str:
        return self.location

    def settings(self) -> object:
        """The S3 settings of an `s3://` location (`--endpoint` over the environment and the
        settings file); None for a local one."""
        from ..repository.opening import is_remote

        if not is_remote(self.location):
            return None
        from ..repository.store.s3_settings import load_s3_settings

        return load_s3_settings({"endpoint": self.endpoint})

    def passphrase(self) -> PassphraseSource:
        """The passphrase of an encrypted repository, read only when it is asked for (and only
        once: the same source every time)."""
        if not self._passphrase:
            self._passphrase.append(PassphraseSource(self.location, self.passphrase_file))
        return self._passphrase[0]

    def open(self, *, rebuilding: bool = False) -> Repository:
        from ..repository.location import open_repository

        key_file = KeyFileSource(self.key_file)
        return open_repository(self.location, settings=self.settings(), cache_dir=self.cache_dir,
                               rebuilding=rebuilding, passphrase=self.passphrase(),
                               key_file=key_file if key_file.given() else None)


def check_output_file(path: Path, option: str, repo: RepoAddress) -> None:
    """Refuse, before anything is read or asked, a file to write (`option`'s) in a directory
    that does not exist, or inside the local repository REPO: a restored image or a recovery
    key there would be stored beside the data it restores or opens (and a gc or scrub would
    meet a file it does not know)."""
    from ..errors import UsageError
    from ..units import cut

    shown_path = cut(str(path))
    if not path.parent.is_dir():
        raise UsageError(f"{option} {shown_path}: {cut(str(path.parent))} is not a directory; "
                         "name a file in an existing directory")
    if _inside(path.parent, repo.location):
        raise UsageError(f"{option} {shown_path} is inside the repository {cut(repo.location)}; "
                         "name a file outside it")


def _inside(path: Path, location: str) -> bool:
    """Whether `path` is the local repository at `location` or below it."""
    from ..repository.opening import is_remote

    if is_remote(location):
        return False
    root, where = Path(location).resolve(), path.resolve()
    return where == root or root in where.parents


def _remember(ctx: click.Context, param: click.Parameter, value: object) -> None:
    """Keep an eager option's value for the REPO argument, which is processed after it."""
    assert param.name is not None
    ctx.meta[_EAGER_KEYS[param.name]] = value


def _address(ctx: click.Context, _param: click.Parameter, value: str) -> RepoAddress:
    from ..repository.opening import is_remote, prepare
    from ..repository.store import check_location

    if not value:  # the OS reads "" as no path; Path("") is the working directory
        raise click.BadParameter("an empty location is refused; name a directory or "
                                 "s3://BUCKET/PREFIX", param_hint="REPO")
    check_location(value)
    endpoint = ctx.meta.get(ENDPOINT_KEY)
    if endpoint and not is_remote(value):
        raise click.BadParameter("--endpoint applies to s3:// locations only",
                                 param_hint="--endpoint")
    cache_dir = ctx.meta.get(CACHE_DIR_KEY)
    if cache_dir is not None and _inside(cache_dir, value):  # every host would share it
        raise click.BadParameter("this host's cache is never inside the repository; name a "
                                 "directory outside it", param_hint="--cache-dir")
    address = RepoAddress(value, endpoint, ctx.meta.get(CACHE_DIR_KEY),
                          ctx.meta.get(PASSPHRASE_FILE_KEY), ctx.meta.get(KEY_FILE_KEY))
    if not KeyFileSource(address.key_file).given():  # before the command loads the engine
        prepare(address.location, address.cache_dir, address.passphrase())
    return address


def repo_argument(command: Callable) -> Callable:
    """REPO (a directory or s3://BUCKET/PREFIX, kept a string: a Path would fold `s3://` into
    `s3:/`) with `--endpoint`, `--cache-dir`, `--passphrase-file` and `--key-file`, given to
    the command as a RepoAddress."""
    command = click.option(
        "--key-file", type=click.Path(path_type=Path, dir_okay=False), is_eager=True,
        expose_value=False, callback=_remember, metavar="FILE", show_default=f"${KEY_FILE_ENV}",
        help="Recovery private key ('key export-recovery') that opens an encrypted REPO instead "
             "of its passphrase, without the passphrase's key derivation: for unattended "
             "hosts; keep it as secret as the data.")(command)
    command = click.option(
        "--passphrase-file", type=click.Path(path_type=Path, dir_okay=False), is_eager=True,
        expose_value=False, callback=_remember, metavar="FILE",
        show_default=f"${FILE_ENV}, else ${VALUE_ENV}, else asked on the terminal",
        help="File holding the passphrase of an encrypted REPO (one trailing newline is "
             "dropped); asked for only when REPO is encrypted.")(command)
    command = click.option(
        "--cache-dir", type=click.Path(path_type=Path, file_okay=False), is_eager=True,
        expose_value=False, callback=_remember, metavar="BASE",
        show_default="$REPO_ENGINE_CACHE_DIR, else $XDG_CACHE_HOME/repo-engine",
        help="Where this host caches shared repositories (s3:// and init --shared): the index "
             "and locks of each in BASE/<repository id>.")(command)
    command = click.option(
        "--endpoint", metavar="URL", is_eager=True, expose_value=False, callback=_remember,
        show_default="AWS_ENDPOINT_URL, the S3 settings file, else AWS S3 itself",
        help="URL of the S3-compatible server of an s3:// REPO.")(command)
    return click.argument("repo", metavar="REPO", callback=_address)(command)


class NumberRange(click.FloatRange):
    """click's FloatRange without NaN, which passes its bounds (NaN compares false with both)."""

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


class CappedInt(click.ParamType):
    """A whole number from `low` to `high` (units.capped_int): every numeric option's type, so
    that no option takes a count of 5,000 digits (a ValueError in Python) or one past what the
    command can do."""

    name = "integer"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        from ..errors import UsageError
        from ..units import capped_int

        option = param.opts[0] if param is not None and param.opts else "value"
        try:
            return capped_int(value if isinstance(value, int) else str(value), option,
                              self.low, self.high)
        except UsageError as exc:
            self.fail(str(exc).removeprefix(f"{option}: "), param, ctx)


PORT = CappedInt(1, 65535)


# the longest name stored (vSphere's VM names stop at 80 characters): each is repeated in every
# line of a listing and in every record of the catalog that names it
MAX_NAME = 255


class StoredText(click.ParamType):
    """Text the repository stores (a VM name, a disk key, a tag, a slot label): an argument
    holding bytes that are not UTF-8 (Python carries them as surrogates) could not be written,
    nor read back by another JSON reader; one holding a control character (a line break, an
    escape) would break the text listings, one name a line, or drive the terminal. An empty
    name names nothing (`@latest` of no VM, a tag no listing shows); with `empty`, "" is taken
    (a label that is optional). With `lookup` the text is not stored, only looked up or handed
    on (forget --vm, a vCenter VM's name): any length and control characters are let through,
    for a name an older version stored with one or vCenter holds (shown escaped)."""

    name = "text"

    def __init__(self, empty: bool = False, lookup: bool = False) -> None:
        self.empty, self.lookup = empty, lookup

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        from ..units import control_character, cut, is_text

        text = str(value)
        if not text and not self.empty:
            self.fail("'' is empty: an empty name is refused", param, ctx)
        if len(text) > MAX_NAME and not self.lookup:
            self.fail(f"{cut(text)!r} is {len(text)} characters long; the longest name is "
                      f"{MAX_NAME}", param, ctx)
        if not is_text(text):
            self.fail(f"{cut(text)!r} is not UTF-8 text", param, ctx)
        control = None if self.lookup else control_character(text)
        if control is not None:
            self.fail(f"{cut(text)!r} holds a control character (U+{ord(control):04X}), which "
                      "would break the lines of a listing", param, ctx)
        return text


STORED_TEXT = StoredText()
OPTIONAL_TEXT = StoredText(empty=True)
LOOKUP_TEXT = StoredText(lookup=True)
# a point's tags are listed on its one line of `points`: a hundred is more than any policy needs
MAX_TAGS = 100


def few_tags(_ctx: click.Context | None, param: click.Parameter | None,
             tags: tuple[str, ...]) -> tuple[str, ...]:
    if len(tags) > MAX_TAGS:
        raise click.BadParameter(f"{len(tags)} tags given; a point takes at most {MAX_TAGS}",
                                 param=param)
    return tags


tag_option = click.option("--tag", "tags", multiple=True, type=STORED_TEXT, callback=few_tags,
                          help=f"Tag the point. Repeatable, up to {MAX_TAGS} times.")


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print a versioned JSON document instead of text (docs/JSON.md).")


def emit_json(doc: object = None, **fields: object) -> None:
    """Print a versioned document (see schema.py): a report dataclass or dict, plus `fields`, on
    one line (an indented document would be encoded by the json module's Python code instead of
    its C encoder: seconds for a listing of 10,000 points)."""
    from .schema import document

    click.echo(json.dumps(document(doc, **fields), sort_keys=True, separators=(",", ":")))


@contextmanager
def open_repo(address: RepoAddress, shared: str | None = None) -> Iterator[Repository]:
    """The repository at `address`; with `shared` (the command's name), under a shared lock
    taken before anything is read, so that gc waits for the command and rebuild-index excludes
    it. Without, the command takes its own locks later: a shared repository's cache is brought
    up to date first, for what the command reads before (the points a forget names)."""
    from ..repository.locks import SHARED

    repo = address.open()
    try:
        if shared is None:
            repo.refresh()
            yield repo
        else:
            with repo.lock(SHARED, shared):
                yield repo
    finally:
        repo.close()


def spinner(progress: "Progress", label: str) -> Callable[[str], None] | None:
    """A status line on a terminal for phases without a known total."""
    if not progress.enabled:
        return None
    return lambda text: click.echo(f"\r{label}: {text}".ljust(70), nl=False, err=True)


class Progress:
    """Progress bars on stderr when it is a terminal; silent otherwise."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self.enabled = sys.stderr.isatty()

    def bar(self, label: str, total: int) -> Callable[[int], None]:
        """A bar labelled `label` (shown escaped: it may name a disk)."""
        from ..units import shown

        if not self.enabled or total <= 0:
            return lambda _n: None
        bar = self._stack.enter_context(click.progressbar(
            length=total, label=shown(label), file=sys.stderr, show_eta=True,
            show_percent=True))
        return bar.update

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def human_bytes(n: float) -> str:
    from ..units import format_size

    return format_size(n)


# how a backup read a disk (DiskRecord.read_mode), in words
READ_MODES = {"allocated": "read its allocated extents", "changed": "read the changed extents",
              "full": "read whole"}


def disk_line(d: object) -> str:
    """`read the changed extents, delta on 3f2a9c1d (2 links)`, and the disk's note."""
    from ..repository.points import DiskRecord

    assert isinstance(d, DiskRecord)
    stored = f"delta on {d.parent[:8]}" if d.kind == "delta" and d.parent else "full map"
    links = f" (a chain of {d.links} maps)" if d.links > 1 else ""
    note = f"  ({d.note})" if d.note else ""
    return f"{READ_MODES.get(d.read_mode, d.read_mode + ' read')}, {stored}{links}{note}"
