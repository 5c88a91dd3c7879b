"""Settings of an S3 store: endpoint, region, addressing, TLS, credentials, transfer and retries.

Sources, the first that sets a key wins:
1. explicit overrides from the caller (the CLI's `--endpoint`);
2. the environment, by the AWS conventions: `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`,
   `AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_CA_BUNDLE`, `AWS_ACCESS_KEY_ID` +
   `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`);
3. the `[s3]` table of a TOML file: the path in `REPO_ENGINE_S3_CONFIG`, else
   `$XDG_CONFIG_HOME/repo-engine/s3.toml` (`~/.config/...`) when it exists. A file holding a secret
   must not be readable by group or others;
4. the defaults below.

No secret is taken from the command line, and none appears in a repr or a message. Settings
that cannot be used are BadSettings, a usage error that names where each bad value was set.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ...errors import UsageError
from ...tomlfile import NotToml, read_toml
from ...units import cut, is_text
from . import StoreError

MIB = 1 << 20
MIN_PART_SIZE = 5 * MIB  # S3's smallest multipart part (all but the last)
MAX_PART_SIZE = 5 << 30  # S3's largest part, and its largest single PUT
MAX_PARTS = 10_000  # S3's largest part count
# the parts in flight are held in memory, each whole
MAX_PARTS_MEMORY = 4 << 30
# a request waits at most this long, and a retry no longer before it is made
MAX_WAIT = 3600.0
# past these a setting is a mistake: requests retried for days, a thread per part by the
# thousand, pages S3 never returns
_MOST = {"multipart_concurrency": 64, "max_attempts": 100, "list_page_size": 1000}
ADDRESSING_STYLES = ("path", "virtual")
CONFIG_ENV = "REPO_ENGINE_S3_CONFIG"

# environment variable -> settings key, the first set of each key's list wins
_ENVIRONMENT = {
    "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "ca_bundle": ("AWS_CA_BUNDLE",),
    "access_key_id": ("AWS_ACCESS_KEY_ID",),
    "secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "session_token": ("AWS_SESSION_TOKEN",),
}
_SECRETS = ("secret_access_key", "session_token")
_IN_HEADERS = ("endpoint", "access_key_id", "session_token")  # sent as they are: ASCII


Problem = tuple[tuple[str, ...], str]  # the keys a problem is about, and what is wrong


class BadSettings(StoreError, UsageError):
    """S3 settings that cannot be used: a settings file that cannot be read or parsed, an
    unknown key, a value of the wrong type or out of its bounds. What the user gave, so a
    usage error (exit code 2); `problems` are the values' own, when the values are at fault."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None = None  # None: AWS itself
    region: str = "us-east-1"
    addressing_style: str | None = None  # None: "path" with an endpoint, else "virtual"
    verify_tls: bool = True
    ca_bundle: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    multipart_threshold: int = 64 * MIB  # put_file of a bigger file goes in parts
    multipart_part_size: int = 16 * MIB
    multipart_concurrency: int = 4  # parts in flight: memory is this times the part size
    max_attempts: int = 6  # per request, the first included
    backoff_base: float = 0.2  # seconds; attempt n waits up to base * 2**n, full jitter
    backoff_cap: float = 10.0
    list_page_size: int = 1000  # keys per ListObjectsV2 page (S3's largest)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    spool_dir: str | None = None  # where packs are built before upload; None: the temp dir

    def __post_init__(self) -> None:
        check_settings(self)

    @property
    def style(self) -> str:
        if self.addressing_style is not None:
            return self.addressing_style
        return "path" if self.endpoint else "virtual"

    @property
    def endpoint_text(self) -> str:
        """The endpoint for messages."""
        return self.endpoint or f"AWS S3 ({self.region})"


# a settings field's annotation -> the values it takes, in words (a TOML integer is a float too)
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str,), "a string"), "bool": ((bool,), "true or false"),
    "int": ((int,), "an integer"), "float": ((int, float), "a number")}


def _type_problems(s: S3Settings) -> list[Problem]:
    """The settings of the wrong type (the file's `endpoint = 9000`, `verify_tls = "no"`), each
    named without its value (it may be a secret)."""
    problems = []
    for f in fields(s):
        value = getattr(s, f.name)
        base, _, optional = str(f.type).partition(" | ")
        kinds, words = _KINDS[base]
        if value is None and optional:
            continue
        # a bool is an int to Python, not to a settings file
        if not isinstance(value, kinds) or (isinstance(value, bool) and base != "bool"):
            problems.append(((f.name,), f"{f.name} must be {words}"))
        elif isinstance(value, str) and not is_text(value, ascii=f.name in _IN_HEADERS):
            problems.append(((f.name,), f"{f.name} must be "
                             f"{'ASCII' if f.name in _IN_HEADERS else 'UTF-8'} text"))
        elif isinstance(value, str) and "\x00" in value:  # TOML can spell one; no path holds it
            problems.append(((f.name,), f"{f.name} must not hold a NUL character"))
    return problems


def _endpoint_problem(endpoint: str) -> str | None:
    shown = repr(cut(endpoint))
    if not endpoint.startswith(("http://", "https://")):
        return f"endpoint {shown} must start with http:// or https://"
    try:
        parts = urllib.parse.urlsplit(endpoint)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        return f"endpoint {shown} is not a valid URL ({exc})"
    return None if parts.hostname else f"endpoint {shown} names no host"


