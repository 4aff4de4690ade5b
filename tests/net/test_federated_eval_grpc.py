"""Federated evaluation over gRPC (issue #10): ``GrpcTransport.evaluate`` sends EVALUATE tasks,
clients (the real ``run_client`` runtime, as threads) download the model, evaluate it on their
local test split and answer with ``ReportEvaluation``; the sample-weighted mean equals what the
same clients give in simulation. Hostile reports (foreign task ids, replays, NaN metrics, no
samples) are refused with a label and never crash the server."""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.algorithms.strategy import FedAvg
from fedmosaic.data import ArrayDataset, ClientData, FederatedDataset
from fedmosaic.models import build_model
from fedmosaic.net.certs import FederationPaths, create_federation
from fedmosaic.net.client import ClientReport, _Stubs, run_client
from fedmosaic.net.errors import REFUSAL_KEY
from fedmosaic.net.monitoring import REJECT_REASONS
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.secagg import SecAggRoundDriver
from fedmosaic.net.server import start_server
from fedmosaic.net.settings import DeploySettings
from fedmosaic.net.transport import GrpcTransport
from fedmosaic.net.wire import (
    MAX_METRIC_MAGNITUDE,
    MAX_METRICS,
    WireError,
    check_evaluation,
    iter_chunks,
    spec_hash,
)
from fedmosaic.runtime.evaluation import EvalReport, FederatedEvaluation
from fedmosaic.runtime.simulate import simulate
from fedmosaic.runtime.tally import ClientFailure
from fedmosaic.train import TorchTrainer
from tests.conftest import make_blobs
from tests.net.harness import LiveClients, live_clients

CLIENTS = ["e0", "e1", "e2", "e3", "e4", "e5"]
NUMEL = 1000
CHUNK = 1024


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval-fed")
    create_federation(root, clients=CLIENTS, ca_passphrase=None)
    return root


def _trainer() -> TorchTrainer:
    return TorchTrainer(partial(build_model, "mlp", (5,), 3, hidden=(8,)), lr=0.1, batch_size=8)


def _blobs_with_tests() -> FederatedDataset:
    """Three clients with local test splits of different sizes, and one without."""
    clients = [ClientData(f"e{i}", make_blobs(n, seed=i), make_blobs(t, seed=50 + i))
               for i, (n, t) in enumerate([(30, 11), (20, 29), (25, 7)])]
    clients.append(ClientData("e3", make_blobs(15, seed=3)))
    return FederatedDataset(name="blobs", clients=clients, test=make_blobs(40, seed=99),
                            num_classes=3, feature_shape=(5,))


