"""Checks a client makes of its own credentials before it connects, and after a refusal.

``check_credentials`` reads the client's CA certificate(s), certificate and key and answers,
each in one line and before any network traffic, the questions a TLS handshake would only
answer with "handshake failed" (or, on the server's side, a closed connection):

- does the key belong to the certificate (same public key)?
- was the certificate issued by a CA in ``ca.pem`` (issuer name and signature, verified with
  the CA's public key by ``cryptography``'s ``Certificate.verify_directly_issued_by``)?
- is it valid now (``notBefore`` <= now <= ``notAfter``, RFC 5280 4.1.2.5), and is the CA?
- is it a client credential (subject OU ``client``, extended key usage ``clientAuth``; not
  the operator's, the server's or a CA certificate)?
- is it revoked by the CA-signed CRL beside ``ca.pem`` (``crl.pem``, verified against the
  CA by ``fedmosaic.net.certs.read_revocations``)?

All X.509 parsing and signature verification is ``cryptography``'s (RFC 5280 profile as in
``fedmosaic.net.certs``); nothing here implements a primitive.

``check_server`` makes a TLS handshake of its own (Python's ``ssl``, i.e. OpenSSL, TLS 1.3
as gRPC here) before the client loads its model and data, and again when gRPC reports a
connection closed right after TLS, which is how a server refusing our certificate looks (it
sends no alert): it tells a server certificate this client does not trust, a server that
hangs up on our certificate (and which CA it trusts instead), and a server that accepted us
or is merely down (transient).
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmosaic.net.client_errors import (
    LOCAL_TLS,
    SERVER_ALERTS,
    ExitCode,
    PermanentError,
    Verdict,
)

log = logging.getLogger(__name__)

# Warn when the certificate expires within this many days (so renewal is not a surprise).
EXPIRY_WARNING_DAYS = 14
# Ids are never reused (fedmosaic.net.certs), so a new credential comes with a new id.
_RENEW = "ask the operator for a new one (fedmosaic certs request NEW-ID here, then " \
         "fedmosaic certs sign by the operator)"


class PreflightError(PermanentError):
    """This client's credentials cannot work; ``exit_code`` 2 for unreadable or malformed
    files (a usage error), 3 for a credential the federation would refuse."""


@dataclass(frozen=True)
class ClientCredential:
    """What ``check_credentials`` established about a client certificate."""

    client_id: str
    role: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    issuer: x509.Certificate  # the CA certificate from ca.pem that signed it
    server_name: str | None = None  # the server certificate generation pinned by crl.pem


def when(moment: dt.datetime) -> str:
    """``2026-01-01 00:00 UTC``."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise PreflightError(f"cannot read {what} {path}: {exc.strerror or exc}",
                             reason="unreadable", exit_code=ExitCode.USAGE) from None


def _load_cas(path: Path) -> list[x509.Certificate]:
    raw = _read(path, "the CA certificate")
    try:
        cas = x509.load_pem_x509_certificates(raw)
    except ValueError:
        cas = []
    if not cas:
        raise PreflightError(f"{path} is not a PEM certificate (the federation's ca.pem)",
                             reason="malformed", exit_code=ExitCode.USAGE)
    return cas


def _load_cert(path: Path) -> x509.Certificate:
    raw = _read(path, "the client certificate")
    try:
        return x509.load_pem_x509_certificates(raw)[0]
    except (ValueError, IndexError):
        raise PreflightError(f"{path} is not a PEM certificate (this client's .pem)",
                             reason="malformed", exit_code=ExitCode.USAGE) from None


def _load_key(path: Path) -> object:
    raw = _read(path, "the client key")
    try:
        return serialization.load_pem_private_key(raw, password=None)
    except TypeError:
        raise PreflightError(f"{path} is an encrypted key; gRPC needs it unencrypted (as "
                             "fedmosaic certs writes it, mode 0600)", reason="malformed",
                             exit_code=ExitCode.USAGE) from None
    except (ValueError, UnsupportedAlgorithm):
        raise PreflightError(f"{path} is not a PEM private key (this client's .key)",
                             reason="malformed", exit_code=ExitCode.USAGE) from None


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def issuer_of(cert: x509.Certificate,
              cas: Sequence[x509.Certificate]) -> x509.Certificate | None:
    """The CA in ``cas`` that issued ``cert`` (name and signature verified), or None."""
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca
    return None


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else ""


