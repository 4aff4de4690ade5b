"""``serve``: run an experiment's server over gRPC (``fedmosaic server EXPERIMENT.toml``).

The pieces come from the experiment file as for ``fedmosaic run`` (``build.server_task``):
strategy, the trainer (its model is the task's) and the central test set, if any; only the
transport differs (``GrpcTransport``). With the clients' own data (``[data] dataset =
"files"`` / ``"custom"``) the server never opens their files: it reads only the test set the
experiment names, and the ``TaskProfile`` that joining clients are checked against comes
from that test set or from ``[data] feature_shape`` / ``num_classes``.

The output directory receives the same checkpoint, ``metrics.json`` and ``model.pt``; a
checkpoint of the same experiment found there is resumed from automatically,
so a server killed at any moment (even ``kill -9``) continues after its last completed round
when restarted, and the clients reconnect by themselves. ``endpoint.json`` in the output
directory tells scripts where the server listens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedmosaic.config import Experiment
from fedmosaic.core.errors import ConfigError, RoundFailedError
from fedmosaic.net.auth import RevocationList, server_credentials
from fedmosaic.net.certs import FederationPaths
from fedmosaic.net.channel import grpc_options
from fedmosaic.net.service import FederationService
from fedmosaic.net.settings import DeploySettings
from fedmosaic.net.transport import GrpcTransport
from fedmosaic.net.wire import spec_hash
from fedmosaic.runtime.checkpoint import (
    CHECKPOINT_NAME,
    RUN_FILES,
    atomic_write_bytes,
    load_checkpoint,
    remove_stale_temporaries,
)
from fedmosaic.runtime.result import RunResult, write_json

log = logging.getLogger(__name__)

ENDPOINT_FILE = "endpoint.json"


class _LoopThread:
    """The process's event loop for ``grpc.aio`` servers: one daemon thread, started with the
    first server and shared by every server of the process (gRPC's asyncio layer is bound to
    one loop per process), so the caller's thread (the server loop) never runs asyncio."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, daemon=True,
                                 name="fedmosaic-grpc-aio").start()
                cls._loop = loop
            return cls._loop

    @classmethod
    def run(cls, coro: Any, timeout: float | None = None) -> Any:
        """Run ``coro`` on the loop and wait for its result from this (another) thread."""
        return asyncio.run_coroutine_threadsafe(coro, cls.get()).result(timeout)


@dataclass
class RunningServer:
    """A started gRPC server and its transport (``serve`` drives rounds on it)."""

    grpc_server: grpc.aio.Server
    transport: GrpcTransport
    port: int
    service: FederationService | None = None
    executor: futures.ThreadPoolExecutor | None = None

    def stop(self, grace: float = 1.0) -> None:
        """Stop listening, end the calls in flight (after ``grace`` seconds), then the
        handler threads of blocking work."""
        self.transport.stop()  # long polls answer at once
        try:
            _LoopThread.run(self._stop(grace), timeout=grace + 30.0)
        finally:
            if self.executor is not None:
                self.executor.shutdown(wait=True, cancel_futures=True)
            if self.service is not None:
                self.service.close()

    async def _stop(self, grace: float) -> None:
        await self.grpc_server.stop(grace)
        if self.service is not None:
            await self.service.aclose()


#: gRPC's own ceiling on a received message, as a multiple of the server's message limit.
#: Up to it, a message over the limit reaches the service and is refused, counted and
#: logged as ``oversized``; past it, gRPC answers RESOURCE_EXHAUSTED before fedmosaic sees the
#: call (an upload stream then ends as ``interrupted``). Memory: gRPC buffers a message
#: whole, so each call in flight can hold up to this many times the limit.
GRPC_CEILING_FACTOR = 2


def _server_options(message_limit: int) -> list[tuple[str, Any]]:
    """``grpc_options`` with the receive ceiling raised to ``GRPC_CEILING_FACTOR`` times
    the limit, so that the service sees (and counts) moderately oversized messages."""
    ceiling = GRPC_CEILING_FACTOR * message_limit
    return [(k, ceiling if k == "grpc.max_receive_message_length" else v)
            for k, v in grpc_options(message_limit)]


