"""Admission control (``fedmosaic.net.admission``): the component with a fake clock, and one
authenticated member trying to stop the federation on a live in-process server (issue #18,
failure 3): stalled uploads that would pin the upload slots, and a flood of long polls that
would take every handler thread. The hostile member uses raw channels; the honest clients
and the operator must be answered, and the counters must equal the refusals provoked.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmosaic.algorithms.aggregate import FedAvgAggregator
from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.net.admission import (
    BUSY,
    LATE,
    OVER_BUDGET,
    STALLED,
    AdmissionControl,
    AdmissionLimits,
    AdmissionRefused,
    StreamCut,
    Ticket,
)
from fedmosaic.net.client import _Stubs
from fedmosaic.net.monitoring import ServerMetrics
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.server import start_server
from fedmosaic.net.settings import DeploySettings
from fedmosaic.net.transport import GrpcTransport
from fedmosaic.net.wire import iter_chunks
from fedmosaic.runtime.tally import ClientFailure, RoundTally
from fedmosaic.train.base import FitConfig
from tests.net.harness import LiveClients

NUMEL = 1000
CHUNK = 1024
IDLE = 1.0  # the live server's stream_idle_timeout


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def control(capacity: int = 10, reserved: int = 3, per_member: int = 4,
            idle: float = 5.0) -> tuple[AdmissionControl, FakeClock]:
    clock = FakeClock()
    return AdmissionControl(AdmissionLimits(capacity, reserved, per_member, idle),
                            clock=clock), clock


def refused(ctl: AdmissionControl, member: str, **kw: Any) -> str:
    with pytest.raises(AdmissionRefused) as info:
        ctl.admit(member, "GetTask", **kw)
    return info.value.label


# -- the component --------------------------------------------------------------------------

def test_a_member_gets_its_budget_and_one_upload() -> None:
    ctl, _ = control(per_member=3)
    tickets = [ctl.admit("a", "GetTask") for _ in range(3)]
    assert refused(ctl, "a") == OVER_BUDGET
    assert ctl.admit("b", "GetTask") is not None  # another member is unaffected
    ctl.release(tickets[0])
    ctl.release(tickets[0])  # idempotent: the handler and the RPC's end both release
    assert ctl.in_flight("a") == 2 and ctl.in_flight() == 3
    ctl.release(tickets[1])
    up = ctl.admit("a", "UploadUpdate", upload=True)  # 2 in flight, one of them an upload
    with pytest.raises(AdmissionRefused) as info:
        ctl.admit("a", "UploadUpdate", upload=True)
    assert info.value.label == OVER_BUDGET and "upload" in info.value.reason
    ctl.release(up)
    ctl.release(tickets[2])
    assert ctl.in_flight("a") == 0 and ctl.uploads("a") == 0


def test_the_reserve_is_for_members_with_nothing_in_flight_and_the_operator() -> None:
    ctl, _ = control(capacity=10, reserved=3, per_member=4)
    held = [ctl.admit(m, "GetTask") for m in ("a", "b") for _ in range(3)]  # 6
    held.append(ctl.admit("c", "GetTask"))  # 7 = capacity - reserved
    assert refused(ctl, "a") == BUSY  # a member with calls in flight: general pool only
    ctl.release(ctl.admit("a", "Heartbeat", quick=True))  # unless the call never waits
    held += [ctl.admit("d", "Join"), ctl.admit("e", "Join")]  # nothing in flight: 9
    assert refused(ctl, "f") == BUSY  # the last call is the operator's alone
    assert ctl.admit("operator", "Status", operator=True) is not None  # 10
    assert refused(ctl, "operator", operator=True) == BUSY  # full
    assert ctl.in_flight() == 10


def test_a_stream_idle_too_long_is_cut_once_and_time_not_waiting_does_not_count() -> None:
    ctl, clock = control(idle=5.0)
    cuts: list[str] = []
    t = ctl.admit("a", "UploadUpdate", upload=True)
    ctl.watch(t, lambda: cuts.append("a"))
    ctl.awaiting_client(t)
    clock.now += 4.0
    ctl.heard_from_client(t)  # a message within the limit
    clock.now += 60.0  # the server's own wait (an upload buffer, the aggregation)
    assert ctl.expire() == [] and ctl.next_expiry() is None
    ctl.awaiting_client(t)
    assert ctl.next_expiry() == clock.now + 5.0
    clock.now += 5.0
    assert ctl.expire() == []  # exactly the limit is not over it
    clock.now += 0.1
    assert ctl.expire() == [t] and cuts == ["a"]
    assert t.cut_label == STALLED and "5" in t.cut_reason
    assert ctl.expire() == [] and cuts == ["a"]  # cut once
    with pytest.raises(StreamCut) as info:
        ctl.heard_from_client(t)
    assert info.value.label == STALLED
    with pytest.raises(StreamCut):
        ctl.awaiting_client(t)
    ctl.release(t)
    assert ctl.in_flight() == 0


def test_round_close_cuts_only_streams_waiting_for_their_client() -> None:
    ctl, _ = control()
    cut: list[str] = []
    waiting, busy, other = (ctl.admit(m, meth) for m, meth in
                            (("a", "UploadUpdate"), ("b", "UploadUpdate"), ("c", "SecAgg")))
    for t in (waiting, busy, other):
        ctl.watch(t, lambda t=t: cut.append(t.member))  # type: ignore[misc]
    ctl.awaiting_client(waiting)
    ctl.awaiting_client(other)
    assert ctl.cut_waiting("round 3 closed", ("UploadUpdate",)) == [waiting]
    assert cut == ["a"] and waiting.cut_label == LATE and busy.cut_label is None
    # A cut callback that fails (the call just ended) does not stop the others.
    t2 = ctl.admit("d", "UploadUpdate")
    ctl.watch(t2, lambda: 1 / 0)
    ctl.awaiting_client(t2)
    assert set(ctl.cut_waiting("closed")) == {t2, other}
    assert cut == ["a", "c"] and other.cut_label == LATE and ctl.in_flight() == 4


def test_limits_are_checked() -> None:
    for bad in ((2, 2, 1, 1.0), (10, 1, 1, 1.0), (10, 10, 1, 1.0), (10, 2, 0, 1.0),
                (10, 2, 1, 0.0)):
        with pytest.raises(ValueError):
            AdmissionLimits(*bad)


OPS = st.lists(st.tuples(st.sampled_from(["admit", "admit_upload", "admit_op", "release",
                                          "release_again"]),
                         st.integers(0, 4), st.integers(0, 50)), max_size=120)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(3, 12), per_member=st.integers(1, 5), ops=OPS,
       reserved_frac=st.floats(0, 1))
def test_in_flight_counts_stay_within_bounds_under_any_interleaving(
        capacity: int, per_member: int, ops: list[tuple[str, int, int]],
        reserved_frac: float) -> None:
    reserved = 2 + int(reserved_frac * (capacity - 3))
    ctl = AdmissionControl(AdmissionLimits(capacity, reserved, per_member, 1.0),
                           clock=FakeClock())
    live: list[Ticket] = []
    done: list[Ticket] = []
    for op, member_no, pick in ops:
        member = f"m{member_no}"
        if op.startswith("admit"):
            try:
                t = ctl.admit(member, "X", upload=op == "admit_upload",
                              operator=op == "admit_op")
            except AdmissionRefused as exc:
                assert exc.label in (OVER_BUDGET, BUSY)
                mine = sum(t.member == member for t in live)
                over = mine >= per_member or (op == "admit_upload" and any(
                    t.member == member and t.upload for t in live))
                assert exc.label == (OVER_BUDGET if over else BUSY)
            else:
                live.append(t)
        elif op == "release" and live:
            t = live.pop(pick % len(live))
            ctl.release(t)
            done.append(t)
        elif op == "release_again" and done:
            ctl.release(done[pick % len(done)])  # a second release changes nothing
        # The model and the component agree, and every bound holds.
        assert ctl.in_flight() == len(live) <= capacity
        for m in {f"m{i}" for i in range(5)}:
            mine = [t for t in live if t.member == m]
            assert 0 <= ctl.in_flight(m) == len(mine) <= per_member
            assert ctl.uploads(m) == sum(t.upload for t in mine) <= 1
    for t in live:
        ctl.release(t)
    assert ctl.in_flight() == 0


def test_concurrent_admit_and_release_from_threads_balance() -> None:
    ctl = AdmissionControl(AdmissionLimits(64, 4, 3, 1.0))
    peak = [0]

    def worker(i: int) -> None:
        for _ in range(300):
            try:
                t = ctl.admit(f"m{i % 5}", "X", upload=i % 2 == 0)
            except AdmissionRefused:
                continue
            peak[0] = max(peak[0], ctl.in_flight(f"m{i % 5}"))
            ctl.release(t)
            ctl.release(t)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert ctl.in_flight() == 0 and 1 <= peak[0] <= 3


# -- one hostile member on a live server ----------------------------------------------------

class Live(LiveClients):
    """The live server's clients, and its service (whose admission control is tested)."""

    service: Any = None

    def start_round(self, clients: list[str]) -> tuple[threading.Thread, RoundTally, list[Any]]:
        tasks = [ClientTask(c, FitConfig(round=1, seed=i)) for i, c in enumerate(clients)]
        tally = RoundTally(FedAvgAggregator(), NUMEL, 1)
        seen: list[Any] = []

        def loop() -> None:
            for result in self.transport.fit(torch.zeros(NUMEL), tasks, None):
                seen.append(result)
                tally.add(result)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread, tally, seen

    def rejected(self) -> dict[str, int]:
        return {k: v for k, v in self.metrics.snapshot()["rejected_messages"].items() if v}


