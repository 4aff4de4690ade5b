"""The gRPC service: decodes calls, authenticates the caller, and hands them to the transport.

Registered with ``grpc.method_handlers_generic_handler`` with raw-bytes requests: gRPC's own
deserializer would answer an undecodable message with INTERNAL before any of this code runs,
uncounted and logged as a server traceback. Here every call first establishes the caller from
its verified TLS certificate and checks the revocation list, then decodes the request (each
message of a stream as it arrives) with the classes generated from ``proto/fedmosaic.proto``.
Every refusal -- an undecodable message included (INVALID_ARGUMENT, label ``malformed``) -- is
answered with a gRPC status and a reason, counted by label and logged as one line with the
caller's id (``RefusalLog`` keeps a flooding caller from flooding the log), and carries its
code, and whether it is permanent, as trailing metadata (``fedmosaic.net.errors``). Only an
unexpected exception in a handler, i.e. a server bug, is logged with its traceback and
answered as INTERNAL, without touching server state, so no client can crash the server.

Admission control (``fedmosaic.net.admission``) runs first in every handler, right after the
caller is identified and before any blocking work: a member over its budget (calls in
flight, one open upload) or a call that would eat into the capacity reserved for others is
refused at once with RESOURCE_EXHAUSTED (``over_budget``, ``busy``). Streams are watched:
a thread (``_StreamWatchdog``) cuts those that wait for their client longer than
``stream_idle_timeout`` (``stalled``; an upload's task fails as a stalled upload), and the
transport's round close cuts those still waiting (``late``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from fedmosaic.net.admission import AdmissionControl, AdmissionRefused, StreamCut, Ticket
from fedmosaic.net.auth import Peer, RevocationList, peer_of
from fedmosaic.net.errors import Refused
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.transport import GrpcTransport
from fedmosaic.net.wire import WireError

log = logging.getLogger(__name__)

SERVICE = "fedmosaic.v1.Federation"


class TrafficSink(Protocol):
    """Where the service reports traffic and refusals (Prometheus metrics in a server)."""

    def bytes_in(self, n: int) -> None: ...

    def bytes_out(self, n: int) -> None: ...

    def refused(self, label: str) -> None: ...


def decode(cls: Any, raw: bytes, what: str) -> Any:
    """``raw`` parsed as message class ``cls``; ``WireError`` (label ``malformed``) if it is
    not one."""
    try:
        return cls.FromString(raw)
    except (DecodeError, ValueError) as exc:  # the pure-Python runtime raises UnicodeDecodeError
        raise WireError(f"undecodable {what} ({len(raw)} bytes): not a {cls.DESCRIPTOR.name}",
                        "malformed") from exc


@dataclass
class _CallerWindow:
    start: float
    logged: int = 0
    suppressed: Counter[str] = field(default_factory=Counter)


class RefusalLog:
    """One warning line per refusal, at most ``burst`` per caller in each ``window`` seconds.

    A hostile member can send thousands of bad messages a minute; logging each would flood
    the log (and its disk). Past the burst, refusals are only tallied by reason, and one
    summary line per caller reports them when its window ends (at the next refusal of anyone
    after that, or at ``flush``). The metric still counts every refusal; the log lines plus
    the summaries account for every one of them too. At most ``max_callers`` windows are kept
    (the oldest is summarised and dropped first), so memory is bounded whatever the callers.
    """

    def __init__(self, burst: int = 20, window: float = 10.0, max_callers: int = 1024,
                 clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        if burst < 1 or window <= 0 or max_callers < 1:
            raise ValueError("RefusalLog needs burst >= 1, window > 0 and max_callers >= 1")
        self.burst, self.window, self.max_callers = burst, window, max_callers
        self.clock, self.log = clock, logger
        self._callers: dict[str, _CallerWindow] = {}
        self._next_sweep = clock() + window
        self._lock = threading.Lock()

    def refused(self, caller: str, method: str, reason: str, label: str,
                who: str | None = None) -> None:
        """Log (or tally) that ``method`` from ``caller`` was refused for ``reason``;
        ``who`` (default ``caller``) names the caller in the line, e.g. with its address."""
        now = self.clock()
        with self._lock:
            if now >= self._next_sweep:  # report callers that went quiet, once per window
                self._next_sweep = now + self.window
                for quiet in [c for c, w in self._callers.items() if now - w.start >= self.window]:
                    self._summarise(quiet, self._callers.pop(quiet), now)
            win = self._callers.get(caller)
            if win is not None and now - win.start >= self.window:
                self._summarise(caller, self._callers.pop(caller), now)
                win = None
            if win is None:
                while len(self._callers) >= self.max_callers:
                    oldest = next(iter(self._callers))
                    self._summarise(oldest, self._callers.pop(oldest), now)
                win = self._callers[caller] = _CallerWindow(now)
            if win.logged < self.burst:
                win.logged += 1
                self.log.warning("refused %s from %s: %s", method, who or caller, reason)
            else:
                win.suppressed[label] += 1

    def flush(self) -> None:
        """Summarise every open window now (the server is stopping)."""
        now = self.clock()
        with self._lock:
            for caller, win in self._callers.items():
                self._summarise(caller, win, now)
            self._callers.clear()

    def _summarise(self, caller: str, win: _CallerWindow, now: float) -> None:
        total = sum(win.suppressed.values())
        if total:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(win.suppressed.items()))
            self.log.warning("refused %d more calls from %s in %.0fs (not logged one by one; "
                             "by reason: %s)", total, caller, now - win.start, reasons)


class _StreamWatchdog:
    """The threaded service's driver of ``AdmissionControl.expire``: one daemon thread, started
    with the first watched stream, that wakes when the next stream would be idle too long
    (at least every ``period`` seconds) and cuts it. An asyncio service drives ``expire``
    from a task instead."""

    def __init__(self, admission: AdmissionControl, period: float = 0.5) -> None:
        self.admission, self.period = admission, period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ensure_running(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="fedmosaic-stream-watchdog")
                self._thread.start()

    def _run(self) -> None:
        while True:
            due = self.admission.next_expiry()
            delay = self.period if due is None else \
                min(max(due - self.admission.clock(), 0.0) + 0.01, self.period)
            if self._stop.wait(delay):
                return
            try:
                self.admission.expire()
            except Exception:  # never let the watchdog die: streams would stall unseen
                log.exception("stream watchdog failed")

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5)


STREAMS = ("UploadUpdate", "DownloadModel")
# Calls that never wait (for a round, a SecAgg stage or the client): they may use the
# reserved capacity even from a member with a call in flight, e.g. the heartbeat of a client
# waiting in a long poll.
QUICK = frozenset({"Heartbeat", "Status", "RefuseTask", "ReportEvaluation"})


class FederationService:
    """The handlers of the ``Federation`` service. ``admission`` (default: from the
    transport's settings) budgets the calls; see the module docstring."""

    def __init__(self, transport: GrpcTransport, revocations: RevocationList,
                 traffic: TrafficSink | None = None,
                 refusal_log: RefusalLog | None = None,
                 admission: AdmissionControl | None = None) -> None:
        self.transport, self.revocations, self.traffic = transport, revocations, traffic
        self.refusal_log = refusal_log or RefusalLog()
        self.admission = admission or AdmissionControl(transport.settings.admission_limits())
        self._watchdog = _StreamWatchdog(self.admission)
        # A closed round accepts nothing more: cut the streams still waiting for a client.
        transport.round_closed_hooks.append(self._round_closed)

    def _round_closed(self, round_num: int) -> None:
        self.admission.cut_waiting(f"round {round_num} closed while the stream was waiting "
                                   "for the client", STREAMS)

    # -- admission --------------------------------------------------------------------------
    def _admit(self, context: grpc.ServicerContext, method: str, peer: Peer,
               upload: bool = False) -> Ticket:
        """A ticket for the call, released when the RPC ends whatever happens (its handler's
        ``finally`` releases it sooner); ``Refused`` (RESOURCE_EXHAUSTED) if over budget."""
        member = peer.client_id if peer.role == "client" else f"{peer.role}:{peer.client_id}"
        try:
            ticket = self.admission.admit(member, method, operator=peer.role == "operator",
                                          upload=upload, quick=method in QUICK)
        except AdmissionRefused as exc:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.reason, exc.label) from None
        if not context.add_callback(lambda: self.admission.release(ticket)):
            self.admission.release(ticket)  # the RPC has already ended
            raise Refused(grpc.StatusCode.CANCELLED, "the call ended before it started",
                          "interrupted")
        return ticket

    def _watch(self, ticket: Ticket, context: grpc.ServicerContext) -> None:
        self.admission.watch(ticket, context.cancel)
        self._watchdog.ensure_running()

    # -- plumbing ---------------------------------------------------------------------------
    def _refuse(self, context: grpc.ServicerContext, method: str, peer: Peer | None,
                exc: Refused) -> None:
        self._record(context, method, peer, exc)
        # Sent with the status: the client acts on the code, not on the text.
        context.set_trailing_metadata(exc.trailing_metadata())
        context.abort(exc.code, exc.reason)

    def _record(self, context: grpc.ServicerContext, method: str, peer: Peer | None,
                exc: Refused) -> None:
        """Log (rate-limited per caller) and count a refusal."""
        address = context.peer()
        # Grouped by certified identity; without one, by host (each connection has a port).
        caller = peer.client_id if peer is not None else address.rpartition(":")[0] or address
        who = f"{peer.client_id} ({address})" if peer is not None else address
        # An incompatible client's line says what does not fit ("feature_shape: your ...").
        line = exc.reason if exc.refusal == exc.label else f"{exc.refusal}: {exc.reason}"
        self.refusal_log.refused(caller, method, line, exc.label, who=who)
        if self.traffic is not None:
            self.traffic.refused(exc.label)

    def _bug(self, context: grpc.ServicerContext, method: str, peer: Peer | None) -> None:
        log.exception("%s from %s failed", method, peer.client_id if peer else "?")
        context.abort(grpc.StatusCode.INTERNAL, "internal server error")

    def _unary(self, method: str, body: Callable[[Peer, Any], Any],
               request_type: Any) -> Callable[[bytes, grpc.ServicerContext], Any]:
        def handler(raw: bytes, context: grpc.ServicerContext) -> Any:
            peer = ticket = None
            try:
                peer = peer_of(context)
                ticket = self._admit(context, method, peer)
                self.revocations.check(peer)
                if self.traffic is not None:
                    self.traffic.bytes_in(len(raw))
                reply = body(peer, decode(request_type, raw, f"{method} request"))
                if self.traffic is not None and hasattr(reply, "ByteSize"):
                    self.traffic.bytes_out(reply.ByteSize())
                return reply
            except WireError as exc:
                self._refuse(context, method, peer, _invalid(exc))
            except Refused as exc:
                self._refuse(context, method, peer, exc)
            except Exception:  # a bug must cost one call, never the server
                self._bug(context, method, peer)
            finally:
                if ticket is not None:
                    self.admission.release(ticket)
            return None  # unreachable: abort raises
        return handler

    # -- RPCs -------------------------------------------------------------------------------
    def join(self, peer: Peer, request: pb.JoinRequest) -> pb.JoinReply:
        return self.transport.join(peer, request)

    def heartbeat(self, peer: Peer, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        return self.transport.heartbeat(peer, request.server_instance)

    def get_task(self, peer: Peer, request: pb.TaskRequest) -> pb.Task:
        return self.transport.next_task(peer, request.server_instance, request.wait_seconds)

    def secagg(self, peer: Peer, request: pb.SecAggEnvelope) -> pb.SecAggEnvelope:
        driver = self.transport.secagg
        if driver is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          "this federation does not use secure aggregation", "no_secagg")
        return driver.handle(self.transport, peer, request)

    def refuse_task(self, peer: Peer, request: pb.TaskRefusal) -> pb.RefusalReply:
        return self.transport.refuse_task(peer, request)

    def report_evaluation(self, peer: Peer,
                          request: pb.EvaluationReport) -> pb.EvaluationReply:
        return self.transport.report_evaluation(peer, request)

    def status(self, peer: Peer, request: pb.StatusRequest) -> pb.StatusReply:
        if peer.role != "operator":
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          "status needs the operator credential", "not_operator")
        return self.transport.status()

    def download(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[pb.TensorChunk]:
        peer = ticket = None
        try:
            peer = peer_of(context)
            ticket = self._admit(context, "DownloadModel", peer)
            self.revocations.check(peer)
            if self.traffic is not None:
                self.traffic.bytes_in(len(raw))
            request = decode(pb.ModelRequest, raw, "DownloadModel request")
            chunks = self.transport.model_chunks(peer, request.task_id)
        except Exception as exc:  # refusals and bugs alike end the call here
            if ticket is not None:
                self.admission.release(ticket)
            if isinstance(exc, WireError):
                self._refuse(context, "DownloadModel", peer, _invalid(exc))
            elif isinstance(exc, Refused):
                self._refuse(context, "DownloadModel", peer, exc)
            else:
                self._bug(context, "DownloadModel", peer)
            return
        self._watch(ticket, context)
        try:
            for chunk in chunks:
                if self.traffic is not None:
                    self.traffic.bytes_out(len(chunk.data))
                # gRPC sends the chunk between the yield and the next resumption: that wait
                # is the client's (flow control), and a client that stops reading stalls it.
                self.admission.awaiting_client(ticket)
                yield chunk
                self.admission.heard_from_client(ticket)
        except StreamCut as exc:  # cut at the resumption after the send
            self._record(context, "DownloadModel", peer, _cut(exc))
        except GeneratorExit:  # gRPC stopped sending: the client left, or the stream was cut
            if ticket.cut_label is not None:
                self._record(context, "DownloadModel", peer,
                             _cut(StreamCut(ticket.cut_label, ticket.cut_reason)))
            raise
        finally:
            self.admission.release(ticket)

    def upload(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> pb.UploadReply:
        peer = ticket = None
        try:
            peer = peer_of(context)
            ticket = self._admit(context, "UploadUpdate", peer, upload=True)
            self.revocations.check(peer)
            self._watch(ticket, context)
            return self.transport.receive_upload(peer, self._decoded(requests, ticket))
        except Refused as exc:
            self._refuse(context, "UploadUpdate", peer, exc)
        except Exception:
            self._bug(context, "UploadUpdate", peer)
        finally:
            if ticket is not None:
                self.admission.release(ticket)
        return pb.UploadReply()  # unreachable: abort raises

    def _decoded(self, requests: Iterator[bytes], ticket: Ticket) -> Iterator[pb.UploadMessage]:
        """The stream's messages, counted and decoded one by one as they arrive; an
        undecodable one raises ``WireError`` where the transport reads it, a stream cut by
        admission control (idle too long, round closed) ``StreamCut``. Only the time spent
        waiting here for the client's next message counts as idle: not the wait for an
        upload buffer, nor for the aggregation."""
        stream = iter(requests)
        while True:
            self.admission.awaiting_client(ticket)
            try:
                raw = next(stream)
            except StopIteration:
                self.admission.heard_from_client(ticket)  # StreamCut if that is why it ended
                return
            except grpc.RpcError:
                ticket.check()  # StreamCut if we cut it, else the client went away
                raise
            self.admission.heard_from_client(ticket)
            if self.traffic is not None:
                self.traffic.bytes_in(len(raw))
            yield decode(pb.UploadMessage, raw, "UploadUpdate message")

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's handlers: raw-bytes requests (decoded here), serialized replies."""
        def unary(method: str, body: Callable[[Peer, Any], Any], req: Any,
                  rep: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, body, req), request_deserializer=None,
                response_serializer=rep.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE, {
            "Join": unary("Join", self.join, pb.JoinRequest, pb.JoinReply),
            "Heartbeat": unary("Heartbeat", self.heartbeat, pb.HeartbeatRequest,
                               pb.HeartbeatReply),
            "GetTask": unary("GetTask", self.get_task, pb.TaskRequest, pb.Task),
            "SecAgg": unary("SecAgg", self.secagg, pb.SecAggEnvelope, pb.SecAggEnvelope),
            "Status": unary("Status", self.status, pb.StatusRequest, pb.StatusReply),
            "RefuseTask": unary("RefuseTask", self.refuse_task, pb.TaskRefusal,
                                pb.RefusalReply),
            "ReportEvaluation": unary("ReportEvaluation", self.report_evaluation,
                                      pb.EvaluationReport, pb.EvaluationReply),
            "DownloadModel": grpc.unary_stream_rpc_method_handler(
                self.download, request_deserializer=None,
                response_serializer=pb.TensorChunk.SerializeToString),
            "UploadUpdate": grpc.stream_unary_rpc_method_handler(
                self.upload, request_deserializer=None,
                response_serializer=pb.UploadReply.SerializeToString),
        })

    def close(self) -> None:
        """The server has stopped: stop the stream watchdog and write the summaries of
        refusals not logged one by one."""
        self._watchdog.stop()
        self.refusal_log.flush()


def _invalid(exc: WireError) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.label)


def _cut(exc: StreamCut) -> Refused:
    """A stream cut by admission control, as the refusal it is counted and logged as."""
    return Refused(grpc.StatusCode.CANCELLED, exc.reason, exc.label)
