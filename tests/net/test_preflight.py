"""The client's own checks and error classification, without a client process:
``fedmosaic.net.preflight`` (credentials, the server's TLS verdict) and
``fedmosaic.net.client_errors`` (verdicts on gRPC errors, the retry budget, rate-limited
logs, which training errors may recur)."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.net import certs
from fedmosaic.net.certs import FederationPaths, create_federation, revoke
from fedmosaic.net.client_errors import (
    Backoff,
    ExitCode,
    RepeatLimiter,
    UnreachableError,
    classify,
    failure_reason,
    is_transient_failure,
)
from fedmosaic.net.preflight import (
    PreflightError,
    check_credentials,
    check_server,
    expected_server_name,
)
from tests.net.harness import live_server


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationPaths:
    root = tmp_path_factory.mktemp("preflight")
    paths = create_federation(root, clients=["c1", "c2", "gone"], ca_passphrase=None)
    revoke(root, "gone")
    return paths


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> FederationPaths:
    return create_federation(tmp_path_factory.mktemp("other"), clients=["c1"],
                             ca_passphrase=None)


def _leaf(fed: FederationPaths, out: Path, *, role: str = "client",
          not_before: dt.timedelta = dt.timedelta(days=-1),
          not_after: dt.timedelta = dt.timedelta(days=30)) -> tuple[Path, Path]:
    """A certificate from ``fed``'s CA with the given role and validity (relative to now)."""
    ca_cert = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(fed.ca_key.read_bytes(), None)
    key = certs._new_key("ec-p256")
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(certs._name("someone", role)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + not_before).not_valid_after(now + not_after)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, certs._hash_for(ca_key)))  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaf.pem").write_bytes(certs._cert_pem(cert))
    (out / "leaf.key").write_bytes(certs._key_pem(key))
    return out / "leaf.pem", out / "leaf.key"


def _refused(ca: Path, cert: Path, key: Path) -> PreflightError:
    with pytest.raises(PreflightError) as info:
        check_credentials(ca, cert, key)
    return info.value


# -- check_credentials ----------------------------------------------------------------------

def test_valid_client_credentials_pass_and_pin_the_server_generation(
        fed: FederationPaths) -> None:
    cred = check_credentials(fed.ca_cert, fed.client_cert("c1"), fed.client_key("c1"))
    assert (cred.client_id, cred.role) == ("c1", "client")
    assert cred.server_name == "gen-1.server.fedmosaic.invalid"
    assert expected_server_name(cred, "fl.example.org:50051") == cred.server_name
    assert expected_server_name(None, "fl.example.org:50051") == "fl.example.org"
    assert expected_server_name(None, "[::1]:50051", None) == "::1"


def test_key_of_another_certificate(fed: FederationPaths) -> None:
    exc = _refused(fed.ca_cert, fed.client_cert("c1"), fed.client_key("c2"))
    assert exc.reason == "key_mismatch" and exc.exit_code == ExitCode.REFUSED
    assert str(exc) == (f"the key {fed.client_key('c2')} does not belong to the certificate "
                        f"{fed.client_cert('c1')} (their public keys differ); use the key made "
                        "together with this certificate")


def test_certificate_of_another_federation(fed: FederationPaths,
                                           other: FederationPaths) -> None:
    exc = _refused(fed.ca_cert, other.client_cert("c1"), other.client_key("c1"))
    assert exc.reason == "foreign_ca"
    assert str(exc).startswith("your certificate was not issued by the federation CA in ")


def test_expired_and_not_yet_valid(fed: FederationPaths, tmp_path: Path) -> None:
    cert, key = _leaf(fed, tmp_path / "old", not_before=dt.timedelta(days=-30),
                      not_after=dt.timedelta(days=-2))
    exc = _refused(fed.ca_cert, cert, key)
    assert exc.reason == "expired"
    ends = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    assert str(exc) == (f"your certificate expired on {ends:%Y-%m-%d %H:%M} UTC; ask the "
                        "operator for a new one (fedmosaic certs request NEW-ID here, then "
                        "fedmosaic certs sign by the operator)")
    cert, key = _leaf(fed, tmp_path / "future", not_before=dt.timedelta(days=2))
    exc = _refused(fed.ca_cert, cert, key)
    assert exc.reason == "not_yet_valid" and "check it" in str(exc)


