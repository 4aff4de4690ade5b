"""Issue #18 item 4: refused TLS handshakes counted by kind, in /metrics, ``fedmosaic status``
and the logs, equal to what the test provoked (a real ``fedmosaic server`` process, real
handshakes with no certificate, a foreign CA, an expired certificate, a server certificate,
plain text and TLS 1.2); and the tap's classifier and plumbing on their own."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
import urllib.request
from pathlib import Path

import pytest

from fedmosaic.net.certs import FederationPaths
from fedmosaic.net.handshake_tap import KINDS, HandshakeTap, classify
from tests.net.conftest import (
    Processes,
    experiment_toml,
    operator_status,
    wait_for_endpoint,
    wait_until,
)
from tests.net.test_client_failfast import _expired_certificate

# Lines as grpcio's C core writes them (seen with grpcio 1.85).
NO_CERT = ("I1207 16:46:12.264462   11788 ssl_transport_security.cc:2563] Handshake failed with "
           "error SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:"
           "PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate verification context")
FOREIGN = ("I1207 16:46:12.268419   11787 ssl_transport_security.cc:2563] Handshake failed with "
           "error SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
           "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate")
GARBAGE = ("I1207 16:46:12.268921   11788 ssl_transport_security.cc:2563] Handshake failed with "
           "error SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:"
           "WRONG_VERSION_NUMBER: Invalid certificate verification context")


def test_classify_known_lines_and_ignores_others() -> None:
    assert classify(NO_CERT) == "no_certificate"
    assert classify(FOREIGN) == "unknown_ca"
    assert classify(GARBAGE) == "not_tls"
    assert classify(FOREIGN.replace("unable to get local issuer certificate",
                                    "certificate has expired")) == "expired"
    assert classify(FOREIGN.replace("unable to get local issuer certificate",
                                    "unsupported certificate purpose")) == "wrong_purpose"
    assert classify(NO_CERT.replace("PEER_DID_NOT_RETURN_A_CERTIFICATE",
                                    "NO_SHARED_CIPHER")) == "tls_version"
    assert classify("Handshake failed with error SSL_ERROR_SYSCALL: reset") == "other"
    assert classify("refused a TLS handshake (no_certificate)") is None  # our own log line
    assert classify("I1207 some other grpc line") is None
    assert set(KINDS) >= {"no_certificate", "unknown_ca", "expired", "not_tls", "other"}


def test_tap_copies_everything_through_and_counts(tmp_path: Path) -> None:
    """On a descriptor of its own (not the test process's stderr): every byte reaches the
    original file, unchanged and in order; handshake lines are counted and reported."""
    target = tmp_path / "stderr.txt"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    tap = HandshakeTap(fd=fd, burst=1)
    seen: list[str] = []
    tap.listeners.append(seen.append)
    tap.install()
    payload = f"hello\n{NO_CERT}\n{FOREIGN}\npartial line without end".encode()
    for i in range(0, len(payload), 7):  # in pieces: lines split across reads
        os.write(fd, payload[i:i + 7])
    os.write(fd, f"\n{NO_CERT}\n".encode())
    deadline = time.monotonic() + 10
    while sum(tap.counts.values()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    tap.uninstall()
    os.close(fd)
    assert tap.snapshot() == {"no_certificate": 2, "unknown_ca": 1}
    assert seen == ["no_certificate", "unknown_ca", "no_certificate"]
    wait = time.monotonic() + 5
    while time.monotonic() < wait and not target.read_bytes().endswith(b"\n"):
        time.sleep(0.02)
    assert target.read_bytes() == payload + f"\n{NO_CERT}\n".encode()


def _handshake(port: int, ctx: ssl.SSLContext) -> None:
    """One TLS handshake (and a byte of HTTP/2 preface) that the server refuses."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\n")
            tls.recv(16)
    except (ssl.SSLError, OSError):
        pass  # a refusal may surface on either side of the handshake, or not at all


def _context(ca: Path, cert: Path | None = None, key: Path | None = None,
             tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


@pytest.mark.slow
def test_refused_handshakes_are_counted_by_kind_in_metrics_status_and_logs(
        tmp_path: Path, federation: Path, foreign_federation: Path,
        processes: Processes) -> None:
    experiment = experiment_toml(tmp_path / "exp.toml", federation, rounds=1)
    out = tmp_path / "out"
    processes.server(experiment, out, "--metrics-port", "0")
    endpoint = wait_for_endpoint(out, processes)
    port = endpoint["port"]
    fed, foreign = FederationPaths(federation), FederationPaths(foreign_federation)
    late_cert, late_key, _ = _expired_certificate(fed, tmp_path / "late")
    sent = {"no_certificate": 3, "unknown_ca": 2, "expired": 2, "not_tls": 2,
            "tls_version": 1}
    for _ in range(sent["no_certificate"]):
        _handshake(port, _context(fed.ca_cert))
    for _ in range(sent["unknown_ca"]):
        _handshake(port, _context(fed.ca_cert, foreign.client_cert("client_00"),
                                  foreign.client_key("client_00")))
    for _ in range(sent["expired"]):
        _handshake(port, _context(fed.ca_cert, late_cert, late_key))
    for _ in range(sent["not_tls"]):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(OSError):
                raw.recv(16)
    for _ in range(sent["tls_version"]):
        _handshake(port, _context(fed.ca_cert, fed.client_cert("client_00"),
                                  fed.client_key("client_00"), tls12=True))

    def counted() -> dict[str, int]:
        return operator_status(federation, port)["tls_handshake_failures"]

    wait_until(lambda: sum(counted().values()) >= sum(sent.values()), 60,
               "the handshake counts", processes)
    time.sleep(0.5)  # nothing more arrives
    assert counted() == sent
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{endpoint['metrics_port']}/metrics", timeout=10).read().decode()
    for kind in KINDS:
        assert (f'fedmosaic_tls_handshake_failures_total{{kind="{kind}"}} '
                f'{float(sent.get(kind, 0))}') in metrics, kind
    log = processes.log("server")
    for kind in sent:
        assert f"refused a TLS handshake ({kind})" in log
    # The operator's own successful calls were not counted as failures, and the status
    # command prints the counts too.
    assert operator_status(federation, port)["tls_handshake_failures"] == sent
