"""Run a whole SecAgg+ round in one process, through the real message encoding.

:func:`secure_sum` quantizes float vectors, runs one :class:`SecAggPlusClient` per row and one
:class:`SecAggPlusServer` (Bonawitz et al., CCS 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"; Bell et al., CCS 2020, "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead"), and decodes the sum. Every message is serialised with
``to_bytes`` and parsed again with :func:`decode_message` on the receiving side, exactly as a
transport would, so the byte counts are those of the wire format and the timings include
encoding. Client-side and server-side work are timed separately.

Dropouts are scripted per stage: a client listed under a stage receives that stage's server
message (if it is still in) and then disappears without answering:

* ``"advertise"``    -- never sends its keys;
* ``"share_keys"``   -- advertised keys, drops before sending its shares;
* ``"masked_input"`` -- distributed shares, drops before uploading its masked input;
* ``"consistency"``  -- uploaded its masked input, drops before signing the survivor set (its
  input is still in the sum: its neighbours reveal its self-mask seed);
* ``"unmask"``       -- signed the survivor set, drops before answering the unmask request
  (its input is still in the sum too).

Each simulated client gets a fresh ECDSA P-256 signing key and the others find its public key
in a simulated PKI (:class:`~fedmosaic.privacy.secagg.identity.StaticPki`), so signatures and
the consistency check cost what they cost in a deployment, certificates aside.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedmosaic.privacy.secagg.crypto import (
    DeterministicRandom,
    RandomBytes,
    system_random_bytes,
)
from fedmosaic.privacy.secagg.graph import SecAggBounds, minimum_threshold, secagg_plus_parameters
from fedmosaic.privacy.secagg.identity import SigningIdentity, StaticPki
from fedmosaic.privacy.secagg.messages import Message, SecAggConfig, decode_message
from fedmosaic.privacy.secagg.protocol import AggregateResult, SecAggPlusClient, SecAggPlusServer
from fedmosaic.privacy.secagg.quantize import Quantizer

DROPOUT_STAGES = ("advertise", "share_keys", "masked_input", "consistency", "unmask")
#: The corrupted fraction (gamma) designed for when none is given, as the clients' default.
DEFAULT_CORRUPTED_FRACTION = SecAggBounds().corrupted_fraction


@dataclass(frozen=True, eq=False)
class SecureSumResult:
    """The outcome of one simulated round, with its exact costs.

    ``sum`` is float64 for :func:`secure_sum` and the ring dtype (mod 2^bits) for
    :func:`secure_sum_int`; ``survivors`` are the clients whose inputs it contains. The
    per-client arrays have one entry per client (zeros for clients that never took part);
    ``client_seconds`` is the wall time each client spent decoding, computing and encoding,
    ``client_cpu_seconds`` the CPU time of the process meanwhile (what a benchmark compares
    with frameworks that report CPU time; unlike wall time it excludes what other processes
    on a shared machine take).
    """

    sum: np.ndarray = field(repr=False)
    survivors: list[int]
    bytes_up_per_client: np.ndarray = field(repr=False)
    bytes_down_per_client: np.ndarray = field(repr=False)
    client_seconds: np.ndarray = field(repr=False)
    client_cpu_seconds: np.ndarray = field(repr=False)
    server_seconds: float
    degree: int
    threshold: int


def make_config(
    num_clients: int,
    dim: int,
    *,
    bits: int = 32,
    degree: int | None = None,
    threshold: int | None = None,
    dropout_rate: float = 0.1,
    corrupted_fraction: float = DEFAULT_CORRUPTED_FRACTION,
    security_bits: float = 40,
    correctness_bits: float = 20,
    round_id: int | None = None,
    graph_seed: bytes | None = None,
    random_bytes: RandomBytes = system_random_bytes,
) -> SecAggConfig:
    """A round configuration, with ``k`` and ``t`` from :func:`secagg_plus_parameters` by default.

    An explicit ``degree`` (capped at ``num_clients - 1``, the complete graph of classic
    SecAgg) without a ``threshold`` gets :func:`~fedmosaic.privacy.secagg.graph.
    minimum_threshold`, the smallest threshold that clients with the same corrupted fraction
    accept (on the complete graph ``t = floor((n - 1 + C) / 2) + 1``, ``C = ceil(gamma n)``).
    ``corrupted_fraction`` (gamma) defaults to the clients' default tolerance, never to 0.
    ``t`` counts *neighbours* (a client holds no share of its own secrets): on the complete
    graph the round survives ``n - 1 - t`` dropouts, one fewer than Bonawitz et al.'s
    ``n - t`` -- the exact bounds are in :mod:`fedmosaic.privacy.secagg.graph`.
    """
    if degree is None:
        params = secagg_plus_parameters(
            num_clients, dropout_rate, corrupted_fraction, security_bits, correctness_bits
        )
        degree = params.degree
        threshold = params.threshold if threshold is None else threshold
    degree = min(degree, num_clients - 1)
    if threshold is None:
        least = minimum_threshold(num_clients, degree, corrupted_fraction, dropout_rate,
                                  security_bits)
        threshold = degree // 2 + 1 if least is None else least
    config = SecAggConfig(
        round_id=int.from_bytes(random_bytes(8), "little") if round_id is None else round_id,
        num_clients=num_clients,
        threshold=threshold,
        degree=degree,
        dim=dim,
        bits=bits,
        graph_seed=random_bytes(32) if graph_seed is None else graph_seed,
    )
    config.validate()
    return config


def _dropout_plan(dropout: Mapping[str, set[int]] | None, n: int) -> dict[str, frozenset[int]]:
    plan = {stage: frozenset() for stage in DROPOUT_STAGES}
    for stage, clients in (dropout or {}).items():
        if stage not in plan:
            raise ValueError(f"unknown dropout stage {stage!r}; stages are {DROPOUT_STAGES}")
        bad = [u for u in clients if not 0 <= u < n]
        if bad:
            raise ValueError(f"dropout stage {stage!r} names clients outside [0, {n}): {bad}")
        plan[stage] = frozenset(clients)
    return plan


def run_round(
    config: SecAggConfig,
    vector_of: Callable[[int], np.ndarray],
    *,
    dropout: Mapping[str, set[int]] | None = None,
    random_for: Callable[[int], RandomBytes] | None = None,
    bounds: SecAggBounds | None = None,
) -> tuple[AggregateResult, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Drive one round; returns (result, bytes up, bytes down, client wall seconds, client CPU
    seconds, server seconds).

    ``vector_of(u)`` is called when client ``u`` masks its input, so at most one input
    vector is materialised at a time. ``bounds`` is every client's own
    :class:`~fedmosaic.privacy.secagg.graph.SecAggBounds` (default: the defaults, which
    refuse a setup weaker than they accept). Raises :class:`SecAggAbortError` if the round
    aborts and :class:`SecAggProtocolError` if a client refuses the setup.
    """
    n = config.num_clients
    plan = _dropout_plan(dropout, n)
    random_for = random_for or (lambda _u: system_random_bytes)
    up = np.zeros(n, dtype=np.int64)
    down = np.zeros(n, dtype=np.int64)
    client_seconds = np.zeros(n)
    client_cpu = np.zeros(n)
    server_seconds = 0.0

    signers = [SigningIdentity.generate(f"client/{u}") for u in range(n)]
    pki = StaticPki({s.identity: s.public_key for s in signers})
    start = time.perf_counter()
    server = SecAggPlusServer(config, [s.identity for s in signers], verifier=pki)
    setup = server.setup_message().to_bytes()
    server_seconds += time.perf_counter() - start
    clients = [
        SecAggPlusClient(u, signer=signers[u], verifier=pki, bounds=bounds,
                         random_bytes=random_for(u))
        for u in range(n)
    ]
    active = set(range(n))

    def exchange(
        stage: str,
        outgoing: Mapping[int, bytes],
        answer: Callable[[SecAggPlusClient, Message], Message],
    ) -> None:
        nonlocal server_seconds
        for u, data in outgoing.items():
            if u not in active:
                continue  # sent to a client that is already gone: nobody receives it
            down[u] += len(data)
            if u in plan[stage]:
                active.discard(u)
                continue
            cpu_tick, tick = time.process_time(), time.perf_counter()
            reply = answer(clients[u], decode_message(data)).to_bytes()
            tock, cpu_tock = time.perf_counter(), time.process_time()
            client_seconds[u] += tock - tick
            client_cpu[u] += cpu_tock - cpu_tick
            up[u] += len(reply)
            server.receive(decode_message(reply))
            server_seconds += time.perf_counter() - tock

    def server_step(step: Callable[[], Mapping[int, Message]]) -> dict[int, bytes]:
        nonlocal server_seconds
        tick = time.perf_counter()
        encoded = {u: m.to_bytes() for u, m in step().items()}
        server_seconds += time.perf_counter() - tick
        return encoded

    exchange("advertise", dict.fromkeys(range(n), setup), lambda c, m: c.handle(m))
    exchange("share_keys", server_step(server.broadcast_keys), lambda c, m: c.handle(m))
    exchange(
        "masked_input",
        server_step(server.route_shares),
        lambda c, m: c.handle(m, vector_of(c.client_id)),
    )
    exchange("consistency", server_step(server.request_consistency), lambda c, m: c.handle(m))
    exchange("unmask", server_step(server.request_unmask), lambda c, m: c.handle(m))
    tick = time.perf_counter()
    result = server.finalize()
    server_seconds += time.perf_counter() - tick
    return result, up, down, client_seconds, client_cpu, server_seconds


