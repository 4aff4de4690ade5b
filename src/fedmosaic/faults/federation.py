"""A small real federation on 127.0.0.1 for fault injection: credentials, a digits experiment,
and ``fedmosaic server`` / ``fedmosaic client`` processes (started through
``python -m fedmosaic.faults.launch``, so test hooks can be switched on per process), with
their logs in files; every process is killed at ``close``. What it reads back goes through
the deployment's public surfaces only: ``endpoint.json``, ``metrics.json``, ``model.pt``,
``/metrics``, the ``Status`` RPC with the operator credential and ``fedmosaic status``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from fedmosaic.faults import hooks

ROOT = Path(__file__).resolve().parents[3]  # the repository (for the processes' cwd)


class ScenarioFailed(AssertionError):
    """A promise did not hold (or a step did not happen in its time bound)."""


def _toml_value(value: Any) -> str:
    return json.dumps(value)  # strings, numbers, booleans and lists: TOML-compatible


def experiment_toml(path: Path, credentials: Path, *, clients: int, rounds: int, seed: int,
                    server: dict[str, Any], strategy: dict[str, Any] | None = None,
                    hidden: Sequence[int] = (8,)) -> Path:
    """A digits experiment over ``clients`` IID clients with a tiny MLP, served on an ephemeral
    loopback port with the given ``[server]`` settings."""
    settings = {"address": "127.0.0.1", "port": 0, "credentials": str(credentials),
                "min_clients": clients, "heartbeat_interval": 0.5, "round_deadline": 30.0,
                "wait_for_clients": 60.0, "linger": 3.0, "metrics_port": 0, **server}
    server_lines = "\n".join(f"{k} = {_toml_value(v)}" for k, v in settings.items())
    strategy_lines = "\n".join(f"{k} = {_toml_value(v)}" for k, v in (strategy or {}).items())
    path.write_text(f"""name = "chaos-digits"
seed = {seed}
rounds = {rounds}

[data]
dataset = "digits"

[partition]
method = "iid"
clients = {clients}

[model]
kind = "mlp"
hidden = {_toml_value(list(hidden))}

[train]
lr = 0.1
epochs = 1
batch_size = 64

[strategy]
{strategy_lines}

