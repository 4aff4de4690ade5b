"""Credential hardening: certificate requests, the encrypted CA key, CRL ordering, and a
revocable server certificate checked by clients over real gRPC handshakes."""

from __future__ import annotations

import base64
import shutil
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from typer.testing import CliRunner

from fedmosaic.cli import app
from fedmosaic.core.errors import ConfigError
from fedmosaic.net import certs, sealed_key
from fedmosaic.net.auth import Peer, RevocationList, pinned_server_name, server_credentials
from fedmosaic.net.certs import CredentialError, FederationPaths
from fedmosaic.net.client import open_channel
from fedmosaic.net.errors import Refused

PASS = b"correct horse battery staple"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _verify_client(paths: FederationPaths, leaf: x509.Certificate) -> None:
    store = Store([_cert(paths.ca_cert)])
    PolicyBuilder().store(store).build_client_verifier().verify(leaf, [])


@pytest.fixture
def fed(tmp_path: Path) -> FederationPaths:
    # Unencrypted here: the sealed CA key costs a deliberate ~0.3 s per use (tested below).
    return certs.create_federation(tmp_path / "fed", ["a"], ca_passphrase=None)


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str | None,
         extensions: list[x509.ExtensionType] | None = None, unit: str = "client"
         ) -> x509.CertificateSigningRequest:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Corp"),
             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit)]
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    for ext in extensions or []:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA256())


def _write_csr(path: Path, csr: x509.CertificateSigningRequest) -> Path:
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


# --- certificate requests --------------------------------------------------------------------

def test_request_and_sign_keep_the_key_with_its_owner(fed: FederationPaths,
                                                      tmp_path: Path) -> None:
    client_dir, inbox = tmp_path / "hospital-b-machine", tmp_path / "operator-inbox"
    key_path, csr_path = certs.request_certificate(client_dir, "hospital-b")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in csr_path.read_bytes()
    inbox.mkdir()
    shutil.copy(csr_path, inbox / "hospital-b.csr")  # only the CSR travels
    cert_path = certs.sign_request(fed.root, inbox / "hospital-b.csr", "hospital-b")
    assert cert_path == fed.client_cert("hospital-b")
    leaf = _cert(cert_path)
    _verify_client(fed, leaf)
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert leaf.public_key() == key.public_key()
    assert not fed.client_key("hospital-b").exists()
    # The key exists nowhere on the operator's side.
    secret = key_path.read_bytes()
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    for f in [*fed.root.rglob("*"), *inbox.rglob("*")]:
        if f.is_file():
            data = f.read_bytes()
            assert secret not in data and der not in data, f
    assert {c.id for c in certs.list_credentials(fed.root)} >= {"a", "hospital-b"}
    with pytest.raises(CredentialError, match="already issued"):
        certs.sign_request(fed.root, inbox / "hospital-b.csr", "hospital-b")


def test_our_profile_whatever_the_request_asks(fed: FederationPaths, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    greedy = _csr(key, "hospital-z", unit="operator", extensions=[
        x509.BasicConstraints(ca=True, path_length=None),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CODE_SIGNING,
                               ExtendedKeyUsageOID.CLIENT_AUTH]),
        x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                     x509.DNSName(certs.server_generation_name(1)),
                                     x509.UniformResourceIdentifier(
                                         "spiffe://fedmosaic/operator/operator")]),
        x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                      data_encipherment=False, key_agreement=False, key_cert_sign=True,
                      crl_sign=True, encipher_only=False, decipher_only=False),
    ])
    leaf = _cert(certs.sign_request(fed.root, _write_csr(tmp_path / "z.csr", greedy),
                                    "hospital-z"))
    ext = leaf.extensions
    assert not ext.get_extension_for_class(x509.BasicConstraints).value.ca
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign and not usage.crl_sign
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://fedmosaic/client/hospital-z")]
    assert leaf.subject == certs._name("hospital-z", "client")  # not the requested O and OU
    server_name = x509.DNSName(certs.server_generation_name(1))
    with pytest.raises(VerificationError):  # cannot pose as the server
        PolicyBuilder().store(Store([_cert(fed.ca_cert)])).build_server_verifier(
            server_name).verify(leaf, [])


