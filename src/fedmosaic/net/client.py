"""The client runtime: ``run_client`` (and ``fedmosaic client``).

A client connects with its own certificate, joins, sends heartbeats from a background thread
and long-polls for tasks. For a task it first checks the task against its own privacy policy
(``fedmosaic.net.policy``: secure aggregation required, minimum noise, maximum clip, minimum
SecAgg+ bits, its epsilon budget) and refuses a task that violates it with ``RefuseTask``
(reason sent to the server and logged on both sides) -- it never falls back to a plaintext
upload the policy does not allow. Otherwise it downloads the global model in chunks, trains
with the ``FitConfig`` the server sent, applies the task's client stages (local DP,
distributed-DP noise shares) with noise from ``SecureNoise`` -- a CSPRNG keyed from the
operating system, never from the server-sent seed, so the server cannot regenerate and
subtract it -- charges its local-DP releases to its persisted ledger, and uploads
``delta = local - global`` in chunks, or, in a SecAgg+ round, takes part in the secure sum.

Joining: before it connects, the client checks its own credentials
(``fedmosaic.net.preflight``: key fits certificate, issued by the CA in ca.pem, valid now, a
client credential, not revoked by crl.pem). It joins with the profile of its data
(``fedmosaic.compat.DataProfile``: feature shape, dtype, label range, its model's outputs),
which the server checks against the task before any training; once joined it also runs its
own model on a few of its own samples, so a model that cannot take its data fails now, with
the reason, instead of in every round.

Failures (``fedmosaic.net.client_errors``): transient errors (network, server restarting,
deadlines, overload) are retried with exponential backoff and full jitter (Brooker,
"Exponential Backoff And Jitter", AWS Architecture Blog, 2015) within ``retry_budget``
seconds from the last progress, a hard limit: no sleep and no call outlives it. A server
restart (a new server instance) makes the client join again, so it takes part from the next
round. A permanent error -- a TLS verdict, a refused or revoked credential, a join refused as
incompatible -- ends the client at once with the reason (``PermanentError``). A local training
error is reported to the server as the task's refusal (``training_failed``); the client then
stops (``TrainingFailedError``) unless the error may not recur (out of memory, an operating
system resource), and stops too after ``MAX_TRAINING_FAILURES`` such failures in a row.
Repeated log lines are rate-limited (``RepeatLimiter``).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from fedmosaic.algorithms.strategy import ClientTask
from fedmosaic.compat import DataProfile, ProfileError, TaskProfile, model_outputs
from fedmosaic.core.errors import FedmosaicError
from fedmosaic.data import ArrayDataset
from fedmosaic.net.channel import RECONNECT_OPTIONS as RECONNECT_OPTIONS
from fedmosaic.net.channel import SERVICE as SERVICE
from fedmosaic.net.channel import Stubs as _Stubs
from fedmosaic.net.channel import open_channel
from fedmosaic.net.client_errors import (
    Backoff,
    ClientError,
    ExitCode,
    PermanentError,
    RepeatLimiter,
    TrainingFailedError,
    UnreachableError,
    Verdict,
    classify,
    failure_reason,
    is_transient_failure,
)
from fedmosaic.net.policy import (
    Acceptance,
    PolicyViolation,
    PrivacyLedger,
    PrivacyPolicy,
    default_ledger_path,
)
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.wire import (
    MESSAGE_OVERHEAD,
    ChunkAssembler,
    WireError,
    fit_config_from_wire,
    iter_chunks,
    printable_reason,
    skellam_from_wire,
    spec_hash,
    stage_from_wire,
)
from fedmosaic.privacy.randomness import SecureNoise
from fedmosaic.train.base import Dataset, Trainer

log = logging.getLogger(__name__)

SOFTWARE = "fedmosaic-client/1"
# Local training failures that may not recur (out of memory...) tolerated in a row.
MAX_TRAINING_FAILURES = 3
# Samples of its own data a client runs its model on after joining (the self-check).
SELF_CHECK_SAMPLES = 8
# How long a client that failed its self-check waits for a task to refuse with the reason.
REPORT_WAIT_SECONDS = 1.0

# The names of earlier versions.
ClientRefusedError = PermanentError
ServerUnreachableError = UnreachableError
__all__ = ["Backoff", "ClientError", "ClientRefusedError", "ClientReport", "FederationClient",
           "PermanentError", "ServerUnreachableError", "TrainingFailedError", "load_npz",
           "open_channel", "run_client"]


@dataclass
class ClientReport:
    """What a client did: rounds trained, uploads accepted, joins (1 + reconnections),
    rounds whose task it refused under its privacy policy."""

    client_id: str = ""
    rounds: list[int] = field(default_factory=list)
    accepted: int = 0
    joins: int = 0
    refused: list[int] = field(default_factory=list)


def load_npz(path: str | Path) -> ArrayDataset:
    """A client's training data from an ``.npz`` with arrays ``x`` (n, features...) and ``y``
    (n,) integer labels; checked before any training (no pickles are loaded)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not {"x", "y"} <= set(npz.files):
                raise ValueError(f"needs arrays 'x' and 'y', found {sorted(npz.files)}")
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError) as exc:
        raise FedmosaicError(f"client data {path}: {exc}") from exc
    if x.dtype.kind not in "fiu" or not np.isfinite(x).all():
        raise FedmosaicError(f"client data {path}: x must be finite numbers")
    if y.dtype.kind not in "iu" or y.ndim != 1 or len(y) != len(x) or len(y) == 0:
        raise FedmosaicError(f"client data {path}: y must be a non-empty 1-D integer array with "
                             "one label per row of x")
    return ArrayDataset(np.ascontiguousarray(x, dtype=np.float32),
                        np.ascontiguousarray(y, dtype=np.int64))