def start_server(settings: DeploySettings, transport: GrpcTransport,
                 traffic: Any = None) -> RunningServer:
    """Start listening (TLS with required client certificates) and return the server.

    The service is ``grpc.aio``: a call costs a coroutine, not a thread, while it waits (a
    long poll, a stream waiting for its client), so thousands of connected clients cost
    memory, not threads. ``max_workers`` threads run the blocking work (joins, uploads being
    assembled, SecAgg+ stages); admission control (net/admission.py) bounds the calls in
    flight (``max_calls``) and refuses, with a count and a log line, what would overrun them.
    """
    paths = FederationPaths(settings.credentials)
    revocations = RevocationList(paths.crl, paths.ca_cert)
    message_limit = settings.max_message_bytes
    if transport.secagg is not None:
        message_limit = max(message_limit,
                            transport.secagg.max_message_bytes(transport.numel))
    executor = futures.ThreadPoolExecutor(max_workers=settings.max_workers,
                                          thread_name_prefix="fedmosaic-rpc")
    service = FederationService(transport, revocations, traffic, executor=executor,
                                message_limit=message_limit)
    address = f"{settings.address}:{settings.port}"
    credentials = server_credentials(paths)

    async def start() -> tuple[grpc.aio.Server, int]:
        # gRPC's own limit is the last line against a flood: what it refuses fedmosaic
        # never sees.
        server = grpc.aio.server(handlers=[service.handler()],
                                 options=_server_options(message_limit),
                                 maximum_concurrent_rpcs=settings.max_calls
                                 + settings.max_queued_rpcs)
        try:
            port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise ConfigError("server.port", settings.port, f"a free port ({exc})") from exc
        if port == 0:
            raise ConfigError("server.port", settings.port,
                              f"a port this host can bind ({address})")
        await service.bind()
        await server.start()
        return server, port

    try:
        server, port = _LoopThread.run(start(), timeout=60.0)
    except BaseException:
        executor.shutdown()
        raise
    return RunningServer(server, transport, port, service, executor)


def serve(exp: Experiment, out: Path, settings: DeploySettings,
          metrics: Any = None) -> RunResult:
    """Run ``exp`` with remote clients until all rounds are done; see the module docstring."""
    import torch

    from fedmosaic.build import build_evaluation, build_strategy, central_evaluation, server_task
    from fedmosaic.runtime.simulate import simulate

    if exp[""]["threads"] > 0:
        torch.set_num_threads(exp[""]["threads"])
    task = server_task(exp)
    trainer = task.trainer
    # The data's shape builds a [watermark]'s triggers; deployment: DP noise from SecureNoise.
    strategy = build_strategy(exp, task.data, deployment=True, profile=task.profile)
    if strategy.straggler_fraction > 0:
        raise ConfigError("strategy.stragglers", strategy.straggler_fraction,
                          "0 with real clients: stragglers are real, and the round deadline "
                          "(server.round_deadline) drops them")
    rounds = exp[""]["rounds"]
    kind = exp["strategy"].get("schedule", "sync")  # fedbuff/fedasync run live here
    federated_eval = build_evaluation(exp, task.data)
    if kind != "sync" and federated_eval is not None:
        raise ConfigError("evaluation", "<table>", "no federated [evaluation] with an "
                          f"asynchronous schedule ('{kind}') over gRPC yet: its "
                          "evaluation tasks would share the clients' single task slot with "
                          "their training tasks (use a central test set, [data] test)")
    secagg = _secagg_driver(exp, task.data, settings)
    transport = GrpcTransport(settings, numel=trainer.spec.numel, spec_hash=spec_hash(trainer.spec),
                              experiment=exp.name, rounds=rounds, secagg=secagg,
                              metrics=metrics, task_profile=task.profile,
                              # Without a known input shape the join check probes the model.
                              probe_trainer=trainer if task.profile.feature_shape is None
                              else None)
    if secagg is not None:
        # Adopt the strategy's integer encoder (distributed Skellam) before the message
        # limit is set: its masked inputs have the padded dimension of its ring.
        secagg.check_strategy(strategy)
    running = start_server(settings, transport, traffic=metrics)
    out.mkdir(parents=True, exist_ok=True)
    # A server killed while writing a checkpoint (or metrics.json, model.pt, endpoint.json)
    # leaves the temporary file of that write behind; the file it replaces is intact.
    stale = remove_stale_temporaries(out, (*RUN_FILES, ENDPOINT_FILE))
    if stale:
        log.info("removed %d temporary file%s left in %s by an interrupted write (%s)",
                 len(stale), "s" * (len(stale) > 1), out, ", ".join(p.name for p in stale[:5]))
    atomic_write_bytes(out / ENDPOINT_FILE, json.dumps({
        "address": settings.address, "port": running.port, "pid": os.getpid(),
        "instance": transport.instance,
        "metrics_port": getattr(metrics, "port", None)}).encode())
    log.info("server for %s listening on %s:%d (TLS, client certificates required)", exp.name,
             settings.address, running.port)

    def on_round(record: dict[str, Any]) -> None:
        transport.round_completed(record)
        if metrics is not None:
            metrics.round_completed(record)
        central = record.get("test_accuracy")
        log.info("round %d done: %d updates, %d failures, %d rejected, %s %s",
                 record["round"], record["updates"], record["failures"], record["rejected"],
                 "test accuracy" if central is not None or "fed_test_accuracy" not in record
                 else "federated test accuracy",
                 central if central is not None else record.get("fed_test_accuracy"))

    try:
        retries = RoundRetries(settings.round_retries)
        while True:
            resume = (out / CHECKPOINT_NAME).is_file()
            done = int(load_checkpoint(out)["round"]) if resume else 0
            if resume:
                transport.resumed_at(done)
                log.info("resuming %s after round %d from %s", exp.name, done, out)
            try:
                # simulate reads only ``.test`` from its data argument when given a transport.
                result = simulate(trainer, task, strategy, rounds, seed=exp[""]["seed"],
                                  transport=transport, out_dir=out, resume=resume,
                                  eval_every=exp[""]["eval_every"], identity=exp.identity(),
                                  callbacks=[on_round],
                                  federated_eval=federated_eval,
                                  central_eval=central_evaluation(exp, task.data))
                break
            except RoundFailedError as exc:
                # The round that failed is the one after the last completed round (the
                # callbacks have advanced the transport past every completed one).
                retries.failed(max(done, transport.completed_rounds) + 1, exc)
        if retries.annotate(result.history):
            write_json(out / "metrics.json", result.history)
        transport.finish()
        if done >= rounds:
            # Restarted on a finished run: the clients that had not heard DONE when the
            # server stopped are retrying; none has joined this instance yet, so wait the
            # whole ``linger`` for them instead of ending at once with nobody told.
            log.info("%s had already finished all %d rounds: serving DONE for %gs", exp.name,
                     rounds, settings.linger)
            _linger(transport, settings.linger, until_all_told=False)
        else:
            log.info("%s finished: %d rounds", exp.name, len(result.history))
            _linger(transport, settings.linger)
        return result
    finally:
        running.stop()


