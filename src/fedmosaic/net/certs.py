"""Federation credentials: a private CA, a server certificate, one certificate per client, a CRL.

Deployment authenticates both ends with mutual TLS (TLS 1.3, RFC 8446, with client
certificates): the server presents ``server.pem`` and every client presents its own certificate,
each issued by the federation's CA (``ca.pem``). The certificate profile follows RFC 5280:

- CA: ``basicConstraints CA=true, pathlen=0`` and ``keyUsage keyCertSign, cRLSign`` (both
  critical); it signs leaf certificates and the revocation list, nothing else.
- Server: ``subjectAltName`` with the given DNS names and IP addresses (TLS clients match the
  host they dial against these, RFC 6125) and ``extendedKeyUsage serverAuth``.
- Clients and the operator: ``extendedKeyUsage clientAuth``. The identity is the subject common
  name (CN), which the server reads from the verified mTLS peer; the subject's organizational
  unit (OU) says the role (``client`` or ``operator``), and a URI ``subjectAltName``
  ``spiffe://fedmosaic/<role>/<id>`` (SPIFFE ID form) repeats both for verifiers that read only
  the SAN. ``operator`` is the credential for ``fedmosaic status``.

Revocation uses a standard X.509 CRL (RFC 5280 section 5) signed by the CA (``crl.pem``, created
empty). Serial numbers are the standard revocation key; each CRL entry also carries the client id
in a private, non-critical entry extension (OID under the UUID arc 2.25, ITU-T X.667), so the
mapping from serial to id is covered by the CA's signature and ``load_revoked`` can answer by id
without any other file. A revoked id is never reissued, so id and serial revocation agree.
``federation.json`` records every credential issued (id, role, serial, expiry), so revoking by id
works even after a client's files have been handed over and deleted.

Certificate requests (RFC 2986): ``request_certificate`` makes a key and a CSR on the client's
own machine, ``sign_request`` lets the operator issue the certificate from the CSR alone, so the
private key never leaves its owner. The operator checks the CSR's signature and key type and
copies nothing from it but the public key: subject, constraints, usages and names are always
our own profile above, whatever extensions the CSR asks for.

Every CRL carries a CRL number (RFC 5280 section 5.2.3) that grows with each reissue; verifiers
refuse a CRL without one, and the server refuses one whose number is below the last it accepted
(``fedmosaic.net.auth``), so an old CRL cannot be replayed to un-revoke a credential. The
server certificate is revocable too: it carries, besides its real names, a DNS name
``gen-<N>.server.fedmosaic.invalid`` for its generation N (``.invalid`` is reserved, RFC 6761,
so it never resolves), and every CRL carries the current generation in a private non-critical
extension. ``renew_server`` revokes the current server certificate and issues generation N+1;
clients read the generation from their CA-verified CRL and make TLS check that name instead of
the host name (``grpc.ssl_target_name_override``), so after they receive the new CRL the old
server certificate fails the handshake. gRPC Python gives a client no access to the server's
certificate, so this name binding is the check a client can make.

Private keys are written unencrypted (gRPC loads them unattended) with mode 0600; the CA key is
encrypted with a passphrase unless the caller opts out with ``ca_passphrase=None``: sealed with
scrypt and AES-256-GCM (``fedmosaic.net.sealed_key``, which says why not encrypted PKCS#8 or
PKCS#12). No function here prints or logs key material. Keep ``ca.key`` off the server: the
server needs only ``ca.pem``, ``server.pem``, ``server.key`` and ``crl.pem``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmosaic.core.errors import ConfigError, FedmosaicError
from fedmosaic.net import sealed_key

KeyType = Literal["ec-p256", "ec-p384", "rsa-3072", "rsa-4096"]
KEY_TYPES: tuple[str, ...] = ("ec-p256", "ec-p384", "rsa-3072", "rsa-4096")
OPERATOR_ID = "operator"
TRUST_DOMAIN = "fedmosaic"
# Names that would collide with the federation's own files or roles.
RESERVED_IDS = frozenset({OPERATOR_ID, "server", "ca", "crl", "federation"})
# A safe file name on every common file system: no separators, no leading dot, bounded length.
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# Private CRL entry extension holding the revoked certificate's client id (UTF8String). A UUID OID
# (ITU-T X.667, arc 2.25) needs no registration and cannot collide with anyone else's.
CLIENT_ID_OID = x509.ObjectIdentifier("2.25.191893346733946094329718413925374613321")
# Private CRL extension holding the current server certificate generation (DER INTEGER).
SERVER_GENERATION_OID = x509.ObjectIdentifier("2.25.244770311668046572264759306595964060776")
# The CA key's passphrase is at least this long (NIST SP 800-63B's floor for memorized secrets).
MIN_PASSPHRASE_BYTES = 8
# Certificates start a little in the past so a client whose clock lags still accepts them.
_CLOCK_SKEW = dt.timedelta(minutes=5)
_INDEX_FORMAT = 1


class CredentialError(FedmosaicError, ValueError):
    """A credential operation cannot be done as asked (existing federation, unknown id, bad CRL)."""


@dataclass(frozen=True)
class FederationPaths:
    """Where each file of a federation directory lives."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def index(self) -> Path:
        return self.root / "federation.json"

    @property
    def crl_state(self) -> Path:
        """The server's record of the last CRL it accepted (number and digest)."""
        return self.root / "crl-accepted.json"

    @property
    def clients_dir(self) -> Path:
        return self.root / "clients"

    @property
    def operator_cert(self) -> Path:
        return self.root / f"{OPERATOR_ID}.pem"

    @property
    def operator_key(self) -> Path:
        return self.root / f"{OPERATOR_ID}.key"

    def client_cert(self, client_id: str) -> Path:
        return self.clients_dir / f"{validate_client_id(client_id)}.pem"

    def client_key(self, client_id: str) -> Path:
        return self.clients_dir / f"{validate_client_id(client_id)}.key"