class FederationClient:
    """One client process's connection and task loop; ``run`` returns when the run is done.

    ``policy`` (a ``PrivacyPolicy``; None accepts every task, as before policies existed) is
    checked against each task; ``ledger`` (a ``PrivacyLedger``) records local-DP releases and
    is required when the policy sets an epsilon budget.
    """

    def __init__(self, channel: grpc.Channel, trainer: Trainer, data: Dataset, *,
                 backoff: Backoff | None = None, poll_seconds: float = 10.0,
                 rpc_timeout: float = 60.0, policy: PrivacyPolicy | None = None,
                 ledger: PrivacyLedger | None = None,
                 test_data: Dataset | None = None) -> None:
        if policy is not None and policy.dp.epsilon_budget is not None and ledger is None:
            raise ValueError("a policy with an epsilon budget needs a PrivacyLedger")
        self.policy, self.ledger = policy, ledger
        self.experiment = ""
        self.stubs = _Stubs(channel)
        self.trainer, self.data = trainer, data
        self.test_data = test_data  # the local test split for federated evaluation, if any
        self.backoff = backoff or Backoff()
        self.poll_seconds, self.rpc_timeout = poll_seconds, rpc_timeout
        self.instance = ""
        self.heartbeat_interval = 5.0
        self.chunk_bytes = 1024 * 1024
        self.report = ClientReport()
        self._stop = threading.Event()
        # Set at each join (and at the end): the heartbeat thread restarts its wait with the
        # server's interval, so the first beat after a join comes within that interval.
        self._joined = threading.Event()
        self._spec_hash = spec_hash(trainer.spec)
        # Why the server closes our connections after TLS, when it does (set by run_client:
        # fedmosaic.net.preflight.check_server); None: not diagnosed.
        self.diagnose: Callable[[], Verdict | None] | None = None
        self._profile: DataProfile | None = None
        self._outputs = 0  # the model's outputs per sample (0: unknown)
        self._checked = False  # the self-check ran (after the first join)
        self._rejoins = 0  # joins asked for since the last progress
        self._training_failures = 0  # consecutive rounds whose local training failed
        self._limit = RepeatLimiter()
        # Tasks refused lately: one the server hands out again (the refusal did not reach
        # it) is waited on with backoff, not refused again at once in a tight loop.
        self._refused_tasks: deque[bytes] = deque(maxlen=16)

    # -- connection ---------------------------------------------------------------------------
    def data_profile(self) -> DataProfile:
        """What this client declares when it joins: its data's shape, dtype, label range and
        size, and its model's number of outputs (``fedmosaic.compat.DataProfile``)."""
        if self._profile is None:
            shape = tuple(int(d) for d in np.asarray(self.data.x).shape[1:])
            try:
                self._outputs = model_outputs(self.trainer, shape) or 0
            except Exception as exc:  # the model cannot take this data: the join says how
                log.debug("the model does not run on samples of shape %s: %s", shape,
                          failure_reason(exc))
                self._outputs = 0
            if self.test_data is not None and len(self.test_data) and \
                    tuple(np.asarray(self.test_data.x).shape[1:]) != shape:
                test_shape = tuple(np.asarray(self.test_data.x).shape[1:])
                raise PermanentError(f"your local test split has samples of shape "
                                     f"{test_shape}, your training data {shape}",
                                     reason="feature_shape")
            try:
                self._profile = DataProfile.of(self.data, self.test_data,
                                               num_outputs=self._outputs)
            except ProfileError as exc:
                raise PermanentError(f"your data cannot be used: {exc}",
                                     reason="no_data") from None
        return self._profile

    def _join(self) -> None:
        profile = self.data_profile()
        request = pb.JoinRequest(software=SOFTWARE, spec_hash=self._spec_hash,
                                 numel=self.trainer.spec.numel, profile=profile.to_wire())
        try:
            reply = self.stubs.join(request, timeout=self.backoff.timeout(self.rpc_timeout))
        except grpc.RpcError as exc:
            verdict = classify(exc, "Join")  # a refused join is final; the run loop retries
            if verdict.permanent:
                raise PermanentError(verdict.message, reason=verdict.reason) from None
            raise
        if reply.numel != self.trainer.spec.numel:
            raise PermanentError(f"the task's model has {reply.numel:,} parameters, yours "
                                 f"{self.trainer.spec.numel:,}: use the task's model",
                                 reason="model_layout")
        if not 0 < reply.heartbeat_interval < 3600 or not 0 < reply.chunk_bytes <= 2**30:
            raise PermanentError("the server sent implausible settings (heartbeat interval "
                                 "or chunk size)", reason="bad_server")
        self.instance, self.experiment = reply.server_instance, reply.experiment
        self.heartbeat_interval, self.chunk_bytes = reply.heartbeat_interval, reply.chunk_bytes
        self._joined.set()
        self.report.client_id = reply.client_id
        self.report.joins += 1
        log.info("joined %s as %s (server instance %s)", reply.experiment, reply.client_id,
                 reply.server_instance)
        if not self._checked:
            self._checked = True
            # The server checked our declaration; a server that did not (or a task profile
            # it learned late) is checked here too, then the model on our own samples.
            problem = TaskProfile.from_wire(reply.task).check(profile) \
                if reply.HasField("task") else None
            message = problem.message if problem is not None else self._self_check(profile)
            if message is not None:
                self._report_incompatible(message)
                raise PermanentError(message, reason=problem.code if problem else
                                     "incompatible_data")

    def _self_check(self, profile: DataProfile) -> str | None:
        """Run this client's model (initial weights) on a few of its own samples; what is
        wrong in words, or None."""
        if self._outputs >= 2 and profile.label_max >= self._outputs:
            return (f"your data has label {profile.label_max}, but your model has "
                    f"{self._outputs} outputs (labels 0 to {self._outputs - 1})")
        k = min(len(self.data), SELF_CHECK_SAMPLES)
        try:
            subset = getattr(self.data, "subset", None)
            sample = subset(np.arange(k)) if callable(subset) else ArrayDataset.create(
                np.asarray(self.data.x)[:k], np.asarray(self.data.y)[:k])
            # Zero weights, not initial_weights: that reseeds torch's global RNG, which other
            # clients' training threads in the same process may be using.
            self.trainer.evaluate(torch.zeros(self.trainer.spec.numel), sample)
        except Exception as exc:
            return f"your model fails on your own data: {failure_reason(exc)}"
        return None

    def _report_incompatible(self, message: str) -> None:
        """Tell the server why this client leaves, by refusing its task if one comes within
        ``REPORT_WAIT_SECONDS`` (a round starting now that it joined); otherwise the server
        only sees it go silent (there is no call to report outside a task)."""
        try:
            task = self.stubs.get_task(
                pb.TaskRequest(server_instance=self.instance, wait_seconds=REPORT_WAIT_SECONDS),
                timeout=self.backoff.timeout(REPORT_WAIT_SECONDS + 2.0))
        except grpc.RpcError:
            return
        if task.kind in (pb.Task.FIT, pb.Task.EVALUATE):
            self._refuse(task, "incompatible_data", message)

    def _heartbeats(self) -> None:
        while True:
            woken = self._joined.wait(self.heartbeat_interval)
            if self._stop.is_set():
                return
            if woken:  # (re)joined: wait the server's interval from now
                self._joined.clear()
                continue
            instance = self.instance
            if not instance:
                continue
            try:
                self.stubs.heartbeat(pb.HeartbeatRequest(server_instance=instance),
                                     timeout=max(self.heartbeat_interval, 1.0))
            except grpc.RpcError as exc:
                log.debug("heartbeat failed: %s", exc.code())
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    # Not joined to this server (it restarted): beating again before the
                    # task loop rejoins would only be refused, and counted, each interval.
                    self._joined.wait()
                    if self._stop.is_set():
                        return
                    self._joined.clear()

    def run(self) -> ClientReport:
        beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beat.start()
        try:
            while True:
                try:
                    if not self.instance:
                        self._join()
                    # The long poll returns (WAIT) well before the budget is spent.
                    wait = min(self.poll_seconds, self.backoff.remaining() / 2)
                    task = self.stubs.get_task(
                        pb.TaskRequest(server_instance=self.instance,
                                       wait_seconds=max(wait, 0.0)),
                        timeout=self.backoff.timeout(max(wait, 0.0) + self.rpc_timeout))
                    self._progress()
                    if task.kind == pb.Task.DONE:
                        log.info("the run is finished after round %d", task.round)
                        return self.report
                    if task.task_id and bytes(task.task_id) in self._refused_tasks:
                        self._limit.log(log, logging.INFO, "refused_again", "round %d: the "
                                        "server sent the task this client refused again; "
                                        "waiting", task.round)
                        self.backoff.wait("the server keeps sending a refused task")
                        continue
                    if task.kind == pb.Task.EVALUATE:
                        self._run_evaluation(task)
                    if task.kind == pb.Task.FIT:
                        self._run_task(task)
                except grpc.RpcError as exc:
                    self._on_error(exc)
        finally:
            self._stop.set()
            self._joined.set()  # wake the heartbeat thread now
            # Joined before the channel closes: a thread still inside a gRPC call while the
            # interpreter exits can abort the process ("terminate called without an active
            # exception"). Its call ends within its own timeout.
            beat.join(timeout=max(self.heartbeat_interval, 1.0) + 5.0)

    def _progress(self) -> None:
        """The server answered: the retry budget starts again."""
        self.backoff.progress()
        self._rejoins = 0

    def _on_error(self, exc: grpc.RpcError) -> None:
        """Retry (with backoff, within the budget), join again, or give up for good."""
        verdict = classify(exc)
        if verdict.permanent:
            raise PermanentError(verdict.message, reason=verdict.reason) from None
        if verdict.action == "rejoin":
            self.instance = ""
            self._limit.log(log, logging.INFO, "rejoin",
                            "the server restarted or forgot this client: joining again")
            if self._rejoins:  # it forgets us again at once: never a tight loop
                self.backoff.wait(verdict.message)
            self._rejoins += 1
            return
        if verdict.probe and self.diagnose is not None:
            # gRPC saw the connection closed after TLS: a server refusing our certificate,
            # or one going down; handshakes of our own tell them apart.
            found = self.diagnose()
            if found is not None:
                raise PermanentError(found.message, reason=found.reason)
        if verdict.action == "retry":
            self._limit.log(log, logging.WARNING, f"retry:{verdict.reason}",
                            "server unreachable (%s); retrying for up to %.0f s more",
                            verdict.message, max(self.backoff.remaining(), 0.0))
        else:  # one call refused (late upload, unknown task): go on with the next task
            self._limit.log(log, logging.WARNING, f"skip:{verdict.reason}",
                            "the server refused the last call: %s", verdict.message)
        self.backoff.wait(verdict.message)

    # -- one task ---------------------------------------------------------------------------
    def _download(self, task: pb.Task) -> torch.Tensor:
        numel = self.trainer.spec.numel
        assembler = ChunkAssembler(torch.empty(numel), numel, self.chunk_bytes)
        timeout = self.backoff.timeout(max(task.deadline_seconds, 1.0) + self.rpc_timeout)
        for chunk in self.stubs.download(pb.ModelRequest(task_id=task.task_id), timeout=timeout):
            assembler.add(chunk)
        return assembler.finish()

    def _refuse(self, task: pb.Task, code: str, reason: str) -> None:
        """Tell the server this task is refused (it fails the task at once and logs why)."""
        reason = printable_reason(reason)
        log.warning("round %d: refusing the task (%s): %s", task.round, code, reason)
        self.report.refused.append(task.round)
        self._refused_tasks.append(bytes(task.task_id))
        try:
            reply = self.stubs.refuse_task(
                pb.TaskRefusal(task_id=task.task_id, round=task.round, code=code,
                               reason=reason), timeout=self.backoff.timeout(self.rpc_timeout))
            log.info("round %d: server: %s", task.round, reply.detail)
        except grpc.RpcError as exc:  # the server then drops the task at its deadline
            log.warning("round %d: the refusal did not reach the server (%s: %s)", task.round,
                        exc.code().name, exc.details())

    def _accept(self, task: pb.Task, stages: tuple[Any, ...],
                skellam: Any = None) -> Acceptance | None:
        """The policy's verdict on a task; None (after refusing it) if it violates it."""
        if self.policy is None:
            return Acceptance()
        bits = int(task.secagg.bits) if task.HasField("secagg") else None
        try:
            return self.policy.check(stages, bits, self.ledger, skellam=skellam)
        except PolicyViolation as exc:
            self._refuse(task, exc.code, exc.reason)
            return None

    def _run_task(self, task: pb.Task) -> None:
        try:
            config = fit_config_from_wire(task.config)
            stages = tuple(stage_from_wire(s) for s in task.stages)
            if config.round != task.round or task.numel != self.trainer.spec.numel:
                raise WireError("task round or model size does not match its settings")
            # The distributed Skellam mechanism's public parameters, checked as untrusted.
            skellam = skellam_from_wire(task.secagg, task.numel) \
                if task.HasField("secagg") else None
        except WireError as exc:
            self._refuse(task, "malformed_task", f"malformed task: {exc}")
            return
        # Before the download: nothing is wasted.
        accepted = self._accept(task, stages, skellam)
        if accepted is None:
            return
        weights = self._download(task)
        log.info("round %d: training", task.round)
        try:
            result = self.trainer.fit(weights, self.data, config)
            # Stage noise from the operating system's CSPRNG, never from config.seed: the
            # server computed that seed and could regenerate seeded noise and subtract it.
            delta = ClientTask(self.report.client_id, config, stages).finish(
                result.weights - weights, noise=SecureNoise())
        except Exception as exc:
            self._training_failed(task, exc)
            return
        self._training_failures = 0
        self.backoff.progress()  # training is local work: the budget is for the server
        if accepted.releases and self.ledger is not None:
            # Charged and persisted before the update leaves: a crash can only over-count.
            budget = self.policy.dp.epsilon_budget if self.policy is not None else None
            try:
                spent = self.ledger.charge(accepted.releases, budget=budget,
                                           round_num=task.round, experiment=self.experiment)
            except PolicyViolation as exc:
                self._refuse(task, exc.code, exc.reason)
                return
            log.info("round %d: local-DP epsilon spent by this client: %.4g (delta %g)",
                     task.round, spent, self.ledger.delta)
        metrics = {**result.metrics, "steps": float(result.steps)}
        if task.HasField("secagg"):
            from fedmosaic.net.secagg import run_client_secagg

            ok = run_client_secagg(self.stubs, task, delta, result.num_samples,
                                   timeout=self.backoff.timeout(
                                       max(task.deadline_seconds, 1.0) + self.rpc_timeout),
                                   credentials=getattr(self, "secagg_credentials", None),
                                   skellam=skellam)
        else:
            # Never silent: a client that accepts plaintext uploads says so every round.
            log.info("round %d: uploading in plaintext (the task has no secure aggregation%s)",
                     task.round, "" if self.policy is not None else "; no privacy policy")
            ok = self._upload(task, delta, result.num_samples, metrics)
        if ok:
            self.report.rounds.append(task.round)
            self.report.accepted += 1

    def _training_failed(self, task: pb.Task, exc: Exception) -> None:
        """Report a local training error as the task's refusal; stop unless it may not recur
        (and stop after ``MAX_TRAINING_FAILURES`` of those in a row)."""
        reason = failure_reason(exc)
        log.debug("round %d: local training failed", task.round, exc_info=True)
        self._refuse(task, "training_failed", reason)
        if not is_transient_failure(exc):
            raise TrainingFailedError(f"local training failed in round {task.round}: {reason} "
                                      "(it would fail the same way every round)",
                                      reason="training_failed") from None
        self._training_failures += 1
        if self._training_failures >= MAX_TRAINING_FAILURES:
            raise TrainingFailedError(f"local training failed {self._training_failures} rounds "
                                      f"in a row; last: {reason}",
                                      reason="training_failed") from None
        log.warning("round %d: local training failed (%s); this may not recur, so this client "
                    "goes on with the next round (%d of %d failures in a row)", task.round,
                    reason, self._training_failures, MAX_TRAINING_FAILURES)

    def _run_evaluation(self, task: pb.Task) -> None:
        """Federated evaluation: the model on the local test split, reported as its sample
        count and the trainer's metrics (``ReportEvaluation``); refused with
        ``no_test_data`` without a test split, ``evaluation_failed`` if evaluating raises."""
        if self.test_data is None or len(self.test_data) == 0:
            self._refuse(task, "no_test_data", "this client has no local test split to "
                         "evaluate the model on")
            return
        if task.numel != self.trainer.spec.numel:
            self._refuse(task, "malformed_task", f"evaluation task for {task.numel} values, "
                         f"this model has {self.trainer.spec.numel}")
            return
        weights = self._download(task)
        try:
            metrics = dict(self.trainer.evaluate(weights, self.test_data))
            metrics.pop("num_samples", None)  # the split's size is reported on its own
            metrics = {str(k): float(v) for k, v in metrics.items()}
            bad = [k for k, v in metrics.items() if not np.isfinite(v)]
            if bad:
                raise ValueError(f"metric {bad[0]!r} is {metrics[bad[0]]}, not finite")
        except Exception as exc:  # reported, not a traceback: the reason names the error
            log.debug("round %d: local evaluation failed", task.round, exc_info=True)
            self._refuse(task, "evaluation_failed", failure_reason(exc))
            return
        reply = self.stubs.report_evaluation(
            pb.EvaluationReport(task_id=task.task_id, round=task.round,
                                num_samples=len(self.test_data), metrics=metrics),
            timeout=self.backoff.timeout(self.rpc_timeout))
        log.info("round %d: %s", task.round, reply.detail)

    def _upload(self, task: pb.Task, delta: torch.Tensor, num_samples: int,
                metrics: dict[str, float]) -> bool:
        header = pb.UploadHeader(task_id=task.task_id, round=task.round, num_samples=num_samples,
                                 metrics=metrics, numel=delta.numel())

        def messages() -> Iterator[pb.UploadMessage]:
            yield pb.UploadMessage(header=header)
            for chunk in iter_chunks(delta, self.chunk_bytes):
                yield pb.UploadMessage(chunk=chunk)

        reply = self.stubs.upload(messages(), timeout=self.backoff.timeout(
            max(task.deadline_seconds, 1.0) + self.rpc_timeout))
        log.info("round %d: %s", task.round, reply.detail)
        return reply.accepted


