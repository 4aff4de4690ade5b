"""Fixtures for the deployment tests: a federation's credentials, experiment files, and
server/client subprocesses that are always killed at teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmosaic.net.certs import create_federation, revoke

REPO = Path(__file__).resolve().parents[2]
CLIENTS = [f"client_{i:02d}" for i in range(10)]  # the digits partition's ids
REVOKED = "spare"


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Credentials for client_0..client_9 plus 'spare', whose certificate is revoked."""
    root = tmp_path_factory.mktemp("federation")
    create_federation(root, clients=[*CLIENTS, REVOKED], ca_passphrase=None)
    revoke(root, REVOKED)
    return root


@pytest.fixture(scope="session")
def foreign_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA issuing a certificate with a legitimate-looking id (client_00)."""
    root = tmp_path_factory.mktemp("foreign")
    create_federation(root, clients=["client_00"], ca_passphrase=None)
    return root


def experiment_toml(path: Path, credentials: Path, *, rounds: int = 3, seed: int = 7,
                    server: dict[str, Any] | None = None, extra: str = "") -> Path:
    """A digits experiment over 10 IID clients, served on an ephemeral loopback port."""
    settings = {"address": "127.0.0.1", "port": 0, "credentials": str(credentials),
                "min_clients": 10, "heartbeat_interval": 2.0, "round_deadline": 60.0,
                "wait_for_clients": 300.0, "linger": 5.0, **(server or {})}
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path.write_text(f"""name = "net-digits"
seed = {seed}
rounds = {rounds}

[data]
dataset = "digits"

[partition]
method = "iid"
clients = 10

[model]
kind = "mlp"
hidden = [16]

[train]
lr = 0.1
epochs = 1
batch_size = 32

[server]
{chr(10).join(lines)}
{extra}
""")
    return path


class Processes:
    """Subprocesses of one test, logs in files, killed (SIGKILL) at teardown."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "fedmosaic.cli", *args], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        log.close()
        self.procs[name] = proc
        return proc

    def server(self, experiment: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
        return self.start("server", "server", str(experiment), "--output", str(out), *extra)

    def client(self, cid: str, port: int, federation: Path, experiment: Path,
               *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.start(cid, "client", "--server", f"127.0.0.1:{port}", "--credentials",
                          str(federation), "--id", cid, "--config", str(experiment),
                          "--retry-budget", "120", *extra, env=env)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish in {timeout}s; log:\n{self.log(name)[-3000:]}")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs)
    try:
        yield procs
    finally:
        procs.close()


def wait_for_endpoint(out: Path, procs: Processes, timeout: float = 180.0,
                      instance_not: str | None = None) -> dict[str, Any]:
    """The server's endpoint.json once it is listening (a new instance if ``instance_not``)."""
    end = time.monotonic() + timeout
    path = out / "endpoint.json"
    while time.monotonic() < end:
        if path.is_file():
            info = json.loads(path.read_text())
            if info["instance"] != instance_not:
                return info
        if procs.procs["server"].poll() is not None:
            pytest.fail(f"server exited early:\n{procs.log('server')[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"server did not start in {timeout}s:\n{procs.log('server')[-3000:]}")


def operator_status(federation: Path, port: int) -> dict[str, Any]:
    """``fedmosaic status --json`` against a running server."""
    out = subprocess.run([sys.executable, "-m", "fedmosaic.cli", "status", "--server",
                          f"127.0.0.1:{port}", "--credentials", str(federation), "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def server_status(federation: Path, port: int) -> Any:
    """The Status RPC with the operator credential (fast enough to poll)."""
    from fedmosaic.net.certs import FederationPaths
    from fedmosaic.net.client import _Stubs, open_channel
    from fedmosaic.net.proto import fedmosaic_pb2 as pb

    paths = FederationPaths(federation)
    channel = open_channel(f"127.0.0.1:{port}", paths.ca_cert, paths.operator_cert,
                           paths.operator_key)
    try:
        return _Stubs(channel).status(pb.StatusRequest(), timeout=10)
    finally:
        channel.close()


def wait_until(predicate: Any, timeout: float, what: str, procs: Processes) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}; server log:\n{procs.log('server')[-3000:]}")


@pytest.fixture
def fedlog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """``caplog`` that also sees the ``fedmosaic`` logger when structured logging has been
    configured in this process (that logger then does not propagate to the root)."""
    import logging

    logger = logging.getLogger("fedmosaic")
    caplog.set_level(logging.INFO, logger="fedmosaic")
    logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
