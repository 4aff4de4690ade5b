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

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from fedmosaic.net.admission import (
    STALLED,
    AdmissionControl,
    AdmissionRefused,
    StreamCut,
    Ticket,
)
from fedmosaic.net.auth import Peer, RevocationList, peer_of
from fedmosaic.net.errors import Refused
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.transport import GrpcTransport, MessageTooLarge, poll_seconds, wire_status
from fedmosaic.net.wire import WireError

log = logging.getLogger(__name__)

SERVICE = "fedmosaic.v1.Federation"


class TrafficSink(Protocol):
    """Where the service reports traffic and refusals (Prometheus metrics in a server)."""

    def bytes_in(self, n: int) -> None: ...

    def bytes_out(self, n: int) -> None: ...

    def refused(self, label: str) -> str | None: ...


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


STREAMS = ("UploadUpdate", "DownloadModel")
# Calls that never wait (for a round, a SecAgg stage or the client): they may use the
# reserved capacity even from a member with a call in flight, e.g. the heartbeat of a client
# waiting in a long poll.
QUICK = frozenset({"Heartbeat", "Status", "RefuseTask", "ReportEvaluation"})
#: Bound on a handler thread's wait for the event loop to read the next upload message
#: beyond the stream idle timeout (the loop cuts idle streams itself; this only keeps a
#: thread from waiting forever on a loop that has stopped).
READ_GRACE = 10.0


class _ClientGone(grpc.RpcError):
    """The client's stream ended abnormally (it went away, or the call was cancelled)."""


class _UploadStream:
    """An upload's request stream, read on the event loop and handed as decoded messages to
    the handler thread that assembles the update (``GrpcTransport.finish_upload``).

    Each read is watched by admission control: only the time spent waiting here for the
    client counts as idle (not the wait for an upload buffer, nor for the aggregation). A cut
    (idle too long, round closed; from any thread) cancels the pending read, which then
    raises ``StreamCut``. A message over the message limit raises ``MessageTooLarge`` before
    it is decoded; one that does not decode, ``WireError`` (``malformed``)."""

    def __init__(self, service: FederationService, requests: Any, ticket: Ticket) -> None:
        self.service, self.ticket = service, ticket
        self.loop = asyncio.get_running_loop()
        self._it = requests.__aiter__()
        self._pending: asyncio.Future[Any] | None = None
        self.received = 0  # bytes of the stream's messages so far
        self._deadline: float | None = None  # loop time by which the upload must be whole
        self._budget = 0.0
        self._rate = 0.0

    def finish_within(self, seconds: float, rate: float) -> None:
        """From now, the rest of the upload must arrive within ``seconds`` (its size at
        ``rate`` bytes/s plus the idle timeout): a member trickling messages just inside the
        idle timeout cannot hold its upload buffer longer than an honest slow client."""
        self._deadline = self.loop.time() + seconds
        self._budget, self._rate = seconds, rate

    def _too_slow(self) -> StreamCut:
        return StreamCut(STALLED, f"upload slower than the minimum rate ({self._rate:g} B/s): "
                                  f"{self.received} bytes, not finished within "
                                  f"{self._budget:.1f} s of getting its upload buffer")

    def cut(self) -> None:
        """Admission control cut the stream: cancel the read in progress (thread-safe)."""
        self.loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()

    async def read(self) -> bytes | None:
        """The next raw message, None at the end of the stream."""
        admission, ticket = self.service.admission, self.ticket
        ticket.check()
        admission.awaiting_client(ticket)
        self._pending = asyncio.ensure_future(self._it.__anext__())
        try:
            if self._deadline is None:
                raw = await self._pending
            else:
                left = self._deadline - self.loop.time()
                if left <= 0:
                    self._pending.cancel()
                    raise self._too_slow()
                try:
                    raw = await asyncio.wait_for(self._pending, left)
                except TimeoutError:
                    raise self._too_slow() from None
        except StopAsyncIteration:
            admission.heard_from_client(ticket)  # StreamCut if that is why it ended
            return None
        except asyncio.CancelledError:
            ticket.check()  # StreamCut: we cut it
            raise
        except StreamCut:  # too slow for the minimum rate
            raise
        except Exception as exc:
            ticket.check()
            raise _ClientGone(str(exc)) from exc
        finally:
            self._pending = None
        admission.heard_from_client(ticket)
        self.received += len(raw)
        limit = self.service.message_limit
        if limit is not None and len(raw) > limit:
            raise MessageTooLarge(len(raw), limit)
        if self.service.traffic is not None:
            self.service.traffic.bytes_in(len(raw))
        return bytes(raw)

    async def first(self) -> pb.UploadMessage | None:
        raw = await self.read()
        return None if raw is None else decode(pb.UploadMessage, raw, "UploadUpdate message")

    def messages(self) -> Iterator[pb.UploadMessage]:
        """The rest of the stream, decoded, for a handler thread (blocks on the loop)."""
        limit = self.service.admission.limits.stream_idle + READ_GRACE
        while True:
            future = asyncio.run_coroutine_threadsafe(self.read(), self.loop)
            try:
                raw = future.result(timeout=limit)
            except (concurrent.futures.CancelledError, asyncio.CancelledError):
                self.ticket.check()
                raise _ClientGone("upload cancelled") from None
            except concurrent.futures.TimeoutError:
                future.cancel()
                self.ticket.check()
                raise _ClientGone("upload stream stopped answering") from None
            if raw is None:
                return
            yield decode(pb.UploadMessage, raw, "UploadUpdate message")