def test_evaluate_over_grpc_gives_the_simulation_s_weighted_mean(credentials: Path) -> None:
    fed = _blobs_with_tests()
    trainer = _trainer()
    weights = trainer.initial_weights(3) + 0.05 * torch.randn(
        trainer.spec.numel, generator=torch.Generator().manual_seed(1))
    settings = DeploySettings(credentials=credentials, address="127.0.0.1", port=0,
                              min_clients=len(fed.clients), heartbeat_interval=0.5,
                              round_deadline=30.0, wait_for_clients=30.0, chunk_bytes=256,
                              max_workers=16)
    transport = GrpcTransport(settings, numel=trainer.spec.numel,
                              spec_hash=spec_hash(trainer.spec), experiment="blobs", rounds=1)
    running = start_server(settings, transport)
    paths = FederationPaths(credentials)
    reports: dict[str, ClientReport] = {}

    def client(c: ClientData) -> None:
        reports[c.client_id] = run_client(
            f"127.0.0.1:{running.port}", ca=paths.ca_cert, cert=paths.client_cert(c.client_id),
            key=paths.client_key(c.client_id), trainer=_trainer(), data=c.train,
            test_data=c.test, retry_budget=30, poll_seconds=0.5)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in fed.clients]
    for t in threads:
        t.start()
    try:
        ids = transport.available_clients()
        assert ids == ["e0", "e1", "e2", "e3"]
        results = list(transport.evaluate(weights, ids, 4))
        status = transport.status()
        transport.finish()
        for t in threads:
            t.join(timeout=20)
    finally:
        running.stop(0)
    got = {r.client_id: r for r in results}
    assert set(got) == set(ids) and len(results) == len(ids)
    assert got["e3"] == ClientFailure("e3", "no local test split: this client has no local "
                                            "test split to evaluate the model on")
    evals = [got[c] for c in ("e0", "e1", "e2")]
    assert all(isinstance(r, EvalReport) for r in evals)
    # The same clients in simulation: each evaluates the weights on its test split.
    tests: dict[str, ArrayDataset] = {c.client_id: c.test for c in fed.clients[:3]
                                      if c.test is not None}
    local = {c: trainer.evaluate(weights, test) for c, test in tests.items()}
    for r in evals:
        assert isinstance(r, EvalReport)
        assert r.num_samples == len(tests[r.client_id])
        assert set(r.metrics) == {"loss", "accuracy"}
        assert r.metrics["loss"] == pytest.approx(local[r.client_id]["loss"], rel=1e-6)
        assert r.metrics["accuracy"] == local[r.client_id]["accuracy"]
    reported = [r for r in evals if isinstance(r, EvalReport)]
    total = sum(r.num_samples for r in reported)
    for name in ("loss", "accuracy"):
        over_grpc = math.fsum(r.num_samples * r.metrics[name] for r in reported) / total
        simulated = math.fsum(len(tests[c]) * local[c][name] for c in local) / total
        assert over_grpc == pytest.approx(simulated, rel=1e-6)
    # The pooled test data gives the same accuracy: a per-sample mean, weighted right.
    pooled = ArrayDataset(np.concatenate([t.x for t in tests.values()]),
                          np.concatenate([t.y for t in tests.values()]))
    assert math.fsum(r.num_samples * r.metrics["accuracy"] for r in reported) / total \
        == pytest.approx(trainer.evaluate(weights, pooled)["accuracy"], abs=1e-6)
    assert status.state == "waiting"  # the phase closed
    issues = {i.client_id: i for i in status.client_issues}
    assert (issues["e3"].code, issues["e3"].round) == ("no_test_data", 4)
    assert all(reports[c].joins == 1 for c in ids)


class Live(LiveClients):
    """Raw client calls against a live server whose loop runs one evaluation phase."""

    def start_evaluation(self, clients: list[str], weights: torch.Tensor,
                         round_num: int = 1) -> tuple[threading.Thread, list[Any]]:
        results: list[Any] = []

        def loop() -> None:
            results.extend(self.transport.evaluate(weights, clients, round_num))

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread, results


@pytest.fixture
def live(credentials: Path, tmp_path: Path) -> Iterator[Live]:
    fed = Path(shutil.copytree(credentials, tmp_path / "fed"))
    with live_clients(Live, fed, numel=NUMEL, chunk_bytes=CHUNK) as srv:
        yield srv


def _task(stubs: _Stubs, instance: str) -> pb.Task:
    task = stubs.get_task(pb.TaskRequest(server_instance=instance, wait_seconds=10), timeout=20)
    assert task.kind == pb.Task.EVALUATE
    return task


def _report(task: pb.Task, *, n: int = 10, round_num: int | None = None,
            **metrics: float) -> pb.EvaluationReport:
    return pb.EvaluationReport(task_id=task.task_id,
                               round=task.round if round_num is None else round_num,
                               num_samples=n, metrics=metrics or {"loss": 0.5, "accuracy": 0.8})


def _refused(call: Any) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    meta = {m.key: m.value for m in info.value.trailing_metadata() or ()}
    return info.value.code(), info.value.details(), meta.get(REFUSAL_KEY, "")