_PARTS = ("multipart_part_size", "multipart_threshold", "multipart_concurrency")
_TIMES = ("backoff_base", "backoff_cap", "connect_timeout", "read_timeout")
_COUNTS = ("multipart_concurrency", "max_attempts", "list_page_size")
_CREDENTIALS = ("access_key_id", "secret_access_key")


def _size_problems(s: S3Settings) -> list[Problem]:
    problems: list[Problem] = []
    if not MIN_PART_SIZE <= s.multipart_part_size <= MAX_PART_SIZE:
        problems.append((_PARTS[:1], f"multipart_part_size must be from {MIN_PART_SIZE} (5 MiB) "
                                     f"to {MAX_PART_SIZE} (5 GiB)"))
    if not s.multipart_part_size <= s.multipart_threshold <= MAX_PART_SIZE:
        problems.append((_PARTS[:2], "multipart_threshold must be at least multipart_part_size, "
                                     f"at most {MAX_PART_SIZE} (5 GiB)"))
    elif s.multipart_concurrency * s.multipart_part_size > MAX_PARTS_MEMORY:
        problems.append((_PARTS, "multipart_concurrency parts of multipart_part_size are held in "
                                 f"memory at once: at most {MAX_PARTS_MEMORY} bytes (4 GiB) "
                                 "together"))
    return problems


def _value_problems(s: S3Settings) -> list[Problem]:
    """What is wrong with `s`, whose values are of the right types."""
    problems: list[Problem] = []
    if s.addressing_style not in (None, *ADDRESSING_STYLES):
        problems.append((("addressing_style",), "addressing_style must be one of "
                                                f"{', '.join(ADDRESSING_STYLES)}"))
    endpoint_problem = None if s.endpoint is None else _endpoint_problem(s.endpoint)
    if endpoint_problem is not None:
        problems.append((("endpoint",), endpoint_problem))
    problems += _size_problems(s)
    problems += [((name,), f"{name} must be at least 1") for name in _COUNTS
                 if getattr(s, name) < 1]
    problems += [((name,), f"{name} must be at most {most}") for name, most in _MOST.items()
                 if getattr(s, name) > most]
    problems += [((name,), f"{name} must be positive and finite, at most {MAX_WAIT:.0f} seconds")
                 for name in _TIMES if not 0 < getattr(s, name) <= MAX_WAIT]  # NaN, infinity too
    if (s.access_key_id is None) != (s.secret_access_key is None):
        problems.append((_CREDENTIALS, "access_key_id and secret_access_key must be given "
                                       "together"))
    return problems


def check_settings(s: S3Settings) -> None:
    problems = _type_problems(s) or _value_problems(s)  # a bound of a wrong type is no bound
    if problems:
        raise BadSettings(_message(problems), problems)


def _message(problems: list[Problem], sources: Mapping[str, str] | None = None) -> str:
    """One line: each problem, with where its keys were set when `sources` says (the settings
    file, an environment variable, the command line): that is where to correct it."""
    def where(keys: tuple[str, ...]) -> str:
        named = [f"{key} from {sources[key]}" for key in keys if sources and key in sources]
        return f" ({', '.join(named)})" if named else ""
    return "bad S3 settings: " + "; ".join(text + where(keys) for keys, text in problems)


def load_s3_settings(overrides: Mapping[str, Any] | None = None,
                     environ: Mapping[str, str] | None = None,
                     config_file: Path | None = None) -> S3Settings:
    """The settings from overrides, environment and config file (see the module docstring)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def take(found: Mapping[str, Any], source: Callable[[str], str]) -> None:
        values.update(found)
        sources.update({key: source(key) for key in found})
    path = config_file or _default_config_file(environ)
    if path is not None:
        take(_read_config_file(path), lambda _key: f"the S3 settings file {path}")
    take(_from_environment(environ), lambda key: "$" + _set_variable(key, environ))
    take({k: v for k, v in (overrides or {}).items() if v is not None},
         lambda _key: "the command line")
    _check_keys(values, "settings")
    try:
        return replace(S3Settings(), **values)
    except BadSettings as exc:
        raise BadSettings(_message(exc.problems, sources), exc.problems) from None


def _default_config_file(environ: Mapping[str, str]) -> Path | None:
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    home = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    path = Path(home) / "repo-engine" / "s3.toml"
    return path if path.exists() else None


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        doc, mode = read_toml(path)
    except OSError as exc:
        raise BadSettings(f"cannot read the S3 settings file {path}: {exc.strerror}; name a "
                          f"readable file in ${CONFIG_ENV}") from None
    except NotToml as exc:
        raise BadSettings(f"the S3 settings file {path} {exc}") from None
    table = doc.get("s3", {})
    if not isinstance(table, dict):
        raise BadSettings(f"the S3 settings file {path}: [s3] must be a table")
    _check_keys(table, f"the S3 settings file {path}")
    if any(key in table for key in _SECRETS) and mode & 0o077:
        raise BadSettings(f"the S3 settings file {path} holds a secret and is readable by "
                          f"others; run: chmod 600 {path}")
    return table


def _set_variable(key: str, environ: Mapping[str, str]) -> str | None:
    """The first environment variable of `key`'s that is set."""
    return next((name for name in _ENVIRONMENT[key] if environ.get(name)), None)


def _from_environment(environ: Mapping[str, str]) -> dict[str, str]:
    named = {key: _set_variable(key, environ) for key in _ENVIRONMENT}
    return {key: environ[name] for key, name in named.items() if name is not None}


def _check_keys(values: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in fields(S3Settings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BadSettings(f"{where}: unknown S3 setting {', '.join(unknown)} (known: "
                          f"{', '.join(sorted(known))})")