@dataclass(frozen=True)
class Revocations:
    """The verified content of a CRL: revoked serials and the client ids they belong to."""

    serials: frozenset[int]
    ids: frozenset[str]
    last_update: dt.datetime
    next_update: dt.datetime
    number: int = 0  # the CRL number (RFC 5280 5.2.3); read_revocations requires one
    server_generation: int | None = None  # None: a CRL from before server revocation existed
    digest: str = ""  # SHA-256 of the CRL's DER encoding


@dataclass(frozen=True)
class CredentialInfo:
    """One issued credential, as ``fedmosaic certs list`` shows it."""

    id: str
    role: str
    serial: int
    not_after: dt.datetime
    revoked: bool


def validate_client_id(client_id: object) -> str:
    """Return ``client_id`` if it is a safe, non-reserved file name; raise ConfigError otherwise."""
    if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise ConfigError("client_id", client_id, "1-64 characters from A-Z a-z 0-9 . _ -, "
                          "starting with a letter or digit")
    if client_id.lower() in RESERVED_IDS:
        raise ConfigError("client_id", client_id, f"not one of the reserved names "
                          f"{sorted(RESERVED_IDS)}")
    return client_id


def _san_entry(name: object) -> x509.GeneralName:
    if not isinstance(name, str) or not name:
        raise ConfigError("server_names", name, "a DNS name or an IP address")
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ConfigError("server_names", name, "a DNS name or an IP address")
    return x509.DNSName(name.rstrip(".").lower())


def server_generation_name(generation: int) -> str:
    """The DNS name that only generation ``generation`` of the server certificate carries."""
    return f"gen-{generation}.server.{TRUST_DOMAIN}.invalid"


def _identity_uri(role: str, client_id: str) -> x509.GeneralName:
    # RFC 5280 wants identities in the SAN (verifiers following the CA/B profile require one);
    # the URI form follows SPIFFE IDs, whose path alphabet is exactly the client id alphabet.
    return x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/{role}/{client_id}")


def _new_key(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa-3072", "rsa-4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ConfigError("key_type", key_type, KEY_TYPES)


def _hash_for(key: object) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _key_usage(*, ca: bool, rsa_key: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca, content_commitment=False,
        key_encipherment=rsa_key and not ca,  # RSA key transport, for TLS 1.2 peers
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmosaic federation")]
    if unit is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _make_ca(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, days: int) -> x509.Certificate:
    now = _now()
    subject = _name("fedmosaic federation CA")
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True, rsa_key=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _hash_for(key))
    )


def _issue_leaf(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, subject: x509.Name,
    usage: x509.ObjectIdentifier, days: int, san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    # Only the public key comes from the subject (a CSR or a key made here): every extension is
    # ours, so a request cannot obtain CA rights, another usage or extra names.
    now = _now()
    # A leaf never outlives its CA: verifiers would reject the tail anyway.
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca_cert.subject).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False, rsa_key=isinstance(public_key, rsa.RSAPublicKey)),
                       critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, _hash_for(ca_key))