def test_hostile_evaluation_reports_are_refused_with_a_label(
        live: Live, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedmosaic")
    weights = torch.linspace(-1, 1, NUMEL)
    joined = {c: live.joined(c) for c in CLIENTS}
    thread, results = live.start_evaluation(CLIENTS[:5], weights, round_num=3)
    tasks = {c: _task(*joined[c]) for c in CLIENTS[:5]}
    stubs = {c: joined[c][0] for c in CLIENTS}
    t0, t1, t2, t3, t4 = (tasks[c] for c in CLIENTS[:5])
    assert t0.round == 3 and t0.numel == NUMEL and len(t0.task_id) == 16
    assert len({t.task_id for t in tasks.values()}) == 5
    # The model to evaluate downloads as for a fit.
    got = np.concatenate([np.frombuffer(c.data, dtype="<f4") for c in
                          stubs["e0"].download(pb.ModelRequest(task_id=t0.task_id), timeout=10)])
    assert np.array_equal(got, weights.numpy())
    # Someone else's task id; a client not selected at all: refused, e0's task stays open.
    assert _refused(lambda: stubs["e1"].report_evaluation(_report(t0), timeout=10))[::2] == \
        (grpc.StatusCode.PERMISSION_DENIED, "foreign_task")
    assert _refused(lambda: stubs["e5"].report_evaluation(_report(t0), timeout=10))[::2] == \
        (grpc.StatusCode.PERMISSION_DENIED, "foreign_task")
    # Another round: refused, the task stays open.
    code, detail, label = _refused(lambda: stubs["e0"].report_evaluation(
        _report(t0, round_num=2), timeout=10))
    assert (code, label) == (grpc.StatusCode.FAILED_PRECONDITION, "wrong_round")
    assert "round 3" in detail
    # An update upload for an evaluation task: refused.
    header = pb.UploadMessage(header=pb.UploadHeader(task_id=t0.task_id, round=3, num_samples=5,
                                                     numel=NUMEL))
    chunks = [pb.UploadMessage(chunk=c) for c in iter_chunks(torch.ones(NUMEL), CHUNK)]
    assert _refused(lambda: stubs["e0"].upload(iter([header, *chunks]), timeout=10))[::2] == \
        (grpc.StatusCode.FAILED_PRECONDITION, "task_state")
    # Undecodable bytes: malformed, nothing touched.
    raw = live.channel("e0").unary_unary("/fedmosaic.v1.Federation/ReportEvaluation")
    assert _refused(lambda: raw(b"\x0a\xff\xff\xff", timeout=10))[::2] == \
        (grpc.StatusCode.INVALID_ARGUMENT, "malformed")
    # The owner's report is accepted once; a replay is refused.
    reply = stubs["e0"].report_evaluation(_report(t0, n=10, loss=0.25, accuracy=0.9), timeout=10)
    assert reply.accepted and reply.detail == "evaluation of round 3 recorded"
    assert _refused(lambda: stubs["e0"].report_evaluation(_report(t0), timeout=10))[::2] == \
        (grpc.StatusCode.FAILED_PRECONDITION, "replay")
    # A NaN metric, no samples, an absurd value: refused with a label, the task is spent.
    code, detail, label = _refused(lambda: stubs["e1"].report_evaluation(
        _report(t1, loss=math.nan), timeout=10))
    assert (code, label) == (grpc.StatusCode.INVALID_ARGUMENT, "non_finite")
    assert detail == "metric 'loss' is nan, not finite"
    assert _refused(lambda: stubs["e1"].report_evaluation(_report(t1), timeout=10))[::2] == \
        (grpc.StatusCode.FAILED_PRECONDITION, "replay")
    code, detail, label = _refused(lambda: stubs["e2"].report_evaluation(
        _report(t2, n=0), timeout=10))
    assert (code, label) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_evaluation")
    assert detail == "num_samples 0 outside [1, 1099511627776]"
    code, _, label = _refused(lambda: stubs["e4"].report_evaluation(
        _report(t4, loss=1e300), timeout=10))
    assert (code, label) == (grpc.StatusCode.INVALID_ARGUMENT, "oversized")
    # A client without a test split says so.
    stubs["e3"].refuse_task(pb.TaskRefusal(task_id=t3.task_id, round=3, code="no_test_data",
                                           reason="no local test split"), timeout=10)
    thread.join(timeout=20)
    assert not thread.is_alive()
    by_client = {r.client_id: r for r in results}
    assert by_client["e0"] == EvalReport("e0", 10, {"loss": 0.25, "accuracy": 0.9})
    assert by_client["e1"] == ClientFailure(
        "e1", "evaluation report from client 'e1' rejected: metric 'loss' is nan, not finite")
    assert by_client["e2"] == ClientFailure(
        "e2", "evaluation report from client 'e2' rejected: num_samples 0 outside "
              "[1, 1099511627776]")
    assert by_client["e3"] == ClientFailure("e3", "no local test split: no local test split")
    assert isinstance(by_client["e4"], ClientFailure) and len(results) == 5
    # The phase is over: its task ids are void.
    assert _refused(lambda: stubs["e0"].report_evaluation(_report(t0), timeout=10))[::2] == \
        (grpc.StatusCode.FAILED_PRECONDITION, "unknown_task")
    # The server is fine, and the operator sees why each client gave no evaluation.
    status = _Stubs(live.channel("operator")).status(pb.StatusRequest(), timeout=10)
    issues = {i.client_id: (i.code, i.round) for i in status.client_issues}
    assert issues == {"e1": ("rejected_evaluation", 3), "e2": ("rejected_evaluation", 3),
                      "e3": ("no_test_data", 3), "e4": ("rejected_evaluation", 3)}
    snap = live.metrics.snapshot()
    assert snap["clients_refused"]["rejected_evaluation"] == 3
    assert snap["clients_refused"]["no_test_data"] == 1
    assert snap["rejected_messages"]["foreign_task"] == 2
    assert snap["rejected_messages"]["non_finite"] == 1
    assert "client e3 could not run its evaluate task (no_test_data)" in caplog.text
    # Structured fields for a JSON log pipeline: which client, which problem.
    assert {(getattr(r, "client", None), getattr(r, "code", None)) for r in caplog.records
            if getattr(r, "round", None) == 3} >= {("e3", "no_test_data"),
                                                  ("e1", "rejected_evaluation")}
    assert not [r for r in caplog.records if r.exc_info]  # no tracebacks


def test_a_silent_client_is_dropped_from_the_evaluation(live: Live) -> None:
    """Heartbeat loss ends a client's evaluation task as it ends a fit task."""
    active, instance = live.joined("e0")
    live.joined("e1")  # joins, then never heard from again
    start = time.monotonic()
    thread, results = live.start_evaluation(["e0", "e1", "e5"], torch.zeros(NUMEL), 2)
    task = _task(active, instance)
    active.report_evaluation(_report(task), timeout=10)
    thread.join(timeout=20)
    by_client = {r.client_id: r for r in results}
    assert by_client["e5"] == ClientFailure("e5", "not connected")
    assert by_client["e1"] == ClientFailure(
        "e1", "lost contact (no heartbeat): dropped from the evaluation")
    assert isinstance(by_client["e0"], EvalReport)
    # Dropped after the liveness timeout (three heartbeat intervals), not the deadline.
    assert time.monotonic() - start < live.transport.settings.round_deadline / 2
    issue = live.transport.issues.get("e1")
    assert issue is not None and (issue.code, issue.round) == ("heartbeat_timeout", 2)


_METRIC_NAMES = st.text(min_size=0, max_size=80)
_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.floats(min_value=-1e16, max_value=1e16))