def test_expiring_soon_is_a_warning(fed: FederationPaths, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    cert, key = _leaf(fed, tmp_path, not_after=dt.timedelta(days=3))
    with caplog.at_level(logging.WARNING, logger="fedmosaic.net.preflight"):
        check_credentials(fed.ca_cert, cert, key)
    assert "your certificate expires on" in caplog.text


def test_operator_server_and_ca_certificates_are_not_client_credentials(
        fed: FederationPaths, tmp_path: Path) -> None:
    exc = _refused(fed.ca_cert, fed.operator_cert, fed.operator_key)
    assert exc.reason == "not_a_client"
    assert str(exc).startswith(f"{fed.operator_cert} is the operator's certificate (for "
                               "fedmosaic status), not a client's")
    exc = _refused(fed.ca_cert, fed.server_cert, fed.server_key)
    assert str(exc).startswith(f"{fed.server_cert} is a server certificate, not a client's")
    cert, key = _leaf(fed, tmp_path, role="auditor")
    assert "role 'auditor'" in str(_refused(fed.ca_cert, cert, key))


def test_revoked_by_the_crl_beside_ca_pem(fed: FederationPaths) -> None:
    exc = _refused(fed.ca_cert, fed.client_cert("gone"), fed.client_key("gone"))
    assert exc.reason == "revoked" and exc.exit_code == ExitCode.REFUSED
    assert "('gone', serial " in str(exc) and str(fed.crl) in str(exc)


def test_unreadable_and_malformed_files_are_usage_errors(fed: FederationPaths,
                                                         tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for ca, cert, key, words in [
        (tmp_path / "missing.pem", fed.client_cert("c1"), fed.client_key("c1"),
         "cannot read the CA certificate"),
        (junk, fed.client_cert("c1"), fed.client_key("c1"), "is not a PEM certificate"),
        (fed.ca_cert, junk, fed.client_key("c1"), "is not a PEM certificate"),
        (fed.ca_cert, fed.client_cert("c1"), junk, "is not a PEM private key"),
    ]:
        exc = _refused(ca, cert, key)
        assert exc.exit_code == ExitCode.USAGE and words in str(exc)


def test_a_tampered_crl_fails_closed(fed: FederationPaths, other: FederationPaths,
                                     tmp_path: Path) -> None:
    copy = Path(shutil.copytree(fed.root, tmp_path / "fed"))
    (copy / "crl.pem").write_bytes(other.crl.read_bytes())  # signed by another CA
    exc = _refused(copy / "ca.pem", copy / "clients" / "c1.pem", copy / "clients" / "c1.key")
    assert exc.reason == "bad_crl" and "unusable" in str(exc)


# -- check_server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(fed: FederationPaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    root = Path(shutil.copytree(fed.root, tmp_path_factory.mktemp("srv") / "fed"))
    with live_server(root, numel=10, chunk_bytes=1024) as (_, port, _metrics):
        yield port


def test_check_server_accepts_a_server_that_accepts_us(fed: FederationPaths,
                                                       server: int) -> None:
    assert check_server(f"127.0.0.1:{server}", fed.ca_cert, fed.client_cert("c1"),
                        fed.client_key("c1"), server_name="127.0.0.1") is None


def test_check_server_names_a_server_we_do_not_trust(server: int,
                                                     other: FederationPaths) -> None:
    verdict = check_server(f"127.0.0.1:{server}", other.ca_cert, other.client_cert("c1"),
                           other.client_key("c1"), server_name="127.0.0.1")
    assert verdict is not None and verdict.reason == "server_untrusted"
    assert verdict.message.startswith("this client does not trust the server's certificate")


def test_check_server_names_a_revoked_server_generation(fed: FederationPaths,
                                                        server: int) -> None:
    verdict = check_server(f"127.0.0.1:{server}", fed.ca_cert, fed.client_cert("c1"),
                           fed.client_key("c1"), server_name="gen-2.server.fedmosaic.invalid")
    assert verdict is not None and verdict.reason == "server_name"


def test_check_server_names_a_server_that_hangs_up_on_another_ca(
        fed: FederationPaths, other: FederationPaths, server: int, tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(fed.ca_cert.read_bytes() + other.ca_cert.read_bytes())
    verdict = check_server(f"127.0.0.1:{server}", bundle, other.client_cert("c1"),
                           other.client_key("c1"), server_name="127.0.0.1")
    assert verdict is not None and verdict.reason == "foreign_ca"


def test_check_server_leaves_an_absent_or_silent_server_to_the_retries(
        fed: FederationPaths) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (fed.ca_cert, fed.client_cert("c1"), fed.client_key("c1"))
    assert check_server(f"127.0.0.1:{port}", *args, server_name="127.0.0.1") is None
    with socket.socket() as listener:  # accepts, never answers: a timeout, not a verdict
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert check_server(f"127.0.0.1:{port}", *args, server_name="127.0.0.1",
                            timeout=0.3) is None


@pytest.mark.parametrize("kind", ["plain", "tls12"])
def test_check_server_names_a_server_that_is_not_fedmosaic(fed: FederationPaths,
                                                           kind: str) -> None:
    """A plain TCP service (not TLS), or a TLS server that offers only TLS 1.2."""
    import ssl

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(fed.server_cert), str(fed.server_key))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            if kind == "plain":
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            else:
                with contextlib.suppress(ssl.SSLError, OSError):
                    context.wrap_socket(conn, server_side=True).close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        verdict = check_server(f"127.0.0.1:{listener.getsockname()[1]}", fed.ca_cert,
                               fed.client_cert("c1"), fed.client_key("c1"),
                               server_name="gen-1.server.fedmosaic.invalid")
    finally:
        thread.join(10)
        listener.close()
    assert verdict is not None
    assert verdict.reason == ("not_tls" if kind == "plain" else "tls_version")


# -- classify -------------------------------------------------------------------------------

class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._code, self._details, self._metadata = code, details, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


S = grpc.StatusCode


@pytest.mark.parametrize(("code", "details", "method", "action", "reason"), [
    (S.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: "
     "ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused", "",
     "retry", "unavailable"),
    (S.DEADLINE_EXCEEDED, "Deadline Exceeded", "", "retry", "deadline"),
    (S.RESOURCE_EXHAUSTED, "too many waiting clients", "", "retry", "overloaded"),
    (S.UNAVAILABLE, "failed to connect to all addresses; last error: UNKNOWN: "
     "ipv4:127.0.0.1:1: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: "
     "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get "
     "local issuer certificate: OK", "", "fail", "server_untrusted"),
    (S.UNAVAILABLE, "... CERTIFICATE_VERIFY_FAILED: certificate has expired: OK", "", "fail",
     "server_expired"),
    (S.UNAVAILABLE, "last error: UNKNOWN: ipv4:127.0.0.1:1: Custom verification check "
     "failed with error: UNAUTHENTICATED: Hostname Verification Check failed.", "", "fail",
     "server_name"),
    (S.UNAVAILABLE, "last error: UNKNOWN: ipv4:127.0.0.1:1: Failed to create security "
     "handshaker.", "", "fail", "bad_credentials"),
    (S.UNAVAILABLE, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca", "", "fail",
     "foreign_ca"),
    (S.UNAVAILABLE, "last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed "
     "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:"
     "WRONG_VERSION_NUMBER: Invalid certificate verification context: OK", "", "fail",
     "not_tls"),
    (S.UNAVAILABLE, "last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed "
     "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:10000410:SSL routines:OPENSSL_internal:"
     "SSLV3_ALERT_HANDSHAKE_FAILURE: Invalid certificate verification context: OK", "", "fail",
     "tls_version"),
    (S.PERMISSION_DENIED, "credential of 'c2' is revoked", "", "fail", "revoked"),
    (S.UNAUTHENTICATED, "no verified client certificate", "", "fail", "unauthenticated"),
    (S.FAILED_PRECONDITION, "not joined to this server instance: join again", "", "rejoin",
     "not_joined"),
    (S.FAILED_PRECONDITION, "client model layout 'ab' differs", "Join", "fail",
     "join_refused"),
    (S.FAILED_PRECONDITION, "unknown or expired task id", "", "skip", "failed_precondition"),
])
def test_classify(code: grpc.StatusCode, details: str, method: str, action: str,
                  reason: str) -> None:
    verdict = classify(FakeRpcError(code, details), method)
    assert (verdict.action, verdict.reason) == (action, reason)


def test_classify_a_stream_the_server_cut_is_one_call_over_not_an_outage() -> None:
    for label in ("stalled", "late"):
        verdict = classify(FakeRpcError(S.CANCELLED, "stream idle for 1.5 s",
                                        (("fedmosaic-refusal", label),)), "UploadUpdate")
        assert (verdict.action, verdict.reason) == ("skip", label)
        assert "unreachable" not in verdict.message and label in verdict.message
    # A cancellation without the server's label is still a transient failure.
    assert classify(FakeRpcError(S.CANCELLED, "")).action == "retry"


def test_classify_follows_the_servers_permanent_refusal_metadata() -> None:
    verdict = classify(FakeRpcError(
        S.FAILED_PRECONDITION, "your data has 10 features; the task's model expects 64",
        (("fedmosaic-refusal", "feature_shape"), ("fedmosaic-permanent", "1"))))
    assert verdict.permanent and verdict.reason == "feature_shape"
    assert verdict.message == ("refused by the server: your data has 10 features; the task's "
                               "model expects 64")
    # A label that is not a bounded code is not trusted as one.
    verdict = classify(FakeRpcError(S.ABORTED, "x", (("fedmosaic-refusal", "Bad Label!\n"),
                                                     ("fedmosaic-permanent", "1"))))
    assert verdict.permanent and verdict.reason == "refused"
    # Without the permanent mark an overload stays transient, whatever the label.
    verdict = classify(FakeRpcError(S.RESOURCE_EXHAUSTED, "busy",
                                    (("fedmosaic-refusal", "busy"),)))
    assert verdict.action == "retry"


def test_a_socket_closed_after_tls_asks_for_a_diagnosis() -> None:
    verdict = classify(FakeRpcError(S.UNAVAILABLE, "failed to connect to all addresses; last "
                                    "error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"))
    assert verdict.action == "retry" and verdict.probe
    assert verdict.message == "the connection was closed"


@settings(max_examples=200, deadline=None)
@given(code=st.sampled_from(list(grpc.StatusCode)), details=st.text(max_size=300),
       method=st.sampled_from(["", "Join", "GetTask"]))
def test_classify_is_total_and_printable(code: grpc.StatusCode, details: str,
                                         method: str) -> None:
    verdict = classify(FakeRpcError(code, details), method)
    assert verdict.action in ("retry", "rejoin", "skip", "fail")
    assert verdict.message.isprintable() and len(verdict.message) <= 600
    if code in (S.PERMISSION_DENIED, S.UNAUTHENTICATED):
        assert verdict.permanent


# -- Backoff: the budget is a hard limit ----------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_backoff_sleeps_and_timeouts_never_pass_the_budget() -> None:
    clock = Clock()
    backoff = Backoff(base=1.0, cap=100.0, budget=10.0, clock=clock, sleep=clock.sleep)
    with pytest.raises(UnreachableError) as info:
        while True:
            assert backoff.timeout(60.0) <= backoff.remaining()
            backoff.wait("down")
    assert clock.now - 100.0 == pytest.approx(10.0)  # gave up exactly at the budget
    assert all(s <= 10.0 for s in clock.slept)
    assert info.value.exit_code == ExitCode.UNREACHABLE
    assert str(info.value) == ("no progress with the server for 10 s (--retry-budget); last "
                               "error: down")


def test_backoff_delays_grow_with_full_jitter_and_reset_on_progress() -> None:
    clock = Clock()
    backoff = Backoff(base=0.5, cap=4.0, budget=1e9, clock=clock, sleep=clock.sleep)
    for attempt in range(12):
        ceiling = min(4.0, 0.5 * 2 ** attempt)
        assert 0.0 <= backoff.wait("x") <= ceiling
    backoff.progress()
    assert backoff.attempts == 0 and backoff.remaining() == pytest.approx(1e9)
    with pytest.raises(ValueError):
        Backoff(budget=0)


# -- RepeatLimiter --------------------------------------------------------------------------

def test_repeated_lines_are_logged_once_per_window_with_a_count(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limiter = RepeatLimiter(every=30.0, clock=clock)
    logger = logging.getLogger("test.limiter")
    with caplog.at_level(logging.WARNING, logger="test.limiter"):
        for _ in range(100):  # 100 retries in 10 s
            limiter.log(logger, logging.WARNING, "down", "server unreachable (%s)", "refused")
            clock.now += 0.1
        limiter.log(logger, logging.WARNING, "other", "another problem")
        clock.now += 25
        limiter.log(logger, logging.WARNING, "down", "server unreachable (%s)", "refused")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["server unreachable (refused)", "another problem",
                     "server unreachable (refused) (99 similar messages not logged in the "
                     "last 35 s)"]


# -- training errors ------------------------------------------------------------------------

def test_which_training_errors_may_not_recur() -> None:
    assert is_transient_failure(MemoryError())
    assert is_transient_failure(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_transient_failure(OSError(errno.ENOSPC, "No space left on device"))
    assert is_transient_failure(OSError(errno.EMFILE, "Too many open files"))
    assert not is_transient_failure(FileNotFoundError(errno.ENOENT, "missing"))
    assert not is_transient_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_transient_failure(ValueError("bad"))


def test_failure_reason_is_one_bounded_printable_line() -> None:
    assert failure_reason(ValueError("bad value\nsecond line")) == "ValueError: bad value"
    assert failure_reason(KeyError()) == "KeyError"
    long = failure_reason(RuntimeError("x" * 2000 + "\x1b[31m"))
    assert len(long) == 512 and long.isprintable() and long.endswith("...")


def test_rate_limiter_is_thread_safe() -> None:
    limiter = RepeatLimiter(every=1e9)
    logged: list[bool] = []
    logger = logging.getLogger("test.limiter.threads")

    def spam() -> None:
        for _ in range(200):
            logged.append(limiter.log(logger, logging.DEBUG, "k", "m"))

    threads = [threading.Thread(target=spam) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert logged.count(True) == 1 and len(logged) == 800