def _encode_id(client_id: str) -> bytes:
    # DER UTF8String; ids are at most 64 ASCII bytes, so the short length form always applies.
    raw = client_id.encode("utf-8")
    return bytes([0x0C, len(raw)]) + raw


def _decode_id(der: bytes) -> str | None:
    if len(der) < 2 or der[0] != 0x0C or der[1] != len(der) - 2:
        return None
    try:
        text = der[2:].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if CLIENT_ID_PATTERN.fullmatch(text) else None


def _der_uint(n: int) -> bytes:
    # DER INTEGER (X.690 8.3) of a small non-negative int: minimal big-endian bytes, with a
    # leading zero byte when the top bit is set so it does not read as negative.
    raw = n.to_bytes(n.bit_length() // 8 + 1, "big")
    return bytes([0x02, len(raw)]) + raw


def _der_uint_decode(der: bytes) -> int | None:
    if len(der) < 3 or der[0] != 0x02 or der[1] != len(der) - 2 or der[1] > 8:
        return None
    value = int.from_bytes(der[2:], "big", signed=True)
    return value if value >= 1 else None


def _make_crl(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    entries: Sequence[tuple[int, str | None, dt.datetime]], number: int,
    server_generation: int = 1,
) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject).last_update(_now())
        # The CRL is reissued on every revocation; until then it stays valid as long as the CA.
        .next_update(ca_cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .add_extension(x509.UnrecognizedExtension(SERVER_GENERATION_OID,
                                                  _der_uint(server_generation)), critical=False)
    )
    for serial, client_id, when in entries:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
        if client_id is not None:  # server certificates are revoked by serial only
            entry = entry.add_extension(
                x509.UnrecognizedExtension(CLIENT_ID_OID, _encode_id(client_id)), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca_key, _hash_for(ca_key))


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write atomically (temp file, fsync, rename); private files are created with mode 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; public files are widened only after the content is in place.
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600 if private else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
             passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)


def _ca_key_bytes(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
                  passphrase: bytes | None) -> bytes:
    if passphrase is None:
        return _key_pem(key)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return sealed_key.seal(der, passphrase)