def _linger(transport: GrpcTransport, seconds: float, until_all_told: bool = True) -> None:
    """Keep answering DONE for ``seconds``; with ``until_all_told``, stop as soon as every
    connected client has heard it (at the end of a run, when the clients are all joined)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (until_all_told and transport.all_told_done()):
        time.sleep(0.1)


class RoundRetries:
    """The retry budget of ``serve``: up to ``limit`` retries of the SAME round, each from
    the last checkpoint; a later round starts with a fresh budget (docs/deployment.md,
    "Faults and limits"). Each retry is logged (round, attempt, reason); ``annotate`` lists
    them in the records of the rounds that completed after them (``retries``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reasons: dict[int, list[str]] = {}  # round -> why each failed attempt failed

    def failed(self, round_num: int, exc: RoundFailedError) -> None:
        """Round ``round_num`` failed with ``exc``: re-raise it once the round has used its
        budget, else log the retry."""
        reasons = self.reasons.setdefault(round_num, [])
        if len(reasons) >= self.limit:
            log.error("round %d failed %d times (round_retries = %d): giving up", round_num,
                      len(reasons) + 1, self.limit,
                      extra={"round": round_num, "attempt": len(reasons) + 1})
            raise exc
        reasons.append(str(exc))
        log.warning("round %d failed (%s); retry %d of %d for this round, from the last "
                    "checkpoint", round_num, exc, len(reasons), self.limit,
                    extra={"round": round_num, "attempt": len(reasons) + 1,
                           "code": "round_retry"})

    def annotate(self, history: list[dict[str, Any]]) -> bool:
        """Add ``retries`` (the reasons, in order) to the records of rounds that were
        retried; whether any record changed. A resume reloads the history from the
        checkpoint, which is written before the round is known to be final, so this runs on
        the finished run's history."""
        changed = False
        for record in history:
            reasons = self.reasons.get(record.get("round", -1))
            if reasons and record.get("retries") != reasons:
                record["retries"] = list(reasons)
                changed = True
        return changed


def _secagg_driver(exp: Experiment, fed: Any, settings: DeploySettings) -> Any:
    """The SecAgg+ driver; ``fed`` is the federation for built-in data sets (its largest
    client bounds the weight by default), None when the data is on the clients' machines."""
    rt = exp["runtime"]
    if not rt["secure_aggregation"]:
        return None
    if rt["secure_aggregation"] != "secagg+":
        raise ConfigError("runtime.secure_aggregation", rt["secure_aggregation"],
                          "'secagg+' for fedmosaic server: secret sharing over several "
                          "aggregators runs in simulation only so far (fedmosaic run)")
    from fedmosaic.net.secagg import SecAggRoundDriver

    uniform = exp["privacy"]["mode"] == "distributed" or exp["strategy"]["weighting"] == "uniform"
    if not uniform and fed is None and "secagg_max_weight" not in rt:
        raise ConfigError("runtime.secagg_max_weight", "<missing>", "required with secure "
                          "aggregation and sample weighting when the server does not have the "
                          f"clients' data (dataset '{exp['data']['dataset']}'): the largest "
                          "sample count a client may claim")
    default_w = 1.0 if uniform else float(max(fed.sizes().values())) if fed is not None else 1.0
    return SecAggRoundDriver(clip=rt.get("secagg_clip", 1.0),
                             max_weight=rt.get("secagg_max_weight", default_w),
                             uniform=uniform,
                             dropout_rate=rt.get("secagg_dropout_rate", 0.1),
                             **({"corrupted_fraction": rt["secagg_corrupted_fraction"]}
                                if "secagg_corrupted_fraction" in rt else {}))
