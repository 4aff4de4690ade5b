"""What travels on the wire besides protobuf scalars: tensors in chunks, fit settings, stages.

Tensors are flat float32 vectors sent as raw little-endian bytes in chunks of at most
``chunk_bytes``: no pickling, and no message ever grows with the model. Every received chunk is
checked (contiguous offset, whole float32 values, bounds, finite values) before it is copied
into the receiving buffer, so a hostile sender can neither write outside it nor smuggle NaNs in.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from fedmosaic.algorithms.strategy import ClientStage
from fedmosaic.core.errors import ConfigError
from fedmosaic.core.params import ParamSpec
from fedmosaic.net.channel import grpc_options as grpc_options
from fedmosaic.net.proto import fedmosaic_pb2 as pb
from fedmosaic.privacy.local_dp import DistributedNoiseShare, LocalDP
from fedmosaic.privacy.skellam import SkellamMechanism
from fedmosaic.train.base import FitConfig

FLOAT_BYTES = 4
LITTLE_F32 = np.dtype("<f4")
# Room for a message's fields besides its tensor bytes (header, metrics map, ids).
MESSAGE_OVERHEAD = 64 * 1024
MAX_METRICS = 64
MAX_SAMPLES = 2**40  # largest sample count a client may report
MAX_METRIC_KEY = 64
# Largest magnitude of a reported metric: far above any loss or accuracy, small enough that a
# sample-weighted sum over 2**40 samples stays finite in float64.
MAX_METRIC_MAGNITUDE = 1e15
# A client's refusal of its task (``TaskRefusal``): a category from a fixed set (so that logs
# and metrics never take a label from the client) and a short, printable reason.
REFUSAL_CODES: tuple[str, ...] = (
    "secagg_required",    # the task has no secure aggregation; the policy requires SecAgg+
    "secagg_bits",        # fewer SecAgg+ ring bits than the policy's minimum
    "no_dp",              # the task carries no DP stage; the policy requires noise
    "noise_multiplier",   # a DP stage's noise is below the policy's minimum
    "clip",               # a DP stage's clip is above the policy's maximum
    "epsilon_per_round",  # one round's local-DP epsilon is above the policy's maximum
    "epsilon_budget",     # the client's own epsilon budget would be exceeded
    "malformed_task",     # the task could not be decoded (unknown stage, bad settings)
    "training_failed",    # local training raised (the reason names the error)
    "evaluation_failed",  # local evaluation raised
    "no_test_data",       # an EVALUATE task, but this client has no local test split
    "incompatible_data",  # the client's data or model does not fit the task (found late)
)
MAX_REFUSAL_REASON = 512
# What a client accepts of a server's Skellam settings beyond the mechanism's own checks: a sum
# of at most this many clients, and a modular wrap-around bound no looser than this.
MAX_SKELLAM_CLIENTS = 1_000_000
MAX_SKELLAM_WRAP_PROBABILITY = 1e-3


class WireError(ValueError):
    """A received message is malformed; the text says what is wrong (sent back to the peer).

    ``label`` names the kind of problem for the rejected-messages metric.
    """

    def __init__(self, message: str, label: str = "malformed") -> None:
        super().__init__(message)
        self.label = label


def spec_hash(spec: ParamSpec) -> str:
    """A short hash of a model's layout: client and server must agree on it."""
    blob = json.dumps(spec.to_json(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def chunk_elements(chunk_bytes: int) -> int:
    """Float32 values per chunk."""
    if chunk_bytes < FLOAT_BYTES:
        raise ConfigError("server.chunk_bytes", chunk_bytes, "at least 4 bytes")
    return chunk_bytes // FLOAT_BYTES


def iter_chunks(vector: torch.Tensor, chunk_bytes: int) -> Iterator[pb.TensorChunk]:
    """Chunks of a flat float32 vector: views of it converted one chunk at a time, so sending
    a model to any number of clients never copies the whole vector."""
    flat = vector.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    step = chunk_elements(chunk_bytes)
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step].numpy().astype(LITTLE_F32, copy=False)
        yield pb.TensorChunk(offset=start, data=part.tobytes())


class ChunkAssembler:
    """Receives the chunks of one vector of ``numel`` float32 values into ``buffer``.

    Chunks must arrive in order (each offset equal to the count received so far), hold whole
    float32 values, at most ``max_chunk_bytes`` of them, never run past ``numel``, and contain
    only finite values; anything else raises ``WireError`` and the buffer must be discarded.
    """

    def __init__(self, buffer: torch.Tensor, numel: int, max_chunk_bytes: int) -> None:
        if buffer.dtype != torch.float32 or buffer.numel() < numel:
            raise ValueError("the receiving buffer must be float32 with room for numel values")
        self.buffer, self.numel, self.max_chunk_bytes = buffer, numel, max_chunk_bytes
        self.filled = 0

    def add(self, chunk: pb.TensorChunk) -> None:
        data = chunk.data
        if chunk.offset != self.filled:
            raise WireError(f"chunk offset {chunk.offset} but {self.filled} values received so "
                            "far (chunks must be contiguous and in order)", "wrong_shape")
        if not data:
            raise WireError("empty chunk", "wrong_shape")
        if len(data) > self.max_chunk_bytes:
            raise WireError(f"chunk of {len(data)} bytes exceeds the limit of "
                            f"{self.max_chunk_bytes}", "oversized")
        if len(data) % FLOAT_BYTES:
            raise WireError(f"chunk of {len(data)} bytes is not a whole number of float32 values",
                            "bad_dtype")
        count = len(data) // FLOAT_BYTES
        if self.filled + count > self.numel:
            raise WireError(f"chunks carry more than the model's {self.numel} values",
                            "wrong_shape")
        values = np.frombuffer(data, dtype=LITTLE_F32)
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise WireError(f"chunk at offset {chunk.offset} has {bad} non-finite values",
                            "non_finite")
        self.buffer[self.filled:self.filled + count] = torch.from_numpy(
            values.astype(np.float32))
        self.filled += count

    def finish(self) -> torch.Tensor:
        if self.filled != self.numel:
            raise WireError(f"stream ended after {self.filled} of {self.numel} values",
                            "wrong_shape")
        return self.buffer[:self.numel]


class BufferPool:
    """A fixed number of reusable receive buffers (a bounded pool of upload slots).

    Uploads wait for a free slot, so the server holds at most ``slots`` uploads in flight
    whatever the number of clients: with the running sum, peak memory does not grow with the
    federation.
    """

    def __init__(self, numel: int, slots: int) -> None:
        if slots < 1:
            raise ConfigError("server.upload_slots", slots, "an integer >= 1")
        self.numel = numel
        self._free: list[torch.Tensor] = []
        self._allocated = 0
        self._slots = slots
        self._sem = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, timeout: float) -> Iterator[torch.Tensor]:
        if not self._sem.acquire(timeout=max(timeout, 0.0)):
            raise TimeoutError("no upload slot became free before the round's deadline")
        try:
            with self._lock:
                # Allocated lazily, at most ``slots`` times over the server's life.
                buf = self._free.pop() if self._free else torch.empty(self.numel)
            try:
                yield buf
            finally:
                with self._lock:
                    self._free.append(buf)
        finally:
            self._sem.release()