@contextlib.contextmanager
def serving(federation: Path, **overrides: Any) -> Iterator[Live]:
    values: dict[str, Any] = dict(
        credentials=federation, address="127.0.0.1", port=0, heartbeat_interval=5.0,
        round_deadline=20.0, min_clients=1, wait_for_clients=5.0, chunk_bytes=CHUNK,
        max_workers=16, max_calls=16, upload_slots=2, stream_idle_timeout=IDLE)
    settings = DeploySettings(**{**values, **overrides})
    metrics = ServerMetrics()
    transport = GrpcTransport(settings, numel=NUMEL, spec_hash="spec", experiment="test",
                              rounds=1, metrics=metrics)
    running = start_server(settings, transport, traffic=metrics)
    srv = Live(federation, transport, running.port, metrics)
    srv.service = running.service
    try:
        yield srv
    finally:
        transport.finish()
        running.stop(0)
        srv.close()


@pytest.fixture
def live(federation: Path) -> Iterator[Live]:
    with serving(federation) as srv:
        yield srv


def _task(stubs: _Stubs, instance: str) -> pb.Task:
    task = stubs.get_task(pb.TaskRequest(server_instance=instance, wait_seconds=10), timeout=20)
    assert task.kind == pb.Task.FIT
    return task


def _header(task: pb.Task) -> pb.UploadMessage:
    return pb.UploadMessage(header=pb.UploadHeader(task_id=task.task_id, round=task.round,
                                                   num_samples=10, numel=NUMEL))


