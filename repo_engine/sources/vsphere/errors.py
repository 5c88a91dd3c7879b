"""Errors of the vSphere source (each a RepoError, so the CLI prints one line and exits 1)."""

from __future__ import annotations

import http.client
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ...errors import RepoError, SourceError


class VSphereError(SourceError):
    """vCenter/ESXi refused or failed a step; the message says which and what to do."""


class ConnectionLost(VSphereError):
    """The session with vCenter/ESXi broke: nothing more can be asked of it (cleanup included)."""


def fault_text(exc: BaseException) -> str:
    """A vim/vmodl fault's message, or its type name when it has none."""
    msg = getattr(exc, "msg", None) or getattr(exc, "localizedMessage", None) or ""
    name = type(exc).__name__.rsplit(".", 1)[-1]
    if msg.startswith("*types."):   # govmomi's simulator puts the Go type there
        msg = ""
    return f"{name}: {msg}" if msg else name


def connection_broke(exc: BaseException) -> bool:
    """A pyvmomi call failed because the connection did (reset, closed, timed out, TLS), not
    because vSphere answered with a fault. VDDK's errors (OSErrors too) are not counted: its
    connections are its own."""
    vddk = sys.modules.get("vddk_ext")
    if vddk is not None and isinstance(exc, vddk.VixError):
        return False
    return isinstance(exc, (ConnectionLost, OSError, http.client.HTTPException))


def extended(exc: BaseException, what: str) -> VSphereError:
    """The error `exc` followed by `what` (what a failure left behind), keeping its exit code
    (3 for damage found)."""
    if not isinstance(exc, Exception):
        cause = "interrupted"
    elif isinstance(exc, RepoError):
        cause = str(exc)
    else:
        cause = fault_text(exc) if hasattr(exc, "msg") else f"{type(exc).__name__}: {exc}"
    error = VSphereError(f"{cause}; {what}")
    error.exit_code = getattr(exc, "exit_code", VSphereError.exit_code)
    return error


@contextmanager
def asking(server: str, what: str) -> Iterator[None]:
    """Around pyvmomi calls (never VDDK ones, whose errors are OSErrors too): a vim fault
    becomes a VSphereError naming `what`; a broken connection a ConnectionLost."""
    from pyVmomi import vmodl

    try:
        yield
    except VSphereError:
        raise
    except vmodl.MethodFault as exc:
        raise VSphereError(f"{what} failed: {fault_text(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - only connection failures are turned, see below
        if not connection_broke(exc):
            raise
        detail = str(exc) or type(exc).__name__
        raise ConnectionLost(f"the connection to {server} was lost while {what} "
                             f"({detail})") from None
