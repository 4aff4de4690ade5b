"""GrpcTransport: the server loop's ``Transport`` for real client processes (issue #5).

``fedmosaic.runtime.Server`` drives rounds exactly as in simulation; this class only changes
how a round's tasks reach clients and how their updates come back. The gRPC handlers
(``fedmosaic.net.service``) call into it from the event loop (quick, non-blocking calls such
as ``poll_task``) and from worker threads (joins, ``finish_upload``); the server loop calls
``available_clients`` and ``fit`` from its own thread; one condition variable guards the
shared state.

Per round: each selected, connected client gets a task with a fresh random single-use id
(``secrets.token_bytes``) bound to (client, round). The model is streamed from the one global
tensor. An upload must present its task id from the same verified client in the same round,
once; it is staged in one of a few reusable buffers (``BufferPool``), validated chunk by chunk
and then as a whole (``validate_update``), and handed to the server loop's ``RoundTally``,
which adds it to the running sum before the buffer is reused. So the server holds the global
model, the running sum and ``upload_slots`` buffers, whatever the number of clients.

A round ends when every task has been answered or given up: a client that stops sending
heartbeats (three missed intervals) or rejoins is a failure at once; whoever has not delivered
by the round deadline is dropped as a straggler (its late upload is refused as out of round).
A client whose privacy policy forbids its task (``fedmosaic.net.policy``) says so with
``RefuseTask``: its task fails at once with ``refused by client: <reason>``, counted under the
drop reason ``refused_by_client`` and logged; the reason is checked (a known category, at most
``MAX_REFUSAL_REASON`` printable characters) before it is logged or kept.

Join handshake (issue #10): a client sends its model's layout hash and parameter count and a
``DataProfile`` of its data; ``join`` refuses a client whose model or data does not fit the
task (``fedmosaic.compat``: the task's ``TaskProfile``, and, where the task does not declare
its feature shape, a probe of the task's model on a sample of the declared shape) with
FAILED_PRECONDITION, the ``Incompatibility`` message (addressed to the client's operator) and
trailing metadata ``fedmosaic-refusal: <code>``, ``fedmosaic-permanent: 1``
(``fedmosaic.net.errors``), before any training. Every client's latest problem (incompatible
at join, a task refused or failed, an update or report rejected, a drop) is kept on an
``IssueBoard`` for ``status`` and counted in ``clients_refused_total``.

Federated evaluation (``evaluate``): after a round, selected clients get EVALUATE tasks
(fresh single-use ids bound to client and round, like FIT tasks), download the model as for
a fit and answer with ``ReportEvaluation`` (sample count and metrics, validated) or refuse
the task (``no_test_data``, ``evaluation_failed``). The phase has the round deadline and the
same heartbeat-loss handling as a fit.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import queue
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import torch

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.compat import (
    DataProfile,
    Incompatibility,
    ProfileError,
    TaskProfile,
    layout_mismatch,
    probe_incompatibility,
)
from fedmosaic.core.errors import InvalidUpdateError, RoundFailedError
from fedmosaic.core.update import ClientUpdate, validate_update
from fedmosaic.net.admission import STALLED, StreamCut
from fedmosaic.net.auth import Peer
from fedmosaic.net.errors import Refused
from fedmosaic.net.issues import REFUSAL_ISSUE_CODES, IssueBoard
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.settings import DeploySettings
from fedmosaic.net.wire import (
    REFUSAL_CODES,
    BufferPool,
    ChunkAssembler,
    WireError,
    check_evaluation,
    check_metrics,
    check_refusal,
    fit_config_to_wire,
    iter_chunks,
    stage_to_wire,
)
from fedmosaic.runtime.evaluation import EvalReport
from fedmosaic.runtime.tally import ClientFailure, PartialAggregate, Weighting
from fedmosaic.runtime.transport import TransportResult
from fedmosaic.train.base import FitConfig

log = logging.getLogger(__name__)

TASK_ID_BYTES = 16
MAX_DOWNLOADS_PER_TASK = 3  # a retry after a broken stream, not a bandwidth amplifier
MAX_POLL_SECONDS = 30.0
MAX_SAMPLES = 2**40
MAX_KEPT_REFUSALS = 1000  # the latest refusals kept in memory (all are logged)
MAX_PROBE_CACHE = 256  # join probes remembered (by declared shape, labels and outputs)
# Refusal codes a client sends when it cannot run its task (as opposed to its privacy policy
# refusing it), and how the failure reads in the round's record.
CLIENT_ERROR_CODES = {
    "training_failed": "training failed on the client",
    "evaluation_failed": "evaluation failed on the client",
    "no_test_data": "no local test split",
    "incompatible_data": "data incompatible with the task",
    "malformed_task": "the client could not decode its task",
}
POLICY_CODES = tuple(c for c in REFUSAL_CODES if c not in CLIENT_ERROR_CODES)
# Issues found at join: cleared when the client later joins with a compatible setup.
JOIN_ISSUE_CODES = ("model_layout", "feature_shape", "dtype", "labels", "num_classes",
                    "no_data", "bad_profile")


def poll_seconds(wait: float) -> float:
    """A client's requested long-poll wait, clamped to [0, ``MAX_POLL_SECONDS``]."""
    return min(max(wait, 0.0), MAX_POLL_SECONDS) if math.isfinite(wait) else 0.0