def _is_encrypted(raw: bytes) -> bool:
    # Sealed (ours) or an encrypted PKCS#8 PEM (made by older versions); plain PEM otherwise.
    return sealed_key.is_sealed(raw) or raw.lstrip().startswith(
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----")


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki_digest(public_key: object) -> str:
    der = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _index_entry(role: str, cert: x509.Certificate) -> dict[str, object]:
    return {"role": role, "serial": format(cert.serial_number, "x"),
            "not_after": cert.not_valid_after_utc.isoformat(),
            # Whose key: lets sign_request refuse a public key already certified for another id.
            "spki_sha256": _spki_digest(cert.public_key())}


def _check_days(days: object) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 3650:
        raise ConfigError("days", days, "an integer from 1 to 3650")
    return days


def _check_passphrase(passphrase: object) -> bytes | None:
    if passphrase is None:
        return None
    if not isinstance(passphrase, bytes) or len(passphrase) < MIN_PASSPHRASE_BYTES:
        raise ConfigError("ca_passphrase", "<hidden>", f"bytes of at least "
                          f"{MIN_PASSPHRASE_BYTES} characters, or None to store the CA key "
                          "unencrypted (tests only)")
    return passphrase


def _check_ids(clients: Sequence[str]) -> list[str]:
    if isinstance(clients, str):
        raise ConfigError("clients", clients, "a list of client ids, not one string")
    ids = [validate_client_id(c) for c in clients]
    # Case-insensitive: 'A.pem' and 'a.pem' are the same file on macOS and Windows.
    seen: dict[str, str] = {}
    for c in ids:
        if c.lower() in seen:
            raise ConfigError("clients", c, f"unique ids (case-insensitive); {seen[c.lower()]!r} "
                              "is already listed")
        seen[c.lower()] = c
    return ids


def _server_san(server_names: Sequence[str], generation: int) -> list[x509.GeneralName]:
    if isinstance(server_names, str) or not server_names:
        raise ConfigError("server_names", server_names, "a non-empty list of DNS names or IPs")
    return [*(_san_entry(n) for n in server_names),
            x509.DNSName(server_generation_name(generation))]


def create_federation(
    out_dir: str | Path,
    clients: Sequence[str],
    server_names: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    key_type: KeyType = "ec-p256",
    *,
    ca_passphrase: bytes | None,
    overwrite: bool = False,
) -> FederationPaths:
    """Create a federation: CA, server certificate, operator and client credentials, empty CRL.

    ``ca_passphrase`` is required: the CA key is encrypted with it; ``None`` is the explicit
    opt-out that stores it unencrypted (tests and throwaway federations). Clients can also get
    their certificates later from a CSR (``request_certificate``, ``sign_request``) instead of
    being listed here. Refuses a directory that already holds a federation unless
    ``overwrite``; everything is generated and validated before the first file is written.
    """
    paths = FederationPaths(Path(out_dir))
    ids = _check_ids(clients)
    days = _check_days(days)
    ca_passphrase = _check_passphrase(ca_passphrase)
    san = _server_san(server_names, 1)
    if key_type not in KEY_TYPES:
        raise ConfigError("key_type", key_type, KEY_TYPES)
    existing = [p for p in (paths.ca_cert, paths.ca_key, paths.index) if p.exists()]
    if existing and not overwrite:
        raise CredentialError(f"{paths.root} already holds a federation ({existing[0].name}); "
                              "pass overwrite=True (--overwrite) to replace it")

    ca_key = _new_key(key_type)
    ca_cert = _make_ca(ca_key, days)
    files: list[tuple[Path, bytes, bool]] = [
        (paths.ca_key, _ca_key_bytes(ca_key, ca_passphrase), True),
        (paths.ca_cert, _cert_pem(ca_cert), False),
    ]
    index: dict[str, dict[str, object]] = {}
    server_key = _new_key(key_type)
    server_cert = _issue_leaf(ca_cert, ca_key, server_key.public_key(),
                              _name(server_names[0], "server"),
                              ExtendedKeyUsageOID.SERVER_AUTH, days, san)
    files += [(paths.server_key, _key_pem(server_key), True),
              (paths.server_cert, _cert_pem(server_cert), False)]
    index["server"] = _index_entry("server", server_cert)
    for role, cid, cert_path, key_path in (
        [("operator", OPERATOR_ID, paths.operator_cert, paths.operator_key)]
        + [("client", c, paths.client_cert(c), paths.client_key(c)) for c in ids]
    ):
        key = _new_key(key_type)
        cert = _issue_leaf(ca_cert, ca_key, key.public_key(), _name(cid, role),
                           ExtendedKeyUsageOID.CLIENT_AUTH, days, [_identity_uri(role, cid)])
        files += [(key_path, _key_pem(key), True), (cert_path, _cert_pem(cert), False)]
        index[cid] = _index_entry(role, cert)
    crl = _make_crl(ca_cert, ca_key, [], number=1, server_generation=1)
    files.append((paths.crl, crl.public_bytes(serialization.Encoding.PEM), False))

    if existing:  # overwrite: remove the old federation's credentials first
        _remove_federation(paths)
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.clients_dir.mkdir(mode=0o700, exist_ok=True)
    for path, data, private in files:
        _write(path, data, private=private)
    _write_index(paths, {"format": _INDEX_FORMAT, "key_type": key_type, "days": days,
                         "crl_number": 1, "server_generation": 1, "credentials": index,
                         "revoked": {}, "revoked_servers": []})
    return paths


def _remove_federation(paths: FederationPaths) -> None:
    try:
        old = _read_index(paths)
    except CredentialError:
        old = {"credentials": {}}
    for cid, entry in old.get("credentials", {}).items():
        if isinstance(entry, dict) and entry.get("role") == "client" \
                and CLIENT_ID_PATTERN.fullmatch(str(cid)):
            paths.client_cert(cid).unlink(missing_ok=True)
            paths.client_key(cid).unlink(missing_ok=True)
    for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key, paths.crl,
              paths.operator_cert, paths.operator_key, paths.index, paths.crl_state):
        p.unlink(missing_ok=True)


def _write_index(paths: FederationPaths, index: dict[str, object]) -> None:
    _write(paths.index, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode(),
           private=False)


