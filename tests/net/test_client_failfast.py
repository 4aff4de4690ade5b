"""Issue #10 acceptance: ``fedmosaic client`` processes that cannot take part exit at once,
with the reason in one line and a permanent exit code, and one that meets a transient error
(the server restarted) recovers and finishes.

Each permanent case is a real ``fedmosaic client`` process against a real server (the
transport, service and mutual TLS of ``fedmosaic server``, in this process, on loopback);
the test asserts its last stderr line exactly, its exit code and that it exited within
``PERMANENT_EXIT_SECONDS`` of starting, process start-up included (on a machine too loaded
to import torch in that time, within ``SLACK_SECONDS`` of the import time: see
``_permanent``). ``pytest -s`` prints each measured time.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedmosaic.compat import TaskProfile
from fedmosaic.net import certs
from fedmosaic.net.certs import FederationPaths, create_federation, revoke
from fedmosaic.net.client_errors import ExitCode
from fedmosaic.net.server import RunningServer, start_server
from fedmosaic.net.settings import DeploySettings
from fedmosaic.net.transport import GrpcTransport
from fedmosaic.net.wire import spec_hash
from tests.net.conftest import REPO

PERMANENT_EXIT_SECONDS = 5.0
SLACK_SECONDS = 2.5  # a refused client's own work after its imports (see _permanent)
FEATURES, CLASSES = 64, 10

TASK = textwrap.dedent('''
    """The federation's model (64 features, 10 classes) and another one (a mismatch)."""
    import torch
    from torch import nn

    import fedmosaic as fm


    def _mlp(hidden):
        return lambda: nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


    def make_trainer():
        return fm.TorchTrainer(_mlp(16), lr=0.1, epochs=1, batch_size=16)


    def other_trainer():
        return fm.TorchTrainer(_mlp(24), lr=0.1, epochs=1, batch_size=16)
