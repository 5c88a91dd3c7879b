"""Connection and job settings: command-line options over a TOML config file.

A config file lets a nightly job keep every setting, and where the password is, off its command
line (keys as the long options, without the dashes):

    server = "vcenter.example.com"
    port = 443                                  # optional
    user = "backup@vsphere.local"
    password-file = "/etc/repo-engine/vcenter.pass"   # or password-env = "VC_PASSWORD"
    thumbprint = "AB:CD:..."                    # SHA-1 of the server's certificate; or insecure = true
    vm = "web1"                                 # or vm-uuid = "5003..."
    quiesce = true
    transports = "nbdssl:nbd"
    vddk-libdir = "/opt/vmware-vix-disklib-distrib"
    tags = ["nightly"]
    audit = 1.0
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import UsageError
from ...tomlfile import NotToml, read_toml

KEYS = {
    "server": str, "port": int, "user": str, "password-file": str, "password-env": str,
    "thumbprint": str, "insecure": bool, "vm": str, "vm-uuid": str, "quiesce": bool,
    "transports": str, "vddk-libdir": str, "tags": list, "audit": (int, float),
}
THUMBPRINT = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){19}$|^[0-9A-Fa-f]{40}$")


@dataclass
class VSphereSettings:
    """Everything a vSphere command needs except the password itself."""

    server: str
    user: str
    port: int = 443
    password_file: Path | None = None
    password_env: str | None = None
    thumbprint: str | None = None
    insecure: bool = False
    vm: str | None = None
    vm_uuid: str | None = None
    quiesce: bool = True
    transports: str | None = None
    vddk_libdir: str | None = None
    tags: list[str] = field(default_factory=list)
    audit: float = 0.0


# a key's value checked as the command's option of that name checks it (the caller's, which
# knows the options); returns the value to use, or raises UsageError
Check = Callable[[str, Any], Any]


def load_config(path: Path | None, check: Check | None = None) -> dict[str, Any]:
    """The config file's keys, checked against KEYS and by `check`; {} without a file."""
    if path is None:
        return {}
    try:
        doc, _mode = read_toml(path)
    except OSError as exc:
        raise UsageError(f"--config: cannot read {path}: {exc.strerror}") from None
    except NotToml as exc:
        raise UsageError(f"--config: {path} {exc}") from None
    doc = doc.get("vsphere", doc) if isinstance(doc.get("vsphere"), dict) else doc
    for key, value in doc.items():
        kind = KEYS.get(key)
        if kind is None:
            raise UsageError(f"--config: unknown key {key!r} in {path} "
                             f"(known: {', '.join(sorted(KEYS))})")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UsageError(f"--config: {key} in {path} has the wrong type ({value!r})")
        # TOML can spell a NUL, no path, variable or name can hold one (the command line cannot)
        if "\x00" in (value if isinstance(value, str) else ""):
            raise UsageError(f"--config: {key} in {path} holds a NUL character")
        if check is not None:
            doc[key] = _checked(check, key, value, path)
    if "password-file" in doc:   # relative to the config file
        doc["password-file"] = str((Path(path).parent / doc["password-file"]).resolve())
    return doc


def _checked(check: Check, key: str, value: Any, path: Path) -> Any:
    try:
        return check(key, value)
    except UsageError as exc:
        raise UsageError(f"--config: {key} in {path}: {exc}") from None


def normalise_thumbprint(value: str) -> str:
    """'ab:cd:...' or 'abcd...' -> 'AB:CD:...' (the form VDDK wants)."""
    value = value.strip()
    if not THUMBPRINT.match(value):
        raise UsageError(f"--thumbprint {value!r} is not a SHA-1 fingerprint "
                         "(20 hex pairs, like AB:CD:...:EF)")
    digits = value.replace(":", "").upper()
    return ":".join(digits[i:i + 2] for i in range(0, 40, 2))


def merge(cli: dict[str, Any], config_path: Path | None,
          check: Check | None = None) -> VSphereSettings:
    """Command-line values (None = not given) win over the config file's (checked by
    `check`, see load_config)."""
    doc = load_config(config_path, check)

    def pick(option: str, key: str, default: Any = None) -> Any:
        value = cli.get(option)
        if value is None or value == ():
            return doc.get(key, default)
        return value

    server, user = pick("server", "server"), pick("user", "user")
    if not server:
        raise UsageError("the vCenter/ESXi server is required (--server HOST or server= in --config)")
    if not user:
        raise UsageError("the user name is required (--user NAME or user= in --config)")
    password_file = pick("password_file", "password-file")
    password_env = pick("password_env", "password-env")
    if cli.get("password_file") is not None or cli.get("password_env") is not None:
        password_file, password_env = cli.get("password_file"), cli.get("password_env")
    if (password_file is None) == (password_env is None):
        raise UsageError("give exactly one of --password-file FILE or --password-env VAR "
                         "(or password-file= / password-env= in --config)")
    thumbprint = pick("thumbprint", "thumbprint")
    insecure = bool(cli.get("insecure")) or bool(doc.get("insecure", False))
    if thumbprint and insecure:
        raise UsageError("--thumbprint and --insecure exclude each other")
    quiesce = doc.get("quiesce", True) if cli.get("no_quiesce") is None else not cli["no_quiesce"]
    return VSphereSettings(
        server=server, user=user, port=int(pick("port", "port", 443)),
        password_file=Path(password_file) if password_file else None, password_env=password_env,
        thumbprint=normalise_thumbprint(thumbprint) if thumbprint else None, insecure=insecure,
        vm=pick("vm", "vm"), vm_uuid=pick("vm_uuid", "vm-uuid"), quiesce=bool(quiesce),
        transports=pick("transports", "transports"), vddk_libdir=pick("vddk_libdir", "vddk-libdir"),
        tags=list(pick("tags", "tags", [])), audit=float(pick("audit", "audit", 0.0)))
