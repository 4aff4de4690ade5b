"""TLS 1.3 only: a real gRPC server and client, each in a fresh process, refuse TLS 1.2.

Fresh processes because gRPC reads its TLS configuration once, when ``grpc`` is imported:
the processes start without ``GRPC_SSL_CIPHER_SUITES``, so what is tested is that importing
``fedmosaic.net`` applies the policy itself. ``FEDMOSAIC_ALLOW_TLS12=1`` is the control that
shows each probe can tell TLS 1.2 accepted from refused.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmosaic.net import tls
from fedmosaic.net.certs import FederationPaths, create_federation
from tests.net.conftest import Processes, experiment_toml, wait_for_endpoint

REPO = Path(__file__).resolve().parents[2]

SERVER = """
import sys
from concurrent import futures
from pathlib import Path
from fedmosaic.net.auth import server_credentials
from fedmosaic.net.certs import FederationPaths
from fedmosaic.net import tls
import grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
port = server.add_secure_port("127.0.0.1:0", server_credentials(FederationPaths(Path(sys.argv[1]))))
server.start()
print(port, tls.policy(), flush=True)
sys.stdin.read()  # serve until the test closes stdin
server.stop(None)
"""

CLIENT = """
import sys
from pathlib import Path
from fedmosaic.net.auth import channel_credentials
import grpc
root, port = Path(sys.argv[1]), sys.argv[2]
creds = channel_credentials(root / "ca.pem", root / "clients" / "a.pem", root / "clients" / "a.key")
channel = grpc.secure_channel(f"localhost:{port}", creds)
try:  # the test stops this process once the server has seen the handshake
    grpc.channel_ready_future(channel).result(timeout=60)
except grpc.FutureTimeoutError:
    pass
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in (tls.CIPHER_ENV, tls.ALLOW_TLS12_ENV)}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> FederationPaths:
    return create_federation(tmp_path_factory.mktemp("tls") / "fed", ["a"], ca_passphrase=None)


def _server(fed: FederationPaths, **env: str) -> Iterator[tuple[int, str]]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(fed.root)], cwd=REPO,
                            env=_env(**env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        port, policy = proc.stdout.readline().split()
        yield int(port), policy
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def strict_server(fed: FederationPaths) -> Iterator[tuple[int, str]]:
    yield from _server(fed)


@pytest.fixture(scope="module")
def lenient_server(fed: FederationPaths) -> Iterator[tuple[int, str]]:
    yield from _server(fed, **{tls.ALLOW_TLS12_ENV: "1"})


def _handshake(fed: FederationPaths, port: int, version: ssl.TLSVersion, cid: str = "a") -> str:
    """Handshake with Python's ssl (OpenSSL) with ``version`` as the highest version offered:
    the negotiated version, or the error."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(fed.ca_cert)
    ctx.load_cert_chain(fed.client_cert(cid), fed.client_key(cid))
    ctx.maximum_version = version
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
                ctx.wrap_socket(sock, server_hostname="localhost") as conn:
            return str(conn.version())
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {exc}"


def test_server_refuses_tls12_and_accepts_tls13(fed: FederationPaths,
                                                strict_server: tuple[int, str]) -> None:
    port, policy = strict_server
    assert policy == "enforced"
    assert _handshake(fed, port, ssl.TLSVersion.TLSv1_2).startswith("refused")
    assert _handshake(fed, port, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"


def test_tls12_probe_succeeds_when_the_policy_is_off(fed: FederationPaths,
                                                     lenient_server: tuple[int, str]) -> None:
    port, policy = lenient_server
    assert policy == "allowed"
    assert _handshake(fed, port, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"


def test_fedmosaic_server_command_refuses_tls12(tmp_path: Path, federation: Path,
                                                 processes: Processes) -> None:
    """The real ``fedmosaic server``; its environment says nothing about cipher suites (an
    empty value counts as unset), so the policy comes from the command itself."""
    exp = experiment_toml(tmp_path / "exp.toml", federation, rounds=1)
    processes.start("server", "server", str(exp), "--output", str(tmp_path / "out"),
                    "--json-logs", env={tls.CIPHER_ENV: "", tls.ALLOW_TLS12_ENV: ""})
    port = wait_for_endpoint(tmp_path / "out", processes)["port"]
    paths = FederationPaths(federation)
    assert _handshake(paths, port, ssl.TLSVersion.TLSv1_2, "client_00").startswith("refused")
    assert _handshake(paths, port, ssl.TLSVersion.TLSv1_3, "client_00") == "TLSv1.3"
    processes.kill("server")
    assert "TLS policy" not in processes.log("server")  # no "TLS 1.2 still accepted" warning


def _tls12_server(fed: FederationPaths) -> tuple[socket.socket, dict[str, str],
                                                 threading.Thread]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(fed.server_cert, fed.server_key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    outcome: dict[str, str] = {}

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            outcome["result"] = f"no connection: {exc}"
            return
        with conn:
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls_conn:
                    outcome["result"] = str(tls_conn.version())
            except (ssl.SSLError, OSError) as exc:
                outcome["result"] = f"refused: {exc}"

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, outcome, thread


@pytest.mark.parametrize("allow", [False, True], ids=["policy", "control"])
def test_client_refuses_a_tls12_only_server(fed: FederationPaths, allow: bool) -> None:
    listener, outcome, thread = _tls12_server(fed)
    port = listener.getsockname()[1]
    env = _env(**({tls.ALLOW_TLS12_ENV: "1"} if allow else {}))
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(fed.root), str(port)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        thread.join(timeout=30)
    finally:
        client.kill()
        client.wait()
        listener.close()
    if allow:
        assert outcome["result"] == "TLSv1.2"
    else:
        assert outcome["result"].startswith("refused"), outcome
        assert "NO_SHARED_CIPHER" in outcome["result"].upper()


def test_policy_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which policy a process gets, from its environment and whether gRPC is already loaded
    (the decision ``fedmosaic.net`` makes at import; the servers above show its effect)."""
    monkeypatch.delenv(tls.CIPHER_ENV, raising=False)
    monkeypatch.delenv(tls.ALLOW_TLS12_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "grpc", types.ModuleType("grpc"))  # as if imported
    assert tls._apply() == "late"  # gRPC has read its configuration: too late to change it
    assert tls.CIPHER_ENV not in os.environ
    monkeypatch.delitem(sys.modules, "grpc")  # restored (if it was there) after the test
    assert tls._apply() == "enforced"
    assert os.environ[tls.CIPHER_ENV] == tls.TLS13_ONLY_CIPHERS
    assert tls._apply() == "enforced"  # inherited by a child process: still enforced
    monkeypatch.setenv(tls.CIPHER_ENV, "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert tls._apply() == "custom"
    monkeypatch.setenv(tls.ALLOW_TLS12_ENV, "1")
    assert tls._apply() == "allowed"
