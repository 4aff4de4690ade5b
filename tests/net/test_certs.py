"""Federation credentials: certificate profile, chain verification, CRL revocation, mTLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from typer.testing import CliRunner

from fedmosaic.cli import app
from fedmosaic.core.errors import ConfigError
from fedmosaic.net import certs
from fedmosaic.net.certs import FederationPaths

CLIENTS = ["hospital-a", "hospital_b", "c.3"]


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _store(paths: FederationPaths) -> Store:
    return Store([_cert(paths.ca_cert)])


def _verify_client(paths: FederationPaths, leaf: x509.Certificate) -> None:
    PolicyBuilder().store(_store(paths)).build_client_verifier().verify(leaf, [])


def _verify_server(paths: FederationPaths, leaf: x509.Certificate,
                   name: x509.DNSName | x509.IPAddress) -> None:
    PolicyBuilder().store(_store(paths)).build_server_verifier(name).verify(leaf, [])


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationPaths:
    return certs.create_federation(tmp_path_factory.mktemp("fed") / "federation", CLIENTS,
                                   ca_passphrase=None)


@pytest.fixture
def fresh(tmp_path: Path) -> FederationPaths:
    return certs.create_federation(tmp_path / "fed", ["a", "b"], ca_passphrase=None)


def test_files_and_private_key_permissions(fed: FederationPaths) -> None:
    keys = [fed.ca_key, fed.server_key, fed.operator_key] + [fed.client_key(c) for c in CLIENTS]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert b"PRIVATE KEY" in key.read_bytes()
    for cert in [fed.ca_cert, fed.server_cert, fed.operator_cert, fed.crl]:
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644, cert
    assert stat.S_IMODE(fed.clients_dir.stat().st_mode) == 0o700
    assert certs.load_revoked(fed.crl) == set()  # the CRL starts empty but valid


def test_ca_profile(fed: FederationPaths) -> None:
    ca = _cert(fed.ca_cert)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature


def test_server_certificate_chain_san_and_eku(fed: FederationPaths) -> None:
    server = _cert(fed.server_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The real name, then the generation name that clients pin (revocable server certificate).
    assert san.get_values_for_type(x509.DNSName) == ["localhost",
                                                      "gen-1.server.fedmosaic.invalid"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    _verify_server(fed, server, x509.DNSName("localhost"))
    _verify_server(fed, server, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    with pytest.raises(VerificationError):  # a name not in the SAN
        _verify_server(fed, server, x509.DNSName("evil.example"))
    with pytest.raises(VerificationError):  # serverAuth only: not usable as a client
        _verify_client(fed, server)


def test_client_and_operator_certificates(fed: FederationPaths) -> None:
    for cid in CLIENTS:
        leaf = _cert(fed.client_cert(cid))
        _verify_client(fed, leaf)
        assert certs.certificate_id(fed.client_cert(cid).read_bytes()) == cid
        unit = leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
        assert unit == "client"
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://fedmosaic/client/{cid}"]
        with pytest.raises(VerificationError):  # clientAuth only: cannot impersonate the server
            _verify_server(fed, leaf, x509.DNSName("localhost"))
        # The key file holds the private half of the certificate's public key.
        key = serialization.load_pem_private_key(fed.client_key(cid).read_bytes(), None)
        assert key.public_key() == leaf.public_key()
    op = _cert(fed.operator_cert)
    _verify_client(fed, op)
    assert certs.certificate_id(fed.operator_cert.read_bytes()) == certs.OPERATOR_ID


def test_other_ca_does_not_verify(fed: FederationPaths, tmp_path: Path) -> None:
    other = certs.create_federation(tmp_path / "other", ["hospital-a"], ca_passphrase=None)
    with pytest.raises(VerificationError):
        _verify_client(fed, _cert(other.client_cert("hospital-a")))


@pytest.mark.parametrize("key_type", ["ec-p384", "rsa-3072"])
def test_other_key_types(tmp_path: Path, key_type: str) -> None:
    paths = certs.create_federation(tmp_path / "f", ["a"], key_type=key_type,  # type: ignore[arg-type]
                                    ca_passphrase=None)
    _verify_client(paths, _cert(paths.client_cert("a")))
    _verify_server(paths, _cert(paths.server_cert), x509.DNSName("localhost"))


def test_custom_server_names(tmp_path: Path) -> None:
    paths = certs.create_federation(tmp_path / "f", ["a"],
                                    server_names=["fl.example.org", "10.0.0.7", "::1"],
                                    ca_passphrase=None)
    server = _cert(paths.server_cert)
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fl.example.org"
    for name in (x509.DNSName("fl.example.org"),
                 x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
                 x509.IPAddress(ipaddress.ip_address("::1"))):
        _verify_server(paths, server, name)
    with pytest.raises(ConfigError, match="server_names"):
        certs.create_federation(tmp_path / "g", ["a"], server_names=["bad name!"],
                                ca_passphrase=None)


def test_revoke_then_load_revoked(fresh: FederationPaths) -> None:
    serial = certs.revoke(fresh.root, "a")
    assert serial == _cert(fresh.client_cert("a")).serial_number
    assert certs.load_revoked(fresh.crl) == {"a"}
    rev = certs.read_revocations(fresh.crl)
    assert rev.serials == {serial}
    # The CRL is a standard one: issuer, signature and entry are readable by any X.509 tool.
    crl = x509.load_pem_x509_crl(fresh.crl.read_bytes())
    assert crl.is_signature_valid(_cert(fresh.ca_cert).public_key())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    certs.revoke(fresh.root, "b")
    assert certs.load_revoked(fresh.crl) == {"a", "b"}
    listed = {c.id: c for c in certs.list_credentials(fresh.root)}
    assert listed["a"].revoked and listed["b"].revoked and not listed["operator"].revoked
    assert listed["a"].serial == serial and listed["server"].role == "server"
    with pytest.raises(certs.CredentialError, match="already revoked"):
        certs.revoke(fresh.root, "a")
    with pytest.raises(certs.CredentialError, match="no client credential"):
        certs.revoke(fresh.root, "nobody")
    with pytest.raises(ConfigError, match="reserved"):
        certs.revoke(fresh.root, "server")
    with pytest.raises(certs.CredentialError, match="never reused"):
        certs.add_client(fresh.root, "a")  # a revoked id is never reissued


def test_revoke_by_id_works_without_the_client_files(fresh: FederationPaths) -> None:
    serial = _cert(fresh.client_cert("b")).serial_number
    fresh.client_cert("b").unlink()  # handed over to the client and deleted here
    fresh.client_key("b").unlink()
    assert certs.revoke(fresh.root, "b") == serial


def test_crl_signed_by_another_key_is_refused(fresh: FederationPaths, tmp_path: Path) -> None:
    # Same CA subject name, different key: only the signature check can tell them apart.
    other = certs.create_federation(tmp_path / "other", ["a"], ca_passphrase=None)
    certs.revoke(other.root, "a")
    assert _cert(other.ca_cert).subject == _cert(fresh.ca_cert).subject
    with pytest.raises(certs.CredentialError, match="not signed by the CA"):
        certs.load_revoked(other.crl, ca_cert=fresh.ca_cert)
    # A CRL from an unrelated issuer name is refused before its signature is checked.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "ca.pem").write_bytes(fresh.ca_cert.read_bytes())
    crl = x509.load_pem_x509_crl(other.crl.read_bytes())
    (foreign / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(certs.CredentialError):
        certs.load_revoked(foreign / "crl.pem")


def test_tampered_or_garbage_crl_is_refused(fresh: FederationPaths) -> None:
    certs.revoke(fresh.root, "a")
    der = bytearray(x509.load_pem_x509_crl(fresh.crl.read_bytes())
                    .public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # flip a bit in the signature
    fresh.crl.write_bytes(b"-----BEGIN X509 CRL-----\n" + _b64(bytes(der))
                          + b"\n-----END X509 CRL-----\n")
    with pytest.raises(certs.CredentialError):
        certs.load_revoked(fresh.crl)
    fresh.crl.write_bytes(b"not a crl")
    with pytest.raises(certs.CredentialError, match="not valid PEM"):
        certs.load_revoked(fresh.crl)
    fresh.crl.unlink()
    with pytest.raises(certs.CredentialError, match="cannot read"):
        certs.load_revoked(fresh.crl)


def _b64(data: bytes) -> bytes:
    import base64

    return base64.encodebytes(data).strip()


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "-dash", "a b", "a\x00",
                                 "x" * 65, "operator", "Server", "ca", 7, None])
def test_bad_client_ids_are_refused(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ConfigError, match="client_id"):
        certs.create_federation(tmp_path / "f", ["ok", bad], ca_passphrase=None)  # type: ignore[list-item]
    assert not (tmp_path / "f").exists()  # validated before anything is written


def test_duplicate_ids_and_bad_arguments(tmp_path: Path, fresh: FederationPaths) -> None:
    with pytest.raises(ConfigError, match="unique"):
        certs.create_federation(tmp_path / "f", ["a", "b", "A"], ca_passphrase=None)
    with pytest.raises(ConfigError, match="clients"):
        certs.create_federation(tmp_path / "f", "abc", ca_passphrase=None)
    with pytest.raises(ConfigError, match="days"):
        certs.create_federation(tmp_path / "f", ["a"], days=0, ca_passphrase=None)
    with pytest.raises(ConfigError, match="key_type"):
        certs.create_federation(tmp_path / "f", ["a"], key_type="dsa", ca_passphrase=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="client_id"):
        certs.add_client(fresh.root, "../../etc/passwd")
    with pytest.raises(certs.CredentialError, match="already issued"):
        certs.add_client(fresh.root, "B")  # same file as 'b' on case-insensitive systems
    with pytest.raises(certs.CredentialError, match="holds no federation"):
        certs.add_client(tmp_path / "nowhere", "a")


def test_existing_federation_is_not_overwritten(fresh: FederationPaths) -> None:
    before = fresh.ca_cert.read_bytes()
    with pytest.raises(certs.CredentialError, match="already holds a federation"):
        certs.create_federation(fresh.root, ["x"], ca_passphrase=None)
    assert fresh.ca_cert.read_bytes() == before
    certs.create_federation(fresh.root, ["x"], overwrite=True, ca_passphrase=None)
    assert fresh.ca_cert.read_bytes() != before
    assert not fresh.client_cert("a").exists()  # the old federation's credentials are gone
    assert [c.id for c in certs.list_credentials(fresh.root)] == ["operator", "server", "x"]


def test_add_client_issues_a_verifiable_credential(fresh: FederationPaths) -> None:
    cert_path, key_path = certs.add_client(fresh.root, "late-joiner", days=30)
    leaf = _cert(cert_path)
    _verify_client(fresh, leaf)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    lifetime = leaf.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)
    assert "late-joiner" in {c.id for c in certs.list_credentials(fresh.root)}


def test_passphrase_protected_ca_key(tmp_path: Path) -> None:
    paths = certs.create_federation(tmp_path / "f", ["a"], ca_passphrase=b"correct horse")
    assert certs.ca_key_is_encrypted(paths.root)
    assert b"BEGIN PRIVATE" not in paths.ca_key.read_bytes()
    with pytest.raises(certs.CredentialError, match="is encrypted: give its passphrase"):
        certs.add_client(paths.root, "b")
    with pytest.raises(certs.CredentialError, match="wrong passphrase"):
        certs.revoke(paths.root, "a", ca_passphrase=b"wrong passphrase")
    certs.add_client(paths.root, "b", ca_passphrase=b"correct horse")
    certs.revoke(paths.root, "a", ca_passphrase=b"correct horse")
    assert certs.load_revoked(paths.crl) == {"a"}


def test_cli_never_prints_key_material(tmp_path: Path) -> None:
    runner = CliRunner(env={"FEDMOSAIC_CA_PASSPHRASE": "correct horse battery"})
    out = tmp_path / "fed"
    results = [
        runner.invoke(app, ["certs", "init", "--out", str(out), "--clients", "a,b",
                            "--server-name", "localhost", "--server-name", "10.1.2.3"]),
        runner.invoke(app, ["certs", "add-client", "c", "--dir", str(out)]),
        runner.invoke(app, ["certs", "revoke", "b", "--dir", str(out)]),
        runner.invoke(app, ["certs", "list", "--dir", str(out)]),
    ]
    for r in results:
        assert r.exit_code == 0, r.output
        assert "BEGIN" not in r.output and "PRIVATE" not in r.output
        assert "correct horse" not in r.output
    assert certs.ca_key_is_encrypted(out)  # encrypted by default
    listing = results[-1].output
    serial_b = format(_cert(out / "clients" / "b.pem").serial_number, "x")
    assert serial_b in listing and "yes" in listing
    assert certs.load_revoked(out / "crl.pem") == {"b"}
    again = runner.invoke(app, ["certs", "init", "--out", str(out), "--clients", "z"])
    assert again.exit_code == 2 and "already holds a federation" in again.output
    bad = runner.invoke(app, ["certs", "add-client", "../evil", "--dir", str(out)])
    assert bad.exit_code == 2 and "client_id" in bad.output


# --- a real mTLS handshake over loopback gRPC -------------------------------------------------

def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    # The server reads the client id from the verified peer certificate.
    return context.auth_context()["x509_common_name"][0]


@pytest.fixture
def mtls_server(fed: FederationPaths):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "test.Identity", {"WhoAmI": grpc.unary_unary_rpc_method_handler(_whoami)})
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [(fed.server_key.read_bytes(), fed.server_cert.read_bytes())],
        root_certificates=fed.ca_cert.read_bytes(), require_client_auth=True)
    port = server.add_secure_port("localhost:0", creds)
    server.start()
    yield port
    server.stop(grace=None)


def _call(target: str, ca: Path, cert: Path | None = None, key: Path | None = None) -> bytes:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None)
    with grpc.secure_channel(target, creds) as channel:
        return channel.unary_unary("/test.Identity/WhoAmI")(b"", timeout=10)


def test_mtls_handshake_accepts_federation_clients(mtls_server: int,
                                                   fed: FederationPaths) -> None:
    cid = CLIENTS[0]
    assert _call(f"localhost:{mtls_server}", fed.ca_cert, fed.client_cert(cid),
                 fed.client_key(cid)) == cid.encode()
    # The IP SAN lets clients dial the address directly.
    assert _call(f"127.0.0.1:{mtls_server}", fed.ca_cert, fed.operator_cert,
                 fed.operator_key) == b"operator"


def test_mtls_handshake_refuses_strangers(mtls_server: int, fed: FederationPaths,
                                          tmp_path: Path) -> None:
    other = certs.create_federation(tmp_path / "other", [CLIENTS[0]], ca_passphrase=None)
    target = f"localhost:{mtls_server}"
    with pytest.raises(grpc.RpcError) as no_cert:
        _call(target, fed.ca_cert)
    assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as foreign:  # same id, certificate from another CA
        _call(target, fed.ca_cert, other.client_cert(CLIENTS[0]), other.client_key(CLIENTS[0]))
    assert foreign.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as wrong_server:  # client trusting another CA
        _call(target, other.ca_cert, other.client_cert(CLIENTS[0]),
              other.client_key(CLIENTS[0]))
    assert wrong_server.value.code() == grpc.StatusCode.UNAVAILABLE
