"""Lightweight federation members for the load benchmark (issue #18, item 2).

One load-generator process runs many members on one asyncio event loop, each with its own
``grpc.aio`` channel (its own TCP connection and TLS 1.3 session) and its own client
certificate, speaking the real protocol as ``fedmosaic.net.client.FederationClient`` does:

- ``Join`` with the task's model layout hash and parameter count and a ``DataProfile`` that
  fits the task (the real client sends the same fields);
- ``Heartbeat`` every ``heartbeat_interval`` seconds, the interval the server's join reply
  asks for;
- ``GetTask`` long polls of ``poll_seconds``;
- a ``FIT`` task: ``DownloadModel`` (checked chunk by chunk with the real client's
  ``ChunkAssembler``), then ``UploadUpdate`` framed as the real client frames it (one
  ``UploadHeader``, then ``iter_chunks`` of the delta): a small random, finite delta (no
  training: the server's cost is what is measured), with ``num_samples`` and a metric;
- an ``EVALUATE`` task: download, then ``ReportEvaluation`` with a sample count and metrics;
- ``DONE`` ends the member.

Failed calls are classified with the real client's ``classify`` and retried with its
backoff (exponential, full jitter, a hard budget without progress); a refusal that asks the
member to join again makes it join again. Every failed call is counted by method, gRPC
status and the server's refusal code (``fedmosaic-refusal``), which is what the benchmark
reports as "requests refused".

Run by ``benchmarks/load.py`` as ``python benchmarks/load_client.py PLAN.json``; the plan
(JSON) names the server, the credentials directory, the member ids and the model layout, and
the process writes its tallies to the plan's ``out`` path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# isort: off
# fedmosaic.net first: it sets gRPC's TLS policy (TLS 1.3 only) before grpc is imported.
import fedmosaic.net  # noqa: F401  (imported for its side effect)
from fedmosaic.compat import DataProfile
from fedmosaic.net.auth import channel_credentials, pinned_server_name
from fedmosaic.net.certs import FederationPaths
from fedmosaic.net.channel import RECONNECT_OPTIONS, Stubs
from fedmosaic.net.client import SOFTWARE
from fedmosaic.net.client_errors import Backoff, classify
from fedmosaic.net.errors import REFUSAL_KEY
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.wire import MESSAGE_OVERHEAD, ChunkAssembler, grpc_options, iter_chunks

import grpc
from grpc import aio
# isort: on

# The spread of an update's values: small, finite, distinct per member and round.
DELTA_SCALE = 1e-3
# The largest chunk a member accepts (``run_client``'s ``chunk_bytes_limit`` default).
CHUNK_BYTES_LIMIT = 64 * 1024 * 1024


@dataclass
class Plan:
    """What one load-generator process runs (written as JSON by the driver)."""

    target: str                      # HOST:PORT of the server
    credentials: str                 # federation directory (ca.pem, clients/<id>.pem/.key)
    ids: list[str]                   # the members this process runs
    spec_hash: str                   # the task model's layout hash (fedmosaic.net.wire)
    numel: int                       # its parameter count
    feature_shape: list[int]         # the task's sample shape (declared in the profile)
    num_classes: int                 # the task's classes (labels 0..num_classes-1)
    out: str                         # where this process writes its tallies (JSON)
    num_samples: int = 32            # training samples each member declares and reports
    test_samples: int = 16           # local test split (EVALUATE tasks)
    poll_seconds: float = 10.0       # GetTask long-poll wait, as the real client's default
    join_concurrency: int = 64       # joins (TLS handshakes) in flight at once per process
    retry_budget: float = 120.0      # seconds without progress before a member gives up
    rpc_timeout: float = 60.0        # deadline of a call that does not wait on purpose
    deadline: float = 900.0          # the whole process gives up after this many seconds
    seed: int = 0
    # gRPC's min_reconnect_backoff_ms, which gRPC core also takes as the shortest time a
    # connection attempt (TCP, TLS handshake, HTTP/2 settings) may take. None: the real
    # client's setting (RECONNECT_OPTIONS: gRPC's default, 20 s; it was 200 ms before the
    # first load runs showed attempts timing out under bursts of joins).
    connect_timeout_ms: int | None = None


@dataclass
class Tally:
    """What one process's members did; merged by the driver."""

    members: int = 0
    joined: int = 0                  # members that joined at least once
    joins: int = 0                   # successful Join calls (rejoins included)
    done: int = 0                    # members that heard DONE
    gave_up: dict[str, int] = field(default_factory=dict)  # reason -> members
    unfinished: int = 0              # members still running at the process deadline
    join_latency_s: list[float] = field(default_factory=list)  # first join of each member
    joined_at: list[float] = field(default_factory=list)       # monotonic, first join done
    first_join_start: float | None = None                      # monotonic
    done_at: list[float] = field(default_factory=list)         # monotonic
    heartbeats: int = 0
    polls: int = 0
    fits: int = 0
    uploads_accepted: int = 0
    uploads_not_accepted: int = 0
    evaluations: int = 0
    fit_rounds: dict[str, int] = field(default_factory=dict)   # round -> accepted uploads
    # (round, monotonic when the FIT task arrived, when its upload was answered, accepted)
    fit_events: list[tuple[int, float, float, bool]] = field(default_factory=list)
    download_s: list[float] = field(default_factory=list)
    upload_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)       # "Method CODE refusal" -> n
    error_examples: dict[str, str] = field(default_factory=dict)
    started: float = 0.0             # monotonic, after imports
    ended: float = 0.0
    cpu_s: float = 0.0
    ru_maxrss_mb: float = 0.0