def _randomness(seed: int | None) -> tuple[RandomBytes, Callable[[int], RandomBytes]]:
    if seed is None:
        return system_random_bytes, lambda _u: system_random_bytes
    return (
        DeterministicRandom(seed, b"server"),
        lambda u: DeterministicRandom(seed, b"client/%d" % u),
    )


def _design_rate(dropout_rate: float, plan: Mapping[str, set[int]] | None, n: int) -> float:
    # Parameters are designed for at least the scripted dropouts, or the round could abort.
    planned = len(set().union(*(plan or {}).values())) / n
    return max(dropout_rate, planned)


def secure_sum_int(
    vectors_mod: np.ndarray,
    *,
    threshold: int | None = None,
    degree: int | None = None,
    bits: int = 32,
    dropout: Mapping[str, set[int]] | None = None,
    seed: int | None = None,
    dropout_rate: float = 0.1,
    corrupted_fraction: float = DEFAULT_CORRUPTED_FRACTION,
) -> SecureSumResult:
    """Securely sum the rows of an ``(n, dim)`` integer array mod ``2**bits``.

    ``degree``/``threshold`` default to :func:`secagg_plus_parameters` for a dropout rate of
    ``max(dropout_rate, fraction of clients scripted to drop)``. ``seed`` makes every key,
    share and mask reproducible -- for tests and benchmarks only, since it also makes them
    predictable; ``None`` uses the OS CSPRNG.
    """
    values = np.asarray(vectors_mod)
    if values.ndim != 2 or values.shape[0] < 2:
        raise ValueError(f"expected an (n >= 2, dim) array, got shape {values.shape}")
    return _secure_round(values, lambda u: values[u], threshold=threshold, degree=degree,
                         bits=bits, dropout=dropout, seed=seed, dropout_rate=dropout_rate,
                         corrupted_fraction=corrupted_fraction)