def check_metrics(metrics: Any) -> dict[str, float]:
    """A client's reported metrics: a bounded map of short printable names to finite numbers
    of magnitude at most ``MAX_METRIC_MAGNITUDE``. ``WireError`` labels: ``oversized`` (too
    many, too large), ``malformed`` (a bad name), ``non_finite``."""
    if len(metrics) > MAX_METRICS:
        raise WireError(f"{len(metrics)} metrics, at most {MAX_METRICS} allowed", "oversized")
    out = {}
    for key, value in metrics.items():
        if not key or len(key) > MAX_METRIC_KEY or not key.isprintable():
            # repr: a name is the client's text; it must not forge a log line.
            raise WireError(f"metric name {key[:MAX_METRIC_KEY]!r} is empty, too long or "
                            "not printable")
        if not math.isfinite(value):
            raise WireError(f"metric '{key}' is {value}, not finite", "non_finite")
        if abs(value) > MAX_METRIC_MAGNITUDE:
            raise WireError(f"metric '{key}' is {value:g}, beyond +-{MAX_METRIC_MAGNITUDE:g}",
                            "oversized")
        out[key] = float(value)
    return out


def check_evaluation(msg: pb.EvaluationReport) -> tuple[int, dict[str, float]]:
    """The (num_samples, metrics) of a client's ``EvaluationReport``; ``WireError`` if the
    sample count is outside ``[1, MAX_SAMPLES]`` (label ``invalid_evaluation``) or a metric
    fails ``check_metrics``."""
    if not 0 < msg.num_samples <= MAX_SAMPLES:
        raise WireError(f"num_samples {msg.num_samples} outside [1, {MAX_SAMPLES}]",
                        "invalid_evaluation")
    return int(msg.num_samples), check_metrics(msg.metrics)