class MemberGaveUp(Exception):
    """A member stops for good (permanent refusal, or no progress within its budget)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def channel_options(max_message_bytes: int, server_name: str | None,
                    connect_timeout_ms: int | None = None) -> list[tuple[str, Any]]:
    """The real client's channel options, plus a subchannel pool of the channel's own: every
    member must hold its own connection (and TLS session), as separate processes would."""
    options = grpc_options(max_message_bytes) + list(RECONNECT_OPTIONS)
    if connect_timeout_ms is not None:
        options.append(("grpc.min_reconnect_backoff_ms", connect_timeout_ms))
    options.append(("grpc.use_local_subchannel_pool", 1))
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def refusal_of(exc: grpc.RpcError) -> str:
    """The server's refusal code of a failed call ('-' when it sent none)."""
    try:
        for key, value in exc.trailing_metadata() or ():  # type: ignore[attr-defined]
            if str(key).lower() == REFUSAL_KEY:
                return value.decode() if isinstance(value, bytes) else str(value)
    except Exception:  # no metadata (a connection-level failure)
        pass
    return "-"


class Member:
    """One lightweight client: join, heartbeat, long-poll, download and upload."""

    def __init__(self, cid: str, plan: Plan, tally: Tally, join_gate: asyncio.Semaphore,
                 server_name: str | None, rng: random.Random) -> None:
        self.cid, self.plan, self.tally, self.join_gate = cid, plan, tally, join_gate
        self.server_name, self.rng = server_name, rng
        self.instance = ""
        self.heartbeat_interval = 5.0
        self.chunk_bytes = 1024 * 1024
        self.backoff = Backoff(budget=plan.retry_budget)
        self.first_join = True
        self.profile = DataProfile(feature_shape=tuple(plan.feature_shape), dtype="float32",
                                   num_samples=plan.num_samples, label_min=0,
                                   label_max=plan.num_classes - 1,
                                   num_outputs=plan.num_classes,
                                   num_test_samples=plan.test_samples).to_wire()

    # -- bookkeeping ---------------------------------------------------------------------
    def _failed(self, method: str, exc: grpc.RpcError) -> str:
        """Count a failed call; return the action the real client would take."""
        code = exc.code()  # type: ignore[attr-defined]
        key = f"{method} {code.name} {refusal_of(exc)}"
        self.tally.errors[key] = self.tally.errors.get(key, 0) + 1
        self.tally.error_examples.setdefault(key, str(exc.details())[:300])  # type: ignore
        verdict = classify(exc, method)
        if verdict.permanent:
            raise MemberGaveUp(f"{method}: {verdict.reason}")
        if verdict.action == "rejoin":
            self.instance = ""
        return verdict.action

    async def _backoff(self, why: str) -> None:
        left = self.backoff.remaining()
        if left <= 0:
            raise MemberGaveUp(f"no progress for {self.plan.retry_budget:g} s: {why}")
        self.backoff.attempts += 1
        await asyncio.sleep(min(self.backoff.delay(), left))

    def _timeout(self, wanted: float) -> float:
        left = self.backoff.remaining()
        if left <= 0:
            raise MemberGaveUp(f"no progress for {self.plan.retry_budget:g} s")
        return max(min(wanted, left), 0.001)

    # -- the protocol ----------------------------------------------------------------------
    async def _join(self, stubs: Stubs) -> None:
        request = pb.JoinRequest(software=SOFTWARE, spec_hash=self.plan.spec_hash,
                                 numel=self.plan.numel, profile=self.profile)
        async with self.join_gate:
            start = time.monotonic()
            if self.tally.first_join_start is None:
                self.tally.first_join_start = start
            reply = await stubs.join(request, timeout=self._timeout(self.plan.rpc_timeout))
        if reply.numel != self.plan.numel:
            raise MemberGaveUp("model_layout")
        self.instance = reply.server_instance
        self.heartbeat_interval = reply.heartbeat_interval
        self.chunk_bytes = reply.chunk_bytes
        self.tally.joins += 1
        if self.first_join:
            self.first_join = False
            now = time.monotonic()
            self.tally.joined += 1
            self.tally.join_latency_s.append(now - start)
            self.tally.joined_at.append(now)
        self.backoff.progress()

    async def _heartbeats(self, stubs: Stubs) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            instance = self.instance
            if not instance:
                continue
            try:
                await stubs.heartbeat(pb.HeartbeatRequest(server_instance=instance),
                                      timeout=max(self.heartbeat_interval, 1.0))
                self.tally.heartbeats += 1
            except grpc.RpcError as exc:
                # Counted; the real client only logs a failed heartbeat and sends the next.
                code = exc.code()  # type: ignore[attr-defined]
                key = f"Heartbeat {code.name} {refusal_of(exc)}"
                self.tally.errors[key] = self.tally.errors.get(key, 0) + 1
                self.tally.error_examples.setdefault(key, str(exc.details())[:300])  # type: ignore

    async def _download(self, stubs: Stubs, task: pb.Task) -> Any:
        import torch

        assembler = ChunkAssembler(torch.empty(self.plan.numel), self.plan.numel,
                                   self.chunk_bytes)
        timeout = self._timeout(max(task.deadline_seconds, 1.0) + self.plan.rpc_timeout)
        async for chunk in stubs.download(pb.ModelRequest(task_id=task.task_id),
                                          timeout=timeout):
            assembler.add(chunk)
        return assembler.finish()

    async def _fit(self, stubs: Stubs, task: pb.Task, start: float) -> None:
        import torch

        weights = await self._download(stubs, task)
        got = time.monotonic()
        self.tally.download_s.append(got - start)
        gen = torch.Generator().manual_seed(self.rng.getrandbits(63))
        delta = torch.randn(weights.numel(), generator=gen).mul_(DELTA_SCALE)
        header = pb.UploadHeader(task_id=task.task_id, round=task.round,
                                 num_samples=self.plan.num_samples,
                                 metrics={"train_loss": float(self.rng.uniform(0.5, 2.0)),
                                          "steps": 1.0},
                                 numel=delta.numel())

        async def messages() -> Any:  # the real client's framing: header, then the chunks
            yield pb.UploadMessage(header=header)
            for chunk in iter_chunks(delta, self.chunk_bytes):
                yield pb.UploadMessage(chunk=chunk)

        self.tally.fits += 1
        reply = await stubs.upload(messages(), timeout=self._timeout(
            max(task.deadline_seconds, 1.0) + self.plan.rpc_timeout))
        answered = time.monotonic()
        self.tally.upload_s.append(answered - got)
        self.tally.fit_events.append((int(task.round), start, answered, bool(reply.accepted)))
        if reply.accepted:
            self.tally.uploads_accepted += 1
            key = str(task.round)
            self.tally.fit_rounds[key] = self.tally.fit_rounds.get(key, 0) + 1
        else:
            self.tally.uploads_not_accepted += 1
        self.backoff.progress()

    async def _evaluate(self, stubs: Stubs, task: pb.Task) -> None:
        await self._download(stubs, task)
        await stubs.report_evaluation(
            pb.EvaluationReport(task_id=task.task_id, round=task.round,
                                num_samples=self.plan.test_samples,
                                metrics={"loss": float(self.rng.uniform(0.5, 2.0)),
                                         "accuracy": float(self.rng.uniform(0.0, 1.0))}),
            timeout=self._timeout(self.plan.rpc_timeout))
        self.tally.evaluations += 1
        self.backoff.progress()

    async def run(self) -> None:
        paths = FederationPaths(Path(self.plan.credentials))
        credentials = channel_credentials(paths.ca_cert, paths.client_cert(self.cid),
                                          paths.client_key(self.cid))
        limit = CHUNK_BYTES_LIMIT + MESSAGE_OVERHEAD  # as run_client's default
        channel = aio.secure_channel(self.plan.target, credentials,
                                     options=channel_options(limit, self.server_name,
                                                             self.plan.connect_timeout_ms))
        stubs = Stubs(channel)
        beat = asyncio.get_running_loop().create_task(self._heartbeats(stubs))
        method = "Join"
        try:
            while True:
                try:
                    if not self.instance:
                        method = "Join"
                        await self._join(stubs)
                    method = "GetTask"
                    wait = min(self.plan.poll_seconds, self.backoff.remaining() / 2)
                    task = await stubs.get_task(
                        pb.TaskRequest(server_instance=self.instance,
                                       wait_seconds=max(wait, 0.0)),
                        timeout=self._timeout(max(wait, 0.0) + self.plan.rpc_timeout))
                    self.tally.polls += 1
                    self.backoff.progress()
                    if task.kind == pb.Task.DONE:
                        self.tally.done += 1
                        self.tally.done_at.append(time.monotonic())
                        return
                    if task.kind == pb.Task.FIT:
                        method = "Fit"
                        await self._fit(stubs, task, time.monotonic())
                    elif task.kind == pb.Task.EVALUATE:
                        method = "Evaluate"
                        await self._evaluate(stubs, task)
                except grpc.RpcError as exc:
                    action = self._failed(method, exc)
                    if action != "rejoin":
                        await self._backoff(f"{method}: {exc.code()}")  # type: ignore
        except MemberGaveUp as exc:
            self.tally.gave_up[exc.reason] = self.tally.gave_up.get(exc.reason, 0) + 1
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
            await channel.close(grace=None)