def run_client(
    server: str,
    *,
    ca: str | Path,
    cert: str | Path,
    key: str | Path,
    trainer: Trainer,
    data: Dataset,
    server_name: str | None = None,
    retry_budget: float = 300.0,
    poll_seconds: float = 10.0,
    chunk_bytes_limit: int = 64 * 1024 * 1024,
    policy: PrivacyPolicy | str | Path | None = None,
    test_data: Dataset | None = None,
) -> ClientReport:
    """Take part in a federation until the server says the run is done.

    ``server`` is HOST:PORT; ``ca``/``cert``/``key`` are this client's federation credentials
    (``fedmosaic certs``); ``trainer`` and ``data`` are its model and local training data.
    ``server_name`` overrides the name checked against the server certificate. ``policy``
    (a ``PrivacyPolicy`` or the path of its TOML file) is this client's privacy policy; its
    ledger of local-DP releases lives at the policy's ``ledger`` path, by default next to
    ``key`` (``default_ledger_path``). Without a policy every task is accepted.
    ``test_data`` is its local test split for federated evaluation (without one it refuses
    EVALUATE tasks with ``no_test_data``). ``retry_budget`` is the most seconds it goes
    without progress with the server before it gives up (``UnreachableError``).

    The credentials are checked first (``fedmosaic.net.preflight.check_credentials``). Raises
    a ``ClientError`` (its ``exit_code`` is what ``fedmosaic client`` exits with) when the
    client gives up: ``PermanentError`` (refused, incompatible), ``UnreachableError``,
    ``TrainingFailedError``.
    """
    from fedmosaic.net.preflight import check_credentials, check_server, expected_server_name

    host, _, port = server.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClientError(f"server address {server!r} must be HOST:PORT with a port in "
                          "1-65535", reason="usage", exit_code=ExitCode.USAGE)
    if not retry_budget > 0:
        raise ClientError(f"the retry budget must be > 0 seconds, got {retry_budget!r}",
                          reason="usage", exit_code=ExitCode.USAGE)
    ca, cert, key = Path(ca), Path(cert), Path(key)
    credential = check_credentials(ca, cert, key)
    expected_name = expected_server_name(credential, server, server_name)
    if policy is not None and not isinstance(policy, PrivacyPolicy):
        policy = PrivacyPolicy.load(policy)
    ledger = None
    if policy is not None:
        ledger = PrivacyLedger(policy.ledger or default_ledger_path(key), delta=policy.dp.delta)
        log.info("privacy policy %s: %s; local-DP epsilon spent so far %.4g (delta %g, "
                 "ledger %s)", policy.source, policy.describe(), ledger.epsilon(),
                 ledger.delta, ledger.path)
    try:
        channel = open_channel(server, ca, cert, key, server_name=server_name,
                               max_message_bytes=chunk_bytes_limit + MESSAGE_OVERHEAD)
        try:
            client = FederationClient(channel, trainer, data, poll_seconds=poll_seconds,
                                      backoff=Backoff(budget=retry_budget), policy=policy,
                                      ledger=ledger, test_data=test_data)

            client.diagnose = lambda: check_server(server, ca, cert, key,
                                                   server_name=expected_name)
            from fedmosaic.net.secagg import SecAggCredentials  # signs SecAgg+ keys (mTLS key)

            # The policy's [secagg] bounds, if any, are what the SecAgg+ client checks each
            # round's setup against (SecAggBounds' defaults otherwise).
            bounds = policy.secagg.bounds() if policy is not None else None
            client.secagg_credentials = SecAggCredentials.from_files(ca, cert, key,
                                                                     bounds=bounds)
            return client.run()
        finally:
            channel.close()
    finally:
        if ledger is not None:
            ledger.close()


def load_trainer(spec: str) -> Trainer:
    """A trainer from ``module:attr``: a Trainer instance or a zero-argument factory."""
    from fedmosaic.task import load_trainer as load  # the one implementation (fedmosaic.task)

    return load(spec)