_ended_at: dict[grpc.Future, float] = {}


def _watch_end(fut: grpc.Future) -> grpc.Future:
    fut.add_done_callback(lambda f: _ended_at.setdefault(f, time.monotonic()))
    return fut


def _ended(fut: grpc.Future, timeout: float) -> Any:
    """The call's status code, or "open" if it has not ended within ``timeout`` seconds."""
    try:
        exc = fut.exception(timeout=timeout)
    except grpc.FutureTimeoutError:
        return "open"
    return "ok" if exc is None else exc.code()


def test_stalled_uploads_are_cut_and_honest_uploads_succeed(live: Live) -> None:
    honest, hostile = ["client_00", "client_01"], ["client_08", "client_09"]
    joined = {c: live.joined(c) for c in honest + hostile}
    thread, tally, seen = live.start_round(honest + hostile)
    tasks = {c: _task(*joined[c]) for c in honest + hostile}
    release = threading.Event()

    def stall(task: pb.Task) -> Iterator[pb.UploadMessage]:
        yield _header(task)
        release.wait(30)  # then nothing: the stream stays open, silent

    stalled: dict[str, tuple[float, grpc.Future]] = {}
    try:
        for c in hostile:  # each pins an upload slot: both slots are taken
            stalled[c] = (time.monotonic(), _watch_end(joined[c][0].upload.future(
                stall(tasks[c]), timeout=30)))
        end = time.monotonic() + 5
        while time.monotonic() < end and any(
                live.transport.tasks[tasks[c].task_id].state != "uploading" for c in hostile):
            time.sleep(0.02)
        time.sleep(0.1)  # the slots are taken right after the task turns "uploading"
        # A second upload from the same member, while its first is open.
        second = {c: joined[c][0].upload.future(stall(tasks[c]), timeout=30) for c in hostile}
        accepted, took = {}, {}
        for c in honest:
            stubs = joined[c][0]
            start = time.monotonic()
            msgs = [pb.UploadMessage(header=_header(tasks[c]).header)] + [
                pb.UploadMessage(chunk=ch) for ch in iter_chunks(torch.ones(NUMEL), CHUNK)]
            try:
                accepted[c] = stubs.upload(iter(msgs), timeout=3 * IDLE + 5).accepted
            except grpc.RpcError as exc:
                accepted[c] = exc.code()
            took[c] = time.monotonic() - start
        outcomes = {c: (_ended(fut, 5), _ended_at.get(fut, 0.0) - opened)
                    for c, (opened, fut) in stalled.items()}
        second_codes = {c: _ended(f, 5) for c, f in second.items()}
    finally:
        release.set()
    # The honest uploads go through, once the stalled streams are cut.
    assert accepted == {c: True for c in honest}, (accepted, took)
    assert all(t < 2 * IDLE + 3 for t in took.values()), took
    for c, (code, elapsed) in outcomes.items():
        assert code == grpc.StatusCode.CANCELLED, (c, code)
        assert elapsed < IDLE + 2.0, (c, elapsed)  # cut within the idle timeout (+ watchdog)
    assert second_codes == {c: grpc.StatusCode.RESOURCE_EXHAUSTED for c in hostile}
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert tally.count == 2
    failures = {f.client_id: f.reason for f in seen if isinstance(f, ClientFailure)}
    assert set(failures) == set(hostile)
    assert all("stalled upload" in r for r in failures.values()), failures
    assert live.rejected() == {"over_budget": 2, "stalled": 2}
    assert live.metrics.snapshot()["clients_dropped"]["stalled"] == 2
    issues = {i.client_id: i.code for i in live.transport.issues.latest()}
    assert issues == {c: "stalled" for c in hostile}