[server]
{server_lines}
""")
    return path


class Federation:
    """One federation in ``root``: ``create`` writes credentials (the experiment's client ids,
    plus ``extra`` ids) and the experiment; ``server``/``client`` start processes."""

    def __init__(self, root: Path, experiment: Path, credentials: Path, ids: list[str]) -> None:
        self.root, self.experiment, self.credentials, self.ids = root, experiment, credentials, ids
        self.out = root / "out"
        self.logs = root / "logs"
        self.markers = root / "markers"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.endpoint: dict[str, Any] = {}
        self.server_starts = 0
        self.port = 0  # the server's port, chosen at its first start
        self._status_channel: grpc.Channel | None = None

    @classmethod
    def create(cls, root: Path, *, clients: int = 3, rounds: int = 3, seed: int = 11,
               server: dict[str, Any] | None = None, strategy: dict[str, Any] | None = None,
               extra: Sequence[str] = ()) -> Federation:
        from fedmosaic.build import build_data
        from fedmosaic.config import load_experiment
        from fedmosaic.net.certs import create_federation

        root.mkdir(parents=True, exist_ok=True)
        credentials = root / "credentials"
        experiment = experiment_toml(root / "experiment.toml", credentials, clients=clients,
                                     rounds=rounds, seed=seed, server=server or {},
                                     strategy=strategy)
        ids = list(build_data(load_experiment(experiment)).client_ids)
        create_federation(credentials, clients=[*ids, *extra], ca_passphrase=None)
        return cls(root, experiment, credentials, ids)

    # --- processes -------------------------------------------------------------------------

    def start(self, name: str, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        """``fedmosaic ARGS`` as process ``name`` (its log: ``logs/NAME.log``, appended)."""
        base = {k: v for k, v in os.environ.items() if k not in hooks.ALL}
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedmosaic.faults.launch", *args], cwd=ROOT,
                stdout=log, stderr=subprocess.STDOUT,
                env={**base, "PYTHONUNBUFFERED": "1", hooks.MARKERS: str(self.markers),
                     **(env or {})})
        self.procs[name] = proc
        return proc

    def server(self, *extra: str, env: dict[str, str] | None = None,
               port: int | None = None) -> subprocess.Popen[bytes]:
        """Start ``fedmosaic server`` on the experiment (on ``port``, default the last one
        used, or a free port the first time, so that clients can be started at once and
        retry until it listens); ``wait_endpoint`` waits for it to listen."""
        if port is None:
            port = self.port or _free_port()
        self.port = port
        self.server_starts += 1
        return self.start("server", "server", str(self.experiment), "--output", str(self.out),
                          "--port", str(port), "--json-logs", *extra, env=env)

    def client(self, cid: str, *, address: str | None = None, retry_budget: float = 60.0,
               fit_delay: float | None = None, name: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``fedmosaic client`` for ``cid`` (its own data share of the experiment),
        dialling ``address`` (default: the server itself); ``fit_delay`` slows each fit."""
        extra: list[str] = []
        env = dict(env or {})
        if fit_delay is not None:
            extra += ["--trainer", "fedmosaic.faults.hooks:slow_trainer"]
            env |= {hooks.FIT_DELAY: str(fit_delay), hooks.EXPERIMENT: str(self.experiment)}
        return self.start(name or cid, "client", "--server", address or self.address,
                          "--credentials", str(self.credentials), "--id", cid, "--config",
                          str(self.experiment), "--retry-budget", str(retry_budget), *extra,
                          env=env)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` and reap it."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout=max(0.1, timeout))
        except subprocess.TimeoutExpired:
            raise ScenarioFailed(f"{name} did not exit within {timeout:.0f}s; its log ends:\n"
                                 f"{self.log(name)[-2000:]}") from None

    def close(self) -> None:
        if self._status_channel is not None:
            self._status_channel.close()
            self._status_channel = None
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- what the deployment shows -----------------------------------------------------------

    def wait_endpoint(self, timeout: float = 60.0) -> dict[str, Any]:
        """``endpoint.json`` of the server started last (a new instance id), once listening."""
        previous = self.endpoint.get("instance")
        path = self.out / "endpoint.json"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if path.is_file():
                info = json.loads(path.read_text())
                if info["instance"] != previous:
                    self.endpoint = info
                    if self._status_channel is not None:
                        self._status_channel.close()
                        self._status_channel = None
                    return info
            if self.procs["server"].poll() is not None:
                raise ScenarioFailed(f"server exited ({self.procs['server'].returncode}) before "
                                     f"listening:\n{self.log('server')[-2000:]}")
            time.sleep(0.05)
        raise ScenarioFailed(f"server did not listen within {timeout:.0f}s:\n"
                             f"{self.log('server')[-2000:]}")

    def metrics(self) -> dict[str, float]:
        """The server's ``/metrics``, as {sample name with labels: value}."""
        url = f"http://127.0.0.1:{self.endpoint['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def status(self) -> Any:
        """The ``Status`` RPC with the operator credential (what ``fedmosaic status`` asks);
        None while the server does not answer."""
        from fedmosaic.net.proto import fedmosaic_pb2 as pb

        if self._status_channel is None:
            self._status_channel = member_channel(self.endpoint["port"], self.credentials,
                                                  "operator")
        call = self._status_channel.unary_unary(
            "/fedmosaic.v1.Federation/Status",
            request_serializer=pb.StatusRequest.SerializeToString,
            response_deserializer=pb.StatusReply.FromString)
        try:
            return call(pb.StatusRequest(), timeout=5)
        except grpc.RpcError:
            return None

    def status_cli(self, timeout: float = 60.0) -> dict[str, Any]:
        """``fedmosaic status --json`` (the operator's command) against the running server."""
        proc = subprocess.run(
            [sys.executable, "-m", "fedmosaic.cli", "status", "--server", self.address,
             "--credentials", str(self.credentials), "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise ScenarioFailed(f"fedmosaic status exited {proc.returncode}: "
                                 f"{proc.stderr[-1000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def history(self) -> list[dict[str, Any]]:
        path = self.out / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def wait_until(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``predicate`` every 50 ms for at most ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise ScenarioFailed(f"timed out after {timeout:.0f}s waiting for {what}; server log "
                             f"ends:\n{self.log('server')[-2000:]}")

    def round_open(self, round_num: int) -> bool:
        """Round ``round_num`` is in progress with its tasks handed out."""
        st = self.status()
        return bool(st is not None and st.state == "training" and st.round == round_num
                    and st.round_tasks > 0)

    def marker(self, name: str) -> bool:
        return (self.markers / name).exists()


def _free_port() -> int:
    """A port nothing listens on now (the kernel's pick; released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def member_channel(port: int, credentials: Path, member: str | None,
                   ca: Path | None = None) -> grpc.Channel:
    """A raw TLS channel to the server as ``member`` (a client id, ``"operator"``, or None for
    no client certificate), trusting ``ca`` (default: the federation's). The client may send
    messages of any size: the server's limits are what is tested."""
    from fedmosaic.net.certs import FederationPaths

    paths = FederationPaths(credentials)
    cert = key = None
    if member == "operator":
        cert, key = paths.operator_cert.read_bytes(), paths.operator_key.read_bytes()
    elif member is not None:
        cert, key = paths.client_cert(member).read_bytes(), paths.client_key(member).read_bytes()
    creds = grpc.ssl_channel_credentials((ca or paths.ca_cert).read_bytes(), key, cert)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds,
                               options=[("grpc.max_send_message_length", -1),
                                        ("grpc.max_receive_message_length", -1)])
