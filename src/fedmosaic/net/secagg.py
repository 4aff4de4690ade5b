"""SecAgg+ over gRPC: the protocol of ``fedmosaic.privacy.secagg`` between real processes.

The messages are those of ``privacy/secagg/messages.py``, byte for byte, carried in the
``SecAgg`` RPC's envelope (Bonawitz et al., CCS 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"; Bell et al., CCS 2020, "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead"). Each call carries the client's message for the current
stage (an empty payload first: "trained, ready") and returns, once the server has closed that
stage, the server's next message for this client -- so a stage closes when every participant
has answered or has been given up (heartbeats stopped, or the round deadline passed), and
dropouts at any stage are handled by the protocol itself.

What each client submits is what ``SecAggPlusTransport`` submits in simulation: its delta
scaled by ``w_i / W`` and clipped to ``[-clip, clip]``, then ``clip * w_i / W`` and ``clip``,
quantized for a sum of ``n`` clients; the server decodes the sum into one
``PartialAggregate`` (weighted sum, total weight, count) and never sees an individual update.
A participant's SecAgg+ index is assigned by the server and bound to its verified identity: a
message claiming another sender is refused.

Distributed DP on integers: with a strategy that supplies an integer encoder
(``DistributedSkellam.secagg_encoder``, the same provider ``SecAggPlusTransport`` uses in
simulation) the driver asks it for the round's ``SkellamMechanism`` before the tasks go out and
sends its *public* parameters in ``SecAggSettings.skellam`` (clip, gamma, mu, m, the most
clients a sum may hold, beta, the rotation and its public seed). Each client rebuilds the
mechanism from them, checks them (``wire.skellam_from_wire``, its privacy policy) and encodes
its own delta -- clip, scale, randomized Hadamard rotation, conditional rounding and its
``Sk(mu / m)`` share -- with noise from its own ``SecureNoise``, never from anything the
server sent (Agarwal, Kairouz and Liu 2021). The server decodes the unmasked ring sum with the
same mechanism; the strategy accounts the round as in simulation.

Against a malicious server (``docs/security.md``): each client signs its advertised keys and
the survivor set with its mTLS certificate key (:class:`SecAggCredentials`), verifies every
other member's certificate against the federation CA and checks that its common name is the
client id the server claims for that index, and refuses a setup weaker than its own
:class:`~fedmosaic.privacy.secagg.graph.SecAggBounds`; the refusal's reason goes to the
server (a withdrawal) and into both logs.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from fedmosaic.core.errors import ConfigError
from fedmosaic.net.auth import Peer
from fedmosaic.net.certs import FederationPaths
from fedmosaic.net.errors import Refused
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.net.transport import GrpcTransport, PendingTask
from fedmosaic.net.wire import MESSAGE_OVERHEAD, WireError, skellam_from_wire, skellam_to_wire
from fedmosaic.privacy.randomness import SecureNoise
from fedmosaic.privacy.secagg.crypto import ring_dtype
from fedmosaic.privacy.secagg.errors import SecAggAbortError, SecAggProtocolError
from fedmosaic.privacy.secagg.graph import SecAggBounds
from fedmosaic.privacy.secagg.identity import CertificateVerifier, PeerVerifier, SigningIdentity
from fedmosaic.privacy.secagg.messages import (
    AdvertiseKeys,
    ConsistencySignature,
    MaskedInput,
    SetupMessage,
    ShareKeys,
    SharesBroadcast,
    UnmaskResponse,
    decode_message,
)
from fedmosaic.privacy.secagg.protocol import SecAggPlusClient, SecAggPlusServer
from fedmosaic.privacy.secagg.quantize import Quantizer, decode_weighted, weighted_row
from fedmosaic.privacy.secagg.simulate import DEFAULT_CORRUPTED_FRACTION, make_config
from fedmosaic.privacy.secagg.transport import SecAggPlusTransport
from fedmosaic.privacy.skellam import SkellamMechanism, padded_dim
from fedmosaic.runtime.tally import ClientFailure, PartialAggregate, Weighting
from fedmosaic.runtime.transport import TransportResult

log = logging.getLogger(__name__)

# The client message each stage collects; "ready" is the empty envelope after training.
STAGE_MESSAGES: dict[str, type] = {"advertise": AdvertiseKeys, "share_keys": ShareKeys,
                                   "masked_input": MaskedInput,
                                   "consistency": ConsistencySignature,
                                   "unmask": UnmaskResponse}
# From these stages on a participant's masked input may be in the sum: failures are held.
LATE_STAGES = ("consistency", "unmask")
STAGE_ORDER = list(STAGE_MESSAGES)
AGGREGATED = "aggregated"


@dataclass
class _Round:
    round: int
    stage: str = "ready"
    server: SecAggPlusServer | None = None
    members: dict[int, PendingTask] = field(default_factory=dict)  # SecAgg+ index -> task
    participants: dict[int, str] = field(default_factory=dict)  # index -> client, for good


class SecAggRoundDriver:
    """The server side: runs one SecAgg+ round per federated round inside
    ``GrpcTransport.fit`` and answers the ``SecAgg`` RPC. Parameters as in
    ``SecAggPlusTransport`` (``uniform``: every client's weight is 1); ``corrupted_fraction``
    is the fraction of participants assumed to collude with a malicious server when ``k`` and
    ``t`` are chosen -- clients refuse a setup designed for less than their own tolerance."""

    def __init__(self, *, clip: float, max_weight: float, uniform: bool,
                 dropout_rate: float = 0.1, bits: int = 32,
                 corrupted_fraction: float = DEFAULT_CORRUPTED_FRACTION) -> None:
        if not clip > 0 or not max_weight > 0:
            raise ConfigError("runtime.secagg_clip", clip, "clip and max_weight > 0")
        if not 0 <= corrupted_fraction < 1:
            raise ConfigError("runtime.secagg_corrupted_fraction", corrupted_fraction,
                              "a number in [0, 1)")
        self.clip, self.max_weight, self.uniform = float(clip), float(max_weight), uniform
        self.dropout_rate, self.bits = dropout_rate, bits
        self.corrupted_fraction = corrupted_fraction
        self.verifier: PeerVerifier | None = None  # the federation CA, loaded on first use
        self.current: _Round | None = None
        self.last_round: dict[str, Any] = {}
        # The strategy's integer-encoder provider (DistributedSkellam.secagg_encoder), if any,
        # and the mechanism of the round being configured.
        self._encoder_provider: Any = None
        self._encoder_bits = 64
        self.mechanism: SkellamMechanism | None = None

    # -- what the server loop and the transport ask ---------------------------------------
    def check_strategy(self, strategy: Any) -> None:
        """Refuse an aggregator that needs individual updates; adopt the strategy's integer
        encoder (``secagg_encoder``) if it has one: its clients then encode their updates
        with it on their own devices, so nothing is ever uploaded in plaintext."""
        provider = getattr(strategy, "secagg_encoder", None)
        if provider is not None:
            if not self.uniform:
                raise ConfigError(
                    "strategy.weighting", "weighted",
                    f"uniform weighting: {type(strategy).__name__}'s integer encoder sums "
                    "unweighted clipped updates")
            self._encoder_provider = provider
            self._encoder_bits = int(getattr(strategy, "bits", 64))
            attach = getattr(strategy, "attach_secure_aggregation", None)
            if attach is not None:
                attach(self)
        SecAggPlusTransport._check_aggregator(strategy)

    def prepare_round(self, round_num: int, numel: int) -> None:
        """Before the round's tasks go out: the strategy's mechanism for this round (it may
        refuse the round, e.g. ``PrivacyBudgetExhausted``). The clients draw the noise
        themselves (``SecureNoise``), so the strategy is told the noise is secure."""
        self.mechanism = None
        if self._encoder_provider is not None:
            self.mechanism = self._encoder_provider(round_num, dim=numel, noise_secure=True)

    def wire_settings(self) -> pb.SecAggSettings:
        mech = self.mechanism
        if mech is not None:
            return pb.SecAggSettings(clip=mech.clip, max_weight=self.max_weight,
                                     uniform_weighting=True, bits=mech.bits,
                                     skellam=skellam_to_wire(mech))
        return pb.SecAggSettings(clip=self.clip, max_weight=self.max_weight,
                                 uniform_weighting=self.uniform, bits=self.bits)

    def max_message_bytes(self, numel: int) -> int:
        """The masked input is one message: ``numel + 2`` ring elements, or with an integer
        encoder its ``d'`` (``numel`` padded to a power of two) elements of its ring."""
        if self._encoder_provider is not None:
            item = ring_dtype(self._encoder_bits).itemsize
            return padded_dim(numel) * item + MESSAGE_OVERHEAD
        return (numel + 2) * (self.bits // 8) + MESSAGE_OVERHEAD

    def guarantees(self) -> dict[str, Any]:
        return {
            "secure_aggregation": {
                "protocol": "SecAgg+ (Bell et al. 2020) over gRPC with mutual TLS",
                "ring_bits": self.last_round.get("bits", self.bits), "clip": self.clip,
                "max_weight": self.max_weight,
                "designed_dropout_rate": self.dropout_rate,
                "tolerated_corrupted_fraction": self.corrupted_fraction,
                "neighbourhood_degree": self.last_round.get("degree"),
                "threshold": self.last_round.get("threshold"), "masks": "OS CSPRNG",
                "malicious_server": "keys and survivor set signed with the clients' mTLS "
                                    "certificate keys, consistency check; each client "
                                    "enforces its own minimum threshold (docs/security.md)",
                **({"encoding": self.last_round.get("encoder")
                    or "distributed Skellam (Agarwal, Kairouz and Liu 2021), encoded by "
                       "each client",
                    "client_noise": "Skellam shares drawn by each client from its own "
                                    "SecureNoise (ChaCha20 keyed from os.urandom); only the "
                                    "rotation seed is public (sent by the server)"}
                   if self._encoder_provider is not None else {}),
            },
            "server_sees": "only the sum of the surviving clients' updates (plus their count "
                           "and total weight)",
        }

    # -- the round (server loop thread) ---------------------------------------------------
    def run(self, transport: GrpcTransport, outstanding: dict[bytes, PendingTask],
            weighting: Weighting | None) -> Iterator[TransportResult]:
        if weighting is None:
            raise ConfigError("aggregator", None, "a weighted-sum aggregator under SecAgg+")
        tasks = list(outstanding.values())
        held: list[tuple[str, TransportResult]] = []
        mech = self.mechanism  # this round's integer encoder, if the strategy supplies one
        if self._encoder_provider is not None and mech is None and tasks:
            raise ConfigError("transport", "a round without its Skellam mechanism",
                              "SecAggRoundDriver.prepare_round before the tasks go out")
        with transport.cond:
            self.current = rnd = _Round(round=transport.round)
        try:
            yield from self._wait(transport, tasks, lambda t: t.state == "secagg", held)
            with transport.cond:
                ready = sorted((t for t in tasks if t.state == "secagg"),
                               key=lambda t: t.client_id)
                if len(ready) < 2:
                    for t in ready:
                        transport.close_task(t, ClientFailure(
                            t.client_id, "SecAgg+ needs at least 2 clients; round skipped"))
                    ready = []
                elif mech is not None and len(ready) > mech.max_clients:
                    reason = (f"{len(ready)} clients ready but the Skellam mechanism's "
                              f"modular-clipping bound holds for at most {mech.max_clients}; "
                              "round refused before masking")
                    log.warning("round %d: %s", rnd.round, reason)
                    for t in ready:
                        transport.close_task(t, ClientFailure(t.client_id, reason))
                    ready = []
                else:
                    dim = mech.encoded_dim if mech is not None else transport.numel + 2
                    bits = mech.bits if mech is not None else self.bits
                    try:
                        config = make_config(len(ready), dim, bits=bits,
                                             dropout_rate=self.dropout_rate,
                                             corrupted_fraction=self.corrupted_fraction)
                    except SecAggAbortError as exc:  # infeasible: a failed round, not a crash
                        log.warning("round %d: secure aggregation impossible: %s",
                                    rnd.round, exc)
                        for t in ready:
                            transport.close_task(t, ClientFailure(
                                t.client_id, f"secure aggregation impossible: {exc}"))
                        ready = []
                if ready:
                    # An honest server checks every advertisement itself, so one member
                    # with a bad certificate or signature is dropped at once instead of
                    # making every other member refuse the roster.
                    rnd.server = SecAggPlusServer(config, [t.client_id for t in ready],
                                                  verifier=self._verifier(transport))
                    setup = rnd.server.setup_message().to_bytes()
                    for u, t in enumerate(ready):
                        t.extra["index"] = u
                        rnd.members[u] = t
                        rnd.participants[u] = t.client_id
                        t.extra["replies"] = {"ready": pb.SecAggEnvelope(payload=setup,
                                                                         participant=u)}
                    rnd.stage = "advertise"
                    transport.cond.notify_all()
            yield from self._drain(transport, held)
            if not ready:
                return
            assert rnd.server is not None
            server = rnd.server
            steps: list[tuple[str, Callable[[], Any]]] = [
                ("advertise", server.broadcast_keys), ("share_keys", server.route_shares),
                ("masked_input", server.request_consistency),
                ("consistency", server.request_unmask), ("unmask", server.finalize)]
            result = None
            for stage, close in steps:
                members = list(rnd.members.values())
                yield from self._wait(transport, members,
                                      lambda t, s=stage: t.extra.get("submitted") == s, held)
                with transport.cond:
                    try:
                        out = close()
                    except SecAggAbortError as exc:
                        log.warning("round %d: secure aggregation aborted: %s", rnd.round, exc)
                        for t in rnd.members.values():
                            transport.close_task(t, ClientFailure(
                                t.client_id, f"secure aggregation aborted: {exc}"))
                        break
                    if stage == "unmask":
                        result = out
                        for t in rnd.members.values():
                            t.extra["replies"][stage] = pb.SecAggEnvelope(finished=True,
                                                                          detail=AGGREGATED)
                    else:
                        self._publish(transport, rnd, stage, out)
                        rnd.stage = STAGE_ORDER[STAGE_ORDER.index(stage) + 1]
                    transport.cond.notify_all()
                yield from self._drain(transport, held)
            if result is None:  # aborted: every participant's failure is queued
                yield from self._drain(transport, held)
                yield from (r for _, r in held)
                return
            survivors = {rnd.participants[u] for u in result.survivors}
            for u in result.corrupt_share_senders:
                log.warning("round %d: client %s sent corrupt unmask shares; they were skipped",
                            rnd.round, rnd.participants[u])
            # A client that dropped (or failed) after uploading its masked input is still in
            # the sum: it is not reported as failed.
            yield from (r for cid, r in held if cid not in survivors)
            held.clear()
            # Clients quantized for a sum of all participants, dropped ones included.
            yield self._partial(result, server.config.num_clients, rnd, survivors, mech)
        finally:
            with transport.cond:
                self.current = None
                transport.cond.notify_all()

    def _verifier(self, transport: GrpcTransport) -> PeerVerifier:
        if self.verifier is None:
            self.verifier = CertificateVerifier.from_file(
                FederationPaths(transport.settings.credentials).ca_cert)
        return self.verifier

    def _publish(self, transport: GrpcTransport, rnd: _Round, stage: str,
                 out: dict[int, Any]) -> None:
        """Each remaining member's next server message; the others are out of the round."""
        for u, t in list(rnd.members.items()):
            if u in out:
                t.extra["replies"][stage] = pb.SecAggEnvelope(payload=out[u].to_bytes(),
                                                              participant=u)
            else:
                t.extra["replies"][stage] = pb.SecAggEnvelope(
                    finished=True, detail="left out of the secure aggregation")
                del rnd.members[u]
                transport.close_task(t, ClientFailure(
                    t.client_id, f"dropped out of secure aggregation at stage {stage}"))

    def _partial(self, result: Any, n: int, rnd: _Round, survivors: set[str],
                 mech: SkellamMechanism | None = None) -> PartialAggregate:
        if mech is not None:
            return self._partial_integer(result, n, rnd, survivors, mech)
        quantizer = Quantizer(clip=self.clip, bits=self.bits, num_clients=n)
        weighted, total_weight, count = decode_weighted(quantizer.decode(result.total),
                                                        self.clip, self.max_weight)
        assert rnd.server is not None
        self.last_round = {"round": rnd.round, "clients": n, "survivors": len(survivors),
                           "degree": rnd.server.config.degree,
                           "threshold": rnd.server.config.threshold}
        log.info("round %d: secure sum of %d of %d clients", rnd.round, count, n)
        if count == 0:
            return PartialAggregate(weighted_sum=None)
        return PartialAggregate(weighted_sum=weighted, total_weight=total_weight, count=count,
                                client_ids=sorted(survivors))

    def _partial_integer(self, result: Any, n: int, rnd: _Round, survivors: set[str],
                         mech: SkellamMechanism) -> PartialAggregate:
        """The unmasked ring sum decoded by the round's mechanism (signed, unscaled, rotated
        back), as ``SecAggPlusTransport`` does in simulation: one unweighted sum."""
        assert rnd.server is not None
        self.last_round = {"round": rnd.round, "clients": n, "survivors": len(survivors),
                           "degree": rnd.server.config.degree,
                           "threshold": rnd.server.config.threshold,
                           "encoder": mech.describe(), "bits": mech.bits}
        log.info("round %d: Skellam-encoded secure sum of %d of %d clients", rnd.round,
                 len(survivors), n)
        if not survivors:
            return PartialAggregate(weighted_sum=None)
        total = mech.decode(np.asarray(result.total), rnd.round)
        return PartialAggregate(
            weighted_sum=torch.from_numpy(total).to(torch.float32),
            total_weight=float(len(survivors)), count=len(survivors),
            client_ids=sorted(survivors))

    def _wait(self, transport: GrpcTransport, tasks: list[PendingTask],
              done: Callable[[PendingTask], bool],
              held: list[tuple[str, TransportResult]]) -> Iterator[TransportResult]:
        """Until every task is done or closed; failures meanwhile are passed on (or held
        while inputs may still be in the sum)."""
        while True:
            with transport.cond:
                if all(t.state in ("closed", "delivered") or done(t) for t in tasks):
                    return
                transport.cond.wait(0.2)
            transport.expire(tasks)
            yield from self._drain(transport, held)

    def _drain(self, transport: GrpcTransport,
               held: list[tuple[str, TransportResult]]) -> Iterator[TransportResult]:
        stage = self.current.stage if self.current is not None else "ready"
        while True:
            try:
                delivery = transport.results.get_nowait()
            except queue.Empty:
                return
            if stage in LATE_STAGES:  # its input may be in the sum: decide at the end
                held.append((delivery.task.client_id, delivery.result))
            else:
                yield delivery.result

    # -- the RPC (handler threads) ---------------------------------------------------------
    def handle(self, transport: GrpcTransport, peer: Peer,
               envelope: pb.SecAggEnvelope) -> pb.SecAggEnvelope:
        with transport.cond:
            task = transport.task_of(peer, envelope.task_id)
            rnd = self.current
            if not task.extra.get("secagg") or rnd is None or rnd.round != task.round:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              "no secure aggregation in progress for this task", "secagg_state")
            if not envelope.payload and envelope.detail:
                self._withdraw(transport, task, rnd, envelope.detail)
                return pb.SecAggEnvelope(finished=True, detail="withdrawn")
            if not envelope.payload:
                stage = self._ready(transport, task, rnd)
            else:
                stage = self._submit(transport, task, rnd, envelope.payload)
            # Wait until the stage closes and this client's next message is ready.
            deadline = time.monotonic() + transport.settings.round_deadline
            while True:
                reply = task.extra.get("replies", {}).get(stage)
                if reply is not None:
                    return reply
                if task.state == "closed" or self.current is not rnd:
                    return pb.SecAggEnvelope(finished=True,
                                             detail="dropped from the secure aggregation")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  "secure aggregation stage did not close in time", "deadline")
                transport.cond.wait(min(left, 1.0))

    def _withdraw(self, transport: GrpcTransport, task: PendingTask, rnd: _Round,
                  reason: str) -> None:
        """The client leaves the round (it will not or cannot go on): to the protocol it is
        a dropout, and nobody waits for it any longer."""
        if task.state not in ("issued", "secagg"):
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"task is {task.state}", "task_state")
        rnd.members.pop(task.extra.get("index", -1), None)
        # A refusal (a weaker setup, a bad signature) is the clients' alarm: keep it visible.
        log.warning("round %d: client %s withdrew from secure aggregation: %s", rnd.round,
                    task.client_id, reason[:500])
        transport.close_task(task, ClientFailure(
            task.client_id, f"withdrew from secure aggregation: {reason[:500]}"))

    def _ready(self, transport: GrpcTransport, task: PendingTask, rnd: _Round) -> str:
        if task.state != "issued" or rnd.stage != "ready":
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"cannot join the secure sum now (task {task.state}, stage "
                          f"{rnd.stage})", "secagg_state")
        task.state = "secagg"
        transport.cond.notify_all()
        return "ready"

    def _submit(self, transport: GrpcTransport, task: PendingTask, rnd: _Round,
                payload: bytes) -> str:
        stage = rnd.stage
        index = task.extra.get("index")
        if task.state != "secagg" or index not in rnd.members or rnd.server is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          "not a participant of this secure sum", "secagg_state")
        if task.extra.get("submitted") == stage:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"message for stage {stage} already received (replay?)", "replay")
        try:
            message = decode_message(bytes(payload))
            expected = STAGE_MESSAGES.get(stage)
            if expected is None or not isinstance(message, expected):
                raise SecAggProtocolError(f"expected {getattr(expected, '__name__', 'nothing')}"
                                          f" in stage {stage}, got {type(message).__name__}")
            if message.sender != index:
                raise SecAggProtocolError(f"message claims sender {message.sender}, this "
                                          f"client is participant {index}")
            rnd.server.receive(message)
        except SecAggProtocolError as exc:
            # The protocol treats a participant whose message is refused as dropped.
            del rnd.members[index]
            transport.reject_task(task, f"secure aggregation message refused: {exc}")
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "secagg_message") from exc
        task.extra["submitted"] = stage
        transport.cond.notify_all()
        return stage