def _read_index(paths: FederationPaths) -> dict:
    try:
        index = json.loads(paths.index.read_text())
    except FileNotFoundError:
        raise CredentialError(f"{paths.root} holds no federation (no {paths.index.name}); "
                              "create one with 'fedmosaic certs init'") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CredentialError(f"{paths.index} is unreadable: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != _INDEX_FORMAT \
            or not isinstance(index.get("credentials"), dict):
        raise CredentialError(f"{paths.index} is not a fedmosaic federation index")
    return index


def ca_key_is_encrypted(out_dir: str | Path) -> bool:
    """Whether the federation's ``ca.key`` is passphrase-protected (read from its PEM label)."""
    path = FederationPaths(Path(out_dir)).ca_key
    try:
        head = path.read_bytes()[:64]
    except OSError as exc:
        raise CredentialError(f"cannot read {path}: {exc.strerror}") from None
    return _is_encrypted(head)


def _load_ca(paths: FederationPaths, passphrase: bytes | None
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        raw = paths.ca_key.read_bytes()
    except FileNotFoundError as exc:
        raise CredentialError(f"missing {exc.filename}: issuing or revoking credentials needs "
                              "the CA certificate and key") from None
    encrypted = _is_encrypted(raw)
    if encrypted and not passphrase:
        raise CredentialError(f"the CA key {paths.ca_key} is encrypted: give its passphrase "
                              "(FEDMOSAIC_CA_PASSPHRASE, --passphrase-file, or at the prompt)")
    key: object
    try:
        if sealed_key.is_sealed(raw):
            assert passphrase is not None  # checked above
            key = serialization.load_der_private_key(sealed_key.unseal(raw, passphrase), None)
        else:
            key = serialization.load_pem_private_key(raw, passphrase if encrypted else None)
    except sealed_key.SealedKeyError as exc:
        raise CredentialError(f"cannot load the CA key {paths.ca_key}: {exc}") from None
    except (TypeError, ValueError) as exc:
        # The library's message names the problem (wrong passphrase, bad PEM) and never echoes
        # the key.
        reason = "wrong passphrase (or a damaged file)" if encrypted else str(exc)
        raise CredentialError(f"cannot load the CA key {paths.ca_key}: {reason}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CredentialError(f"{paths.ca_key} holds an unsupported key type")
    if cert.public_key() != key.public_key():
        raise CredentialError(f"{paths.ca_key} does not belong to {paths.ca_cert}")
    if cert.not_valid_after_utc <= _now():
        raise CredentialError(f"the CA {paths.ca_cert} has expired; create a new federation")
    return cert, key


def _check_new_id(index: dict, client_id: str) -> None:
    taken = {c.lower(): c for c in index["credentials"]}
    if client_id.lower() in taken:
        state = "revoked" if taken[client_id.lower()] in index.get("revoked", {}) else "issued"
        raise CredentialError(f"client id {client_id!r} was already {state} "
                              f"(as {taken[client_id.lower()]!r}); ids are never reused")


def add_client(
    out_dir: str | Path, client_id: str, days: int | None = None, *,
    ca_passphrase: bytes | None = None,
) -> tuple[Path, Path]:
    """Issue a certificate and key for a new client; return (certificate path, key path).

    The operator then holds the client's key; ``request_certificate`` + ``sign_request`` avoid
    that. Refuses an id already issued, including a revoked one: ids are never reused.
    """
    paths = FederationPaths(Path(out_dir))
    validate_client_id(client_id)
    index = _read_index(paths)
    _check_new_id(index, client_id)
    days = _check_days(index.get("days", 365) if days is None else days)
    ca_cert, ca_key = _load_ca(paths, ca_passphrase)
    key = _new_key(str(index.get("key_type", "ec-p256")))
    cert = _issue_leaf(ca_cert, ca_key, key.public_key(), _name(client_id, "client"),
                       ExtendedKeyUsageOID.CLIENT_AUTH, days, [_identity_uri("client", client_id)])
    paths.clients_dir.mkdir(mode=0o700, exist_ok=True)
    _write(paths.client_key(client_id), _key_pem(key), private=True)
    _write(paths.client_cert(client_id), _cert_pem(cert), private=False)
    index["credentials"][client_id] = _index_entry("client", cert)
    _write_index(paths, index)
    return paths.client_cert(client_id), paths.client_key(client_id)


# --- certificate requests (RFC 2986) -----------------------------------------------------------

def request_certificate(
    out_dir: str | Path, client_id: str, key_type: KeyType = "ec-p256", *,
    role: Literal["client", "server"] = "client", overwrite: bool = False,
) -> tuple[Path, Path]:
    """On the client's (or server's) own machine: make a private key and a CSR for it.

    Writes ``<id>.key`` (mode 0600, stays here) and ``<id>.csr`` (send it to the operator) in
    ``out_dir``; returns (key path, CSR path). The CSR's subject is the id, for the operator to
    check; what the certificate will say is decided by the operator's ``sign_request``. For
    ``role="server"`` the files are ``server.key`` and ``server.csr`` and ``client_id`` is not
    used (``renew_server`` takes the names from the operator).
    """
    if role == "server":
        name = "server"
    elif role == "client":
        name = validate_client_id(client_id)
    else:
        raise ConfigError("role", role, ("client", "server"))
    if key_type not in KEY_TYPES:
        raise ConfigError("key_type", key_type, KEY_TYPES)
    out = Path(out_dir)
    key_path, csr_path = out / f"{name}.key", out / f"{name}.csr"
    if key_path.exists() and not overwrite:
        raise CredentialError(f"{key_path} exists; pass overwrite=True (--overwrite) to replace "
                              "it (its certificate then stops working)")
    key = _new_key(key_type)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(_name(name, role))
           .sign(key, _hash_for(key)))
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(key_path, _key_pem(key), private=True)
    _write(csr_path, csr.public_bytes(serialization.Encoding.PEM), private=False)
    return key_path, csr_path


def _load_csr(csr_path: str | Path) -> x509.CertificateSigningRequest:
    path = Path(csr_path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CredentialError(f"cannot read {path}: {exc.strerror}") from None
    if b"PRIVATE KEY" in raw:
        raise CredentialError(f"{path} contains a private key: send only the .csr file; the key "
                              "stays with its owner")
    try:
        csr = (x509.load_pem_x509_csr(raw) if raw.lstrip().startswith(b"-----")
               else x509.load_der_x509_csr(raw))
    except ValueError as exc:
        raise CredentialError(f"{path} is not a certificate signing request: {exc}") from None
    try:
        valid = csr.is_signature_valid
    except UnsupportedAlgorithm as exc:
        raise CredentialError(f"{path}: unsupported signature algorithm ({exc})") from None
    if not valid:
        # Proof of possession (RFC 2986 section 3): without it anyone could get a certificate
        # for a key they do not hold, e.g. another member's.
        raise CredentialError(f"{path}: the request's signature does not verify (not signed by "
                              "the key it certifies, or altered)")
    return csr


def _check_request_key(csr: x509.CertificateSigningRequest, where: str
                       ) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    key = csr.public_key()
    ec_ok = isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in ("secp256r1",
                                                                              "secp384r1")
    rsa_ok = isinstance(key, rsa.RSAPublicKey) and key.key_size >= 3072
    if not (ec_ok or rsa_ok):
        raise CredentialError(f"{where}: key type not accepted (ours: EC P-256 or P-384, RSA "
                              "3072 bits or more)")
    if not isinstance(csr.signature_hash_algorithm, hashes.SHA256 | hashes.SHA384
                      | hashes.SHA512):
        raise CredentialError(f"{where}: signed with a weak or unknown hash "
                              f"({csr.signature_hash_algorithm}); use SHA-256 or better")
    return key


def _csr_common_name(csr: x509.CertificateSigningRequest) -> str | None:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else None


def sign_request(
    out_dir: str | Path, csr_path: str | Path, client_id: str, days: int | None = None, *,
    ca_passphrase: bytes | None = None, out: str | Path | None = None,
) -> Path:
    """The operator issues a client certificate from a CSR; returns the certificate's path.

    Reads only the CSR: the key stays on the client. Checks the CSR's self-signature (proof of
    possession), key type and hash, that its subject CN (if any) is ``client_id``, that the id
    was never issued and that the key is not already certified for another id. The
    certificate gets our client profile (CN and OU, ``clientAuth``, ``CA=false``, the SPIFFE
    SAN); any extension in the CSR (CA rights, other usages, extra names) is ignored.
    Written to ``clients/<id>.pem`` (or ``out``).
    """
    paths = FederationPaths(Path(out_dir))
    validate_client_id(client_id)
    csr = _load_csr(csr_path)
    public_key = _check_request_key(csr, str(csr_path))
    cn = _csr_common_name(csr)
    if cn is not None and cn != client_id:
        raise CredentialError(f"{csr_path} asks for {cn!r}, not {client_id!r}: check that this "
                              "is the right request")
    index = _read_index(paths)
    _check_new_id(index, client_id)
    spki = _spki_digest(public_key)
    holders = [c for c, e in index["credentials"].items()
               if isinstance(e, dict) and e.get("spki_sha256") == spki]
    if holders:
        raise CredentialError(f"{csr_path}: this key is already certified for {holders[0]!r}; "
                              "each member needs its own key")
    days = _check_days(index.get("days", 365) if days is None else days)
    ca_cert, ca_key = _load_ca(paths, ca_passphrase)
    cert = _issue_leaf(ca_cert, ca_key, public_key, _name(client_id, "client"),
                       ExtendedKeyUsageOID.CLIENT_AUTH, days, [_identity_uri("client", client_id)])
    target = Path(out) if out is not None else paths.client_cert(client_id)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(target, _cert_pem(cert), private=False)
    index["credentials"][client_id] = _index_entry("client", cert)
    _write_index(paths, index)
    return target


# --- revocation --------------------------------------------------------------------------------

def _reissue_crl(paths: FederationPaths, index: dict, ca_cert: x509.Certificate,
                 ca_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    entries: list[tuple[int, str | None, dt.datetime]] = [
        (int(r["serial"], 16), cid, dt.datetime.fromisoformat(r["date"]))
        for cid, r in index.get("revoked", {}).items()]
    entries += [(int(r["serial"], 16), None, dt.datetime.fromisoformat(r["date"]))
                for r in index.get("revoked_servers", [])]
    index["crl_number"] = int(index.get("crl_number", 1)) + 1
    crl = _make_crl(ca_cert, ca_key, entries, number=index["crl_number"],
                    server_generation=int(index.get("server_generation", 1)))
    # CRL first: if the index write fails the credential is revoked anyway, never the reverse.
    _write(paths.crl, crl.public_bytes(serialization.Encoding.PEM), private=False)
    _write_index(paths, index)


def revoke(out_dir: str | Path, client_id: str, *, ca_passphrase: bytes | None = None) -> int:
    """Revoke a client's (or the operator's) certificate: reissue the signed CRL with it added.

    Returns the revoked serial number. The server must reload ``crl.pem`` to apply it (it does,
    within a second, when the file changes).
    """
    paths = FederationPaths(Path(out_dir))
    if client_id != OPERATOR_ID:
        validate_client_id(client_id)
    index = _read_index(paths)
    entry = index["credentials"].get(client_id)
    if not isinstance(entry, dict) or entry.get("role") not in ("client", "operator"):
        raise CredentialError(f"no client credential {client_id!r} in {paths.index}; the server "
                              "certificate is revoked with renew_server ('certs renew-server')")
    revoked: dict[str, dict[str, str]] = index.setdefault("revoked", {})
    if client_id in revoked:
        raise CredentialError(f"client {client_id!r} is already revoked")
    ca_cert, ca_key = _load_ca(paths, ca_passphrase)
    revoked[client_id] = {"serial": str(entry["serial"]), "date": _now().isoformat()}
    _reissue_crl(paths, index, ca_cert, ca_key)
    return int(str(entry["serial"]), 16)


def _current_server_names(paths: FederationPaths) -> list[str]:
    try:
        cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        raise CredentialError(f"cannot read the server names from {paths.server_cert}; give "
                              "them (--server-name)") from None
    suffix = f".server.{TRUST_DOMAIN}.invalid"
    return [*(n for n in san.get_values_for_type(x509.DNSName) if not n.endswith(suffix)),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def renew_server(
    out_dir: str | Path, *, csr: str | Path | None = None,
    server_names: Sequence[str] | None = None, days: int | None = None,
    ca_passphrase: bytes | None = None,
) -> tuple[int, int]:
    """Revoke the current server certificate and issue the next generation.

    The new certificate's key comes from the server host's CSR (``csr``, made with
    ``request_certificate(role="server")``; ``server.key`` here is then removed, it belongs to
    the revoked certificate) or, without one, is generated here as ``server.key``. Server names
    default to the current certificate's. The reissued CRL carries the new generation: clients
    that load it accept only the new certificate. Returns (revoked serial, new generation).
    """
    paths = FederationPaths(Path(out_dir))
    index = _read_index(paths)
    entry = index["credentials"].get("server")
    if not isinstance(entry, dict) or entry.get("role") != "server":
        raise CredentialError(f"no server credential in {paths.index}")
    names = list(server_names) if server_names else _current_server_names(paths)
    generation = int(index.get("server_generation", 1)) + 1
    san = _server_san(names, generation)
    days = _check_days(index.get("days", 365) if days is None else days)
    new_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None
    if csr is not None:
        request = _load_csr(csr)
        public_key = _check_request_key(request, str(csr))
    else:
        new_key = _new_key(str(index.get("key_type", "ec-p256")))
        public_key = new_key.public_key()
    if _spki_digest(public_key) == entry.get("spki_sha256"):
        raise CredentialError("the new server certificate needs a new key: the current one is "
                              "being revoked")
    ca_cert, ca_key = _load_ca(paths, ca_passphrase)
    cert = _issue_leaf(ca_cert, ca_key, public_key, _name(names[0], "server"),
                       ExtendedKeyUsageOID.SERVER_AUTH, days, san)
    old_serial = int(str(entry["serial"]), 16)
    index.setdefault("revoked_servers", []).append(
        {"serial": str(entry["serial"]), "date": _now().isoformat(),
         "generation": generation - 1})
    index["server_generation"] = generation
    index["credentials"]["server"] = _index_entry("server", cert)
    if new_key is not None:
        _write(paths.server_key, _key_pem(new_key), private=True)
    else:
        paths.server_key.unlink(missing_ok=True)
    _write(paths.server_cert, _cert_pem(cert), private=False)
    _reissue_crl(paths, index, ca_cert, ca_key)
    return old_serial, generation


def read_revocations(path: str | Path, ca_cert: str | Path | None = None) -> Revocations:
    """Load a CRL, verify it against the CA, and return what it revokes.

    ``ca_cert`` defaults to ``ca.pem`` beside the CRL. Raises CredentialError if the CRL is not
    issued and signed by that CA, is past its next update, or has no CRL number: an unverified
    or unorderable list is never trusted.
    """
    path = Path(path)
    ca_path = Path(ca_cert) if ca_cert is not None else path.parent / "ca.pem"
    try:
        raw = path.read_bytes()
        crl = x509.load_pem_x509_crl(raw)
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    except OSError as exc:
        raise CredentialError(f"cannot read {exc.filename}: {exc.strerror}") from None
    except ValueError as exc:
        raise CredentialError(f"{path} or {ca_path} is not valid PEM: {exc}") from None
    if crl.issuer != ca.subject:
        raise CredentialError(f"{path} was not issued by the CA in {ca_path}")
    if not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise CredentialError(f"{path} is not signed by the CA in {ca_path}")
    next_update = crl.next_update_utc
    if next_update is None or next_update < _now():
        raise CredentialError(f"{path} is stale (next update {next_update}); reissue it with "
                              "'fedmosaic certs revoke' or a new federation")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        raise CredentialError(f"{path} has no CRL number, so a replayed older list could not be "
                              "told apart; reissue it with this version of fedmosaic") from None
    generation = None
    for ext in crl.extensions:
        if ext.oid == SERVER_GENERATION_OID and isinstance(ext.value, x509.UnrecognizedExtension):
            generation = _der_uint_decode(ext.value.value)
            if generation is None:
                raise CredentialError(f"{path} has a malformed server generation")
    serials: set[int] = set()
    ids: set[str] = set()
    for entry in crl:
        serials.add(entry.serial_number)
        for ext in entry.extensions:
            if ext.oid == CLIENT_ID_OID and isinstance(ext.value, x509.UnrecognizedExtension):
                cid = _decode_id(ext.value.value)
                if cid is not None:
                    ids.add(cid)
    digest = hashlib.sha256(crl.public_bytes(serialization.Encoding.DER)).hexdigest()
    return Revocations(frozenset(serials), frozenset(ids), crl.last_update_utc, next_update,
                       number=number, server_generation=generation, digest=digest)


def load_revoked(path: str | Path, ca_cert: str | Path | None = None) -> set[str]:
    """Client ids (certificate CNs) revoked by the CRL at ``path``, after verifying its signature.

    Compare the CN the server reads from the verified mTLS peer against this set. Ids are never
    reissued, so this equals a check by serial; ``read_revocations`` also returns the serials.
    """
    return set(read_revocations(path, ca_cert).ids)


def certificate_id(cert_pem: bytes) -> str:
    """The client id (subject CN) of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise CredentialError("certificate subject has no single common name")
    return str(names[0].value)


def list_credentials(out_dir: str | Path) -> list[CredentialInfo]:
    """Every credential issued in a federation, with serial, expiry and revocation state."""
    paths = FederationPaths(Path(out_dir))
    index = _read_index(paths)
    revoked_serials = read_revocations(paths.crl, paths.ca_cert).serials
    out = []
    for cid, entry in sorted(index["credentials"].items()):
        serial = int(str(entry["serial"]), 16)
        out.append(CredentialInfo(
            id=cid, role=str(entry["role"]), serial=serial,
            not_after=dt.datetime.fromisoformat(str(entry["not_after"])),
            revoked=serial in revoked_serials))
    return out