def _secure_round(
    values: np.ndarray,
    client_input: Callable[[int], np.ndarray],
    *,
    threshold: int | None,
    degree: int | None,
    bits: int,
    dropout: Mapping[str, set[int]] | None,
    seed: int | None,
    dropout_rate: float,
    corrupted_fraction: float,
    decode: Callable[[np.ndarray], np.ndarray] | None = None,
) -> SecureSumResult:
    """Configure and run one round for the rows of ``values`` (shared by both front ends)."""
    n, dim = values.shape
    server_random, random_for = _randomness(seed)
    config = make_config(
        n,
        dim,
        bits=bits,
        degree=degree,
        threshold=threshold,
        dropout_rate=_design_rate(dropout_rate, dropout, n),
        corrupted_fraction=corrupted_fraction,
        random_bytes=server_random,
    )
    # The simulated clients tolerate what the round was designed for (and rounds of 2).
    bounds = SecAggBounds(min_clients=2, corrupted_fraction=corrupted_fraction,
                          dropout_rate=_design_rate(dropout_rate, dropout, n))
    result, up, down, client_s, client_cpu, server_s = run_round(
        config, client_input, dropout=dropout, random_for=random_for, bounds=bounds
    )
    return SecureSumResult(
        sum=result.total if decode is None else decode(result.total),
        survivors=list(result.survivors),
        bytes_up_per_client=up,
        bytes_down_per_client=down,
        client_seconds=client_s,
        client_cpu_seconds=client_cpu,
        server_seconds=server_s,
        degree=config.degree,
        threshold=config.threshold,
    )


def secure_sum(
    vectors: np.ndarray,
    *,
    threshold: int | None = None,
    degree: int | None = None,
    clip: float = 1.0,
    bits: int = 32,
    dropout: Mapping[str, set[int]] | None = None,
    seed: int | None = None,
    dropout_rate: float = 0.1,
    corrupted_fraction: float = DEFAULT_CORRUPTED_FRACTION,
) -> SecureSumResult:
    """Securely sum the rows of an ``(n, dim)`` float array (clipped to ``[-clip, clip]``).

    Each client quantizes its own row (:class:`Quantizer` with ``num_clients = n``, so the sum
    cannot wrap) as part of its client-side work; the result is the decoded float64 sum of the
    survivors' clipped rows, exact up to ``Quantizer.error_bound(len(survivors))``. Other
    arguments as in :func:`secure_sum_int`.
    """
    values = np.asarray(vectors)
    if values.ndim != 2 or values.shape[0] < 2:
        raise ValueError(f"expected an (n >= 2, dim) array, got shape {values.shape}")
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    quantizer = Quantizer(clip=clip, bits=bits, num_clients=values.shape[0])
    rounding = np.random.default_rng(seed)
    return _secure_round(
        values, lambda u: quantizer.encode(values[u], rounding), threshold=threshold,
        degree=degree, bits=bits, dropout=dropout, seed=seed, dropout_rate=dropout_rate,
        corrupted_fraction=corrupted_fraction, decode=quantizer.decode)