''')


@dataclass
class World:
    """Credentials, data files, the task module and a listening server."""

    root: Path
    fed: FederationPaths
    foreign: FederationPaths
    port: int

    def client(self, *args: str, timeout: float = 60.0,
               env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
        """Run ``fedmosaic client``; (exit code, stdout, stderr, seconds from start)."""
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "fedmosaic.cli", "client", "--server",
             f"127.0.0.1:{self.port}", "--retry-budget", "120", *args],
            cwd=self.root, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}",
                 **(env or {})})
        return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start

    def creds(self, cid: str, fed: FederationPaths | None = None) -> list[str]:
        fed = fed or self.fed
        return ["--ca", str(fed.ca_cert), "--cert", str(fed.client_cert(cid)), "--key",
                str(fed.client_key(cid))]


def _data(path: Path, features: int = FEATURES, top_label: int = CLASSES - 1,
          n: int = 40) -> Path:
    rng = np.random.default_rng(0)
    y = np.arange(n) % (top_label + 1)
    np.savez(path, x=rng.normal(size=(n, features)).astype(np.float32), y=y.astype(np.int64))
    return path


def _csv(path: Path, npz: Path) -> Path:
    """The same data as a CSV file with a label column ``diagnosis``."""
    with np.load(npz) as arrays:
        x, y = arrays["x"], arrays["y"]
    header = ",".join([*(f"f{i}" for i in range(x.shape[1])), "diagnosis"])
    rows = [",".join([*(f"{v:.6g}" for v in row), str(int(label))])
            for row, label in zip(x, y)]
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _expired_certificate(fed: FederationPaths, out: Path) -> tuple[Path, Path, dt.datetime]:
    """A client certificate from the federation's CA whose validity ended yesterday."""
    ca_cert = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(fed.ca_key.read_bytes(), None)
    key = certs._new_key("ec-p256")
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    not_after = (now - dt.timedelta(days=1)).replace(second=0)
    cert = (x509.CertificateBuilder()
            .subject_name(certs._name("late", "client")).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30)).not_valid_after(not_after)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, certs._hash_for(ca_key)))  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    (out / "late.pem").write_bytes(certs._cert_pem(cert))
    (out / "late.key").write_bytes(certs._key_pem(key))
    return out / "late.pem", out / "late.key", not_after


def _task_trainer(root: Path, name: str = "make_trainer"):  # type: ignore[no-untyped-def]
    from fedmosaic.task import load_trainer

    return load_trainer(f"task.py:{name}", root)


def _server(fed: Path, trainer: object, *, port: int = 0, rounds: int = 1,
            min_clients: int = 1) -> RunningServer:
    settings = DeploySettings(credentials=fed, address="127.0.0.1", port=port,
                              heartbeat_interval=0.5, round_deadline=30.0,
                              min_clients=min_clients, wait_for_clients=60.0, chunk_bytes=4096,
                              max_workers=16, linger=5.0)
    transport = GrpcTransport(settings, numel=trainer.spec.numel,  # type: ignore[attr-defined]
                              spec_hash=spec_hash(trainer.spec),  # type: ignore[attr-defined]
                              experiment="failfast", rounds=rounds,
                              task_profile=TaskProfile((FEATURES,), CLASSES))
    return start_server(settings, transport)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("failfast")
    fed = create_federation(root / "fed", clients=["c1", "c2", "c3", "gone"],
                            ca_passphrase=None)
    revoke(root / "fed", "gone")
    foreign = create_federation(root / "foreign", clients=["c1"], ca_passphrase=None)
    (root / "task.py").write_text(TASK)
    _data(root / "good.npz")
    _csv(root / "narrow.csv", _data(root / "narrow.npz", features=10))
    _csv(root / "label15.csv", _data(root / "label15.npz", top_label=15))
    # An experiment naming each client's own file and the user's model (for --config).
    (root / "experiment.toml").write_text(textwrap.dedent("""\
        name = "failfast"
        seed = 3
        rounds = 1

        [data]
        dataset = "files"
        clients = { c1 = "good.npz", c3 = "label15.csv" }
        label = "diagnosis"

        [model]
        factory = "task.py:make_trainer"
    """))
    running = _server(root / "fed", _task_trainer(root))
    try:
        yield World(root, fed, foreign, running.port)
    finally:
        running.transport.finish()
        running.stop(0)


def _refused_once(world: World, args: tuple[str, ...]) -> tuple[str, float]:
    code, _, err, took = world.client(*args)
    assert code == ExitCode.REFUSED, err[-3000:]
    assert "Traceback" not in err
    print(f"exited with {code} after {took:.2f} s")  # the measured figure (pytest -s)
    return err.strip().splitlines()[-1], took


def _startup_seconds() -> float:
    """How long a bare interpreter takes, now, to import what a client process imports."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import fedmosaic.net.commands, fedmosaic.net.client, "
                    "fedmosaic.task, fedmosaic.data, fedmosaic.build, pandas"], check=True,
                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    return time.monotonic() - start


def _permanent(world: World, *args: str) -> tuple[str, float]:
    """Run a client expected to give up at once; its last stderr line and its run time.

    The bound is ``PERMANENT_EXIT_SECONDS`` from the start of the process. Most of a client's
    start-up is importing torch, pandas and fedmosaic (about 3 s of CPU), so when other jobs
    keep the machine's 2 cores busy, importing alone can take longer than that: a run over
    the bound must then end within ``SLACK_SECONDS`` of the time a bare interpreter takes,
    measured right after, to import the same modules -- no retry, no wait on top.
    """
    line, took = _refused_once(world, args)
    if took >= PERMANENT_EXIT_SECONDS:
        startup = _startup_seconds()
        print(f"over {PERMANENT_EXIT_SECONDS} s; imports alone take {startup:.2f} s now")
        assert took < startup + SLACK_SECONDS, f"took {took:.1f} s; imports {startup:.1f} s"
    return line, took


def test_foreign_ca_credentials_exit_at_once(world: World) -> None:
    # A client whose credentials (ca.pem, certificate, key) are all another federation's.
    line, _ = _permanent(world, *world.creds("c1", world.foreign), "--data", "good.npz",
                         "--trainer", "task.py:make_trainer")
    assert line == ("error: this client does not trust the server's certificate: it was not "
                    "issued by the CA in ca.pem (the server belongs to another federation, or "
                    "ca.pem does)")


def test_certificate_from_another_ca_is_refused_before_connecting(world: World) -> None:
    # The federation's ca.pem, but a certificate another CA issued.
    f, o = world.fed, world.foreign
    line, _ = _permanent(world, "--ca", str(f.ca_cert), "--cert", str(o.client_cert("c1")),
                         "--key", str(o.client_key("c1")), "--data", "good.npz", "--trainer",
                         "task.py:make_trainer")
    assert line == (f"error: your certificate was not issued by the federation CA in "
                    f"{f.ca_cert} ({o.client_cert('c1')} belongs to another federation, or "
                    f"ca.pem does)")


def test_server_refusing_a_certificate_from_another_ca_is_named(world: World) -> None:
    # ca.pem trusts both CAs, so this client accepts the server and passes its own checks;
    # the server refuses the certificate (it closes the connection after TLS, no alert).
    bundle = world.root / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "ca.pem").write_bytes(world.fed.ca_cert.read_bytes()
                                    + world.foreign.ca_cert.read_bytes())
    line, _ = _permanent(world, "--ca", str(bundle / "ca.pem"), "--cert",
                         str(world.foreign.client_cert("c1")), "--key",
                         str(world.foreign.client_key("c1")), "--data", "good.npz",
                         "--trainer", "task.py:make_trainer")
    assert line == ("error: the server does not trust this certificate: it was issued by "
                    "another CA than the server's")


def test_expired_certificate_exits_at_once(world: World) -> None:
    cert, key, not_after = _expired_certificate(world.fed, world.root / "late")
    line, _ = _permanent(world, "--ca", str(world.fed.ca_cert), "--cert", str(cert), "--key",
                         str(key), "--data", "good.npz", "--trainer", "task.py:make_trainer")
    assert line == (f"error: your certificate expired on "
                    f"{not_after.strftime('%Y-%m-%d %H:%M')} UTC; ask the operator for a new "
                    f"one (fedmosaic certs request NEW-ID here, then fedmosaic certs sign by the "
                    f"operator)")


def test_revoked_certificate_exits_at_once(world: World) -> None:
    line, _ = _permanent(world, *world.creds("gone"), "--data", "good.npz", "--trainer",
                         "task.py:make_trainer")
    assert line.startswith("error: your certificate ('gone', serial ")
    assert line.endswith(f") is revoked by the federation's revocation list "
                         f"{world.fed.crl}; ask the operator for a credential under a new id")


def test_model_with_another_layout_exits_at_once(world: World) -> None:
    line, _ = _permanent(world, *world.creds("c1"), "--data", "good.npz", "--trainer",
                         "task.py:other_trainer")
    ours = _task_trainer(world.root).spec.numel
    theirs = _task_trainer(world.root, "other_trainer").spec.numel
    assert line == (f"error: refused by the server: your model's layout differs from the "
                    f"task's model ({theirs:,} parameters vs {ours:,}): use the task's model "
                    f"(the [model] of the experiment, or the same --trainer)")


def test_ten_features_against_a_64_feature_model_exits_at_once(world: World) -> None:
    # A CSV file with a label column, as a hospital would have it.
    line, _ = _permanent(world, *world.creds("c2"), "--data", "narrow.csv", "--label",
                         "diagnosis", "--trainer", "task.py:make_trainer")
    assert line == ("error: refused by the server: your data has 10 features; the task's "
                    "model expects 64")


def test_label_15_with_10_classes_exits_at_once(world: World) -> None:
    # The experiment file names this client's data and the model (--config).
    line, _ = _permanent(world, "--credentials", str(world.fed.root), "--id", "c3",
                         "--config", "experiment.toml")
    assert line == ("error: refused by the server: your data has label 15, but the task has "
                    "10 classes (labels 0 to 9)")


def test_json_logs_carry_the_final_error(world: World) -> None:
    import json

    code, _, err, _ = world.client(*world.creds("c2"), "--data", "narrow.npz", "--trainer",
                                   "task.py:make_trainer", "--json-logs")
    assert code == ExitCode.REFUSED
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    final = [r for r in records if r.get("exit_code") == ExitCode.REFUSED]
    assert len(final) == 1 and final[0]["level"] == "ERROR"
    assert final[0]["reason"] == "feature_shape"
    assert final[0]["message"] == ("refused by the server: your data has 10 features; the "
                                   "task's model expects 64")
    assert "Traceback" not in err


def test_server_restarted_mid_run_client_recovers_and_finishes(
        world: World, tmp_path: Path) -> None:
    """A transient error: the server goes away after round 1 and comes back on the same port
    (a new instance); the client retries, joins again and trains round 2."""
    from fedmosaic.algorithms.strategy import FedAvg
    from fedmosaic.data import ArrayDataset, ClientData, FederatedDataset
    from fedmosaic.runtime.simulate import simulate

    fed_dir = Path(shutil.copytree(world.fed.root, tmp_path / "fed"))
    trainer = _task_trainer(world.root)
    with np.load(world.root / "good.npz") as npz:
        data = ArrayDataset(npz["x"], npz["y"])
    fed = FederatedDataset("failfast", [ClientData("c1", data)], data, CLASSES, (FEATURES,))
    out = tmp_path / "run"
    first = _server(fed_dir, trainer, rounds=2)
    port = first.port
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmosaic.cli", "client", "--server", f"127.0.0.1:{port}",
         "--retry-budget", "60", *world.creds("c1"), "--data", "good.npz", "--trainer",
         "task.py:make_trainer"], cwd=world.root, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}"})
    try:
        simulate(trainer, fed, FedAvg(), 2, seed=1, transport=first.transport, out_dir=out,
                 stop_after=1)
        first.stop(0)  # gone without a word: no DONE, connections refused from now on
        time.sleep(1.0)
        second = _server(fed_dir, trainer, port=port, rounds=2)
        try:
            result: list[object] = []
            runner = threading.Thread(target=lambda: result.append(simulate(
                trainer, fed, FedAvg(), 2, seed=1, transport=second.transport, out_dir=out,
                resume=True)), daemon=True)
            runner.start()
            runner.join(60)
            assert result, "the resumed run did not finish"
            second.transport.finish()
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            second.stop(0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert "client c1: trained rounds [1, 2], 2 updates accepted, joined 2 times" in stdout
    assert "server unreachable" in stderr and "Traceback" not in stderr


# -- the retry budget, training errors and the self-check, with in-process clients -----------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_exits_with_code_4_after_the_budget(world: World) -> None:
    port = _free_port()  # nobody listens there
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "fedmosaic.cli", "client", "--server", f"127.0.0.1:{port}",
         "--retry-budget", "1.5", *world.creds("c1"), "--data", "good.npz", "--trainer",
         "task.py:make_trainer"], cwd=world.root, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}"})
    took = time.monotonic() - start
    assert proc.returncode == ExitCode.UNREACHABLE, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: no progress with the server for 1.5 s (--retry-budget); last error: the server "
        "refuses connections (not running, or restarting)")
    assert took >= 1.5 and "Traceback" not in proc.stderr
    # Retries every few hundred milliseconds, one log line for them (rate-limited).
    assert proc.stderr.count("server unreachable") == 1


def _run_in_thread(world: World, port: int, trainer: object, *, budget: float = 30.0,
                   data: str = "good.npz") -> tuple[threading.Thread, dict[str, object]]:
    from fedmosaic.net.client import run_client

    with np.load(world.root / data) as npz:
        from fedmosaic.data import ArrayDataset

        dataset = ArrayDataset(npz["x"], npz["y"])
    outcome: dict[str, object] = {}

    def body() -> None:
        start = time.monotonic()
        try:
            outcome["report"] = run_client(
                f"127.0.0.1:{port}", ca=world.fed.ca_cert, cert=world.fed.client_cert("c1"),
                key=world.fed.client_key("c1"), trainer=trainer,  # type: ignore[arg-type]
                data=dataset, retry_budget=budget, poll_seconds=1.0)
        except Exception as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("listener", ["closed", "silent"])
def test_the_retry_budget_is_a_hard_limit(world: World, listener: str) -> None:
    """Nobody listening, or a listener that accepts and never answers (a hung server): the
    client gives up when the budget is spent, not a retry delay or a call timeout later."""
    import socket

    from fedmosaic.net.client_errors import UnreachableError

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if listener == "silent":
        sock.listen()
    else:
        sock.close()
    try:
        thread, outcome = _run_in_thread(world, port, _task_trainer(world.root), budget=1.5)
        thread.join(30)
    finally:
        sock.close()
    assert isinstance(outcome.get("error"), UnreachableError), outcome
    assert 1.5 <= float(outcome["seconds"]) < 2.5  # type: ignore[arg-type]


class ScriptedTrainer:
    """The task's trainer, whose ``fit`` raises the scripted errors in turn (None: trains)."""

    def __init__(self, inner: object, errors: list[BaseException | None],
                 evaluate_error: BaseException | None = None) -> None:
        from fedmosaic.train.base import TrainerWrapper

        class _Scripted(TrainerWrapper):
            def fit(self, weights, data, config):  # type: ignore[no-untyped-def]
                error = errors.pop(0) if errors else None
                if error is not None:
                    raise error
                return self.inner.fit(weights, data, config)

            def evaluate(self, weights, data):  # type: ignore[no-untyped-def]
                if evaluate_error is not None:
                    raise evaluate_error
                return self.inner.evaluate(weights, data)

        self.trainer = _Scripted(inner)  # type: ignore[arg-type]


def _rounds(running: RunningServer, numel: int, rounds: list[int]) -> threading.Thread:
    """Rounds of one task for c1 each, driven on the transport by hand."""
    import torch

    from fedmosaic.algorithms.strategy import ClientTask
    from fedmosaic.train.base import FitConfig

    def loop() -> None:
        for r in rounds:
            list(running.transport.fit(torch.zeros(numel), [ClientTask("c1", FitConfig(
                round=r, seed=r))], None))
        running.transport.finish()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def _wait_joined(running: RunningServer, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and "c1" not in running.transport.sessions:
        time.sleep(0.05)


def test_a_deterministic_training_error_is_reported_and_ends_the_client(
        world: World, tmp_path: Path) -> None:
    from fedmosaic.net.client_errors import TrainingFailedError

    fed_dir = Path(shutil.copytree(world.fed.root, tmp_path / "fed"))
    inner = _task_trainer(world.root)
    running = _server(fed_dir, inner, rounds=3)
    try:
        scripted = ScriptedTrainer(inner, [ValueError("labels must be 0..9\nsecond line")])
        thread, outcome = _run_in_thread(world, running.port, scripted.trainer)
        _wait_joined(running)
        driver = _rounds(running, inner.spec.numel, [1, 2, 3])
        thread.join(30)
        driver.join(30)
    finally:
        running.stop(0)
    error = outcome.get("error")
    assert isinstance(error, TrainingFailedError) and error.exit_code == 5
    assert str(error) == ("local training failed in round 1: ValueError: labels must be 0..9 "
                          "(it would fail the same way every round)")
    assert list(running.transport.refusals) == [
        (1, "c1", "training_failed", "ValueError: labels must be 0..9")]


def test_an_error_that_may_not_recur_lets_the_client_go_on(world: World,
                                                           tmp_path: Path) -> None:
    fed_dir = Path(shutil.copytree(world.fed.root, tmp_path / "fed"))
    inner = _task_trainer(world.root)
    running = _server(fed_dir, inner, rounds=2)
    try:
        scripted = ScriptedTrainer(inner, [MemoryError("out of memory"), None])
        thread, outcome = _run_in_thread(world, running.port, scripted.trainer)
        _wait_joined(running)
        driver = _rounds(running, inner.spec.numel, [1, 2])
        thread.join(30)
        driver.join(30)
    finally:
        running.stop(0)
    report = outcome.get("report")
    assert report is not None, outcome
    assert report.rounds == [2] and report.refused == [1]  # type: ignore[attr-defined]
    assert [r[2:] for r in running.transport.refusals] == [
        ("training_failed", "MemoryError: out of memory")]


def test_three_failures_in_a_row_end_the_client(world: World, tmp_path: Path) -> None:
    from fedmosaic.net.client_errors import TrainingFailedError

    fed_dir = Path(shutil.copytree(world.fed.root, tmp_path / "fed"))
    inner = _task_trainer(world.root)
    running = _server(fed_dir, inner, rounds=4)
    try:
        scripted = ScriptedTrainer(inner, [MemoryError("out of memory")] * 4)
        thread, outcome = _run_in_thread(world, running.port, scripted.trainer)
        _wait_joined(running)
        driver = _rounds(running, inner.spec.numel, [1, 2, 3, 4])
        thread.join(60)
        driver.join(60)
    finally:
        running.stop(0)
    error = outcome.get("error")
    assert isinstance(error, TrainingFailedError), outcome
    assert str(error) == ("local training failed 3 rounds in a row; last: MemoryError: out of "
                          "memory")
    assert [r[0] for r in running.transport.refusals] == [1, 2, 3]


def test_a_model_that_fails_on_its_own_data_is_found_after_joining(
        world: World, tmp_path: Path) -> None:
    """The server's checks pass (same layout, 64 features, labels 0-9) but the client's model
    raises on its own samples: the client refuses the open task as incompatible_data and
    stops, instead of failing every round."""
    from fedmosaic.net.client_errors import PermanentError

    fed_dir = Path(shutil.copytree(world.fed.root, tmp_path / "fed"))
    inner = _task_trainer(world.root)
    running = _server(fed_dir, inner, rounds=1)
    try:
        broken = ScriptedTrainer(inner, [], evaluate_error=RuntimeError(
            "expected scalar type Double but found Float"))
        thread, outcome = _run_in_thread(world, running.port, broken.trainer)
        _wait_joined(running)
        driver = _rounds(running, inner.spec.numel, [1])  # the round its joining starts
        thread.join(30)
        driver.join(40)
    finally:
        running.stop(0)
    error = outcome.get("error")
    assert isinstance(error, PermanentError) and error.exit_code == 3, outcome
    message = ("your model fails on your own data: RuntimeError: expected scalar type Double "
               "but found Float")
    assert str(error) == message
    assert list(running.transport.refusals) == [(1, "c1", "incompatible_data", message)]


def test_usage_and_data_file_errors_exit_with_code_2(world: World) -> None:
    code, _, err, took = world.client(*world.creds("c1"), "--data", "narrow.csv", "--trainer",
                                      "task.py:make_trainer")
    assert code == ExitCode.USAGE and "Traceback" not in err and took < 5.0
    assert err.strip().splitlines()[-1] == ("error: --data narrow.csv needs --label COLUMN "
                                            "(the column that holds the labels)")
    np.save(world.root / "x.npy", np.zeros((4, 64), dtype=np.float32))
    code, _, err, _ = world.client(*world.creds("c1"), "--data", "x.npy", "--trainer",
                                   "task.py:make_trainer")
    assert code == ExitCode.USAGE and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: x.npy: unsupported data file type "
                                                   "'.npy' (save x and y together with "
                                                   "numpy.savez)")


def test_ctrl_c_while_retrying_exits_130_without_a_traceback(world: World,
                                                             tmp_path: Path) -> None:
    import signal

    log = tmp_path / "client.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedmosaic.cli", "client", "--server",
             f"127.0.0.1:{_free_port()}", "--retry-budget", "60", *world.creds("c1"),
             "--data", "good.npz", "--trainer", "task.py:make_trainer"], cwd=world.root,
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}"})
    try:
        end = time.monotonic() + 60
        while "server unreachable" not in log.read_text() and time.monotonic() < end:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == ExitCode.INTERRUPTED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert text.strip().splitlines()[-1] == "error: interrupted"
    assert "Traceback" not in text


def test_run_client_diagnoses_a_server_hanging_up_on_its_certificate(world: World) -> None:
    """In ``run_client`` (no start-up check there): gRPC reports only "Socket closed"; the
    client's own handshakes find the verdict and it stops at once."""
    from fedmosaic.data import ArrayDataset
    from fedmosaic.net.client import run_client
    from fedmosaic.net.client_errors import PermanentError

    bundle = world.root / "bundle-inprocess"
    bundle.mkdir(exist_ok=True)
    (bundle / "ca.pem").write_bytes(world.fed.ca_cert.read_bytes()
                                    + world.foreign.ca_cert.read_bytes())
    with np.load(world.root / "good.npz") as npz:
        data = ArrayDataset(npz["x"], npz["y"])
    start = time.monotonic()
    with pytest.raises(PermanentError) as info:
        run_client(f"127.0.0.1:{world.port}", ca=bundle / "ca.pem",
                   cert=world.foreign.client_cert("c1"), key=world.foreign.client_key("c1"),
                   trainer=_task_trainer(world.root), data=data, retry_budget=60)
    assert time.monotonic() - start < 5.0
    assert info.value.reason == "foreign_ca"
    assert str(info.value) == ("the server does not trust this certificate: it was issued by "
                               "another CA than the server's")


def test_the_declared_profile_and_a_test_split_of_another_shape(world: World) -> None:
    import grpc

    from fedmosaic.data import ArrayDataset
    from fedmosaic.net.client import FederationClient
    from fedmosaic.net.client_errors import PermanentError

    def load(name: str) -> ArrayDataset:
        with np.load(world.root / name) as npz:
            return ArrayDataset(npz["x"], npz["y"])

    channel = grpc.insecure_channel("127.0.0.1:9")  # never used: no call is made
    try:
        trainer = _task_trainer(world.root)
        profile = FederationClient(channel, trainer, load("good.npz"),
                                   test_data=load("good.npz")).data_profile()
        assert (profile.feature_shape, profile.dtype, profile.num_samples) == \
            ((64,), "float32", 40)
        assert (profile.label_min, profile.label_max, profile.num_outputs,
                profile.num_test_samples) == (0, 9, 10, 40)
        # The model cannot run 10-feature samples: no outputs declared, the join says why.
        assert FederationClient(channel, trainer, load("narrow.npz")).data_profile() \
            .num_outputs == 0
        client = FederationClient(channel, trainer, load("good.npz"),
                                  test_data=load("narrow.npz"))
        with pytest.raises(PermanentError) as info:
            client.data_profile()
    finally:
        channel.close()
    assert str(info.value) == ("your local test split has samples of shape (10,), your "
                               "training data (64,)")