@dataclass(frozen=True)
class SecAggCredentials:
    """What a client needs to take part in SecAgg+ against a malicious server: its signing
    identity (the mTLS certificate and key), a verifier of the other members' certificates
    (the federation CA) and its own bounds on the setups it accepts."""

    signer: SigningIdentity
    verifier: PeerVerifier
    bounds: SecAggBounds = field(default_factory=SecAggBounds)

    @classmethod
    def from_files(cls, ca: str | Path, cert: str | Path, key: str | Path,
                   bounds: SecAggBounds | None = None) -> SecAggCredentials:
        return cls(SigningIdentity.from_files(cert, key), CertificateVerifier.from_file(ca),
                   bounds or SecAggBounds())


def run_client_secagg(stubs: Any, task: pb.Task, delta: torch.Tensor, num_samples: int,
                      *, timeout: float, credentials: SecAggCredentials | None = None,
                      skellam: SkellamMechanism | None = None) -> bool:
    """Take part in the round's secure sum with ``delta``; True if it was aggregated.

    Without ``credentials`` the client cannot sign its keys, so it withdraws (with that
    reason) rather than take part unauthenticated. When the task's settings carry a Skellam
    mechanism (``skellam``: already decoded and checked by the caller; decoded here
    otherwise), ``delta`` is encoded with it and this client's own ``SecureNoise``.
    """
    s = task.secagg

    def withdraw(reason: str) -> None:
        with contextlib.suppress(grpc.RpcError):  # best effort: else the stage times it out
            stubs.secagg(pb.SecAggEnvelope(task_id=task.task_id, detail=reason[:500]),
                         timeout=timeout)

    weight = 1.0 if s.uniform_weighting else float(num_samples)
    if not bool(torch.isfinite(delta).all()) or not 0 < weight <= s.max_weight:
        # Once masked, the server could not tell a broken input: do not submit one.
        stubs.secagg(pb.SecAggEnvelope(task_id=task.task_id,
                                       detail=f"non-finite update or weight {weight} outside "
                                              f"(0, {s.max_weight}]"), timeout=timeout)
        return False
    if credentials is None:
        log.error("round %d: no signing credentials for secure aggregation", task.round)
        withdraw("client has no signing credentials for secure aggregation")
        return False
    if skellam is None and s.HasField("skellam"):
        try:
            skellam = skellam_from_wire(s, delta.numel())
        except WireError as exc:
            log.error("round %d: refusing the Skellam settings: %s", task.round, exc)
            withdraw(f"client refused: {exc}")
            return False
    encoded: np.ndarray | None = None
    if skellam is not None:
        # Clip, scale, rotate (public seed), round and add this client's Sk(mu / m) share,
        # all with randomness from the operating system's CSPRNG: nothing the server sent or
        # knows seeds it, so it cannot regenerate and subtract the noise.
        encoded = skellam.encode(delta.double().numpy(), SecureNoise().numpy(), task.round)
        dim, bits = skellam.encoded_dim, skellam.bits
    else:
        row = weighted_row(delta.double().numpy(), weight, s.clip, s.max_weight)
        dim, bits = row.size, s.bits

    def call(payload: bytes = b"") -> pb.SecAggEnvelope:
        return stubs.secagg(pb.SecAggEnvelope(task_id=task.task_id, payload=payload),
                            timeout=timeout)

    reply = call()
    if reply.finished:
        log.info("round %d: not in the secure sum: %s", task.round, reply.detail)
        return False
    client = SecAggPlusClient(reply.participant, signer=credentials.signer,
                              verifier=credentials.verifier, bounds=credentials.bounds)
    try:
        message = decode_message(bytes(reply.payload))
        if not isinstance(message, SetupMessage) or message.config.dim != dim \
                or message.config.bits != bits:
            raise SecAggProtocolError("unexpected secure aggregation setup")
        if skellam is not None and message.config.num_clients > skellam.max_clients:
            # More summands than the no-wrap bound covers: the sum could wrap around.
            raise SecAggProtocolError(
                f"setup for {message.config.num_clients} clients, but the Skellam settings' "
                f"modular-clipping bound covers at most {skellam.max_clients}")
        quantizer = None if skellam is not None else \
            Quantizer(clip=s.clip, bits=s.bits, num_clients=message.config.num_clients)
        outgoing = client.handle(message)
        while True:
            reply = call(outgoing.to_bytes())
            if reply.finished:
                log.info("round %d: secure aggregation: %s", task.round, reply.detail)
                return reply.detail == AGGREGATED
            message = decode_message(bytes(reply.payload))
            vector = None
            if isinstance(message, SharesBroadcast):
                vector = encoded if quantizer is None else \
                    quantizer.encode(row, np.random.default_rng())
            outgoing = client.handle(message, vector)
    except (SecAggProtocolError, ValueError) as exc:
        log.error("round %d: leaving the secure aggregation: %s", task.round, exc)
        withdraw(f"client refused: {exc}")
        return False