def check_refusal(msg: pb.TaskRefusal) -> tuple[str, str]:
    """The (code, reason) of a client's ``TaskRefusal``; ``WireError`` if the code is not one
    of ``REFUSAL_CODES`` or the reason is empty, longer than ``MAX_REFUSAL_REASON`` characters
    or not printable (a newline or control character could forge log lines)."""
    code, reason = msg.code, msg.reason
    if code not in REFUSAL_CODES:
        # The text is not echoed: it is the client's, and this message is logged.
        raise WireError(f"refusal code ({len(code)} characters) is not one of "
                        f"{', '.join(REFUSAL_CODES)}")
    if not reason or len(reason) > MAX_REFUSAL_REASON or not reason.isprintable():
        raise WireError(f"refusal reason must be 1 to {MAX_REFUSAL_REASON} printable characters "
                        f"(got {len(reason)} characters)")
    return code, reason


def printable_reason(text: str) -> str:
    """``text`` made acceptable to ``check_refusal``: non-printable characters replaced by
    spaces, cut to ``MAX_REFUSAL_REASON`` characters (what a client sends)."""
    cleaned = "".join(c if c.isprintable() else " " for c in text).strip() or "refused"
    if len(cleaned) > MAX_REFUSAL_REASON:
        cleaned = cleaned[:MAX_REFUSAL_REASON - 3] + "..."
    return cleaned


# -- fit settings ---------------------------------------------------------------------------