class MessageTooLarge(WireError):
    """A message over the server's message limit, refused before it is decoded
    (``fedmosaic.net.server.MessageLimit``): answered RESOURCE_EXHAUSTED, as gRPC answers one
    over its own ceiling, and counted as ``oversized``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes is over the limit of {limit} bytes",
                         "oversized")


def wire_status(exc: WireError) -> grpc.StatusCode:
    return grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, MessageTooLarge) \
        else grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class PendingTask:
    """One client's assignment in one round, and where it stands."""

    task_id: bytes
    client_id: str
    round: int
    task: ClientTask
    wire: pb.Task
    # pending -> issued -> uploading -> delivered, or closed (failed, rejected, round over);
    # an evaluation task goes pending -> issued -> delivered (its report) or closed.
    state: str = "pending"
    downloads: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # used by the SecAgg+ round
    kind: str = "fit"  # or "evaluate"
    deadline: float = 0.0  # time.monotonic() after which the task is given up (straggler)
    weights: torch.Tensor | None = None  # its base model (live schedules); else the round's


@dataclass
class Session:
    """A joined client: its identity (from its certificate) and when it was last heard from."""

    client_id: str
    joined: float
    last_seen: float
    task: PendingTask | None = None
    seen_done: bool = False


@dataclass
class Delivery:
    """A result handed from a handler thread to the server loop; ``done`` is set once the
    loop has consumed it (the upload buffer may then be reused)."""

    task: PendingTask
    result: TransportResult
    done: threading.Event | None = None
    accepted: bool = False