def _check_role(cert: x509.Certificate, path: Path) -> str:
    """The role (subject OU); ``PreflightError`` unless it is a client certificate."""
    role = _attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = []
    hint = ("clients use their own certificate (clients/ID.pem from fedmosaic certs init or "
            "add-client, or one from certs request + certs sign)")
    if is_ca:
        raise PreflightError(f"{path} is a CA certificate, not a client's; {hint}",
                             reason="not_a_client")
    if role == "operator":
        raise PreflightError(f"{path} is the operator's certificate (for fedmosaic status), "
                             f"not a client's; {hint}", reason="not_a_client")
    if role == "server" or (usages and ExtendedKeyUsageOID.CLIENT_AUTH not in usages):
        raise PreflightError(f"{path} is a server certificate, not a client's; {hint}",
                             reason="not_a_client")
    if role != "client":
        raise PreflightError(f"{path} is not a fedmosaic client certificate (its subject has "
                             f"role {role or 'none'!r}, not 'client'); {hint}",
                             reason="not_a_client")
    return role


def check_credentials(ca: Path, cert: Path, key: Path, *, crl: Path | None = None,
                      now: dt.datetime | None = None) -> ClientCredential:
    """Verify a client's credentials (see the module docstring); ``crl`` defaults to
    ``crl.pem`` beside ``ca`` and is skipped when absent (``open_channel`` warns then).

    Raises ``PreflightError`` with one line that says what is wrong and what to do."""
    ca, cert, key = Path(ca), Path(cert), Path(key)
    now = now or dt.datetime.now(dt.timezone.utc)
    cas = _load_cas(ca)
    certificate = _load_cert(cert)
    private_key = _load_key(key)
    if _spki(private_key.public_key()) != _spki(certificate.public_key()):  # type: ignore
        raise PreflightError(f"the key {key} does not belong to the certificate {cert} (their "
                             "public keys differ); use the key made together with this "
                             "certificate", reason="key_mismatch")
    issuer = issuer_of(certificate, cas)
    if issuer is None:
        raise PreflightError(f"your certificate was not issued by the federation CA in {ca} "
                             f"({cert} belongs to another federation, or {ca.name} does)",
                             reason="foreign_ca")
    if now > issuer.not_valid_after_utc:
        raise PreflightError(f"the federation CA in {ca} expired on "
                             f"{when(issuer.not_valid_after_utc)}; the operator must set up "
                             "new credentials (fedmosaic certs init)", reason="ca_expired")
    if now < certificate.not_valid_before_utc:
        raise PreflightError(f"your certificate is not valid before "
                             f"{when(certificate.not_valid_before_utc)} (this machine's clock "
                             f"says {when(now)}: check it)", reason="not_yet_valid")
    if now > certificate.not_valid_after_utc:
        raise PreflightError(f"your certificate expired on "
                             f"{when(certificate.not_valid_after_utc)}; {_RENEW}",
                             reason="expired")
    role = _check_role(certificate, cert)
    client_id = _attr(certificate.subject, NameOID.COMMON_NAME)
    crl = crl if crl is not None else ca.with_name("crl.pem")
    pinned = None
    if crl.exists():
        from fedmosaic.net.certs import CredentialError, read_revocations

        try:
            revoked = read_revocations(crl, ca)
        except CredentialError as exc:
            raise PreflightError(f"the revocation list {crl} is unusable: {exc}",
                                 reason="bad_crl", exit_code=ExitCode.USAGE) from None
        if certificate.serial_number in revoked.serials:
            raise PreflightError(f"your certificate ('{client_id}', serial "
                                 f"{certificate.serial_number:x}) is revoked by the "
                                 f"federation's revocation list {crl}; ask the operator for "
                                 "a credential under a new id", reason="revoked")
        if revoked.server_generation is not None:
            from fedmosaic.net.certs import server_generation_name

            pinned = server_generation_name(revoked.server_generation)
    left = certificate.not_valid_after_utc - now
    if left < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        log.warning("your certificate expires on %s (in %.1f days); %s",
                    when(certificate.not_valid_after_utc), left.total_seconds() / 86400,
                    _RENEW)
    return ClientCredential(client_id, role, certificate.serial_number,
                            certificate.not_valid_before_utc, certificate.not_valid_after_utc,
                            issuer, pinned)