@settings(max_examples=300, deadline=None)
@given(num_samples=st.integers(min_value=0, max_value=2**64 - 1),
       metrics=st.dictionaries(_METRIC_NAMES, _VALUES, max_size=70))
def test_any_evaluation_report_is_accepted_clean_or_refused_with_a_known_label(
        num_samples: int, metrics: dict[str, float]) -> None:
    """Whatever a client puts in a report (it arrives through protobuf's own checks), the
    server's check either yields a sample count in range and finite bounded metrics under
    printable names, or refuses it with a label of the bounded metric."""
    msg = pb.EvaluationReport(task_id=b"t" * 16, round=1, num_samples=num_samples,
                              metrics=metrics)
    try:
        n, clean = check_evaluation(msg)
    except WireError as exc:
        assert exc.label in REJECT_REASONS and exc.label != "other"
        assert str(exc).isprintable()
        return
    assert 1 <= n <= 2**40 and n == num_samples
    assert len(clean) <= MAX_METRICS
    assert all(k and k.isprintable() and len(k) <= 64 for k in clean)
    assert all(math.isfinite(v) and abs(v) <= MAX_METRIC_MAGNITUDE for v in clean.values())
    assert clean == {k: float(v) for k, v in msg.metrics.items()}


_FIT_LOCK = threading.Lock()