class GrpcTransport:
    """Serves rounds to remote clients; see the module docstring.

    ``numel``/``spec_hash`` describe the model (clients must match them); ``secagg`` (a
    ``fedmosaic.net.secagg.SecAggRoundDriver``) switches the rounds to SecAgg+; ``metrics``
    (a ``fedmosaic.net.monitoring.ServerMetrics``) is told rounds, connections, drops and
    client refusals. ``task_profile`` (a ``fedmosaic.compat.TaskProfile``) is what every
    client's data must fit; without it a declared profile is still checked for what holds
    for every task (numeric features, labels >= 0, some data). ``probe_trainer`` (a Trainer
    of the task's model, or a zero-argument factory of one) lets the join check run the
    model on a sample of the declared shape when the task profile has no feature shape; a
    Trainer is deep-copied first (the server loop's own must not be used from handler
    threads).
    Each client is sent the model through its task's dispatch transform (``supports_dispatch``:
    per-client fingerprints); only authenticated clients ever receive it.
    """

    supports_dispatch = True

    def __init__(
        self,
        settings: DeploySettings,
        *,
        numel: int,
        spec_hash: str,
        experiment: str,
        rounds: int,
        secagg: Any = None,
        metrics: Any = None,
        task_profile: TaskProfile | None = None,
        probe_trainer: Any = None,
    ) -> None:
        self.settings = settings
        self.numel, self.spec_hash, self.experiment = numel, spec_hash, experiment
        self.rounds = rounds
        self.instance = secrets.token_hex(8)
        self.started = time.monotonic()
        self.cond = threading.Condition()
        self.sessions: dict[str, Session] = {}
        self.tasks: dict[bytes, PendingTask] = {}
        self.round = 0
        self.completed_rounds = 0
        self.last_record: dict[str, Any] = {}
        self.done = False
        self.stopping = False  # the gRPC server is stopping: long polls return at once
        self.round_open = False
        self.live = False  # tasks come from a live (asynchronous) schedule: ``submit``
        self.weights: torch.Tensor | None = None
        self.results: queue.Queue[Delivery] = queue.Queue()
        self.pool = BufferPool(numel, settings.upload_slots)
        self.secagg = secagg
        self.metrics = metrics
        self.round_received = 0
        self.round_refused = 0
        # (round, client, code, reason) of the latest client refusals, for the operator.
        self.refusals: deque[tuple[int, str, str, str]] = deque(maxlen=MAX_KEPT_REFUSALS)
        self._round_deadline = 0.0
        self.phase = "fit"  # of the round in progress: "fit" or "evaluate"
        self.issues = IssueBoard()
        self.task_profile = task_profile
        self._probe_source = probe_trainer
        self._probe_model: Any = None
        self._probe_lock = threading.Lock()
        self._probe_cache: dict[tuple[Any, ...], Incompatibility | None] = {}
        self._dispatch: Any = None  # the last fit round's dispatch transform (fingerprints)
        # Called with the round number once a round (or its evaluation) has closed; the
        # service cuts the streams still waiting for a client (net/admission.py).
        self.round_closed_hooks: list[Callable[[int], None]] = []
        # Called (from any thread, with ``cond`` held) with the clients whose long poll may
        # now have an answer, or None for every client (the run ended, the server stops):
        # the asyncio service wakes those polls, which wait without a thread.
        self.wakers: list[Callable[[Sequence[str] | None], None]] = []
        # Refused calls and messages by reason label (the service counts each), for status.
        self.refused_messages: Counter[str] = Counter()

    # -- helpers (call with self.cond held) ---------------------------------------------
    def _wake(self, clients: Sequence[str] | None) -> None:
        """Wake blocked threads and the long polls of ``clients`` (None: everyone's)."""
        self.cond.notify_all()
        for wake in self.wakers:
            wake(clients)

    def _alive(self, session: Session, now: float) -> bool:
        return now - session.last_seen <= self.settings.liveness_timeout

    def session_of(self, peer: Peer, instance: str) -> Session:
        """The caller's session; a stale instance or no session means "join again"."""
        session = self.sessions.get(peer.client_id)
        if instance != self.instance or session is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          "not joined to this server instance: join again", "not_joined")
        session.last_seen = time.monotonic()
        return session

    def task_of(self, peer: Peer, task_id: bytes, round_num: int | None = None) -> PendingTask:
        """The open task ``task_id`` if it belongs to ``peer`` (and ``round_num``)."""
        task = self.tasks.get(bytes(task_id))
        if task is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          "unknown or expired task id (replayed, or its round is over)",
                          "unknown_task")
        if task.client_id != peer.client_id:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          "task id belongs to another client", "foreign_task")
        if round_num is not None and round_num != task.round:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"task is for round {task.round}, message says round {round_num}",
                          "wrong_round")
        session = self.sessions.get(peer.client_id)
        if session is not None:
            session.last_seen = time.monotonic()  # working on its task is a sign of life
        return task

    def close_task(self, task: PendingTask, result: TransportResult | None,
                   drop: str = "failed") -> None:
        """End ``task`` now; ``result`` (a failure or rejection) goes to the server loop;
        ``drop`` is the reason label counted in the metrics."""
        if task.state in ("closed", "delivered"):
            return
        task.state = "closed"
        if self.metrics is not None:
            self.metrics.client_dropped(drop)
        session = self.sessions.get(task.client_id)
        if session is not None and session.task is task:
            session.task = None
        if result is not None and self.round_open:
            self.results.put(Delivery(task, result))
        self.cond.notify_all()

    def reject_task(self, task: PendingTask, reason: str) -> None:
        """Count ``task``'s update (or evaluation report) as rejected (no sum is touched) and
        end the task."""
        if task.kind == "evaluate":
            msg = f"evaluation report from client '{task.client_id}' rejected: {reason}"
            result: TransportResult | EvalReport | ClientFailure = \
                ClientFailure(task.client_id, msg)
            code = "rejected_evaluation"
        else:
            msg = f"update from client '{task.client_id}' rejected: {reason}"
            result, code = PartialAggregate(weighted_sum=None, rejected=[msg]), "rejected_update"
        log.warning("round %d: %s", task.round, msg,
                    extra={"round": task.round, "client": task.client_id, "code": code})
        self.record_issue(task.client_id, code, reason, task.round)
        self.close_task(task, result, "rejected")  # type: ignore[arg-type]

    def record_issue(self, client_id: str, code: str, reason: str, round_num: int) -> None:
        """Keep ``reason`` as the client's latest issue (``status``) and count a refusal."""
        self.issues.record(client_id, code, reason, round_num)
        if self.metrics is not None and code in REFUSAL_ISSUE_CODES:
            self.metrics.client_refused(code)

    def _drop(self, task: PendingTask, code: str, reason: str) -> None:
        """End ``task`` as a failure of its client (deadline, silence, reconnection), with
        one log line naming the client and why."""
        what = "evaluation" if task.kind == "evaluate" else "round"
        log.warning("round %d: client %s dropped from the %s (%s): %s", task.round,
                    task.client_id, what, code, reason,
                    extra={"round": task.round, "client": task.client_id, "code": code})
        self.record_issue(task.client_id, code, reason, task.round)
        self.close_task(task, ClientFailure(task.client_id, reason), code)

    # -- RPC entry points (from handler threads) ------------------------------------------
    def join(self, peer: Peer, request: pb.JoinRequest) -> pb.JoinReply:
        """Admit ``peer`` if its model and declared data fit the task; see the module."""
        if peer.role != "client":
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"a '{peer.role or 'unknown'}' credential cannot take part in training",
                          "not_a_client")
        problem, label = self._compatibility(request)
        if problem is not None:
            self.record_issue(peer.client_id, problem.code, problem.message, 0)
            status = grpc.StatusCode.INVALID_ARGUMENT if problem.code == "bad_profile" \
                else grpc.StatusCode.FAILED_PRECONDITION
            raise Refused(status, problem.message, label, permanent=True, refusal=problem.code)
        self.issues.clear(peer.client_id, JOIN_ISSUE_CODES)  # fixed since its last try
        now = time.monotonic()
        with self.cond:
            old = self.sessions.get(peer.client_id)
            if old is not None and old.task is not None:
                # It lost its connection or restarted: this round's task is void; it takes
                # part again from the next round.
                self._drop(old.task, "disconnected",
                           "rejoined during the task (restarted or reconnected)")
            self.sessions[peer.client_id] = Session(peer.client_id, now, now)
            self._gauge_connected()
            self.cond.notify_all()
        log.info("client %s joined%s", peer.client_id, " again" if old is not None else "")
        reply = pb.JoinReply(client_id=peer.client_id, server_instance=self.instance,
                             experiment=self.experiment, numel=self.numel,
                             spec_hash=self.spec_hash, chunk_bytes=self.settings.chunk_bytes,
                             heartbeat_interval=self.settings.heartbeat_interval)
        if self.task_profile is not None:
            reply.task.CopyFrom(self.task_profile.to_wire())
        return reply

    def _compatibility(self, request: pb.JoinRequest) -> tuple[Incompatibility | None, str]:
        """The first way the joining client does not fit the task (and the refusal's metrics
        label), or (None, "")."""
        if request.spec_hash != self.spec_hash:
            return layout_mismatch(int(request.numel), self.numel), "model_mismatch"
        if not request.HasField("profile"):
            return None, ""  # a client that declares nothing is checked by its updates
        try:
            profile = DataProfile.from_wire(request.profile)
        except ProfileError as exc:
            return Incompatibility("bad_profile", f"your client declared a malformed data "
                                   f"profile: {exc}"), "bad_profile"
        task = self.task_profile or TaskProfile()
        problem = task.check(profile)
        if problem is None and task.feature_shape is None:
            problem = self._probe(profile, task)
        return problem, "incompatible"

    def _probe(self, profile: DataProfile, task: TaskProfile) -> Incompatibility | None:
        """``compat.probe_incompatibility`` with the task's model, once per declared (shape,
        largest label, outputs): a forward pass of two samples, under a lock."""
        if self._probe_source is None:
            return None
        key = (profile.feature_shape, profile.label_max, profile.num_outputs)
        with self._probe_lock:
            if key in self._probe_cache:
                return self._probe_cache[key]
            trainer = self._probe_trainer()
            if trainer is None:
                return None
            found = probe_incompatibility(trainer, profile, task)
            if len(self._probe_cache) >= MAX_PROBE_CACHE:
                self._probe_cache.clear()  # bounded whatever clients declare
            self._probe_cache[key] = found
            return found

    def _probe_trainer(self) -> Any:
        """The trainer join probes run (built or copied once; None: probing is off)."""
        if self._probe_model is None and self._probe_source is not None:
            from fedmosaic.train.base import Trainer

            source = self._probe_source
            try:
                self._probe_model = copy.deepcopy(source) if isinstance(source, Trainer) \
                    else source()
            except Exception as exc:  # an uncopyable trainer: the join check goes without
                log.warning("cannot build a model to check joining clients' data shapes "
                            "(%s: %s); only the declared profile is checked",
                            type(exc).__name__, exc)
                self._probe_source = None
        return self._probe_model

    def heartbeat(self, peer: Peer, instance: str) -> pb.HeartbeatReply:
        with self.cond:
            self.session_of(peer, instance)
            # A heartbeat reply does not tell the client the run is done (its task loop
            # learns it from GetTask): the linger waits for that, not for the heartbeat.
            return pb.HeartbeatReply(round=self.round, done=self.done)

    def poll_task(self, peer: Peer, instance: str) -> pb.Task | None:
        """A task for this client, or DONE (or WAIT while the server stops), if there is one
        now; None: nothing yet (the caller waits for a wake-up, see ``wakers``)."""
        with self.cond:
            return self._poll_unlocked(self.session_of(peer, instance))

    def _poll_unlocked(self, session: Session) -> pb.Task | None:
        if self.done:
            session.seen_done = True
            return pb.Task(kind=pb.Task.DONE, round=self.completed_rounds)
        if self.stopping:
            return pb.Task(kind=pb.Task.WAIT, round=self.round)
        task = session.task
        # An issued task is handed out again: the reply may have been lost, or the download
        # broken off (downloads stay capped, the upload single-use).
        if task is not None and task.state in ("pending", "issued") \
                and task.downloads < MAX_DOWNLOADS_PER_TASK:
            task.state = "issued"
            msg = pb.Task()
            msg.CopyFrom(task.wire)
            msg.deadline_seconds = max(0.0, task.deadline - time.monotonic())
            return msg
        return None

    def idle_reply(self) -> pb.Task:
        """What a long poll that found nothing before its wait ended is told."""
        with self.cond:
            return pb.Task(kind=pb.Task.WAIT, round=self.round)

    def model_chunks(self, peer: Peer, task_id: bytes) -> Iterator[pb.TensorChunk]:
        with self.cond:
            task = self.task_of(peer, task_id)
            if task.state != "issued":
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"task is {task.state}, the model can no longer be downloaded",
                              "task_state")
            if task.downloads >= MAX_DOWNLOADS_PER_TASK:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"model already downloaded {task.downloads} times for this task",
                              "download_limit")
            task.downloads += 1
            weights = task.weights if task.weights is not None else self.weights
            assert weights is not None  # a task is open only while its round is
        # The task's dispatch transform (a per-client fingerprint), if any: the client trains
        # from what it received and uploads its delta relative to that, so aggregation is
        # unaffected, and a leaked copy of the model is traceable to the client it went to.
        return iter_chunks(task.task.received(weights), self.settings.chunk_bytes)

    def open_upload(self, peer: Peer, first: pb.UploadMessage | None) -> PendingTask:
        """Check an upload's first message (its header) and claim its task (state
        ``uploading``): the part of an upload that needs no buffer; ``Refused`` if the
        header is missing or wrong, the task unknown, not the caller's or already used."""
        if first is None or first.WhichOneof("part") != "header":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          "an upload must start with its header", "malformed")
        header = first.header
        with self.cond:
            task = self.task_of(peer, header.task_id, header.round)
            if task.kind != "fit":
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              "an evaluation task is answered with ReportEvaluation, not an "
                              "upload", "task_state")
            if task.state != "issued":
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"task already {task.state} (replayed upload?)", "replay")
            if task.extra.get("secagg"):
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              "this round uses secure aggregation: no plaintext uploads",
                              "secagg_round")
            problem = self._check_header(header)
            if problem is not None:
                self.reject_task(task, problem)
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem, "malformed")
            task.state = "uploading"
        return task

    def finish_upload(self, peer: Peer, task: PendingTask, header: pb.UploadHeader,
                      messages: Iterator[pb.UploadMessage]) -> pb.UploadReply:
        """Receive the chunks after the header into an upload buffer (waiting for one, up to
        the task's deadline), validate the update and deliver it to the server loop."""
        left = task.deadline - time.monotonic()
        try:
            with self.pool.slot(timeout=left) as buffer:
                assembler = ChunkAssembler(buffer, self.numel, self.settings.chunk_bytes)
                for msg in messages:
                    if msg.WhichOneof("part") != "chunk":
                        raise WireError("only tensor chunks may follow the header")
                    assembler.add(msg.chunk)
                update = validate_update(ClientUpdate(
                    client_id=peer.client_id, delta=assembler.finish(),
                    num_samples=int(header.num_samples), base_round=task.round,
                    metrics=check_metrics(header.metrics)), numel=self.numel,
                    current_round=task.round)
                return self._deliver(task, update)
        except (WireError, InvalidUpdateError) as exc:
            with self.cond:
                self.reject_task(task, str(exc))
            label = exc.label if isinstance(exc, WireError) else "invalid_update"
            status = wire_status(exc) if isinstance(exc, WireError) \
                else grpc.StatusCode.INVALID_ARGUMENT
            raise Refused(status, str(exc), label) from exc
        except TimeoutError as exc:
            with self.cond:
                self._drop(task, "deadline", str(exc))
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), "deadline") from exc
        except StreamCut as exc:  # admission control cut it: idle too long, or round closed
            if exc.label == STALLED:
                with self.cond:
                    self._drop(task, "stalled", f"stalled upload: {exc.reason}")
            raise Refused(grpc.StatusCode.CANCELLED, exc.reason, exc.label) from exc
        except grpc.RpcError as exc:  # the client went away mid-stream
            with self.cond:
                self._drop(task, "disconnected", "upload interrupted")
            raise Refused(grpc.StatusCode.CANCELLED, "upload interrupted", "interrupted") from exc

    def refuse_task(self, peer: Peer, refusal: pb.TaskRefusal) -> pb.RefusalReply:
        """The client refuses its task under its privacy policy: fail the task now (no
        update from it will be accepted this round) and record why."""
        code, reason = check_refusal(refusal)  # WireError: refused as malformed
        with self.cond:
            task = self.task_of(peer, refusal.task_id, refusal.round)
            if task.state not in ("pending", "issued"):
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"task is {task.state}: too late to refuse it", "task_state")
            if code in CLIENT_ERROR_CODES:  # it could not run the task
                failure = f"{CLIENT_ERROR_CODES[code]}: {reason}"
                self.close_task(task, ClientFailure(task.client_id, failure), "client_error")
            else:  # its privacy policy forbids the task
                self.close_task(task, ClientFailure(task.client_id,
                                                    f"refused by client: {reason}"),
                                "refused_by_client")
            self.refusals.append((task.round, task.client_id, code, reason))
            self.record_issue(task.client_id, code, reason, task.round)
            if task.round == self.round and task.kind == "fit":
                self.round_refused += 1
        # Structured fields too: a JSON log pipeline can group by client and code.
        extra = {"round": task.round, "client": task.client_id, "code": code}
        if code in CLIENT_ERROR_CODES:
            log.warning("round %d: client %s could not run its %s task (%s): %s", task.round,
                        task.client_id, task.kind, code, reason, extra=extra)
        else:
            log.warning("round %d: client %s refused its task (%s): %s", task.round,
                        task.client_id, code, reason, extra=extra)
        return pb.RefusalReply(detail=f"refusal of the round {task.round} task recorded")

    def report_evaluation(self, peer: Peer, msg: pb.EvaluationReport) -> pb.EvaluationReply:
        """A client's evaluation of the model on its local test split: checked (its own
        EVALUATE task of this round, not yet answered, a sample count in [1, 2**40],
        finite bounded metrics) and handed to the evaluation phase, once."""
        with self.cond:
            task = self.task_of(peer, msg.task_id, msg.round)
            if task.kind != "evaluate":
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              "not an evaluation task: a fit task is answered with "
                              "UploadUpdate", "task_state")
            if task.state in ("delivered", "closed"):
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"task already {task.state} (replayed report?)", "replay")
            if task.state != "issued":
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"task is {task.state}: not handed out yet", "task_state")
            try:
                num_samples, metrics = check_evaluation(msg)
            except WireError as exc:
                self.reject_task(task, str(exc))
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.label) from exc
            if not self.round_open:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"the evaluation of round {task.round} closed before the report "
                              "arrived", "late")
            task.state = "delivered"
            self.results.put(Delivery(task, EvalReport(  # type: ignore[arg-type]
                peer.client_id, num_samples, metrics)))
            self.cond.notify_all()
        return pb.EvaluationReply(accepted=True,
                                  detail=f"evaluation of round {task.round} recorded")

    def _check_header(self, header: pb.UploadHeader) -> str | None:
        if header.numel != self.numel:
            return f"header announces {header.numel} values, the model has {self.numel}"
        if not 0 < header.num_samples <= MAX_SAMPLES:
            return f"num_samples {header.num_samples} outside [1, {MAX_SAMPLES}]"
        try:
            check_metrics(header.metrics)
        except WireError as exc:
            return str(exc)
        return None

    def _deliver(self, task: PendingTask, result: TransportResult) -> pb.UploadReply:
        """Hand ``result`` to the server loop and wait until it has been summed."""
        done = threading.Event()
        delivery = Delivery(task, result, done)
        with self.cond:
            if not self.round_open or task.state != "uploading":
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"round {task.round} closed before the update arrived",
                              "late")
            task.state = "delivered"
            self.results.put(delivery)
        # The loop consumes deliveries as they come; the deadline bounds the wait.
        done.wait(max(task.deadline - time.monotonic(), 0.0) + 30.0)
        if not delivery.accepted:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"round {task.round} closed before the update was aggregated", "late")
        return pb.UploadReply(accepted=True, detail=f"update for round {task.round} aggregated")

    def status(self) -> pb.StatusReply:
        with self.cond:
            state = "done" if self.done else (
                ("evaluating" if self.phase == "evaluate" else "training") if self.round_open
                else "waiting")
            tasks = [t for t in self.tasks.values() if t.round == self.round]
            now = time.monotonic()
            issues = [pb.ClientIssue(client_id=i.client_id, code=i.code, reason=i.reason,
                                     round=i.round, age_seconds=max(0.0, now - i.at))
                      for i in self.issues.latest()]
            from fedmosaic.net.handshake_tap import TAP

            return pb.StatusReply(
                refused_messages=dict(self.refused_messages),
                tls_handshake_failures=TAP.snapshot(),
                client_issues=issues,
                experiment=self.experiment, state=state, round=self.round, rounds=self.rounds,
                completed_rounds=self.completed_rounds,
                connected_clients=len(self.connected_unlocked()),
                round_tasks=len(tasks), round_received=self.round_received,
                round_refused=self.round_refused,
                uptime_seconds=time.monotonic() - self.started,
                last_record_json=json.dumps(self.last_record, default=float))

    def connected_unlocked(self) -> list[str]:
        now = time.monotonic()
        return [c for c, s in self.sessions.items() if self._alive(s, now)]

    # -- the Transport protocol (server loop thread) ---------------------------------------
    def available_clients(self) -> list[str]:
        """Connected clients, once at least ``min_clients`` are (waiting up to
        ``wait_for_clients`` seconds; fewer fails the round, which the server retries)."""
        need, wait = self.settings.min_clients, self.settings.wait_for_clients
        deadline = time.monotonic() + wait
        with self.cond:
            while True:
                alive = sorted(self.connected_unlocked())
                if len(alive) >= need:
                    return alive
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RoundFailedError(f"{len(alive)} clients connected after waiting {wait:g}s"
                                           f"; min_clients is {need}")
                self.cond.wait(min(left, 1.0))

    def check_strategy(self, strategy: Any) -> None:
        """Under SecAgg+, refuse aggregators that need individual updates (as in simulation)."""
        if self.secagg is not None:
            self.secagg.check_strategy(strategy)

    def guarantees(self) -> dict[str, Any]:
        return self.secagg.guarantees() if self.secagg is not None else {}

    def full_steps(self, client_id: str, config: FitConfig) -> int | None:
        return None  # unknown: real clients straggle for real

    def fit(
        self, weights: torch.Tensor, tasks: Sequence[ClientTask],
        weighting: Weighting | None = None,
    ) -> Iterator[TransportResult]:
        round_num = tasks[0].config.round if tasks else self.round + 1
        prepare = getattr(self.secagg, "prepare_round", None)
        if prepare is not None and tasks:
            prepare(round_num, self.numel)  # e.g. the round's Skellam mechanism for the tasks
        now = time.monotonic()
        failures: list[ClientFailure] = []
        outstanding: dict[bytes, PendingTask] = {}
        with self.cond:
            self.round, self.round_open, self.round_received = round_num, True, 0
            self.round_refused, self.phase = 0, "fit"
            self._dispatch = next((t.dispatch for t in tasks if t.dispatch is not None), None)
            self.weights = weights.detach()
            self.results = queue.Queue()
            self._round_deadline = now + self.settings.round_deadline
            for t in tasks:
                session = self.sessions.get(t.client_id)
                if session is None or not self._alive(session, now):
                    failures.append(ClientFailure(t.client_id, "not connected"))
                    continue
                pending = self._new_task(t, weighting)
                pending.deadline = self._round_deadline
                self.tasks[pending.task_id] = pending
                session.task = pending
                outstanding[pending.task_id] = pending
            self._gauge_connected()
            self._wake([t.client_id for t in outstanding.values()])
        if self.metrics is not None:
            self.metrics.round_started(round_num)
        log.info("round %d: %d tasks sent%s", round_num, len(outstanding), _not_connected(failures))
        try:
            yield from failures
            if self.secagg is not None:
                yield from self.secagg.run(self, outstanding, weighting)
            else:
                yield from self._collect(outstanding)
        finally:
            self._close_round()

    def _new_task(self, task: ClientTask, weighting: Weighting | None) -> PendingTask:
        task_id = secrets.token_bytes(TASK_ID_BYTES)
        wire = pb.Task(kind=pb.Task.FIT, task_id=task_id, round=task.config.round,
                       config=fit_config_to_wire(task.config),
                       stages=[stage_to_wire(s) for s in task.stages], numel=self.numel)
        pending = PendingTask(task_id, task.client_id, task.config.round, task, wire)
        if self.secagg is not None:
            wire.secagg.CopyFrom(self.secagg.wire_settings())
            pending.extra["secagg"] = True
        return pending

    def evaluate(self, weights: torch.Tensor, client_ids: Sequence[str],
                 round_num: int) -> Iterator[EvalReport | ClientFailure]:
        """Federated evaluation of ``weights`` by ``client_ids`` (the ``Transport``
        protocol): one ``EvalReport`` or ``ClientFailure`` per client; see the module."""
        now = time.monotonic()
        failures: list[ClientFailure] = []
        outstanding: dict[bytes, PendingTask] = {}
        with self.cond:
            self.round, self.round_open, self.phase = round_num, True, "evaluate"
            self.weights = weights.detach()
            self.results = queue.Queue()
            self._round_deadline = now + self.settings.round_deadline
            for cid in dict.fromkeys(client_ids):
                session = self.sessions.get(cid)
                if session is None or not self._alive(session, now):
                    failures.append(ClientFailure(cid, "not connected"))
                    continue
                if session.task is not None:  # a leftover of the fit phase: void now
                    self.close_task(session.task, None, "failed")
                pending = self._new_eval_task(cid, round_num)
                pending.deadline = self._round_deadline
                self.tasks[pending.task_id] = pending
                session.task = pending
                outstanding[pending.task_id] = pending
            self._gauge_connected()
            self._wake([t.client_id for t in outstanding.values()])
        log.info("round %d: %d evaluation tasks sent%s", round_num, len(outstanding),
                 _not_connected(failures))
        try:
            yield from failures
            yield from self._collect(outstanding)  # type: ignore[misc]
        finally:
            self._close_round()

    def _new_eval_task(self, client_id: str, round_num: int) -> PendingTask:
        task_id = secrets.token_bytes(TASK_ID_BYTES)
        config = FitConfig(round=round_num)
        wire = pb.Task(kind=pb.Task.EVALUATE, task_id=task_id, round=round_num,
                       config=fit_config_to_wire(config), numel=self.numel)
        # The model goes out through the fit rounds' dispatch transform too: an evaluation
        # download must not be an unfingerprinted copy of the model.
        return PendingTask(task_id, client_id, round_num,
                           ClientTask(client_id, config, dispatch=self._dispatch), wire,
                           kind="evaluate")

    def _collect(self, outstanding: dict[bytes, PendingTask]) -> Iterator[TransportResult]:
        """Yield deliveries until every task is answered, lost or past the deadline."""
        while outstanding:
            try:
                delivery = self.results.get(timeout=0.2)
            except queue.Empty:
                delivery = None
            if delivery is not None:
                outstanding.pop(delivery.task.task_id, None)
                try:
                    yield delivery.result
                    delivery.accepted = True
                    if isinstance(delivery.result, ClientUpdate):
                        self.round_received += 1
                finally:
                    if delivery.done is not None:
                        delivery.done.set()
                continue
            self.expire(outstanding.values())

    def expire(self, tasks: Any) -> None:
        """Fail tasks whose client went silent, and every task once the deadline passed."""
        now = time.monotonic()
        with self.cond:
            for task in list(tasks):
                if task.state in ("closed", "delivered"):
                    continue
                session = self.sessions.get(task.client_id)
                what = "evaluation" if task.kind == "evaluate" else "round"
                if now >= task.deadline:
                    self._drop(task, "deadline", f"missed the {what} deadline "
                               f"({self.settings.round_deadline:g}s): straggler dropped")
                elif session is None or session.task is not task or not self._alive(session, now):
                    self._drop(task, "heartbeat_timeout",
                               f"lost contact (no heartbeat): dropped from the {what}")
            self._gauge_connected()

    def _close_round(self) -> None:
        with self.cond:
            self.round_open, self.phase = False, "fit"
            for task_id in [k for k, t in self.tasks.items() if t.round <= self.round]:
                task = self.tasks.pop(task_id)
                if task.state not in ("delivered", "closed"):
                    task.state = "closed"
                session = self.sessions.get(task.client_id)
                if session is not None and session.task is task:
                    session.task = None
            self.weights = None
            while True:  # wake handlers whose delivery the loop will never consume
                try:
                    delivery = self.results.get_nowait()
                except queue.Empty:
                    break
                if delivery.done is not None:
                    delivery.done.set()
            self.cond.notify_all()
            closed = self.round
        for hook in self.round_closed_hooks:
            hook(closed)

    # -- live schedules (runtime.transport.LiveTransport) -------------------------------------
    def submit(self, weights: torch.Tensor, version: int,
               tasks: Sequence[ClientTask]) -> list[ClientFailure]:
        """Hand each task to its client now, without waiting (FedBuff, FedAsync): the model
        they download is ``weights`` (version ``version``); each task has the round deadline
        as its own. Every task not failed here (client not connected) later yields exactly one
        result from ``next_result``. Task ids are single-use and belong to this server
        instance: after a restart, uploads for tasks of the previous instance are refused
        (``unknown_task``), so no update is applied twice."""
        if self.secagg is not None:
            raise RoundFailedError("secure aggregation runs synchronous rounds only")
        now = time.monotonic()
        base = weights.detach()
        failures: list[ClientFailure] = []
        sent: list[str] = []
        with self.cond:
            if not self.live:
                self.live, self.round_open, self.phase = True, True, "fit"
                self.results = queue.Queue()
            self.round = max(self.round, version + 1)
            for t in tasks:
                session = self.sessions.get(t.client_id)
                if session is None or not self._alive(session, now):
                    failures.append(ClientFailure(t.client_id, "not connected"))
                    continue
                if session.task is not None:  # one task per client at a time
                    failures.append(ClientFailure(t.client_id, "already has a task"))
                    continue
                pending = self._new_task(t, None)
                pending.deadline = now + self.settings.round_deadline
                pending.weights = base
                self.tasks[pending.task_id] = pending
                session.task = pending
                sent.append(t.client_id)
            self._gauge_connected()
            self._wake(sent)
        if sent:
            log.info("version %d: %d tasks sent%s", version, len(sent),
                     _not_connected(failures))
        return failures

    def next_result(self, timeout: float) -> tuple[str, TransportResult] | None:
        """(client id, result) of the next task that ended, or None after ``timeout``
        seconds; tasks past their deadline or whose client went silent end here (as
        failures). An update's tensors are copied out of the upload buffer (the caller owns
        them)."""
        try:
            delivery = self.results.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            with self.cond:
                open_tasks = [t for t in self.tasks.values()
                              if t.state not in ("closed", "delivered")]
            self.expire(open_tasks)
            return None
        task, result = delivery.task, delivery.result
        try:
            if isinstance(result, ClientUpdate):
                result = replace(result, delta=result.delta.clone())
                delivery.accepted = True
                self.round_received += 1
        finally:
            if delivery.done is not None:
                delivery.done.set()
        with self.cond:
            self.tasks.pop(task.task_id, None)
            session = self.sessions.get(task.client_id)
            if session is not None and session.task is task:
                session.task = None
        return task.client_id, result

    def cancel_all(self, reason: str) -> None:
        """End every open task (the run finished or stopped): their results are never
        delivered; streams still waiting for a client are cut."""
        with self.cond:
            if not self.live:
                return
            self.live = False
        log.info("live tasks cancelled: %s", reason)
        self._close_round()

    # -- lifecycle ---------------------------------------------------------------------------
    def round_completed(self, record: dict[str, Any]) -> None:
        with self.cond:
            self.completed_rounds = int(record["round"])
            self.last_record = dict(record)

    def resumed_at(self, completed: int) -> None:
        with self.cond:
            self.completed_rounds = self.round = completed

    def finish(self) -> None:
        """The run is over: every client asking from now on is told DONE."""
        with self.cond:
            self.done = True
            self._wake(None)

    def stop(self) -> None:
        """The server is stopping (finished or not): wake every long poll now, so that the
        handler threads can be joined; a client still polling is told WAIT and, finding the
        server gone, retries until it comes back (a restart resumes the run)."""
        with self.cond:
            self.stopping = True
            self._wake(None)

    def all_told_done(self) -> bool:
        with self.cond:
            return all(s.seen_done for s in self.sessions.values()
                       if self._alive(s, time.monotonic()))

    def _gauge_connected(self) -> None:
        if self.metrics is not None:
            self.metrics.set_connected_clients(len(self.connected_unlocked()))


def _not_connected(failures: Sequence[ClientFailure], shown: int = 10) -> str:
    """", 2 selected clients not connected (c3, c7)" for the round's log line."""
    if not failures:
        return ""
    names = ", ".join(f.client_id for f in failures[:shown])
    more = f", and {len(failures) - shown} more" if len(failures) > shown else ""
    return f", {len(failures)} selected clients not connected ({names}{more})"
