"""Who is calling: mutual-TLS credentials and the verified peer identity of every RPC.

The server requires a client certificate issued by the federation CA (TLS 1.3 handshake,
``require_client_auth``): a client without one, or with one from another CA, is refused by
the TLS layer before any RPC runs (gRPC logs "Handshake failed" with the reason). A client
that passes the handshake is identified by its certificate's subject common name and role
(organizational unit ``client`` or ``operator``, see ``fedmosaic.net.certs``) -- never by
anything it sends -- and checked against the CA-signed revocation list, which is re-read
whenever the file changes, so a revocation applies without a restart. The server accepts a CRL
only if its CRL number is above the last one it accepted (or it is that same list again), and
records that number beside the CRL (``crl-accepted.json``), so neither a reload nor a restart
lets an older signed CRL un-revoke a credential.

Clients cannot see the server's certificate through gRPC Python (there is no client-side auth
context or verification callback), so they check the server's revocation through TLS itself:
``pinned_server_name`` reads the server certificate generation from the client's CA-verified
CRL and the channel verifies that generation's name (see ``fedmosaic.net.certs``).

TLS 1.2 is refused by both ends when ``fedmosaic.net.tls`` could apply its policy; the
credentials below log a warning when it could not.
"""

from __future__ import annotations

import functools
import hashlib
import json
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
from fedmosaic.net import tls
from fedmosaic.net.certs import (
    CredentialError,
    FederationPaths,
    Revocations,
    _write,
    read_revocations,
    server_generation_name,
)
from fedmosaic.net.errors import Refused

log = logging.getLogger(__name__)
# Where the server records the last CRL it accepted; default: crl-accepted.json beside the CRL.
CRL_STATE_ENV = "FEDMOSAIC_CRL_STATE"
_warned_tls = False


def _check_tls_policy() -> None:
    global _warned_tls
    if tls.policy() != "enforced" and not _warned_tls:
        _warned_tls = True
        log.warning("TLS policy: %s", tls.describe())


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
    _check_tls_policy()
    return grpc.ssl_server_credentials(
        [(_read(paths.server_key, "server key"), _read(paths.server_cert, "server certificate"))],
        root_certificates=_read(paths.ca_cert, "CA certificate"),
        require_client_auth=True,
    )


def channel_credentials(ca: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    """TLS client credentials: trust only the federation CA, present our own certificate."""
    _check_tls_policy()
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate"),
        private_key=_read(key, "client key"),
        certificate_chain=_read(cert, "client certificate"),
    )


def pinned_server_name(ca: Path, crl: Path | None = None) -> str | None:
    """The name the server certificate must carry, from the client's CRL (``crl.pem`` beside
    ``ca`` unless given); ``None`` (hostname check only, with a warning) without a CRL or for a
    CRL from before server generations existed.

    Pass it as ``grpc.ssl_target_name_override``: TLS then accepts only the current server
    certificate, so one revoked with ``certs renew-server`` fails the handshake. A CRL that is
    present but does not verify is an error (fail closed).
    """
    crl = crl if crl is not None else ca.with_name("crl.pem")
    if not crl.exists():
        log.warning("no %s beside the CA certificate: the server certificate's revocation "
                    "cannot be checked (copy crl.pem with the credentials)", crl.name)
        return None
    try:
        rev = read_revocations(crl, ca)
    except CredentialError as exc:
        raise ConfigError("credentials", str(crl), f"a valid CRL ({exc})") from None
    if rev.server_generation is None:
        log.warning("%s names no server certificate generation: only the host name is checked",
                    crl)
        return None
    return server_generation_name(rev.server_generation)


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

    Fails closed: if the CRL cannot be read or verified (missing, tampered, stale, no CRL
    number, or older than the last accepted one), every caller is refused until a valid one is
    in place. The last accepted CRL number and digest, per CA, are kept in ``state`` (default:
    ``$FEDMOSAIC_CRL_STATE`` or ``crl-accepted.json`` beside the CRL) so that a restart does
    not reopen the door to a replayed list; a new CA (a new federation) starts afresh.
    """

    def __init__(self, crl: Path, ca: Path, check_every: float = 1.0,
                 state: Path | None = None) -> None:
        self.crl, self.ca, self.check_every = crl, ca, check_every
        env_state = os.environ.get(CRL_STATE_ENV)
        self.state = state if state is not None else (
            Path(env_state) if env_state else crl.with_name("crl-accepted.json"))
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._ids: frozenset[str] = frozenset()
        self._serials: frozenset[int] = frozenset()
        self._error: str | None = None
        self.number = 0  # CRL number of the list in force
        self.refresh(force=True)
        if self._error is not None:
            raise ConfigError("server.credentials", str(crl), f"a valid CRL ({self._error})")

    def _accepted(self, ca_digest: str) -> tuple[int, str] | None:
        try:
            data = json.loads(self.state.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise CredentialError(f"the CRL state {self.state} is unreadable ({exc}); it "
                                  "guards against replayed CRLs, so fix or remove it") from None
        if not isinstance(data, dict) or data.get("ca_sha256") != ca_digest:
            return None  # another CA: a new federation numbers its CRLs afresh
        number, digest = data.get("number"), data.get("digest")
        if isinstance(number, bool) or not isinstance(number, int) \
                or not isinstance(digest, str):
            raise CredentialError(f"the CRL state {self.state} is malformed; fix or remove it")
        return number, digest

    def _check_order(self, rev: Revocations) -> None:
        """Refuse a CRL older than the last accepted one; record a newer one (before use)."""
        try:
            ca_digest = hashlib.sha256(self.ca.read_bytes()).hexdigest()
        except OSError as exc:
            raise CredentialError(f"cannot read {self.ca}: {exc.strerror}") from None
        last = self._accepted(ca_digest)
        if last is not None:
            number, digest = last
            if rev.number < number:
                raise CredentialError(f"{self.crl} has CRL number {rev.number}, older than the "
                                      f"last accepted {number}: refusing a replayed CRL")
            if rev.number == number and rev.digest != digest:
                raise CredentialError(f"{self.crl} has CRL number {rev.number} like the last "
                                      "accepted one but other content: refusing it")
            if rev.number == number:
                return
        record = {"ca_sha256": ca_digest, "number": rev.number, "digest": rev.digest}
        try:
            _write(self.state, (json.dumps(record) + "\n").encode(), private=False)
        except OSError as exc:
            raise CredentialError(f"cannot record the accepted CRL number in {self.state} "
                                  f"({exc.strerror}); set {CRL_STATE_ENV} to a writable "
                                  "file") from None

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
                self._check_order(rev)
            except (OSError, CredentialError) as exc:
                if self._error != str(exc):
                    log.error("revocation list unusable, refusing every client: %s", exc)
                self._error, self._stamp = str(exc), None
                return
            if self._stamp is not None and (rev.ids != self._ids or rev.serials != self._serials):
                log.info("revocation list reloaded: %d revoked credentials", len(rev.serials),
                         extra={"crl_number": rev.number})
            self._ids, self._serials, self._stamp, self._error = \
                rev.ids, rev.serials, stamp, None
            self.number = rev.number

    def check(self, peer: Peer) -> None:
        """Raise ``Refused`` if ``peer`` is revoked (or the list is unusable)."""
        self.refresh()
        if self._error is not None:
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          "the server's revocation list is unusable; try again later", "crl")
        if peer.client_id in self._ids or peer.serial in self._serials:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"credential of '{peer.client_id}' is revoked", "revoked")