def test_bad_requests_are_refused(fed: FederationPaths, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    good = _csr(key, "hospital-q")
    der = good.public_bytes(serialization.Encoding.DER)
    # One byte of the subject changed after signing: the self-signature no longer verifies.
    (tmp_path / "tampered.csr").write_bytes(der.replace(b"hospital-q", b"hospital-r"))
    with pytest.raises(CredentialError, match="signature does not verify"):
        certs.sign_request(fed.root, tmp_path / "tampered.csr", "hospital-r")
    with pytest.raises(CredentialError, match="asks for 'hospital-q', not 'hospital-x'"):
        certs.sign_request(fed.root, _write_csr(tmp_path / "q.csr", good), "hospital-x")
    weak = _csr(rsa.generate_private_key(public_exponent=65537, key_size=2048), "hospital-w")
    with pytest.raises(CredentialError, match="key type not accepted"):
        certs.sign_request(fed.root, _write_csr(tmp_path / "w.csr", weak), "hospital-w")
    with pytest.raises(CredentialError, match="ids are never reused"):
        certs.sign_request(fed.root, _write_csr(tmp_path / "a.csr", _csr(key, None)), "a")
    # One key, two ids: refused (each member needs its own key).
    anonymous = _write_csr(tmp_path / "anon.csr", _csr(key, None))
    certs.sign_request(fed.root, anonymous, "first")
    with pytest.raises(CredentialError, match="already certified for 'first'"):
        certs.sign_request(fed.root, anonymous, "second")
    bundle = tmp_path / "bundle.pem"  # a client that sends its key along is told not to
    bundle.write_bytes(good.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(CredentialError, match="contains a private key"):
        certs.sign_request(fed.root, bundle, "hospital-q")
    (tmp_path / "junk.csr").write_bytes(b"not a request")
    with pytest.raises(CredentialError, match="not a certificate signing request"):
        certs.sign_request(fed.root, tmp_path / "junk.csr", "hospital-j")


def test_cli_request_and_sign(tmp_path: Path) -> None:
    env = {"FEDMOSAIC_CA_PASSPHRASE": PASS.decode()}
    runner = CliRunner()
    fed = tmp_path / "fed"
    init = runner.invoke(app, ["certs", "init", "--out", str(fed), "--clients", ""], env=env)
    assert init.exit_code == 0, init.output
    client = tmp_path / "client"
    req = runner.invoke(app, ["certs", "request", "site-7", "--out", str(client)], env={})
    assert req.exit_code == 0, req.output
    assert (client / "site-7.key").exists() and (client / "site-7.csr").exists()
    no_pass = runner.invoke(app, ["certs", "sign", str(client / "site-7.csr"), "--id", "site-7",
                                  "--dir", str(fed)], env={"FEDMOSAIC_CA_PASSPHRASE": ""})
    assert no_pass.exit_code == 2 and "needs a passphrase" in no_pass.output
    pass_file = tmp_path / "pass.txt"
    pass_file.write_bytes(PASS + b"\n")
    signed = runner.invoke(app, ["certs", "sign", str(client / "site-7.csr"), "--id", "site-7",
                                 "--dir", str(fed), "--passphrase-file", str(pass_file)],
                           env={"FEDMOSAIC_CA_PASSPHRASE": ""})
    assert signed.exit_code == 0, signed.output
    renewed = runner.invoke(app, ["certs", "renew-server", "--dir", str(fed),
                                  "--passphrase-file", str(pass_file)])
    assert renewed.exit_code == 0 and "generation 2" in renewed.output, renewed.output
    for r in (init, req, signed, renewed):
        assert "PRIVATE" not in r.output and PASS.decode() not in r.output
    _verify_client(FederationPaths(fed), _cert(fed / "clients" / "site-7.pem"))
    assert certs.read_revocations(fed / "crl.pem").server_generation == 2


# --- the CA key --------------------------------------------------------------------------------

def test_ca_key_is_encrypted_by_default(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "fed"
    # No passphrase source and no terminal: refused before anything is written.
    refused = runner.invoke(app, ["certs", "init", "--out", str(out), "--clients", "a"],
                            env={"FEDMOSAIC_CA_PASSPHRASE": ""})
    assert refused.exit_code == 2 and "needs a passphrase" in refused.output
    assert not out.exists()
    ok = runner.invoke(app, ["certs", "init", "--out", str(out), "--clients", "a"],
                       env={"FEDMOSAIC_CA_PASSPHRASE": PASS.decode()})
    assert ok.exit_code == 0, ok.output
    raw = (out / "ca.key").read_bytes()
    assert b"BEGIN PRIVATE" not in raw and stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    with pytest.raises(ValueError):  # not a plaintext key in any form
        serialization.load_pem_private_key(raw, None)
    with pytest.raises(ValueError):
        serialization.load_der_private_key(raw, None)
    assert sealed_key.is_sealed(raw)
    with pytest.raises(sealed_key.SealedKeyError, match="wrong passphrase"):
        sealed_key.unseal(raw, b"not the passphrase")
    key = serialization.load_der_private_key(sealed_key.unseal(raw, PASS), None)
    assert key.public_key() == _cert(out / "ca.pem").public_key()
    body = bytearray(base64.b64decode(b"".join(raw.splitlines()[1:-1])))
    for i in (4, 10, 30, len(body) - 1):  # scrypt N, salt, nonce, tag: all authenticated
        altered = bytearray(body)
        altered[i] ^= 1
        armoured = b"\n".join([raw.splitlines()[0], base64.b64encode(bytes(altered)),
                               raw.splitlines()[-1]])
        with pytest.raises(sealed_key.SealedKeyError):
            sealed_key.unseal(armoured, PASS)
    with pytest.raises(CredentialError, match="is encrypted: give its passphrase"):
        certs.add_client(out, "b")
    with pytest.raises(CredentialError, match="wrong passphrase"):
        certs.revoke(out, "a", ca_passphrase=b"not the passphrase")
    certs.revoke(out, "a", ca_passphrase=PASS)
    plain = runner.invoke(app, ["certs", "init", "--out", str(tmp_path / "t"), "--clients", "a",
                                "--no-passphrase"], env={"FEDMOSAIC_CA_PASSPHRASE": ""})
    assert plain.exit_code == 0 and "UNENCRYPTED" in plain.output
    assert (tmp_path / "t" / "ca.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_ca_key_encrypted_by_an_older_version_still_loads(tmp_path: Path) -> None:
    fed = certs.create_federation(tmp_path / "fed", ["a"], ca_passphrase=None)
    key = serialization.load_pem_private_key(fed.ca_key.read_bytes(), None)
    fed.ca_key.write_bytes(key.private_bytes(  # encrypted PKCS#8 PEM, as before sealing
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASS)))
    assert certs.ca_key_is_encrypted(fed.root)
    with pytest.raises(CredentialError, match="wrong passphrase"):
        certs.add_client(fed.root, "b", ca_passphrase=b"not the passphrase")
    certs.add_client(fed.root, "b", ca_passphrase=PASS)


def test_library_makes_the_choice_explicit(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="ca_passphrase"):
        certs.create_federation(tmp_path / "f", ["a"])  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="ca_passphrase"):
        certs.create_federation(tmp_path / "f", ["a"], ca_passphrase=b"short")
    assert not (tmp_path / "f").exists()


# --- CRL numbers -------------------------------------------------------------------------------

def _peer(cid: str, fed: FederationPaths) -> Peer:
    return Peer(cid, "client", _cert(fed.client_cert(cid)).serial_number)


def test_older_or_equal_numbered_crl_is_refused_and_restart_keeps_it(tmp_path: Path) -> None:
    fed = certs.create_federation(tmp_path / "fed", ["a", "b"], ca_passphrase=None)
    v1 = fed.crl.read_bytes()  # number 1, revokes nothing
    certs.revoke(fed.root, "a")
    v2 = fed.crl.read_bytes()  # number 2, revokes a
    crl = RevocationList(fed.crl, fed.ca_cert, check_every=0)
    assert crl.number == 2
    with pytest.raises(Refused, match="revoked"):
        crl.check(_peer("a", fed))
    fed.crl.write_bytes(v1)  # replay the older, validly signed list
    with pytest.raises(Refused) as replay:
        crl.check(_peer("a", fed))
    assert replay.value.label == "crl"  # fail closed: nobody passes, a is still out
    with pytest.raises(Refused, match="unusable"):
        crl.check(_peer("b", fed))
    with pytest.raises(ConfigError, match="older than the last accepted 2"):
        RevocationList(fed.crl, fed.ca_cert)  # a restart does not forget
    # Same number, other content (e.g. an edited list re-signed without a new number).
    ca_cert, ca_key = certs._load_ca(fed, None)
    same_number = certs._make_crl(ca_cert, ca_key, [], number=2)
    fed.crl.write_bytes(same_number.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="like the last accepted one but other content"):
        RevocationList(fed.crl, fed.ca_cert)
    fed.crl.write_bytes(v2)  # the accepted list itself is fine after a restart
    again = RevocationList(fed.crl, fed.ca_cert, check_every=0)
    again.check(_peer("b", fed))
    certs.revoke(fed.root, "b")  # a newer list is taken without a restart
    with pytest.raises(Refused, match="revoked"):
        again.check(_peer("b", fed))
    assert again.number == 3


def test_crl_without_a_number_is_refused(tmp_path: Path) -> None:
    fed = certs.create_federation(tmp_path / "fed", ["a"], ca_passphrase=None)
    ca_cert, ca_key = certs._load_ca(fed, None)
    unnumbered = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
                  .last_update(certs._now()).next_update(ca_cert.not_valid_after_utc)
                  .sign(ca_key, hashes.SHA256()))
    fed.crl.write_bytes(unnumbered.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CredentialError, match="no CRL number"):
        certs.read_revocations(fed.crl)
    with pytest.raises(ConfigError, match="no CRL number"):
        RevocationList(fed.crl, fed.ca_cert)


def test_a_new_federation_in_the_same_place_starts_numbering_afresh(tmp_path: Path) -> None:
    fed = certs.create_federation(tmp_path / "fed", ["a"], ca_passphrase=None)
    certs.revoke(fed.root, "a")
    assert RevocationList(fed.crl, fed.ca_cert).number == 2
    fed = certs.create_federation(fed.root, ["a"], ca_passphrase=None, overwrite=True)
    assert not fed.crl_state.exists()
    RevocationList(fed.crl, fed.ca_cert).check(_peer("a", fed))  # number 1 of a new CA


# --- a revocable server certificate -------------------------------------------------------------

def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    return context.auth_context()["x509_common_name"][0]


@pytest.fixture
def serve() -> Iterator:
    servers: list[grpc.Server] = []

    def start(paths: FederationPaths) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler(
            "test.Identity", {"WhoAmI": grpc.unary_unary_rpc_method_handler(_whoami)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_secure_port("127.0.0.1:0", server_credentials(paths))
        server.start()
        servers.append(server)
        return port

    yield start
    for s in servers:
        s.stop(None)


def _call(port: int, ca: Path, cert: Path, key: Path) -> grpc.StatusCode | bytes:
    channel = open_channel(f"127.0.0.1:{port}", ca, cert, key)
    try:
        return channel.unary_unary("/test.Identity/WhoAmI")(b"", timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()


def test_revoked_server_certificate_fails_the_clients_handshake(
        tmp_path: Path, serve) -> None:
    fed = certs.create_federation(tmp_path / "fed", ["a"], ca_passphrase=None)
    stolen = tmp_path / "stolen"  # what an attacker who copied the server's files holds
    stolen.mkdir()
    for name in ("ca.pem", "server.pem", "server.key"):
        shutil.copy(fed.root / name, stolen / name)
    old_client = tmp_path / "old-client"  # a client that has not received the new CRL
    old_client.mkdir()
    for name in ("ca.pem", "crl.pem"):
        shutil.copy(fed.root / name, old_client / name)
    assert pinned_server_name(fed.ca_cert) == "gen-1.server.fedmosaic.invalid"

    serial, generation = certs.renew_server(fed.root)
    assert generation == 2 and serial in certs.read_revocations(fed.crl).serials
    assert pinned_server_name(fed.ca_cert) == "gen-2.server.fedmosaic.invalid"
    old_port, new_port = serve(FederationPaths(stolen)), serve(fed)
    cert, key = fed.client_cert("a"), fed.client_key("a")
    assert _call(new_port, fed.ca_cert, cert, key) == b"a"
    assert _call(old_port, fed.ca_cert, cert, key) == grpc.StatusCode.UNAVAILABLE
    # Control: with the old CRL the old certificate is still accepted (so the refusal above
    # comes from the new CRL) and the new one is not: clients must get the new CRL.
    assert _call(old_port, old_client / "ca.pem", cert, key) == b"a"
    assert _call(new_port, old_client / "ca.pem", cert, key) == grpc.StatusCode.UNAVAILABLE


def test_renew_server_from_the_server_hosts_request(tmp_path: Path) -> None:
    fed = certs.create_federation(tmp_path / "fed", ["a"], ca_passphrase=PASS,
                                  server_names=["fl.example.org", "10.0.0.7"])
    old = _cert(fed.server_cert)
    key_path, csr_path = certs.request_certificate(tmp_path / "server-host", "fl.example.org",
                                                   role="server")
    _, generation = certs.renew_server(fed.root, csr=csr_path, ca_passphrase=PASS)
    new = _cert(fed.server_cert)
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert new.public_key() == key.public_key()
    assert not fed.server_key.exists()  # the revoked certificate's key is gone from here
    san = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org",
                                                      certs.server_generation_name(generation)]
    assert list(new.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    rev = certs.read_revocations(fed.crl)
    assert old.serial_number in rev.serials and rev.server_generation == 2
    assert rev.ids == frozenset()  # server revocations name no client
    with pytest.raises(CredentialError, match="needs a new key"):
        certs.renew_server(fed.root, csr=csr_path, ca_passphrase=PASS)


def test_client_without_or_with_a_bad_crl(tmp_path: Path, caplog) -> None:
    fed = certs.create_federation(tmp_path / "fed", ["a"], ca_passphrase=None)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(fed.ca_cert, bare / "ca.pem")
    assert pinned_server_name(bare / "ca.pem") is None
    assert "revocation cannot be checked" in caplog.text
    (bare / "crl.pem").write_bytes(fed.crl.read_bytes().replace(b"M", b"N", 1))
    with pytest.raises(ConfigError, match="a valid CRL"):
        pinned_server_name(bare / "ca.pem")