# -- the server's side of the handshake ---------------------------------------------------------

def expected_server_name(credential: ClientCredential | None, server: str,
                         server_name: str | None = None) -> str:
    """The name the server's certificate must carry, as ``open_channel`` makes gRPC check it:
    the generation pinned by the CRL, else ``server_name``, else the host dialled."""
    pinned = credential.server_name if credential is not None else None
    return pinned or server_name or server.rpartition(":")[0].strip("[]")


def _handshake(server: str, ca: Path, cert: Path, key: Path, server_name: str,
               timeout: float) -> tuple[str, Verdict | None, bytes]:
    """One TLS handshake as this client: ("accepted" | "unreachable" | "verdict" | "hangup",
    the verdict for "verdict", the server's DER certificate)."""
    host, _, port = server.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3  # as fedmosaic.net.tls makes gRPC do
    try:
        context.load_verify_locations(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError):
        return "unreachable", None, b""  # check_credentials reports unusable files
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=server_name) as tls:
            server_der = tls.getpeercert(binary_form=True) or b""
            # HTTP/2 connection preface (RFC 9113 3.4) and an empty SETTINGS frame: a gRPC
            # server that accepted us answers with its own SETTINGS.
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            answer = tls.recv(9)
    except ssl.SSLCertVerificationError as exc:
        # Our own verdict on the server's certificate, in the words gRPC would show.
        text = f"{exc.verify_message} {exc}"
        for needle, label, message in LOCAL_TLS:
            if needle.lower() in text.lower():
                return "verdict", Verdict("fail", label, message), b""
        return "verdict", Verdict("fail", "server_untrusted", "this client does not trust the "
                                  f"server's certificate: {exc.verify_message}"), b""
    except ssl.SSLError as exc:
        text = f"{getattr(exc, 'reason', '')} {exc}"
        for needle, label, message in (*SERVER_ALERTS, *LOCAL_TLS):
            if needle.lower() in text.lower():
                return "verdict", Verdict("fail", label, message), b""
        return "unreachable", None, b""  # e.g. an EOF in the handshake: for the retries
    except (OSError, ValueError):
        return "unreachable", None, b""  # down, reset, timed out: transient
    return ("accepted" if answer else "hangup"), None, server_der


def check_server(server: str, ca: Path, cert: Path, key: Path, *, server_name: str,
                 timeout: float = 5.0, attempts: int = 2, pause: float = 0.3) -> Verdict | None:
    """A permanent verdict on the TLS handshake with ``server``, or None (it accepted us, or
    it could not be reached: transient, for the retry loop).

    The verdict is ours when the server's certificate fails our checks (not from the CA in
    ``ca``, expired, not the pinned generation). A gRPC server that accepts the client's
    certificate sends its HTTP/2 SETTINGS frame at once; one that refuses it (another CA,
    expired by its clock) closes the connection without a byte and without an alert. That is
    taken as a refusal only if ``attempts`` handshakes in a row end so (``pause`` seconds
    apart), since a server going down can close a connection too; the server's certificate
    then tells whether it trusts another CA than the one that issued ours.
    """
    for attempt in range(attempts):
        if attempt:
            time.sleep(pause)
        outcome, verdict, server_der = _handshake(server, ca, cert, key, server_name, timeout)
        if outcome != "hangup":
            return verdict
    ours = _load_cert(cert)
    cas = _load_cas(ca)
    theirs = x509.load_der_x509_certificate(server_der) if server_der else None
    our_ca = issuer_of(ours, cas)
    their_ca = issuer_of(theirs, cas) if theirs is not None else None
    if our_ca is not None and their_ca is not None and \
            _spki(our_ca.public_key()) != _spki(their_ca.public_key()):
        return Verdict("fail", "foreign_ca", "the server does not trust this certificate: it "
                       "was issued by another CA than the server's")
    valid = f"{when(ours.not_valid_before_utc)} to {when(ours.not_valid_after_utc)}"
    return Verdict("fail", "certificate_refused", "the server refused this client's "
                   f"certificate in the TLS handshake (valid here from {valid}): check both "
                   "machines' clocks, and that the server uses this federation's ca.pem")
