"""Fuzz: at least 10,000 malformed or hostile messages against a live server process (issue #5).

A real ``fedmosaic server`` process (mutual TLS) serves a digits run to three honest client
processes. Meanwhile this test, holding a federation member's valid certificate, sends hostile
messages to every RPC over the real gRPC channel: undecodable bytes, truncated protobufs,
oversized messages, wrong element counts, NaN and infinite chunks, byte lengths that are not
whole float32 values, old and future rounds, replayed and other clients' task ids, out-of-order
and overlapping chunk offsets; plus calls from connections without a certificate, with one
from another CA, and with a revoked one. Messages are drawn from a seeded generator.

The hostile member paces the run: each round it holds its task until that round's share of the
flood has been sent, then spoils the task with one malformed upload (a different kind each
round), so every kind of bad upload is also tried against a live task.

Asserted: every hostile message is answered with an error status (the exact one wherever the
server's answer is determined); mid-flood the server process is alive and answers Status; the
rejected-messages metric grows by at least the number of refusals the service sent, and the
server's JSON log accounts for each refusal (a line each, or a per-caller summary line once a
caller has had its burst of lines); and the run finishes every round, each aggregating all
three honest updates and rejecting the hostile one.

Undecodable bytes reach the service as raw bytes and are refused there (INVALID_ARGUMENT,
counted as ``malformed``): no hostile message is ever answered INTERNAL.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError

from fedmosaic.net.certs import FederationPaths
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.wire import REFUSAL_CODES
from tests.net.conftest import (
    CLIENTS,
    REVOKED,
    Processes,
    experiment_toml,
    server_status,
    wait_for_endpoint,
)

pytestmark = pytest.mark.slow

SEED = 20261128
ROUNDS = 12  # one per kind of spoiled upload (_spoiled_uploads)
TARGET = 10_000
MIN_PER_ROUND = 150
CHUNK_BYTES = 4096
MAX_MESSAGE = CHUNK_BYTES + 64 * 1024  # the server's limit: one chunk plus the envelope
HONEST = CLIENTS[:3]
HOSTILE = CLIENTS[3]  # a federation member turned hostile
STRANGER = CLIENTS[4]  # a valid member that never joins, trying the hostile's task ids
METHOD = "/fedmosaic.v1.Federation/"
UNARY = ("Join", "Heartbeat", "GetTask", "SecAgg", "Status", "RefuseTask", "ReportEvaluation")
ALL_METHODS = (*UNARY, "DownloadModel", "UploadUpdate")
TIMEOUT = 20.0
C = grpc.StatusCode
# Answers the service itself gives (each one counted by the metric). Failures of the TLS
# handshake, the size limit and undecodable bytes are answered by gRPC before the service runs.
SERVICE_CODES = {C.PERMISSION_DENIED, C.FAILED_PRECONDITION, C.INVALID_ARGUMENT}
REFUSAL_LINE = re.compile(rf"refused ({'|'.join(ALL_METHODS)}) from ")
SUMMARY_LINE = re.compile(r"refused (\d+) more calls from ")


@dataclass(frozen=True)
class Attack:
    """One hostile call: who sends what to which method, and the answer the server owes."""

    kind: str
    conn: str  # hostile, stranger, operator, revoked, no_cert, foreign_ca
    method: str
    payload: bytes | list[bytes]
    expected: grpc.StatusCode | None  # None: any error status


@dataclass(frozen=True)
class Outcome:
    kind: str
    expected: grpc.StatusCode | None
    code: grpc.StatusCode
    details: str


class Wire:
    """Raw calls with identity serializers, so any bytes can be sent to any method."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.unary = {m: channel.unary_unary(METHOD + m) for m in UNARY}
        self.download = channel.unary_stream(METHOD + "DownloadModel")
        self.upload = channel.stream_unary(METHOD + "UploadUpdate")

    def call(self, method: str, payload: bytes | list[bytes]) -> tuple[grpc.StatusCode, str]:
        try:
            if method == "UploadUpdate":
                assert isinstance(payload, list)
                self.upload(iter(payload), timeout=TIMEOUT)
            elif method == "DownloadModel":
                assert isinstance(payload, bytes)
                for _ in self.download(payload, timeout=TIMEOUT):
                    pass
            else:
                assert isinstance(payload, bytes)
                self.unary[method](payload, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return C.OK, ""


def _channel(port: int, ca: Path, cert: Path | None = None,
             key: Path | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        ca.read_bytes(), key.read_bytes() if key else None, cert.read_bytes() if cert else None)
    # The client may send anything; the server's limits are what is under test.
    return grpc.secure_channel(f"127.0.0.1:{port}", creds,
                               options=[("grpc.max_send_message_length", -1)])


# --- message builders ---------------------------------------------------------------------------

def _header(task_id: bytes, round_: int, numel: int, num_samples: int = 10,
            metrics: dict[str, float] | None = None) -> bytes:
    return pb.UploadMessage(header=pb.UploadHeader(
        task_id=task_id, round=round_, num_samples=num_samples, numel=numel,
        metrics=metrics if metrics is not None else {"train_loss": 0.5})).SerializeToString()


def _chunk(offset: int, values: np.ndarray | bytes) -> bytes:
    data = values if isinstance(values, bytes) else values.astype("<f4").tobytes()
    return pb.UploadMessage(chunk=pb.TensorChunk(offset=offset, data=data)).SerializeToString()


def _chunks(values: np.ndarray, per_chunk: int = CHUNK_BYTES // 4) -> list[bytes]:
    return [_chunk(i, values[i:i + per_chunk]) for i in range(0, len(values), per_chunk)]


def _spoiled_uploads(task_id: bytes, round_: int, numel: int, rng: np.random.Generator
                     ) -> list[tuple[str, list[bytes]]]:
    """Malformed uploads against a live task; each one is rejected and ends the task."""
    good = rng.normal(0, 0.01, numel).astype(np.float32)
    head = _header(task_id, round_, numel)
    nan, inf = good.copy(), good.copy()
    nan[numel // 2] = np.nan
    inf[-1] = -np.inf
    return [
        ("wrong_numel", [_header(task_id, round_, numel + 7), *_chunks(good)]),
        ("zero_samples", [_header(task_id, round_, numel, num_samples=0), *_chunks(good)]),
        ("nan_metric", [_header(task_id, round_, numel, metrics={"loss": math.nan}),
                        *_chunks(good)]),
        ("nan_chunk", [head, *_chunks(nan)]),
        ("inf_chunk", [head, *_chunks(inf)]),
        ("ragged_bytes", [head, _chunk(0, good.tobytes() + b"\x00\x01")]),
        ("out_of_order", [head, _chunk(16, good[16:32]), _chunk(0, good[:16])]),
        ("overlapping", [head, _chunk(0, good[:32]), _chunk(16, good[16:])]),
        ("past_the_end", [head, *_chunks(np.concatenate([good, good[:5]]))]),
        ("short_stream", [head, *_chunks(good[:-3])]),
        ("chunk_over_limit", [head, _chunk(0, rng.normal(0, 1, CHUNK_BYTES // 4 + 1))]),
        ("second_header", [head, head, *_chunks(good)]),
    ]


class Fuzzer:
    """Sends hostile calls over the real channels and records every answer."""

    def __init__(self, port: int, fed: FederationPaths, foreign: FederationPaths,
                 gen: Attacks) -> None:
        self.port, self.fed, self.foreign, self.gen = port, fed, foreign, gen
        self.wires = {
            "hostile": Wire(_channel(port, fed.ca_cert, fed.client_cert(HOSTILE),
                                     fed.client_key(HOSTILE))),
            "stranger": Wire(_channel(port, fed.ca_cert, fed.client_cert(STRANGER),
                                      fed.client_key(STRANGER))),
            "operator": Wire(_channel(port, fed.ca_cert, fed.operator_cert, fed.operator_key)),
            "revoked": Wire(_channel(port, fed.ca_cert, fed.client_cert(REVOKED),
                                     fed.client_key(REVOKED))),
        }
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fuzz")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        for w in self.wires.values():
            w.channel.close()

    def _run(self, attack: Attack) -> None:
        if attack.conn in ("no_cert", "foreign_ca"):
            # A fresh connection each time, so each one is a full TLS handshake.
            cert = key = None
            if attack.conn == "foreign_ca":
                # The conftest's other CA issued a certificate for a legitimate-looking id.
                cert = self.foreign.client_cert(CLIENTS[0])
                key = self.foreign.client_key(CLIENTS[0])
            channel = _channel(self.port, self.fed.ca_cert, cert, key)
            try:
                code, details = Wire(channel).call(attack.method, attack.payload)
            finally:
                channel.close()
        else:
            code, details = self.wires[attack.conn].call(attack.method, attack.payload)
        with self.lock:
            self.outcomes.append(Outcome(attack.kind, attack.expected, code, details))

    def send(self, attacks: list[Attack]) -> None:
        list(self.pool.map(self._run, attacks))

    def legit(self, method: str, message: bytes) -> bytes:
        """A well-formed call of the hostile member itself (not counted as hostile)."""
        return self.wires["hostile"].unary[method](message, timeout=TIMEOUT)


class Attacks:
    """Draws hostile calls from a seeded generator."""

    def __init__(self, numel: int, spec: str, seed: int = SEED) -> None:
        self.numel, self.spec = numel, spec
        self.rng = random.Random(seed)
        self.nprng = np.random.default_rng(seed)
        self.blob = self.rng.randbytes(MAX_MESSAGE + 8192)  # source of garbage and oversize
        self.instance = ""  # the hostile member's server instance, once joined
        self.old_tasks: list[tuple[bytes, int]] = []  # its tasks of rounds already closed

    def _garbage(self, lo: int = 1, hi: int = 2048) -> bytes:
        n = self.rng.randint(lo, hi)
        start = self.rng.randrange(0, len(self.blob) - n)
        return self.blob[start:start + n]

    def _forged(self, method: str) -> tuple[bytes | list[bytes], C]:
        """A well-formed message with forged content, and the service's answer to it."""
        r = self.rng
        if method == "Join":
            return pb.JoinRequest(spec_hash=r.randbytes(8).hex()).SerializeToString(), \
                C.FAILED_PRECONDITION
        if method == "Heartbeat":
            return pb.HeartbeatRequest(server_instance=r.randbytes(8).hex()
                                       ).SerializeToString(), C.FAILED_PRECONDITION
        if method == "GetTask":
            wait = r.choice([math.nan, -1.0, 1e308, 0.0, 5.0])
            return pb.TaskRequest(server_instance=r.randbytes(8).hex(), wait_seconds=wait
                                  ).SerializeToString(), C.FAILED_PRECONDITION
        if method == "SecAgg":
            return pb.SecAggEnvelope(task_id=r.randbytes(16), payload=self._garbage(0, 512)
                                     ).SerializeToString(), C.FAILED_PRECONDITION
        if method == "Status":
            return b"", C.PERMISSION_DENIED  # a client credential may not ask
        if method == "RefuseTask":
            if r.random() < 0.5:  # well-formed, for a task id that does not exist
                return pb.TaskRefusal(task_id=r.randbytes(16), round=r.randint(-5, 10**6),
                                      code=r.choice(REFUSAL_CODES), reason="policy says no"
                                      ).SerializeToString(), C.FAILED_PRECONDITION
            code, reason = r.choice([("not_a_code", "x"), ("secagg_required", ""),
                                     ("secagg_required", "y" * 513),
                                     ("secagg_required", "bell\x07 and \x1b[31m escape"),
                                     ("\x00" * 4, "reason")])
            return pb.TaskRefusal(task_id=r.randbytes(16), code=code, reason=reason
                                  ).SerializeToString(), C.INVALID_ARGUMENT
        if method == "ReportEvaluation":  # well-formed, for a task id that does not exist
            return pb.EvaluationReport(task_id=r.randbytes(16), round=r.randint(1, 10**6),
                                       num_samples=r.randint(1, 10**6),
                                       metrics={"loss": r.random(), "accuracy": r.random()}
                                       ).SerializeToString(), C.FAILED_PRECONDITION
        if method == "DownloadModel":
            return pb.ModelRequest(task_id=r.randbytes(r.choice([0, 1, 16, 64]))
                                   ).SerializeToString(), C.FAILED_PRECONDITION
        values = self.nprng.normal(0, 1, r.choice([1, self.numel, self.numel + 1])
                                   ).astype(np.float32)
        values[r.randrange(len(values))] = r.choice([math.nan, math.inf, -math.inf, 1.0])
        parts = [_header(r.randbytes(16), r.randint(-5, 10**6), r.choice([0, self.numel,
                                                                          2**40])),
                 *_chunks(values)]
        return parts, C.FAILED_PRECONDITION  # unknown task id, whatever follows

    def generic(self) -> Attack:
        """A hostile call that needs no live task."""
        r = self.rng
        method = r.choice(ALL_METHODS)
        roll = r.random()
        if roll < 0.30:  # undecodable (or, by chance, decodable but meaningless) bytes
            payload: bytes | list[bytes] = (
                [self._garbage() for _ in range(r.randint(1, 3))]
                if method == "UploadUpdate" else self._garbage())
            return Attack("garbage", "hostile", method, payload, None)
        if roll < 0.45:  # a forged message cut short
            forged, _ = self._forged(method)
            whole = forged[0] if isinstance(forged, list) else forged
            whole = whole or pb.JoinRequest(spec_hash="x" * 16).SerializeToString()
            cut = whole[:r.randrange(1, len(whole))] if len(whole) > 1 else b"\xff"
            return Attack("truncated", "hostile", method,
                          [cut] if method == "UploadUpdate" else cut, None)
        if roll < 0.48:  # over the server's message size limit
            big = self.blob[:MAX_MESSAGE + r.randint(1, 8000)]
            return Attack("oversized", "hostile", method,
                          [big] if method == "UploadUpdate" else big, C.RESOURCE_EXHAUSTED)
        if roll < 0.78:  # well-formed, forged content
            payload, expected = self._forged(method)
            return Attack(f"forged_{method}", "hostile", method, payload, expected)
        if roll < 0.83 and self.old_tasks:  # a task id of a round already closed
            task_id, round_ = r.choice(self.old_tasks)
            good = self.nprng.normal(0, 0.01, self.numel).astype(np.float32)
            return Attack("replayed_old_task", "hostile", "UploadUpdate",
                          [_header(task_id, round_, self.numel), *_chunks(good)],
                          C.FAILED_PRECONDITION)
        if roll < 0.86:  # the operator credential may not train
            return Attack("operator_join", "operator", "Join",
                          pb.JoinRequest(spec_hash=self.spec).SerializeToString(),
                          C.PERMISSION_DENIED)
        if roll < 0.90:  # a valid member that never joined
            m = r.choice(["Heartbeat", "GetTask"])
            msg = (pb.HeartbeatRequest(server_instance=self.instance) if m == "Heartbeat"
                   else pb.TaskRequest(server_instance=self.instance))
            return Attack("not_joined", "stranger", m, msg.SerializeToString(),
                          C.FAILED_PRECONDITION)
        if roll < 0.97:  # a revoked credential, with well-formed messages
            m = r.choice(ALL_METHODS)
            payload, _ = self._forged(m)
            if m == "Join":
                payload = pb.JoinRequest(spec_hash=self.spec).SerializeToString()
            return Attack("revoked", "revoked", m, payload, C.PERMISSION_DENIED)
        conn = r.choice(["no_cert", "foreign_ca"])
        payload = pb.JoinRequest(spec_hash=self.spec).SerializeToString()
        return Attack(f"unauthenticated_{conn}", conn, "Join", payload, C.UNAVAILABLE)

    def task_bound(self, task: pb.Task) -> Attack:
        """A hostile call against the hostile member's live task; none of these ends it."""
        r = self.rng
        tid, rnd = task.task_id, task.round
        good = self.nprng.normal(0, 0.01, self.numel).astype(np.float32)
        roll = r.random()
        if roll < 0.45:  # the right task, an old or future round
            wrong = r.choice([rnd - r.randint(1, max(rnd, 1)), rnd + r.randint(1, 3),
                              2**40, -(2**40), 0])
            return Attack("wrong_round", "hostile", "UploadUpdate",
                          [_header(tid, wrong, self.numel), *_chunks(good)],
                          C.FAILED_PRECONDITION)
        if roll < 0.65:  # another client's task id
            if r.random() < 0.5:
                return Attack("foreign_task_upload", "stranger", "UploadUpdate",
                              [_header(tid, rnd, self.numel), *_chunks(good)],
                              C.PERMISSION_DENIED)
            return Attack("foreign_task_download", "stranger", "DownloadModel",
                          pb.ModelRequest(task_id=tid).SerializeToString(), C.PERMISSION_DENIED)
        if roll < 0.70:  # another member refusing the hostile's task to drop it
            refusal = pb.TaskRefusal(task_id=tid, round=rnd, code="secagg_required",
                                     reason="not mine to refuse")
            return Attack("foreign_task_refusal", "stranger", "RefuseTask",
                          refusal.SerializeToString(), C.PERMISSION_DENIED)
        if roll < 0.75:
            return Attack("revoked_with_live_task", "revoked", "UploadUpdate",
                          [_header(tid, rnd, self.numel), *_chunks(good)], C.PERMISSION_DENIED)
        if roll < 0.90:  # the live header cut short: the outer message no longer decodes
            whole = _header(tid, rnd, self.numel)
            return Attack("truncated_live_header", "hostile", "UploadUpdate",
                          [whole[:r.randrange(1, len(whole))]], C.INVALID_ARGUMENT)
        # Chunks before any header (the task stays open: no header, no task).
        return Attack("chunk_before_header", "hostile", "UploadUpdate",
                      [*_chunks(good), _header(tid, rnd, self.numel)], C.INVALID_ARGUMENT)


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def _rejected_total(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("fedmosaic_rejected_messages_total"))


def _model(experiment: Path) -> tuple[int, str]:
    from fedmosaic.build import build_data, build_trainer
    from fedmosaic.config import load_experiment
    from fedmosaic.net.server import spec_hash

    exp = load_experiment(experiment)
    trainer = build_trainer(exp, build_data(exp))
    return trainer.spec.numel, spec_hash(trainer.spec)


def _heartbeats(fuzzer: Fuzzer, stop: threading.Event) -> None:
    # The hostile member stays "connected", so the server keeps giving it tasks.
    while not stop.wait(0.3):
        with contextlib.suppress(grpc.RpcError):
            fuzzer.legit("Heartbeat", pb.HeartbeatRequest(
                server_instance=fuzzer.gen.instance).SerializeToString())


def _poll(fuzzer: Fuzzer) -> pb.Task:
    return pb.Task.FromString(fuzzer.legit("GetTask", pb.TaskRequest(
        server_instance=fuzzer.gen.instance, wait_seconds=0.0).SerializeToString()))


def test_server_survives_ten_thousand_hostile_messages(
        tmp_path: Path, federation: Path, foreign_federation: Path,
        processes: Processes) -> None:
    fed, foreign = FederationPaths(federation), FederationPaths(foreign_federation)
    experiment = experiment_toml(
        tmp_path / "fuzz.toml", federation, rounds=ROUNDS,
        server={"min_clients": len(HONEST) + 1, "heartbeat_interval": 2.0,
                "round_deadline": 60.0, "chunk_bytes": CHUNK_BYTES, "metrics_port": 0,
                "linger": 2.0,
                # The flood's 8 parallel calls, the heartbeats and the polls stay within the
                # member's budget: this test is about content (test_admission: budgets).
                "max_inflight_per_client": 16})
    out = tmp_path / "out"
    server = processes.server(experiment, out, "--json-logs")
    endpoint = wait_for_endpoint(out, processes)
    port, metrics_port = endpoint["port"], endpoint["metrics_port"]
    for cid in HONEST:
        processes.client(cid, port, federation, experiment)
    numel, spec = _model(experiment)
    baseline = _rejected_total(_scrape(metrics_port))

    gen = Attacks(numel, spec)
    fuzzer = Fuzzer(port, fed, foreign, gen)
    stop = threading.Event()
    beats = threading.Thread(target=_heartbeats, args=(fuzzer, stop), daemon=True)
    try:
        join = pb.JoinReply.FromString(fuzzer.legit(
            "Join", pb.JoinRequest(spec_hash=spec).SerializeToString()))
        assert join.client_id == HOSTILE and join.numel == numel
        gen.instance = join.server_instance
        beats.start()
        spoilers_used: list[str] = []
        mid_flood: dict[str, object] = {}
        t0 = time.monotonic()
        while time.monotonic() - t0 < 240:
            task = _poll(fuzzer)
            assert task.kind != pb.Task.DONE, "the run ended before the hostile's last round"
            if task.kind != pb.Task.FIT:
                # Waiting for the honest clients to start: a gentler flood, so that the two
                # shared cores also start them (their imports take seconds).
                fuzzer.send([gen.generic() for _ in range(48)])
                time.sleep(0.25)
                continue
            # A live task: three legitimate downloads, then the flood, then one spoiled upload.
            download = pb.ModelRequest(task_id=task.task_id).SerializeToString()
            for _ in range(3):
                assert fuzzer.wires["hostile"].call("DownloadModel", download)[0] == C.OK
            fuzzer.send([Attack("download_limit", "hostile", "DownloadModel", download,
                                C.RESOURCE_EXHAUSTED) for _ in range(2)])
            left_rounds = ROUNDS - task.round + 1
            quota = max(MIN_PER_ROUND, -(-(TARGET - len(fuzzer.outcomes)) // left_rounds))
            sent = 0
            while sent < quota:
                batch = [gen.task_bound(task) if gen.rng.random() < 0.3 else gen.generic()
                         for _ in range(min(48, quota - sent))]
                fuzzer.send(batch)
                sent += len(batch)
            if task.round == ROUNDS:  # before the last round can end: is the server well?
                mid_flood["alive"] = server.poll() is None
                status = server_status(federation, port)
                mid_flood["status"] = (status.state, status.round, status.completed_rounds)
                scraped = _scrape(metrics_port)
                mid_flood["rejected"] = _rejected_total(scraped) - baseline
                mid_flood["unlabelled"] = scraped[
                    'fedmosaic_rejected_messages_total{reason="other"}']
                mid_flood["refusals"] = sum(o.code in SERVICE_CODES or o.kind == "download_limit"
                                            for o in fuzzer.outcomes)
            spoilers = _spoiled_uploads(task.task_id, task.round, numel, gen.nprng)
            kind, parts = spoilers[(task.round - 1) % len(spoilers)]
            spoilers_used.append(kind)
            fuzzer.send([Attack(f"spoiled_{kind}", "hostile", "UploadUpdate", parts,
                                C.INVALID_ARGUMENT)])
            # The spoiled task is closed: its id replayed, with a valid update, is refused.
            good = gen.nprng.normal(0, 0.01, numel).astype(np.float32)
            replay = [_header(task.task_id, task.round, numel), *_chunks(good)]
            fuzzer.send([Attack("replayed_task", "hostile", "UploadUpdate", replay,
                                C.FAILED_PRECONDITION) for _ in range(3)]
                        + [Attack("download_closed_task", "hostile", "DownloadModel", download,
                                  C.FAILED_PRECONDITION)])
            gen.old_tasks.append((task.task_id, task.round))
            if task.round == ROUNDS:
                break  # the run ends now; the server exits once every client has heard so
        else:
            pytest.fail(f"the run did not reach round {ROUNDS} in time")
    finally:
        stop.set()
        fuzzer.close()

    outcomes = fuzzer.outcomes
    kinds = Counter(o.kind for o in outcomes)
    assert len(outcomes) >= TARGET, kinds
    # Every hostile message got an error, and the determined ones the right error.
    succeeded = [o for o in outcomes if o.code == C.OK]
    assert not succeeded, f"{len(succeeded)} hostile calls succeeded: {succeeded[:5]}"
    # Admission control answers before the content is read: an upload sent while another of
    # the member's is open is refused as over budget (issue #18), whatever it contains.
    def over_budget(o: Outcome) -> bool:
        return o.code == C.RESOURCE_EXHAUSTED and "from this member" in o.details

    # An upload stream still open when its round closes is cancelled with that reason,
    # whatever it carried: a refusal too, decided by timing before the content was judged.
    def round_closed(o: Outcome) -> bool:
        return o.code == C.CANCELLED and "closed while the stream was waiting" in o.details

    wrong = Counter((o.kind, o.expected, o.code, o.details[:80]) for o in outcomes
                    if o.expected is not None and o.code != o.expected and not over_budget(o)
                    and not round_closed(o))
    assert not wrong, wrong.most_common(10)
    # Garbage and truncated messages, decodable by chance or not, are answered by the service.
    unserved = Counter((o.kind, o.code, o.details[:80]) for o in outcomes
                       if o.kind in ("garbage", "truncated") and o.code not in SERVICE_CODES
                       and not over_budget(o))
    assert not unserved, unserved.most_common(10)
    assert not [o for o in outcomes if o.code == C.INTERNAL]
    assert sorted(spoilers_used) == sorted(k for k, _ in _spoiled_uploads(
        b"", 1, numel, np.random.default_rng(0))), spoilers_used

    # Mid-flood: alive, answering, still in the last round, and counting the refusals.
    assert mid_flood["alive"] is True
    assert mid_flood["status"] == ("training", ROUNDS, ROUNDS - 1)
    assert mid_flood["refusals"] > TARGET // 2
    assert mid_flood["rejected"] >= mid_flood["refusals"], mid_flood
    assert mid_flood["unlabelled"] == 0  # every refusal has a reason of its own in the metric

    # The honest run finished every round with all three honest updates.
    assert processes.wait("server", 120) == 0, processes.log("server")[-3000:]
    for cid in HONEST:
        assert processes.wait(cid, 60) == 0, processes.log(cid)[-2000:]
        assert f"trained rounds {list(range(1, ROUNDS + 1))}" in processes.log(cid)
    # The server's structured log accounts for every refusal the service sent: a line each,
    # or, past a caller's burst, in that caller's summary line.
    records = [json.loads(line) for line in processes.log("server").splitlines()
               if line.startswith("{")]
    service_records = [r["message"] for r in records if r["logger"] == "fedmosaic.net.service"]
    summaries = [SUMMARY_LINE.match(m) for m in service_records]
    refusal_lines = sum(bool(REFUSAL_LINE.match(m)) for m in service_records) + \
        sum(int(m.group(1)) for m in summaries if m)
    assert len(service_records) < len(outcomes) // 4  # bounded: no line per hostile message
    service_refusals = sum(o.code in SERVICE_CODES or o.kind == "download_limit"
                           for o in outcomes)
    assert refusal_lines >= service_refusals
    assert all({"timestamp", "level", "logger", "message"} <= set(r) for r in records)
    # Client-caused problems are refusals, never errors or tracebacks (those mean a bug).
    errors = [r["message"][:200] for r in records if r["level"] in ("ERROR", "CRITICAL")]
    assert not errors, errors[:5]
    assert "PRIVATE KEY" not in processes.log("server")
    history = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in history] == list(range(1, ROUNDS + 1))
    assert all(r["updates"] == len(HONEST) for r in history), history
    assert all(r["rejected"] == 1 and r["failures"] == 0 for r in history), history


def test_attack_generator_covers_every_kind_and_is_seeded() -> None:
    """The generator itself (guards the big test): every method and kind, reproducibly."""
    def draw() -> list[Attack]:
        gen = Attacks(numel=100, spec="s" * 16)
        gen.instance, gen.old_tasks = "i" * 16, [(b"t" * 16, 1)]
        task = pb.Task(kind=pb.Task.FIT, task_id=b"k" * 16, round=3)
        return [gen.generic() for _ in range(3000)] + [gen.task_bound(task) for _ in range(1000)]

    drawn = draw()
    kinds = {a.kind for a in drawn}
    assert {"garbage", "truncated", "oversized", "replayed_old_task", "operator_join",
            "not_joined", "revoked", "unauthenticated_no_cert", "unauthenticated_foreign_ca",
            "wrong_round", "foreign_task_upload", "foreign_task_download", "foreign_task_refusal",
            "revoked_with_live_task", "truncated_live_header", "chunk_before_header"} <= kinds
    assert {a.method for a in drawn if a.kind == "garbage"} == set(ALL_METHODS)
    assert all(f"forged_{m}" in kinds for m in ALL_METHODS)
    for a in drawn:
        parts = a.payload if isinstance(a.payload, list) else [a.payload]
        if a.kind == "oversized":
            assert len(parts[0]) > MAX_MESSAGE
        elif a.kind == "wrong_round":
            assert pb.UploadMessage.FromString(parts[0]).header.round != 3
        elif a.kind == "truncated_live_header":  # cut inside the envelope: never decodes
            with pytest.raises(DecodeError):
                pb.UploadMessage.FromString(parts[0])
    spoiled = dict(_spoiled_uploads(b"k" * 16, 3, 100, np.random.default_rng(0)))
    assert len(spoiled) == ROUNDS  # each round of the big test spoils its task another way
    assert len(pb.UploadMessage.FromString(spoiled["ragged_bytes"][1]).chunk.data) % 4 != 0
    assert draw()[:200] == drawn[:200]  # seeded: the same messages every run