class _ClientThreadTrainer(TorchTrainer):
    """Client threads share torch's global RNG, which each fit seeds and ``initial_weights``
    saves and restores (``fork_rng``): neither may interleave with a fit (separate client
    processes need no lock)."""

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        with _FIT_LOCK:
            return super().fit(*args, **kwargs)

    def initial_weights(self, seed: int) -> torch.Tensor:
        with _FIT_LOCK:
            return super().initial_weights(seed)


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "secagg"])
def test_a_deployed_run_with_federated_evaluation_records_the_simulation_s_metrics(
        credentials: Path, secure: bool) -> None:
    """The server loop (``simulate`` with a ``GrpcTransport`` and ``FederatedEvaluation``)
    over real client threads records the ``fed_test_*`` metrics of the simulation, with
    plaintext uploads or SecAgg+ rounds (whose evaluation phase is plain: reports are not
    secret-shared)."""
    # Six clients (SecAgg+ with its default dropout and corruption bounds needs them), five
    # with a local test split.
    clients = [ClientData(f"e{i}", make_blobs(n, seed=i), make_blobs(t, seed=50 + i))
               for i, (n, t) in enumerate([(40, 11), (25, 29), (60, 7), (13, 9), (33, 14)])]
    clients.append(ClientData("e5", make_blobs(50, seed=5)))
    fed = FederatedDataset(name="blobs", clients=clients, test=make_blobs(40, seed=99),
                           num_classes=3, feature_shape=(5,))
    rounds = 2
    reference = simulate(_trainer(), fed, FedAvg(), rounds, seed=5,
                         federated_eval=FederatedEvaluation(), central_eval=False)
    trainer = _trainer()
    settings = DeploySettings(credentials=credentials, address="127.0.0.1", port=0,
                              min_clients=len(fed.clients), heartbeat_interval=1.0,
                              round_deadline=60.0, wait_for_clients=60.0, chunk_bytes=256,
                              max_workers=16)
    secagg = SecAggRoundDriver(clip=1.0, max_weight=64.0, uniform=False) if secure else None
    transport = GrpcTransport(settings, numel=trainer.spec.numel,
                              spec_hash=spec_hash(trainer.spec), experiment="blobs",
                              rounds=rounds, secagg=secagg)
    if secagg is not None:
        secagg.check_strategy(FedAvg())
    running = start_server(settings, transport)
    paths = FederationPaths(credentials)
    trainers = {c.client_id: _ClientThreadTrainer(
        partial(build_model, "mlp", (5,), 3, hidden=(8,)), lr=0.1, batch_size=8)
        for c in fed.clients}

    def client(c: ClientData) -> None:
        run_client(f"127.0.0.1:{running.port}", ca=paths.ca_cert,
                   cert=paths.client_cert(c.client_id), key=paths.client_key(c.client_id),
                   trainer=trainers[c.client_id], data=c.train, test_data=c.test,
                   retry_budget=60, poll_seconds=1.0)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in fed.clients]
    for t in threads:
        t.start()
    try:
        result = simulate(trainer, fed, FedAvg(), rounds, seed=5, transport=transport,
                          federated_eval=FederatedEvaluation(), central_eval=False)
        transport.finish()
        for t in threads:
            t.join(timeout=30)
    finally:
        running.stop(0)
    # SecAgg+ sums fixed-point quantized updates: equal up to the quantization.
    assert torch.allclose(result.weights, reference.weights, atol=1e-5 if secure else 1e-6)
    for got, want in zip(result.history, reference.history, strict=True):
        assert got["updates"] == 6
        assert (got["fed_eval_clients"], got["fed_eval_failures"]) == (5, 1)
        assert (want["fed_eval_clients"], want["fed_eval_failures"]) == (5, 1)
        assert got["fed_eval_samples"] == want["fed_eval_samples"] == 11 + 29 + 7 + 9 + 14
        assert got["fed_test_loss"] == pytest.approx(want["fed_test_loss"],
                                                     rel=1e-4 if secure else 1e-5)
        assert got["fed_test_accuracy"] == pytest.approx(want["fed_test_accuracy"],
                                                         abs=1e-9)
    issue = transport.issues.get("e5")
    assert issue is not None and (issue.code, issue.round) == ("no_test_data", rounds)