def fit_config_to_wire(config: FitConfig) -> pb.FitSettings:
    msg = pb.FitSettings(round=config.round, proximal_mu=config.proximal_mu, seed=config.seed,
                         extra={k: float(v) for k, v in config.extra.items()})
    for name in ("epochs", "batch_size", "max_steps", "lr"):
        value = getattr(config, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def fit_config_from_wire(msg: pb.FitSettings) -> FitConfig:
    """The FitConfig a task carries; FitConfig's own checks reject impossible values."""
    def opt(name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else None

    if not math.isfinite(msg.proximal_mu) or (msg.HasField("lr") and not math.isfinite(msg.lr)):
        raise WireError("fit settings hold non-finite numbers")
    try:
        return FitConfig(round=msg.round, epochs=opt("epochs"), batch_size=opt("batch_size"),
                         max_steps=opt("max_steps"), lr=opt("lr"),
                         proximal_mu=msg.proximal_mu, seed=msg.seed,
                         extra=check_metrics(msg.extra))
    except ValueError as exc:
        raise WireError(f"invalid fit settings: {exc}") from exc


# -- client stages --------------------------------------------------------------------------

def stage_to_wire(stage: ClientStage) -> pb.StageSpec:
    """A client stage as data; only stages the client can rebuild are allowed."""
    if isinstance(stage, LocalDP):
        params = {"clip": stage.clip}
        if stage.noise_multiplier is not None:
            params["noise_multiplier"] = stage.noise_multiplier
        if stage.epsilon is not None:
            params["epsilon"] = stage.epsilon
        return pb.StageSpec(kind="local_dp", params=params, mechanism=stage.mechanism)
    if isinstance(stage, DistributedNoiseShare):
        return pb.StageSpec(kind="distributed_noise",
                            params={"clip": stage.clip, "noise_std": stage.noise_std})
    raise ConfigError("strategy.client_stages", type(stage).__name__,
                      "LocalDP or DistributedNoiseShare (the stages a remote client can rebuild)")


def stage_from_wire(msg: pb.StageSpec) -> ClientStage:
    params = dict(msg.params)
    try:
        if msg.kind == "local_dp" and set(params) <= {"clip", "noise_multiplier", "epsilon"}:
            return LocalDP(clip=params["clip"], mechanism=msg.mechanism,
                           noise_multiplier=params.get("noise_multiplier"),
                           epsilon=params.get("epsilon"))
        if msg.kind == "distributed_noise" and set(params) == {"clip", "noise_std"}:
            return DistributedNoiseShare(clip=params["clip"], noise_std=params["noise_std"])
    except (KeyError, ValueError) as exc:
        raise WireError(f"invalid client stage {msg.kind!r}: {exc}") from exc
    raise WireError(f"unknown client stage {msg.kind!r} with parameters {sorted(params)}")


# -- distributed Skellam --------------------------------------------------------------------

def skellam_to_wire(mechanism: SkellamMechanism) -> pb.SkellamSettings:
    """The public parameters of a round's Skellam mechanism (no noise, no secret)."""
    return pb.SkellamSettings(
        clip=mechanism.clip, gamma=mechanism.gamma, mu=mechanism.mu,
        min_contributors=mechanism.min_contributors, max_clients=mechanism.max_clients,
        beta=mechanism.beta, rotation=mechanism.rotation, rotation_seed=mechanism.rotation_seed,
        max_wrap_probability=mechanism.max_wrap_probability,
        encoded_dim=mechanism.encoded_dim)


def skellam_from_wire(settings: pb.SecAggSettings, numel: int) -> SkellamMechanism | None:
    """The Skellam mechanism a task's SecAgg+ settings ask for (None: the fixed-point
    quantizer), rebuilt on the client from the server's numbers and checked as untrusted
    input: every number finite and in range, the mechanism's own checks (including its
    modular-clipping bound, so the sum cannot wrap), a wrap bound no looser than
    ``MAX_SKELLAM_WRAP_PROBABILITY``, and the padded dimension consistent with the model's
    ``numel``. ``WireError`` names the problem. Whether the noise is *enough* is the privacy
    policy's decision (``PrivacyPolicy.check``)."""
    if not settings.HasField("skellam"):
        return None
    sk = settings.skellam
    for name in ("clip", "gamma", "mu", "beta", "max_wrap_probability"):
        value = getattr(sk, name)
        if not math.isfinite(value):
            raise WireError(f"Skellam setting {name} is {value}, not finite")
    if not 1 <= sk.min_contributors <= sk.max_clients <= MAX_SKELLAM_CLIENTS:
        raise WireError(f"Skellam settings need 1 <= min_contributors ({sk.min_contributors}) "
                        f"<= max_clients ({sk.max_clients}) <= {MAX_SKELLAM_CLIENTS}")
    if not 0 < sk.max_wrap_probability <= MAX_SKELLAM_WRAP_PROBABILITY:
        raise WireError(f"Skellam max_wrap_probability {sk.max_wrap_probability:g} is outside "
                        f"(0, {MAX_SKELLAM_WRAP_PROBABILITY:g}]")
    if not settings.uniform_weighting:
        raise WireError("Skellam encoding sums unweighted updates: uniform_weighting must be set")
    try:
        mechanism = SkellamMechanism(
            dim=numel, clip=sk.clip, gamma=sk.gamma, mu=sk.mu,
            min_contributors=sk.min_contributors, max_clients=sk.max_clients,
            bits=settings.bits, beta=sk.beta, rotation=sk.rotation,
            rotation_seed=sk.rotation_seed, max_wrap_probability=sk.max_wrap_probability)
    except ValueError as exc:
        raise WireError(f"invalid Skellam settings: {exc}") from exc
    if mechanism.encoded_dim != sk.encoded_dim:
        raise WireError(f"Skellam settings give {mechanism.encoded_dim} encoded coordinates for "
                        f"{numel} parameters, the server says {sk.encoded_dim}")
    return mechanism