def test_a_long_poll_flood_from_one_member_leaves_room_for_the_others(
        live: Live, fedlog: pytest.LogCaptureFixture) -> None:
    honest, hostile = ["client_00", "client_01"], "client_09"
    joined = {c: live.joined(c) for c in honest}
    flood_stubs, flood_instance = live.joined(hostile)
    thread, tally, _ = live.start_round(honest)  # the hostile member has no task: polls wait
    poll = pb.TaskRequest(server_instance=flood_instance, wait_seconds=4)
    flood = [flood_stubs.get_task.future(poll, timeout=20) for _ in range(200)]
    # Until the flood's immediate answers are in (the member's budget of polls is held).
    end, last, steady = time.monotonic() + 10, -1, time.monotonic()
    while time.monotonic() < end:
        answered = sum(f.done() for f in flood)
        if answered >= 200 - 4 or time.monotonic() - steady > 0.5:
            break
        if answered != last:
            last, steady = answered, time.monotonic()
        time.sleep(0.02)
    # While the member's admitted polls are held: the operator and the honest clients.
    operator = _Stubs(live.channel("operator"))
    assert operator.status(pb.StatusRequest(), timeout=2).state == "training"
    for c in honest:
        stubs, instance = joined[c]
        stubs.heartbeat(pb.HeartbeatRequest(server_instance=instance), timeout=2)
        task = _task(stubs, instance)
        assert len(list(stubs.download(pb.ModelRequest(task_id=task.task_id), timeout=5))) == 4
        msgs = [_header(task)] + [pb.UploadMessage(chunk=ch)
                                  for ch in iter_chunks(torch.ones(NUMEL), CHUNK)]
        assert stubs.upload(iter(msgs), timeout=5).accepted
    thread.join(timeout=20)
    assert not thread.is_alive() and tally.count == 2
    codes: dict[Any, int] = {}
    for f in flood:
        try:
            codes[f.result(timeout=20).kind] = codes.get(f.result().kind, 0) + 1
        except grpc.RpcError as exc:
            codes[exc.code()] = codes.get(exc.code(), 0) + 1
    refused = codes.pop(grpc.StatusCode.RESOURCE_EXHAUSTED, 0)
    served = codes.pop(pb.Task.WAIT, 0)
    # Its budget (4 at a time) served, the rest refused at once (on a slow machine a poll
    # may return before the flood is over, and one more is served).
    assert not codes and 4 <= served <= 8 and refused == 200 - served, (codes, served)
    assert live.rejected() == {"over_budget": refused}
    # Logged with the member's id and address, at most a burst of lines per window.
    records = {id(r): r for r in fedlog.records}.values()  # fedlog may see a record twice
    lines = [r.getMessage() for r in records if r.levelno == logging.WARNING and
             r.getMessage().startswith("refused GetTask from client_09 (ipv4:127.0.0.1:")]
    assert 1 <= len(lines) <= 20 and "calls already in flight" in lines[0]


