"""Who is calling: mutual-TLS credentials and the verified peer identity of every RPC.

The server requires a client certificate issued by the federation CA (TLS 1.3 handshake,
``require_client_auth``): a client without one, or with one from another CA, is refused by
the TLS layer before any RPC runs (gRPC logs "Handshake failed" with the reason). A client
that passes the handshake is identified by its certificate's subject common name and role
(organizational unit ``client`` or ``operator``, see ``fedmosaic.net.certs``) -- never by
anything it sends -- and checked against the CA-signed revocation list, which is re-read
whenever the file changes, so a revocation applies without a restart.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from fedmosaic.core.errors import ConfigError
from fedmosaic.net.certs import CredentialError, FederationPaths, read_revocations
from fedmosaic.net.errors import Refused

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """A verified caller: certificate CN, role (OU) and serial number."""

    client_id: str
    role: str
    serial: int


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError("server.credentials", str(path),
                          f"a readable {what} ({exc.strerror})") from None


def server_credentials(paths: FederationPaths) -> grpc.ServerCredentials:
    """TLS server credentials that require a client certificate from the federation CA."""
    return grpc.ssl_server_credentials(
        [(_read(paths.server_key, "server key"), _read(paths.server_cert, "server certificate"))],
        root_certificates=_read(paths.ca_cert, "CA certificate"),
        require_client_auth=True,
    )


def channel_credentials(ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    """TLS client credentials: trust only the federation CA, present our own certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate"),
        private_key=_read(key, "client key"),
        certificate_chain=_read(cert, "client certificate"),
    )


@functools.lru_cache(maxsize=4096)
def _parse_peer(pem: bytes) -> Peer:
    cert = x509.load_pem_x509_certificate(pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cns) != 1:
        raise ValueError("certificate has no single common name")
    role = str(ous[0].value) if len(ous) == 1 else ""
    return Peer(str(cns[0].value), role, cert.serial_number)


def peer_of(context: grpc.ServicerContext) -> Peer:
    """The caller's identity from the TLS layer's verified certificate."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") or []
    if len(pems) != 1:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no verified client certificate",
                      "unauthenticated")
    try:
        return _parse_peer(bytes(pems[0]))
    except ValueError as exc:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"unusable certificate: {exc}",
                      "unauthenticated") from exc


class RevocationList:
    """The federation's CRL, verified against the CA and reloaded when the file changes.

    Fails closed: if the CRL cannot be read or verified (missing, tampered, stale), every
    caller is refused until a valid one is in place.
    """

    def __init__(self, crl: Path, ca: Path, check_every: float = 1.0) -> None:
        self.crl, self.ca, self.check_every = crl, ca, check_every
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._ids: frozenset[str] = frozenset()
        self._serials: frozenset[int] = frozenset()
        self._error: str | None = None
        self.refresh(force=True)
        if self._error is not None:
            raise ConfigError("server.credentials", str(crl), f"a valid CRL ({self._error})")

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked < self.check_every:
                return
            self._checked = now
            try:
                st = os.stat(self.crl)
                stamp = (st.st_mtime_ns, st.st_size)
                if stamp == self._stamp and self._error is None:
                    return
                rev = read_revocations(self.crl, self.ca)
            except (OSError, CredentialError) as exc:
                if self._error is None:
                    log.error("revocation list unusable, refusing every client: %s", exc)
                self._error, self._stamp = str(exc), None
                return
            if self._stamp is not None and (rev.ids != self._ids or rev.serials != self._serials):
                log.info("revocation list reloaded: %d revoked credentials", len(rev.serials))
            self._ids, self._serials, self._stamp, self._error = \
                rev.ids, rev.serials, stamp, None

    def check(self, peer: Peer) -> None:
        """Raise ``Refused`` if ``peer`` is revoked (or the list is unusable)."""
        self.refresh()
        if self._error is not None:
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          "the server's revocation list is unusable; try again later", "crl")
        if peer.client_id in self._ids or peer.serial in self._serials:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"credential of '{peer.client_id}' is revoked", "revoked")
