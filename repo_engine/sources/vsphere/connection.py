"""Connecting to vCenter/ESXi with pyvmomi: certificate checks, the thumbprint VDDK needs, clear
errors for the usual mistakes."""

from __future__ import annotations

import hashlib
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from .errors import VSphereError, fault_text
from .settings import VSphereSettings, normalise_thumbprint


def _peer_certificate(host: str, port: int, timeout: float = 15.0) -> bytes:
    """The server's certificate (DER), fetched without verifying it (to pin or fingerprint it)."""
    context = ssl._create_unverified_context()  # noqa: S323 - checked by the caller
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                context.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError) as exc:
        raise VSphereError(f"cannot connect to {host}:{port}: {exc}") from None
    if not der:
        raise VSphereError(f"{host}:{port} presented no certificate")
    return der


def sha1_thumbprint(der: bytes) -> str:
    return normalise_thumbprint(hashlib.sha1(der).hexdigest())


def _ssl_context(settings: VSphereSettings) -> tuple[ssl.SSLContext, str]:
    """The context pyvmomi connects with, and the server's SHA-1 thumbprint for VDDK."""
    host, port = settings.server, settings.port
    if settings.thumbprint:
        actual = sha1_thumbprint(_peer_certificate(host, port))
        if actual != settings.thumbprint:
            raise VSphereError(
                f"the certificate of {host}:{port} does not match --thumbprint: expected "
                f"{settings.thumbprint}, the server presented {actual}. Check the server's "
                "fingerprint (vCenter: Administration > Certificates) before trusting it")
        return ssl._create_unverified_context(), actual   # pinned: checked just now
    if settings.insecure:
        return ssl._create_unverified_context(), sha1_thumbprint(_peer_certificate(host, port))
    context = ssl.create_default_context()
    try:
        with socket.create_connection((host, port), timeout=15.0) as sock, \
                context.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        raise VSphereError(
            f"the certificate of {host}:{port} is not trusted ({exc.verify_message}): install "
            "its CA, pin it with --thumbprint SHA1, or (tests only) pass --insecure") from None
    except (OSError, ssl.SSLError) as exc:
        raise VSphereError(f"cannot connect to {host}:{port}: {exc}") from None
    assert der is not None
    return context, sha1_thumbprint(der)


@dataclass
class Connection:
    """A logged-in pyvmomi session; close() logs out."""

    si: Any
    settings: VSphereSettings
    thumbprint: str
    password: str = field(repr=False)

    @property
    def content(self) -> Any:
        return self.si.content   # fetched once per session by pyvmomi

    @property
    def version(self) -> str:
        """The API version the session speaks (for serializing configs)."""
        return str(self.si._stub.version)

    @property
    def about(self) -> str:
        return str(self.content.about.fullName)

    def close(self) -> None:
        from pyVim.connect import Disconnect

        try:
            Disconnect(self.si)
        except Exception:  # noqa: BLE001 - logging out is best effort
            pass

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(settings: VSphereSettings, password: str) -> Connection:
    from pyVim.connect import SmartConnect
    from pyVmomi import vim

    context, thumbprint = _ssl_context(settings)
    where = f"{settings.server}:{settings.port}"
    try:
        si = SmartConnect(host=settings.server, port=settings.port, user=settings.user,
                          pwd=password, sslContext=context,
                          connectionPoolTimeout=60)
    except vim.fault.InvalidLogin:
        raise VSphereError(f"login to {where} as {settings.user!r} failed: wrong user name or "
                           "password") from None
    except vim.fault.VimFault as exc:
        raise VSphereError(f"login to {where} failed: {fault_text(exc)}") from None
    except ssl.SSLError as exc:
        raise VSphereError(f"TLS with {where} failed: {exc}") from None
    except OSError as exc:
        raise VSphereError(f"cannot connect to {where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - pyvmomi raises plain Exceptions (thumbprints, versions)
        raise VSphereError(f"cannot connect to {where}: {exc}") from None
    return Connection(si, settings, thumbprint, password)