async def run_plan(plan: Plan) -> Tally:
    """Run every member of ``plan`` until it hears DONE, gives up, or the plan's deadline."""
    tally = Tally(members=len(plan.ids), started=time.monotonic())
    server_name = pinned_server_name(Path(plan.credentials) / "ca.pem")
    gate = asyncio.Semaphore(plan.join_concurrency)
    seeds = random.Random(plan.seed)
    members = [Member(cid, plan, tally, gate, server_name, random.Random(seeds.getrandbits(64)))
               for cid in plan.ids]
    loop = asyncio.get_running_loop()

    async def run(member: Member) -> None:
        try:
            await member.run()
        except Exception as exc:  # a bug or bad setup, not the server: recorded, never lost
            why = f"error: {type(exc).__name__}: {exc}"[:200]
            tally.gave_up[why] = tally.gave_up.get(why, 0) + 1

    tasks = [loop.create_task(run(m)) for m in members]
    # SIGTERM (the driver stopping a size early) ends the members and still writes the tally.
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    stopper = loop.create_task(stop.wait())
    everyone = asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.wait([everyone, stopper], timeout=plan.deadline,
                       return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    pending = [t for t in tasks if not t.done()]
    tally.unfinished = len(pending)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    await asyncio.gather(everyone, stopper, return_exceptions=True)
    tally.ended = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    tally.cpu_s = usage.ru_utime + usage.ru_stime
    tally.ru_maxrss_mb = usage.ru_maxrss / 1024
    return tally


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path, help="the plan (JSON) written by benchmarks/load.py")
    args = parser.parse_args(argv)
    plan = Plan(**json.loads(args.plan.read_text()))
    tally = asyncio.run(run_plan(plan))
    out = Path(plan.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(tally)))
    tmp.replace(out)
    summary = Counter({"members": tally.members, "done": tally.done,
                       "errors": sum(tally.errors.values())})
    print(json.dumps(dict(summary)), file=sys.stderr)


if __name__ == "__main__":
    main()