def test_an_upload_still_waiting_when_its_round_closes_is_cut(federation: Path) -> None:
    # An idle timeout longer than the round: only the round's close can end the stream.
    with serving(federation, stream_idle_timeout=60.0, round_deadline=2.0) as live:
        stubs, instance = live.joined("client_09")
        thread, tally, seen = live.start_round(["client_09"])
        task = _task(stubs, instance)
        release = threading.Event()

        def stall() -> Iterator[pb.UploadMessage]:
            yield _header(task)
            release.wait(30)

        try:
            opened = time.monotonic()
            fut = _watch_end(stubs.upload.future(stall(), timeout=30))
            thread.join(timeout=10)
            code = _ended(fut, 3)
        finally:
            release.set()
        assert not thread.is_alive() and tally.count == 0
        assert [f.reason for f in seen if isinstance(f, ClientFailure)] == [
            "missed the round deadline (2s): straggler dropped"]
        # Cut when the round closed (not left open until the client gives up), its thread
        # and upload slot free for the next round.
        assert code == grpc.StatusCode.CANCELLED
        assert _ended_at[fut] - opened < 2.0 + 2.0
        assert live.rejected() == {"late": 1}
        end = time.monotonic() + 2
        while time.monotonic() < end and live.service.admission.in_flight():
            time.sleep(0.02)
        assert live.service.admission.in_flight() == 0


def test_a_trickled_upload_is_cut_at_the_minimum_rate(federation: Path) -> None:
    """A member that sends its upload one chunk at a time, each just inside the idle timeout,
    holds its upload buffer at most ``idle + model bytes / min_upload_rate`` seconds (here
    1 + 4,000 / 4,000 = 2 s), then is cut as stalled; an honest upload is unaffected."""
    with serving(federation, min_upload_rate=4000.0) as live:
        honest, hostile = "client_00", "client_09"
        joined = {c: live.joined(c) for c in (honest, hostile)}
        thread, tally, seen = live.start_round([honest, hostile])
        tasks = {c: _task(*joined[c]) for c in (honest, hostile)}
        stop = threading.Event()

        def trickle() -> Iterator[pb.UploadMessage]:
            yield _header(tasks[hostile])
            for chunk in iter_chunks(torch.ones(NUMEL), CHUNK):  # 4 chunks, 0.8 s apart
                if stop.wait(0.8 * IDLE):
                    return
                yield pb.UploadMessage(chunk=chunk)

        try:
            opened = time.monotonic()
            fut = _watch_end(joined[hostile][0].upload.future(trickle(), timeout=30))
            code = _ended(fut, 10)
            msgs = [_header(tasks[honest])] + [
                pb.UploadMessage(chunk=ch) for ch in iter_chunks(torch.ones(NUMEL), CHUNK)]
            accepted = joined[honest][0].upload(iter(msgs), timeout=10).accepted
        finally:
            stop.set()
        assert code == grpc.StatusCode.CANCELLED
        # Each chunk came within the idle timeout: only the rate budget (2 s) could cut it.
        assert 2.0 - 0.2 < _ended_at[fut] - opened < 2.0 + 1.5
        assert accepted is True
        thread.join(timeout=20)
        assert not thread.is_alive() and tally.count == 1
        failures = [f.reason for f in seen if isinstance(f, ClientFailure)]
        assert len(failures) == 1 and "slower than the minimum rate" in failures[0], failures
        assert live.rejected() == {"stalled": 1}