class FederationService:
    """The handlers of the ``Federation`` service, for a ``grpc.aio`` server. ``admission``
    (default: from the transport's settings) budgets the calls; ``executor`` runs the
    handlers' blocking work (joins, uploads, SecAgg stages); ``message_limit`` is the
    largest request message accepted (None: no check here). See the module docstring."""

    def __init__(self, transport: GrpcTransport, revocations: RevocationList,
                 traffic: TrafficSink | None = None,
                 refusal_log: RefusalLog | None = None,
                 admission: AdmissionControl | None = None,
                 executor: concurrent.futures.Executor | None = None,
                 message_limit: int | None = None) -> None:
        self.transport, self.revocations, self.traffic = transport, revocations, traffic
        self.refusal_log = refusal_log or RefusalLog()
        self.admission = admission or AdmissionControl(transport.settings.admission_limits())
        self.executor = executor
        self.message_limit = message_limit
        self.loop: asyncio.AbstractEventLoop | None = None
        self._polls: dict[str, set[asyncio.Event]] = {}  # client -> its waiting long polls
        self._upload_gate: asyncio.Semaphore | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._watchdog_kick: asyncio.Event | None = None
        # A closed round accepts nothing more: cut the streams still waiting for a client.
        transport.round_closed_hooks.append(self._round_closed)
        transport.wakers.append(self._wake_threadsafe)

    async def bind(self) -> None:
        """Attach to the running event loop (the server's): the upload gate and the stream
        watchdog live there."""
        self.loop = asyncio.get_running_loop()
        self._upload_gate = asyncio.Semaphore(self.transport.settings.upload_slots)
        self._watchdog_kick = asyncio.Event()
        self._watchdog = asyncio.ensure_future(self._watch_streams())

    def _round_closed(self, round_num: int) -> None:
        self.admission.cut_waiting(f"round {round_num} closed while the stream was waiting "
                                   "for the client", STREAMS)

    # -- long polls ---------------------------------------------------------------------------
    def _wake_threadsafe(self, clients: Sequence[str] | None) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            # RuntimeError: the loop closed meanwhile, so nobody is waiting.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake, None if clients is None else list(clients))

    def _wake(self, clients: list[str] | None) -> None:
        targets = self._polls.values() if clients is None else \
            [self._polls[c] for c in clients if c in self._polls]
        for events in targets:
            for event in events:
                event.set()

    async def _get_task(self, peer: Peer, request: pb.TaskRequest) -> pb.Task:
        """Long poll without a thread: check, then wait for a wake-up of this client (or the
        end of the wait) and check again. The waiter is registered before each check, so a
        wake-up between the check and the wait is not lost."""
        loop = asyncio.get_running_loop()
        end = loop.time() + poll_seconds(request.wait_seconds)
        event = asyncio.Event()
        waiting = self._polls.setdefault(peer.client_id, set())
        waiting.add(event)
        try:
            while True:
                event.clear()
                reply = self.transport.poll_task(peer, request.server_instance)
                if reply is not None:
                    return reply
                left = end - loop.time()
                if left <= 0:
                    return self.transport.idle_reply()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), left)
        finally:
            waiting.discard(event)
            if not waiting:
                self._polls.pop(peer.client_id, None)

    # -- admission ----------------------------------------------------------------------------
    def _admit(self, method: str, peer: Peer, upload: bool = False) -> Ticket:
        """A ticket for the call (the handler's ``finally`` releases it); ``Refused``
        (RESOURCE_EXHAUSTED) if over budget."""
        member = peer.client_id if peer.role == "client" else f"{peer.role}:{peer.client_id}"
        try:
            return self.admission.admit(member, method, operator=peer.role == "operator",
                                        upload=upload, quick=method in QUICK)
        except AdmissionRefused as exc:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.reason, exc.label) from None

    def _watch(self, ticket: Ticket, cut: Callable[[], Any]) -> None:
        self.admission.watch(ticket, cut)
        if self._watchdog_kick is not None:
            self._watchdog_kick.set()  # a new stream may expire before the next planned check

    async def _watch_streams(self, period: float = 0.5) -> None:
        """Drive ``AdmissionControl.expire``: wake when the next watched stream would be idle
        too long (at least every ``period`` seconds) and cut it."""
        assert self._watchdog_kick is not None
        while True:
            due = self.admission.next_expiry()
            delay = period if due is None else \
                min(max(due - self.admission.clock(), 0.0) + 0.01, period)
            self._watchdog_kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._watchdog_kick.wait(), delay)
            try:
                self.admission.expire()
            except Exception:  # never let the watchdog die: streams would stall unseen
                log.exception("stream watchdog failed")

    @staticmethod
    def _cancel_current() -> Callable[[], Any]:
        """A thread-safe cut for a stream handled by the current task: cancel the task (gRPC
        then ends the call as CANCELLED)."""
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        return lambda: loop.call_soon_threadsafe(task.cancel)

    # -- plumbing -----------------------------------------------------------------------------
    async def _refuse(self, context: grpc.aio.ServicerContext, method: str,
                      peer: Peer | None, exc: Refused) -> None:
        self._record(context, method, peer, exc)
        # Sent with the status: the client acts on the code, not on the text.
        context.set_trailing_metadata(exc.trailing_metadata())
        await context.abort(exc.code, exc.reason)

    def _record(self, context: grpc.aio.ServicerContext, method: str, peer: Peer | None,
                exc: Refused) -> None:
        """Log (rate-limited per caller) and count a refusal."""
        address = context.peer()
        # Grouped by certified identity; without one, by host (each connection has a port).
        caller = peer.client_id if peer is not None else address.rpartition(":")[0] or address
        who = f"{peer.client_id} ({address})" if peer is not None else address
        # An incompatible client's line says what does not fit ("feature_shape: your ...").
        line = exc.reason if exc.refusal == exc.label else f"{exc.refusal}: {exc.reason}"
        self.refusal_log.refused(caller, method, line, exc.label, who=who)
        label = exc.label
        if self.traffic is not None:
            label = self.traffic.refused(exc.label) or label  # the metric's bounded label
        with self.transport.cond:
            self.transport.refused_messages[label] += 1

    async def _bug(self, context: grpc.aio.ServicerContext, method: str,
                   peer: Peer | None) -> None:
        log.exception("%s from %s failed", method, peer.client_id if peer else "?")
        await context.abort(grpc.StatusCode.INTERNAL, "internal server error")

    def _peer(self, context: grpc.aio.ServicerContext, raw: bytes | None = None) -> Peer:
        """The caller, from its verified certificate; an over-limit request is refused before
        anything else (``oversized``), as gRPC itself would refuse a larger one."""
        if raw is not None and self.message_limit is not None and len(raw) > self.message_limit:
            exc = MessageTooLarge(len(raw), self.message_limit)
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), exc.label)
        return peer_of(context)

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the executor: work that may wait (for a SecAgg stage, the server
        loop) or compute (a join probe) must not hold the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _unary(self, method: str, body: Callable[[Peer, Any], Any], request_type: Any,
               mode: str = "inline") -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
        """A unary handler. ``mode``: ``inline`` (quick, on the loop), ``thread`` (on the
        executor) or ``async`` (``body`` is a coroutine function)."""
        async def handler(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            peer = ticket = None
            refusal: Refused | None = None
            try:
                try:
                    peer = self._peer(context, raw)
                except Refused:
                    with contextlib.suppress(Refused):
                        peer = peer_of(context)  # an oversized call is logged by identity
                    raise
                ticket = self._admit(method, peer)
                self.revocations.check(peer)
                if self.traffic is not None:
                    self.traffic.bytes_in(len(raw))
                request = decode(request_type, raw, f"{method} request")
                if mode == "thread":
                    reply = await self._blocking(body, peer, request)
                elif mode == "async":
                    reply = await body(peer, request)
                else:
                    reply = body(peer, request)
                if self.traffic is not None and hasattr(reply, "ByteSize"):
                    self.traffic.bytes_out(reply.ByteSize())
                return reply
            except WireError as exc:
                refusal = _invalid(exc)
            except Refused as exc:
                refusal = exc
            except Exception:  # a bug must cost one call, never the server
                await self._bug(context, method, peer)
            finally:
                if ticket is not None:
                    self.admission.release(ticket)
            if refusal is not None:
                await self._refuse(context, method, peer, refusal)
            return None  # unreachable: abort raises
        return handler

    # -- RPCs ---------------------------------------------------------------------------------
    def join(self, peer: Peer, request: pb.JoinRequest) -> pb.JoinReply:
        return self.transport.join(peer, request)

    def heartbeat(self, peer: Peer, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        return self.transport.heartbeat(peer, request.server_instance)

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

    async def download(self, raw: bytes, context: grpc.aio.ServicerContext) -> None:
        peer = ticket = None
        refusal: Refused | None = None
        try:
            try:
                peer = self._peer(context, raw)
                ticket = self._admit("DownloadModel", peer)
                self.revocations.check(peer)
                if self.traffic is not None:
                    self.traffic.bytes_in(len(raw))
                request = decode(pb.ModelRequest, raw, "DownloadModel request")
                # The task's dispatch transform (a fingerprint) may compute: not on the loop.
                chunks = await self._blocking(self.transport.model_chunks, peer,
                                              request.task_id)
            except WireError as exc:
                refusal = _invalid(exc)
            except Refused as exc:
                refusal = exc
            except Exception:
                await self._bug(context, "DownloadModel", peer)
            if refusal is not None:
                await self._refuse(context, "DownloadModel", peer, refusal)
            assert ticket is not None
            self._watch(ticket, self._cancel_current())
            try:
                for chunk in chunks:
                    if self.traffic is not None:
                        self.traffic.bytes_out(len(chunk.data))
                    # The write waits for the client to take the chunk (flow control): that
                    # wait is the client's, and a client that stops reading stalls it.
                    self.admission.awaiting_client(ticket)
                    await context.write(chunk)
                    self.admission.heard_from_client(ticket)
            except StreamCut as exc:  # cut while the client was reading
                self._record(context, "DownloadModel", peer, _cut(exc))
            except asyncio.CancelledError:  # cut by us, or the client left
                if ticket.cut_label is not None:
                    self._record(context, "DownloadModel", peer,
                                 _cut(StreamCut(ticket.cut_label, ticket.cut_reason)))
                raise
        finally:
            if ticket is not None:
                self.admission.release(ticket)

    async def upload(self, requests: Any, context: grpc.aio.ServicerContext) -> pb.UploadReply:
        peer = ticket = None
        refusal: Refused | None = None
        try:
            peer = self._peer(context)
            ticket = self._admit("UploadUpdate", peer, upload=True)
            self.revocations.check(peer)
            stream = _UploadStream(self, requests, ticket)
            self._watch(ticket, stream.cut)
            try:
                first = await stream.first()
            except WireError as exc:  # the first message does not decode: no task is touched
                raise Refused(wire_status(exc), str(exc), exc.label) from exc
            except StreamCut as exc:  # no header within the idle timeout: no task touched
                raise Refused(grpc.StatusCode.CANCELLED, exc.reason, exc.label) from exc
            except _ClientGone as exc:  # the client went away before its header arrived
                raise Refused(grpc.StatusCode.CANCELLED, "upload interrupted",
                              "interrupted") from exc
            task = self.transport.open_upload(peer, first)
            assert self._upload_gate is not None and first is not None
            # At most upload_slots uploads assemble at once (each on a thread, holding an
            # upload buffer); the others wait here, on the loop, not in a thread.
            async with self._upload_gate:
                settings = self.transport.settings
                stream.finish_within(
                    settings.stream_idle_timeout
                    + 4 * self.transport.numel / settings.min_upload_rate,
                    settings.min_upload_rate)
                return await self._blocking(self.transport.finish_upload, peer, task,
                                            first.header, stream.messages())
        except Refused as exc:
            refusal = exc
        except Exception:
            await self._bug(context, "UploadUpdate", peer)
        finally:
            if ticket is not None:
                self.admission.release(ticket)
        await self._refuse(context, "UploadUpdate", peer, refusal)
        return pb.UploadReply()  # unreachable: abort raises

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's handlers: raw-bytes requests (decoded here), serialized replies."""
        def unary(method: str, body: Callable[[Peer, Any], Any], req: Any, rep: Any,
                  mode: str = "inline") -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, body, req, mode), request_deserializer=None,
                response_serializer=rep.SerializeToString)

        return grpc.method_handlers_generic_handler(SERVICE, {
            # The join check may run the task's model on a probe sample: a thread.
            "Join": unary("Join", self.join, pb.JoinRequest, pb.JoinReply, "thread"),
            "Heartbeat": unary("Heartbeat", self.heartbeat, pb.HeartbeatRequest,
                               pb.HeartbeatReply),
            "GetTask": unary("GetTask", self._get_task, pb.TaskRequest, pb.Task, "async"),
            # A SecAgg+ stage call waits for the stage to close: a thread.
            "SecAgg": unary("SecAgg", self.secagg, pb.SecAggEnvelope, pb.SecAggEnvelope,
                            "thread"),
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

    async def aclose(self) -> None:
        """The server has stopped (on its loop): stop the stream watchdog."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None

    def close(self) -> None:
        """Write the summaries of refusals not logged one by one."""
        self.refusal_log.flush()


def _invalid(exc: WireError) -> Refused:
    return Refused(wire_status(exc), str(exc), exc.label)


def _cut(exc: StreamCut) -> Refused:
    """A stream cut by admission control, as the refusal it is counted and logged as."""
    return Refused(grpc.StatusCode.CANCELLED, exc.reason, exc.label)
